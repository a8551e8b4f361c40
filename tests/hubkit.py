"""Helpers for hub tests: synthetic records, batches, and requests signed the way a
node signs them (`agent.wire.sign_request`). No real patient ever: names and national
codes are made up."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import uuid
import zlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, NoReturn

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import wire
from agent.keys import fingerprint, public_pem
from agent.record import PatientRef, RawRef, Record, Service, SourceRef, hl7_id

NODE = "FAC-0001"
OTHER_NODE = "FAC-0002"
TEHRAN = timezone(timedelta(hours=3, minutes=30))
#: Fixture patient data; tests assert that none of it leaks into responses or logs.
PATIENT_NAME = "زهرا کریمی"
NATIONAL_ID = "0012345679"  # made up, valid check digit
PHI_STRINGS = (PATIENT_NAME, NATIONAL_ID, "MRN-7781")


def require_peer(name: str, reason: str = "") -> NoReturn:
    """Call when a real peer (PostgreSQL, Orthanc…) is absent: skips the test, or fails
    it under ``SEPAS_REQUIRE_PEERS=1`` (CI installs every peer)."""
    message = f"peer {name} is not available" + (f": {reason}" if reason else "")
    if os.environ.get("SEPAS_REQUIRE_PEERS") == "1":
        pytest.fail(message + " (SEPAS_REQUIRE_PEERS=1)")
    pytest.skip(message)


def register(store: Any, node_id: str, key: Ed25519PrivateKey) -> None:
    """Register ``key``'s public half for ``node_id`` in a hub store."""
    store.add_node_key(node_id, public_pem(key).encode("ascii"), fingerprint(key))


def record(i: int, *, node: str = NODE, **overrides: Any) -> dict[str, Any]:
    """RECORD number ``i`` as a node sends it (PROTOCOL.md); same ``i``, same id."""
    raw = f"MSH|^~\\&|LIS|FAC|SEPAS|NODE|20251121093000||ORU^R01|MSG{i:08d}|P|2.5\r".encode()
    rec = Record(
        id=hl7_id(node, "lis", f"MSG{i:08d}", "20251121093000"),
        service=Service.LAB_RESULT,
        occurred_at=datetime(2025, 11, 21, 9, 30, tzinfo=TEHRAN),
        captured_at=datetime(2025, 11, 21, 6, 0, 2, tzinfo=UTC),
        source=SourceRef(adapter="lis", kind="hl7-mllp", ref=f"MSG{i:08d}"),
        patient=PatientRef(national_id=NATIONAL_ID, national_id_valid=True, local_id="MRN-7781"),
        body={
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {"resource": {"resourceType": "Patient", "name": [{"text": PATIENT_NAME}]}},
                {"resource": {"resourceType": "Observation", "status": "final"}},
            ],
        },
        raw=RawRef.of(raw, "application/hl7-v2"),
    )
    wire_rec = rec.to_wire()
    wire_rec.update(overrides)
    return wire_rec


def batch_doc(
    records: Iterable[Mapping[str, Any]], *, node: str = NODE, batch_id: str | None = None
) -> dict[str, Any]:
    return {
        "sepas_batch": 1,
        "batch_id": batch_id or str(uuid.uuid4()),
        "node_id": node,
        "created_at": "2025-11-21T06:00:05Z",
        "records": list(records),
    }


def encode(doc: Mapping[str, Any], *, gzipped: bool = True) -> bytes:
    data = json.dumps(doc, ensure_ascii=False).encode("utf-8")
    return gzip.compress(data, mtime=0) if gzipped else data


def gzip_bomb(inflated_bytes: int) -> bytes:
    """Gzip of ``inflated_bytes`` zeros, made in 1 MiB steps (never held whole)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    parts = []
    left = inflated_bytes
    while left > 0:
        step = min(left, len(zeros))
        parts.append(comp.compress(zeros[:step]))
        left -= step
    parts.append(comp.flush())
    return b"".join(parts)


def signed_headers(
    method: str,
    path: str,
    *,
    key: Ed25519PrivateKey,
    node: str = NODE,
    body: bytes | None = None,
    content_type: str = "application/json",
    content_encoding: str | None = None,
    idempotency_key: str | None = None,
    created: int | None = None,
    nonce: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Headers of a request signed as PROTOCOL.md says (what the node's uploader sends)."""
    headers: dict[str, str] = {}
    if body is not None:
        headers["Content-Type"] = content_type
        headers["Content-Digest"] = wire.content_digest(body)
        if content_encoding is not None:
            headers["Content-Encoding"] = content_encoding
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    headers.update(extra or {})
    headers |= wire.sign_request(
        method=method,
        path=path,
        headers=headers,
        key=key,
        key_id=node,
        created=created,
        nonce=nonce,
    )
    return headers


def batch_request(
    doc: Mapping[str, Any],
    *,
    key: Ed25519PrivateKey,
    node: str = NODE,
    gzipped: bool = True,
    **kwargs: Any,
) -> tuple[bytes, dict[str, str]]:
    """(content, headers) of a signed POST /v1/batches for ``doc``."""
    body = encode(doc, gzipped=gzipped)
    headers = signed_headers(
        "POST",
        "/v1/batches",
        key=key,
        node=node,
        body=body,
        content_encoding="gzip" if gzipped else "identity",
        idempotency_key=kwargs.pop("idempotency_key", doc["batch_id"]),
        **kwargs,
    )
    return body, headers


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class AppClient:
    """A synchronous client for an ASGI app, through httpx's ASGITransport (no
    sockets; the app's lifespan is not run). Starlette's TestClient is deprecated
    with httpx, so this is the thin seam the unit tests use."""

    def __init__(self, app: Any, base_url: str = "http://hub.test") -> None:
        self.app = app
        self.base_url = base_url

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url=self.base_url) as client:
                return await client.request(method, path, **kwargs)

        return anyio.run(go)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def head(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("HEAD", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", path, **kwargs)
