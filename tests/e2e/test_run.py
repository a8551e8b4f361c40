"""`sepas-agent run` as facility IT runs it: a real process, a real config, a real hub.

The hub is the reference hub under uvicorn on 127.0.0.1 (in this process); the source
is an ``sql`` adapter over a SQLite file standing in for a HIS (a table behind a
view, as HIS vendors expose them). The agent runs, is stopped with SIGTERM, runs
again, and is stopped again: every row reaches the hub exactly once, the cursor
survives the restart, ``status --json`` agrees with the hub, and nothing the agent
printed carries a test patient's name or national code. A second test runs the
service with an MLLP listener fed by a LIS-like sender and a dicom adapter polling a
real Orthanc. Patients are synthetic.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.buffer import State, open_stats
from agent.keys import load_private_key
from agent.runtime import read_service_state
from hub.app import create_app
from hub.blobs import BlobStore
from hub.settings import HubSettings, LimitSettings, StoreSettings
from hub.store_sqlite import SqliteStore
from tests.factories import national_code, patient_name
from tests.hubkit import NODE, register
from tests.interop.conftest import _serve

EXE = Path(sys.executable).parent / "sepas-agent"
QUERY = "SELECT * FROM v_lab WHERE changed_at > :cursor ORDER BY changed_at"
WAIT_SECS = 30.0


@dataclass
class Hub:
    url: str
    store: SqliteStore

    def count(self) -> int:
        return sum(self.store.counts_by_service(NODE).values())


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    store = SqliteStore(tmp_path / "hub.db")
    blobs = BlobStore(tmp_path / "hub-blobs")
    settings = HubSettings(
        store=StoreSettings(url=f"sqlite://{tmp_path}/hub.db", blob_dir=blobs.root),
        limits=LimitSettings(),
    )
    server, thread, port = _serve(create_app(settings, store, blobs=blobs))
    yield Hub(f"http://127.0.0.1:{port}/", store)
    server.should_exit = True
    thread.join(timeout=10)
    store.close()


class His:
    """The HIS stand-in: lab results in table ``lab`` behind view ``v_lab``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with sqlite3.connect(path) as db:
            db.executescript(
                """
                CREATE TABLE lab (id INTEGER PRIMARY KEY, nid TEXT, mrn TEXT, family TEXT,
                                  given TEXT, taken_at TEXT, changed_at TEXT, value TEXT);
                CREATE VIEW v_lab AS SELECT * FROM lab;
                """
            )
        self.rows = 0

    def add(self, n: int) -> None:
        with sqlite3.connect(self.path) as db:
            for i in range(self.rows + 1, self.rows + n + 1):
                given, family = patient_name(i).split(" ")
                db.execute(
                    "INSERT INTO lab VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        i,
                        national_code(i),
                        f"MRN-{i}",
                        family,
                        given,
                        f"2025-03-21 09:{i % 60:02d}:00",
                        f"2025-03-21 10:{i // 60:02d}:{i % 60:02d}",
                        f"5.{i}",
                    ),
                )
        self.rows += n

    def phi(self) -> list[str]:
        out: list[str] = []
        for i in range(1, self.rows + 1):
            given, family = patient_name(i).split(" ")
            out += [national_code(i), patient_name(i), f"MRN-{i}", family + "^" + given]
        return out


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SEPAS_AGENT_")}


def _wait(what: str, cond: Callable[[], bool], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WAIT_SECS
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the agent exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT_SECS:.0f} s waiting for {what}")
        time.sleep(0.05)  # between polls of a bounded loop


class Agent:
    """Runs `sepas-agent run` with its output in files (a pipe could fill and block it)."""

    def __init__(self, cfg: Path, logdir: Path) -> None:
        self.cfg = cfg
        self.logdir = logdir
        self.runs = 0

    def start(self) -> subprocess.Popen[bytes]:
        self.runs += 1
        out = open(self.logdir / f"run{self.runs}.out", "wb")  # noqa: SIM115 - child's stdout
        err = open(self.logdir / f"run{self.runs}.err", "wb")  # noqa: SIM115
        try:
            return subprocess.Popen(
                [str(EXE), "run", "-c", str(self.cfg)], stdout=out, stderr=err, env=_env()
            )
        finally:
            out.close()
            err.close()

    def stop(self, proc: subprocess.Popen[bytes]) -> float:
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("the agent did not stop within 15 s of SIGTERM")
        return time.monotonic() - t0

    def output(self) -> str:
        return "".join(
            p.read_text(encoding="utf-8", errors="replace")
            for p in sorted(self.logdir.glob("run*.*"))
        )


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, env=_env(), timeout=60)


def test_run_stop_restart_delivers_every_row_once_and_status_agrees_with_the_hub(
    tmp_path: Path, hub: Hub
) -> None:
    his = His(tmp_path / "his.db")
    data_dir = tmp_path / "data"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""\
            [node]
            id = "{NODE}"
            data_dir = "{data_dir}"
            [hub]
            url = "{hub.url}"
            [telemetry]
            listen = "127.0.0.1:0"
            log_format = "json"
            log_level = "debug"
            [[adapters]]
            name = "his"
            kind = "sql"
            url = "sqlite:///{his.path}"
            query = "{QUERY}"
            cursor_column = "changed_at"
            initial_cursor = "2000-01-01"
            key_columns = ["id"]
            service = "lab-result"
            poll_every = "1s"
            [adapters.fields]
            occurred_at = "taken_at"
            national_id = "nid"
            local_id = "mrn"
            family = "family"
            given = "given"
            """
        ),
        encoding="utf-8",
    )
    keys = _cli("keys", "init", "-c", str(cfg))
    assert keys.returncode == 0, keys.stderr
    register(hub.store, NODE, load_private_key(data_dir / "node.key"))
    agent = Agent(cfg, tmp_path)

    his.add(10)
    proc = agent.start()
    try:
        _wait("10 rows at the hub", lambda: hub.count() == 10, proc)
        his.add(5)
        _wait("15 rows at the hub", lambda: hub.count() == 15, proc)
        state = read_service_state(data_dir)
        assert state is not None
        assert state["service_running"] is True
        his_state = state["adapters"]["his"]
        assert his_state["state"] == "running"
        assert his_state["last_poll"]["cursor"].startswith("str:2025-03-21 10:00:")
    finally:
        elapsed = agent.stop(proc)
    assert proc.returncode == 0
    assert elapsed < 10.0
    after = read_service_state(data_dir)
    assert after is not None
    assert after["service_running"] is False

    his.add(10)  # while the agent is down: the cursor must pick them up after the restart
    proc = agent.start()
    try:
        _wait("25 rows at the hub", lambda: hub.count() == 25, proc)

        def settled() -> bool:
            stats = open_stats(data_dir)
            return stats is not None and stats.total(State.SENT) == 25

        _wait("the node to settle all 25", settled, proc)
        status = json.loads(_cli("status", "--json", "-c", str(cfg)).stdout)
    finally:
        elapsed = agent.stop(proc)
    assert proc.returncode == 0
    assert elapsed < 10.0

    assert hub.count() == 25, "nothing lost, nothing doubled"
    hub_counts = hub.store.counts_by_service(NODE)
    node_sent = {svc: row["sent"] for svc, row in status["services"].items()}
    assert node_sent == hub_counts
    assert status["totals"] == {"pending": 0, "inflight": 0, "sent": 25, "dead": 0}

    output = agent.output()
    assert output.strip(), "the agent logged something"
    for line in output.splitlines():
        if line.startswith("{"):
            json.loads(line)
    for phi in his.phi():
        assert phi not in output, "patient data in the agent's output"


def test_run_carries_mllp_messages_and_pacs_studies_to_the_hub(tmp_path: Path, hub: Hub) -> None:
    """The other two intake paths through the real service: a LIS sending HL7 over
    MLLP (ACKs read back) and a real Orthanc polled with C-FIND, in one `run`."""
    from datetime import datetime

    from agent.dates import TEHRAN
    from agent.demo import MllpSender, build_messages
    from tests.interop.pacs_peers import free_port, load, make_study, orthanc

    peer = orthanc(tmp_path / "orthanc")
    try:
        today = datetime.now(TEHRAN).strftime("%Y%m%d")
        load(peer, make_study(study_date=today, series=1, instances=2))
        load(peer, make_study(study_date=today, series=2, instances=1))
        data_dir = tmp_path / "data"
        mllp_port = free_port()
        cfg = tmp_path / "agent.toml"
        cfg.write_text(
            textwrap.dedent(
                f"""\
                [node]
                id = "{NODE}"
                data_dir = "{data_dir}"
                [hub]
                url = "{hub.url}"
                [telemetry]
                listen = "127.0.0.1:0"
                log_format = "json"
                [[adapters]]
                name = "lis"
                kind = "hl7-mllp"
                listen = "127.0.0.1:{mllp_port}"
                allow = ["127.0.0.1/32"]
                [[adapters]]
                name = "pacs"
                kind = "dicom"
                listen = "127.0.0.1:{free_port()}"
                peer = {{ ae_title = "{peer.ae_title}", host = "{peer.host}", port = {peer.port} }}
                poll_every = "1s"
                """
            ),
            encoding="utf-8",
        )
        assert _cli("keys", "init", "-c", str(cfg)).returncode == 0
        register(hub.store, NODE, load_private_key(data_dir / "node.key"))
        agent = Agent(cfg, tmp_path)
        proc = agent.start()
        try:
            sent = build_messages(8, prefix="E2E")
            deadline = time.monotonic() + WAIT_SECS
            while True:  # the listener is up once it accepts a connection
                try:
                    sender = MllpSender("127.0.0.1", mllp_port)
                    break
                except OSError:
                    assert proc.poll() is None, "the agent exited"
                    assert time.monotonic() < deadline, "the MLLP listener never came up"
                    time.sleep(0.1)
            try:
                acks = [sender.send(m.data)["MSA-1"] for m in sent]
            finally:
                sender.close()
            assert acks == [m.expect for m in sent]
            accepted = sum(1 for m in sent if m.expect == "AA")
            # every accepted message, plus the two studies
            _wait("HL7 and DICOM records at the hub", lambda: hub.count() == accepted + 2, proc)
        finally:
            elapsed = agent.stop(proc)
        assert proc.returncode == 0
        assert elapsed < 10.0
        counts = hub.store.counts_by_service(NODE)
        assert counts.get("imaging-study") == 2
        assert sum(counts.values()) == accepted + 2
    finally:
        peer.stop()
