"""The hl7-files adapter (adapters/hl7_files/watcher.py) over real files in tmp_path and
a real Buffer: what it takes, when, where each file ends, and what the buffer holds.

Settling is driven by a FakeClock and explicit modification times (os.utime), never
by sleeping. Every patient is synthetic (tests/hl7corpus.py).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import adapters
from adapters.hl7 import intake
from adapters.hl7.mapping import map_message
from adapters.hl7_files import watcher as watcher_mod
from adapters.hl7_files.settings import Hl7FilesSettings
from adapters.hl7_files.watcher import (
    Hl7FilesWatcher,
    Oversize,
    build,
    candidate_names,
    is_temporary,
    iter_messages,
)
from agent.adapter import AdapterContext, Poller
from agent.buffer import Buffer
from agent.errors import BackfillUnsupportedError, CapacityExceededError
from agent.record import hl7_id
from agent.testing import FakeClock
from tests import hl7corpus as corpus

pytestmark = pytest.mark.timeout(60)

NODE = "FAC-0001"
ADAPTER = "lis-files"
LOG_KEY = b"k" * 32
T0 = 1_750_000_000.0


# ------------------------------------------------------------------ helpers ---------


def message(control: str, i: int = 0, *, term: str = "\r", time: str = "20250321093000") -> bytes:
    """A small accepted ORU^R01 with a unique MSH-10."""
    family, given = corpus.NAMES[i % len(corpus.NAMES)]
    text = corpus.join(
        corpus.msh("ORU^R01", control, "2.5", charset="UNICODE UTF-8", time=time),
        corpus.pid(family, given, nc=corpus.NC[i % len(corpus.NC)]),
        corpus.obr(1),
        corpus.obx(1, "NM", "GLU^Glucose", "5.4", "mmol/L"),
        term=term,
    )
    return text.encode("utf-8")


REFUSED = corpus.by_name("msh12_unsupported_3_0").message  # AE: version 3.0
GARBAGE = b"this is not HL7 at all\r\nonly text a user saved with the wrong extension\r\n"


class Env:
    """A watched folder, a buffer, a clock and the watcher under test."""

    def __init__(self, tmp: Path, **overrides: Any) -> None:
        self.inbox = tmp / "inbox"
        self.inbox.mkdir()
        self.clock = FakeClock(T0)
        self.buf = Buffer.open(tmp / "data", data_key=None, clock=self.clock)
        self.committed = 0
        self.ctx = AdapterContext(
            node_id=NODE,
            sink=self.buf,
            log_key=LOG_KEY,
            clock=self.clock,
            on_committed=self._on_committed,
        )
        base: dict[str, Any] = {
            "name": ADAPTER,
            "kind": "hl7-files",
            "directory": self.inbox,
            "settle_secs": 0,
        }
        base.update(overrides)
        self.settings = Hl7FilesSettings(**base)
        self.watcher = Hl7FilesWatcher(self.settings, self.ctx, mapping=False)

    def _on_committed(self) -> None:
        self.committed += 1

    @property
    def done(self) -> Path:
        return self.settings.done_path

    @property
    def failed(self) -> Path:
        return self.settings.failed_path

    def drop(self, name: str, data: bytes, *, age: float = 60.0) -> Path:
        """Write a file as a sender would, last modified ``age`` seconds ago."""
        path = self.inbox / name
        path.write_bytes(data)
        when = self.clock() - age
        os.utime(path, (when, when))
        return path

    def raw_keys(self) -> list[str]:
        conn = sqlite3.connect(f"file:{self.buf.path}?mode=ro", uri=True)
        try:
            rows = conn.execute(
                "SELECT dedupe_key FROM raw_intake WHERE adapter = ? ORDER BY id", (ADAPTER,)
            )
            return [r[0] for r in rows]
        finally:
            conn.close()

    def raw_data(self) -> list[bytes]:
        return [r.data for r in self.buf.unmapped_raw(ADAPTER, limit=10_000)]

    def quarantined(self) -> list[tuple[str, bytes]]:
        return [(q.reason, self.buf.quarantined_data(q.id)) for q in self.buf.quarantined()]

    def inbox_files(self) -> list[str]:
        return sorted(p.name for p in self.inbox.iterdir() if p.is_file())

    @staticmethod
    def names(folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.buf.close()


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[Callable[..., Env]]:
    made: list[Env] = []

    def make(**overrides: Any) -> Env:
        e = Env(tmp_path, **overrides)
        made.append(e)
        return e

    yield make
    for e in made:
        e.buf.close()


def key_of(data: bytes) -> str:
    return intake.check(data).dedupe_key


# ------------------------------------------------------------------ taking files ----


def test_one_message_file_is_stored_and_moved_to_done(env: Env) -> None:
    data = message("ONE-1")
    env.drop("result.hl7", data)
    report = env.watcher.poll()
    assert (report.found, report.new, report.duplicates, report.quarantined) == (1, 1, 0, 0)
    assert report.complete
    assert env.raw_data() == [data]
    assert env.raw_keys() == [key_of(data)]
    assert env.inbox_files() == []
    assert env.names(env.done) == ["result.hl7"]
    assert (env.done / "result.hl7").read_bytes() == data
    assert env.names(env.failed) == []
    assert env.committed == 1


def test_many_messages_in_one_file_are_each_stored_once(env: Env) -> None:
    msgs = [message(f"MANY-{i}", i) for i in range(5)]
    envelope = b"FHS|^~\\&|LIS|HOSP\rBHS|^~\\&|LIS|HOSP\r"
    trailer = b"BTS|5\rFTS|1\r"
    env.drop("batch.hl7", envelope + b"".join(msgs) + trailer)
    report = env.watcher.poll()
    assert (report.found, report.new) == (5, 5)
    assert env.raw_data() == msgs
    assert env.raw_keys() == [key_of(m) for m in msgs]
    assert env.names(env.done) == ["batch.hl7"]
    assert env.quarantined() == []


@pytest.mark.parametrize("case", ["lf_terminators", "crlf_terminators", "utf8_bom"])
def test_lf_crlf_and_bom_corpus_messages_are_taken_from_files(env: Env, case: str) -> None:
    data = corpus.by_name(case).message
    env.drop(f"{case}.hl7", data)
    report = env.watcher.poll()
    assert report.new == 1
    assert env.raw_keys() == [key_of(data)]
    assert env.names(env.done) == [f"{case}.hl7"]


@pytest.mark.parametrize("term", ["\n", "\r\n"])
def test_many_messages_with_lf_or_crlf_endings_and_a_bom_are_split_right(
    env: Env, term: str
) -> None:
    msgs = [message(f"END-{i}", i, term=term) for i in range(3)]
    env.drop("lines.hl7", b"\xef\xbb\xbf" + term.encode().join(msgs))
    report = env.watcher.poll()
    assert (report.found, report.new, report.quarantined) == (3, 3, 0)
    assert sorted(env.raw_keys()) == sorted(key_of(m) for m in msgs)
    assert env.names(env.done) == ["lines.hl7"]


def test_cp1256_file_with_empty_msh18_maps_persian_names_right(tmp_path: Path) -> None:
    case = corpus.by_name("msh18_empty_cp1256_bytes")
    e = Env(tmp_path)
    try:
        watcher = Hl7FilesWatcher(e.settings, e.ctx, map_fn=map_message)
        e.drop("farsi.hl7", case.message)
        assert watcher.poll().new == 1
        runner = watcher.runner
        assert runner is not None
        assert runner.run_once().mapped == 1
        msh7 = "20250321093000"
        rec = e.buf.record(hl7_id(NODE, ADAPTER, case.control_id, msh7))
        assert rec is not None
        patient = next(
            x["resource"] for x in rec.body["entry"] if x["resource"]["resourceType"] == "Patient"
        )
        name = patient["name"][0]
        assert name["family"] == case.expect["family"]
        assert name["given"][0] == case.expect["given"]
        assert rec.source.adapter == ADAPTER
    finally:
        e.buf.close()


def test_the_same_file_dropped_again_is_stored_once(env: Env) -> None:
    data = message("AGAIN-1")
    env.drop("a.hl7", data)
    env.watcher.poll()
    env.drop("a.hl7", data)  # the sender exports it a second time
    report = env.watcher.poll()
    assert (report.new, report.duplicates) == (0, 1)
    assert env.raw_keys() == [key_of(data)]
    assert env.names(env.done) == ["a.1.hl7", "a.hl7"]


def test_files_are_taken_oldest_first(env: Env) -> None:
    env.drop("z-old.hl7", message("ORDER-1"), age=300)
    env.drop("a-new.hl7", message("ORDER-2"), age=100)
    env.watcher.poll()
    assert env.raw_keys() == [key_of(message("ORDER-1")), key_of(message("ORDER-2"))]


# ------------------------------------------------------------------ settling --------


def test_growing_file_is_not_taken_until_it_settles(make_env: Callable[..., Env]) -> None:
    env = make_env(settle_secs=5)
    first, second = message("GROW-1", 1), message("GROW-2", 2)
    path = env.drop("growing.hl7", first, age=0)
    assert env.watcher.poll().found == 0  # just written
    env.clock.advance(3)
    with path.open("ab") as f:  # the sender appends its second message
        f.write(second)
    os.utime(path, (env.clock(), env.clock()))
    assert env.watcher.poll().found == 0  # changed since the last look
    env.clock.advance(4)
    assert env.watcher.poll().found == 0  # unchanged, but for 4 s only
    assert env.raw_keys() == []
    assert env.inbox_files() == ["growing.hl7"]
    env.clock.advance(1)
    report = env.watcher.poll()  # unchanged for 5 s, and modified 5 s ago
    assert (report.found, report.new) == (2, 2)
    assert env.names(env.done) == ["growing.hl7"]


def test_old_file_is_taken_at_the_second_poll_that_sees_it_unchanged(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(settle_secs=2)
    env.drop("old.hl7", message("OLD-1"), age=3600)
    assert env.watcher.poll().found == 0  # first sight: size and time not yet seen to hold
    env.clock.advance(2)
    assert env.watcher.poll().new == 1


def test_file_that_changes_while_it_is_read_is_not_moved(env: Env) -> None:
    first, second = message("CHG-1", 1), message("CHG-2", 2)
    path = env.drop("changing.hl7", first)
    real_put_raw = env.buf.put_raw

    def put_raw_then_append(data: bytes, **kw: Any) -> tuple[int, bool]:
        out = real_put_raw(data, **kw)
        if data == first:
            with path.open("ab") as f:
                f.write(second)
            os.utime(path, (env.clock(), env.clock()))
        return out

    env.buf.put_raw = put_raw_then_append  # type: ignore[method-assign]
    try:
        env.watcher.poll()
    finally:
        del env.buf.put_raw
    assert env.inbox_files() == ["changing.hl7"]  # left: it grew while read
    assert env.raw_keys() == [key_of(first)]
    env.watcher.poll()
    assert env.raw_keys() == [key_of(first), key_of(second)]
    assert env.names(env.done) == ["changing.hl7"]


def test_hidden_temporary_and_unmatched_files_are_left_alone(env: Env) -> None:
    data = message("HID-1")
    for name in (".hidden.hl7", "~lock.hl7", "x.hl7.tmp", "x.hl7.part", "notes.txt", "x.hl7~"):
        env.drop(name, data)
    (env.inbox / "folder.hl7").mkdir()
    env.drop("UPPER.HL7", message("UP-1"))  # the pattern matches case-insensitively
    report = env.watcher.poll()
    assert report.found == 1
    assert env.raw_keys() == [key_of(message("UP-1"))]
    assert "x.hl7.tmp" in env.inbox_files()
    assert env.names(env.done) == ["UPPER.HL7"]
    assert is_temporary(".a.hl7")
    assert is_temporary("a.hl7.filepart")
    assert not is_temporary("a.hl7")


def test_files_in_done_and_failed_are_never_read_again(env: Env) -> None:
    env.drop("a.hl7", message("NOREC-1"))
    env.drop("bad.hl7", GARBAGE)
    env.watcher.poll()
    before = (env.raw_keys(), env.quarantined())
    report = env.watcher.poll()
    assert report.found == 0
    assert (env.raw_keys(), env.quarantined()) == before


# ------------------------------------------------------------------ refusals --------


def test_refused_message_is_quarantined_and_the_others_stored_file_goes_to_done(
    env: Env,
) -> None:
    good1, good2 = message("PART-1", 1), message("PART-2", 2)
    env.drop("partial.hl7", good1 + REFUSED + good2)
    report = env.watcher.poll()
    assert (report.found, report.new, report.quarantined) == (3, 2, 1)
    assert env.raw_keys() == [key_of(good1), key_of(good2)]
    [(reason, data)] = env.quarantined()
    assert data == REFUSED
    assert reason.startswith("AE: HL7 version 3.0 is not supported")
    assert "file message 2" in reason
    assert env.names(env.done) == ["partial.hl7"]
    assert env.names(env.failed) == []


def test_all_refused_file_goes_to_failed_with_a_reason(env: Env) -> None:
    other = corpus.by_name("msh10_missing").message
    env.drop("refused.hl7", REFUSED + other)
    report = env.watcher.poll()
    assert (report.found, report.new, report.quarantined) == (2, 0, 2)
    assert env.raw_keys() == []
    assert sorted(d for _, d in env.quarantined()) == sorted([REFUSED, other])
    assert env.names(env.failed) == ["refused.hl7", "refused.hl7.reason"]
    assert (env.failed / "refused.hl7").read_bytes() == REFUSED + other
    reason = (env.failed / "refused.hl7.reason").read_text(encoding="utf-8")
    assert "no message in it could be stored" in reason
    assert "message 1: AE: HL7 version 3.0 is not supported" in reason
    assert "message 2: AE: MSH-10 (message control id) is missing" in reason
    assert env.names(env.done) == []
    assert env.inbox_files() == []


def test_garbage_file_is_quarantined_and_goes_to_failed(env: Env) -> None:
    env.drop("notes.hl7", GARBAGE)
    report = env.watcher.poll()
    assert (report.found, report.quarantined) == (1, 1)
    [(reason, data)] = env.quarantined()
    assert data == GARBAGE
    assert "does not start with an MSH" in reason
    assert env.names(env.failed) == ["notes.hl7", "notes.hl7.reason"]
    assert "no message in it could be stored" in (env.failed / "notes.hl7.reason").read_text()


def test_empty_file_goes_to_failed(env: Env) -> None:
    env.drop("empty.hl7", b"")
    env.watcher.poll()
    assert env.names(env.failed) == ["empty.hl7", "empty.hl7.reason"]
    assert "the file is empty" in (env.failed / "empty.hl7.reason").read_text()


def test_oversize_message_is_not_stored_and_sends_its_file_to_failed(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(max_message_bytes=1024)
    small = message("SMALL-1")
    big = message("BIG-1").replace(b"5.4", b"5.4" + b"9" * 3000)
    env.drop("mixed.hl7", small + big)
    report = env.watcher.poll()
    assert (report.found, report.new) == (2, 1)
    assert env.raw_keys() == [key_of(small)]  # the others are stored
    assert env.quarantined() == []  # the big one stays only in the file
    assert env.names(env.failed) == ["mixed.hl7", "mixed.hl7.reason"]
    assert (env.failed / "mixed.hl7").read_bytes() == small + big
    text = (env.failed / "mixed.hl7.reason").read_text()
    assert "larger than max_message_bytes" in text
    assert "message 2:" in text


def test_symbolic_link_is_not_followed(env: Env, tmp_path: Path) -> None:
    secret = tmp_path / "outside.hl7"
    secret.write_bytes(message("LINKED-1"))
    (env.inbox / "link.hl7").symlink_to(secret)
    env.watcher.poll()
    assert env.raw_keys() == []
    assert (env.failed / "link.hl7").is_symlink()
    assert "symbolic link" in (env.failed / "link.hl7.reason").read_text()
    assert secret.read_bytes() == message("LINKED-1")


def test_unreadable_file_goes_to_failed_after_three_polls(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = env.drop("locked.hl7", message("LOCK-1"))
    real_open = os.open

    def deny(p: Any, flags: int, *a: Any, **kw: Any) -> int:
        if Path(p) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_open(p, flags, *a, **kw)

    monkeypatch.setattr(watcher_mod.os, "open", deny)
    for _ in range(2):
        report = env.watcher.poll()
        assert not report.complete
        assert env.inbox_files() == ["locked.hl7"]
    env.watcher.poll()
    monkeypatch.undo()
    assert env.names(env.failed) == ["locked.hl7", "locked.hl7.reason"]
    assert "Permission denied" in (env.failed / "locked.hl7.reason").read_text()


def test_a_file_that_fails_unexpectedly_never_holds_up_the_others(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_split = intake.split_messages

    def split(data: bytes) -> list[bytes]:
        if b"POISON" in data:
            raise RuntimeError("a bug")
        return real_split(data)

    monkeypatch.setattr(watcher_mod.intake, "split_messages", split)
    env.drop("poison.hl7", message("POISON-1"), age=500)  # the oldest: taken first
    env.drop("good.hl7", message("GOOD-1"), age=100)
    report = env.watcher.poll()
    assert not report.complete
    assert env.raw_keys() == [key_of(message("GOOD-1"))]
    assert env.inbox_files() == ["poison.hl7"]
    env.watcher.poll()
    env.watcher.poll()
    assert env.inbox_files() == []
    assert env.names(env.failed) == ["poison.hl7", "poison.hl7.reason"]
    text = (env.failed / "poison.hl7.reason").read_text()
    assert "failed unexpectedly (RuntimeError), 3 polls in a row" in text


# ------------------------------------------------------------------ commit, then move -


def test_file_is_moved_to_done_only_after_its_messages_are_committed(env: Env) -> None:
    msgs = [message(f"ORDERED-{i}", i) for i in range(3)]
    env.drop("ordered.hl7", b"".join(msgs))
    seen_in_inbox: list[bool] = []
    real_put_raw = env.buf.put_raw

    def watching_put_raw(data: bytes, **kw: Any) -> tuple[int, bool]:
        out = real_put_raw(data, **kw)
        seen_in_inbox.append((env.inbox / "ordered.hl7").exists())
        return out

    env.buf.put_raw = watching_put_raw  # type: ignore[method-assign]
    try:
        env.watcher.poll()
    finally:
        del env.buf.put_raw
    assert seen_in_inbox == [True, True, True]
    assert env.names(env.done) == ["ordered.hl7"]


def test_full_buffer_leaves_the_file_in_place_until_it_drains(env: Env) -> None:
    msgs = [message(f"FULL-{i}", i) for i in range(3)]
    env.drop("full.hl7", b"".join(msgs))
    real_put_raw = env.buf.put_raw
    calls = 0

    def full_after_one(data: bytes, **kw: Any) -> tuple[int, bool]:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise CapacityExceededError("buffer full")
        return real_put_raw(data, **kw)

    env.buf.put_raw = full_after_one  # type: ignore[method-assign]
    try:
        report = env.watcher.poll()
    finally:
        del env.buf.put_raw
    assert not report.complete
    assert env.inbox_files() == ["full.hl7"]
    assert env.raw_keys() == [key_of(msgs[0])]
    report = env.watcher.poll()  # space is back
    assert (report.new, report.duplicates) == (2, 1)
    assert env.raw_keys() == [key_of(m) for m in msgs]
    assert env.names(env.done) == ["full.hl7"]


def test_name_clash_in_done_gets_a_suffix_and_never_overwrites(env: Env) -> None:
    env.done.mkdir()
    (env.done / "r.hl7").write_bytes(b"an earlier file")
    (env.done / "r.1.hl7").write_bytes(b"another earlier file")
    data = message("CLASH-1")
    env.drop("r.hl7", data)
    env.watcher.poll()
    assert env.names(env.done) == ["r.1.hl7", "r.2.hl7", "r.hl7"]
    assert (env.done / "r.hl7").read_bytes() == b"an earlier file"
    assert (env.done / "r.1.hl7").read_bytes() == b"another earlier file"
    assert (env.done / "r.2.hl7").read_bytes() == data
    assert list(candidate_names("noext"))[:3] == ["noext", "noext.1", "noext.2"]


def test_a_link_left_by_a_crash_between_link_and_unlink_ends_as_one_file(env: Env) -> None:
    data = message("HALF-1")
    path = env.drop("half.hl7", data)
    env.done.mkdir()
    os.link(path, env.done / "half.hl7")  # a run died after linking, before unlinking
    report = env.watcher.poll()
    assert (report.new, report.duplicates) in ((1, 0), (0, 1))
    assert env.inbox_files() == []
    assert env.names(env.done) == ["half.hl7"]
    assert env.raw_keys() == [key_of(data)]


def test_a_reason_left_by_a_crash_before_its_file_moved_is_replaced(env: Env) -> None:
    env.failed.mkdir()
    (env.failed / "stale.hl7.reason").write_text("from a run that died")
    env.drop("stale.hl7", GARBAGE)
    env.watcher.poll()
    assert env.names(env.failed) == ["stale.hl7", "stale.hl7.reason"]
    assert "no message in it" in (env.failed / "stale.hl7.reason").read_text()


def test_without_hard_links_a_checked_rename_moves_the_file(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(*a: Any, **kw: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(watcher_mod.os, "link", no_links)
    env.done.mkdir()
    (env.done / "s.hl7").write_bytes(b"earlier")
    env.drop("s.hl7", message("SHARE-1"))
    env.drop("bad.hl7", GARBAGE)
    env.watcher.poll()
    monkeypatch.undo()
    assert env.names(env.done) == ["s.1.hl7", "s.hl7"]
    assert (env.done / "s.hl7").read_bytes() == b"earlier"
    assert env.names(env.failed) == ["bad.hl7", "bad.hl7.reason"]
    assert env.inbox_files() == []


def test_a_file_that_cannot_be_moved_stays_and_is_read_again_without_doubles(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(*a: Any, **kw: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    data = message("XDEV-1")
    env.drop("x.hl7", data)
    monkeypatch.setattr(watcher_mod.os, "link", cross_device)
    report = env.watcher.poll()
    assert not report.complete
    assert any("could not be moved" in n for n in report.notes)
    assert env.inbox_files() == ["x.hl7"]
    monkeypatch.undo()
    report = env.watcher.poll()
    assert (report.new, report.duplicates) == (0, 1)
    assert env.raw_keys() == [key_of(data)]
    assert env.names(env.done) == ["x.hl7"]


# ------------------------------------------------------------------ reading ---------


@settings(max_examples=60, deadline=None)
@given(
    order=st.lists(st.sampled_from(["msg", "lf", "garbage", "env", "blank"]), max_size=8),
    bom=st.booleans(),
    chunk=st.integers(min_value=1, max_value=700),
)
def test_reading_in_chunks_cuts_a_file_as_split_messages_does(
    order: list[str], bom: bool, chunk: int
) -> None:
    parts = {
        "msg": message("CHUNK-1"),
        "lf": message("CHUNK-2", 2, term="\n"),
        "garbage": b"stray line\r",
        "env": b"BHS|^~\\&|LIS\r",
        "blank": b"\r\n",
    }
    data = (b"\xef\xbb\xbf" if bom else b"") + b"".join(parts[p] for p in order)
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        out = data[pos : pos + n]
        pos += len(out)
        return out

    got = list(iter_messages(read, 1 << 20, chunk=chunk))
    assert got == intake.split_messages(data)


def test_reading_skips_an_oversize_message_without_holding_it() -> None:
    limit = 2048
    small = message("HOLD-1")
    big = message("HOLD-2").replace(b"5.4", b"5.4" + b"7" * 50_000)
    data = small + big + small
    pos, held = 0, 0

    def read(n: int) -> bytes:
        nonlocal pos
        out = data[pos : pos + n]
        pos += len(out)
        return out

    got: list[bytes | Oversize] = []
    for piece in iter_messages(read, limit, chunk=512):
        got.append(piece)
        held = max(held, len(piece) if isinstance(piece, bytes) else 0)
    assert got == [small, Oversize(len(big)), small]
    assert held <= limit


# ------------------------------------------------------------------ the adapter -----


def test_backfill_raises_backfill_unsupported(env: Env) -> None:
    with pytest.raises(BackfillUnsupportedError) as info:
        env.watcher.backfill(date(2025, 3, 1), date(2025, 3, 21))
    assert "done" in info.value.hint


def test_build_from_the_registry_gives_a_poller(env: Env) -> None:
    built = adapters.build(env.settings, env.ctx)
    assert isinstance(built, Hl7FilesWatcher)
    assert isinstance(built, Poller)
    assert built.name == ADAPTER
    assert built.kind == "hl7-files"
    with pytest.raises(TypeError):
        build(object(), env.ctx)  # type: ignore[arg-type]


def test_start_maps_committed_messages_behind_and_stop_returns(env: Env) -> None:
    watcher = Hl7FilesWatcher(env.settings, env.ctx, map_fn=map_message)
    watcher.start()
    try:
        env.drop("m.hl7", message("MAP-1"))
        watcher.poll()
        runner = watcher.runner
        assert runner is not None
        assert runner.running
        rid = hl7_id(NODE, ADAPTER, "MAP-1", "20250321093000")
        for _ in range(500):  # bounded: the runner was woken by the commit
            if env.buf.record(rid) is not None:
                break
            runner.run_once()
        assert env.buf.record(rid) is not None
    finally:
        watcher.stop(timeout_secs=5)
    assert runner is not None
    assert not runner.running


def test_checks_report_a_missing_directory_without_raising(tmp_path: Path) -> None:
    s = Hl7FilesSettings(name=ADAPTER, kind="hl7-files", directory=tmp_path / "absent")
    clock = FakeClock(T0)
    buf = Buffer.open(tmp_path / "data", data_key=None)
    try:
        ctx = AdapterContext(node_id=NODE, sink=buf, log_key=LOG_KEY, clock=clock)
        watcher = Hl7FilesWatcher(s, ctx, mapping=False)
        checks = {c.name: c for c in watcher.checks()}
        c = checks[f"{ADAPTER}: directory"]
        assert not c.ok
        assert "does not exist" in c.detail
        assert c.hint
        report = watcher.poll()  # and polling neither raises nor creates it
        assert not report.complete
        assert not (tmp_path / "absent").exists()
    finally:
        buf.close()


def test_checks_pass_for_a_usable_directory(env: Env) -> None:
    env.drop("waiting.hl7", message("WAIT-1"))
    checks = {c.name: c for c in env.watcher.checks()}
    assert checks[f"{ADAPTER}: directory"].ok, checks
    assert "1 file(s) waiting" in checks[f"{ADAPTER}: directory"].detail
    assert checks[f"{ADAPTER}: done_dir"].ok
    assert "will be created" in checks[f"{ADAPTER}: done_dir"].detail
    assert checks[f"{ADAPTER}: failed_dir"].ok


def test_checks_report_a_done_dir_that_is_a_file(make_env: Callable[..., Env]) -> None:
    env = make_env()
    (env.inbox / "done").write_bytes(b"")
    checks = {c.name: c for c in env.watcher.checks()}
    assert not checks[f"{ADAPTER}: done_dir"].ok


def test_settings_refuse_done_dir_equal_to_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="watched directory"):
        Hl7FilesSettings(name="x", kind="hl7-files", directory=tmp_path, done_dir=tmp_path)


def test_settings_carry_the_mapping_keys_with_mllp_defaults(tmp_path: Path) -> None:
    s = Hl7FilesSettings(name="x", kind="hl7-files", directory=tmp_path)
    assert (s.national_id_authority, s.national_id_type) == ("NOCR", "NNIRN")
    assert s.pathology_obr24 == ("SP", "PAT")


# ------------------------------------------------------------------ logs ------------


def test_no_patient_data_in_any_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    e = Env(tmp_path, max_message_bytes=corpus.OVERSIZE_LIMIT)
    try:
        watcher = Hl7FilesWatcher(e.settings, e.ctx, map_fn=map_message)
        with caplog.at_level(logging.DEBUG):
            for i, case in enumerate(corpus.MESSAGES):
                # Files named after the patient, as some LIS exports are.
                family = corpus.NAMES[i % len(corpus.NAMES)][0]
                e.drop(f"{corpus.NC[i % len(corpus.NC)]}-{family}-{i}.hl7", case.message)
            e.drop("all-in-one.hl7", b"".join(c.message for c in corpus.MESSAGES))
            e.drop(f"{corpus.NC[0]}.hl7", GARBAGE)
            report = watcher.poll()
            assert report.found >= len(corpus.MESSAGES)
            runner = watcher.runner
            assert runner is not None
            while (r := runner.run_once()).mapped + r.quarantined:
                pass
        assert e.inbox_files() == []
        assert e.buf.stats().unmapped_raw == 0
    finally:
        e.buf.close()
    standard = set(vars(logging.makeLogRecord({})))
    secrets = corpus.patient_strings()
    assert caplog.records, "expected log lines to scan"
    events = {getattr(r, "event", "") for r in caplog.records}
    assert {"hl7.file_done", "hl7.file_failed", "hl7.message_refused"} <= events
    for record in caplog.records:
        text = (
            record.getMessage()
            + " "
            + " ".join(str(v) for k, v in vars(record).items() if k not in standard)
        )
        leaked = [s for s in secrets if s in text]
        assert not leaked, f"{record.name}: {record.getMessage()!r} carries patient data"
    # The .reason files, which sit beside the files, carry none either.
    for reason in e.failed.glob("*.reason"):
        text = reason.read_text(encoding="utf-8")
        assert not [s for s in secrets if s in text]


def test_file_names_in_logs_are_a_keyed_hash(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    name = f"{corpus.NC[3]}.hl7"
    env.drop(name, message("HASH-1"))
    with caplog.at_level(logging.INFO):
        env.watcher.poll()
    [done] = [r for r in caplog.records if getattr(r, "event", "") == "hl7.file_done"]
    assert done.file == env.ctx.patient_hash(name)  # type: ignore[attr-defined]
    assert hashlib.sha256(name.encode()).hexdigest()[:12] != done.file  # type: ignore[attr-defined]
