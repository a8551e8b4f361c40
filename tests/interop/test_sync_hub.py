"""The real agent uploader against the real hub, over HTTP on 127.0.0.1.

tests/interop/test_hub_http.py refuses hand-made requests at the hub, and
tests/unit/test_uploader.py drives the uploader against agent.testing.FakeHub. Here
neither side is a fake: `agent.uploader.build` wires a node (a real Buffer in
tmp_path, HubClient over real sockets) and the hub runs under uvicorn
(tests/interop/sync_fixtures.py). Each test takes one row of PROTOCOL.md's status
table, or one promise of it, and checks both ends: what the hub's store holds (read
with SQL) and what the node's buffer and sync state say. Faults are made where they
happen in life: in the hub's store (`TapStore`), or between the signer and the
socket (`Tap`, a man in the middle).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import wire
from agent.buffer import Buffer, State
from agent.cli import uploads_data
from agent.errors import SignatureRefusedError, StorageError
from agent.keys import load_data_key, load_private_key
from agent.record import BlobRef, RawRef, Record, Service
from agent.uploader import Verdict, action_for
from agent.uploader.reconcile import reconcile
from agent.uploader.uploader import utc_text
from hub.store import IncomingRecord
from tests.factories import make_record, make_records
from tests.hubkit import OTHER_NODE, register
from tests.interop.sync_fixtures import (  # noqa: F401 - make_node/sync_hub: fixtures
    NODE,
    SyncHub,
    SyncNode,
    Tap,
    delete_stored_day,
    make_node_fixture,
    stored_envelopes,
    stored_ids,
    sync_hub_fixture,
    utc_today,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
HubFactory = Callable[..., SyncHub]
NodeFactory = Callable[..., SyncNode]


def slug(problem_type: str | None) -> str | None:
    return None if problem_type is None else problem_type.removeprefix(wire.PROBLEM_BASE)


def batch_ids(request: httpx.Request) -> list[str]:
    """Record ids a (gzip) batch request carries."""
    return [r["id"] for r in json.loads(gzip.decompress(request.content))["records"]]


def random_raw(i: int, size: int) -> RawRef:
    """Incompressible raw content (seeded): grows a batch on the wire, not only inflated."""
    return RawRef.of(random.Random(i).randbytes(size), "application/octet-stream")


def run_cli(exe: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEPAS_")}
    return subprocess.run(
        [str(BIN / exe), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
    )


# -- 200 ----------------------------------------------------------------------------------


def test_a_round_trip_delivers_every_record_once_byte_for_byte(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    hub = sync_hub()
    node = make_node(hub.url, hub.key, batch_max_records=7)
    records = make_records(0, 30)
    ids = node.put(records)

    report = node.uploader.sync_once()

    assert (report.sent, report.batches, report.stopped) == (30, 5, "drained")
    assert report.heartbeat_sent
    assert sorted(stored_ids(hub)) == sorted(ids)
    held = stored_envelopes(hub)
    assert all(held[r.id] == r.to_json() for r in records)  # spliced, never re-serialised
    assert node.state_counts(ids) == {"sent": 30}
    assert node.client.last_skew is not None
    assert abs(node.client.last_skew) <= 2
    assert node.client.node_view()["records_by_service"] == {"lab-result": 30}
    again = node.uploader.sync_once()
    assert (again.batches, again.sent) == (0, 0)
    assert len(hub.store.commits) == 5


def test_records_the_hub_already_holds_come_back_duplicate_and_count_as_delivered(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    hub = sync_hub()
    first = make_node(hub.url, hub.key)
    restored = make_node(hub.url, hub.key)  # the same node restored from an old backup
    ids = first.put(make_records(0, 12))
    restored.put(make_records(6, 12))  # 6..11 overlap
    assert first.uploader.sync_once().sent == 12

    report = restored.uploader.sync_once()

    assert (report.sent, report.duplicate) == (6, 6)
    assert restored.state_counts([r.id for r in make_records(6, 12)]) == {"sent": 12}
    assert sorted(stored_ids(hub)) == sorted({*ids, *(r.id for r in make_records(12, 6))})


# -- 400 / 415: split, isolate, dead-letter --------------------------------------------------


@pytest.mark.parametrize(
    ("tamper", "status", "problem"),
    [
        ("body", 400, "digest-mismatch"),  # a byte changed on the way
        ("encoding", 415, "unsupported-media-type"),  # Content-Encoding is not signed
    ],
)
def test_a_batch_refused_as_malformed_is_split_until_the_bad_record_is_alone_in_dead_letter(
    sync_hub: HubFactory, make_node: NodeFactory, tamper: str, status: int, problem: str
) -> None:
    hub = sync_hub()
    tap = Tap()
    node = make_node(hub.url, hub.key, transport=tap, batch_max_records=16)
    ids = node.put(make_records(0, 16))
    victim = ids[9]

    def man_in_the_middle(request: httpx.Request) -> httpx.Request | None:
        if request.url.path != "/v1/batches" or victim not in batch_ids(request):
            return None
        if tamper == "body":
            content = bytearray(request.content)
            content[len(content) // 2] ^= 0x01
            return httpx.Request(
                request.method, request.url, headers=request.headers, content=bytes(content)
            )
        request.headers["Content-Encoding"] = "br"
        return request

    tap.hook = man_in_the_middle
    report = node.uploader.sync_once()

    assert (report.sent, report.rejected) == (15, 1)
    assert sorted(stored_ids(hub)) == sorted(i for i in ids if i != victim)
    (dead,) = node.buffer.dead()
    assert dead.id == victim
    assert f"hub refused it with {status}" in dead.reason
    assert problem in dead.reason
    # 16 -> 8 -> 4 -> 2 -> 1: four refusals on the victim's path, then it is alone.
    assert [e.status for e in tap.batches()].count(status) == 5


# -- 401 / 403: keep the records, back off long, say why ------------------------------------


def _assert_held_with_alarm(
    node: SyncNode, report: Any, ids: Sequence[str], problem: str, now: float, *, sent: int = 0
) -> None:
    """``ids`` all still pending (none dead), the alarm names ``problem``, long backoff."""
    assert report.auth_refused
    assert report.stopped == "refused"
    assert report.sent == sent
    assert report.rejected == 0
    assert node.state_counts(ids) == {"pending": len(ids)}
    uploads = uploads_data(node.buffer.sync_state(), None, now)
    assert slug(uploads["alarm"]["problem_type"]) == problem
    assert uploads["alarm"]["status"] == 401
    assert report.backoff_until - now >= 300  # minutes, not seconds (PROTOCOL.md: 401)
    assert not report.heartbeat_sent


def test_a_node_whose_key_the_hub_does_not_know_keeps_its_records_and_shows_why(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    hub = sync_hub()
    wrong = Ed25519PrivateKey.generate()
    node = make_node(hub.url, wrong)
    ids = node.put(make_records(0, 8))

    report = node.uploader.sync_once()

    _assert_held_with_alarm(node, report, ids, "signature-mismatch", time.time())
    assert stored_ids(hub) == []
    # Backing off: a scheduled run does not try again before the time.
    assert node.uploader.sync_once().stopped == "backing-off"
    register(hub.store, NODE, wrong)  # the operator registers the node's key
    assert node.retry_now().sent == 8
    assert node.buffer.sync_state()["alarm"] is None


def test_a_node_id_the_hub_never_registered_is_refused_unknown_key(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    hub = sync_hub()
    key = Ed25519PrivateKey.generate()
    node = make_node(hub.url, key, node_id="FAC-0404")
    ids = node.put(make_records(0, 3))

    report = node.uploader.sync_once()

    _assert_held_with_alarm(node, report, ids, "unknown-key", time.time())
    register(hub.store, "FAC-0404", key)
    assert node.retry_now().sent == 3
    assert sorted(stored_ids(hub, "FAC-0404")) == sorted(ids)


def test_a_header_changed_after_signing_is_refused_and_nothing_is_stored(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    hub = sync_hub()
    tap = Tap()
    node = make_node(hub.url, hub.key, transport=tap)
    ids = node.put(make_records(0, 5))

    def retype(request: httpx.Request) -> None:
        if request.url.path == "/v1/batches":
            request.headers["Content-Type"] = "application/json; charset=utf-8"

    tap.hook = retype
    report = node.uploader.sync_once()

    _assert_held_with_alarm(node, report, ids, "signature-mismatch", time.time())
    assert stored_ids(hub) == []
    tap.hook = None
    assert node.retry_now().sent == 5


def test_a_node_revoked_mid_stream_keeps_what_is_left_until_it_is_registered_again(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    hub = sync_hub()
    node = make_node(hub.url, hub.key, batch_max_records=5)
    ids = node.put(make_records(0, 20))

    def revoke_after_second(key: str, records: Sequence[IncomingRecord]) -> None:
        if len(hub.store.commits) == 2:
            hub.store.revoke_node(NODE)

    hub.store.after_commit = revoke_after_second
    report = node.uploader.sync_once()

    _assert_held_with_alarm(node, report, ids[10:], "key-revoked", time.time(), sent=10)
    assert sorted(stored_ids(hub)) == sorted(ids[:10])
    hub.store.after_commit = None
    register(hub.store, NODE, hub.key)  # `sepas-hub nodes add` again
    assert node.retry_now().sent == 10
    assert sorted(stored_ids(hub)) == sorted(ids)


def test_a_node_clock_400_s_ahead_is_refused_and_its_skew_is_measured_from_date(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    hub = sync_hub()
    offset = [400.0]

    def node_clock() -> float:
        return time.time() + offset[0]

    node = make_node(hub.url, hub.key, clock=node_clock)
    ids = node.put(make_records(0, 4))

    report = node.uploader.sync_once()

    _assert_held_with_alarm(node, report, ids, "created-out-of-window", node_clock())
    assert node.client.last_skew is not None
    assert 397 <= node.client.last_skew <= 403
    assert 397 <= node.buffer.sync_state()["clock_skew_s"] <= 403
    offset[0] = 0.0  # chrony fixed the clock
    assert node.retry_now().sent == 4
    assert abs(node.buffer.sync_state()["clock_skew_s"]) <= 2


def test_a_captured_request_replayed_first_makes_the_node_s_own_refused_nonce_replayed(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    hub = sync_hub()
    tap = Tap()
    node = make_node(hub.url, hub.key, transport=tap)
    ids = node.put(make_records(0, 6))
    attacker = httpx.HTTPTransport()

    def race_it(request: httpx.Request) -> None:
        if request.url.path == "/v1/batches":
            tap.hook = None
            copy = httpx.Request(
                request.method, request.url, headers=request.headers, content=request.content
            )
            assert attacker.handle_request(copy).status_code == 200

    tap.hook = race_it
    try:
        report = node.uploader.sync_once()
    finally:
        attacker.close()

    _assert_held_with_alarm(node, report, ids, "nonce-replayed", time.time())
    assert sorted(stored_ids(hub)) == sorted(ids)  # the copy carried the same records
    again = node.retry_now()
    assert (again.sent, again.duplicate) == (0, 6)  # delivered once, settled now
    assert sorted(stored_ids(hub)) == sorted(ids)


def test_a_node_signing_as_another_id_is_refused_401_for_batches_403_for_its_views(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    hub = sync_hub()
    node = make_node(hub.url, hub.key, node_id=OTHER_NODE, sign_as=NODE)
    ids = node.put(make_records(0, 3))

    report = node.uploader.sync_once()

    _assert_held_with_alarm(node, report, ids, "node-mismatch", time.time())
    assert stored_ids(hub) == stored_ids(hub, OTHER_NODE) == []
    for call in (
        node.client.node_view,
        lambda: node.client.heartbeat({"node_id": OTHER_NODE}),
        lambda: node.client.reconcile([utc_today()]),
    ):
        with pytest.raises(SignatureRefusedError) as refused:
            call()
        assert refused.value.status == 403
        assert action_for(refused.value, records=1).verdict is Verdict.HOLD


# -- 409 / 422 / 503 / 500 ------------------------------------------------------------------


def test_a_retry_while_the_first_attempt_is_in_flight_gets_409_then_the_stored_answer(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    """The answer to the first attempt is lost while the hub is still committing it; the
    client retries at once on a new connection (same key), the hub says 409, the
    uploader waits Retry-After and sends the same batch again: the stored response."""
    hub = sync_hub()
    tap = Tap()
    entered, release = threading.Event(), threading.Event()
    first_answer: list[int] = []

    def gate(key: str, records: Sequence[IncomingRecord]) -> None:
        if len(hub.store.commits) == 0:
            entered.set()
            assert release.wait(30)

    def lose_the_answer(request: httpx.Request) -> None:
        if request.url.path != "/v1/batches":
            return
        tap.hook = None

        def first_attempt() -> None:
            first_answer.append(tap.inner.handle_request(request).status_code)

        threading.Thread(target=first_attempt, daemon=True).start()
        assert entered.wait(30)
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    def sleep(secs: float) -> None:  # the uploader's wait: let the first attempt finish
        node.sleeps.append(secs)
        release.set()
        wait_for("the first attempt's answer", lambda: bool(first_answer))

    hub.store.before_commit = gate
    tap.hook = lose_the_answer
    node = make_node(hub.url, hub.key, transport=tap, sleep=sleep)
    ids = node.put(make_records(0, 10))

    report = node.uploader.sync_once()

    assert report.sent == 10
    assert report.stopped == "drained"
    assert first_answer == [200]
    assert node.sleeps == [5.0]  # the hub's Retry-After for 409
    retry, replay = tap.batches()
    assert (retry.status, replay.status) == (409, 200)
    assert replay.response_headers["idempotent-replayed"] == "true"
    assert retry.headers["idempotency-key"] == replay.headers["idempotency-key"]
    assert retry.headers["signature-input"] != replay.headers["signature-input"]
    assert len(hub.store.commits) == 1
    assert sorted(stored_ids(hub)) == sorted(ids)


def test_a_key_the_hub_holds_for_other_content_gets_422_and_the_records_a_new_key(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    hub = sync_hub()
    tap = Tap()
    node = make_node(hub.url, hub.key, transport=tap)
    ids = node.put(make_records(0, 4))

    def key_already_used(request: httpx.Request) -> None:
        if request.url.path == "/v1/batches":
            tap.hook = None
            key = request.headers["idempotency-key"]
            claim = hub.store.inner.begin_batch(NODE, key, "0" * 64, now=time.time())
            assert claim.state == "new"
            hub.store.inner.commit_batch(
                NODE, key, [], received_at=time.time(), respond=lambda ids: b"{}"
            )

    tap.hook = key_already_used
    report = node.uploader.sync_once()

    assert report.sent == 4
    conflict, rekeyed = tap.batches()
    assert (conflict.status, rekeyed.status) == (422, 200)
    assert conflict.headers["idempotency-key"] != rekeyed.headers["idempotency-key"]
    assert sorted(stored_ids(hub)) == sorted(ids)


def test_a_busy_store_gets_503_and_the_same_batch_after_retry_after(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    hub = sync_hub()
    tap = Tap()
    node = make_node(hub.url, hub.key, transport=tap)
    ids = node.put(make_records(0, 6))
    busy = [1]

    def store_busy(node_id: str, key: str) -> None:
        if busy.pop() if busy else 0:
            error = StorageError("database is locked")
            error.transient = True
            raise error

    hub.store.before_begin = store_busy
    report = node.uploader.sync_once()

    assert report.sent == 6
    assert node.sleeps == [10.0]  # the hub's Retry-After
    throttled, ok = tap.batches()
    assert (throttled.status, ok.status) == (503, 200)
    assert throttled.headers["idempotency-key"] == ok.headers["idempotency-key"]
    assert throttled.headers["content-digest"] == ok.headers["content-digest"]
    assert sorted(stored_ids(hub)) == sorted(ids)


def test_a_hub_failing_with_500_is_transient_the_records_wait_and_arrive_later(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    hub = sync_hub()
    node = make_node(hub.url, hub.key, batch_max_records=4)
    ids = node.put(make_records(0, 12))

    def fail_second(key: str, records: Sequence[IncomingRecord]) -> None:
        if len(hub.store.commits) == 1:
            raise RuntimeError("disk on fire")

    hub.store.before_commit = fail_second
    report = node.uploader.sync_once()

    # The failed batch waits (retried); the next lease was never taken (pending).
    assert (report.sent, report.retried, report.stopped) == (4, 4, "unreachable")
    assert report.error is not None
    assert report.error["status"] == 500
    assert slug(report.error["problem_type"]) == "internal-error"
    assert not report.auth_refused
    assert node.state_counts(ids[4:]) == {"pending": 8}
    assert node.uploader.sync_once().stopped == "backing-off"
    hub.store.before_commit = None
    assert node.retry_now().sent == 8
    assert sorted(stored_ids(hub)) == sorted(ids)


# -- 413: split; a record too large alone is dead-lettered ---------------------------------


def test_more_records_than_the_hub_takes_gets_413_and_is_split_until_all_arrive(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    hub = sync_hub(max_records_per_batch=4)
    node = make_node(hub.url, hub.key, batch_max_records=25)
    ids = node.put(make_records(0, 25))

    report = node.uploader.sync_once()

    assert (report.sent, report.rejected, report.stopped) == (25, 0, "drained")
    assert max(len(c) for c in hub.store.commits) <= 4
    assert sorted(stored_ids(hub)) == sorted(ids)


def test_a_batch_far_over_the_hub_s_byte_limit_gets_its_413_and_is_split_until_all_arrive(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    """The hub refuses on Content-Length before it uses the body, while the node is
    still sending megabytes. The 413 must reach the node all the same: a connection
    reset instead (the hub closing with unread data) is a network error to the node,
    which then backs off and sends the same oversized batch again instead of splitting.
    (Without hub.app._drain this failed in most runs.)"""
    hub = sync_hub(max_body_bytes=256 * 1024)
    node = make_node(hub.url, hub.key, batch_max_records=100, batch_max_bytes=16_000_000)
    records = [dataclasses.replace(make_record(i), raw=random_raw(i, 100_000)) for i in range(36)]
    ids = node.put(records)

    report = node.uploader.sync_once()

    assert report.error is None
    assert (report.sent, report.stopped) == (36, "drained")
    assert sorted(stored_ids(hub)) == sorted(ids)


def test_a_blob_over_the_hub_s_byte_limit_dead_letters_its_record_and_the_rest_arrive(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    hub = sync_hub(max_body_bytes=256 * 1024)
    node = make_node(hub.url, hub.key)
    huge = _imaging_record(node, 0, [random.Random(0).randbytes(3 * 1024 * 1024)])
    fine = _imaging_record(node, 1, [random.Random(1).randbytes(100_000)])
    ids = node.put([huge, fine, *make_records(10, 3)])

    report = node.uploader.sync_once()

    assert (report.sent, report.rejected, report.blobs_uploaded) == (4, 1, 1)
    (dead,) = node.buffer.dead()
    assert dead.id == huge.id
    assert "hub refused blob" in dead.reason
    assert "413" in dead.reason
    assert not hub.blobs.has(huge.blobs[0].sha256)
    assert sorted(stored_ids(hub)) == sorted(i for i in ids if i != huge.id)


def test_a_batch_that_inflates_past_the_limit_is_split_and_a_record_too_big_alone_dies(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    """A node's "gzip bomb": highly compressible records, small on the wire."""
    hub = sync_hub(max_decompressed_bytes=128 * 1024)
    node = make_node(hub.url, hub.key, batch_max_records=50)
    records = make_records(0, 20, body_size=10_000)
    whale = make_record(99, body_size=300_000)
    ids = node.put([*records[:10], whale, *records[10:]])

    report = node.uploader.sync_once()

    assert (report.sent, report.rejected, report.stopped) == (20, 1, "drained")
    (dead,) = node.buffer.dead()
    assert dead.id == whale.id
    assert "413" in dead.reason
    assert "payload-too-large" in dead.reason
    assert sorted(stored_ids(hub)) == sorted(i for i in ids if i != whale.id)


# -- per-record rejection -------------------------------------------------------------------


def test_a_record_the_hub_rejects_goes_to_dead_letter_with_its_reason_the_rest_are_sent(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    hub = sync_hub()
    node = make_node(hub.url, hub.key)
    good = make_records(0, 6)
    bad = dataclasses.replace(
        make_record(50),
        body={
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": {"resourceType": "Observation", "status": "final"}}],
        },
    )
    ids = node.put([*good[:3], bad, *good[3:]])

    report = node.uploader.sync_once()

    assert (report.sent, report.rejected, report.batches) == (6, 1, 1)
    (dead,) = node.buffer.dead()
    assert dead.id == bad.id
    assert dead.reason == 'hub: body.entry[0].resource.resourceType: must be "Patient"'
    assert sorted(stored_ids(hub)) == sorted(i for i in ids if i != bad.id)


# -- blobs, lanes, reconciliation, heartbeat ------------------------------------------------


def _imaging_record(node: SyncNode, i: int, blobs: Sequence[bytes]) -> Record:
    refs = []
    for data in blobs:
        sha, size = node.buffer.add_blob(data, media_type="application/dicom")
        refs.append(BlobRef(sha256=sha, media_type="application/dicom", size=size))
    return dataclasses.replace(
        make_record(i, service=Service.IMAGING_STUDY, adapter="pacs"), blobs=tuple(refs)
    )


def test_blobs_reach_the_hub_before_the_records_that_list_them(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    hub = sync_hub()
    tap = Tap()
    node = make_node(hub.url, hub.key, transport=tap, batch_max_records=2)
    shared = b"DICM" + random.Random(70).randbytes(70_000)
    studies = [
        _imaging_record(node, 0, [shared, b"DICM" + random.Random(5).randbytes(5_000)]),
        _imaging_record(node, 1, [shared]),
        _imaging_record(node, 2, [b"DICM" + random.Random(3).randbytes(300_000)]),
    ]
    ids = node.put(studies)
    missing_at_commit: list[str] = []

    def blobs_first(key: str, records: Sequence[IncomingRecord]) -> None:
        for rec in records:
            for blob in json.loads(rec.envelope).get("blobs", ()):
                if not hub.blobs.has(blob["sha256"]):
                    missing_at_commit.append(blob["sha256"])

    hub.store.before_commit = blobs_first
    report = node.uploader.sync_once()

    assert (report.sent, report.blobs_uploaded) == (3, 3)
    assert missing_at_commit == []
    assert sorted(stored_ids(hub)) == sorted(ids)
    for study in studies:
        for ref in study.blobs:
            assert hub.blobs.read(ref.sha256) == node.buffer.blob_path(ref.sha256).read_bytes()
    puts = [e for e in tap.exchanges if e.method == "PUT"]
    assert [e.status for e in puts] == [201, 201, 201]
    # A second node holding the same study: HEAD says the hub has it, no PUT.
    other = make_node(hub.url, hub.key)
    other.put([_imaging_record(other, 1, [shared])])
    again = other.uploader.sync_once()
    assert (again.duplicate, again.blobs_present, again.blobs_uploaded) == (1, 1, 0)


def test_clinical_records_go_before_an_imaging_backlog(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    hub = sync_hub()
    node = make_node(hub.url, hub.key, batch_max_records=4)
    imaging = node.put(make_records(0, 10, service=Service.IMAGING_STUDY, adapter="pacs"))
    clinical = node.put(make_records(100, 6))  # captured after the backlog

    assert node.uploader.sync_once().sent == 16

    order = [rid for commit in hub.store.commits for rid in commit]
    assert set(order[:6]) == set(clinical)
    assert set(order[6:]) == set(imaging)


def test_reconcile_finds_no_gap_after_a_clean_sync_and_repairs_a_day_the_hub_lost(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    hub = sync_hub()
    node = make_node(hub.url, hub.key)
    ids = node.put(make_records(0, 20))
    assert node.uploader.sync_once().sent == 20
    today = utc_today()

    clean = reconcile(node.buffer, node.client, days=2, include_today=True)
    assert today in clean.days
    assert clean.differing == ()

    assert delete_stored_day(hub, today, ids[5:10]) == 5  # restored from an older backup
    found = reconcile(node.buffer, node.client, days=2, include_today=True)
    (diff,) = found.differing
    assert (diff.day, diff.ours, diff.hub, diff.requeued) == (today, 20, 15, 20)

    resent = node.uploader.sync_once()
    assert (resent.sent, resent.duplicate) == (5, 15)
    assert sorted(stored_ids(hub)) == sorted(ids)
    assert reconcile(node.buffer, node.client, days=2, include_today=True).differing == ()


def test_the_heartbeat_is_stored_and_shown_by_sepas_hub_nodes_list(
    sync_hub: HubFactory, make_node: NodeFactory
) -> None:
    hub = sync_hub()
    node = make_node(hub.url, hub.key)
    node.put(make_records(0, 3))
    node.uploader.siam_id = "SIAM-77"
    lis_ok = utc_text(time.time() - 60)
    node.uploader._adapters = lambda: [
        {"name": "lis", "kind": "hl7-mllp", "last_ok": lis_ok, "last_error": None},
        {"name": "pacs", "kind": "dicom", "last_ok": None, "last_error": "C-FIND refused"},
    ]
    assert node.uploader.sync_once().heartbeat_sent

    res = run_cli("sepas-hub", "nodes", "list", "--json", "--store", f"sqlite://{hub.sqlite_path}")

    assert res.returncode == 0, res.stderr
    (listed,) = json.loads(res.stdout)
    assert (listed["node_id"], listed["status"], listed["records"]) == (NODE, "active", 3)
    beat = listed["heartbeat"]
    assert (beat["pending"], beat["dead"], beat["siam_id"]) == (0, 0, "SIAM-77")
    assert beat["version"] == node.uploader.version
    assert abs(beat["clock_skew_s"]) <= 2
    assert beat["adapters"] == [
        {"name": "lis", "kind": "hl7-mllp", "last_ok": lis_ok, "last_error": None},
        {"name": "pacs", "kind": "dicom", "last_ok": None, "last_error": "C-FIND refused"},
    ]
    assert listed["heartbeat_at"] is not None


# -- the command line -----------------------------------------------------------------------


def _agent_config(path: Path, data_dir: Path, hub_url: str) -> Path:
    path.write_text(
        textwrap.dedent(
            f"""\
            [node]
            id = "{NODE}"
            data_dir = "{data_dir}"

            [hub]
            url = "{hub_url}"
            timeout_secs = 10.0
            """
        ),
        encoding="utf-8",
    )
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sepas_agent_sync_once_as_a_process_exits_1_refused_0_delivered_1_hub_down(
    sync_hub: HubFactory, tmp_path: Path
) -> None:
    hub = sync_hub()
    data_dir = tmp_path / "agent"
    cfg = _agent_config(tmp_path / "agent.toml", data_dir, hub.url)
    down = _agent_config(tmp_path / "down.toml", data_dir, f"http://127.0.0.1:{_closed_port()}/")
    assert run_cli("sepas-agent", "keys", "init", "-c", str(cfg)).returncode == 0
    with Buffer.open(data_dir, data_key=load_data_key(data_dir / "buffer.key")) as buf:
        buf.put(make_records(0, 9))

    # The hub does not know this node's key yet.
    refused = run_cli("sepas-agent", "sync", "--once", "--json", "-c", str(cfg))

    assert refused.returncode == 1, refused.stderr
    assert json.loads(refused.stdout)["sync"]["auth_refused"]
    status = json.loads(run_cli("sepas-agent", "status", "--json", "-c", str(cfg)).stdout)
    assert slug(status["uploads"]["alarm"]["problem_type"]) == "signature-mismatch"
    assert status["totals"]["pending"] == 9

    register(hub.store, NODE, load_private_key(data_dir / "node.key"))  # nodes add
    ok = run_cli("sepas-agent", "sync", "--once", "--json", "-c", str(cfg))

    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert (data["sync"]["sent"], data["sync"]["heartbeat_sent"]) == (9, True)
    assert data["reconcile"]["days_differing"] == []
    assert sorted(stored_ids(hub)) == sorted(r.id for r in make_records(0, 9))

    with Buffer.open(data_dir, data_key=load_data_key(data_dir / "buffer.key")) as buf:
        buf.put(make_records(9, 2))
    failed = run_cli("sepas-agent", "sync", "--once", "--json", "-c", str(down))

    assert failed.returncode == 1, failed.stderr
    report = json.loads(failed.stdout)["sync"]
    assert (report["sent"], report["retried"], report["stopped"]) == (0, 2, "unreachable")
    assert "cannot connect" in report["error"]["message"]
    with Buffer.open(data_dir, data_key=load_data_key(data_dir / "buffer.key")) as buf:
        assert buf.stats().total(State.PENDING) == 2
    assert len(stored_ids(hub)) == 9
