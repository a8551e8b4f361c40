"""`sepas-agent demo` (`agent.demo.run_demo`) in this process: it must succeed on a
bare machine (no Orthanc, no PostgreSQL, only 127.0.0.1), say what it counted, print
no patient data, and leave no thread, port or temporary directory behind."""

from __future__ import annotations

import io
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from agent.demo import NAMES, NAMES_1256, _national_code, build_messages, run_demo

RECORDS = 12


def _console(*, terminal: bool = False) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=120, force_terminal=terminal, highlight=False), buf


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_threads(before: set[threading.Thread], secs: float = 5.0) -> list[str]:
    deadline = time.monotonic() + secs
    while True:
        extra = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.05)  # between polls of a bounded loop


def test_messages_have_one_malformed_and_unique_control_ids() -> None:
    msgs = build_messages(RECORDS, prefix="T")
    assert len(msgs) == RECORDS
    assert [m.expect for m in msgs].count("AE") == 1
    assert len({m.control_id for m in msgs}) == RECORDS
    cp1256 = [m for m in msgs if "windows-1256" in m.kind]
    assert cp1256
    for m in cp1256:
        m.data.decode("cp1256")
        assert b"|2.5\r" in m.data  # MSH-18 empty


def test_demo_delivers_everything_once_and_names_the_counts(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    console, buf = _console()
    t0 = time.monotonic()
    rc = run_demo(workdir, records=RECORDS, console=console)
    took = time.monotonic() - t0
    out = buf.getvalue()
    assert rc == 0, out
    assert took < 30, f"the demo took {took:.1f} s"
    assert f"sent {RECORDS}/{RECORDS}: AA {RECORDS - 1}, AE 1" in out
    assert re.search(r"│ total\s+│\s+14 │\s+14 │", out), out  # 11 HL7 + 3 HIS rows
    assert "pending 0, inflight 0, sent 14, dead 0" in out
    assert "quarantined: 1" in out
    assert "PID segment" in out  # the quarantine's reason
    assert "OK: 11 messages and 3 HIS rows reached the hub exactly once" in out
    assert f"sepas-agent status -c {workdir / 'agent.toml'}" in out
    # a given work dir is kept, for the user to look at
    assert (workdir / "agent.toml").is_file()
    assert (workdir / "data" / "buffer.db").is_file()
    # no patient data on screen or in the log
    log = (workdir / "agent.log").read_text(encoding="utf-8")
    phi = [n for pair in (*NAMES, *NAMES_1256) for n in pair]
    phi += [_national_code(i) for i in range(RECORDS)] + [
        _national_code(1000 + i) for i in (1, 2, 3)
    ]
    for text in (out, log):
        assert not [p for p in phi if p in text]


def test_demo_leaves_no_thread_port_or_directory_behind() -> None:
    before = set(threading.enumerate())
    console, buf = _console(terminal=True)  # the progress bar path
    rc = run_demo(records=RECORDS, console=console)
    out = buf.getvalue()
    assert rc == 0, out
    workdir = Path(re.search(r"work dir\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    hub_port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", out).group(1))  # type: ignore[union-attr]
    mllp_port = int(re.search(r"HL7 MLLP on 127\.0\.0\.1:(\d+)", out).group(1))  # type: ignore[union-attr]
    assert not workdir.exists()
    assert _port_free(hub_port)
    assert _port_free(mllp_port)
    assert _wait_threads(before) == []


def test_demo_refuses_a_non_empty_workdir(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("x")
    console, buf = _console()
    assert run_demo(tmp_path, records=RECORDS, console=console) == 1
    assert "not empty" in buf.getvalue()


def test_demo_fails_and_says_what_is_missing_when_the_hub_refuses_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    import agent.demo as demo

    other = Ed25519PrivateKey.generate()  # the hub knows another key than the node's
    real = demo.public_pem
    monkeypatch.setattr(demo, "public_pem", lambda _key: real(other))
    monkeypatch.setattr(demo, "WAIT_SECS", 2.0)
    console, buf = _console()
    rc = run_demo(tmp_path / "demo", records=4, console=console)
    out = buf.getvalue()
    assert rc == 1, out
    assert "FAILED" in out
    assert "the hub holds 0 records of this node, expected 6" in out
    assert (tmp_path / "demo" / "agent.log").is_file()  # kept to look at
