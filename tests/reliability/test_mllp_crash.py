"""kill -9 of the hl7-mllp listener, again and again: every message that got AA is in
the buffer after the restart, none twice, and the buffer stays sound.

A child process (mllp_crash_child.py) runs the listener (with its mapping worker, as in
production) on 127.0.0.1 over a buffer shared by all trials. Each trial the parent
streams messages to it over several connections at once, some of them resends of
messages already acknowledged (same MSH-10 and MSH-7), and records every control id
that got AA. Once a random number of ACKs has come back (plus a random jitter), the
child is SIGKILLed wherever it is: mid-commit, mid-ACK, mid-mapping. The buffer is then
reopened and the raw rows counted by dedupe key; the next trial restarts the child on
the same buffer. At the end the buffer passes ``PRAGMA integrity_check``.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from adapters.hl7 import ack, intake
from adapters.hl7_mllp.framing import Frame, MllpDecoder, frame
from agent.buffer import Buffer
from tests import hl7corpus as corpus

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("mllp_crash_child.py")
ADAPTER = "lis-mllp"  # the same as mllp_crash_child.ADAPTER
TRIALS = 16
SENDERS = 3
#: The kill loop stops starting trials after this long (at least MIN_TRIALS are run).
BUDGET_SECS = 40.0
MIN_TRIALS = 15
WAIT_SECS = 30.0  # generous: the machine may be busy with other work
SEED = int(os.environ.get("SEPAS_CRASH_SEED", "20251125"))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _message(control: str, i: int) -> bytes:
    family, given = corpus.NAMES[i % len(corpus.NAMES)]
    return corpus.enc(corpus._lab(control, "2.5", family, given, corpus.NC[i % len(corpus.NC)]))


class Child:
    def __init__(self, data_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(data_dir)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def port(self) -> int:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], WAIT_SECS)
        line = self.proc.stdout.readline() if ready else b""
        if not line.startswith(b"PORT "):
            self.proc.kill()
            _, err = self.proc.communicate(timeout=WAIT_SECS)
            raise AssertionError(f"child did not start: {line!r} {err.decode()[-2000:]}")
        return int(line.split()[1])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=WAIT_SECS)
        assert self.proc.returncode == -signal.SIGKILL, self.proc.returncode


class Ledger:
    """What the senders saw: the dedupe keys of messages that got AA."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: dict[str, bytes] = {}  # dedupe key -> message
        self.count = 0  # ACKs this trial (AA for new messages and resends)
        self.errors: list[str] = []  # what a sender thread found wrong
        self.changed = threading.Condition(self.lock)

    def record(self, key: str, message: bytes) -> None:
        with self.changed:
            self.acked[key] = message
            self.count += 1
            self.changed.notify_all()

    def wait_count(self, n: int, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.count >= n, timeout)


def _sender(
    port: int, prefix: str, ledger: Ledger, rnd: random.Random, stop: threading.Event
) -> None:
    """Send messages one at a time, each ACK awaited, until the connection dies."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_SECS)
    except OSError:
        return
    decoder = MllpDecoder(1 << 20)
    try:
        for i in range(100_000):
            if stop.is_set():
                return
            with ledger.lock:
                old = list(ledger.acked.items()) if i % 5 == 4 else []
            if old:
                key, message = rnd.choice(old)  # a resend: AA again, stored once
            else:
                message = _message(f"{prefix}-{i}", i)
                key = intake.check(message).dedupe_key
            sock.sendall(frame(message))
            reply = None
            while reply is None:
                data = sock.recv(65536)
                if not data:
                    return
                frames = [e for e in decoder.feed(data) if isinstance(e, Frame)]
                reply = frames[0].payload if frames else None
            got = ack.parse_ack(reply)
            if got["MSA-2"] != key.split("|")[0]:
                with ledger.lock:
                    ledger.errors.append(f"ACK for {key!r} names {got['MSA-2']!r}")
                return
            if got["MSA-1"] == "AA":
                ledger.record(key, message)
    except OSError:
        return  # the child died under us: whatever was not acknowledged is not counted
    finally:
        with contextlib.suppress(OSError):
            sock.close()


def _check(data_dir: Path, ledger: Ledger) -> int:
    Buffer.open(data_dir, data_key=None).close()  # reopen, as a restarted agent does
    conn = sqlite3.connect(data_dir / "buffer.db")
    try:
        rows = Counter(
            k
            for (k,) in conn.execute(
                "SELECT dedupe_key FROM raw_intake WHERE adapter = ?", (ADAPTER,)
            )
        )
    finally:
        conn.close()
    with ledger.lock:
        acked = set(ledger.acked)
        assert not ledger.errors, ledger.errors
    missing = acked - set(rows)
    assert not missing, f"{len(missing)} acknowledged message(s) lost: {sorted(missing)[:5]}"
    doubled = [k for k, n in rows.items() if n > 1]
    assert not doubled, doubled
    return len(rows)


def test_kill_9_never_loses_an_acknowledged_message(tmp_path: Path) -> None:
    rnd = random.Random(SEED)
    data_dir = tmp_path / "data"
    Buffer.open(data_dir, data_key=None).close()
    ledger = Ledger()
    began = time.monotonic()
    trials = 0
    acked_at_kill: list[int] = []
    while trials < TRIALS and (trials < MIN_TRIALS or time.monotonic() - began < BUDGET_SECS):
        child = Child(data_dir)
        try:
            port = child.port()
            with ledger.lock:
                ledger.count = 0
            stop = threading.Event()
            senders = [
                threading.Thread(
                    target=_sender,
                    args=(port, f"T{trials}-S{s}", ledger, random.Random(rnd.random()), stop),
                    daemon=True,
                )
                for s in range(SENDERS)
            ]
            for t in senders:
                t.start()
            target = rnd.randint(1, 40)
            assert ledger.wait_count(target, WAIT_SECS), "the listener stopped answering"
            # A random moment after the target: usually mid-commit or mid-ACK of another.
            stop.wait(rnd.uniform(0.0, 0.03))
        finally:
            child.kill()
        for t in senders:
            t.join(WAIT_SECS)
            assert not t.is_alive(), "a sender hung after the kill"
        acked_at_kill.append(ledger.count)
        _check(data_dir, ledger)
        trials += 1
    assert trials >= MIN_TRIALS
    assert len(ledger.acked) >= trials  # every trial got at least one AA
    conn = sqlite3.connect(data_dir / "buffer.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
