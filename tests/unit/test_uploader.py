"""agent.uploader: batching, the upload loop against agent.testing.FakeHub, ledger
reconciliation, and the `sync --once` command.

Real SQLite buffer in tmp_path, the hub in memory (httpx.MockTransport), one FakeClock
shared by buffer, uploader, signer and hub; `sleep` advances it, so nothing here
really sleeps.
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from agent import cli, wire
from agent.buffer import Buffer, LeasedRecord, State
from agent.config import HubSettings
from agent.keys import init_key
from agent.record import BlobRef, Record, Service
from agent.testing import FakeClock, FakeHub
from agent.uploader import HubClient, SigningAuth, Uploader
from agent.uploader.batching import BatchItem, body_size, form_batch, form_batches, uuid7
from agent.uploader.reconcile import days_to_check, reconcile
from agent.uploader.uploader import heartbeat_body
from tests.factories import NODE_ID, make_record, make_records

KEY = Ed25519PrivateKey.generate()
DAY = 86400.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def buf(tmp_path: Path, clock: FakeClock) -> Iterator[Buffer]:
    b = Buffer.open(tmp_path / "data", data_key=None, clock=clock)
    yield b
    b.close()


@pytest.fixture
def hub(clock: FakeClock) -> FakeHub:
    return FakeHub(NODE_ID, KEY.public_key(), clock=clock)


def make_uploader(
    buf: Buffer,
    hub: FakeHub,
    clock: FakeClock,
    *,
    handler: Callable[[httpx.Request], httpx.Response] | None = None,
    **kw: Any,
) -> Uploader:
    client = HubClient(
        HubSettings(url="https://hub.test/"),
        SigningAuth(KEY, NODE_ID, clock=clock),
        node_id=NODE_ID,
        transport=httpx.MockTransport(handler or hub),
        clock=clock,
        sleep=clock.sleep,
    )
    kw.setdefault("rand", lambda: 0.5)
    return Uploader(buf, client, node_id=NODE_ID, clock=clock, sleep=clock.sleep, **kw)


def states(buf: Buffer, records: list[Record]) -> list[State | None]:
    return [buf.state_of(r.id) for r in records]


def items_of(records: list[Record]) -> list[BatchItem]:
    return [
        BatchItem.from_leased(LeasedRecord(r.id, r.service.value, 0, 0, r.to_json()))
        for r in records
    ]


# --- batching ------------------------------------------------------------------------------


def test_batches_respect_the_record_limit_and_keep_order(clock: FakeClock) -> None:
    records = make_records(0, 23)
    batches = form_batches(
        items_of(records), node_id=NODE_ID, max_records=5, max_bytes=10**9, now=clock()
    )
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert [i for b in batches for i in b.ids] == [r.id for r in records]


def test_batches_respect_the_byte_limit(clock: FakeClock) -> None:
    records = make_records(0, 20, body_size=500)
    limit = 3 * len(records[0].to_json()) + 400
    batches = form_batches(
        items_of(records), node_id=NODE_ID, max_records=500, max_bytes=limit, now=clock()
    )
    assert len(batches) > 1
    for b in batches:
        assert b.size == len(b.body()) <= limit
        assert b.size == body_size(b.items, node_id=NODE_ID)
    assert [i for b in batches for i in b.ids] == [r.id for r in records]


def test_a_record_over_the_byte_limit_travels_alone(clock: FakeClock) -> None:
    records = [make_record(0), make_record(1, body_size=5000), make_record(2)]
    batches = form_batches(
        items_of(records), node_id=NODE_ID, max_records=500, max_bytes=3000, now=clock()
    )
    assert [b.ids for b in batches] == [[records[0].id], [records[1].id], [records[2].id]]


def test_the_body_splices_each_envelope_byte_for_byte(clock: FakeClock) -> None:
    records = [*make_records(0, 4), make_record(9, service=Service.IMAGING_STUDY)]
    batch = form_batch(items_of(records), node_id=NODE_ID, now=clock())
    body = batch.body()
    doc = json.loads(body)
    assert list(doc) == ["sepas_batch", "batch_id", "node_id", "created_at", "records"]
    assert doc["sepas_batch"] == 1
    assert doc["batch_id"] == batch.batch_id
    assert doc["node_id"] == NODE_ID
    assert doc["created_at"] == "2025-06-15T15:06:40Z"
    assert doc["records"] == [json.loads(json.dumps(r.to_wire())) for r in records]
    joined = b",".join(r.to_json() for r in records)
    assert b'"records":[' + joined + b"]}" in body  # spliced, not re-serialised


def test_the_same_batch_always_has_the_same_bytes(clock: FakeClock) -> None:
    batch = form_batch(items_of(make_records(0, 3)), node_id=NODE_ID, now=clock())
    again = dataclasses.replace(batch)
    assert again.content == batch.content
    assert batch.content[4:8] == b"\x00\x00\x00\x00"  # gzip mtime 0: no time in the bytes


def test_split_gives_two_ordered_halves_under_new_ids(clock: FakeClock) -> None:
    records = make_records(0, 7)
    batch = form_batch(items_of(records), node_id=NODE_ID, now=clock())
    a, b = batch.split(now=clock())
    assert a.ids + b.ids == batch.ids
    assert (len(a), len(b)) == (3, 4)
    assert len({batch.batch_id, a.batch_id, b.batch_id}) == 3
    with pytest.raises(ValueError, match="single-record"):
        form_batch(items_of(records[:1]), node_id=NODE_ID, now=clock()).split(now=clock())


def test_batch_ids_are_uuid7_ordered_by_time() -> None:
    import uuid

    ids = [uuid7(1_750_000_000.0 + k) for k in range(5)]
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert all(uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    assert ids == sorted(ids)
    assert uuid7(1.0) != uuid7(1.0)


def test_blobs_listed_by_a_record_are_read_from_its_envelope(buf: Buffer) -> None:
    ref = BlobRef(sha256="cd" * 32, media_type="application/dicom", size=3)
    rec = dataclasses.replace(make_record(0, service=Service.IMAGING_STUDY), blobs=(ref,))
    assert items_of([rec])[0].blobs == (ref,)
    assert items_of([make_record(1)])[0].blobs == ()


# --- the upload loop -------------------------------------------------------------------------


def test_happy_path_sends_everything_and_records_the_ledger_day(
    buf: Buffer, hub: FakeHub, clock: FakeClock
) -> None:
    records = make_records(0, 25)
    buf.put(records)
    report = make_uploader(buf, hub, clock, batch_max_records=10).sync_once()
    assert (report.sent, report.duplicate, report.rejected, report.retried) == (25, 0, 0, 0)
    assert report.hub_reached
    assert report.stopped == "drained"
    assert report.batches == 3
    assert states(buf, records) == [State.SENT] * 25
    assert set(hub.records) == {r.id for r in records}
    assert buf.ledger(["2025-06-15"]) == {
        "2025-06-15": (25, wire.day_digest(r.id for r in records))
    }
    assert buf.sent_since(clock() - 3600) == 25
    sync = buf.sync_state()
    assert sync["last_success_at"] == clock()
    assert sync["last_run"]["sent"] == 25
    assert sync["backoff_until"] is None


def test_records_go_in_intake_order(buf: Buffer, hub: FakeHub, clock: FakeClock) -> None:
    records = make_records(0, 12)
    for r in records:
        buf.put([r])
    make_uploader(buf, hub, clock, batch_max_records=5).sync_once()
    sent = [i for c in hub.batch_calls() for i in c.record_ids]
    assert sent == [r.id for r in records]


def test_400_bisection_isolates_the_one_bad_record_and_sends_the_rest(
    buf: Buffer, hub: FakeHub, clock: FakeClock
) -> None:
    records = make_records(0, 32)
    bad = records[19].id
    hub.malformed = lambda rec: rec["id"] == bad
    buf.put(records)
    report = make_uploader(buf, hub, clock, batch_max_records=32).sync_once()
    assert buf.state_of(bad) is State.DEAD
    assert [s for r, s in zip(records, states(buf, records), strict=True) if r.id != bad] == [
        State.SENT
    ] * 31
    assert (report.sent, report.rejected) == (31, 1)
    (dead,) = buf.dead()
    assert dead.id == bad
    assert "400" in dead.reason
    # Bisection, not one request per record: about 2 per halving.
    assert len(hub.batch_calls()) <= 2 * math.ceil(math.log2(32)) + 1


def test_413_splits_until_the_hub_takes_the_batches(buf: Buffer, clock: FakeClock) -> None:
    hub = FakeHub(NODE_ID, KEY.public_key(), clock=clock, max_records=4)
    records = make_records(0, 10)
    buf.put(records)
    report = make_uploader(buf, hub, clock, batch_max_records=10).sync_once()
    assert report.sent == 10
    assert report.rejected == 0
    assert states(buf, records) == [State.SENT] * 10
    statuses = [c.status for c in hub.batch_calls()]
    assert statuses[0] == 413
    assert all(len(c.record_ids) <= 4 for c in hub.batch_calls() if c.status == 200)


def test_401_keeps_records_pending_backs_off_long_and_raises_an_alarm(
    buf: Buffer, hub: FakeHub, clock: FakeClock
) -> None:
    records = make_records(0, 5)
    buf.put(records)
    hub.script(401, problem_type="signature-mismatch")
    up = make_uploader(buf, hub, clock)
    report = up.sync_once()
    assert report.auth_refused
    assert not report.hub_reached
    assert report.stopped == "refused"
    assert states(buf, records) == [State.PENDING] * 5
    assert report.backoff_until is not None
    assert report.backoff_until - clock() >= 300
    sync = buf.sync_state()
    assert sync["alarm"]["status"] == 401
    assert sync["alarm"]["problem_type"] == wire.problem_type("signature-mismatch")
    assert sync["last_error"]["problem_type"] == wire.problem_type("signature-mismatch")
    assert [c.path for c in hub.calls] == ["/v1/batches"]  # no heartbeat to a refusing hub
    # The next scheduled run respects the backoff and sends nothing.
    clock.advance(60)
    again = up.sync_once()
    assert again.stopped == "backing-off"
    assert len(hub.calls) == 1
    # After it, the records go and the alarm clears.
    clock.advance(600)
    assert up.sync_once().sent == 5
    assert buf.sync_state()["alarm"] is None


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds_is_honoured_in_process_for_the_same_batch(
    status: int, buf: Buffer, hub: FakeHub, clock: FakeClock
) -> None:
    records = make_records(0, 3)
    buf.put(records)
    hub.script(status, retry_after="7")
    report = make_uploader(buf, hub, clock).sync_once(deadline=clock() + 100)
    assert clock.sleeps == [7.0]
    first, second = hub.batch_calls()
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    assert first.content == second.content
    assert first.nonce != second.nonce
    assert report.sent == 3
    assert states(buf, records) == [State.SENT] * 3


def test_the_lease_is_held_through_an_in_process_wait(
    buf: Buffer, hub: FakeHub, clock: FakeClock
) -> None:
    records = make_records(0, 3)
    buf.put(records)
    hub.script(429, retry_after="50")
    up = make_uploader(buf, hub, clock, lease_secs=20)
    stolen: list[object] = []

    def sleep_while_another_uploader_looks(secs: float) -> None:
        clock.sleep(secs)  # 50 s: well past lease_secs
        stolen.append(buf.lease(max_records=10, max_bytes=10**9, lease_secs=10))

    up._sleep = sleep_while_another_uploader_looks
    report = up.sync_once(deadline=clock() + 100)
    assert clock.sleeps == [50.0]
    assert stolen == [None]  # nobody else could take the records meanwhile
    assert report.sent == 3


def test_retry_after_http_date_is_honoured(buf: Buffer, hub: FakeHub, clock: FakeClock) -> None:
    buf.put(make_records(0, 3))
    hub.script(503, retry_after=email.utils.formatdate(clock() + 30, usegmt=True))
    report = make_uploader(buf, hub, clock).sync_once(deadline=clock() + 100)
    assert len(clock.sleeps) == 1
    assert clock.sleeps[0] == pytest.approx(30, abs=1)
    assert report.sent == 3


def test_retry_after_past_the_deadline_puts_the_batch_back_until_then(
    buf: Buffer, hub: FakeHub, clock: FakeClock
) -> None:
    records = make_records(0, 3)
    buf.put(records)
    hub.script(429, retry_after="40")
    up = make_uploader(buf, hub, clock)
    t0 = clock()
    report = up.sync_once(deadline=t0 + 10)
    assert clock.sleeps == []
    assert report.stopped == "throttled"
    assert report.retried == 3
    assert report.backoff_until == pytest.approx(t0 + 40)
    assert states(buf, records) == [State.PENDING] * 3
    clock.advance(39)
    assert up.sync_once().stopped == "backing-off"
    assert buf.lease(max_records=10, max_bytes=10**9, lease_secs=60) is None  # not due yet
    clock.advance(2)
    assert up.sync_once().sent == 3


@pytest.mark.parametrize(
    "script",
    [
        {"status": 500},
        {"status": 502},
        {"exc": lambda r: httpx.ConnectError("refused", request=r)},
        {"exc": lambda r: httpx.ReadTimeout("timed out", request=r)},
    ],
)
def test_5xx_and_network_errors_retry_later_with_jittered_backoff_and_lose_nothing(
    script: dict[str, Any], buf: Buffer, hub: FakeHub, clock: FakeClock
) -> None:
    records = make_records(0, 4)
    buf.put(records)
    hub.script(times=2, **script)
    up = make_uploader(buf, hub, clock, rand=lambda: 0.5, backoff_max_secs=300)
    first = up.sync_once()
    assert first.stopped == "unreachable"
    assert not first.hub_reached
    assert first.retried == 4
    assert states(buf, records) == [State.PENDING] * 4
    assert first.backoff_until == pytest.approx(clock() + 0.5 * 1)  # full jitter, step 0
    clock.advance(1)
    second = up.sync_once()
    assert second.backoff_until == pytest.approx(clock() + 0.5 * 2)  # step 1: doubled
    assert buf.sync_state()["failures"] == 2
    clock.advance(2)
    third = up.sync_once()
    assert third.sent == 4
    assert states(buf, records) == [State.SENT] * 4
    assert buf.sync_state()["failures"] == 0


def test_409_is_retried_as_the_same_batch(buf: Buffer, hub: FakeHub, clock: FakeClock) -> None:
    buf.put(make_records(0, 3))
    hub.script(409)
    report = make_uploader(buf, hub, clock).sync_once()
    first, second = hub.batch_calls()
    assert (first.status, second.status) == (409, 200)
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    assert first.content == second.content
    assert len(clock.sleeps) == 1
    assert 1.0 <= clock.sleeps[0] < 3.0
    assert report.sent == 3


def test_422_reforms_the_batch_under_a_new_batch_id(
    buf: Buffer, hub: FakeHub, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    records = make_records(0, 3)
    buf.put(records)
    hub.script(422)
    report = make_uploader(buf, hub, clock).sync_once()
    first, second = hub.batch_calls()
    assert first.headers["idempotency-key"] != second.headers["idempotency-key"]
    assert first.record_ids == second.record_ids
    assert json.loads(second.body)["batch_id"] == second.headers["idempotency-key"]
    assert report.sent == 3
    assert any(getattr(r, "event", "") == "upload.idempotency_conflict" for r in caplog.records)


def test_a_lost_answer_then_a_new_batch_counts_duplicates_as_sent(
    buf: Buffer, hub: FakeHub, clock: FakeClock
) -> None:
    records = make_records(0, 4)
    buf.put(records)
    hub.script(exc=lambda r: httpx.ReadTimeout("timed out", request=r), after_commit=True)
    up = make_uploader(buf, hub, clock)
    assert up.sync_once().retried == 4  # the hub has them; we do not know it yet
    assert len(hub.records) == 4
    clock.advance(5)
    report = up.sync_once()
    assert (report.sent, report.duplicate) == (0, 4)
    assert states(buf, records) == [State.SENT] * 4
    assert buf.ledger(["2025-06-15"])["2025-06-15"][0] == 4


def test_a_rejected_record_goes_to_dead_letter_with_the_hubs_error(
    buf: Buffer, hub: FakeHub, clock: FakeClock
) -> None:
    records = make_records(0, 5)
    bad = records[2].id
    hub.reject = lambda rec: "body: Observation.status missing" if rec["id"] == bad else None
    buf.put(records)
    report = make_uploader(buf, hub, clock).sync_once()
    assert (report.sent, report.rejected) == (4, 1)
    (dead,) = buf.dead()
    assert dead.id == bad
    assert dead.reason == "hub: body: Observation.status missing"


def test_blobs_are_skipped_when_present_and_put_otherwise_before_the_record(
    buf: Buffer, hub: FakeHub, clock: FakeClock
) -> None:
    have, need = b"instance already at the hub", b"instance the hub lacks" * 100
    refs = []
    for data in (have, need):
        sha, size = buf.add_blob(data, media_type="application/dicom")
        refs.append(BlobRef(sha256=sha, media_type="application/dicom", size=size))
    hub.blobs[refs[0].sha256] = have
    rec = dataclasses.replace(make_record(0, service=Service.IMAGING_STUDY), blobs=tuple(refs))
    buf.put([rec])
    report = make_uploader(buf, hub, clock).sync_once()
    assert (report.blobs_present, report.blobs_uploaded, report.sent) == (1, 1, 1)
    assert [(c.method, c.path.rsplit("/", 1)[-1][:8]) for c in hub.calls[:4]] == [
        ("HEAD", refs[0].sha256[:8]),
        ("HEAD", refs[1].sha256[:8]),
        ("PUT", refs[1].sha256[:8]),
        ("POST", "batches"),
    ]
    assert hub.blobs[refs[1].sha256] == need
    assert buf.blob_info(refs[1].sha256)[2] is not None  # marked uploaded


def test_a_record_whose_blob_is_missing_locally_is_dead_lettered_not_sent(
    buf: Buffer, hub: FakeHub, clock: FakeClock
) -> None:
    ghost = BlobRef(sha256="ef" * 32, media_type="application/dicom", size=10)
    rec = dataclasses.replace(make_record(0, service=Service.IMAGING_STUDY), blobs=(ghost,))
    ok = make_record(1)
    buf.put([ok, rec])
    report = make_uploader(buf, hub, clock).sync_once()
    assert buf.state_of(rec.id) is State.DEAD
    assert buf.state_of(ok.id) is State.SENT
    assert report.rejected == 1
    assert "missing" in buf.dead()[0].reason
    assert rec.id not in hub.records


def test_clinical_records_go_before_a_backlog_of_imaging_studies(
    buf: Buffer, hub: FakeHub, clock: FakeClock
) -> None:
    imaging = make_records(0, 20, service=Service.IMAGING_STUDY, adapter="pacs")
    clinical = make_records(100, 5)
    buf.put(imaging)
    buf.put(clinical)
    make_uploader(buf, hub, clock, batch_max_records=5).sync_once()
    calls = hub.batch_calls()
    assert calls[0].record_ids == [r.id for r in clinical]
    assert [i for c in calls[1:] for i in c.record_ids] == [r.id for r in imaging]


def test_a_passed_deadline_starts_no_upload(buf: Buffer, hub: FakeHub, clock: FakeClock) -> None:
    records = make_records(0, 3)
    buf.put(records)
    report = make_uploader(buf, hub, clock).sync_once(deadline=clock())
    assert report.stopped == "deadline"
    assert hub.calls == []
    assert states(buf, records) == [State.PENDING] * 3


def test_the_heartbeat_carries_protocol_fields_and_its_failure_is_not_fatal(
    buf: Buffer, hub: FakeHub, clock: FakeClock
) -> None:
    buf.put(make_records(0, 3))
    buf.quarantine(b"garbage", adapter="lis", reason="unparseable")
    up = make_uploader(
        buf,
        hub,
        clock,
        adapters=lambda: [{"name": "lis", "kind": "hl7-mllp", "last_ok": None}],
    )
    up.sync_once()
    (beat,) = hub.heartbeats
    assert set(beat) == {
        "node_id",
        "version",
        "pending",
        "oldest_pending_age_s",
        "dead",
        "quarantined",
        "buffer_bytes",
        "clock_skew_s",
        "adapters",
    }
    assert (beat["node_id"], beat["pending"], beat["dead"], beat["quarantined"]) == (
        NODE_ID,
        0,
        0,
        1,
    )
    assert beat["oldest_pending_age_s"] is None
    assert beat["adapters"] == [
        {"name": "lis", "kind": "hl7-mllp", "last_ok": None, "last_error": None}
    ]
    hub.script(500, path="/v1/nodes/")
    buf.put(make_records(10, 2))
    report = up.sync_once()
    assert report.sent == 2
    assert not report.heartbeat_sent


def test_heartbeat_body_counts_pending_and_age(buf: Buffer, clock: FakeClock) -> None:
    buf.put(make_records(0, 4))
    clock.advance(90)
    body = heartbeat_body(
        buf.stats(), node_id=NODE_ID, version="9", now=clock(), clock_skew_s=1.5, siam_id="77"
    )
    assert body["pending"] == 4
    assert body["oldest_pending_age_s"] == 90.0
    assert body["clock_skew_s"] == 1.5
    assert body["siam_id"] == "77"
    assert isinstance(body["buffer_bytes"], int)
    assert body["buffer_bytes"] > 0


def test_logs_carry_no_patient_data(
    buf: Buffer, hub: FakeHub, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.factories import national_code, patient_name

    records = make_records(0, 6)
    hub.reject = lambda rec: "body: bad" if rec["id"] == records[1].id else None
    hub.malformed = lambda rec: rec["id"] == records[4].id
    buf.put(records)
    with caplog.at_level("DEBUG"):
        make_uploader(buf, hub, clock).sync_once()
    text = "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
    for i in range(6):
        assert national_code(i) not in text
        assert patient_name(i) not in text


# --- reconciliation ------------------------------------------------------------------------


def test_days_to_check_end_yesterday_and_respect_the_limits() -> None:
    now = 1_750_000_000.0  # 2025-06-15
    assert days_to_check(now, days=3, retention_days=30) == [
        "2025-06-12",
        "2025-06-13",
        "2025-06-14",
    ]
    assert days_to_check(now, days=1, retention_days=30, include_today=True) == ["2025-06-15"]
    assert len(days_to_check(now, days=500, retention_days=400)) == 62
    assert len(days_to_check(now, days=60, retention_days=10)) == 9


def test_reconcile_requeues_exactly_the_day_that_differs(
    buf: Buffer, hub: FakeHub, clock: FakeClock
) -> None:
    up = make_uploader(buf, hub, clock, heartbeat=False)
    day1, day2 = make_records(0, 5), make_records(10, 4)
    buf.put(day1)
    up.sync_once()
    clock.advance(DAY)
    buf.put(day2)
    up.sync_once()
    clock.advance(DAY)
    hub.forget([day1[3].id])  # the hub lost one record of day 1
    report = reconcile(buf, up.client, days=7, retention_days=30, clock=clock)  # type: ignore[arg-type]
    assert [(d.day, d.ours, d.hub, d.requeued) for d in report.differing] == [
        ("2025-06-15", 5, 4, 5)
    ]
    assert states(buf, day1) == [State.PENDING] * 5
    assert states(buf, day2) == [State.SENT] * 4
    rec_state = buf.sync_state()["reconcile"]
    assert rec_state["requeued"] == 5
    assert rec_state["days_checked"] == 7
    again = up.sync_once()
    assert (again.sent, again.duplicate) == (1, 4)
    # The lost record now counts on today at both ends; day 1 agrees again.
    assert reconcile(buf, up.client, days=7, retention_days=30, clock=clock).differing == ()  # type: ignore[arg-type]


def test_a_difference_resending_cannot_fix_is_not_requeued_forever(
    buf: Buffer, hub: FakeHub, clock: FakeClock
) -> None:
    up = make_uploader(buf, hub, clock, heartbeat=False)
    records = make_records(0, 3)
    buf.put(records)
    up.sync_once()
    clock.advance(DAY)
    hub.records[records[0].id].day = "2025-06-13"  # the hub counts it on another day
    first = reconcile(buf, up.client, days=7, retention_days=30, clock=clock)  # type: ignore[arg-type]
    assert first.requeued == 3
    assert up.sync_once().duplicate == 3
    second = reconcile(buf, up.client, days=7, retention_days=30, clock=clock)  # type: ignore[arg-type]
    assert second.requeued == 0
    assert {d.day for d in second.differing} == {"2025-06-13", "2025-06-15"}
    assert all(d.unresolved for d in second.differing if d.day == "2025-06-15")
    assert states(buf, records) == [State.SENT] * 3


# --- the CLI ---------------------------------------------------------------------------------


def write_config(tmp_path: Path, url: str = "https://hub.test/") -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[node]\nid = "{NODE_ID}"\ndata_dir = "{tmp_path / "data"}"\n\n[hub]\nurl = "{url}"\n',
        encoding="utf-8",
    )
    return cfg


@pytest.fixture
def cli_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, FakeHub]:
    """A config, a node key, three records buffered, and a FakeHub behind the CLI."""
    cfg_path = write_config(tmp_path)
    key = init_key(tmp_path / "data" / "node.key")
    _, cfg = cli._load(cfg_path)
    b = cli.open_buffer(cfg)
    b.put(make_records(0, 3))
    b.close()
    hub = FakeHub(NODE_ID, key.public_key())
    monkeypatch.setattr(cli, "_hub_transport", hub.transport())
    return cfg_path, hub


def test_sync_once_cli_uploads_and_status_shows_it(cli_node: tuple[Path, FakeHub]) -> None:
    cfg_path, hub = cli_node
    runner = CliRunner()
    res = runner.invoke(cli.app, ["sync", "--once", "-c", str(cfg_path), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["sync"]["sent"] == 3
    assert data["sync"]["hub_reached"]
    assert data["reconcile"]["days_checked"] == 7
    assert len(hub.records) == 3
    assert len(hub.heartbeats) == 1
    res = runner.invoke(cli.app, ["status", "-c", str(cfg_path), "--json"])
    assert res.exit_code == 0, res.output
    up = json.loads(res.stdout)["uploads"]
    assert up["sent_last_hour"] == 3
    assert up["sent_last_day"] == 3
    assert up["last_success_at"] is not None
    assert up["alarm"] is None
    assert up["reconcile"]["days_checked"] == 7
    res = runner.invoke(cli.app, ["status", "-c", str(cfg_path)])
    assert "last successful sync" in res.stdout
    assert "3 in the last hour" in res.stdout


def test_sync_once_cli_exits_1_when_the_hub_refuses_the_signature(
    cli_node: tuple[Path, FakeHub],
) -> None:
    cfg_path, hub = cli_node
    hub.script(401, problem_type="unknown-key")
    runner = CliRunner()
    res = runner.invoke(cli.app, ["sync", "--once", "-c", str(cfg_path)])
    assert res.exit_code == 1, res.output
    assert "hub not reached" in res.stdout
    res = runner.invoke(cli.app, ["status", "-c", str(cfg_path), "--json"])
    data = json.loads(res.stdout)
    assert data["uploads"]["alarm"]["problem_type"] == wire.problem_type("unknown-key")
    assert data["totals"]["pending"] == 3
    res = runner.invoke(cli.app, ["status", "-c", str(cfg_path), "--check"])
    assert res.exit_code == 2
    assert "hub refuses this node" in res.stdout


def test_sync_once_cli_exits_1_when_the_hub_is_unreachable(
    cli_node: tuple[Path, FakeHub],
) -> None:
    cfg_path, hub = cli_node
    hub.script(exc=lambda r: httpx.ConnectError("refused", request=r), path="/", times=10)
    res = CliRunner().invoke(cli.app, ["sync", "--once", "-c", str(cfg_path), "--json"])
    assert res.exit_code == 1, res.output
    assert json.loads(res.stdout)["sync"]["stopped"] == "unreachable"


def test_sync_cli_exits_2_on_a_config_error_and_without_once(tmp_path: Path) -> None:
    runner = CliRunner()
    cfg = write_config(tmp_path, url="http://hub.example/")
    assert runner.invoke(cli.app, ["sync", "--once", "-c", str(cfg)]).exit_code == 2
    assert runner.invoke(cli.app, ["sync", "-c", str(cfg)]).exit_code == 2


def test_a_node_that_runs_out_of_time_still_reports_its_backlog_in_a_heartbeat(
    buf: Buffer, hub: FakeHub, clock: FakeClock
) -> None:
    # One batch fits in the run; the rest stays pending. The hub must still hear
    # how far behind the node is.
    buf.put(make_records(0, 30))
    up = make_uploader(buf, hub, clock, batch_max_records=10)
    real_upload = up._upload_lease

    def upload_then_run_out(lease, report, deadline):
        ok = real_upload(lease, report, deadline)
        clock.advance(3600)
        return ok

    up._upload_lease = upload_then_run_out  # type: ignore[method-assign]
    report = up.sync_once(deadline=clock() + 60)
    assert report.stopped == "deadline"
    assert report.heartbeat_sent
    assert hub.heartbeats[-1]["pending"] == 20
