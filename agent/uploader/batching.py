"""Leased records -> immutable batches, and the hub's answer to one.

Responsibility: build the exact bytes of PROTOCOL.md's ``POST /v1/batches`` content
(``{"sepas_batch":1,"batch_id":…,"node_id":…,"created_at":…,"records":[…]}``,
gzip'd), bounded by the configured record and byte limits, and split a batch in
halves when the hub asks for it (400/413/415).

Invariants:
- A record's JSON is the buffer's canonical envelope, spliced into the batch byte for
  byte: it is never parsed and re-serialised, so what the hub receives is exactly
  what was captured (and hashing it twice gives the same digest).
- A `Batch` is immutable and holds its wire bytes: a retry of the same batch sends the
  same bytes under the same ``Idempotency-Key``, which is what lets the hub replay its
  stored answer instead of answering 422. gzip runs with ``mtime=0`` for the same reason.
- Any change of content (split, a record removed, re-keying after 422) gets a new
  batch id: one key never names two contents.
- Record order is kept: the buffer's lease order (clinical lane first, then intake
  order) is the order on the wire, and the first half of a split goes first.

Batch ids are UUIDv7 (RFC 9562 section 5.7): 48 bits of Unix milliseconds, then 74
random bits. They sort by time, which keeps the hub's idempotency index append-only,
and the random part makes a collision between two nodes or two retries negligible.
"""

from __future__ import annotations

import gzip
import json
import secrets
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from agent.buffer import LeasedRecord
from agent.record import BlobRef, format_time

#: The ``sepas_batch`` format version of PROTOCOL.md.
BATCH_FORMAT: Final = 1
#: gzip level (zlib's default). Measured on 500 synthetic lab records with raw HL7
#: (tests/factories.py, 453 KB of JSON): level 1 -> 17.2% of the size in 3.4 ms,
#: 5 -> 15.02% in 8.5 ms, 6 -> 14.99% in 10.8 ms, 9 -> 14.73% in 13.1 ms. 5 and 6
#: are equal within 0.2%; past 6 the CPU buys little. Links are the scarce resource
#: at a facility, CPU is not, so 6.
GZIP_LEVEL: Final = 1

_RECORDS_OPEN: Final = b',"records":['
_CLOSE: Final = b"]}"


def uuid7(now: float) -> str:
    """A UUIDv7 (RFC 9562) for Unix time ``now``, as the canonical 36-character string."""
    ms = int(now * 1000) & ((1 << 48) - 1)
    rand = secrets.randbits(74)
    value = (
        (ms << 80)
        | (0x7 << 76)  # version
        | ((rand >> 62) << 64)  # rand_a: 12 bits
        | (0b10 << 62)  # variant
        | (rand & ((1 << 62) - 1))  # rand_b: 62 bits
    )
    return str(uuid.UUID(int=value))


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One record as the uploader handles it: its id, its canonical JSON, its blobs."""

    id: str
    service: str
    envelope: bytes  # the Record's canonical JSON, exactly as stored
    blobs: tuple[BlobRef, ...] = ()

    @classmethod
    def from_leased(cls, rec: LeasedRecord) -> BatchItem:
        blobs: tuple[BlobRef, ...] = ()
        # Only parse the envelope when it may list blobs: most records have none.
        if b'"blobs":' in rec.envelope:
            listed = json.loads(rec.envelope).get("blobs") or ()
            blobs = tuple(
                BlobRef(sha256=b["sha256"], media_type=b["media_type"], size=int(b["size"]))
                for b in listed
            )
        return cls(id=rec.id, service=rec.service, envelope=rec.envelope, blobs=blobs)


def _head(batch_id: str, node_id: str, created_at: str) -> bytes:
    head = json.dumps(
        {
            "sepas_batch": BATCH_FORMAT,
            "batch_id": batch_id,
            "node_id": node_id,
            "created_at": created_at,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8")
    return head[:-1]  # drop the closing brace: "records" follows


def body_size(items: Sequence[BatchItem], *, node_id: str) -> int:
    """Bytes of the uncompressed body that ``items`` make (the batch id and time have
    fixed lengths, so any values of them give the same size)."""
    fixed = len(_head(str(uuid.UUID(int=0)), node_id, "2000-01-01T00:00:00Z"))
    fixed += len(_RECORDS_OPEN) + len(_CLOSE)
    return fixed + sum(len(it.envelope) for it in items) + max(len(items) - 1, 0)


@dataclass(frozen=True, slots=True)
class Batch:
    """What one ``POST /v1/batches`` sends. Build with `form_batch`; never mutate."""

    batch_id: str
    node_id: str
    created_at: str
    items: tuple[BatchItem, ...]
    content: bytes = field(repr=False)  # gzip of the body: the bytes on the wire
    size: int  # bytes of the body before gzip

    @property
    def ids(self) -> list[str]:
        return [it.id for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def body(self) -> bytes:
        """The uncompressed JSON body (tests, debugging)."""
        return gzip.decompress(self.content)

    def split(self, *, now: float) -> tuple[Batch, Batch]:
        """Two halves, in order, each under a new batch id.

        Raises:
            ValueError: the batch has a single record.
        """
        if len(self.items) < 2:
            raise ValueError("a single-record batch cannot be split")
        mid = len(self.items) // 2
        return (
            form_batch(self.items[:mid], node_id=self.node_id, now=now),
            form_batch(self.items[mid:], node_id=self.node_id, now=now),
        )

    def rekey(self, *, now: float) -> Batch:
        """The same records under a new batch id (after a 422)."""
        return form_batch(self.items, node_id=self.node_id, now=now)

    def without(self, ids: Iterable[str], *, now: float) -> Batch | None:
        """The batch less ``ids`` (new id), or None if nothing is left."""
        drop = set(ids)
        keep = tuple(it for it in self.items if it.id not in drop)
        if len(keep) == len(self.items):
            return self
        return form_batch(keep, node_id=self.node_id, now=now) if keep else None


def form_batch(items: Sequence[BatchItem], *, node_id: str, now: float) -> Batch:
    """One batch of exactly ``items``, in order, with a fresh UUIDv7 id.

    Raises:
        ValueError: ``items`` is empty.
    """
    if not items:
        raise ValueError("a batch needs at least one record")
    batch_id = uuid7(now)
    created_at = format_time(datetime.fromtimestamp(int(now), UTC))
    body = b"".join(
        (
            _head(batch_id, node_id, created_at),
            _RECORDS_OPEN,
            b",".join(it.envelope for it in items),
            _CLOSE,
        )
    )
    return Batch(
        batch_id=batch_id,
        node_id=node_id,
        created_at=created_at,
        items=tuple(items),
        content=gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0),
        size=len(body),
    )


def form_batches(
    items: Sequence[BatchItem],
    *,
    node_id: str,
    max_records: int,
    max_bytes: int,
    now: float,
) -> list[Batch]:
    """Cut ``items`` into consecutive batches of at most ``max_records`` records and
    ``max_bytes`` uncompressed body bytes. A record bigger than ``max_bytes`` alone
    still makes a batch of one (the hub's 413 then decides its fate)."""
    batches: list[Batch] = []
    current: list[BatchItem] = []
    size = body_size((), node_id=node_id)
    for it in items:
        extra = len(it.envelope) + (1 if current else 0)
        if current and (len(current) >= max_records or size + extra > max_bytes):
            batches.append(form_batch(current, node_id=node_id, now=now))
            current, size = [], body_size((), node_id=node_id)
            extra = len(it.envelope)
        current.append(it)
        size += extra
    if current:
        batches.append(form_batch(current, node_id=node_id, now=now))
    return batches


def lease_budget(max_bytes: int, *, node_id: str) -> int:
    """The envelope bytes to lease so that one batch holds them within ``max_bytes``."""
    return max(1, max_bytes - body_size((), node_id=node_id))


# --- the hub's answer -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordResult:
    """One entry of a 200 answer's ``results``."""

    id: str
    status: str  # "accepted", "duplicate" or "rejected"; anything else is retried
    error: str | None = None


@dataclass(frozen=True, slots=True)
class BatchResult:
    """A 200 answer to ``POST /v1/batches``, checked against the batch it answers."""

    batch_id: str
    received_at: datetime  # tz-aware; its UTC date is the ledger day
    results: tuple[RecordResult, ...]
    replayed: bool = False  # Idempotent-Replayed: true

    @property
    def hub_day(self) -> str:
        return self.received_at.astimezone(UTC).date().isoformat()

    def by_status(self) -> dict[str, list[RecordResult]]:
        out: dict[str, list[RecordResult]] = {}
        for r in self.results:
            out.setdefault(r.status, []).append(r)
        return out


def parse_batch_result(data: Any, batch: Batch, *, replayed: bool = False) -> BatchResult:
    """Check a 200 body against ``batch``: same batch id, an RFC 3339 ``received_at``
    with an offset, one result per record sent and no other.

    Raises:
        ValueError: the body does not say what PROTOCOL.md says it must.
    """
    if not isinstance(data, dict):
        raise ValueError("the answer is not a JSON object")
    if data.get("batch_id") != batch.batch_id:
        raise ValueError("the answer's batch_id is not the batch's")
    received = data.get("received_at")
    if not isinstance(received, str):
        raise ValueError("received_at is missing")
    received_at = datetime.fromisoformat(received)
    if received_at.utcoffset() is None:
        raise ValueError("received_at has no offset")
    raw = data.get("results")
    if not isinstance(raw, list):
        raise ValueError("results is not a list")
    results: list[RecordResult] = []
    for r in raw:
        if not isinstance(r, dict) or not isinstance(r.get("id"), str):
            raise ValueError("a result has no id")
        error = r.get("error")
        results.append(
            RecordResult(
                id=r["id"],
                status=str(r.get("status")),
                error=error if isinstance(error, str) else None,
            )
        )
    sent = batch.ids
    if sorted(r.id for r in results) != sorted(sent):
        raise ValueError(
            f"the answer has {len(results)} results for {len(sent)} records, or other ids"
        )
    return BatchResult(
        batch_id=batch.batch_id,
        received_at=received_at,
        results=tuple(results),
        replayed=replayed,
    )
