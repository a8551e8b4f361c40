"""kill -9 of a process in the middle of enqueueing, again and again: every record a
put acknowledged is in the buffer exactly once, the file stays sound, and the buffer
goes on taking records."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from agent.buffer import DB_NAME, Buffer, State
from tests.factories import make_record

CHILD = Path(__file__).with_name("crash_child.py")
REPO = Path(__file__).resolve().parents[2]
KEY = bytes(range(32))  # the same as crash_child.KEY
TRIALS = 22
SEED = int(os.environ.get("SEPAS_CRASH_SEED", "20250321"))


class Child:
    """crash_child.py with its stdout read line by line on a thread."""

    def __init__(self, data_dir: Path, trial: int, seed: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(data_dir), str(trial), str(seed)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: list[bytes] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line == b"READY\n":
                self.ready.set()
            self.lines.append(line)

    def kill(self) -> tuple[list[str], bytes]:
        """SIGKILL; returns the ids it printed (complete lines only) and its stderr."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._reader.join(30)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        self.proc.stdout.close()  # type: ignore[union-attr]
        self.proc.stderr.close()
        ids = [
            ln[3:-1].decode() for ln in self.lines if ln.startswith(b"ID ") and ln.endswith(b"\n")
        ]
        return ids, err


def _check_file(path: Path) -> Counter[str]:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return Counter(i for (i,) in conn.execute("SELECT id FROM records"))
    finally:
        conn.close()


def test_records_acknowledged_before_kill_9_are_all_there_exactly_once(tmp_path: Path) -> None:
    rnd = random.Random(SEED)
    acknowledged: set[str] = set()
    started = time.monotonic()
    for trial in range(TRIALS):
        child = Child(tmp_path, trial, SEED + trial)
        if trial % 6 == 5:
            # Sometimes while it is still opening (and recovering the last crash's WAL).
            time.sleep(rnd.uniform(0.0, 0.4))
        else:
            assert child.ready.wait(30), f"trial {trial}: the child never opened the buffer"
            time.sleep(rnd.uniform(0.0, 0.25))
        ids, err = child.kill()
        assert child.proc.returncode == -signal.SIGKILL, err.decode(errors="replace")
        acknowledged.update(ids)
        if trial % 3 == 2 or trial == TRIALS - 1:
            # Not after every kill: the next child must also recover a hot WAL itself.
            stored = _check_file(tmp_path / DB_NAME)
            lost = [i for i in acknowledged if stored[i] != 1]
            assert lost == [], f"trial {trial} (seed {SEED}): {len(lost)} acknowledged, lost"
            assert max(stored.values(), default=1) == 1
        assert time.monotonic() - started < 45, "crash loop too slow"
    assert len(acknowledged) > 200  # the kills did land while records flowed

    with Buffer.open(tmp_path, data_key=KEY) as buf:
        stats = buf.stats()
        assert stats.total(State.PENDING) == sum(stats.counts.values()) >= len(acknowledged)
        assert buf.put([make_record(10**9)]).inserted == 1
        some = sorted(acknowledged)[:20]
        assert all(buf.state_of(i) is State.PENDING for i in some)
        lease = buf.lease(max_records=100_000, max_bytes=10**12, lease_secs=60)
        assert lease is not None
        assert len(lease.ids) == len(set(lease.ids)) == stats.total(State.PENDING) + 1
        assert acknowledged <= set(lease.ids)
        for item in lease.items[:50]:
            assert item.record().id == item.id  # every envelope decrypts and parses
    assert _check_file(tmp_path / DB_NAME)[make_record(10**9).id] == 1
