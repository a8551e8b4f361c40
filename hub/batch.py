"""Reading what a node sent: bounded decompression, JSON, and PROTOCOL.md's shapes.

Responsibility: turn request content that already passed the signature and
Content-Digest checks into validated values (a batch's records, a reconcile request,
a heartbeat), or into a `Refusal` that names the HTTP status and problem slug.
Pure functions, no HTTP and no store: the ASGI app calls them in a worker thread
(decompressing and parsing up to 64 MiB must not block the event loop).

Invariants:
- Decompression is bounded: output is pulled from ``zlib.decompressobj`` in chunks
  of at most `INFLATE_CHUNK` bytes (``max_length``), and stops one byte past the
  limit. A gzip bomb is refused after inflating at most the limit, never whole.
- Error texts name the field and what is wrong with it, never its value: a
  per-record error reaches the node's dead-letter store and the hub's logs, and a
  value could be a patient's name or national code.
- What PROTOCOL.md does not describe is refused. Fields it does not list are ignored
  at the top level of a batch and of a record (version 1 may gain fields there; a v1
  hub must not refuse a later v1 node), but refused inside ``source`` and ``blobs``
  items, which `agent.record.Record.from_wire` (the node's reading) cannot hold.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Final

from agent.record import Record, Service, canonical_json
from hub.store import IncomingRecord

#: Largest piece of output pulled from the decompressor at once.
INFLATE_CHUNK: Final = 256 * 1024

_HEX64_RE: Final = re.compile(r"[0-9a-f]{64}")
_NATIONAL_ID_RE: Final = re.compile(r"[0-9]{10}")
# RFC 3339 date-time with a mandatory offset ("Z" or +hh:mm). Upper-case "T" and "Z"
# only: RFC 3339 allows lower case, but the node's own parser (Record.from_wire) does
# not, and the hub must not store what the node could not read back.
_RFC3339_RE: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
    r"(?:Z|[+-][0-9]{2}:[0-9]{2})"
)
_DAY_RE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_SERVICES: Final = frozenset(s.value for s in Service)
#: Longest adapter last_error kept from a heartbeat.
_MAX_ERROR_TEXT: Final = 1000


class Refusal(Exception):
    """The request is refused as a whole: HTTP ``status``, problem ``slug``, ``detail``.

    ``detail`` never carries patient data (see the module invariants); ``headers``
    are added to the problem response (``Retry-After``, ``Connection: close``).
    """

    def __init__(
        self, status: int, slug: str, detail: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {slug}: {detail}")
        self.status = status
        self.slug = slug
        self.detail = detail
        self.headers = dict(headers or {})


# --- content ------------------------------------------------------------------------------


def inflate(
    data: bytes, encoding: str, *, limit: int, slug: str = "malformed-batch"
) -> bytes | bytearray:
    """Undo ``Content-Encoding`` (``gzip`` or ``identity``), refusing output past ``limit``.

    Several gzip members one after another are one stream (RFC 1952 section 2.2).

    Raises:
        Refusal: 413 ``payload-too-large`` past ``limit``; 400 ``slug`` for gzip that
            is corrupt, truncated or followed by anything but another member.
    """
    if encoding == "identity":
        if len(data) > limit:
            raise Refusal(413, "payload-too-large", f"the content is over {limit} bytes")
        return data
    out = bytearray()
    rest = data
    while True:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing only
        tail = rest
        try:
            while True:
                room = min(INFLATE_CHUNK, limit + 1 - len(out))
                chunk = inflater.decompress(tail, room)
                out += chunk
                if len(out) > limit:
                    raise Refusal(
                        413,
                        "payload-too-large",
                        f"the content inflates to more than {limit} bytes",
                    )
                tail = inflater.unconsumed_tail
                if inflater.eof:
                    break
                if not chunk and not tail:
                    raise Refusal(400, slug, "the gzip content is truncated")
        except zlib.error:
            raise Refusal(400, slug, "the gzip content is corrupt") from None
        rest = inflater.unused_data
        if not rest:
            return out  # not bytes(out): that would hold the content twice
        if not rest.startswith(b"\x1f\x8b"):
            raise Refusal(400, slug, "bytes follow the gzip content")


def parse_json_object(data: bytes | bytearray, *, slug: str = "malformed-batch") -> dict[str, Any]:
    """Parse UTF-8 JSON whose top level is an object.

    Raises:
        Refusal: 400 ``slug`` (the message names no content).
    """
    try:
        doc = json.loads(data, parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise Refusal(400, slug, "the content is not UTF-8") from None
    except (ValueError, RecursionError):  # also NaN/Infinity, and over-long integers
        raise Refusal(400, slug, "the content is not valid JSON") from None
    if not isinstance(doc, dict):
        raise Refusal(400, slug, "the content is not a JSON object")
    return doc


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# --- batches ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordResult:
    """What the hub answers for one record, before the store says accepted/duplicate."""

    id: str | None
    error: str | None = None  # rejected: "<field path>: <what>"
    later_copy: bool = False  # same id as an earlier valid record of this batch


@dataclass(frozen=True, slots=True)
class Batch:
    """A batch whose envelope holds; ``plan`` has one entry per record sent, in order."""

    batch_id: str
    plan: tuple[RecordResult, ...]
    records: tuple[IncomingRecord, ...]  # the valid ones, each id once, to store

    def results(self, inserted: set[str]) -> list[dict[str, Any]]:
        """One result per record sent, in order; ``inserted``: ids the store did not hold."""
        results: list[dict[str, Any]] = []
        for item in self.plan:
            if item.error is not None:
                results.append({"id": item.id, "status": "rejected", "error": item.error})
            elif not item.later_copy and item.id in inserted:
                results.append({"id": item.id, "status": "accepted"})
            else:
                results.append({"id": item.id, "status": "duplicate"})
        return results

    def response(self, results: list[dict[str, Any]], received_at: str) -> bytes:
        """PROTOCOL.md's 200 body."""
        body = {"batch_id": self.batch_id, "received_at": received_at, "results": results}
        return json.dumps(body, separators=(",", ":")).encode("ascii")


def read_batch(
    doc: Mapping[str, Any], *, node_id: str, idempotency_key: str, max_records: int
) -> Batch:
    """Check a batch's envelope and each record (PROTOCOL.md, POST /v1/batches).

    Raises:
        Refusal: 400 for a malformed envelope or ``batch_id`` other than the
            Idempotency-Key, 401 ``node-mismatch`` for ``node_id`` other than the
            signature's keyid, 413 for more than ``max_records`` records.
    """
    if type(doc.get("sepas_batch")) is not int or doc["sepas_batch"] != 1:  # not 1.0, true
        raise Refusal(400, "malformed-batch", "sepas_batch: must be 1")
    if not isinstance(doc.get("node_id"), str):
        raise Refusal(400, "malformed-batch", "node_id: must be a string")
    if doc["node_id"] != node_id:
        raise Refusal(401, "node-mismatch", "node_id: is not the signature's keyid")
    if not isinstance(doc.get("batch_id"), str):
        raise Refusal(400, "malformed-batch", "batch_id: must be a string")
    if doc["batch_id"] != idempotency_key:
        raise Refusal(400, "idempotency-key-mismatch", "batch_id: is not the Idempotency-Key")
    if _time_problem(doc.get("created_at")) is not None:
        raise Refusal(400, "malformed-batch", "created_at: must be an RFC 3339 time with offset")
    records = doc.get("records")
    if not isinstance(records, list):
        raise Refusal(400, "malformed-batch", "records: must be a list")
    if len(records) > max_records:
        raise Refusal(
            413, "payload-too-large", f"records: {len(records)} is over the limit of {max_records}"
        )
    plan: list[RecordResult] = []
    valid: dict[str, IncomingRecord] = {}
    for item in records:
        error = record_problem(item)
        if error is not None:
            plan.append(RecordResult(_record_id(item), error))
            continue
        rid = item["id"]
        if rid in valid:
            plan.append(RecordResult(rid, later_copy=True))
            continue
        try:
            envelope = canonical_json(item)
        except ValueError:  # a lone surrogate (\ud800) cannot be stored as UTF-8
            plan.append(RecordResult(rid, "record: holds text that is not valid Unicode"))
            continue
        valid[rid] = IncomingRecord(
            id=rid, service=item["service"], occurred_at=item["occurred_at"], envelope=envelope
        )
        plan.append(RecordResult(rid))
    return Batch(batch_id=idempotency_key, plan=tuple(plan), records=tuple(valid.values()))


def _record_id(item: object) -> str | None:
    """The record's id for its result, if it is one; a malformed id is not echoed."""
    if isinstance(item, dict):
        rid = item.get("id")
        if isinstance(rid, str) and _HEX64_RE.fullmatch(rid):
            return rid
    return None


def record_problem(rec: object) -> str | None:
    """Why a RECORD is refused, as ``"<field path>: <what>"``, or None if it holds."""
    if not isinstance(rec, dict):
        return "record: must be an object"
    if not isinstance(rec.get("id"), str) or not _HEX64_RE.fullmatch(rec["id"]):
        return "id: must be 64 lower-case hex digits"
    if not isinstance(rec.get("service"), str) or rec["service"] not in _SERVICES:
        return "service: is not one of PROTOCOL.md's services"
    for name in ("occurred_at", "captured_at"):
        problem = _time_problem(rec.get(name))
        if problem is not None:
            return f"{name}: {problem}"
    problem = (
        _source_problem(rec.get("source"))
        or _patient_problem(rec.get("patient"))
        or _body_problem(rec.get("body"))
        or _raw_problem(rec.get("raw"))
        or _blobs_problem(rec.get("blobs"))
    )
    if problem is not None:
        return problem
    try:
        Record.from_wire(rec)  # the node's own reading of the envelope must hold too
    except (KeyError, ValueError, TypeError):
        return "record: is not a valid RECORD envelope"
    return None


def _time_problem(value: object) -> str | None:
    if not isinstance(value, str) or not _RFC3339_RE.fullmatch(value):
        return "must be an RFC 3339 time with offset"
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return "is not a valid date and time"
    return None


def _source_problem(src: object) -> str | None:
    if not isinstance(src, dict):
        return "source: must be an object"
    for name in ("adapter", "kind", "ref"):
        if not isinstance(src.get(name), str):
            return f"source.{name}: must be a string"
    for name in ("adapter", "kind"):
        if not src[name]:
            return f"source.{name}: must not be empty"
    if len(src) != 3:
        return "source: has fields PROTOCOL.md does not list"
    return None


def _patient_problem(pat: object) -> str | None:
    if pat is None:
        return None  # a record without a patient (PROTOCOL.md: patient may be null)
    if not isinstance(pat, dict):
        return "patient: must be an object or null"
    nid = pat.get("national_id")
    if nid is not None and not (isinstance(nid, str) and _NATIONAL_ID_RE.fullmatch(nid)):
        return "patient.national_id: must be 10 ASCII digits or null"
    if not isinstance(pat.get("national_id_valid"), bool):
        return "patient.national_id_valid: must be true or false"
    local_id = pat.get("local_id")
    if local_id is not None and not isinstance(local_id, str):
        return "patient.local_id: must be a string or null"
    return None


def _body_problem(body: object) -> str | None:
    if not isinstance(body, dict):
        return "body: must be a FHIR R4 Bundle object"
    if body.get("resourceType") != "Bundle":
        return 'body.resourceType: must be "Bundle"'
    if body.get("type") != "collection":
        return 'body.type: must be "collection"'
    entries = body.get("entry")
    if not isinstance(entries, list) or not entries:
        return "body.entry: must be a non-empty list"
    for i, entry in enumerate(entries):
        where = f"body.entry[{i}]"
        if not isinstance(entry, dict):
            return f"{where}: must be an object"
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            return f"{where}.resource: must be an object"
        kind = resource.get("resourceType")
        if not isinstance(kind, str) or not kind:
            return f"{where}.resource.resourceType: missing"
        if i == 0 and kind != "Patient":
            return 'body.entry[0].resource.resourceType: must be "Patient"'
    return None


def _raw_problem(raw: object) -> str | None:
    if not isinstance(raw, dict):
        return "raw: must be an object"
    if not isinstance(raw.get("media_type"), str) or not raw["media_type"]:
        return "raw.media_type: must be a non-empty string"
    if not isinstance(raw.get("sha256"), str) or not _HEX64_RE.fullmatch(raw["sha256"]):
        return "raw.sha256: must be 64 lower-case hex digits"
    if "data" not in raw:
        return None  # optional
    data = raw["data"]
    if not isinstance(data, str):
        return "raw.data: must be base64 text (leave it out when not sent)"
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return "raw.data: is not valid base64"
    if not hmac.compare_digest(hashlib.sha256(decoded).hexdigest(), raw["sha256"]):
        return "raw.sha256: does not match raw.data"
    return None


def _blobs_problem(blobs: object) -> str | None:
    if blobs is None:
        return None
    if not isinstance(blobs, list):
        return "blobs: must be a list"
    for i, blob in enumerate(blobs):
        where = f"blobs[{i}]"
        if not isinstance(blob, dict):
            return f"{where}: must be an object"
        if not isinstance(blob.get("sha256"), str) or not _HEX64_RE.fullmatch(blob["sha256"]):
            return f"{where}.sha256: must be 64 lower-case hex digits"
        if not isinstance(blob.get("media_type"), str) or not blob["media_type"]:
            return f"{where}.media_type: must be a non-empty string"
        size = blob.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return f"{where}.size: must be a non-negative integer"
        if len(blob) != 3:
            return f"{where}: has fields PROTOCOL.md does not list"
    return None


# --- reconcile ----------------------------------------------------------------------------


def read_reconcile(doc: Mapping[str, Any], *, max_days: int) -> tuple[str, list[str]]:
    """``(node_id, days)`` of a POST /v1/reconcile body.

    Raises:
        Refusal: 400 ``malformed-request`` for anything PROTOCOL.md does not describe.
    """
    node_id, days = doc.get("node_id"), doc.get("days")
    if not isinstance(node_id, str):
        raise Refusal(400, "malformed-request", "node_id: must be a string")
    if not isinstance(days, list):
        raise Refusal(400, "malformed-request", "days: must be a list of UTC dates")
    if len(days) > max_days:
        raise Refusal(400, "malformed-request", f"days: at most {max_days} days at once")
    for i, day in enumerate(days):
        if not isinstance(day, str) or not _DAY_RE.fullmatch(day):
            raise Refusal(400, "malformed-request", f"days[{i}]: must be a date YYYY-MM-DD")
        try:
            date.fromisoformat(day)
        except ValueError:
            raise Refusal(400, "malformed-request", f"days[{i}]: is not a valid date") from None
    return node_id, list(days)


# --- heartbeat ----------------------------------------------------------------------------

_COUNTS: Final = ("pending", "dead", "quarantined", "buffer_bytes")
_NULLABLE_NUMBERS: Final = ("oldest_pending_age_s", "clock_skew_s")


def read_heartbeat(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The heartbeat fields PROTOCOL.md lists (and ``siam_id``), checked; other fields
    are dropped.

    ``oldest_pending_age_s`` and ``clock_skew_s`` may be null (nothing pending, skew
    not yet measured), as may an adapter's ``last_ok`` and ``last_error``.

    Raises:
        Refusal: 400 ``malformed-request`` naming the field.
    """

    def bad(field: str, what: str) -> Refusal:
        return Refusal(400, "malformed-request", f"{field}: {what}")

    out: dict[str, Any] = {}
    for name in ("node_id", "version"):
        if not isinstance(doc.get(name), str):
            raise bad(name, "must be a string")
        out[name] = doc[name]
    for name in _COUNTS:
        value = doc.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise bad(name, "must be a non-negative integer")
        out[name] = value
    for name in _NULLABLE_NUMBERS:
        if name not in doc:
            raise bad(name, "missing (null if unknown)")
        value = doc[name]
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise bad(name, "must be a number or null")
        out[name] = value
    adapters = doc.get("adapters")
    if not isinstance(adapters, list):
        raise bad("adapters", "must be a list")
    out["adapters"] = [_heartbeat_adapter(i, a) for i, a in enumerate(adapters)]
    # DESIGN.md: the Ministry's facility id, sent in heartbeats when configured (a
    # backward-compatible addition to PROTOCOL.md's fields).
    siam_id = doc.get("siam_id")
    if siam_id is not None:
        if not isinstance(siam_id, str) or not 1 <= len(siam_id) <= 64:
            raise bad("siam_id", "must be a string of 1 to 64 characters")
        out["siam_id"] = siam_id
    return out


def _heartbeat_adapter(i: int, adapter: object) -> dict[str, Any]:
    where = f"adapters[{i}]"
    if not isinstance(adapter, dict):
        raise Refusal(400, "malformed-request", f"{where}: must be an object")
    for name in ("name", "kind"):
        if not isinstance(adapter.get(name), str):
            raise Refusal(400, "malformed-request", f"{where}.{name}: must be a string")
    last_ok, last_error = adapter.get("last_ok"), adapter.get("last_error")
    if last_ok is not None and _time_problem(last_ok) is not None:
        raise Refusal(
            400, "malformed-request", f"{where}.last_ok: must be an RFC 3339 time or null"
        )
    if last_error is not None and not isinstance(last_error, str):
        raise Refusal(400, "malformed-request", f"{where}.last_error: must be a string or null")
    return {
        "name": adapter["name"],
        "kind": adapter["kind"],
        "last_ok": last_ok,
        "last_error": None if last_error is None else last_error[:_MAX_ERROR_TEXT],
    }
