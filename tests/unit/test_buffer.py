"""agent.buffer: the durable SQLite buffer (intake, leases, capacity, retention, at-rest
encryption, damaged files, concurrency and the "database is locked" trap)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import buffer as buffer_mod
from agent.buffer import (
    APPLICATION_ID,
    DB_NAME,
    SCHEMA_VERSION,
    Buffer,
    Cursor,
    Lease,
    State,
    open_stats,
)
from agent.errors import (
    CapacityExceededError,
    KeyFileError,
    SchemaVersionError,
    SepasError,
    StorageCorruptError,
    StorageError,
)
from agent.record import Service
from tests.factories import (
    FakeClock,
    hl7_message,
    make_record,
    make_records,
    national_code,
    patient_name,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
REPO = Path(__file__).resolve().parents[2]
DAY = 86400.0
BIG = 10**12


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def buf(tmp_path: Path, clock: FakeClock) -> Iterator[Buffer]:
    b = Buffer.open(tmp_path, data_key=KEY, clock=clock)
    yield b
    b.close()


def rows_by_id(data_dir: Path) -> Counter[str]:
    """Record ids as stored, counted: read with a plain sqlite3 connection."""
    conn = sqlite3.connect(data_dir / DB_NAME)
    try:
        return Counter(i for (i,) in conn.execute("SELECT id FROM records"))
    finally:
        conn.close()


def lease_all(b: Buffer, secs: float = 60.0) -> Lease:
    lease = b.lease(max_records=100_000, max_bytes=BIG, lease_secs=secs)
    assert lease is not None
    return lease


class ConnSpy:
    """Wraps the writer's connection: counts statements and can inject faults.

    Installed with ``buf._conn = ConnSpy(buf._conn)`` while the writer is idle; the
    writer picks its connection up at the start of every group.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.statements: Counter[str] = Counter()
        self.busy_errors = 0
        self.fail_commits_after_success = 0

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        try:
            cur = self._conn.execute(sql, *args)
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorcode", 0) & 0xFF == 5:
                self.busy_errors += 1
            raise
        self.statements[sql] += 1
        if sql == "COMMIT" and self.fail_commits_after_success:
            self.fail_commits_after_success -= 1
            # The trap: the transaction is durable, yet the caller is told it failed.
            err = sqlite3.OperationalError("database is locked")
            err.sqlite_errorcode = 5  # type: ignore[attr-defined]  # SQLITE_BUSY
            err.sqlite_errorname = "SQLITE_BUSY"  # type: ignore[attr-defined]
            raise err
        return cur

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


# --- intake ------------------------------------------------------------------------------


def test_the_writer_commits_in_wal_mode_with_synchronous_full(buf: Buffer) -> None:
    """When put returns, the records survive a power cut (FULL fsyncs the WAL on commit)."""

    def pragmas(conn: sqlite3.Connection) -> tuple[str, int, int]:
        return (
            conn.execute("PRAGMA journal_mode").fetchone()[0],
            conn.execute("PRAGMA synchronous").fetchone()[0],
            conn.execute("PRAGMA auto_vacuum").fetchone()[0],
        )

    assert buf._submit(pragmas, in_txn=False).result() == ("wal", 2, 2)  # FULL, INCREMENTAL


def test_put_stores_new_records_as_pending_and_reports_them(buf: Buffer, tmp_path: Path) -> None:
    recs = make_records(0, 5)
    assert buf.put(recs) == buffer_mod.PutReport(inserted=5, duplicates=0)
    assert all(buf.state_of(r.id) is State.PENDING for r in recs)
    assert buf.record(recs[3].id) == recs[3]
    assert rows_by_id(tmp_path) == Counter(r.id for r in recs)


def test_put_is_idempotent_on_record_id(buf: Buffer, tmp_path: Path) -> None:
    recs = make_records(0, 4)
    buf.put(recs[:2])
    report = buf.put(recs)
    assert report == buffer_mod.PutReport(inserted=2, duplicates=2)
    assert buf.put(recs) == buffer_mod.PutReport(inserted=0, duplicates=4)
    assert rows_by_id(tmp_path) == Counter(r.id for r in recs)


def test_put_of_a_record_already_sent_leaves_it_sent(buf: Buffer) -> None:
    rec = make_record(1)
    buf.put([rec])
    lease = lease_all(buf)
    buf.mark_sent(lease, lease.ids)
    assert buf.put([rec]).duplicates == 1
    assert buf.state_of(rec.id) is State.SENT


def test_put_counts_an_id_repeated_within_one_call_once(buf: Buffer, tmp_path: Path) -> None:
    rec = make_record(7)
    assert buf.put([rec, rec, make_record(8)]) == buffer_mod.PutReport(inserted=2, duplicates=1)
    assert rows_by_id(tmp_path)[rec.id] == 1


def test_put_records_survive_close_and_reopen(tmp_path: Path, clock: FakeClock) -> None:
    recs = make_records(0, 3, service=Service.PATHOLOGY_REPORT)
    with Buffer.open(tmp_path, data_key=KEY, clock=clock) as b:
        b.put(recs, cursor=Cursor("lis", "42"))
    with Buffer.open(tmp_path, data_key=KEY, clock=clock) as b:
        assert [b.record(r.id) for r in recs] == recs
        assert b.cursor("lis") == "42"


def test_put_commits_the_cursor_with_the_records(buf: Buffer, clock: FakeClock) -> None:
    assert buf.cursor("his-sql") is None
    buf.put(make_records(0, 2), cursor=Cursor("his-sql", "row:100"))
    assert buf.cursor("his-sql") == "row:100"
    buf.put(make_records(2, 2), cursor=Cursor("his-sql", "row:200"))
    assert buf.cursor("his-sql") == "row:200"
    assert buf.stats().cursors["his-sql"] == ("row:200", clock.now)


def test_cursor_advances_with_zero_records(buf: Buffer) -> None:
    buf.set_cursor(Cursor("pacs", "2025-03-21T10:00"))
    assert buf.cursor("pacs") == "2025-03-21T10:00"
    assert buf.put((), cursor=Cursor("pacs", "2025-03-21T11:00")).inserted == 0
    assert buf.cursor("pacs") == "2025-03-21T11:00"
    assert buf.stats().total(State.PENDING) == 0


def test_a_refused_put_advances_no_cursor_and_maps_no_raw_row(
    tmp_path: Path, clock: FakeClock
) -> None:
    """put is atomic: records, cursor and raw rows go in together or not at all."""
    with Buffer.open(tmp_path, data_key=KEY, clock=clock) as b:
        base = b.stats().used_bytes
    with Buffer.open(tmp_path, data_key=KEY, clock=clock, max_bytes=base + 60_000) as b:
        b.set_cursor(Cursor("lis", "old"))
        rid, _ = b.put_raw(b"MSH|small", adapter="lis", media_type="application/hl7-v2")
        big = make_records(0, 30, body_size=4000)
        with pytest.raises(CapacityExceededError):
            b.put(big, cursor=Cursor("lis", "new"), raw_ids=[rid])
        assert b.cursor("lis") == "old"
        assert [e.id for e in b.unmapped_raw("lis")] == [rid]
        assert all(b.state_of(r.id) is None for r in big)


# --- raw intake and quarantine -------------------------------------------------------------


def test_put_raw_dedupes_on_its_key(buf: Buffer) -> None:
    msg = hl7_message(1)
    rid, new = buf.put_raw(msg, adapter="lis", media_type="application/hl7-v2", dedupe_key="k1")
    assert new
    again = buf.put_raw(msg, adapter="lis", media_type="application/hl7-v2", dedupe_key="k1")
    assert again == (rid, False)
    other, new2 = buf.put_raw(msg, adapter="his", media_type="application/hl7-v2", dedupe_key="k1")
    assert new2
    assert other != rid
    assert [(e.id, e.data) for e in buf.unmapped_raw("lis")] == [(rid, msg)]
    assert buf.stats().unmapped_raw == 2


def test_put_raw_without_a_key_stores_every_delivery(buf: Buffer) -> None:
    a, _ = buf.put_raw(b"one", adapter="lis", media_type="text/plain")
    b, _ = buf.put_raw(b"one", adapter="lis", media_type="text/plain")
    assert a != b
    assert [e.data for e in buf.unmapped_raw("lis")] == [b"one", b"one"]


def test_put_with_raw_ids_marks_the_raw_rows_mapped(buf: Buffer) -> None:
    r1, _ = buf.put_raw(hl7_message(1), adapter="lis", media_type="application/hl7-v2")
    r2, _ = buf.put_raw(hl7_message(2), adapter="lis", media_type="application/hl7-v2")
    buf.put([make_record(1)], raw_ids=[r1])
    assert [e.id for e in buf.unmapped_raw("lis")] == [r2]
    assert buf.state_of(make_record(1).id) is State.PENDING
    assert buf.stats().unmapped_raw == 1


def test_quarantine_raw_moves_an_unmappable_row_to_quarantine(buf: Buffer) -> None:
    data = b"MSH|^~\\&|garbage"
    rid, _ = buf.put_raw(data, adapter="lis", media_type="application/hl7-v2")
    buf.quarantine_raw(rid, reason="MSH-9 missing")
    assert buf.unmapped_raw("lis") == []
    [entry] = buf.quarantined()
    assert (entry.adapter, entry.reason, entry.media_type) == (
        "lis",
        "MSH-9 missing",
        "application/hl7-v2",
    )
    assert buf.quarantined_data(entry.id) == data
    buf.quarantine_raw(rid, reason="again")  # already moved: nothing happens
    assert [e.reason for e in buf.quarantined()] == ["MSH-9 missing"]


def test_quarantine_lists_returns_data_and_drops(buf: Buffer) -> None:
    q1 = buf.quarantine(b"bad one", adapter="lis", reason="no MSH", media_type="text/plain")
    q2 = buf.quarantine(b"bad two", adapter="his", reason="bad date")
    listed = buf.quarantined()
    assert [(e.id, e.adapter, e.reason, e.size) for e in listed] == [
        (q1, "lis", "no MSH", 7),
        (q2, "his", "bad date", 7),
    ]
    assert buf.quarantined_data(q2) == b"bad two"
    assert buf.stats().quarantined == 2
    assert buf.drop_quarantined([q1, 999]) == 1
    assert [e.id for e in buf.quarantined()] == [q2]
    with pytest.raises(KeyError):
        buf.quarantined_data(q1)


def test_quarantine_of_the_same_bytes_twice_is_one_entry_with_the_latest_reason(
    buf: Buffer,
) -> None:
    q1 = buf.quarantine(b"bad", adapter="lis", reason="first")
    assert buf.quarantine(b"bad", adapter="lis", reason="second") == q1
    q3 = buf.quarantine(b"bad", adapter="his", reason="other adapter")
    assert q3 != q1
    assert [(e.id, e.reason) for e in buf.quarantined()] == [(q1, "second"), (q3, "other adapter")]


# --- leasing -------------------------------------------------------------------------------


def test_lease_takes_clinical_before_imaging_and_intake_order_within_a_lane(buf: Buffer) -> None:
    img1 = make_record(1, service=Service.IMAGING_STUDY)
    lab2 = make_record(2, service=Service.LAB_RESULT)
    img3 = make_record(3, service=Service.IMAGING_STUDY)
    rx4 = make_record(4, service=Service.E_PRESCRIPTION)
    for r in (img1, lab2, img3, rx4):
        buf.put([r])
    lease = lease_all(buf)
    assert lease.ids == [lab2.id, rx4.id, img1.id, img3.id]
    assert [it.service for it in lease.items] == [
        "lab-result",
        "e-prescription",
        "imaging-study",
        "imaging-study",
    ]
    assert lease.items[0].record() == lab2


def test_lease_stops_at_max_records(buf: Buffer) -> None:
    recs = make_records(0, 10)
    buf.put(recs)
    first = buf.lease(max_records=3, max_bytes=BIG, lease_secs=60)
    second = buf.lease(max_records=3, max_bytes=BIG, lease_secs=60)
    assert first is not None
    assert second is not None
    assert first.ids == [r.id for r in recs[:3]]
    assert second.ids == [r.id for r in recs[3:6]]
    assert first.id != second.id
    assert buf.stats().total(State.INFLIGHT) == 6


def test_lease_stops_at_max_bytes(buf: Buffer) -> None:
    recs = make_records(0, 5, body_size=1000)
    buf.put(recs)
    sizes = [len(r.to_json()) for r in recs]
    lease = buf.lease(max_records=100, max_bytes=sizes[0] + sizes[1] + sizes[2] - 1, lease_secs=60)
    assert lease is not None
    assert lease.ids == [r.id for r in recs[:2]]
    assert [it.size for it in lease.items] == sizes[:2]
    assert [it.envelope for it in lease.items] == [r.to_json() for r in recs[:2]]


def test_lease_claims_one_record_even_if_it_is_larger_than_max_bytes(buf: Buffer) -> None:
    recs = make_records(0, 3, body_size=5000)
    buf.put(recs)
    lease = buf.lease(max_records=100, max_bytes=100, lease_secs=60)
    assert lease is not None
    assert lease.ids == [recs[0].id]


def test_lease_returns_none_when_nothing_is_due(buf: Buffer) -> None:
    assert buf.lease(max_records=10, max_bytes=BIG, lease_secs=60) is None
    buf.put(make_records(0, 2))
    lease_all(buf)
    assert buf.lease(max_records=10, max_bytes=BIG, lease_secs=60) is None


def test_an_expired_lease_makes_its_records_claimable_again(buf: Buffer, clock: FakeClock) -> None:
    recs = make_records(0, 3)
    buf.put(recs)
    old = lease_all(buf, secs=60)
    assert old.expires_at == clock.now + 60
    clock.advance(59)
    assert buf.lease(max_records=10, max_bytes=BIG, lease_secs=60) is None
    clock.advance(1)
    new = lease_all(buf, secs=60)
    assert new.ids == old.ids
    assert new.id != old.id
    # The dead uploader's lease no longer owns them...
    assert buf.release(old) == 0
    assert buf.retry_later(old, old.ids, not_before=0, reason="x") == 0
    assert buf.dead_letter(old, {old.ids[0]: "x"}) == 0
    assert all(buf.state_of(r.id) is State.INFLIGHT for r in recs)
    # ...and the new one does.
    assert buf.release(new) == 3


def test_mark_sent_settles_records_even_after_their_lease_ran_out(
    buf: Buffer, clock: FakeClock
) -> None:
    recs = make_records(0, 3)
    buf.put(recs)
    old = lease_all(buf, secs=10)
    clock.advance(11)
    new = lease_all(buf)  # re-leased: inflight under another lease
    assert buf.release(new, [recs[2].id]) == 1  # and one of them back to pending
    assert buf.mark_sent(old, old.ids, hub_day="2025-03-21") == 3  # the hub's word is final
    assert all(buf.state_of(r.id) is State.SENT for r in recs)
    assert buf.release(new) == 0
    assert buf.mark_sent(new, new.ids) == 0  # already sent: nothing changes
    assert buf.stats().total(State.SENT) == 3


def test_retry_later_holds_records_until_next_attempt_at(buf: Buffer, clock: FakeClock) -> None:
    recs = make_records(0, 2)
    buf.put(recs)
    lease = lease_all(buf)
    assert buf.retry_later(lease, [recs[0].id], not_before=clock.now + 30, reason="503") == 1
    assert buf.state_of(recs[0].id) is State.PENDING
    assert buf.state_of(recs[1].id) is State.INFLIGHT
    assert buf.lease(max_records=10, max_bytes=BIG, lease_secs=60) is None
    clock.advance(30)
    again = lease_all(buf)
    assert again.ids == [recs[0].id]
    assert again.items[0].attempts == 1
    # No attempt limit for transient errors.
    for n in range(2, 12):
        assert buf.retry_later(again, again.ids, not_before=clock.now, reason="503") == 1
        again = lease_all(buf)
        assert again.items[0].attempts == n


def test_release_returns_leased_records_to_pending_due_now(buf: Buffer) -> None:
    recs = make_records(0, 3)
    buf.put(recs)
    lease = lease_all(buf)
    assert buf.release(lease, [recs[1].id]) == 1
    assert [buf.state_of(r.id) for r in recs] == [State.INFLIGHT, State.PENDING, State.INFLIGHT]
    assert buf.release(lease) == 2
    again = lease_all(buf)
    assert again.ids == [r.id for r in recs]
    assert all(it.attempts == 0 for it in again.items)


def test_dead_letter_keeps_records_with_the_hubs_reason(buf: Buffer, clock: FakeClock) -> None:
    recs = make_records(0, 3)
    buf.put(recs)
    lease = lease_all(buf)
    assert buf.dead_letter(lease, {recs[0].id: "schema: body.entry missing"}) == 1
    assert buf.state_of(recs[0].id) is State.DEAD
    [dead] = buf.dead()
    assert (dead.id, dead.service, dead.adapter, dead.reason, dead.settled_at) == (
        recs[0].id,
        "lab-result",
        "lis",
        "schema: body.entry missing",
        clock.now,
    )
    buf.release(lease)
    assert (
        buf.lease(max_records=10, max_bytes=BIG, lease_secs=60).ids
        == [  # type: ignore[union-attr]
            r.id for r in recs[1:]
        ]
    )


def test_requeue_dead_makes_dead_records_pending_and_due_now(buf: Buffer) -> None:
    recs = make_records(0, 2)
    buf.put(recs)
    lease = lease_all(buf)
    buf.dead_letter(lease, {r.id: "bad" for r in recs})
    assert buf.requeue_dead([recs[1].id, make_record(99).id]) == 1
    assert buf.state_of(recs[1].id) is State.PENDING
    assert buf.state_of(recs[0].id) is State.DEAD
    assert lease_all(buf).ids == [recs[1].id]
    assert buf.requeue_dead([recs[1].id]) == 0  # inflight, not dead


def test_purge_dead_deletes_only_dead_records(buf: Buffer, tmp_path: Path) -> None:
    recs = make_records(0, 3)
    buf.put(recs)
    lease = lease_all(buf)
    buf.dead_letter(lease, {recs[0].id: "bad"})
    assert buf.purge_dead([r.id for r in recs]) == 1
    assert buf.state_of(recs[0].id) is None
    assert rows_by_id(tmp_path) == Counter(r.id for r in recs[1:])
    assert buf.dead() == []


def test_ops_under_another_lease_change_nothing(buf: Buffer) -> None:
    a, b = make_record(1), make_record(2)
    buf.put([a])
    la = lease_all(buf)
    buf.put([b])
    lb = lease_all(buf)
    assert buf.retry_later(la, [b.id], not_before=0, reason="x") == 0
    assert buf.dead_letter(la, {b.id: "x"}) == 0
    assert buf.release(la, [b.id]) == 0
    assert buf.state_of(b.id) is State.INFLIGHT
    assert buf.release(lb) == 1


# --- capacity ------------------------------------------------------------------------------


def _baseline_used(tmp_path: Path, clock: FakeClock) -> int:
    with Buffer.open(tmp_path, data_key=KEY, clock=clock) as b:
        return b.stats().used_bytes


def _fill(b: Buffer, start: int, *, body_size: int = 4000, limit: int = 500) -> int:
    """Put one record at a time until refused; returns the index that was refused."""
    for i in range(start, start + limit):
        try:
            b.put([make_record(i, body_size=body_size)])
        except CapacityExceededError:
            return i
    raise AssertionError("the buffer never filled up")


def test_put_past_max_bytes_raises_and_stores_nothing(tmp_path: Path, clock: FakeClock) -> None:
    base = _baseline_used(tmp_path, clock)
    with Buffer.open(tmp_path, data_key=KEY, clock=clock, max_bytes=base + 100_000) as b:
        refused = _fill(b, 0)
        assert refused > 5
        assert b.stats().used_bytes <= b.max_bytes
        batch = make_records(refused, 3, body_size=4000)
        with pytest.raises(CapacityExceededError) as err:
            b.put(batch)
        assert err.value.transient
        assert all(b.state_of(r.id) is None for r in batch)
        assert rows_by_id(tmp_path) == Counter(make_record(i).id for i in range(refused))


def test_a_duplicate_only_put_is_accepted_when_full(tmp_path: Path, clock: FakeClock) -> None:
    base = _baseline_used(tmp_path, clock)
    with Buffer.open(tmp_path, data_key=KEY, clock=clock, max_bytes=base + 60_000) as b:
        refused = _fill(b, 0)
        again = [make_record(i, body_size=4000) for i in range(refused)]
        assert b.put(again, cursor=Cursor("lis", "after-full")) == buffer_mod.PutReport(
            inserted=0, duplicates=refused
        )
        assert b.cursor("lis") == "after-full"


def test_sent_records_are_pruned_early_to_make_room_but_pending_ones_never(
    tmp_path: Path, clock: FakeClock
) -> None:
    base = _baseline_used(tmp_path, clock)
    with Buffer.open(tmp_path, data_key=KEY, clock=clock, max_bytes=base + 100_000) as b:
        refused = _fill(b, 0)
        half = refused // 2
        lease = b.lease(max_records=half, max_bytes=BIG, lease_secs=60)
        assert lease is not None
        b.mark_sent(lease, lease.ids)
        sent_ids = lease.ids
        pending_ids = [make_record(i).id for i in range(half, refused)]
        # Room comes only from delivered records: a few new ones fit now.
        b.put([make_record(refused, body_size=4000)])
        assert b.state_of(make_record(refused).id) is State.PENDING
        assert any(b.state_of(i) is None for i in sent_ids)
        assert all(b.state_of(i) is State.PENDING for i in pending_ids)
        # Once every delivered record is gone, intake is refused again: pending stay.
        _fill(b, refused + 1, limit=100)
        assert all(b.state_of(i) is None for i in sent_ids)
        assert all(b.state_of(i) is State.PENDING for i in pending_ids)


def test_a_put_refused_after_early_pruning_leaves_the_sent_records_in_place(
    tmp_path: Path, clock: FakeClock
) -> None:
    base = _baseline_used(tmp_path, clock)
    with Buffer.open(tmp_path, data_key=KEY, clock=clock, max_bytes=base + 100_000) as b:
        refused = _fill(b, 0)
        lease = b.lease(max_records=3, max_bytes=BIG, lease_secs=60)
        assert lease is not None
        b.mark_sent(lease, lease.ids)
        # Too big even with every delivered record gone: refused, and the early prune
        # that was tried is undone with it.
        with pytest.raises(CapacityExceededError):
            b.put(make_records(refused, 40, body_size=4000))
        assert all(b.state_of(i) is State.SENT for i in lease.ids)
        assert b.stats().total(State.PENDING) == refused - 3


def test_disk_full_raises_capacity_exceeded_and_the_buffer_recovers(
    tmp_path: Path, clock: FakeClock
) -> None:
    with Buffer.open(tmp_path, data_key=KEY, clock=clock) as b:
        b.put([make_record(0)])
        pages = b.stats().file_bytes // 4096 + 1
    with Buffer.open(tmp_path, data_key=KEY, clock=clock, _max_page_count=pages + 40) as b:
        refused = _fill(b, 1)
        assert refused > 5
        with pytest.raises(CapacityExceededError, match="full"):
            b.put(make_records(refused, 2, body_size=4000))
        assert b.state_of(make_record(refused).id) is None
        assert b.record(make_record(3).id) == make_record(3, body_size=4000)
        assert b.stats().total(State.PENDING) == refused
        # The operator frees disk space; the running buffer takes intake again.
        b._submit(
            lambda conn: conn.execute("PRAGMA max_page_count = 1000000"), in_txn=False
        ).result()
        assert b.put(make_records(refused, 2, body_size=4000)).inserted == 2
        lease = lease_all(b)
        assert len(lease.ids) == refused + 2
        b.mark_sent(lease, lease.ids)
    assert rows_by_id(tmp_path) == Counter(make_record(i).id for i in range(refused + 2))
    conn = sqlite3.connect(tmp_path / DB_NAME)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def test_a_refused_op_does_not_sink_the_others_in_its_group(
    tmp_path: Path, clock: FakeClock
) -> None:
    base = _baseline_used(tmp_path, clock)
    with Buffer.open(tmp_path, data_key=KEY, clock=clock, max_bytes=base + 60_000) as b:
        gate, started = threading.Event(), threading.Event()

        def hold(conn: sqlite3.Connection) -> None:
            started.set()
            gate.wait(10)

        blocker = b._submit(hold)
        assert started.wait(10)
        small = make_record(1)
        huge = make_records(100, 40, body_size=4000)
        results: dict[str, Any] = {}

        def put(name: str, recs: list[Any]) -> None:
            try:
                results[name] = b.put(recs)
            except CapacityExceededError as e:
                results[name] = e

        threads = [
            threading.Thread(target=put, args=("huge", huge)),
            threading.Thread(target=put, args=("small", [small])),
        ]
        for t in threads:
            t.start()
        _wait_for(lambda: b._queue.qsize() == 2)
        gate.set()
        for t in threads:
            t.join(10)
        blocker.result(10)
        assert isinstance(results["huge"], CapacityExceededError)
        assert results["small"] == buffer_mod.PutReport(inserted=1, duplicates=0)
        assert rows_by_id(tmp_path) == Counter([small.id])


# --- retention -----------------------------------------------------------------------------


def test_prune_deletes_only_sent_records_older_than_retention(
    buf: Buffer, clock: FakeClock
) -> None:
    old_sent, new_sent, pending, inflight, dead = (make_records(10 * k, 3) for k in range(5))
    buf.put(old_sent + dead + inflight)
    lease = lease_all(buf, secs=100 * DAY)  # outlives the test: inflight stays inflight
    buf.mark_sent(lease, [r.id for r in old_sent])
    buf.dead_letter(lease, {r.id: "bad" for r in dead})
    clock.advance(20 * DAY)
    buf.put(new_sent)
    lease2 = lease_all(buf)
    buf.mark_sent(lease2, lease2.ids)
    buf.put(pending)
    clock.advance(10 * DAY + 1)  # old_sent: 30 days + 1 s; new_sent: 10 days
    report = buf.prune()
    assert report.records == 3
    assert all(buf.state_of(r.id) is None for r in old_sent)
    assert all(buf.state_of(r.id) is State.SENT for r in new_sent)
    assert all(buf.state_of(r.id) is State.PENDING for r in pending)
    assert all(buf.state_of(r.id) is State.INFLIGHT for r in inflight)
    assert all(buf.state_of(r.id) is State.DEAD for r in dead)
    assert buf.prune().records == 0


def test_prune_gives_freed_pages_back_to_the_file_system(tmp_path: Path, clock: FakeClock) -> None:
    with Buffer.open(tmp_path, data_key=KEY, clock=clock) as b:
        b.put(make_records(0, 300, body_size=3000))
        lease = lease_all(b)
        b.mark_sent(lease, lease.ids)
    db = tmp_path / DB_NAME
    before = db.stat().st_size
    assert before > 1_500_000
    clock.advance(31 * DAY)
    with Buffer.open(tmp_path, data_key=KEY, clock=clock) as b:
        report = b.prune()
        assert report.records == 300
        assert report.bytes_after < report.bytes_before
        assert db.stat().st_size < before // 5
        assert Path(f"{db}-wal").stat().st_size == 0
        assert b.stats().total(State.SENT) == 0


# --- encryption at rest --------------------------------------------------------------------


def _disk_bytes(data_dir: Path) -> bytes:
    out = b""
    for suffix in ("", "-wal"):
        p = Path(f"{data_dir / DB_NAME}{suffix}")
        if p.exists():
            out += p.read_bytes()
    return out


@pytest.mark.parametrize("encrypted", [True, False], ids=["data-key", "no-key-control"])
def test_patient_data_never_reaches_the_disk_in_clear(
    tmp_path: Path, clock: FakeClock, encrypted: bool
) -> None:
    n = 6
    needles = {
        "national code": [national_code(i).encode() for i in range(n)],
        "Persian name": [patient_name(i).encode() for i in range(n)],  # UTF-8
        "raw HL7": [hl7_message(i).split(b"\r")[1] for i in range(3, n)],  # PID segments
        "raw HL7 in the envelope": [base64.b64encode(hl7_message(i)) for i in range(3)],
    }
    with Buffer.open(tmp_path, data_key=KEY if encrypted else None, clock=clock) as b:
        b.put(make_records(0, 3))  # records: envelope with patient, body and raw
        for i in range(3, n):
            rid, _ = b.put_raw(hl7_message(i), adapter="lis", media_type="application/hl7-v2")
            if i == 5:
                b.quarantine_raw(rid, reason="unmappable")
        b.quarantine(hl7_message(4), adapter="his", reason="no MSH-9")
        lease_all(b)
        assert Path(f"{tmp_path / DB_NAME}-wal").stat().st_size > 0
        while_open = _disk_bytes(tmp_path)
    after_close = _disk_bytes(tmp_path)
    for blob in (while_open, after_close):
        found = {what: [s for s in ss if s in blob] for what, ss in needles.items()}
        if encrypted:
            assert found == {what: [] for what in needles}
        else:  # the control: the same grep does find them in clear
            assert all(found.values()), found


def test_opening_with_a_different_key_raises_key_file_error(
    tmp_path: Path, clock: FakeClock
) -> None:
    with Buffer.open(tmp_path, data_key=KEY, clock=clock) as b:
        b.put([make_record(1)])
    with pytest.raises(KeyFileError, match="does not match"):
        Buffer.open(tmp_path, data_key=OTHER_KEY, clock=clock)
    with Buffer.open(tmp_path, data_key=KEY, clock=clock) as b:
        assert b.record(make_record(1).id) == make_record(1)


# --- status --------------------------------------------------------------------------------


def test_stats_count_by_service_and_state(buf: Buffer, clock: FakeClock) -> None:
    buf.put(make_records(0, 3, service=Service.LAB_RESULT))
    clock.advance(5)
    buf.put(make_records(10, 2, service=Service.IMAGING_STUDY))
    lease = buf.lease(max_records=2, max_bytes=BIG, lease_secs=60)
    assert lease is not None
    buf.mark_sent(lease, lease.ids[:1])
    st = buf.stats()
    assert st.counts == {
        ("lab-result", "sent"): 1,
        ("lab-result", "inflight"): 1,
        ("lab-result", "pending"): 1,
        ("imaging-study", "pending"): 2,
    }
    assert st.total(State.PENDING) == 3
    assert st.oldest_pending_at == clock.now - 5
    assert st.schema_version == SCHEMA_VERSION


def test_open_stats_reads_while_a_writer_is_open(buf: Buffer, tmp_path: Path) -> None:
    assert open_stats(tmp_path / "nothing-here") is None
    buf.put(make_records(0, 4))
    buf.quarantine(b"bad", adapter="lis", reason="r")
    st = open_stats(tmp_path)
    assert st is not None
    assert st.total(State.PENDING) == 4
    assert st.quarantined == 1
    buf.put(make_records(4, 1))
    st2 = open_stats(tmp_path)
    assert st2 is not None
    assert st2.total(State.PENDING) == 5


_STATS_CHILD = """
import json, sys
from agent.buffer import open_stats
seen = []
for _ in range(15):
    st = open_stats(sys.argv[1])
    seen.append(st.total("pending"))
print(json.dumps(seen))
"""


def test_open_stats_works_from_another_process_while_this_one_writes(
    buf: Buffer, tmp_path: Path
) -> None:
    buf.put(make_records(0, 5))
    stop = threading.Event()
    written = [5]

    def writer() -> None:
        i = 5
        while not stop.is_set():
            buf.put([make_record(i)])
            i += 1
            written.append(i)

    t = threading.Thread(target=writer)
    t.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _STATS_CHILD, str(tmp_path)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        stop.set()
        t.join(30)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert len(seen) == 15
    assert seen == sorted(seen)
    assert seen[0] >= 5
    assert seen[-1] <= written[-1]


# --- damaged, foreign, newer and unwritable files ------------------------------------------


def test_a_file_of_random_bytes_raises_storage_corrupt(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(os.urandom(64 * 1024))
    with pytest.raises(StorageCorruptError):
        Buffer.open(tmp_path, data_key=KEY)
    with pytest.raises(StorageCorruptError):
        open_stats(tmp_path)


@pytest.mark.parametrize("keep", [100, 4096, 0.5, -4096], ids=["100B", "1page", "half", "-1page"])
def test_a_truncated_file_raises_a_storage_error_not_sqlite3(
    tmp_path: Path, clock: FakeClock, keep: float
) -> None:
    with Buffer.open(tmp_path / "src", data_key=KEY, clock=clock) as b:
        b.put(make_records(0, 150, body_size=2000))
    data = (tmp_path / "src" / DB_NAME).read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    (tmp_path / DB_NAME).write_bytes(data[:cut])
    with pytest.raises(StorageError) as err:
        Buffer.open(tmp_path, data_key=KEY, clock=clock)
    assert isinstance(err.value, SepasError)
    assert not isinstance(err.value, sqlite3.Error)


def test_a_damaged_table_raises_storage_corrupt_at_open(tmp_path: Path) -> None:
    with Buffer.open(tmp_path, data_key=KEY) as b:
        b.put([make_record(1)])
    conn = sqlite3.connect(tmp_path / DB_NAME)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'blobs'").fetchone()
    conn.close()
    with open(tmp_path / DB_NAME, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * page_size)
    with pytest.raises(StorageCorruptError):
        Buffer.open(tmp_path, data_key=KEY)


def test_a_foreign_sqlite_file_raises_storage_corrupt_and_is_left_alone(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute("CREATE TABLE invoices(id INTEGER PRIMARY KEY, total REAL)")
    conn.execute("INSERT INTO invoices(total) VALUES (12.5)")
    conn.commit()
    conn.close()
    before = (tmp_path / DB_NAME).read_bytes()
    with pytest.raises(StorageCorruptError, match="another application"):
        Buffer.open(tmp_path, data_key=KEY)
    with pytest.raises(StorageCorruptError):
        open_stats(tmp_path)
    assert (tmp_path / DB_NAME).read_bytes() == before


def test_a_newer_schema_version_raises_schema_version_error(tmp_path: Path) -> None:
    Buffer.open(tmp_path, data_key=KEY).close()
    conn = sqlite3.connect(tmp_path / DB_NAME)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaVersionError):
        Buffer.open(tmp_path, data_key=KEY)
    with pytest.raises(SchemaVersionError):
        open_stats(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes")
@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_a_read_only_data_dir_raises_storage_error(tmp_path: Path, existing: bool) -> None:
    data = tmp_path / "data"
    if existing:
        Buffer.open(data, data_key=KEY).close()
    else:
        data.mkdir()
    data.chmod(0o500)
    try:
        with pytest.raises(StorageError, match="not writable"):
            Buffer.open(data, data_key=KEY)
    finally:
        data.chmod(0o700)


def test_a_data_dir_that_cannot_be_created_raises_storage_error(tmp_path: Path) -> None:
    (tmp_path / "taken").write_bytes(b"a file, not a directory")
    with pytest.raises(StorageError, match="cannot create data directory"):
        Buffer.open(tmp_path / "taken" / "data", data_key=KEY)


# --- concurrency ---------------------------------------------------------------------------


def _wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def _open_at_once(data: Path, n: int) -> tuple[list[Buffer], list[BaseException]]:
    barrier = threading.Barrier(n)
    opened: list[Buffer] = []
    errors: list[BaseException] = []

    def open_it() -> None:
        barrier.wait(10)
        try:
            opened.append(Buffer.open(data, data_key=KEY))
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=open_it) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return opened, errors


def test_concurrent_first_opens_of_a_new_buffer_all_succeed(tmp_path: Path) -> None:
    """The service and a CLI command may create the same buffer at the same moment."""
    for trial in range(8):
        opened, errors = _open_at_once(tmp_path / f"d{trial}", 4)
        for b in opened:
            b.close()
        assert errors == []
        with Buffer.open(tmp_path / f"d{trial}", data_key=KEY) as b:
            b.put([make_record(trial)])
            assert b.stats().total(State.PENDING) == 1


def test_sixteen_producer_threads_store_every_record_once(buf: Buffer, tmp_path: Path) -> None:
    barrier = threading.Barrier(16)
    inserted: list[int] = []
    errors: list[BaseException] = []

    def producer(t: int) -> None:
        try:
            barrier.wait(10)
            n = 0
            for k in range(10):  # singles
                n += buf.put([make_record(t * 100 + k)]).inserted
            for k in range(10, 30, 5):  # batches
                n += buf.put(make_records(t * 100 + k, 5)).inserted
            n += buf.put(make_records(10_000, 8)).inserted  # the same 8 from every thread
            inserted.append(n)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=producer, args=(t,)) for t in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == []
    expected = {make_record(t * 100 + k).id for t in range(16) for k in range(30)}
    expected |= {r.id for r in make_records(10_000, 8)}
    assert sum(inserted) == len(expected)
    assert rows_by_id(tmp_path) == Counter(expected)


def test_put_async_from_many_tasks_stores_every_record_once(buf: Buffer, tmp_path: Path) -> None:
    async def main() -> list[int]:
        async def one(i: int) -> int:
            report = await buf.put_async([make_record(i % 150)], cursor=Cursor("a", str(i)))
            return report.inserted

        return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(main())
    assert sum(results) == 150
    assert rows_by_id(tmp_path) == Counter(make_record(i).id for i in range(150))
    assert buf.cursor("a") is not None


def test_group_commit_puts_queued_puts_in_one_transaction(buf: Buffer, tmp_path: Path) -> None:
    spy = ConnSpy(buf._conn)
    buf._conn = spy  # type: ignore[assignment]
    gate, started = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        started.set()
        gate.wait(10)

    blocker = buf._submit(hold)  # keeps the writer busy while producers queue up
    assert started.wait(10)
    threads = [threading.Thread(target=buf.put, args=([make_record(i)],)) for i in range(16)]
    for t in threads:
        t.start()
    _wait_for(lambda: buf._queue.qsize() == 16)
    commits_before = spy.statements["COMMIT"]
    gate.set()
    for t in threads:
        t.join(10)
    blocker.result(10)
    # The blocker's own transaction, then one for all 16 puts (not 16).
    assert spy.statements["COMMIT"] - commits_before == 2
    assert spy.statements["SAVEPOINT op"] == 17
    assert rows_by_id(tmp_path) == Counter(make_record(i).id for i in range(16))


def test_put_waits_out_another_connections_write_lock_and_stays_idempotent(
    tmp_path: Path,
) -> None:
    b = Buffer.open(tmp_path, data_key=KEY, busy_timeout_ms=20)
    try:
        spy = ConnSpy(b._conn)
        b._conn = spy  # type: ignore[assignment]
        other = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        recs = make_records(0, 5)
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(b.put(recs, cursor=Cursor("x", "1"))))
        t.start()
        _wait_for(lambda: spy.busy_errors >= 2)
        assert result == []  # still waiting: nothing was acknowledged
        other.execute("ROLLBACK")
        other.close()
        t.join(10)
        assert result == [buffer_mod.PutReport(inserted=5, duplicates=0)]
        assert b.put(recs) == buffer_mod.PutReport(inserted=0, duplicates=5)
        assert rows_by_id(tmp_path) == Counter(r.id for r in recs)
    finally:
        b.close()


def test_a_commit_reported_locked_after_it_succeeded_is_retried_idempotently(
    buf: Buffer, tmp_path: Path
) -> None:
    spy = ConnSpy(buf._conn)
    buf._conn = spy  # type: ignore[assignment]
    recs = make_records(0, 4)

    spy.fail_commits_after_success = 1
    report = buf.put(recs, cursor=Cursor("lis", "9"))  # no error reaches the caller
    assert report.inserted + report.duplicates == 4
    assert spy.statements["COMMIT"] == 2
    assert rows_by_id(tmp_path) == Counter(r.id for r in recs)
    assert buf.cursor("lis") == "9"

    spy.fail_commits_after_success = 1
    raw_id, new = buf.put_raw(b"MSH|raw", adapter="lis", media_type="application/hl7-v2")
    assert new  # new to the caller, though the re-run found the first run's row
    assert [e.id for e in buf.unmapped_raw("lis")] == [raw_id]  # stored once, not twice

    spy.fail_commits_after_success = 1
    buf.put([make_record(10)], raw_ids=[raw_id])
    assert buf.unmapped_raw("lis") == []
    assert rows_by_id(tmp_path)[make_record(10).id] == 1


def test_a_put_racing_close_is_answered_not_left_hanging(tmp_path: Path) -> None:
    b = Buffer.open(tmp_path, data_key=KEY)
    real = b._queue
    gate, entered = threading.Event(), threading.Event()

    class GatedQueue:
        """Holds a producer between "not closed yet" and "queued", where close can win."""

        def put(self, item: Any) -> None:
            if isinstance(item, buffer_mod._Op):
                entered.set()
                gate.wait(10)
            real.put(item)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    b._queue = GatedQueue()  # type: ignore[assignment]
    outcome: list[Any] = []

    def producer() -> None:
        try:
            outcome.append(b.put([make_record(1)]))
        except StorageError as e:
            outcome.append(e)

    t = threading.Thread(target=producer, daemon=True)
    t.start()
    assert entered.wait(10)
    closer = threading.Thread(target=b.close, daemon=True)
    closer.start()
    closer.join(0.3)  # close may (and with the fix, does) wait for the producer here
    gate.set()
    t.join(10)
    closer.join(10)
    assert not t.is_alive(), "put hangs forever: its op was queued behind the writer's stop"
    assert not closer.is_alive()
    assert outcome == [buffer_mod.PutReport(inserted=1, duplicates=0)]  # queued before stop
    with pytest.raises(StorageError, match="closed"):
        b.put([make_record(2)])
