"""The hub's HTTP API: PROTOCOL.md's routes as a Starlette (ASGI) application.

Responsibility: accept exactly what PROTOCOL.md describes and refuse everything else
with the status it names, as ``application/problem+json`` (RFC 9457) whose ``type``
comes from `agent.wire.problem_type`. The contract's byte-exact parts (signature
base, Content-Digest) come from `agent.wire`, shared with the node; storage from a
`hub.store.HubStore`; request content is read by `hub.batch`.

A batch upload is checked in this order, cheapest and least trusting first:
1. ``Content-Length`` over ``limits.max_body_bytes``: 413 before using anything
   (the content is read and discarded first, so that the 413 reaches the sender:
   `_drain`).
2. The signature (RFC 9421) over the raw request path, against the keyid's active
   keys (401 ``unknown-key`` / ``key-revoked`` / the `agent.wire.SignatureProblem`),
   then the nonce, remembered for twice the allowed skew (401 ``nonce-replayed``).
   Nothing of the content is read before the sender is known.
3. ``Content-Type`` and ``Content-Encoding`` (415), ``Idempotency-Key`` present (400).
4. The content, read up to the limit and no further (413), then ``Content-Digest``
   over it as received, before any decompression (400 ``digest-mismatch``).
5. The Idempotency-Key claim: a replay answers the stored response with
   ``Idempotent-Replayed: true``; another digest is 422; still in flight is 409.
6. Bounded decompression (413), JSON (400), the envelope (``node_id`` 401,
   ``batch_id`` 400, record count 413), each record (rejected with the field named).
7. The store commits the records and the response in one transaction.
From step 5 on, any failure releases the claim (`HubStore.abandon_batch`) so that a
retry is processed afresh.

Invariants:
- Every response carries ``Date`` (nodes measure their clock skew with it); uvicorn's
  own Date header is turned off by ``sepas-hub serve`` so there is exactly one.
- No problem body and no log line carries patient data: details name fields, never
  their values; logs carry node ids, batch ids, counts and problem slugs.
- Blocking work (the store, decompression, JSON) runs in the thread pool; the event
  loop only moves bytes.

Bounds: the app answers 503 (problem+json, ``Retry-After``, ``Date``) past
``server.max_connections`` requests in process at once, per worker. ``sepas-hub serve``
also passes uvicorn ``limit_concurrency`` = twice that (a backstop against idle
connection floods; uvicorn's own 503 there is plain text) and the listen backlog.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from email.utils import formatdate
from functools import lru_cache
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import anyio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent import wire
from agent.errors import SepasError, StorageError
from agent.keys import load_public_key_pem
from hub.batch import (
    Batch,
    Refusal,
    inflate,
    parse_json_object,
    read_batch,
    read_heartbeat,
    read_reconcile,
)
from hub.blobs import BlobStore, is_sha256_hex
from hub.openapi import openapi_document
from hub.settings import (
    SETTINGS_ENV,
    HubSettings,
    LimitSettings,
    load_settings,
    open_store,
    resolve_config_path,
    validate_settings,
)
from hub.store import ClaimState, HubStore

log = logging.getLogger(__name__)
access_log = logging.getLogger("hub.access")

#: Bound on reconcile and heartbeat content, on the wire and decompressed.
MAX_SMALL_BODY_BYTES: Final = 64 * 1024
#: Longest Idempotency-Key accepted (a UUID is 36 characters).
MAX_IDEMPOTENCY_KEY_CHARS: Final = 200
#: How often idempotency entries and nonces past their time are forgotten.
EXPIRE_EVERY_SECS: Final = 3600.0
#: What a 409 asks the node to wait before trying the same batch again.
IN_FLIGHT_RETRY_AFTER_SECS: Final = 5
#: What a 503 (store busy or unreachable) asks the node to wait.
STORE_RETRY_AFTER_SECS: Final = 10
#: What a 503 (too many requests at once) asks the node to wait.
OVERLOAD_RETRY_AFTER_SECS: Final = 5
#: A request refused for its declared size is read to its end and discarded before
#: the 413 goes out (`_drain`) when it declares at most this many bytes, and for at
#: most `DRAIN_MAX_SECS`. Above any batch a node makes (hub.batch_max_bytes <= 16 MiB).
DRAIN_MAX_BYTES: Final = 64 * 1024 * 1024
DRAIN_MAX_SECS: Final = 30.0

#: Problem titles (RFC 9457 ``title``: the same for every occurrence of a type).
#: Slugs are stable: nodes and dashboards match on them; add, never rename.
TITLES: Final[Mapping[str, str]] = {
    # signature checks of agent.wire (SignatureProblem)
    "signature-missing": "Request is not signed",
    "signature-malformed": "Signature headers are malformed",
    "unsupported-algorithm": "Signature algorithm is not ed25519",
    "wrong-tag": "Signature tag is not sepas-v1",
    "component-not-covered": "Signature does not cover a required component",
    "created-out-of-window": "Signature created time is outside the allowed window",
    "signature-mismatch": "Signature does not verify",
    # the hub's own
    "unknown-key": "Key id is not registered",
    "key-revoked": "Node's keys are revoked",
    "nonce-replayed": "Nonce was already used",
    "node-mismatch": "node_id is not the signing node",
    "forbidden": "Signing node may not access this resource",
    "digest-mismatch": "Content-Digest does not match the content",
    "payload-too-large": "Request is over the hub's limits",
    "unsupported-media-type": "Content-Type or Content-Encoding is not accepted",
    "malformed-batch": "Batch is malformed",
    "malformed-request": "Request content is malformed",
    "idempotency-key-missing": "Idempotency-Key is missing or malformed",
    "idempotency-key-mismatch": "batch_id is not the Idempotency-Key",
    "in-flight": "A request with this Idempotency-Key is still being processed",
    "idempotency-conflict": "Idempotency-Key was used with other content",
    "blob-digest-mismatch": "Content's SHA-256 is not the blob's name",
    "not-found": "Not found",
    "method-not-allowed": "Method not allowed",
    "store-unavailable": "The hub's store is busy or unreachable",
    "overloaded": "The hub is at its limit of concurrent requests",
    "internal-error": "Internal error",
}


class LineFormatter(logging.Formatter):
    """``LEVEL message key=value …``: the message plus the hub's structured extras
    (node ids, batch ids, counts, problem slugs; never patient data). Used by
    ``sepas-hub serve`` for the ``hub`` loggers."""

    FIELDS: Final = (
        "event",
        "node",
        "batch",
        "accepted",
        "duplicate",
        "rejected",
        "route",
        "status",
        "problem",
        "error",
        "where",
        "ms",
    )

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{name}={record.__dict__[name]}" for name in self.FIELDS if name in record.__dict__
        )
        line = f"{record.levelname} {record.getMessage()}"
        return f"{line} {extras}" if extras else line


def problem(
    status: int, slug: str, detail: str, *, headers: Mapping[str, str] | None = None
) -> Response:
    """An RFC 9457 problem response; ``detail`` must not carry patient data."""
    body = {
        "type": wire.problem_type(slug),
        "title": TITLES.get(slug) or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    return Response(
        json.dumps(body).encode("ascii"),
        status_code=status,
        media_type="application/problem+json",
        headers=dict(headers or {}),
    )


def rfc3339(ts: float) -> str:
    """UNIX time as RFC 3339 UTC with milliseconds: ``2026-11-25T12:00:00.123Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


# --- the application ----------------------------------------------------------------------


class Hub:
    """What the route handlers share: settings, store, blobs, clock."""

    def __init__(
        self,
        settings: HubSettings,
        store: HubStore,
        blobs: BlobStore,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.limits: LimitSettings = settings.limits
        self.store = store
        self.blobs = blobs
        self.clock = clock

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a blocking function (the store, parsing) in the thread pool."""
        return await run_in_threadpool(fn, *args, **kwargs)

    async def authenticate(self, request: Request, *, has_content: bool) -> str:
        """Verify the request's signature and nonce; return the signing node's id.

        Raises:
            Refusal: 401 with the reason's slug.
        """
        headers = request.headers
        try:
            sig = wire.parse_signature_headers(headers)
        except wire.SignatureInvalidError as err:
            raise Refusal(401, err.problem.value, err.detail) from None
        pems: list[bytes] = await self.run(self.store.active_keys, sig.keyid)
        if not pems:
            if await self.run(self.store.node, sig.keyid) is None:
                raise Refusal(401, "unknown-key", "the keyid is not registered at this hub")
            raise Refusal(401, "key-revoked", "the node's keys are revoked at this hub")
        now = self.clock()
        try:
            wire.verify_request(
                method=request.method,
                path=_raw_path(request.scope),
                headers=headers,
                public_keys=[_public_key(pem) for pem in pems],
                now=now,
                max_skew_secs=self.limits.max_skew_secs,
                has_content=has_content,
            )
        except wire.SignatureInvalidError as err:
            raise Refusal(401, err.problem.value, err.detail) from None
        # A signature verifies while |created - now| <= skew, so a replay of one received
        # now could still verify until 2 x skew from now: remember the nonce that long.
        fresh = await self.run(
            self.store.remember_nonce,
            sig.keyid,
            sig.nonce,
            now=now,
            ttl_secs=2 * self.limits.max_skew_secs,
        )
        if not fresh:
            raise Refusal(
                401, "nonce-replayed", "this nonce was already used; sign each request afresh"
            )
        return sig.keyid

    # -- routes --------------------------------------------------------------------------

    async def post_batch(self, request: Request) -> Response:
        limit = self.limits.max_body_bytes
        await _check_content_length(
            request, limit, lambda: self.authenticate(request, has_content=True)
        )
        node_id = await self.authenticate(request, has_content=True)
        encoding = _check_media(request, json_only=True)
        key = request.headers.get("idempotency-key", "")
        if not key or len(key) > MAX_IDEMPOTENCY_KEY_CHARS or not key.isascii():
            raise Refusal(
                400,
                "idempotency-key-missing",
                "a batch upload needs an Idempotency-Key (the batch_id)",
            )
        body = await _read_body(request, limit)
        _check_digest(request, body)
        digest = hashlib.sha256(body).hexdigest()
        claim = await self.run(self.store.begin_batch, node_id, key, digest, now=self.clock())
        if claim.state is ClaimState.REPLAY:
            return Response(
                claim.response or b"",
                media_type="application/json",
                headers={"Idempotent-Replayed": "true"},
            )
        if claim.state is ClaimState.CONFLICT:
            raise Refusal(
                422, "idempotency-conflict", "this Idempotency-Key was used with other content"
            )
        if claim.state is ClaimState.IN_FLIGHT:
            raise Refusal(
                409,
                "in-flight",
                "a request with this Idempotency-Key is still being processed",
                headers={"Retry-After": str(IN_FLIGHT_RETRY_AFTER_SECS)},
            )
        try:
            return await self._process_batch(node_id, key, body, encoding)
        except BaseException:
            # Release the claim so a retry is processed afresh. After a commit this
            # is a no-op (only an in-flight claim is deleted). Shielded: it must run
            # even when the request is being cancelled.
            with anyio.CancelScope(shield=True):
                try:
                    await self.run(self.store.abandon_batch, node_id, key)
                except Exception as err:  # noqa: BLE001 - the original error matters more
                    log.error(
                        "Could not release a batch claim; a retry gets 409 until it goes stale.",
                        extra={
                            "event": "hub.claim_release_failed",
                            "node": node_id,
                            "error": type(err).__name__,
                        },
                    )
            raise

    async def _process_batch(self, node_id: str, key: str, body: bytes, encoding: str) -> Response:
        limits = self.limits

        def decode() -> Batch:
            data = inflate(body, encoding, limit=limits.max_decompressed_bytes)
            doc = parse_json_object(data)
            return read_batch(
                doc,
                node_id=node_id,
                idempotency_key=key,
                max_records=limits.max_records_per_batch,
            )

        batch = await self.run(decode)
        received_at = self.clock()
        counts = {"accepted": 0, "duplicate": 0, "rejected": 0}

        def respond(inserted: set[str]) -> bytes:
            results = batch.results(inserted)
            counts.update(dict.fromkeys(counts, 0))  # a store may call respond again
            for item in results:
                counts[item["status"]] += 1
            return batch.response(results, rfc3339(received_at))

        response = await self.run(
            self.store.commit_batch,
            node_id,
            key,
            batch.records,
            received_at=received_at,
            respond=respond,
        )
        log.info(
            "Batch stored.",
            extra={"event": "hub.batch_stored", "node": node_id, "batch": key[:64], **counts},
        )
        return Response(response, media_type="application/json")

    async def put_blob(self, request: Request) -> Response:
        name = request.path_params["hex"]
        limit = self.limits.max_body_bytes
        await _check_content_length(
            request, limit, lambda: self.authenticate(request, has_content=True)
        )
        await self.authenticate(request, has_content=True)
        _check_media(request, json_only=False, identity_only=True)
        if not is_sha256_hex(name):
            raise Refusal(400, "malformed-request", "the blob name must be 64 lower-case hex")
        body = await _read_body(request, limit)
        _check_digest(request, body)
        if hashlib.sha256(body).hexdigest() != name:
            raise Refusal(
                400, "blob-digest-mismatch", "the content's SHA-256 is not the name in the path"
            )
        created = await self.run(self.blobs.put, name, body)
        return Response(status_code=201 if created else 200)

    async def head_blob(self, request: Request) -> Response:
        name = request.path_params["hex"]
        await self.authenticate(request, has_content=False)
        if not is_sha256_hex(name):
            raise Refusal(400, "malformed-request", "the blob name must be 64 lower-case hex")
        held = await self.run(self.blobs.has, name)
        return Response(status_code=200 if held else 404)

    async def get_node(self, request: Request) -> Response:
        node_id = request.path_params["node_id"]
        keyid = await self.authenticate(request, has_content=False)
        if keyid != node_id:
            raise Refusal(403, "forbidden", "a node may only see its own view")
        info = await self.run(self.store.node, node_id)
        by_service: dict[str, int] = await self.run(self.store.counts_by_service, node_id)
        last = None if info is None else info.last_batch_at
        return JSONResponse(
            {
                "node_id": node_id,
                "records": sum(by_service.values()),
                "records_by_service": by_service,
                "last_batch_at": None if last is None else rfc3339(last),
            }
        )

    async def post_reconcile(self, request: Request) -> Response:
        keyid, doc = await self._small_signed_json(request)
        node_id, days = read_reconcile(doc, max_days=self.limits.max_reconcile_days)
        if node_id != keyid:
            raise Refusal(403, "node-mismatch", "node_id: is not the signing node")
        digests = await self.run(self.store.day_digests, node_id, days)
        return JSONResponse(
            {"days": [{"day": d.day, "count": d.count, "digest": d.digest} for d in digests]}
        )

    async def post_heartbeat(self, request: Request) -> Response:
        node_id = request.path_params["node_id"]
        keyid, doc = await self._small_signed_json(request, path_node=node_id)
        body = read_heartbeat(doc)
        if body["node_id"] != keyid:
            raise Refusal(403, "node-mismatch", "node_id: is not the signing node")
        await self.run(self.store.save_heartbeat, keyid, body, now=self.clock())
        return Response(status_code=204)

    async def _small_signed_json(
        self, request: Request, *, path_node: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Signed JSON content of at most `MAX_SMALL_BODY_BYTES`: reconcile, heartbeat."""
        await _check_content_length(request, MAX_SMALL_BODY_BYTES)
        keyid = await self.authenticate(request, has_content=True)
        if path_node is not None and path_node != keyid:
            raise Refusal(403, "forbidden", "a node may only send its own heartbeat")
        encoding = _check_media(request, json_only=True)
        body = await _read_body(request, MAX_SMALL_BODY_BYTES)
        _check_digest(request, body)

        def decode() -> dict[str, Any]:
            data = inflate(body, encoding, limit=MAX_SMALL_BODY_BYTES, slug="malformed-request")
            return parse_json_object(data, slug="malformed-request")

        return keyid, await self.run(decode)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def expire_forever(self) -> None:
        """Forget idempotency entries and nonces past their time, every hour."""
        ttl = self.limits.idempotency_ttl_days * 86_400.0
        while True:
            try:
                await self.run(self.store.expire, now=self.clock(), idempotency_ttl_secs=ttl)
            except Exception as err:  # noqa: BLE001 - a failed sweep is retried next hour
                log.warning(
                    "Could not expire old idempotency entries; will retry.",
                    extra={"event": "hub.expire_failed", "error": type(err).__name__},
                )
            await anyio.sleep(EXPIRE_EVERY_SECS)


# --- request helpers ----------------------------------------------------------------------


@lru_cache(maxsize=1024)
def _public_key(pem: bytes) -> Ed25519PublicKey:
    return load_public_key_pem(pem)


def _raw_path(scope: Scope) -> str:
    """The request path exactly as sent (percent-encoding intact): what was signed."""
    raw = scope.get("raw_path")
    if isinstance(raw, bytes):
        return raw.decode("latin-1")  # wire refuses non-ASCII as signature-malformed
    return quote(scope.get("root_path", "") + scope["path"])


async def _check_content_length(
    request: Request, limit: int, authenticate: Callable[[], Awaitable[object]] | None = None
) -> None:
    value = request.headers.get("content-length")
    if value is None:
        return
    if not value.isascii() or not value.isdigit():
        raise Refusal(400, "malformed-request", "Content-Length is not a number")
    if int(value) > limit:
        if int(value) <= DRAIN_MAX_BYTES and authenticate is not None:
            # Only a sender whose signature verifies gets its content read and thrown
            # away: an unknown client cannot make the hub read 64 MiB per request.
            await authenticate()
            await _drain(request)
        raise Refusal(
            413,
            "payload-too-large",
            f"the content is over the hub's limit of {limit} bytes",
            headers={"Connection": "close"},
        )


def _check_media(request: Request, *, json_only: bool, identity_only: bool = False) -> str:
    """Check Content-Type and Content-Encoding; return the encoding (gzip or identity)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if json_only and media_type != "application/json":
        raise Refusal(415, "unsupported-media-type", "Content-Type must be application/json")
    if not media_type:
        raise Refusal(415, "unsupported-media-type", "Content-Type is missing")
    encoding = request.headers.get("content-encoding", "identity").strip().lower() or "identity"
    allowed = ("identity",) if identity_only else ("gzip", "identity")
    if encoding not in allowed:
        raise Refusal(
            415,
            "unsupported-media-type",
            f"Content-Encoding must be {' or '.join(allowed)}",
        )
    return encoding


async def _drain(request: Request) -> None:
    """Read the request's content to its end and discard it (bounded by
    `DRAIN_MAX_BYTES` and `DRAIN_MAX_SECS`), so that the refusal that follows reaches
    the sender.

    Why: the 413 goes out with ``Connection: close``. A socket closed with unread data
    sends a reset instead of a FIN (RFC 1122 section 4.2.2.13), and an HTTP/1.1
    client sends the whole body before it reads the answer: it met the reset while
    still sending and the 413 was lost. A node took that for a network error and
    backed off, then sent the same oversized batch again, instead of splitting it.
    Apache httpd's "lingering close" exists for the same reason.
    """
    received = 0
    with anyio.move_on_after(DRAIN_MAX_SECS):
        while received <= DRAIN_MAX_BYTES:
            message = await request.receive()
            if message["type"] != "http.request":
                return  # the client went away
            received += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


async def _read_body(request: Request, limit: int) -> bytes:
    """The request content, refusing it (413) as soon as it passes ``limit``."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refusal(
                    413,
                    "payload-too-large",
                    f"the content is over the hub's limit of {limit} bytes",
                    headers={"Connection": "close"},
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise Refusal(400, "malformed-request", "the request ended before its content") from None
    return b"".join(chunks)


def _check_digest(request: Request, body: bytes) -> None:
    header = request.headers.get("content-digest")
    if header is None or not wire.verify_content_digest(header, body):
        raise Refusal(
            400, "digest-mismatch", "Content-Digest does not match the content as received"
        )


Endpoint = Callable[[Request], Awaitable[Response]]


def _endpoint(fn: Endpoint) -> Endpoint:
    """Turn refusals into problem responses, a transient store failure into 503, and
    anything else into a 500 that names no content. The log line carries the error's
    type and where it was raised, never its message (which could quote a value)."""

    async def endpoint(request: Request) -> Response:
        try:
            return await fn(request)
        except Refusal as r:
            log.info(
                "Request refused.",
                extra={
                    "event": "hub.request_refused",
                    "route": fn.__name__,
                    "status": r.status,
                    "problem": r.slug,
                },
            )
            return problem(r.status, r.slug, r.detail, headers=r.headers)
        except StorageError as err:
            if not err.transient:
                return _failed(fn.__name__, err)
            # PROTOCOL.md: 503 means "wait Retry-After, then retry".
            log.warning(
                "Store busy or unreachable; answered 503.",
                extra={"event": "hub.store_unavailable", "route": fn.__name__},
            )
            return problem(
                503,
                "store-unavailable",
                "the hub's store is busy or unreachable; retry later",
                headers={"Retry-After": str(STORE_RETRY_AFTER_SECS)},
            )
        except Exception as err:  # noqa: BLE001 - the boundary: any bug becomes a 500
            return _failed(fn.__name__, err)

    endpoint.__name__ = fn.__name__
    return endpoint


def _failed(route: str, err: Exception) -> Response:
    frames = traceback.extract_tb(err.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    log.error(
        "Request failed; answered 500.",
        extra={
            "event": "hub.request_failed",
            "route": route,
            "error": type(err).__name__,
            "where": where,
        },
    )
    return problem(500, "internal-error", "the hub could not process the request")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # noqa: S101 - registered for HTTPException only
    slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "malformed-request")
    return problem(exc.status_code, slug, HTTPStatus(exc.status_code).phrase, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    # Last resort, outside the Date middleware: add Date here.
    return problem(
        500,
        "internal-error",
        "the hub could not process the request",
        headers={"Date": formatdate(usegmt=True)},
    )


class _Edge:
    """The outermost layer of the app, around every request:

    - bounds the requests processed at once (``server.max_connections`` per worker):
      past it, 503 problem+json with ``Retry-After``, before any work is done;
    - adds ``Date`` to every response (nodes measure their clock skew with it);
    - logs one line per request (method, path without query string, status, duration)
      on the ``hub.access`` logger.
    """

    def __init__(self, app: ASGIApp, *, max_in_flight: int) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # one event loop per worker: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_with_date(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                if "date" not in headers:
                    headers.append("Date", formatdate(usegmt=True))
            await send(message)

        try:
            if self.in_flight >= self.max_in_flight:
                busy = problem(
                    503,
                    "overloaded",
                    "the hub is processing as many requests as it may; retry later",
                    headers={"Retry-After": str(OVERLOAD_RETRY_AFTER_SECS)},
                )
                await busy(scope, receive, send_with_date)
                return
            self.in_flight += 1
            try:
                await self.app(scope, receive, send_with_date)
            finally:
                self.in_flight -= 1
        finally:
            access_log.info(
                "%s %s %s",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "event": "hub.request_served",
                    "status": status,
                    "ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )


def create_app(
    settings: HubSettings,
    store: HubStore | None = None,
    *,
    blobs: BlobStore | None = None,
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """The hub as an ASGI application.

    Args:
        settings: the hub's configuration.
        store: the store to use; when None, ``settings.store.url`` is opened (and
            closed at shutdown). A store passed in is left open.
        blobs: the blob directory; default ``settings.store.blob_dir``.
        clock: UNIX time, for the signature window, claims and ``received_at``.

    Raises:
        ConfigError: ``settings.store.url`` names no usable store.
    """
    owned = store is None
    hub = Hub(
        settings,
        open_store(settings.store.url) if store is None else store,
        blobs if blobs is not None else BlobStore(settings.store.blob_dir),
        clock,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(hub.expire_forever)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
        if owned:
            hub.store.close()

    routes = [
        Route("/v1/batches", _endpoint(hub.post_batch), methods=["POST"]),
        Route("/v1/blobs/sha256/{hex}", _endpoint(hub.put_blob), methods=["PUT"]),
        Route("/v1/blobs/sha256/{hex}", _endpoint(hub.head_blob), methods=["HEAD"]),
        Route("/v1/nodes/{node_id}", _endpoint(hub.get_node), methods=["GET"]),
        Route("/v1/reconcile", _endpoint(hub.post_reconcile), methods=["POST"]),
        Route("/v1/nodes/{node_id}/heartbeat", _endpoint(hub.post_heartbeat), methods=["POST"]),
        Route("/v1/health", _endpoint(hub.health), methods=["GET"]),
        Route("/v1/openapi.json", _endpoint(hub.openapi), methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )
    app.add_middleware(_Edge, max_in_flight=settings.server.max_connections)
    app.state.hub = hub
    return app


def app_from_env() -> Starlette:
    """The ASGI factory: ``uvicorn --factory hub.app:app_from_env``.

    Settings come from ``$SEPAS_HUB_SETTINGS`` (JSON; set by ``sepas-hub serve`` for
    its workers), else the file ``$SEPAS_HUB_CONFIG``, else /etc/sepas-hub/hub.toml.
    Run by hand, pass ``--no-date-header --no-server-header --no-proxy-headers``
    to uvicorn: the app sends its own Date.

    Raises:
        ConfigError: the settings are unusable.
    """
    raw = os.environ.get(SETTINGS_ENV)
    if raw:
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise SepasError(f"${SETTINGS_ENV} is not a JSON object")
        settings = validate_settings(data, source=f"${SETTINGS_ENV}")
    else:
        settings = load_settings(resolve_config_path(None))
    return create_app(settings)
