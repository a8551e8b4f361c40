"""The hub's storage seam: one small interface, two implementations.

`store_sqlite.SqliteStore` (default; demo and small installs) and
`store_pg.PostgresStore` (production, psycopg 3). Both MUST pass the same suite
(tests/unit/test_hub_store.py, parametrised over every implementation; the PostgreSQL
run needs SEPAS_TEST_PG_DSN).

Invariants every implementation keeps:
- Records are keyed by (node_id, record id) and inserted with "on conflict do
  nothing": a record is stored once however often it arrives, also when two workers
  receive the same batch at the same moment.
- `begin_batch` claims an Idempotency-Key atomically: of two concurrent requests with
  one key, exactly one gets NEW; the other gets IN_FLIGHT (409) until the first
  finishes, then REPLAY with the stored response.
- `commit_batch` stores the batch's records and its response in one transaction, so a
  replayed response never claims records the store does not hold.
- A nonce is accepted once per node inside its expiry.
Blobs are not here: they live in a content-addressed directory (hub/blobs.py).
The reconciliation digest recipe is `agent.wire.day_digest`, shared with the node.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol


class ClaimState(StrEnum):
    NEW = "new"  # this request owns the key; process it, then commit_batch or abandon_batch
    IN_FLIGHT = "in-flight"  # another request with this key is being processed: 409
    REPLAY = "replay"  # done before with the same digest: return the stored response
    CONFLICT = "conflict"  # done before with another digest: 422


@dataclass(frozen=True, slots=True)
class Claim:
    state: ClaimState
    response: bytes | None = None  # the stored JSON response, for REPLAY


@dataclass(frozen=True, slots=True)
class IncomingRecord:
    id: str  # 64 hex
    service: str
    occurred_at: str
    envelope: bytes  # the record's JSON exactly as received (canonical at the node)


@dataclass(frozen=True, slots=True)
class NodeKey:
    fingerprint: str
    public_key_pem: bytes
    added_at: float
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    status: str  # "active" | "revoked"
    keys: tuple[NodeKey, ...]
    records: int
    last_batch_at: float | None
    heartbeat: dict[str, Any] | None  # the latest heartbeat body
    heartbeat_at: float | None


@dataclass(frozen=True, slots=True)
class DayDigest:
    day: str  # YYYY-MM-DD, UTC day of received_at
    count: int
    digest: str  # 64 hex: XOR of sha256(record id as ASCII) over the day's records


class HubStore(Protocol):
    # -- the node registry ---------------------------------------------------------------
    def add_node_key(self, node_id: str, public_key_pem: bytes, fingerprint: str) -> None:
        """Register a key (a node may hold two active keys while rotating); re-adding a
        revoked node's key makes the node active again."""
        ...

    def revoke_node(self, node_id: str) -> bool:
        """Revoke every key of the node; False if the node is unknown."""
        ...

    def active_keys(self, node_id: str) -> list[bytes]:
        """PEMs of the node's active keys; empty if unknown or revoked."""
        ...

    def nodes(self) -> list[NodeInfo]: ...

    def node(self, node_id: str) -> NodeInfo | None: ...

    # -- replay protection -----------------------------------------------------------------
    def remember_nonce(self, node_id: str, nonce: str, *, now: float, ttl_secs: float) -> bool:
        """True the first time (node, nonce) is seen inside ttl; False on a replay.
        Also forgets nonces past their expiry."""
        ...

    # -- batches -----------------------------------------------------------------------------
    def begin_batch(self, node_id: str, key: str, digest: str, *, now: float) -> Claim: ...

    def commit_batch(
        self,
        node_id: str,
        key: str,
        records: Sequence[IncomingRecord],
        *,
        received_at: float,
        respond: Callable[[set[str]], bytes],
    ) -> bytes:
        """In one transaction: insert the records (on conflict do nothing), call
        ``respond(inserted_ids)`` for the response body, and store it under the key.
        Returns the response body."""
        ...

    def abandon_batch(self, node_id: str, key: str) -> None:
        """Release a NEW claim whose processing failed, so a retry can take it."""
        ...

    def expire(self, *, now: float, idempotency_ttl_secs: float) -> None:
        """Forget idempotency entries older than the ttl (>= 7 days by PROTOCOL.md)."""
        ...

    # -- what a node sees of itself -------------------------------------------------------
    def counts_by_service(self, node_id: str) -> dict[str, int]: ...

    def day_digests(self, node_id: str, days: Sequence[str]) -> list[DayDigest]: ...

    def save_heartbeat(self, node_id: str, body: dict[str, Any], *, now: float) -> None: ...

    def close(self) -> None: ...
