"""`SqliteStore`: the hub's store in one SQLite file (demo and small installs).

Implements `hub.store.HubStore`; the invariants are stated there and tested by
tests/unit/test_hub_store.py, the suite every implementation passes.

How this one keeps them:
- Durability: ``journal_mode=WAL`` and ``synchronous=FULL``: when a write returns,
  it survives a power cut, so a batch response never claims records that are lost.
- Threads: one connection per thread (``threading.local``); the ASGI app calls the
  store from a thread pool. `close` closes every connection made.
- Processes: several uvicorn workers may share the file. Every write that reads
  before it decides (claims, nonces) runs in ``BEGIN IMMEDIATE``, which takes the
  write lock first, so two processes cannot both see a key as free. A busy lock is
  waited for (``busy_timeout``).
- Records are inserted with ``INSERT … ON CONFLICT DO NOTHING`` on the primary key
  (node_id, id): stored once, however often and however concurrently they arrive.
- A claim carries a random token kept in this object; `commit_batch` stores nothing
  and raises StorageError when the claim is no longer this request's (released,
  expired, or taken over after `CLAIM_TIMEOUT_SECS`), as `PostgresStore` does.
- Keys: adding a third active key retires the oldest (PROTOCOL.md: two at once, while
  rotating), as `PostgresStore` does.
- Errors: every ``sqlite3.Error`` becomes `agent.errors.StorageError` here (STYLE.md
  3.5); a busy or locked database is marked ``transient``.

Must never: log or put record content (envelopes hold patient data) in an exception.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from agent.errors import StorageError
from agent.wire import day_digest
from hub.store import Claim, ClaimState, DayDigest, IncomingRecord, NodeInfo, NodeKey

#: PRAGMA application_id: "SEPH" (SEPAS hub), to tell our file from any other.
APPLICATION_ID: Final = 0x53455048
SCHEMA_VERSION: Final = 1
BUSY_TIMEOUT_MS: Final = 30_000
#: A claim still in flight after this long belongs to a worker that died (kill -9,
#: power cut) without abandoning it; a retry with the same digest may take it over
#: instead of getting 409 until the entry expires. Far above any batch's processing
#: time; the same default as PostgresStore.
CLAIM_TIMEOUT_SECS: Final = 300.0
#: PROTOCOL.md: a node may have two active keys at once; a third retires the oldest.
MAX_ACTIVE_KEYS: Final = 2

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id       TEXT PRIMARY KEY,
    created_at    REAL NOT NULL,
    last_batch_at REAL
);
CREATE TABLE IF NOT EXISTS node_keys (
    node_id        TEXT NOT NULL REFERENCES nodes(node_id),
    fingerprint    TEXT NOT NULL,
    public_key_pem BLOB NOT NULL,
    added_at       REAL NOT NULL,
    revoked_at     REAL,
    PRIMARY KEY (node_id, fingerprint)
);
CREATE TABLE IF NOT EXISTS records (
    node_id      TEXT NOT NULL,
    id           TEXT NOT NULL,
    service      TEXT NOT NULL,
    occurred_at  TEXT NOT NULL,
    received_at  REAL NOT NULL,
    received_day TEXT NOT NULL,
    envelope     BLOB NOT NULL,
    PRIMARY KEY (node_id, id)
);
CREATE INDEX IF NOT EXISTS records_by_day ON records (node_id, received_day);
CREATE TABLE IF NOT EXISTS idempotency (
    node_id    TEXT NOT NULL,
    key        TEXT NOT NULL,
    digest     TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('in-flight', 'done')),
    claim      TEXT,
    response   BLOB,
    created_at REAL NOT NULL,
    PRIMARY KEY (node_id, key)
);
CREATE INDEX IF NOT EXISTS idempotency_by_age ON idempotency (created_at);
CREATE TABLE IF NOT EXISTS nonces (
    node_id    TEXT NOT NULL,
    nonce      TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (node_id, nonce)
);
CREATE INDEX IF NOT EXISTS nonces_by_expiry ON nonces (expires_at);
CREATE TABLE IF NOT EXISTS heartbeats (
    node_id     TEXT PRIMARY KEY,
    body        TEXT NOT NULL,
    received_at REAL NOT NULL
);
"""


def utc_day(ts: float) -> str:
    """The UTC date of a UNIX time, ``YYYY-MM-DD``: the day reconciliation counts by."""
    return datetime.fromtimestamp(ts, UTC).date().isoformat()


class SqliteStore:
    """`hub.store.HubStore` in a SQLite file at ``path`` (created, with its directory,
    if missing; the file is 0600: it holds patient data)."""

    def __init__(self, path: Path | str, *, claim_timeout_secs: float = CLAIM_TIMEOUT_SECS) -> None:
        self.path = Path(path)
        self.claim_timeout_secs = claim_timeout_secs
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._claims: dict[tuple[str, str], str] = {}  # (node, key) -> token of our claims
        self._closed = False
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.path.exists():
                # Create it 0600 before SQLite does (SQLite would honour the umask).
                fd = os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
                os.close(fd)
        except OSError as err:
            raise StorageError(
                f"Cannot create the hub database {self.path}: {err.strerror or err}.",
                hint="Check [store] url and that the hub's user may write that directory.",
            ) from None
        with self._write() as db:
            (app_id,) = db.execute("PRAGMA application_id").fetchone()
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if app_id not in (0, APPLICATION_ID):
                raise StorageError(f"{self.path} is not a SEPAS hub database.")
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"{self.path} has schema {version}; this hub knows {SCHEMA_VERSION}.",
                    hint="Upgrade sepas-hub to the version that wrote this database.",
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- connections ---------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise StorageError("The hub store is closed.", hint="This is a bug in the caller.")
        # isolation_level=None: no implicit transactions; we say BEGIN where we mean it.
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        self._local.conn = conn
        with self._lock:
            self._conns.append(conn)
        return conn

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """The one place sqlite3 errors become StorageError (STYLE.md 3.5)."""
        try:
            yield
        except sqlite3.Error as err:
            mapped = StorageError(
                f"SQLite ({self.path.name}): {type(err).__name__}: {err}",
                hint="Check the disk (space, permissions) under [store] url.",
            )
            # "database is locked" / "busy": another process held the write lock past
            # busy_timeout; trying later may work.
            mapped.transient = isinstance(err, sqlite3.OperationalError) and (
                "locked" in str(err) or "busy" in str(err)
            )
            raise mapped from err

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds the database's write lock from its start."""
        with self._errors():
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query inside sees the same snapshot."""
        with self._errors():
            db = self._conn()
            db.execute("BEGIN")
            try:
                yield db
            finally:
                if db.in_transaction:
                    db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    # -- the node registry ---------------------------------------------------------------

    def add_node_key(self, node_id: str, public_key_pem: bytes, fingerprint: str) -> None:
        now = _now()
        with self._write() as db:
            db.execute(
                "INSERT INTO nodes (node_id, created_at) VALUES (?, ?) "
                "ON CONFLICT (node_id) DO NOTHING",
                (node_id, now),
            )
            db.execute(
                "INSERT INTO node_keys (node_id, fingerprint, public_key_pem, added_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (node_id, fingerprint) DO UPDATE SET "
                "public_key_pem = excluded.public_key_pem, "
                "added_at = CASE WHEN revoked_at IS NULL THEN added_at "
                "ELSE excluded.added_at END, revoked_at = NULL",
                (node_id, fingerprint, bytes(public_key_pem), now),
            )
            # Keep the new key and the newest others, MAX_ACTIVE_KEYS in all.
            db.execute(
                "UPDATE node_keys SET revoked_at = ? WHERE node_id = ? AND revoked_at IS NULL "
                "AND fingerprint <> ? AND fingerprint NOT IN (SELECT fingerprint FROM "
                "node_keys WHERE node_id = ? AND revoked_at IS NULL AND fingerprint <> ? "
                "ORDER BY added_at DESC, fingerprint DESC LIMIT ?)",
                (now, node_id, fingerprint, node_id, fingerprint, MAX_ACTIVE_KEYS - 1),
            )

    def revoke_node(self, node_id: str) -> bool:
        with self._write() as db:
            if db.execute("SELECT 1 FROM nodes WHERE node_id = ?", (node_id,)).fetchone() is None:
                return False
            db.execute(
                "UPDATE node_keys SET revoked_at = ? WHERE node_id = ? AND revoked_at IS NULL",
                (_now(), node_id),
            )
            return True

    def active_keys(self, node_id: str) -> list[bytes]:
        with self._read() as db:
            rows = db.execute(
                "SELECT public_key_pem FROM node_keys WHERE node_id = ? AND revoked_at IS NULL "
                "ORDER BY added_at, fingerprint",
                (node_id,),
            ).fetchall()
        return [bytes(pem) for (pem,) in rows]

    def nodes(self) -> list[NodeInfo]:
        with self._read() as db:
            ids = [nid for (nid,) in db.execute("SELECT node_id FROM nodes ORDER BY 1")]
            return [info for nid in ids if (info := self._node(db, nid)) is not None]

    def node(self, node_id: str) -> NodeInfo | None:
        with self._read() as db:
            return self._node(db, node_id)

    def _node(self, db: sqlite3.Connection, node_id: str) -> NodeInfo | None:
        row = db.execute("SELECT last_batch_at FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        if row is None:
            return None
        keys = tuple(
            NodeKey(fingerprint=fp, public_key_pem=bytes(pem), added_at=added, revoked_at=revoked)
            for fp, pem, added, revoked in db.execute(
                "SELECT fingerprint, public_key_pem, added_at, revoked_at FROM node_keys "
                "WHERE node_id = ? ORDER BY added_at, fingerprint",
                (node_id,),
            )
        )
        (records,) = db.execute(
            "SELECT count(*) FROM records WHERE node_id = ?", (node_id,)
        ).fetchone()
        hb = db.execute(
            "SELECT body, received_at FROM heartbeats WHERE node_id = ?", (node_id,)
        ).fetchone()
        return NodeInfo(
            node_id=node_id,
            status="active" if any(k.revoked_at is None for k in keys) else "revoked",
            keys=keys,
            records=records,
            last_batch_at=row[0],
            heartbeat=None if hb is None else json.loads(hb[0]),
            heartbeat_at=None if hb is None else hb[1],
        )

    # -- replay protection ---------------------------------------------------------------

    def remember_nonce(self, node_id: str, nonce: str, *, now: float, ttl_secs: float) -> bool:
        with self._write() as db:
            db.execute("DELETE FROM nonces WHERE expires_at <= ?", (now,))
            cur = db.execute(
                "INSERT INTO nonces (node_id, nonce, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (node_id, nonce) DO NOTHING",
                (node_id, nonce, now + ttl_secs),
            )
            return cur.rowcount == 1

    # -- batches -------------------------------------------------------------------------

    def begin_batch(self, node_id: str, key: str, digest: str, *, now: float) -> Claim:
        token = secrets.token_hex(16)
        with self._write() as db:
            row = db.execute(
                "SELECT digest, state, response, created_at FROM idempotency "
                "WHERE node_id = ? AND key = ?",
                (node_id, key),
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO idempotency (node_id, key, digest, state, claim, created_at) "
                    "VALUES (?, ?, ?, 'in-flight', ?, ?)",
                    (node_id, key, digest, token, now),
                )
                claim = Claim(ClaimState.NEW)
            else:
                held_digest, state, response, created_at = row
                if held_digest != digest:
                    return Claim(ClaimState.CONFLICT)
                if state == "done":
                    return Claim(ClaimState.REPLAY, bytes(response))
                if now - created_at <= self.claim_timeout_secs:
                    return Claim(ClaimState.IN_FLIGHT)
                # The claim's worker died without releasing it: take it over.
                db.execute(
                    "UPDATE idempotency SET claim = ?, created_at = ? "
                    "WHERE node_id = ? AND key = ?",
                    (token, now, node_id, key),
                )
                claim = Claim(ClaimState.NEW)
        with self._lock:
            self._claims[(node_id, key)] = token
        return claim

    def commit_batch(
        self,
        node_id: str,
        key: str,
        records: Sequence[IncomingRecord],
        *,
        received_at: float,
        respond: Callable[[set[str]], bytes],
    ) -> bytes:
        with self._lock:
            token = self._claims.get((node_id, key))
        day = utc_day(received_at)
        with self._write() as db:
            row = db.execute(
                "SELECT state, claim FROM idempotency WHERE node_id = ? AND key = ?",
                (node_id, key),
            ).fetchone()
            if token is None or row is None or tuple(row) != ("in-flight", token):
                raise _ClaimLostError
            inserted: set[str] = set()
            for rec in records:
                cur = db.execute(
                    "INSERT INTO records (node_id, id, service, occurred_at, received_at, "
                    "received_day, envelope) VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (node_id, id) DO NOTHING",
                    (node_id, rec.id, rec.service, rec.occurred_at, received_at, day, rec.envelope),
                )
                if cur.rowcount == 1:
                    inserted.add(rec.id)
            response = bytes(respond(inserted))
            db.execute(
                "UPDATE idempotency SET state = 'done', response = ?, claim = NULL "
                "WHERE node_id = ? AND key = ?",
                (response, node_id, key),
            )
            db.execute(
                "UPDATE nodes SET last_batch_at = max(coalesce(last_batch_at, ?), ?) "
                "WHERE node_id = ?",
                (received_at, received_at, node_id),
            )
        self._forget_claim(node_id, key, token)
        return response

    def abandon_batch(self, node_id: str, key: str) -> None:
        with self._lock:
            token = self._claims.get((node_id, key))
        if token is None:
            return
        with self._write() as db:
            db.execute(
                "DELETE FROM idempotency WHERE node_id = ? AND key = ? AND state = 'in-flight' "
                "AND claim = ?",
                (node_id, key, token),
            )
        self._forget_claim(node_id, key, token)

    def _forget_claim(self, node_id: str, key: str, token: str | None) -> None:
        with self._lock:
            if token is not None and self._claims.get((node_id, key)) == token:
                del self._claims[(node_id, key)]

    def expire(self, *, now: float, idempotency_ttl_secs: float) -> None:
        with self._write() as db:
            db.execute(
                "DELETE FROM idempotency WHERE created_at < ?", (now - idempotency_ttl_secs,)
            )
            db.execute("DELETE FROM nonces WHERE expires_at <= ?", (now,))

    # -- what a node sees of itself ------------------------------------------------------

    def counts_by_service(self, node_id: str) -> dict[str, int]:
        with self._read() as db:
            rows = db.execute(
                "SELECT service, count(*) FROM records WHERE node_id = ? "
                "GROUP BY service ORDER BY 1",
                (node_id,),
            ).fetchall()
        return dict(rows)

    def day_digests(self, node_id: str, days: Sequence[str]) -> list[DayDigest]:
        # Reads every id of each day: fine for tens of thousands a day. Faster, when
        # needed: keep a (node_id, day) -> (count, running XOR) table updated in
        # commit_batch for the ids actually inserted (XOR is its own inverse, so the
        # order of arrival and concurrent batches do not matter).
        out = []
        with self._read() as db:
            for day in days:
                ids = [
                    rid
                    for (rid,) in db.execute(
                        "SELECT id FROM records WHERE node_id = ? AND received_day = ?",
                        (node_id, day),
                    )
                ]
                out.append(DayDigest(day=day, count=len(ids), digest=day_digest(ids)))
        return out

    def save_heartbeat(self, node_id: str, body: dict[str, Any], *, now: float) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO heartbeats (node_id, body, received_at) VALUES (?, ?, ?) "
                "ON CONFLICT (node_id) DO UPDATE SET body = excluded.body, "
                "received_at = excluded.received_at",
                (node_id, json.dumps(body, ensure_ascii=False, sort_keys=True), now),
            )


class _ClaimLostError(StorageError):
    """commit_batch for a claim this request no longer holds; nothing was stored."""

    def __init__(self) -> None:
        super().__init__(
            "This request no longer holds its idempotency claim (released, expired or "
            "taken over after the claim timeout); nothing was stored.",
            hint="The node's retry gets the stored response or processes the batch afresh.",
        )


def _now() -> float:
    return datetime.now(UTC).timestamp()
