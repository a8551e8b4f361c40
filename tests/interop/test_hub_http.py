"""The hub over real HTTP: uvicorn on 127.0.0.1, httpx as the node, raw sockets where a
client library would hide what is being tested, and the independent RFC 9421
implementation `http_message_signatures` as a second, foreign signer."""

from __future__ import annotations

import gzip
import socket
import time
from collections.abc import Callable

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from http_message_signatures import HTTPMessageSigner, MappingKeyResolver, algorithms

from agent import wire
from tests import hubkit as hk
from tests.hubkit import NODE
from tests.interop.conftest import LiveHub

MiB = 1024 * 1024
BATCH_COMPONENTS = ("@method", "@path", "content-type", "content-digest", "idempotency-key")


def _post(hub: LiveHub, body: bytes, headers: dict[str, str]) -> httpx.Response:
    with httpx.Client(base_url=hub.base_url, timeout=10) as client:
        return client.post("/v1/batches", content=body, headers=headers)


def _slug(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/problem+json"
    return str(response.json()["type"]).removeprefix(wire.PROBLEM_BASE)


def _raw_exchange(hub: LiveHub, head: bytes, body_chunks: list[bytes]) -> bytes:
    """Send a request over a plain socket; return what the server answers."""
    with socket.create_connection((hub.host, hub.port), timeout=10) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the hub stopped reading: what matters is what it answered
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
                if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                    break
        except ConnectionResetError:
            pass
    return answer


def test_a_signed_gzip_batch_round_trips_over_http(live_hub: LiveHub) -> None:
    records = [hk.record(i) for i in range(20)]
    doc = hk.batch_doc(records)
    response = _post(live_hub, *hk.batch_request(doc, key=live_hub.key))
    assert response.status_code == 200, response.text
    assert [r["status"] for r in response.json()["results"]] == ["accepted"] * 20
    assert len(response.headers.get_list("date")) == 1
    assert "server" not in response.headers
    assert live_hub.store.counts_by_service(NODE) == {"lab-result": 20}


def test_a_retry_signed_afresh_gets_the_stored_response(live_hub: LiveHub) -> None:
    doc = hk.batch_doc([hk.record(1), hk.record(2)])
    first = _post(live_hub, *hk.batch_request(doc, key=live_hub.key))
    again = _post(live_hub, *hk.batch_request(doc, key=live_hub.key))
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content


def test_a_tampered_body_is_refused_400(live_hub: LiveHub) -> None:
    body, headers = hk.batch_request(hk.batch_doc([hk.record(1)]), key=live_hub.key, gzipped=False)
    tampered = body.replace(b'"lab-result"', b'"mortality"')
    response = _post(live_hub, tampered, headers)
    assert response.status_code == 400
    assert _slug(response) == "digest-mismatch"


def test_a_request_signed_with_another_key_is_refused_401(live_hub: LiveHub) -> None:
    doc = hk.batch_doc([hk.record(1)])
    response = _post(live_hub, *hk.batch_request(doc, key=Ed25519PrivateKey.generate()))
    assert response.status_code == 401
    assert _slug(response) == "signature-mismatch"


def test_a_stale_signature_is_refused_401(live_hub: LiveHub) -> None:
    doc = hk.batch_doc([hk.record(1)])
    stale = int(time.time()) - 3600
    response = _post(live_hub, *hk.batch_request(doc, key=live_hub.key, created=stale))
    assert response.status_code == 401
    assert _slug(response) == "created-out-of-window"


def test_a_replayed_request_is_refused_401_nonce_replayed(live_hub: LiveHub) -> None:
    body, headers = hk.batch_request(hk.batch_doc([hk.record(1)]), key=live_hub.key)
    assert _post(live_hub, body, headers).status_code == 200
    replay = _post(live_hub, body, headers)  # captured and sent again, byte for byte
    assert replay.status_code == 401
    assert _slug(replay) == "nonce-replayed"


def test_a_gzip_bomb_is_refused_413(start_hub: Callable[..., LiveHub]) -> None:
    hub = start_hub(max_decompressed_bytes=1 * MiB)
    bomb = hk.gzip_bomb(64 * MiB)
    headers = hk.signed_headers(
        "POST",
        "/v1/batches",
        key=hub.key,
        body=bomb,
        content_encoding="gzip",
        idempotency_key="bomb",
    )
    response = _post(hub, bomb, headers)
    assert response.status_code == 413
    assert _slug(response) == "payload-too-large"


def test_an_oversized_content_length_is_refused_413_before_the_body(
    start_hub: Callable[..., LiveHub],
) -> None:
    hub = start_hub(max_body_bytes=64 * 1024)
    head = (
        b"POST /v1/batches HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1073741824\r\n\r\n"
    )
    answer = _raw_exchange(hub, head, [])  # not one byte of the gigabyte is sent
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"payload-too-large" in answer


def test_an_unsigned_oversized_request_is_refused_without_the_hub_reading_its_body(
    start_hub: Callable[..., LiveHub],
) -> None:
    # Under the 64 MiB drain bound, a signed sender's excess is read and discarded so
    # its 413 arrives; an unsigned one is refused on its headers and nothing is read.
    hub = start_hub(max_body_bytes=64 * 1024)
    head = (
        b"POST /v1/batches HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1048576\r\n\r\n"
    )
    started = time.monotonic()
    answer = _raw_exchange(hub, head, [])  # the megabyte is never sent
    assert time.monotonic() - started < 5  # answered at once, not after a drain timeout
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert b"signature-missing" in answer


def test_an_oversized_chunked_body_is_refused_413_at_the_limit(
    start_hub: Callable[..., LiveHub],
) -> None:
    hub = start_hub(max_body_bytes=64 * 1024)
    body = hk.encode(hk.batch_doc([hk.record(i) for i in range(800)]), gzipped=False)
    assert len(body) > 2 * 64 * 1024
    headers = hk.signed_headers("POST", "/v1/batches", key=hub.key, body=body, idempotency_key="c")
    head = b"POST /v1/batches HTTP/1.1\r\nHost: hub\r\nTransfer-Encoding: chunked\r\n"
    head += b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"
    chunks = [
        f"{len(body[i : i + 16384]):x}\r\n".encode() + body[i : i + 16384] + b"\r\n"
        for i in range(0, len(body), 16384)
    ] + [b"0\r\n\r\n"]
    answer = _raw_exchange(hub, head, chunks)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"payload-too-large" in answer


def test_a_request_signed_by_an_independent_rfc9421_library_is_accepted(
    live_hub: LiveHub,
) -> None:
    doc = hk.batch_doc([hk.record(1)])
    body = gzip.compress(hk.encode(doc, gzipped=False))
    signer = HTTPMessageSigner(
        signature_algorithm=algorithms.ED25519,
        key_resolver=MappingKeyResolver(public_keys={}, private_keys={NODE: live_hub.key}),
    )
    with httpx.Client(base_url=live_hub.base_url, timeout=10) as client:
        request = client.build_request(
            "POST",
            "/v1/batches",
            content=body,
            headers={
                "Content-Type": "application/json",
                "Content-Encoding": "gzip",
                "Content-Digest": wire.content_digest(body),
                "Idempotency-Key": doc["batch_id"],
            },
        )
        signer.sign(
            request,
            key_id=NODE,
            nonce=wire.new_nonce(),
            label="sig1",
            tag="sepas-v1",
            covered_component_ids=BATCH_COMPONENTS,
            body=body,
            use_existing_digest=True,
        )
        response = client.send(request)
    assert response.status_code == 200, response.text
    assert response.json()["results"] == [{"id": doc["records"][0]["id"], "status": "accepted"}]


def test_a_blob_and_a_node_view_over_http(live_hub: LiveHub) -> None:
    data = b"\x00" * 128 + b"DICM" + bytes(range(256))
    path = f"/v1/blobs/sha256/{hk.sha256_hex(data)}"
    with httpx.Client(base_url=live_hub.base_url, timeout=10) as client:
        put_headers = hk.signed_headers(
            "PUT", path, key=live_hub.key, body=data, content_type="application/dicom"
        )
        assert client.put(path, content=data, headers=put_headers).status_code == 201
        head = client.head(path, headers=hk.signed_headers("HEAD", path, key=live_hub.key))
        assert head.status_code == 200
        view = client.get(
            f"/v1/nodes/{NODE}",
            headers=hk.signed_headers("GET", f"/v1/nodes/{NODE}", key=live_hub.key),
        )
        assert view.status_code == 200
        assert view.json()["node_id"] == NODE


@pytest.mark.parametrize("path", ["/v1/health", "/v1/nothing", "/v1/batches"])
def test_every_response_has_exactly_one_date_header(live_hub: LiveHub, path: str) -> None:
    with httpx.Client(base_url=live_hub.base_url, timeout=10) as client:
        response = client.get(path)
    assert len(response.headers.get_list("date")) == 1
