"""Model check of agent.buffer: hypothesis drives the Buffer and a plain dict through
the same puts, leases, settlements, clock jumps, operator actions and reopens, and
after every step the two must agree on every record's state and on the counts."""

from __future__ import annotations

import sqlite3
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
)

from agent.buffer import DB_NAME, Buffer, Lease, PutReport, State
from agent.record import Record, Service
from tests.factories import FakeClock, make_record

KEY = bytes(range(32))
N_IDS = 16
LEASE_SECS = 60.0
RETENTION_DAYS = 1
SERVICES = (
    Service.LAB_RESULT,
    Service.IMAGING_STUDY,
    Service.E_PRESCRIPTION,
    Service.PATHOLOGY_REPORT,
)
_RECORDS: dict[int, Record] = {}
_BY_ID: dict[str, Record] = {}


def rec(i: int) -> Record:
    """Record ``i`` always has the same id, service and bytes (sizes vary with ``i``)."""
    if i not in _RECORDS:
        r = make_record(i, service=SERVICES[i % len(SERVICES)], body_size=(i % 3) * 700)
        _RECORDS[i] = _BY_ID[r.id] = r
    return _RECORDS[i]


@dataclass
class Row:
    """What the model knows of one record."""

    service: str
    lane: int
    size: int
    seq: int
    state: State = State.PENDING
    next_attempt_at: float = 0.0
    attempts: int = 0
    lease_id: str | None = None
    lease_expires_at: float | None = None
    settled_at: float | None = None


class BufferModel(RuleBasedStateMachine):
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory(prefix="buffer-model-")
        self.dir = Path(self._tmp.name)
        self.clock = FakeClock()
        self.buf = self._open()
        self.model: dict[str, Row] = {}
        self.next_seq = 0

    def _open(self) -> Buffer:
        return Buffer.open(self.dir, data_key=KEY, clock=self.clock, retention_days=RETENTION_DAYS)

    def teardown(self) -> None:
        self.buf.close()
        self._tmp.cleanup()

    # -- helpers -----------------------------------------------------------------------

    def _owned(self, lease: Lease, rid: str) -> bool:
        row = self.model.get(rid)
        return row is not None and row.state is State.INFLIGHT and row.lease_id == lease.id

    def _clear_lease(self, row: Row) -> None:
        row.lease_id = None
        row.lease_expires_at = None

    # -- intake ------------------------------------------------------------------------

    @initialize(ids=st.lists(st.integers(0, N_IDS - 1), max_size=6))
    def start_with(self, ids: list[int]) -> None:
        self.put(ids)

    @rule(ids=st.lists(st.integers(0, N_IDS - 1), max_size=6))
    def put(self, ids: list[int]) -> None:
        new: list[str] = []
        for i in ids:
            r = rec(i)
            if r.id not in self.model and r.id not in new:
                new.append(r.id)
                self.model[r.id] = Row(
                    service=r.service.value,
                    lane=r.service.lane,
                    size=len(r.to_json()),
                    seq=self.next_seq,
                )
                self.next_seq += 1
        report = self.buf.put([rec(i) for i in ids])
        assert report == PutReport(inserted=len(new), duplicates=len(ids) - len(new))

    # -- upload side -------------------------------------------------------------------

    @rule(
        target=leases,
        max_records=st.integers(1, 8),
        max_bytes=st.sampled_from([1, 2500, 6000, 10**9]),
    )
    def lease(self, max_records: int, max_bytes: int) -> object:
        now = self.clock.now
        for row in self.model.values():
            if row.state is State.INFLIGHT and row.lease_expires_at <= now:  # type: ignore[operator]
                row.state = State.PENDING
                self._clear_lease(row)
        due = sorted(
            (
                (row.lane, row.seq, rid)
                for rid, row in self.model.items()
                if row.state is State.PENDING and row.next_attempt_at <= now
            ),
        )[:max_records]
        want: list[str] = []
        total = 0
        for _, _, rid in due:
            size = self.model[rid].size
            if want and total + size > max_bytes:
                break
            want.append(rid)
            total += size
        got = self.buf.lease(max_records=max_records, max_bytes=max_bytes, lease_secs=LEASE_SECS)
        if not want:
            assert got is None
            return multiple()
        assert got is not None
        assert got.ids == want
        assert got.expires_at == now + LEASE_SECS
        for item in got.items:
            row = self.model[item.id]
            assert (item.service, item.size, item.attempts) == (row.service, row.size, row.attempts)
            assert item.envelope == _BY_ID[item.id].to_json()
            row.state = State.INFLIGHT
            row.lease_id = got.id
            row.lease_expires_at = got.expires_at
        return got

    @rule(lease=leases, data=st.data())
    def mark_sent(self, lease: Lease, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(lease.ids), unique=True, min_size=1))
        expected = 0
        for rid in ids:
            row = self.model.get(rid)
            if row is not None and row.state in (State.PENDING, State.INFLIGHT):
                row.state = State.SENT
                row.settled_at = self.clock.now
                self._clear_lease(row)
                expected += 1
        assert self.buf.mark_sent(lease, ids) == expected

    @rule(lease=leases, data=st.data(), delay=st.sampled_from([0.0, 10.0, 100.0]))
    def retry_later(self, lease: Lease, data: st.DataObject, delay: float) -> None:
        ids = data.draw(st.lists(st.sampled_from(lease.ids), unique=True, min_size=1))
        not_before = self.clock.now + delay
        expected = 0
        for rid in ids:
            if self._owned(lease, rid):
                row = self.model[rid]
                row.state = State.PENDING
                row.next_attempt_at = not_before
                row.attempts += 1
                self._clear_lease(row)
                expected += 1
        assert self.buf.retry_later(lease, ids, not_before=not_before, reason="503") == expected

    @rule(lease=leases, data=st.data())
    def dead_letter(self, lease: Lease, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(lease.ids), unique=True, min_size=1))
        expected = 0
        for rid in ids:
            if self._owned(lease, rid):
                row = self.model[rid]
                row.state = State.DEAD
                row.settled_at = self.clock.now
                self._clear_lease(row)
                expected += 1
        assert self.buf.dead_letter(lease, dict.fromkeys(ids, "rejected")) == expected

    @rule(lease=leases, data=st.data(), everything=st.booleans())
    def release(self, lease: Lease, data: st.DataObject, everything: bool) -> None:
        ids = (
            lease.ids
            if everything
            else data.draw(st.lists(st.sampled_from(lease.ids), unique=True, min_size=1))
        )
        expected = 0
        for rid in ids:
            if self._owned(lease, rid):
                row = self.model[rid]
                row.state = State.PENDING
                self._clear_lease(row)
                expected += 1
        assert self.buf.release(lease, None if everything else ids) == expected

    # -- time, operators, retention, restarts -------------------------------------------

    @rule(secs=st.sampled_from([1.0, 30.0, LEASE_SECS + 1, 200.0, RETENTION_DAYS * 86400.0]))
    def advance_clock(self, secs: float) -> None:
        self.clock.advance(secs)

    def _some_ids(self, data: st.DataObject) -> list[str]:
        """Mostly dead ones (what an operator picks), and any other id."""
        dead = [rid for rid, row in self.model.items() if row.state is State.DEAD]
        anything = [rec(i).id for i in range(N_IDS)]
        return data.draw(
            st.lists(st.sampled_from(dead * 3 + anything), unique=True, min_size=1, max_size=6)
        )

    @rule(data=st.data())
    def requeue_dead(self, data: st.DataObject) -> None:
        ids = self._some_ids(data)
        expected = 0
        for rid in ids:
            row = self.model.get(rid)
            if row is not None and row.state is State.DEAD:
                row.state = State.PENDING
                row.next_attempt_at = 0.0
                row.settled_at = None
                expected += 1
        assert self.buf.requeue_dead(ids) == expected

    @rule(data=st.data())
    def purge_dead(self, data: st.DataObject) -> None:
        ids = self._some_ids(data)
        gone = [rid for rid in ids if rid in self.model and self.model[rid].state is State.DEAD]
        for rid in gone:
            del self.model[rid]
        assert self.buf.purge_dead(ids) == len(gone)

    @rule()
    def prune(self) -> None:
        cutoff = self.clock.now - RETENTION_DAYS * 86400
        gone = [
            rid
            for rid, row in self.model.items()
            if row.state is State.SENT and row.settled_at < cutoff  # type: ignore[operator]
        ]
        for rid in gone:
            del self.model[rid]
        assert self.buf.prune().records == len(gone)

    @rule()
    def reopen(self) -> None:
        self.buf.close()
        self.buf = self._open()

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def every_record_is_in_the_models_state(self) -> None:
        for rid, row in self.model.items():
            assert self.buf.state_of(rid) is row.state, rid

    @invariant()
    def nothing_lost_nothing_duplicated_every_column_as_modelled(self) -> None:
        conn = sqlite3.connect(self.dir / DB_NAME)
        try:
            rows = conn.execute(
                "SELECT id, state, attempts, next_attempt_at, lease_id, lease_expires_at, "
                "settled_at FROM records"
            ).fetchall()
        finally:
            conn.close()
        assert Counter(r[0] for r in rows) == Counter(self.model.keys())
        stored = {r[0]: r[1:] for r in rows}
        for rid, m in self.model.items():
            want = (
                m.state.value,
                m.attempts,
                m.next_attempt_at,
                m.lease_id,
                m.lease_expires_at,
                m.settled_at,
            )
            assert stored[rid] == want, rid

    @invariant()
    def stats_count_what_the_model_counts(self) -> None:
        want = Counter((row.service, row.state.value) for row in self.model.values())
        assert self.buf.stats().counts == dict(want)


BufferModel.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBufferModel = BufferModel.TestCase
