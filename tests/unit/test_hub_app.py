"""hub.app: every acceptance and every refusal of PROTOCOL.md, in process.

Requests go through httpx's ASGITransport to `create_app` over a real SqliteStore;
they are signed with `agent.wire.sign_request`, as the node signs them.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import threading
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.routing import Route

from agent import wire
from agent.errors import StorageError
from hub.app import TITLES, create_app
from hub.batch import INFLATE_CHUNK, Refusal, inflate
from hub.blobs import BlobStore
from hub.settings import HubSettings, LimitSettings
from hub.store_sqlite import SqliteStore
from tests import hubkit as hk
from tests.hubkit import NODE, OTHER_NODE

PROBLEM = "application/problem+json"
MiB = 1024 * 1024


@dataclass
class Hub:
    client: hk.AppClient
    store: SqliteStore
    blobs: BlobStore
    key: Ed25519PrivateKey
    app: Any

    def post_batch(self, doc: dict[str, Any], **kwargs: Any) -> httpx.Response:
        body, headers = hk.batch_request(doc, key=kwargs.pop("key", self.key), **kwargs)
        return self.client.post("/v1/batches", content=body, headers=headers)

    def signed(
        self, method: str, path: str, body: bytes | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = hk.signed_headers(
            method, path, key=kwargs.pop("key", self.key), body=body, **kwargs
        )
        return self.client.request(method, path, content=body, headers=headers)


@pytest.fixture
def make_hub(tmp_path: Path) -> Iterator[Callable[..., Hub]]:
    stores: list[SqliteStore] = []

    def make(**limits: Any) -> Hub:
        store = SqliteStore(tmp_path / f"hub{len(stores)}.db")
        stores.append(store)
        key = Ed25519PrivateKey.generate()
        hk.register(store, NODE, key)
        hk.register(store, OTHER_NODE, Ed25519PrivateKey.generate())
        blobs = BlobStore(tmp_path / "blobs")
        settings = HubSettings(limits=LimitSettings(**limits))
        app = create_app(settings, store, blobs=blobs)
        return Hub(hk.AppClient(app), store, blobs, key, app)

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def hub(make_hub: Callable[..., Hub]) -> Hub:
    return make_hub()


def _problem_slug(response: httpx.Response) -> str:
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert set(body) == {"type", "title", "status", "detail"}
    assert body["status"] == response.status_code
    assert body["type"].startswith(wire.PROBLEM_BASE)
    return str(body["type"]).removeprefix(wire.PROBLEM_BASE)


def _assert_refused(response: httpx.Response, status: int, slug: str) -> None:
    assert response.status_code == status, response.text
    assert _problem_slug(response) == slug
    assert "date" in response.headers


def _forged(
    hub: Hub,
    body: bytes,
    *,
    components: tuple[str, ...] = (
        "@method",
        "@path",
        "content-type",
        "content-digest",
        "idempotency-key",
    ),
    **params: Any,
) -> dict[str, str]:
    """A batch request correctly signed by the node's key, whose Signature-Input says
    what the test wants, so that only the check under test can refuse it."""
    headers = {
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
        "Content-Digest": wire.content_digest(body),
        "Idempotency-Key": json.loads(gzip.decompress(body))["batch_id"],
    }
    sig_params: dict[str, int | str] = {
        "created": int(time.time()) + params.pop("created_offset", 0),
        "keyid": NODE,
        "alg": "ed25519",
        "nonce": wire.new_nonce(),
        "tag": "sepas-v1",
        **params,
    }
    base = wire.signature_base(
        method="POST",
        path="/v1/batches",
        headers=headers,
        components=components,
        params=sig_params,
    )
    signature = base64.b64encode(hub.key.sign(base.encode())).decode()
    return {
        **headers,
        "Signature-Input": "sig1=" + wire.signature_params_value(components, sig_params),
        "Signature": f"sig1=:{signature}:",
    }


# --- batches: what is accepted ------------------------------------------------------------


def test_a_signed_batch_gets_one_result_per_record_in_the_order_sent(hub: Hub) -> None:
    records = [hk.record(i) for i in range(3)]
    doc = hk.batch_doc(records)
    before = time.time()
    response = hub.post_batch(doc)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert "idempotent-replayed" not in response.headers
    body = response.json()
    assert body["batch_id"] == doc["batch_id"]
    assert body["results"] == [{"id": r["id"], "status": "accepted"} for r in records]
    received = datetime.fromisoformat(body["received_at"])
    assert body["received_at"].endswith("Z")
    assert before - 1 <= received.timestamp() <= time.time() + 1
    assert hub.store.counts_by_service(NODE) == {"lab-result": 3}


def test_an_identity_encoded_batch_is_accepted_too(hub: Hub) -> None:
    response = hub.post_batch(hk.batch_doc([hk.record(1)]), gzipped=False)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["status"] == "accepted"


def test_a_record_the_hub_already_holds_is_a_duplicate(hub: Hub) -> None:
    hub.post_batch(hk.batch_doc([hk.record(1)]))
    response = hub.post_batch(hk.batch_doc([hk.record(1), hk.record(2)]))
    statuses = [r["status"] for r in response.json()["results"]]
    assert statuses == ["duplicate", "accepted"]


def test_a_repeated_id_in_one_batch_counts_once_and_later_copies_are_duplicates(
    hub: Hub,
) -> None:
    bad_copy = hk.record(1, service="nope")
    doc = hk.batch_doc([hk.record(1), hk.record(2), hk.record(1), bad_copy])
    results = hub.post_batch(doc).json()["results"]
    assert [r["status"] for r in results] == ["accepted", "accepted", "duplicate", "rejected"]
    assert hub.store.counts_by_service(NODE) == {"lab-result": 2}


def test_a_replay_returns_the_identical_body_marked_idempotent_replayed(hub: Hub) -> None:
    doc = hk.batch_doc([hk.record(1), hk.record(2, service="nope")])
    first = hub.post_batch(doc)
    again = hub.post_batch(doc)  # signed afresh: new created, new nonce
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content


def test_a_failure_after_the_claim_releases_it_for_a_retry(hub: Hub) -> None:
    batch_id = str(uuid.uuid4())
    bad = hk.signed_headers(
        "POST", "/v1/batches", key=hub.key, body=b"{not json", idempotency_key=batch_id
    )
    _assert_refused(
        hub.client.post("/v1/batches", content=b"{not json", headers=bad), 400, "malformed-batch"
    )
    # Other content under the same key: 422 if the claim were still held.
    response = hub.post_batch(hk.batch_doc([hk.record(1)], batch_id=batch_id))
    assert response.status_code == 200, response.text


def test_an_unexpected_error_answers_500_without_detail_and_releases_the_claim(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = hk.batch_doc([hk.record(1)])
    real_commit = hub.store.commit_batch

    def broken(*args: Any, **kwargs: Any) -> bytes:
        raise RuntimeError(hk.NATIONAL_ID)  # even a message with patient data…

    monkeypatch.setattr(hub.store, "commit_batch", broken)
    response = hub.post_batch(doc)
    _assert_refused(response, 500, "internal-error")
    assert hk.NATIONAL_ID not in response.text  # …never reaches the node
    monkeypatch.setattr(hub.store, "commit_batch", real_commit)
    assert hub.post_batch(doc).status_code == 200  # not 409: the claim was released


def test_a_busy_store_answers_503_with_retry_after(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    def busy(*args: Any, **kwargs: Any) -> Any:
        err = StorageError("SQLite: database is locked")
        err.transient = True
        raise err

    monkeypatch.setattr(hub.store, "begin_batch", busy)
    response = hub.post_batch(hk.batch_doc([hk.record(1)]))
    _assert_refused(response, 503, "store-unavailable")
    assert int(response.headers["retry-after"]) > 0


# --- batches: per-record rejections ------------------------------------------------------


REJECTIONS = [
    ("id", "zz", "id: "),
    ("service", "x-ray", "service: "),
    ("occurred_at", "2025-11-21T09:30:00", "occurred_at: "),  # no offset
    ("captured_at", "yesterday", "captured_at: "),
    ("source", {"adapter": "lis", "kind": "hl7-mllp"}, "source.ref: "),
    ("patient", {"national_id": "۰۰۱۲۳۴۵۶۷۹", "national_id_valid": True}, "patient.national_id"),
    ("patient", {"national_id": hk.NATIONAL_ID, "national_id_valid": "yes"}, "patient.national"),
    ("body", {"resourceType": "Bundle", "type": "document", "entry": []}, "body.type: "),
    ("raw", {"media_type": "application/hl7-v2", "sha256": "AB" * 32}, "raw.sha256: "),
    ("raw", {"media_type": "x", "sha256": "ab" * 32, "data": "bm90IGl0"}, "raw.sha256: "),
    ("raw", {"media_type": "x", "sha256": "ab" * 32, "data": "***"}, "raw.data: "),
    ("blobs", [{"sha256": "ab" * 32, "media_type": "application/dicom"}], "blobs[0].size: "),
    ("source", {"adapter": "lis", "kind": "hl7-mllp", "ref": "r", "x": 1}, "source: "),
    ("raw", {"media_type": "x", "sha256": "ab" * 32, "data": None}, "raw.data: "),
    ("patient", hk.NATIONAL_ID, "patient: "),
]


@pytest.mark.parametrize(("field", "value", "error"), REJECTIONS)
def test_a_malformed_record_is_rejected_naming_the_field_not_the_value(
    hub: Hub, field: str, value: Any, error: str
) -> None:
    bad = hk.record(2, **{field: value})
    response = hub.post_batch(hk.batch_doc([hk.record(1), bad]))
    assert response.status_code == 200, response.text
    good, rejected = response.json()["results"]
    assert good["status"] == "accepted"
    assert rejected["status"] == "rejected"
    assert rejected["error"].startswith(error)
    assert rejected["id"] == (bad["id"] if field != "id" else None)  # a bad id is not echoed
    for secret in (*hk.PHI_STRINGS, "۰۰۱۲۳۴۵۶۷۹", "x-ray", "yesterday", "bm90IGl0"):
        assert secret not in response.text


def test_a_body_whose_first_entry_is_not_the_patient_is_rejected(hub: Hub) -> None:
    rec = hk.record(1)
    rec["body"] = {**rec["body"], "entry": list(reversed(rec["body"]["entry"]))}
    result = hub.post_batch(hk.batch_doc([rec])).json()["results"][0]
    assert result == {
        "id": rec["id"],
        "status": "rejected",
        "error": 'body.entry[0].resource.resourceType: must be "Patient"',
    }


def test_a_field_protocol_md_may_add_later_is_ignored_not_refused(hub: Hub) -> None:
    doc = hk.batch_doc([hk.record(1, encounter_ref="v1.1 addition")])
    doc["compression_hint"] = "a later v1 envelope field"
    assert hub.post_batch(doc).json()["results"][0]["status"] == "accepted"


def test_a_record_without_a_patient_and_with_blobs_is_accepted(hub: Hub) -> None:
    rec = hk.record(
        1,
        patient=None,
        blobs=[{"sha256": "ab" * 32, "media_type": "application/dicom", "size": 3}],
        raw={"media_type": "application/dicom", "sha256": "cd" * 32},  # data is optional
    )
    assert hub.post_batch(hk.batch_doc([rec])).json()["results"][0]["status"] == "accepted"


def test_nothing_of_the_patient_reaches_the_logs(
    hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hub.post_batch(hk.batch_doc([hk.record(1), hk.record(2, service="nope")]))
    hub.post_batch(hk.batch_doc([hk.record(3)]), key=Ed25519PrivateKey.generate())
    assert any(r.__dict__.get("event") == "hub.batch_stored" for r in caplog.records)
    logged = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    for secret in hk.PHI_STRINGS:
        assert secret not in logged


# --- batches: refusals of the whole request ----------------------------------------------


def test_an_unsigned_batch_is_refused_401_signature_missing(hub: Hub) -> None:
    body = hk.encode(hk.batch_doc([hk.record(1)]))
    headers = {"Content-Type": "application/json", "Content-Digest": wire.content_digest(body)}
    response = hub.client.post("/v1/batches", content=body, headers=headers)
    _assert_refused(response, 401, "signature-missing")


def test_unparseable_signature_headers_are_refused_401_signature_malformed(hub: Hub) -> None:
    body, headers = hk.batch_request(hk.batch_doc([hk.record(1)]), key=hub.key)
    headers["Signature-Input"] = "sig1=(this is not it"
    response = hub.client.post("/v1/batches", content=body, headers=headers)
    _assert_refused(response, 401, "signature-malformed")


def test_an_unknown_keyid_is_refused_401_unknown_key(hub: Hub) -> None:
    doc = hk.batch_doc([hk.record(1)], node="FAC-9999")
    _assert_refused(hub.post_batch(doc, node="FAC-9999"), 401, "unknown-key")


def test_a_revoked_node_is_refused_401_key_revoked(hub: Hub) -> None:
    hub.store.revoke_node(NODE)
    _assert_refused(hub.post_batch(hk.batch_doc([hk.record(1)])), 401, "key-revoked")


def test_a_signature_by_another_key_is_refused_401_signature_mismatch(hub: Hub) -> None:
    response = hub.post_batch(hk.batch_doc([hk.record(1)]), key=Ed25519PrivateKey.generate())
    _assert_refused(response, 401, "signature-mismatch")


def test_a_rotated_node_is_accepted_with_either_active_key(hub: Hub) -> None:
    new_key = Ed25519PrivateKey.generate()
    hk.register(hub.store, NODE, new_key)
    assert hub.post_batch(hk.batch_doc([hk.record(1)])).status_code == 200
    assert hub.post_batch(hk.batch_doc([hk.record(2)]), key=new_key).status_code == 200


@pytest.mark.parametrize(
    ("params", "slug"),
    [
        ({"alg": "rsa-pss-sha512"}, "unsupported-algorithm"),
        ({"tag": "other-app"}, "wrong-tag"),
        ({"created_offset": -400}, "created-out-of-window"),
        ({"created_offset": +400}, "created-out-of-window"),
    ],
)
def test_signature_parameters_outside_protocol_are_refused_401(
    hub: Hub, params: dict[str, Any], slug: str
) -> None:
    body = hk.encode(hk.batch_doc([hk.record(1)]))
    response = hub.client.post("/v1/batches", content=body, headers=_forged(hub, body, **params))
    _assert_refused(response, 401, slug)


def test_a_signature_not_covering_content_digest_is_refused_401(hub: Hub) -> None:
    body = hk.encode(hk.batch_doc([hk.record(1)]))
    headers = _forged(hub, body, components=("@method", "@path", "content-type"))
    response = hub.client.post("/v1/batches", content=body, headers=headers)
    _assert_refused(response, 401, "component-not-covered")


def test_the_created_window_is_configurable(make_hub: Callable[..., Hub]) -> None:
    hub = make_hub(max_skew_secs=10)
    doc = hk.batch_doc([hk.record(1)])
    _assert_refused(
        hub.post_batch(doc, created=int(time.time()) - 30), 401, "created-out-of-window"
    )
    assert hub.post_batch(doc, created=int(time.time()) - 5).status_code == 200


def test_a_replayed_nonce_is_refused_401_nonce_replayed(hub: Hub) -> None:
    body, headers = hk.batch_request(hk.batch_doc([hk.record(1)]), key=hub.key)
    assert hub.client.post("/v1/batches", content=body, headers=headers).status_code == 200
    response = hub.client.post("/v1/batches", content=body, headers=headers)  # byte for byte
    _assert_refused(response, 401, "nonce-replayed")


def test_a_batch_naming_another_node_is_refused_401_node_mismatch(hub: Hub) -> None:
    doc = hk.batch_doc([hk.record(1)], node=OTHER_NODE)
    _assert_refused(hub.post_batch(doc), 401, "node-mismatch")


def test_a_tampered_body_is_refused_400_digest_mismatch(hub: Hub) -> None:
    body, headers = hk.batch_request(hk.batch_doc([hk.record(1)]), key=hub.key)
    tampered = body[:-9] + bytes([body[-9] ^ 1]) + body[-8:]
    response = hub.client.post("/v1/batches", content=tampered, headers=headers)
    _assert_refused(response, 400, "digest-mismatch")
    assert hub.store.counts_by_service(NODE) == {}


def test_the_digest_is_checked_over_the_content_as_sent_not_decompressed(hub: Hub) -> None:
    doc = hk.batch_doc([hk.record(1)])
    inflated = hk.encode(doc, gzipped=False)
    headers = {
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
        "Content-Digest": wire.content_digest(inflated),  # over the decompressed bytes
        "Idempotency-Key": doc["batch_id"],
    }
    headers |= wire.sign_request(
        method="POST", path="/v1/batches", headers=headers, key=hub.key, key_id=NODE
    )
    response = hub.client.post("/v1/batches", content=gzip.compress(inflated), headers=headers)
    _assert_refused(response, 400, "digest-mismatch")


@pytest.mark.parametrize(
    ("content_type", "encoding"),
    [("text/plain", "gzip"), ("application/xml", "identity"), ("application/json", "br")],
)
def test_another_media_type_or_encoding_is_refused_415(
    hub: Hub, content_type: str, encoding: str
) -> None:
    doc = hk.batch_doc([hk.record(1)])
    body = hk.encode(doc)
    headers = hk.signed_headers(
        "POST",
        "/v1/batches",
        key=hub.key,
        body=body,
        content_type=content_type,
        content_encoding=encoding,
        idempotency_key=doc["batch_id"],
    )
    response = hub.client.post("/v1/batches", content=body, headers=headers)
    _assert_refused(response, 415, "unsupported-media-type")


def test_a_batch_without_idempotency_key_is_refused_400(hub: Hub) -> None:
    body = hk.encode(hk.batch_doc([hk.record(1)]))
    response = hub.signed("POST", "/v1/batches", body, content_encoding="gzip")
    _assert_refused(response, 400, "idempotency-key-missing")


def test_a_batch_id_other_than_the_idempotency_key_is_refused_400(hub: Hub) -> None:
    doc = hk.batch_doc([hk.record(1)])
    response = hub.post_batch(doc, idempotency_key=str(uuid.uuid4()))
    _assert_refused(response, 400, "idempotency-key-mismatch")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(sepas_batch=2),
        lambda d: d.update(records={"not": "a list"}),
        lambda d: d.update(created_at="2025-11-21 06:00"),
        lambda d: d.pop("node_id"),
    ],
    ids=["version", "records", "created_at", "node_id"],
)
def test_a_malformed_batch_envelope_is_refused_400(
    hub: Hub, mutate: Callable[[dict[str, Any]], Any]
) -> None:
    doc = hk.batch_doc([hk.record(1)])
    mutate(doc)
    _assert_refused(hub.post_batch(doc), 400, "malformed-batch")


def test_the_same_key_with_other_content_is_refused_422(hub: Hub) -> None:
    doc = hk.batch_doc([hk.record(1)])
    assert hub.post_batch(doc).status_code == 200
    doc["records"].append(hk.record(2))
    _assert_refused(hub.post_batch(doc), 422, "idempotency-conflict")


def test_the_same_key_still_in_flight_is_refused_409_with_retry_after(hub: Hub) -> None:
    doc = hk.batch_doc([hk.record(1)])
    body = hk.encode(doc)
    hub.store.begin_batch(NODE, doc["batch_id"], hashlib.sha256(body).hexdigest(), now=time.time())
    headers = hk.signed_headers(
        "POST",
        "/v1/batches",
        key=hub.key,
        body=body,
        content_encoding="gzip",
        idempotency_key=doc["batch_id"],
    )
    response = hub.client.post("/v1/batches", content=body, headers=headers)
    _assert_refused(response, 409, "in-flight")
    assert int(response.headers["retry-after"]) > 0


def test_more_records_than_the_limit_is_refused_413(make_hub: Callable[..., Hub]) -> None:
    hub = make_hub(max_records_per_batch=3)
    _assert_refused(
        hub.post_batch(hk.batch_doc([hk.record(i) for i in range(4)])), 413, "payload-too-large"
    )
    assert hub.post_batch(hk.batch_doc([hk.record(i) for i in range(3)])).status_code == 200


def test_a_content_length_over_the_limit_is_refused_413_before_reading(
    make_hub: Callable[..., Hub],
) -> None:
    hub = make_hub(max_body_bytes=64 * 1024)
    body, headers = hk.batch_request(hk.batch_doc([hk.record(1)]), key=hub.key)
    headers["Content-Length"] = str(64 * 1024 + 1)  # says more than the hub takes
    response = hub.client.post("/v1/batches", content=body, headers=headers)
    _assert_refused(response, 413, "payload-too-large")
    assert response.headers["connection"] == "close"


def test_a_streamed_body_over_the_limit_is_refused_413(make_hub: Callable[..., Hub]) -> None:
    hub = make_hub(max_body_bytes=64 * 1024)
    body = hk.encode(hk.batch_doc([hk.record(i) for i in range(600)]), gzipped=False)
    assert len(body) > 64 * 1024
    headers = hk.signed_headers(
        "POST", "/v1/batches", key=hub.key, body=body, idempotency_key="k-1"
    )

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    response = hub.client.post("/v1/batches", content=chunks(), headers=headers)
    _assert_refused(response, 413, "payload-too-large")


def test_a_gzip_bomb_is_refused_413_without_being_inflated(
    make_hub: Callable[..., Hub],
) -> None:
    hub = make_hub(max_decompressed_bytes=1 * MiB)
    bomb = hk.gzip_bomb(64 * MiB)  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < MiB
    headers = hk.signed_headers(
        "POST",
        "/v1/batches",
        key=hub.key,
        body=bomb,
        content_encoding="gzip",
        idempotency_key="bomb-1",
    )
    tracemalloc.start()
    try:
        response = hub.client.post("/v1/batches", content=bomb, headers=headers)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _assert_refused(response, 413, "payload-too-large")
    assert peak < 12 * MiB, f"peak {peak / MiB:.1f} MiB: the bomb was inflated"


def test_inflate_pulls_output_in_bounded_chunks_and_stops_past_the_limit() -> None:
    limit = 3 * INFLATE_CHUNK + 5
    bomb = hk.gzip_bomb(100 * MiB)
    tracemalloc.start()
    try:
        with pytest.raises(Refusal) as refused:
            inflate(bomb, "gzip", limit=limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.status == 413
    assert peak < limit + 2 * INFLATE_CHUNK + MiB
    exact = bytes(limit)
    assert inflate(gzip.compress(exact), "gzip", limit=limit) == exact  # at the limit: fine
    two_members = gzip.compress(b"ab") + gzip.compress(b"cd")
    assert inflate(two_members, "gzip", limit=limit) == b"abcd"


@pytest.mark.parametrize(
    "content",
    [gzip.compress(b"{}")[:-6], b"not gzip at all", gzip.compress(b"{}") + b"trailing"],
    ids=["truncated", "not-gzip", "trailing"],
)
def test_broken_gzip_is_refused_400(content: bytes) -> None:
    with pytest.raises(Refusal) as refused:
        inflate(content, "gzip", limit=MiB)
    assert (refused.value.status, refused.value.slug) == (400, "malformed-batch")


# --- blobs --------------------------------------------------------------------------------


def test_a_blob_is_stored_under_its_sha256_and_found_by_head(hub: Hub) -> None:
    data = b"\x00DICM" + bytes(range(256)) * 10
    path = f"/v1/blobs/sha256/{hk.sha256_hex(data)}"
    assert hub.signed("HEAD", path).status_code == 404
    first = hub.signed("PUT", path, data, content_type="application/dicom")
    assert first.status_code == 201
    assert hub.signed("PUT", path, data, content_type="application/dicom").status_code == 200
    head = hub.signed("HEAD", path)
    assert head.status_code == 200
    assert "date" in head.headers
    assert hub.blobs.read(hk.sha256_hex(data)) == data


def test_a_blob_whose_content_is_not_its_name_is_refused_400(hub: Hub) -> None:
    path = f"/v1/blobs/sha256/{hk.sha256_hex(b'other')}"
    response = hub.signed("PUT", path, b"content", content_type="application/dicom")
    _assert_refused(response, 400, "blob-digest-mismatch")
    assert hub.signed("HEAD", path).status_code == 404


def test_blob_requests_are_signed(hub: Hub) -> None:
    data = b"blob"
    path = f"/v1/blobs/sha256/{hk.sha256_hex(data)}"
    put = hub.client.put(path, content=data, headers={"Content-Type": "application/dicom"})
    _assert_refused(put, 401, "signature-missing")
    assert hub.client.head(path).status_code == 401
    stranger = hub.signed("PUT", path, data, key=Ed25519PrivateKey.generate())
    _assert_refused(stranger, 401, "signature-mismatch")


def test_a_blob_over_the_body_limit_is_refused_413(make_hub: Callable[..., Hub]) -> None:
    hub = make_hub(max_body_bytes=4096)
    data = bytes(5000)
    response = hub.signed("PUT", f"/v1/blobs/sha256/{hk.sha256_hex(data)}", data)
    _assert_refused(response, 413, "payload-too-large")


# --- reconcile, heartbeat, node view ------------------------------------------------------


def _today() -> str:
    return datetime.now(UTC).date().isoformat()


def test_reconcile_answers_count_and_digest_per_received_day(hub: Hub) -> None:
    records = [hk.record(i) for i in range(5)]
    response = hub.post_batch(hk.batch_doc(records))
    day = response.json()["received_at"][:10]
    body = json.dumps({"node_id": NODE, "days": [day, "2001-01-01"]}).encode()
    answer = hub.signed("POST", "/v1/reconcile", body)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "days": [
            {"day": day, "count": 5, "digest": wire.day_digest(r["id"] for r in records)},
            {"day": "2001-01-01", "count": 0, "digest": "0" * 64},
        ]
    }


def test_reconcile_for_another_node_is_refused_403(hub: Hub) -> None:
    body = json.dumps({"node_id": OTHER_NODE, "days": [_today()]}).encode()
    _assert_refused(hub.signed("POST", "/v1/reconcile", body), 403, "node-mismatch")


@pytest.mark.parametrize(
    "days",
    [[f"2026-01-{d:02d}" for d in range(1, 32)] * 3, ["2026-02-30"], ["26-1-1"], "2026-01-01"],
    ids=["63-days", "no-such-date", "not-a-date", "not-a-list"],
)
def test_a_malformed_reconcile_request_is_refused_400(hub: Hub, days: Any) -> None:
    body = json.dumps({"node_id": NODE, "days": days}).encode()
    _assert_refused(hub.signed("POST", "/v1/reconcile", body), 400, "malformed-request")


def _heartbeat(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "node_id": NODE,
        "version": "0.1.0",
        "pending": 12,
        "oldest_pending_age_s": 41.5,
        "dead": 0,
        "quarantined": 1,
        "buffer_bytes": 1204224,
        "clock_skew_s": -0.4,
        "adapters": [
            {
                "name": "lis",
                "kind": "hl7-mllp",
                "last_ok": "2026-11-25T12:00:00Z",
                "last_error": None,
            }
        ],
    }
    body.update(overrides)
    return body


def test_a_heartbeat_is_stored_and_answered_204(hub: Hub) -> None:
    body = json.dumps(_heartbeat()).encode()
    response = hub.signed("POST", f"/v1/nodes/{NODE}/heartbeat", body)
    assert response.status_code == 204
    assert response.content == b""
    info = hub.store.node(NODE)
    assert info is not None
    assert info.heartbeat == _heartbeat()


def test_a_heartbeat_keeps_the_siam_id_and_drops_unknown_fields(hub: Hub) -> None:
    body = json.dumps(_heartbeat(siam_id="12345", gossip="not kept")).encode()
    assert hub.signed("POST", f"/v1/nodes/{NODE}/heartbeat", body).status_code == 204
    info = hub.store.node(NODE)
    assert info is not None
    assert info.heartbeat == {**_heartbeat(), "siam_id": "12345"}


def test_a_heartbeat_for_another_node_is_refused_403(hub: Hub) -> None:
    body = json.dumps(_heartbeat()).encode()
    _assert_refused(hub.signed("POST", f"/v1/nodes/{OTHER_NODE}/heartbeat", body), 403, "forbidden")
    body = json.dumps(_heartbeat(node_id=OTHER_NODE)).encode()
    _assert_refused(hub.signed("POST", f"/v1/nodes/{NODE}/heartbeat", body), 403, "node-mismatch")


@pytest.mark.parametrize(
    ("field", "value"),
    [("pending", -1), ("version", None), ("clock_skew_s", "0"), ("adapters", [{"name": "x"}])],
)
def test_a_malformed_heartbeat_is_refused_400(hub: Hub, field: str, value: Any) -> None:
    body = json.dumps(_heartbeat(**{field: value})).encode()
    response = hub.signed("POST", f"/v1/nodes/{NODE}/heartbeat", body)
    _assert_refused(response, 400, "malformed-request")
    assert response.json()["detail"].startswith(field)


def test_an_oversized_heartbeat_is_refused_413(hub: Hub) -> None:
    body = json.dumps(_heartbeat(version="x" * 70_000)).encode()
    _assert_refused(
        hub.signed("POST", f"/v1/nodes/{NODE}/heartbeat", body), 413, "payload-too-large"
    )


def test_a_node_sees_what_the_hub_holds_from_it(hub: Hub) -> None:
    hub.post_batch(hk.batch_doc([hk.record(1), hk.record(2, service="imaging-study")]))
    response = hub.signed("GET", f"/v1/nodes/{NODE}")
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["records"] == 2
    assert view["records_by_service"] == {"imaging-study": 1, "lab-result": 1}
    assert view["last_batch_at"].endswith("Z")


def test_a_node_may_not_see_another_node_403(hub: Hub) -> None:
    _assert_refused(hub.signed("GET", f"/v1/nodes/{OTHER_NODE}"), 403, "forbidden")


def test_the_signature_covers_the_raw_path_as_sent(hub: Hub) -> None:
    path = f"/v1/nodes/{NODE.replace('-', '%2D')}"  # the same resource, percent-encoded
    assert hub.signed("GET", path).status_code == 200
    headers = hk.signed_headers("GET", f"/v1/nodes/{NODE}", key=hub.key)
    _assert_refused(hub.client.get(path, headers=headers), 401, "signature-mismatch")


# --- unsigned routes and the envelope of every response ----------------------------------


def test_health_is_unsigned(hub: Hub) -> None:
    response = hub.client.get("/v1/health")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_the_openapi_document_lists_every_route(hub: Hub) -> None:
    response = hub.client.get("/v1/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.1")
    served = {
        (route.path, method.lower())
        for route in hub.app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if not (method == "HEAD" and "GET" in (route.methods or ()))  # implied by GET
    }
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert served == documented


def test_unknown_routes_and_methods_are_problems_too(hub: Hub) -> None:
    _assert_refused(hub.client.get("/v1/nothing"), 404, "not-found")
    _assert_refused(hub.client.get("/v1/batches"), 405, "method-not-allowed")


def test_every_response_carries_date(hub: Hub) -> None:
    responses = [
        hub.client.get("/v1/health"),
        hub.client.get("/v1/openapi.json"),
        hub.client.get("/v1/nothing"),
        hub.client.post("/v1/batches"),
        hub.post_batch(hk.batch_doc([hk.record(1)])),
        hub.signed("GET", f"/v1/nodes/{NODE}"),
        hub.signed("HEAD", f"/v1/blobs/sha256/{'ab' * 32}"),
    ]
    for response in responses:
        date = response.headers.get_list("date")
        assert len(date) == 1, response.request.url
        assert (
            abs(
                datetime.strptime(date[0], "%a, %d %b %Y %H:%M:%S GMT")
                .replace(tzinfo=UTC)
                .timestamp()
                - time.time()
            )
            < 60
        )


def test_past_max_connections_requests_at_once_the_hub_answers_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteStore(tmp_path / "hub.db")
    key = Ed25519PrivateKey.generate()
    hk.register(store, NODE, key)
    settings = HubSettings.model_validate({"server": {"max_connections": 1}})
    app = create_app(settings, store, blobs=BlobStore(tmp_path / "blobs"))
    gate = threading.Event()
    real_active_keys = store.active_keys

    def slow_active_keys(node_id: str) -> list[bytes]:
        gate.wait(timeout=10)  # the first request stays in flight until the gate opens
        return real_active_keys(node_id)

    monkeypatch.setattr(store, "active_keys", slow_active_keys)
    first: list[httpx.Response] = []

    async def scenario() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://hub.test") as client,
            anyio.create_task_group() as tg,
        ):

            async def send_first() -> None:
                headers = hk.signed_headers("GET", f"/v1/nodes/{NODE}", key=key)
                first.append(await client.get(f"/v1/nodes/{NODE}", headers=headers))

            tg.start_soon(send_first)
            with anyio.fail_after(10):
                while _in_flight(app) == 0:
                    await anyio.sleep(0.001)
            second = await client.get("/v1/health")
            gate.set()
        return second

    try:
        second = anyio.run(scenario)
    finally:
        gate.set()
        store.close()
    _assert_refused(second, 503, "overloaded")
    assert int(second.headers["retry-after"]) > 0
    assert first[0].status_code == 200  # the request in flight was served


def _in_flight(app: Any) -> int:
    layer = app.middleware_stack
    while layer is not None and not hasattr(layer, "in_flight"):
        layer = getattr(layer, "app", None)
    return 0 if layer is None else int(layer.in_flight)


def test_every_problem_slug_has_a_title() -> None:
    slugs = {p.value for p in wire.SignatureProblem}
    assert slugs <= set(TITLES)
