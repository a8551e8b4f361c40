"""kill -9 of the hl7-files watcher, again and again: no message lost or doubled, every
file ends up in done/ (or failed/) exactly once, nothing is left in the folder.

Each trial drops a folder of files (3 to 6 messages each; CR, LF or CRLF endings; a
BOM; a file with one refused message among good ones; a file whose messages are all
refused; a name that clashes with an earlier file already in done/) and runs the
watcher over it in a child process (hl7_files_crash_child.py), which is SIGKILLed:

- first at an instrumented point: the child kills itself at the n-th (n random) of one
  of these events, each trial taking the next in turn so that every one is hit:
  before/after ``put_raw``, ``quarantine``, the hard link into done/ or failed/, the
  ``.reason`` file, and the unlink from the folder;
- then, every third trial, a second child, running the mapping worker beside intake,
  restarts on what the first left and is killed after a random delay, wherever it is.

Then the watcher is run in-process to completion, its mapping worker drained, and the
folder, done/, failed/, the raw rows (by dedupe key), the quarantine (by SHA-256) and
the records are counted. The buffer is shared by all trials: the counts are cumulative.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("hl7_files_crash_child.py")
TRIALS = 15
FILES = 6
SEED = int(os.environ.get("SEPAS_CRASH_SEED", "20250321"))
ADAPTER = "lis-files"
NODE = "FAC-0001"
LOG_KEY = b"k" * 32
#: Where a child kills itself, each "point" run taking the next of these in turn.
POINTS = tuple(
    f"{op}:{when}"
    for op in ("put_raw", "quarantine", "link", "reason", "unlink")
    for when in ("before", "after")
)
#: The earlier file already in done/ under the name of one of each trial's files.
CLASH = b"an earlier export with the same name\r"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


# ------------------------------------------------------------------ the folder --------


@dataclass
class Trial:
    """What one trial dropped, and where everything must end."""

    inbox: Path
    stored: dict[str, bytes] = field(default_factory=dict)  # dedupe key -> message
    refused: list[bytes] = field(default_factory=list)
    done: list[bytes] = field(default_factory=list)  # file contents that end in done/
    failed: list[bytes] = field(default_factory=list)
    clash_name: str = ""


def _message(control: str, i: int, term: str) -> bytes:
    from tests import hl7corpus as corpus

    family, given = corpus.NAMES[i % len(corpus.NAMES)]
    text = corpus.join(
        corpus.msh("ORU^R01", control, "2.5", charset="UNICODE UTF-8"),
        corpus.pid(family, given, nc=corpus.NC[i % len(corpus.NC)]),
        corpus.obr(1),
        corpus.obx(1, "NM", "GLU^Glucose", str(i), "mmol/L"),
        term=term,
    )
    return text.encode("utf-8")


def _refused_pool() -> list[bytes]:
    """Malformed corpus messages that stay one refused message with a line appended."""
    from adapters.hl7 import intake
    from tests import hl7corpus as corpus

    pool = []
    for case in corpus.MALFORMED:
        m = case.message + b"\rNTE|1||X\r"
        if not case.message.startswith(b"MSH") or intake.split_messages(m) != [m]:
            continue
        try:
            intake.check(m)
        except intake.Hl7Refusal:
            pool.append(case.message)
    assert len(pool) >= 5
    return pool


def _make_trial(root: Path, t: int, rnd: random.Random) -> Trial:
    from adapters.hl7 import intake

    trial = Trial(root / f"inbox-{t}")
    trial.inbox.mkdir()
    refused_pool = _refused_pool()
    now = time.time()
    for j in range(FILES):
        term = rnd.choice(["\r", "\n", "\r\n"])
        msgs = [_message(f"T{t}-F{j}-M{k}", t + j + k, term) for k in range(rnd.randint(3, 6))]
        for m in msgs:
            trial.stored[intake.check(m).dedupe_key] = m
        if j == 1:  # one refused message among good ones: the file still goes to done/
            bad = refused_pool[t % len(refused_pool)] + f"\rNTE|1||T{t}\r".encode()
            msgs.insert(1, bad)
            trial.refused.append(bad)
        data = (b"\xef\xbb\xbf" if j == 2 else b"") + b"".join(msgs)
        name = f"r{j}.hl7"
        if j == 3:  # a name already used in done/ by an earlier, different file
            trial.clash_name = name
            (trial.inbox / "done").mkdir()
            (trial.inbox / "done" / name).write_bytes(CLASH)
        (trial.inbox / name).write_bytes(data)
        os.utime(trial.inbox / name, (now - 100 + j, now - 100 + j))
        trial.done.append(data)
    bad_file = [
        refused_pool[(t + 1) % len(refused_pool)] + f"\rNTE|1||T{t}-A\r".encode(),
        refused_pool[(t + 2) % len(refused_pool)] + f"\rNTE|1||T{t}-B\r".encode(),
    ]
    trial.refused += bad_file
    (trial.inbox / "refused.hl7").write_bytes(b"".join(bad_file))
    trial.failed.append(b"".join(bad_file))
    return trial


# ------------------------------------------------------------------ the parent --------


class Child:
    def __init__(self, data_dir: Path, inbox: Path, mode: str, arg: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(CHILD),
                str(data_dir),
                str(inbox),
                mode,
                arg,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line != b"READY\n":
            self.proc.kill()
            _, err = self.proc.communicate(timeout=30)
            raise AssertionError(f"child did not start: {line!r} {err.decode()[-2000:]}")

    def wait_death_or_done(self) -> str:
        """For a child that kills itself: the point it died at, or "" if it finished
        first (then it is killed)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.startswith(b"DONE"):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        return line[5:].strip().decode() if line.startswith(b"KILL ") else ""

    def kill_after(self, delay: float) -> int:
        """SIGKILL after ``delay`` s unless it died already; returns its exit status."""
        try:
            return self.proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            return self.proc.wait(timeout=30)

    def finish(self) -> bytes:
        out, err = self.proc.communicate(timeout=30)
        if self.proc.returncode is None:
            raise AssertionError("child still running")
        assert self.proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        return out


def _run_to_completion(data_dir: Path, inbox: Path) -> None:
    from adapters.hl7_files.settings import Hl7FilesSettings
    from adapters.hl7_files.watcher import Hl7FilesWatcher
    from agent.adapter import AdapterContext
    from agent.buffer import Buffer

    buf = Buffer.open(data_dir, data_key=None)
    try:
        ctx = AdapterContext(node_id=NODE, sink=buf, log_key=LOG_KEY)
        settings = Hl7FilesSettings(name=ADAPTER, kind="hl7-files", directory=inbox, settle_secs=0)
        watcher = Hl7FilesWatcher(settings, ctx)
        for _ in range(5):
            report = watcher.poll()
            assert report.complete, report.notes
            if not any(p.is_file() for p in inbox.iterdir()):
                break
        runner = watcher.runner
        assert runner is not None
        while (r := runner.run_once()).mapped + r.quarantined:
            pass
        assert r.left == 0
    finally:
        buf.close()


def _contents(folder: Path) -> Counter[bytes]:
    return Counter(p.read_bytes() for p in folder.iterdir() if p.is_file())


def _check(data_dir: Path, trials: list[Trial]) -> None:
    conn = sqlite3.connect(data_dir / "buffer.db")
    try:
        raw = Counter(
            k
            for (k,) in conn.execute(
                "SELECT dedupe_key FROM raw_intake WHERE adapter = ?", (ADAPTER,)
            )
        )
        quarantined = Counter(
            h
            for (h,) in conn.execute("SELECT sha256 FROM quarantine WHERE adapter = ?", (ADAPTER,))
        )
        unmapped = conn.execute(
            "SELECT count(*) FROM raw_intake WHERE mapped_at IS NULL"
        ).fetchone()[0]
        records = Counter(
            i for (i,) in conn.execute("SELECT id FROM records WHERE adapter = ?", (ADAPTER,))
        )
    finally:
        conn.close()
    expected_raw = {k for tr in trials for k in tr.stored}
    assert set(raw) == expected_raw, "raw rows differ from the messages dropped"
    assert all(n == 1 for n in raw.values())
    expected_q = {hashlib.sha256(b).hexdigest() for tr in trials for b in tr.refused}
    assert set(quarantined) == expected_q
    assert unmapped == 0
    assert len(records) == len(expected_raw)  # one record per message, none doubled
    for tr in trials:
        assert [p.name for p in tr.inbox.iterdir() if not p.is_dir()] == [], tr.inbox
        done = _contents(tr.inbox / "done")
        assert done == Counter([*tr.done, CLASH]), f"{tr.inbox}/done"
        assert (tr.inbox / "done" / tr.clash_name).read_bytes() == CLASH
        failed_dir = tr.inbox / "failed"
        names = sorted(p.name for p in failed_dir.iterdir())
        assert names == ["refused.hl7", "refused.hl7.reason"], names
        assert _contents(failed_dir)[tr.failed[0]] == 1


def test_kill_9_anywhere_loses_and_doubles_nothing(tmp_path: Path) -> None:
    rnd = random.Random(SEED)
    data_dir = tmp_path / "data"
    trials: list[Trial] = []
    hit: Counter[str] = Counter()
    timer: Counter[str] = Counter()
    for t in range(TRIALS):
        trial = _make_trial(tmp_path, t, rnd)
        trials.append(trial)
        most = {  # how often each point occurs in a full run over this folder
            "put_raw": len(trial.stored),
            "quarantine": len(trial.refused),
            "link": FILES + 1,
            "reason": 1,
            "unlink": FILES + 1,
        }
        point = POINTS[t % len(POINTS)]
        n = rnd.randint(1, most[point.partition(":")[0]])
        child = Child(data_dir, trial.inbox, "point", f"{point}#{n}")
        child.wait_ready()
        died_at = child.wait_death_or_done()
        child.finish()
        assert died_at == point, (died_at, point)  # n never exceeds a full run's count
        hit[died_at] += 1
        if t % 3 == 2:  # a second child on what the first left, killed by a timer
            child = Child(data_dir, trial.inbox, "free", "")
            child.wait_ready()
            child.kill_after(rnd.uniform(0.0, 0.06))
            timer["killed mid-way" if b"DONE" not in child.finish() else "finished"] += 1
        _run_to_completion(data_dir, trial.inbox)
        _check(data_dir, trials)
    assert set(hit) == set(POINTS), hit
    assert timer["killed mid-way"] >= 1, timer
