"""The `sepas-agent` command as facility IT runs it: a real process, a real config file."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from agent.buffer import Buffer
from agent.keys import load_data_key
from tests.factories import make_record

ROOT = Path(__file__).resolve().parents[2]
EXE = Path(sys.executable).parent / "sepas-agent"


def run(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SEPAS_AGENT_")}
    full_env.update(env or {})
    return subprocess.run(
        [str(EXE), *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=60
    )


def write_config(tmp_path: Path, extra: str = "", *, node: str = "") -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""\
            [node]
            id = "FAC-0042"
            data_dir = "{tmp_path / "data"}"
            {node}
            [hub]
            url = "http://127.0.0.1:9/"
            """
        )
        + textwrap.dedent(extra),
        encoding="utf-8",
    )
    return cfg


def test_example_config_passes_config_check(tmp_path: Path) -> None:
    res = run(
        "config",
        "check",
        "-c",
        "config/agent.example.toml",
        env={"SEPAS_AGENT_DATA_DIR": str(tmp_path)},
    )
    assert res.returncode == 0, res.stderr
    assert 'id = "FAC-0001"' in res.stdout
    assert "is valid" in res.stderr


def test_config_check_masks_the_sql_password(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        """
        [[adapters]]
        name = "his-db"
        kind = "sql"
        url = "postgresql://his:s3cret-pw@127.0.0.1:5432/his"
        query = "SELECT * FROM v WHERE changed_at > :cursor"
        cursor_column = "changed_at"
        key_columns = ["id"]
        service = "admission"
        [adapters.fields]
        occurred_at = "changed_at"
        """,
    )
    res = run("config", "check", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "s3cret-pw" not in res.stdout + res.stderr
    assert "********" in res.stdout


def test_broken_config_exits_2_naming_file_and_every_key_without_traceback(
    tmp_path: Path,
) -> None:
    cfg = write_config(
        tmp_path,
        """
        [buffer]
        max_bytez = 5
        retention_days = "thirty"
        [[adapters]]
        name = "lis"
        kind = "hl7-mllp"
        [[adapters]]
        name = "lis"
        kind = "hl7-mllp"
        listen = "0.0.0.0:2576"
        """,
    )
    res = run("status", "-c", str(cfg))
    assert res.returncode == 2
    assert str(cfg) in res.stderr
    for key in ("buffer.max_bytez", "buffer.retention_days", "adapters[1].name"):
        assert key in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_missing_config_file_is_a_config_error_exit_2(tmp_path: Path) -> None:
    res = run("status", "-c", str(tmp_path / "nope.toml"))
    assert res.returncode == 2
    assert "nope.toml" in res.stderr


def test_config_path_comes_from_environment_when_no_flag(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    res = run("status", "--json", env={"SEPAS_AGENT_CONFIG": str(cfg)})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["node_id"] == "FAC-0042"


def test_keys_init_writes_0600_keys_and_refuses_to_overwrite(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    first = run("keys", "init", "-c", str(cfg))
    assert first.returncode == 0, first.stderr
    key = tmp_path / "data" / "node.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "data" / "buffer.key").stat().st_mode) == 0o600
    assert "BEGIN PUBLIC KEY" in first.stdout
    before = key.read_bytes()
    again = run("keys", "init", "-c", str(cfg))
    assert again.returncode == 1
    assert "--force" in again.stderr
    assert key.read_bytes() == before
    forced = run("keys", "init", "--force", "-c", str(cfg))
    assert forced.returncode == 0
    assert key.read_bytes() != before


def test_keys_show_prints_the_same_fingerprint_as_init(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    init = run("keys", "init", "-c", str(cfg))
    show = run("keys", "show", "--json", "-c", str(cfg))
    assert show.returncode == 0, show.stderr
    data = json.loads(show.stdout)
    assert data["fingerprint"].startswith("SHA256:")
    assert f"fingerprint: {data['fingerprint']}" in init.stdout
    assert data["public_key"] in init.stdout


def test_keys_show_refuses_a_group_readable_key(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    run("keys", "init", "-c", str(cfg))
    os.chmod(tmp_path / "data" / "node.key", 0o640)
    res = run("keys", "show", "-c", str(cfg))
    assert res.returncode == 1
    assert "chmod 600" in res.stderr


def test_keys_show_without_a_key_says_how_to_make_one(tmp_path: Path) -> None:
    res = run("keys", "show", "-c", str(write_config(tmp_path)))
    assert res.returncode == 1
    assert "keys init" in res.stderr


def _fill(tmp_path: Path, n: int, **kw) -> None:
    run("keys", "init", "-c", str(tmp_path / "agent.toml"))
    key = load_data_key(tmp_path / "data" / "buffer.key")
    with Buffer.open(tmp_path / "data", data_key=key) as buf:
        buf.put([make_record(i, **kw) for i in range(n)])


def test_status_json_counts_records_per_service_and_state(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    _fill(tmp_path, 7)
    res = run("status", "--json", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["totals"]["pending"] == 7
    assert sum(row["pending"] for row in data["services"].values()) == 7
    assert data["oldest_pending_age_s"] is not None


def test_status_table_renders_services_and_capacity(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    _fill(tmp_path, 3)
    res = run("status", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "lab-result" in res.stdout
    assert "of 20.0 GB" in res.stdout


def test_status_check_is_ok_on_a_healthy_buffer(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    _fill(tmp_path, 2)
    res = run("status", "--check", "-c", str(cfg))
    assert res.returncode == 0, res.stdout
    assert res.stdout.startswith("SEPAS-AGENT OK")
    assert "pending=2" in res.stdout


def test_status_check_goes_critical_past_the_pending_age_threshold(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        """
        [alerts]
        oldest_pending_warn = "1s"
        oldest_pending_crit = "2s"
        """,
    )
    _fill(tmp_path, 1)
    time.sleep(2.1)
    res = run("status", "--check", "-c", str(cfg))
    assert res.returncode == 2, res.stdout
    assert res.stdout.startswith("SEPAS-AGENT CRITICAL")


def test_status_check_warns_on_capacity(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path,
        """
        [buffer]
        max_bytes = 1048576
        [alerts]
        capacity_warn_percent = 1
        capacity_crit_percent = 99
        """,
    )
    _fill(tmp_path, 5)
    res = run("status", "--check", "-c", str(cfg))
    assert res.returncode == 1, res.stdout
    assert "full WARNING" in res.stdout


def test_status_check_reports_a_corrupt_buffer_as_critical(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "buffer.db").write_bytes(os.urandom(8192))
    res = run("status", "--check", "-c", str(cfg))
    assert res.returncode == 2
    assert res.stdout.startswith("SEPAS-AGENT CRITICAL")
    plain = run("status", "-c", str(cfg))
    assert plain.returncode == 1
    assert "hint:" in plain.stderr
    assert "Traceback" not in plain.stderr


def test_status_reads_the_buffer_while_another_process_writes(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    run("keys", "init", "-c", str(cfg))
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys
                from pathlib import Path
                sys.path.insert(0, {str(ROOT)!r})
                from agent.buffer import Buffer
                from agent.keys import load_data_key
                from tests.factories import make_record
                d = Path({str(tmp_path / "data")!r})
                with Buffer.open(d, data_key=load_data_key(d / "buffer.key")) as buf:
                    for i in range(400):
                        buf.put([make_record(i)])
                        if i == 20:
                            print("started", flush=True)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    ) as writer:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "started"
        seen = []
        for _ in range(5):
            res = run("status", "--json", "-c", str(cfg))
            assert res.returncode == 0, res.stderr
            seen.append(json.loads(res.stdout)["totals"]["pending"])
        assert seen == sorted(seen)
        assert seen[0] >= 21
        assert writer.wait(timeout=60) == 0
    final = json.loads(run("status", "--json", "-c", str(cfg)).stdout)
    assert final["totals"]["pending"] == 400


def test_version_flag_prints_the_version() -> None:
    res = run("--version")
    assert res.returncode == 0
    assert res.stdout.startswith("sepas-agent ")
