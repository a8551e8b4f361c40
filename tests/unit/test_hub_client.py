"""agent.uploader.signing and agent.uploader.client: what goes on the wire and how the
hub's answers become errors. The hub is agent.testing.FakeHub (an httpx.MockTransport
handler that verifies signatures with agent.wire); the signatures are also checked by
the independent http_message_signatures library."""

from __future__ import annotations

import email.utils
import gzip
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from http_message_signatures import HTTPMessageVerifier, MappingKeyResolver, algorithms

from agent import wire
from agent.buffer import LeasedRecord
from agent.config import HubSettings
from agent.errors import (
    BatchInFlightError,
    BatchRejectedError,
    BatchTooLargeError,
    ConfigError,
    HubError,
    HubThrottledError,
    HubUnavailableError,
    IdempotencyConflictError,
    SignatureRefusedError,
)
from agent.testing import FakeClock, FakeHub
from agent.uploader.batching import Batch, BatchItem, form_batch
from agent.uploader.client import (
    HubClient,
    TokenBucket,
    digest_of_sha256,
    is_loopback_host,
    parse_retry_after,
)
from agent.uploader.signing import SigningAuth
from tests.factories import NODE_ID, make_records

KEY = Ed25519PrivateKey.generate()
BATCH_COMPONENTS = ("@method", "@path", "content-type", "content-digest", "idempotency-key")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def hub(clock: FakeClock) -> FakeHub:
    return FakeHub(NODE_ID, KEY.public_key(), clock=clock)


def make_client(
    hub: FakeHub | Callable[[httpx.Request], httpx.Response],
    clock: FakeClock,
    **settings: Any,
) -> HubClient:
    settings.setdefault("url", "https://hub.test/")
    return HubClient(
        HubSettings(**settings),
        SigningAuth(KEY, NODE_ID, clock=clock),
        node_id=NODE_ID,
        transport=httpx.MockTransport(hub),
        clock=clock,
        sleep=clock.sleep,
    )


def batch_of(n: int, clock: FakeClock, start: int = 0) -> Batch:
    items = [
        BatchItem.from_leased(LeasedRecord(r.id, r.service.value, 0, 0, r.to_json()))
        for r in make_records(start, n)
    ]
    return form_batch(items, node_id=NODE_ID, now=clock())


def as_request(call: Any) -> httpx.Request:
    return httpx.Request(
        call.method, f"https://hub.test{call.path}", headers=call.headers, content=call.content
    )


# --- signing -----------------------------------------------------------------------------


def test_a_signed_batch_verifies_with_agent_wire(hub: FakeHub, clock: FakeClock) -> None:
    with make_client(hub, clock) as client:
        client.post_batch(batch_of(3, clock))
    call = hub.batch_calls()[0]
    assert call.status == 200
    sig = wire.verify_request(
        method="POST",
        path="/v1/batches",
        headers=call.headers,
        public_keys=[KEY.public_key()],
        now=clock(),
        has_content=True,
    )
    assert sig.components == BATCH_COMPONENTS
    assert sig.keyid == NODE_ID
    assert sig.tag == "sepas-v1"


def test_a_signed_batch_verifies_with_the_independent_library() -> None:
    clock = FakeClock(time.time())  # the library checks `created` against the real clock
    hub = FakeHub(NODE_ID, KEY.public_key(), clock=clock)
    with make_client(hub, clock) as client:
        client.post_batch(batch_of(3, clock))
    call = hub.batch_calls()[0]
    verifier = HTTPMessageVerifier(
        signature_algorithm=algorithms.ED25519,
        key_resolver=MappingKeyResolver(public_keys={NODE_ID: KEY.public_key()}, private_keys={}),
    )
    results = verifier.verify(
        as_request(call),
        expect_tag="sepas-v1",
        require_components=BATCH_COMPONENTS,
        body=call.content,
    )
    assert [r.parameters["keyid"] for r in results] == [NODE_ID]
    assert results[0].body == call.content  # it checked Content-Digest too


def test_content_digest_is_over_the_gzip_bytes_as_sent(hub: FakeHub, clock: FakeClock) -> None:
    batch = batch_of(3, clock)
    with make_client(hub, clock) as client:
        client.post_batch(batch)
    call = hub.batch_calls()[0]
    assert call.headers["content-encoding"] == "gzip"
    assert call.content == batch.content
    assert call.content[:2] == b"\x1f\x8b"
    assert wire.verify_content_digest(call.headers["content-digest"], call.content)
    assert not wire.verify_content_digest(call.headers["content-digest"], call.body)
    assert call.headers["idempotency-key"] == batch.batch_id


def test_a_retry_is_signed_afresh_with_the_same_key_and_body(
    hub: FakeHub, clock: FakeClock
) -> None:
    hub.script(409)
    batch = batch_of(3, clock)
    with make_client(hub, clock) as client:
        with pytest.raises(BatchInFlightError):
            client.post_batch(batch)
        clock.advance(2)
        client.post_batch(batch)
    first, second = hub.batch_calls()
    assert (first.status, second.status) == (409, 200)
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    assert first.content == second.content
    assert first.headers["content-digest"] == second.headers["content-digest"]
    assert first.nonce != second.nonce
    assert second.created == first.created + 2
    assert first.headers["signature"] != second.headers["signature"]


def test_requests_without_content_cover_method_and_path_only(
    hub: FakeHub, clock: FakeClock
) -> None:
    with make_client(hub, clock) as client:
        assert client.has_blob("ab" * 32) is False
    call = hub.calls[0]
    assert call.method == "HEAD"
    assert call.status == 404
    params = wire.parse_signature_headers(call.headers)
    assert params.components == ("@method", "@path")


def test_reconcile_and_heartbeat_are_signed_without_idempotency_key(
    hub: FakeHub, clock: FakeClock
) -> None:
    with make_client(hub, clock) as client:
        client.reconcile(["2025-06-14"])
        client.heartbeat({"node_id": NODE_ID})
    for call in hub.calls:
        assert call.status in (200, 204)
        assert wire.parse_signature_headers(call.headers).components == (
            "@method",
            "@path",
            "content-type",
            "content-digest",
        )


def test_health_is_not_signed(hub: FakeHub, clock: FakeClock) -> None:
    with make_client(hub, clock) as client:
        assert client.health() is True
    assert "signature" not in hub.calls[0].headers


def test_a_wrong_key_is_refused_as_signature_refused_with_the_problem_type(
    clock: FakeClock,
) -> None:
    hub = FakeHub(NODE_ID, Ed25519PrivateKey.generate().public_key(), clock=clock)
    with make_client(hub, clock) as client, pytest.raises(SignatureRefusedError) as info:
        client.post_batch(batch_of(1, clock))
    assert info.value.status == 401
    assert info.value.problem_type == wire.problem_type("signature-mismatch")


# --- transport security ------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://hub.example/", "http://10.0.0.7:8080/"])
def test_plain_http_to_a_non_loopback_host_is_refused(url: str, clock: FakeClock) -> None:
    settings = HubSettings.model_construct(**{**HubSettings().model_dump(), "url": url})
    with pytest.raises(ConfigError) as info:
        HubClient(settings, SigningAuth(KEY, NODE_ID), node_id=NODE_ID)
    assert "hub.url" in str(info.value)
    assert "https" in info.value.hint


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000/", "http://127.9.9.9/", "http://[::1]:8000/", "http://localhost/"],
)
def test_plain_http_to_loopback_is_allowed(url: str, clock: FakeClock) -> None:
    HubClient(HubSettings(url=url), SigningAuth(KEY, NODE_ID), node_id=NODE_ID).close()


def test_allow_insecure_permits_plain_http_elsewhere(clock: FakeClock) -> None:
    settings = HubSettings(url="http://hub.example/", allow_insecure=True)
    HubClient(settings, SigningAuth(KEY, NODE_ID), node_id=NODE_ID).close()


def test_loopback_detection() -> None:
    assert is_loopback_host("127.0.0.1")
    assert is_loopback_host("::1")
    assert is_loopback_host("LOCALHOST")
    assert is_loopback_host("[::1]")
    assert not is_loopback_host("128.0.0.1")
    assert not is_loopback_host("localhost.example")


def test_an_unreadable_ca_bundle_is_a_config_error(tmp_path: Path) -> None:
    settings = HubSettings(url="https://hub.test/", ca_bundle=tmp_path / "missing.pem")
    with pytest.raises(ConfigError) as info:
        HubClient(settings, SigningAuth(KEY, NODE_ID), node_id=NODE_ID)
    assert "hub.ca_bundle" in str(info.value)


def test_tls_verification_is_on_and_redirects_are_not_followed(
    hub: FakeHub, clock: FakeClock
) -> None:
    client = make_client(hub, clock)
    http = client._http  # the one place that holds the httpx.Client
    assert http.follow_redirects is False
    assert http.trust_env is True
    assert http.timeout.read == HubSettings().timeout_secs
    client.close()


# --- statuses become errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BatchRejectedError),
        (401, SignatureRefusedError),
        (403, SignatureRefusedError),
        (409, BatchInFlightError),
        (413, BatchTooLargeError),
        (415, BatchRejectedError),
        (422, IdempotencyConflictError),
        (429, HubThrottledError),
        (503, HubThrottledError),
        (500, HubUnavailableError),
        (502, HubUnavailableError),
        (404, HubUnavailableError),
    ],
)
def test_each_status_maps_to_its_error_with_status_and_problem_type(
    status: int, cls: type[HubError], hub: FakeHub, clock: FakeClock
) -> None:
    hub.script(status, problem_type="some-problem")
    with make_client(hub, clock) as client, pytest.raises(HubError) as info:
        client.post_batch(batch_of(2, clock))
    assert type(info.value) is cls
    assert info.value.status == status
    assert info.value.problem_type == wire.problem_type("some-problem")


def test_retry_after_in_seconds_is_carried(hub: FakeHub, clock: FakeClock) -> None:
    hub.script(429, retry_after="17")
    with make_client(hub, clock) as client, pytest.raises(HubThrottledError) as info:
        client.post_batch(batch_of(1, clock))
    assert info.value.retry_after == 17.0


def test_retry_after_as_an_http_date_is_carried_as_seconds(hub: FakeHub, clock: FakeClock) -> None:
    hub.script(503, retry_after=email.utils.formatdate(clock() + 90, usegmt=True))
    with make_client(hub, clock) as client, pytest.raises(HubThrottledError) as info:
        client.post_batch(batch_of(1, clock))
    assert info.value.retry_after == pytest.approx(90, abs=1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("120", 120.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past: now
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=1_750_000_000.0) == expected


@pytest.mark.parametrize(
    "exc",
    [
        lambda r: httpx.ConnectError("connection refused", request=r),
        lambda r: httpx.ConnectTimeout("timed out", request=r),
        lambda r: httpx.ReadTimeout("timed out", request=r),
        lambda r: httpx.ReadError("reset by peer", request=r),
        lambda r: httpx.ProxyError("proxy said no", request=r),
    ],
)
def test_network_errors_and_timeouts_are_hub_unavailable(
    exc: Callable[[httpx.Request], Exception], hub: FakeHub, clock: FakeClock
) -> None:
    hub.script(exc=exc)
    with make_client(hub, clock) as client, pytest.raises(HubUnavailableError) as info:
        client.post_batch(batch_of(1, clock))
    assert info.value.status is None
    assert info.value.transient


def test_a_stale_connection_is_retried_once_at_once(hub: FakeHub, clock: FakeClock) -> None:
    hub.script(exc=lambda r: httpx.RemoteProtocolError("Server disconnected", request=r))
    with make_client(hub, clock) as client:
        result = client.post_batch(batch_of(2, clock))
    assert [r.status for r in result.results] == ["accepted", "accepted"]
    assert len(hub.batch_calls()) == 2


def test_a_lost_answer_retried_is_replayed_by_the_hub(hub: FakeHub, clock: FakeClock) -> None:
    hub.script(
        exc=lambda r: httpx.RemoteProtocolError("Server disconnected", request=r),
        after_commit=True,
    )
    with make_client(hub, clock) as client:
        result = client.post_batch(batch_of(2, clock))
    assert result.replayed
    assert [r.status for r in result.results] == ["accepted", "accepted"]


def test_a_200_that_does_not_answer_the_batch_is_transient(clock: FakeClock) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"batch_id": "other", "received_at": "x", "results": []})

    with make_client(handler, clock) as client, pytest.raises(HubUnavailableError) as info:
        client.post_batch(batch_of(2, clock))
    assert info.value.transient
    assert "PROTOCOL.md" in str(info.value)


def test_a_200_with_missing_results_is_transient(hub: FakeHub, clock: FakeClock) -> None:
    batch = batch_of(2, clock)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "batch_id": batch.batch_id,
                "received_at": "2025-06-15T15:06:40Z",
                "results": [{"id": batch.ids[0], "status": "accepted"}],
            },
        )

    with make_client(handler, clock) as client, pytest.raises(HubUnavailableError):
        client.post_batch(batch)


def test_a_redirect_is_not_followed_and_says_how_to_fix_the_url(clock: FakeClock) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(301, headers={"Location": "https://elsewhere.test/"})

    with make_client(handler, clock) as client, pytest.raises(HubUnavailableError) as info:
        client.post_batch(batch_of(1, clock))
    assert info.value.status == 301
    assert "hub.url" in info.value.hint


def test_problem_detail_is_kept_and_bounded(clock: FakeClock) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"type": "t", "title": "Bad", "status": 400, "detail": "x" * 5000}
        return httpx.Response(
            400,
            content=json.dumps(body).encode(),
            headers={"Content-Type": "application/problem+json"},
        )

    with make_client(handler, clock) as client, pytest.raises(BatchRejectedError) as info:
        client.post_batch(batch_of(2, clock))
    assert "Bad" in str(info.value)
    assert len(str(info.value)) < 500


# --- clock skew ---------------------------------------------------------------------------


def test_clock_skew_is_measured_from_the_date_header(clock: FakeClock) -> None:
    hub = FakeHub(NODE_ID, KEY.public_key(), clock=clock, date_skew=-30)
    with make_client(hub, clock) as client:
        assert client.last_skew is None
        client.health()
    assert client.last_skew == pytest.approx(30, abs=1)  # the node is 30 s ahead


def test_clock_skew_past_120_s_is_warned_once(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    hub = FakeHub(NODE_ID, None, clock=clock, date_skew=200)
    with caplog.at_level(logging.WARNING), make_client(hub, clock) as client:
        client.health()
        client.health()
    assert client.last_skew == pytest.approx(-200, abs=1)
    warned = [r for r in caplog.records if getattr(r, "event", "") == "upload.clock_skewed"]
    assert len(warned) == 1


# --- blobs ---------------------------------------------------------------------------------


def test_put_blob_streams_the_file_with_its_digest_known_in_advance(
    hub: FakeHub, clock: FakeClock, tmp_path: Path
) -> None:
    data = bytes(range(256)) * 1000
    sha = hashlib.sha256(data).hexdigest()
    path = tmp_path / "blob"
    path.write_bytes(data)
    with make_client(hub, clock) as client:
        assert client.put_blob(sha, path, "application/dicom") is True
        assert client.has_blob(sha) is True
        assert client.put_blob(sha, path, "application/dicom") is False  # 200: had it
    put = hub.calls[0]
    assert put.method == "PUT"
    assert put.status == 201
    assert put.headers["content-type"] == "application/dicom"
    assert put.headers["content-length"] == str(len(data))
    assert put.headers["content-digest"] == wire.content_digest(data)
    assert "transfer-encoding" not in put.headers
    assert hub.blobs[sha] == data


def test_a_blob_whose_file_changed_is_refused_by_the_hub(
    hub: FakeHub, clock: FakeClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"not what the name says")
    with make_client(hub, clock) as client, pytest.raises(BatchRejectedError):
        client.put_blob("ab" * 32, path, "application/dicom")


def test_blob_rate_limit_paces_the_upload(hub: FakeHub, clock: FakeClock, tmp_path: Path) -> None:
    data = b"\x00" * 100_000
    path = tmp_path / "blob"
    path.write_bytes(data)
    with make_client(hub, clock, blob_rate_limit=10_000) as client:
        client.put_blob(hashlib.sha256(data).hexdigest(), path, "application/octet-stream")
    # One second's worth goes at once (burst), the other 90 KB at 10 KB/s.
    assert sum(clock.sleeps) == pytest.approx(9.0, abs=0.01)


def test_token_bucket_allows_a_burst_of_one_second_then_paces() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, clock=clock, sleep=clock.sleep)
    bucket.take(1000)
    assert clock.sleeps == []
    bucket.take(500)
    assert clock.sleeps == [pytest.approx(0.5)]


def test_digest_of_sha256_equals_content_digest_of_the_content() -> None:
    data = b"hello"
    assert digest_of_sha256(hashlib.sha256(data).hexdigest()) == wire.content_digest(data)


# --- other endpoints -----------------------------------------------------------------------


def test_reconcile_returns_the_hubs_day_digests(hub: FakeHub, clock: FakeClock) -> None:
    with make_client(hub, clock) as client:
        client.post_batch(batch_of(3, clock))
        days = client.reconcile(["2025-06-15", "2025-06-14"])
    held = list(hub.records)
    assert [(d.day, d.count) for d in days] == [("2025-06-15", 3), ("2025-06-14", 0)]
    assert days[0].digest == wire.day_digest(held)


def test_node_view_and_heartbeat(hub: FakeHub, clock: FakeClock) -> None:
    with make_client(hub, clock) as client:
        client.post_batch(batch_of(2, clock))
        client.heartbeat({"node_id": NODE_ID, "pending": 0})
        view = client.node_view()
    assert view["records"] == {"lab-result": 2}
    assert hub.heartbeats == [{"node_id": NODE_ID, "pending": 0}]


def test_the_batch_body_is_what_the_hub_decompresses(hub: FakeHub, clock: FakeClock) -> None:
    batch = batch_of(2, clock)
    with make_client(hub, clock) as client:
        client.post_batch(batch)
    assert hub.batch_calls()[0].body == gzip.decompress(batch.content) == batch.body()
