"""Fakes shipped with the agent, for its tests and for anyone building on it.

- `FakeClock`: a clock tests move by hand, whose `FakeClock.sleep` advances it
  instead of sleeping (pass ``clock=fc, sleep=fc.sleep``).
- `FakeHub`: PROTOCOL.md's hub, in memory, as an ``httpx.MockTransport`` handler. It
  verifies signatures and Content-Digest with `agent.wire` (as a real hub must),
  stores records by id (de-duplication), keeps the idempotency store (replay, 422),
  blobs, heartbeats and the per-day ledger for reconciliation, and can be scripted to
  answer any status with any ``Retry-After``, to cut the connection before or after it
  committed a batch, or to refuse chosen records.

Not a reference hub (that is ``hub/``): it is deliberately small, single-threaded,
and trusts its own scripts. It never echoes record content in its problem bodies.
"""

from __future__ import annotations

import contextlib
import email.utils
import gzip
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import wire
from agent.record import Service, format_time

MiB: Final = 1024 * 1024
_SERVICES: Final = frozenset(s.value for s in Service)


class FakeClock:
    """A clock tests move by hand. ``sleep`` advances it and records the request."""

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self.now = float(start)
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, secs: float) -> None:
        self.now += secs

    def sleep(self, secs: float) -> None:
        self.sleeps.append(secs)
        self.now += max(0.0, secs)


@dataclass(slots=True)
class HubCall:
    """One request the fake hub saw, and what it answered (status None: cut)."""

    method: str
    path: str
    headers: dict[str, str]
    content: bytes  # as on the wire
    status: int | None = None
    body: bytes = b""  # content after Content-Encoding was undone
    created: int | None = None  # signature parameters, when signed
    nonce: str | None = None

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def record_ids(self) -> list[str]:
        """Ids of the records a batch call carried, in order."""
        return [r["id"] for r in self.json["records"]]


@dataclass(slots=True)
class _Script:
    method: str | None
    path: str
    status: int | None
    headers: dict[str, str]
    problem_type: str
    exc: Callable[[httpx.Request], Exception] | None
    after_commit: bool
    remaining: int


@dataclass(slots=True)
class HeldRecord:
    record: dict[str, Any]
    day: str  # UTC day of received_at
    received_at: str


class FakeHub:
    """PROTOCOL.md's hub in memory. Use ``httpx.MockTransport(hub)`` or
    `FakeHub.transport`."""

    def __init__(
        self,
        node_id: str,
        public_key: Ed25519PublicKey | None,
        *,
        clock: Callable[[], float] = time.time,
        max_records: int = 5000,
        max_wire_bytes: int = 16 * MiB,
        max_body_bytes: int = 64 * MiB,
        max_skew_secs: float = wire.DEFAULT_MAX_SKEW_SECS,
        date_skew: float = 0.0,
    ) -> None:
        """Args:
        public_key: the node's key; None skips signature checks (a test of
            something else that signs with no key).
        date_skew: added to the clock for the ``Date`` header (the hub's clock
            being that far ahead of the node's).
        """
        self.node_id = node_id
        self.public_key = public_key
        self.clock = clock
        self.max_records = max_records
        self.max_wire_bytes = max_wire_bytes
        self.max_body_bytes = max_body_bytes
        self.max_skew_secs = max_skew_secs
        self.date_skew = date_skew
        self.records: dict[str, HeldRecord] = {}
        self.blobs: dict[str, bytes] = {}
        self.heartbeats: list[dict[str, Any]] = []
        self.calls: list[HubCall] = []
        self.idempotency: dict[str, tuple[str, bytes]] = {}
        self.nonces: set[str] = set()
        #: record -> error text: the hub rejects it (200, status "rejected").
        self.reject: Callable[[Mapping[str, Any]], str | None] | None = None
        #: record -> True: a batch holding it is malformed as a whole (400).
        self.malformed: Callable[[Mapping[str, Any]], bool] | None = None
        self._scripts: list[_Script] = []

    # -- scripting -------------------------------------------------------------------------

    def script(
        self,
        status: int | None = None,
        *,
        path: str = "/v1/batches",
        method: str | None = None,
        retry_after: str | None = None,
        problem_type: str = "scripted",
        exc: Callable[[httpx.Request], Exception] | None = None,
        after_commit: bool = False,
        times: int = 1,
    ) -> None:
        """Answer the next ``times`` requests to ``path`` (a prefix) with ``status``
        (a problem+json body, ``Retry-After`` if given), or raise ``exc(request)``
        (e.g. ``lambda r: httpx.ConnectError("refused", request=r)``). With
        ``after_commit`` the request is processed first and its answer lost."""
        if (status is None) == (exc is None):
            raise ValueError("give a status or an exc")
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        self._scripts.append(
            _Script(method, path, status, headers, problem_type, exc, after_commit, times)
        )

    def forget(self, ids: Iterable[str]) -> None:
        """Lose records (a hub restored from an old backup)."""
        for i in ids:
            self.records.pop(i, None)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def batch_calls(self) -> list[HubCall]:
        return [c for c in self.calls if c.method == "POST" and c.path == "/v1/batches"]

    # -- the handler -----------------------------------------------------------------------

    def __call__(self, request: httpx.Request) -> httpx.Response:
        content = request.read()
        path = request.url.path
        call = HubCall(request.method, path, dict(request.headers.items()), content)
        self.calls.append(call)
        call.body = content
        if request.headers.get("content-encoding") == "gzip":
            with contextlib.suppress(OSError, EOFError):
                call.body = gzip.decompress(content)
        with contextlib.suppress(wire.SignatureInvalidError):
            params = wire.parse_signature_headers(request.headers)
            call.created, call.nonce = params.created, params.nonce
        script = self._take_script(request.method, path)
        if script is not None and not script.after_commit:
            return self._scripted(request, call, script)
        response = self._handle(request, call)
        call.status = response.status_code
        if script is not None:
            return self._scripted(request, call, script)
        return response

    def _scripted(self, request: httpx.Request, call: HubCall, script: _Script) -> httpx.Response:
        call.status = script.status
        if script.exc is not None:
            raise script.exc(request)
        status = script.status if script.status is not None else 500
        return self._problem(status, script.problem_type, "scripted", script.headers)

    def _take_script(self, method: str, path: str) -> _Script | None:
        for s in self._scripts:
            if s.remaining > 0 and path.startswith(s.path) and s.method in (None, method):
                s.remaining -= 1
                return s
        return None

    def _handle(self, request: httpx.Request, call: HubCall) -> httpx.Response:
        path = call.path
        if path == "/v1/health" and request.method == "GET":
            return self._json(200, {"status": "ok"})
        content = call.content
        has_content = bool(content) or "content-type" in request.headers
        keyid, refusal = self._verify(request, has_content=has_content, call=call)
        if refusal is not None:
            return refusal
        if has_content and not wire.verify_content_digest(
            request.headers.get("content-digest", ""), content
        ):
            return self._problem(400, "content-digest-mismatch", "Content-Digest does not match")
        if path == "/v1/batches" and request.method == "POST":
            return self._batch(request, call, keyid)
        if path.startswith("/v1/blobs/sha256/"):
            return self._blob(request, call, path.rsplit("/", 1)[1])
        if path == "/v1/reconcile" and request.method == "POST":
            return self._reconcile(call, keyid)
        if path.startswith("/v1/nodes/"):
            parts = path.split("/")
            if parts[3] != keyid:
                return self._problem(403, "node-mismatch", "keyid is another node")
            if len(parts) == 5 and parts[4] == "heartbeat" and request.method == "POST":
                call.body = content
                self.heartbeats.append(json.loads(content))
                return httpx.Response(204, headers=self._date())
            if len(parts) == 4 and request.method == "GET":
                by_service: dict[str, int] = {}
                for held in self.records.values():
                    s = str(held.record["service"])
                    by_service[s] = by_service.get(s, 0) + 1
                return self._json(200, {"node_id": keyid, "records": by_service})
        return self._problem(404, "not-found", "no such endpoint")

    def _verify(
        self, request: httpx.Request, *, has_content: bool, call: HubCall
    ) -> tuple[str, httpx.Response | None]:
        try:
            params = wire.parse_signature_headers(request.headers)
        except wire.SignatureInvalidError as e:
            return "", self._problem(401, e.problem.value, e.detail)
        call.created, call.nonce = params.created, params.nonce
        if self.public_key is None:
            return params.keyid, None
        if params.keyid != self.node_id:
            return params.keyid, self._problem(401, "unknown-key", "keyid is not registered")
        try:
            wire.verify_request(
                method=request.method,
                path=request.url.raw_path.decode("ascii"),
                headers=request.headers,
                public_keys=[self.public_key],
                now=self.clock(),
                max_skew_secs=self.max_skew_secs,
                has_content=has_content,
            )
        except wire.SignatureInvalidError as e:
            return params.keyid, self._problem(401, e.problem.value, e.detail)
        if params.nonce in self.nonces:
            return params.keyid, self._problem(401, "nonce-replayed", "nonce seen before")
        self.nonces.add(params.nonce)
        return params.keyid, None

    def _batch(self, request: httpx.Request, call: HubCall, keyid: str) -> httpx.Response:
        content = call.content
        if len(content) > self.max_wire_bytes:
            return self._problem(413, "payload-too-large", "over the wire limit")
        encoding = request.headers.get("content-encoding", "identity")
        if encoding not in ("gzip", "identity"):
            return self._problem(415, "unsupported-encoding", "gzip or identity only")
        try:
            body = gzip.decompress(content) if encoding == "gzip" else content
        except (OSError, EOFError):
            return self._problem(400, "malformed-batch", "the gzip content is corrupt")
        call.body = body
        if len(body) > self.max_body_bytes:
            return self._problem(413, "payload-too-large", "over the decompressed limit")
        try:
            doc = json.loads(body)
        except ValueError:
            return self._problem(400, "malformed-batch", "not JSON")
        key = request.headers.get("idempotency-key")
        if not isinstance(doc, dict) or doc.get("sepas_batch") != 1:
            return self._problem(400, "malformed-batch", "sepas_batch must be 1")
        if doc.get("batch_id") != key:
            return self._problem(400, "malformed-batch", "batch_id is not the Idempotency-Key")
        if doc.get("node_id") != keyid:
            return self._problem(401, "node-mismatch", "node_id is not the signature's keyid")
        records = doc.get("records")
        if not isinstance(records, list):
            return self._problem(400, "malformed-batch", "records must be a list")
        if len(records) > self.max_records:
            return self._problem(413, "too-many-records", f"at most {self.max_records}")
        digest = request.headers.get("content-digest", "")
        stored = self.idempotency.get(f"{keyid}/{key}")
        if stored is not None:
            if stored[0] != digest:
                return self._problem(422, "idempotency-key-reused", "other content, same key")
            return httpx.Response(
                200,
                content=stored[1],
                headers={
                    "Content-Type": "application/json",
                    "Idempotent-Replayed": "true",
                    **self._date(),
                },
            )
        for rec in records:
            if not _well_formed(rec) or (self.malformed is not None and self.malformed(rec)):
                return self._problem(400, "malformed-batch", "a record is malformed")
        now = self.clock()
        received_at = format_time(datetime.fromtimestamp(now, UTC).replace(microsecond=0))
        day = datetime.fromtimestamp(now, UTC).date().isoformat()
        results = []
        for rec in records:
            rid = rec["id"]
            if rid in self.records:
                results.append({"id": rid, "status": "duplicate"})
                continue
            error = self.reject(rec) if self.reject is not None else None
            if error is not None:
                results.append({"id": rid, "status": "rejected", "error": error})
                continue
            self.records[rid] = HeldRecord(rec, day, received_at)
            results.append({"id": rid, "status": "accepted"})
        answer = json.dumps(
            {"batch_id": key, "received_at": received_at, "results": results}
        ).encode()
        self.idempotency[f"{keyid}/{key}"] = (digest, answer)
        return httpx.Response(
            200, content=answer, headers={"Content-Type": "application/json", **self._date()}
        )

    def _blob(self, request: httpx.Request, call: HubCall, sha: str) -> httpx.Response:
        if request.method == "HEAD":
            return httpx.Response(200 if sha in self.blobs else 404, headers=self._date())
        if request.method != "PUT":
            return self._problem(405, "method-not-allowed", "HEAD or PUT")
        call.body = call.content
        if len(call.content) > self.max_wire_bytes:
            return self._problem(413, "payload-too-large", "over the wire limit")
        if hashlib.sha256(call.content).hexdigest() != sha:
            return self._problem(400, "blob-digest-mismatch", "content is not its name")
        status = 200 if sha in self.blobs else 201
        self.blobs[sha] = call.content
        return httpx.Response(status, headers=self._date())

    def _reconcile(self, call: HubCall, keyid: str) -> httpx.Response:
        call.body = call.content
        doc = json.loads(call.content)
        if doc.get("node_id") != keyid:
            return self._problem(401, "node-mismatch", "node_id is not the signature's keyid")
        days = doc.get("days")
        if not isinstance(days, list) or len(days) > 62:
            return self._problem(400, "malformed-reconcile", "at most 62 days")
        out = []
        for day in days:
            ids = [i for i, held in self.records.items() if held.day == day]
            out.append({"day": day, "count": len(ids), "digest": wire.day_digest(ids)})
        return self._json(200, {"days": out})

    # -- answers ----------------------------------------------------------------------------

    def _date(self) -> dict[str, str]:
        return {"Date": email.utils.formatdate(self.clock() + self.date_skew, usegmt=True)}

    def _json(self, status: int, data: Any) -> httpx.Response:
        return httpx.Response(
            status,
            content=json.dumps(data).encode(),
            headers={"Content-Type": "application/json", **self._date()},
        )

    def _problem(
        self, status: int, slug: str, detail: str, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        body = {
            "type": wire.problem_type(slug),
            "title": slug.replace("-", " "),
            "status": status,
            "detail": detail,
        }
        return httpx.Response(
            status,
            content=json.dumps(body).encode(),
            headers={
                "Content-Type": "application/problem+json",
                **self._date(),
                **dict(headers or {}),
            },
        )


def _well_formed(rec: Any) -> bool:
    if not isinstance(rec, dict):
        return False
    rid = rec.get("id")
    return (
        isinstance(rid, str)
        and len(rid) == 64
        and all(c in "0123456789abcdef" for c in rid)
        and rec.get("service") in _SERVICES
    )
