"""The operator's commands as facility IT runs them: `dead-letter`, `status` with the
service, `backfill` and `doctor`, each a real `sepas-agent` process on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from agent.buffer import Buffer, State
from agent.keys import load_data_key
from tests.e2e.test_cli import EXE, ROOT, run
from tests.factories import hl7_message, make_record, national_code, patient_name
from tests.hl7corpus import obr

NODE = "FAC-0042"


def write_config(tmp_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""\
            [node]
            id = "{NODE}"
            data_dir = "{tmp_path / "data"}"
            [hub]
            url = "http://127.0.0.1:9/"
            timeout_secs = 2
            [buffer]
            max_bytes = 10485760
            [telemetry]
            listen = "127.0.0.1:0"
            """
        )
        + textwrap.dedent(extra),
        encoding="utf-8",
    )
    return cfg


MLLP = """
[[adapters]]
name = "lis"
kind = "hl7-mllp"
listen = "127.0.0.1:0"
"""


def valid_oru(i: int) -> bytes:
    """An ORU^R01 the current mapping accepts (the factories' message plus an OBR)."""
    segs = hl7_message(i).split(b"\r")
    return b"\r".join([segs[0], segs[1], obr(1).encode(), *segs[2:]])


def open_buffer(tmp_path: Path) -> Buffer:
    data = tmp_path / "data"
    return Buffer.open(data, data_key=load_data_key(data / "buffer.key"))


@pytest.fixture
def dead_letters(tmp_path: Path) -> tuple[Path, str]:
    """A buffer with one dead record (made_record 1) and one quarantined ORU (q1)."""
    cfg = write_config(tmp_path, MLLP)
    assert run("keys", "init", "-c", str(cfg)).returncode == 0
    with open_buffer(tmp_path) as buf:
        buf.put([make_record(1)])
        lease = buf.lease(max_records=10, max_bytes=10**9, lease_secs=60)
        assert lease is not None
        buf.dead_letter(lease, {lease.ids[0]: "422 invalid-record: bad coding"})
        qid = buf.quarantine(
            valid_oru(5), adapter="lis", reason="AE: an old bug", media_type="x-application/hl7-v2"
        )
        assert qid == 1
        dead_id = lease.ids[0]
    return cfg, dead_id


def test_dead_letter_list_shows_both_kinds_without_patient_data(
    dead_letters: tuple[Path, str],
) -> None:
    cfg, dead_id = dead_letters
    res = run("dead-letter", "list", "--json", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    by_id = {e["id"]: e for e in data["entries"]}
    assert by_id["q1"]["type"] == "quarantine"
    assert by_id["q1"]["adapter"] == "lis"
    assert by_id["q1"]["reason"] == "AE: an old bug"
    assert by_id[dead_id]["type"] == "dead"
    assert by_id[dead_id]["service"] == "lab-result"
    assert "invalid-record" in by_id[dead_id]["reason"]
    assert data["totals"] == {"quarantined": 1, "dead": 1}
    table = run("dead-letter", "list", "-c", str(cfg))
    assert table.returncode == 0
    assert "q1" in table.stdout
    assert dead_id[:12] in table.stdout
    limited = json.loads(
        run("dead-letter", "list", "--json", "--limit", "1", "-c", str(cfg)).stdout
    )
    assert len(limited["entries"]) == 1
    for out in (res.stdout, table.stdout):
        for i in (1, 5):
            assert national_code(i) not in out
            assert patient_name(i).split()[1] not in out


def test_dead_letter_show_decrypts_a_dead_record_by_prefix_and_raw_quarantine_bytes(
    dead_letters: tuple[Path, str],
) -> None:
    cfg, dead_id = dead_letters
    res = run("dead-letter", "show", dead_id[:10], "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["id"] == dead_id
    meta = run("dead-letter", "show", "q1", "-c", str(cfg))
    assert meta.returncode == 0, meta.stderr
    assert json.loads(meta.stdout)["adapter"] == "lis"
    assert national_code(5) not in meta.stdout
    raw = subprocess.run(
        [str(EXE), "dead-letter", "show", "q1", "--raw", "-c", str(cfg)],
        capture_output=True,
        timeout=30,
    )
    assert raw.returncode == 0
    assert raw.stdout == valid_oru(5)
    assert national_code(5).encode() not in raw.stderr


def test_dead_letter_show_unknown_or_short_ids_fail_with_a_hint(
    dead_letters: tuple[Path, str],
) -> None:
    cfg, _ = dead_letters
    for ident in ("q99", "abc", "00000000"):
        res = run("dead-letter", "show", ident, "-c", str(cfg))
        assert res.returncode == 1, (ident, res.stdout)
        assert "dead-letter list" in res.stderr


def test_dead_letter_retry_requeues_dead_and_remaps_quarantined_hl7(
    dead_letters: tuple[Path, str], tmp_path: Path
) -> None:
    cfg, dead_id = dead_letters
    res = run("dead-letter", "retry", "q1", dead_id[:8], "--json", "-c", str(cfg))
    assert res.returncode == 0, res.stdout + res.stderr
    results = json.loads(res.stdout)["results"]
    assert [r["ok"] for r in results] == [True, True]
    with open_buffer(tmp_path) as buf:
        assert buf.quarantined() == []
        assert buf.state_of(dead_id) is State.PENDING
        stats = buf.stats()
        assert stats.total(State.PENDING) == 2  # the dead one, and the re-mapped ORU
        assert stats.total(State.DEAD) == 0


def test_dead_letter_retry_keeps_a_still_refused_message_with_the_new_reason(
    tmp_path: Path,
) -> None:
    cfg = write_config(tmp_path, MLLP)
    run("keys", "init", "-c", str(cfg))
    with open_buffer(tmp_path) as buf:
        buf.quarantine(hl7_message(3), adapter="lis", reason="old reason")  # no OBR
    res = run("dead-letter", "retry", "--all", "-c", str(cfg))
    assert res.returncode == 1
    assert "OBR" in res.stdout
    with open_buffer(tmp_path) as buf:
        (entry,) = buf.quarantined()
        assert "OBR" in entry.reason
        assert entry.reason != "old reason"


def test_dead_letter_purge_needs_yes_when_not_interactive(
    dead_letters: tuple[Path, str], tmp_path: Path
) -> None:
    cfg, dead_id = dead_letters
    refused = run("dead-letter", "purge", "--all", "-c", str(cfg))
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    usage = run("dead-letter", "purge", "-c", str(cfg))
    assert usage.returncode == 2
    res = run("dead-letter", "purge", "--all", "--yes", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    with open_buffer(tmp_path) as buf:
        assert buf.quarantined() == []
        assert buf.dead() == []
        assert buf.state_of(dead_id) is None


# -- status and the service ---------------------------------------------------------------


def test_status_says_the_service_is_not_running_when_it_never_ran(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, MLLP)
    res = run("status", "--json", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["service"]["running"] is False
    assert data["service"]["ever_ran"] is False
    assert data["adapters"]["lis"]["kind"] == "hl7-mllp"
    table = run("status", "-c", str(cfg))
    assert "not running" in table.stdout


def test_status_shows_a_running_service_its_adapters_then_not_running_after_sigterm(
    tmp_path: Path,
) -> None:
    cfg = write_config(tmp_path, MLLP)
    assert run("keys", "init", "-c", str(cfg)).returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEPAS_AGENT_")}
    proc = subprocess.Popen(
        [str(EXE), "run", "-c", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
    )
    try:
        state = tmp_path / "data" / "agent.state.json"
        deadline = time.monotonic() + 8
        while not state.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        res = run("status", "--json", "-c", str(cfg))
        assert res.returncode == 0, res.stderr
        data = json.loads(res.stdout)
        assert data["service"]["running"] is True
        assert data["service"]["pid"] == proc.pid
        assert data["service"]["heartbeat_age_s"] < 10
        assert data["adapters"]["lis"]["state"] == "running"
        assert data["adapters"]["lis"]["consecutive_failures"] == 0
        assert "totals" in data
        assert "uploads" in data
        table = run("status", "-c", str(cfg))
        assert f"running (pid {proc.pid}" in table.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    after = json.loads(run("status", "--json", "-c", str(cfg)).stdout)
    assert after["service"]["running"] is False
    assert after["service"]["ever_ran"] is True


# -- backfill -----------------------------------------------------------------------------


def test_backfill_of_an_mllp_listener_is_unsupported_with_a_hint(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, MLLP)
    run("keys", "init", "-c", str(cfg))
    res = run("backfill", "lis", "--since", "2025-03-21", "-c", str(cfg))
    assert res.returncode == 1
    assert "cannot backfill" in res.stderr
    assert "hint:" in res.stderr
    assert "Traceback" not in res.stderr


def test_backfill_of_an_unknown_adapter_exits_2_listing_the_names(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, MLLP)
    res = run("backfill", "nope", "--since", "2025-03-21", "-c", str(cfg))
    assert res.returncode == 2
    assert "lis" in res.stderr


def test_backfill_refuses_a_bad_date_with_both_forms(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, MLLP)
    res = run("backfill", "lis", "--since", "1404-13-01", "-c", str(cfg))
    assert res.returncode == 2
    assert "1404-01-01" in res.stderr


def _his(path: Path) -> None:
    """A SQLite HIS stand-in: rows changed on 1403-12-30, 1404-01-01 (twice), 1404-01-02."""
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE lab (id INTEGER PRIMARY KEY, nid TEXT, family TEXT, given TEXT, "
            "taken_at TEXT, changed_at TEXT, test TEXT, value TEXT)"
        )
        days = ["2025-03-20 10:00:00", "2025-03-21 09:00:00", "2025-03-21 23:00:00"]
        days.append("2025-03-22 08:00:00")
        for i, changed in enumerate(days, 1):
            given, family = patient_name(i).split(" ")
            db.execute(
                "INSERT INTO lab VALUES (?, ?, ?, ?, ?, ?, 'GLU', '5.4')",
                (i, national_code(i), family, given, changed, changed),
            )


SQL = """
[[adapters]]
name = "his-db"
kind = "sql"
url = "sqlite:///{db}"
query = "SELECT * FROM lab WHERE changed_at > :cursor ORDER BY changed_at"
cursor_column = "changed_at"
initial_cursor = "2000-01-01"
key_columns = ["id"]
service = "lab-result"
[adapters.fields]
occurred_at = "taken_at"
national_id = "nid"
family = "family"
given = "given"
"""


def test_backfill_of_an_sql_source_takes_jalali_days_and_is_idempotent(tmp_path: Path) -> None:
    db = tmp_path / "his.db"
    _his(db)
    cfg = write_config(tmp_path, SQL.format(db=db))
    assert run("keys", "init", "-c", str(cfg)).returncode == 0
    res = run(
        "backfill", "his-db", "--since", "1404-01-01", "--until", "۱۴۰۴-۰۱-۰۱", "--json",
        "-c", str(cfg),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert (data["since"], data["until"]) == ("2025-03-21", "2025-03-21")
    assert (data["found"], data["new"], data["duplicates"]) == (2, 2, 0)
    assert "backfill his-db" in res.stderr  # plain progress lines off a terminal
    again = run(
        "backfill", "his-db", "--since", "2025-03-21", "--until", "2025-03-21", "-c", str(cfg)
    )
    assert again.returncode == 0, again.stderr
    assert "2 already stored" in again.stdout
    with open_buffer(tmp_path) as buf:
        assert buf.stats().total(State.PENDING) == 2
        assert buf.cursor("his-db") is None  # the live cursor did not move


# -- doctor -------------------------------------------------------------------------------


def test_doctor_with_an_unreachable_hub_fails_only_the_hub_check(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, MLLP)
    assert run("keys", "init", "-c", str(cfg)).returncode == 0
    with open_buffer(tmp_path) as buf:
        buf.put([make_record(1)])
    started = time.monotonic()
    res = run("doctor", "--json", "-c", str(cfg))
    assert time.monotonic() - started < 10
    assert res.returncode == 1, res.stdout + res.stderr
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["hub health"]["status"] == "FAIL"
    assert checks["hub health"]["hint"]
    for name in (
        "config",
        "node key",
        "buffer key",
        "data dir",
        "disk space",
        "buffer",
        "telemetry.listen",
        "lis: listen",
    ):
        assert checks[name]["status"] == "OK", checks[name]
    assert not [c for c in checks.values() if c["status"] == "FAIL" and c["name"] != "hub health"]
    table = run("doctor", "-c", str(cfg))
    assert table.returncode == 1
    assert "FAIL hub health" in table.stdout


def test_doctor_flags_a_group_readable_key_and_a_missing_config(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    run("keys", "init", "-c", str(cfg))
    (tmp_path / "data" / "node.key").chmod(0o640)
    res = run("doctor", "--json", "-c", str(cfg))
    assert res.returncode == 1
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["node key"]["status"] == "FAIL"
    assert "chmod 600" in checks["node key"]["hint"]
    missing = run("doctor", "--json", "-c", str(tmp_path / "nope.toml"))
    assert missing.returncode == 1
    assert json.loads(missing.stdout)["checks"][0]["status"] == "FAIL"
