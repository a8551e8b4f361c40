"""The hub's production store: PostgreSQL (>= 14) through psycopg 3.

`PostgresStore(dsn, *, schema="sepas_hub", claim_timeout_secs=300.0)` implements
`hub.store.HubStore`; see that module for the invariants. Design notes:

- Connections: one per thread (``threading.local``), autocommit off, every operation in
  one explicit ``conn.transaction()``; READ COMMITTED throughout. A broken connection
  is dropped and the next call reconnects. No pool package: uvicorn's worker threads
  are few and long-lived, so a connection per thread *is* the pool. A store inherited
  across ``fork()`` opens fresh connections in the child (never reuses the parent's
  sockets).
- Schema: created on first use, inside one transaction that first takes
  ``pg_advisory_xact_lock`` (key derived from the schema name) so that several uvicorn
  workers starting at once do not race on the catalog, and only when ``meta`` is
  missing: even ``CREATE INDEX IF NOT EXISTS`` takes a SHARE lock on its table, which
  would make a worker that starts while batches commit wait for them and stall every
  insert queued behind it. Table names are always schema-qualified; ``search_path`` is
  never touched. ``meta.schema_version`` refuses a schema newer than this hub.
- ``records.envelope`` is ``bytea``, not ``jsonb``: the envelope is the record's JSON
  exactly as the node sent it (canonical at the node). ``jsonb`` would reorder keys,
  drop duplicate keys and rewrite numbers, so the stored record could no longer be
  hashed or compared byte for byte with what the node holds; ``bytea`` also skips a
  JSON parse per record on the hot path. ``occurred_at`` is kept as the text received.
- Records go in with one ``INSERT … SELECT FROM unnest(arrays) ON CONFLICT DO NOTHING
  RETURNING id, service`` per batch, the bytea array sent in binary. Rows are sorted
  by id first, so two transactions inserting overlapping records always take their
  locks in the same order and cannot deadlock.
- ``service_counts`` (an addition to the brief's tables) keeps the number of records
  per (node, service), updated in the same transaction as the inserts (services in
  sorted order, again for lock order), so ``counts_by_service`` and ``nodes()`` never
  count a national-size ``records`` table. ``nodes.last_batch_at`` is the
  ``received_at`` of the node's latest committed batch (also one of duplicates only),
  kept for registered nodes, as SqliteStore does.
- Idempotency: ``begin_batch`` claims with ``INSERT … ON CONFLICT DO NOTHING``; on a
  conflict it tries ``UPDATE … WHERE digest = ours AND state = 'in-flight' AND
  created_at < now - claim_timeout RETURNING`` (atomic takeover of a claim whose
  worker died; of several concurrent takeovers the row lock lets one win), else reads
  the row: other digest -> CONFLICT, done -> REPLAY, in flight -> IN_FLIGHT. A claim
  carries a random token, remembered in this store object. ``commit_batch`` locks the
  row (``FOR UPDATE``), checks that it is still in flight under our token, and only
  then inserts, calls ``respond`` and marks the row done, all in one transaction; a
  claim lost meanwhile (taken over, abandoned, expired) rolls everything back and
  raises StorageError. A takeover that meets a commit in progress waits for the row
  lock (at most ``lock_timeout`` = 2 s, then answers IN_FLIGHT) and afterwards finds
  the row done. Limitation: the token is kept per (node, key) in this object, so if a
  stale claim is taken over *by the same store object*, the first holder's late
  commit wins and the second's fails; either way records and response agree.
- Nonces: ``INSERT … ON CONFLICT DO UPDATE … WHERE expires_at <= now``, so a nonce
  whose entry expired but is not yet swept is accepted again; expired rows are
  deleted at most once a minute per store, and by ``expire``.
- Keys: at most two active keys per node (PROTOCOL.md); adding a third retires the
  oldest active one. Re-adding a key (also to a revoked node) makes it and the node
  active again.
- ``day_digests`` computes PROTOCOL.md's digest in SQL: ``bit_xor`` (PostgreSQL 14+)
  over ``sha256(id)`` cast to ``bit(256)``, one row per requested day, served by an
  index-only scan of ``(node_id, received_day) INCLUDE (id)``. The test suite checks
  it equals ``agent.wire.day_digest`` over the stored ids.
- Errors: every ``psycopg.Error`` becomes ``agent.errors.StorageError`` here (STYLE.md
  3.5) with a hint naming host, port, database and user from the DSN, never the
  password; connection-level failures are marked ``transient``.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from typing import Any

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb

from agent.errors import SchemaVersionError, StorageError
from hub.store import Claim, ClaimState, DayDigest, IncomingRecord, NodeInfo, NodeKey

__all__ = ["DEFAULT_SCHEMA", "SCHEMA_VERSION", "PostgresStore"]

SCHEMA_VERSION = 1
DEFAULT_SCHEMA = "sepas_hub"
DEFAULT_CLAIM_TIMEOUT_SECS = 300.0
MAX_ACTIVE_KEYS = 2  # PROTOCOL.md: two active keys while rotating; a third retires the oldest
NONCE_SWEEP_EVERY_SECS = 60.0
BEGIN_LOCK_TIMEOUT = "2s"  # a claim row locked this long is being committed: IN_FLIGHT

_IN_FLIGHT = "in-flight"
_DONE = "done"
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")
_ZERO_DIGEST = "0" * 64

_DDL = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.meta (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    schema_version integer NOT NULL
);
INSERT INTO {s}.meta (schema_version) VALUES (1) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS {s}.nodes (
    node_id text PRIMARY KEY,
    status text NOT NULL CHECK (status IN ('active', 'revoked')),
    created_at timestamptz NOT NULL,
    last_batch_at timestamptz
);
CREATE TABLE IF NOT EXISTS {s}.node_keys (
    node_id text NOT NULL REFERENCES {s}.nodes (node_id) ON DELETE CASCADE,
    fingerprint text NOT NULL,
    public_key_pem bytea NOT NULL,
    added_at timestamptz NOT NULL,
    revoked_at timestamptz,
    PRIMARY KEY (node_id, fingerprint)
);
CREATE TABLE IF NOT EXISTS {s}.records (
    node_id text NOT NULL,
    id text NOT NULL,
    service text NOT NULL,
    occurred_at text NOT NULL,
    received_at timestamptz NOT NULL,
    received_day date NOT NULL,
    envelope bytea NOT NULL,
    PRIMARY KEY (node_id, id)
);
CREATE INDEX IF NOT EXISTS records_node_day ON {s}.records (node_id, received_day)
    INCLUDE (id);
CREATE TABLE IF NOT EXISTS {s}.service_counts (
    node_id text NOT NULL,
    service text NOT NULL,
    records bigint NOT NULL,
    PRIMARY KEY (node_id, service)
);
CREATE TABLE IF NOT EXISTS {s}.idempotency (
    node_id text NOT NULL,
    key text NOT NULL,
    digest text NOT NULL,
    state text NOT NULL CHECK (state IN ('in-flight', 'done')),
    claim text,
    response bytea,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (node_id, key)
);
CREATE INDEX IF NOT EXISTS idempotency_created ON {s}.idempotency (created_at);
CREATE TABLE IF NOT EXISTS {s}.nonces (
    node_id text NOT NULL,
    nonce text NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (node_id, nonce)
);
CREATE INDEX IF NOT EXISTS nonces_expires ON {s}.nonces (expires_at);
CREATE TABLE IF NOT EXISTS {s}.heartbeats (
    node_id text PRIMARY KEY,
    body jsonb NOT NULL,
    received_at timestamptz NOT NULL
)
"""

# Every statement the store runs; "{s}" becomes the quoted schema name once, at init.
_Q = {
    "claim": """
        INSERT INTO {s}.idempotency (node_id, key, digest, state, claim, created_at)
        VALUES (%s, %s, %s, 'in-flight', %s, %s)
        ON CONFLICT (node_id, key) DO NOTHING
        RETURNING 1""",
    "takeover": """
        UPDATE {s}.idempotency SET claim = %s, created_at = %s
        WHERE node_id = %s AND key = %s AND digest = %s AND state = 'in-flight'
          AND created_at < %s
        RETURNING 1""",
    "claim_row": """
        SELECT digest, state, response FROM {s}.idempotency WHERE node_id = %s AND key = %s""",
    "lock_claim": """
        SELECT state, claim FROM {s}.idempotency WHERE node_id = %s AND key = %s
        FOR UPDATE""",
    "insert_records": """
        INSERT INTO {s}.records
            (node_id, id, service, occurred_at, received_at, received_day, envelope)
        SELECT %s, r.id, r.service, r.occurred_at, %s, %s, r.envelope
        FROM unnest(%s::text[], %s::text[], %s::text[], %b::bytea[])
            AS r (id, service, occurred_at, envelope)
        ON CONFLICT (node_id, id) DO NOTHING
        RETURNING id, service""",
    "bump_counts": """
        INSERT INTO {s}.service_counts AS c (node_id, service, records)
        SELECT %s, t.service, t.n FROM unnest(%s::text[], %s::bigint[]) AS t (service, n)
        ON CONFLICT (node_id, service) DO UPDATE SET records = c.records + excluded.records""",
    "node_batch_at": """
        UPDATE {s}.nodes SET last_batch_at = greatest(last_batch_at, %s) WHERE node_id = %s""",
    "finish_claim": """
        UPDATE {s}.idempotency SET state = 'done', response = %s, claim = NULL
        WHERE node_id = %s AND key = %s""",
    "abandon": """
        DELETE FROM {s}.idempotency
        WHERE node_id = %s AND key = %s AND state = 'in-flight' AND claim = %s""",
    "expire_idempotency": "DELETE FROM {s}.idempotency WHERE created_at < %s",
    "expire_nonces": "DELETE FROM {s}.nonces WHERE expires_at <= %s",
    "nonce": """
        INSERT INTO {s}.nonces AS n (node_id, nonce, expires_at) VALUES (%s, %s, %s)
        ON CONFLICT (node_id, nonce) DO UPDATE SET expires_at = excluded.expires_at
        WHERE n.expires_at <= %s
        RETURNING 1""",
    "counts": """
        SELECT service, records FROM {s}.service_counts WHERE node_id = %s ORDER BY service""",
    "day_digests": """
        SELECT d.day, count(r.id),
               bit_xor(('x' || encode(sha256(convert_to(r.id, 'UTF8')), 'hex'))::bit(256))
        FROM (SELECT DISTINCT day FROM unnest(%s::date[]) AS u (day)) AS d
        LEFT JOIN {s}.records AS r ON r.node_id = %s AND r.received_day = d.day
        GROUP BY d.day""",
    "heartbeat": """
        INSERT INTO {s}.heartbeats (node_id, body, received_at) VALUES (%s, %s, %s)
        ON CONFLICT (node_id) DO UPDATE
        SET body = excluded.body, received_at = excluded.received_at""",
    "upsert_node": """
        INSERT INTO {s}.nodes (node_id, status, created_at) VALUES (%s, 'active', %s)
        ON CONFLICT (node_id) DO UPDATE SET status = 'active'""",
    "upsert_key": """
        INSERT INTO {s}.node_keys AS k (node_id, fingerprint, public_key_pem, added_at)
        VALUES (%s, %s, %s, %s)
        ON CONFLICT (node_id, fingerprint) DO UPDATE
        SET public_key_pem = excluded.public_key_pem,
            added_at = CASE WHEN k.revoked_at IS NULL THEN k.added_at
                            ELSE excluded.added_at END,
            revoked_at = NULL""",
    "retire_old_keys": """
        UPDATE {s}.node_keys SET revoked_at = %s
        WHERE node_id = %s AND revoked_at IS NULL AND fingerprint <> %s
          AND fingerprint NOT IN (
              SELECT fingerprint FROM {s}.node_keys
              WHERE node_id = %s AND revoked_at IS NULL AND fingerprint <> %s
              ORDER BY added_at DESC, fingerprint DESC
              LIMIT %s)""",
    "revoke_node": "UPDATE {s}.nodes SET status = 'revoked' WHERE node_id = %s RETURNING 1",
    "revoke_keys": """
        UPDATE {s}.node_keys SET revoked_at = %s WHERE node_id = %s AND revoked_at IS NULL""",
    "active_keys": """
        SELECT k.public_key_pem FROM {s}.node_keys AS k JOIN {s}.nodes AS n USING (node_id)
        WHERE k.node_id = %s AND n.status = 'active' AND k.revoked_at IS NULL
        ORDER BY k.added_at, k.fingerprint""",
    "node_rows": """
        SELECT n.node_id, n.status, h.body, h.received_at,
               coalesce(c.records, 0), n.last_batch_at
        FROM {s}.nodes AS n
        LEFT JOIN {s}.heartbeats AS h USING (node_id)
        LEFT JOIN (SELECT node_id, sum(records) AS records
                   FROM {s}.service_counts GROUP BY node_id) AS c USING (node_id)
        WHERE %(node_id)s::text IS NULL OR n.node_id = %(node_id)s
        ORDER BY n.node_id""",
    "key_rows": """
        SELECT node_id, fingerprint, public_key_pem, added_at, revoked_at
        FROM {s}.node_keys WHERE %(node_id)s::text IS NULL OR node_id = %(node_id)s
        ORDER BY node_id, added_at, fingerprint""",
    "schema_version": "SELECT schema_version FROM {s}.meta",
}


def _ts(secs: float) -> datetime:
    return datetime.fromtimestamp(secs, UTC)


def _secs(ts: datetime | None) -> float | None:
    return None if ts is None else ts.timestamp()


class PostgresStore:
    """`hub.store.HubStore` on PostgreSQL 14+; safe to share between threads."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        claim_timeout_secs: float = DEFAULT_CLAIM_TIMEOUT_SECS,
    ) -> None:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(f"schema name {schema!r} must match {_SCHEMA_NAME.pattern}")
        if claim_timeout_secs <= 0:
            raise ValueError("claim_timeout_secs must be positive")
        self._dsn = dsn
        self._schema = schema
        self._claim_timeout = float(claim_timeout_secs)
        self._where = _describe_dsn(dsn)
        self._hint = (
            f"Check that PostgreSQL is up and reachable at {self._where}, and that the "
            f"hub's role may create and use schema {schema!r}."
        )
        ident = sql.Identifier(schema).as_string(None)
        self._q = {name: text.replace("{s}", ident) for name, text in _Q.items()}
        self._ddl = _DDL.replace("{s}", ident)
        # pg_advisory_xact_lock key: stable across processes, one per schema name.
        self._lock_key = int.from_bytes(
            hashlib.sha256(f"sepas-hub schema {schema}".encode()).digest()[:8], "big", signed=True
        )
        self._lock = threading.Lock()
        self._local = threading.local()
        self._conns: dict[int, tuple[threading.Thread, psycopg.Connection[Any]]] = {}
        self._pid = os.getpid()
        self._schema_ready = False
        self._closed = False
        self._claims: dict[tuple[str, str], tuple[str, float]] = {}  # (node, key) -> token, at
        self._last_nonce_sweep = float("-inf")

    def __repr__(self) -> str:
        return f"PostgresStore({self._where}, schema={self._schema!r})"

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connections -----------------------------------------------------------------------
    def _conn(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise StorageError("the hub store is closed", hint="This is a bug in the caller.")
        if self._pid != os.getpid():
            # Inherited across fork: never touch the parent's sockets (closing them would
            # end the parent's sessions), nor its lock, which another thread may have held.
            self._lock = threading.Lock()
            self._local = threading.local()
            self._conns = {}
            self._claims = {}
            self._pid = os.getpid()
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            self._drop(conn)
        conn = self._connect()
        with self._lock:
            dead = [t for t, (th, _) in self._conns.items() if not th.is_alive()]
            for tid in dead:
                self._conns.pop(tid)[1].close()
            self._conns[threading.get_ident()] = (threading.current_thread(), conn)
        self._local.conn = conn
        if not self._schema_ready:
            self._ensure_schema(conn)
        return conn

    def _connect(self) -> psycopg.Connection[Any]:
        params = conninfo_to_dict(self._dsn)
        extra: dict[str, Any] = {}
        if "connect_timeout" not in params:
            extra["connect_timeout"] = 10
        if "application_name" not in params:
            extra["application_name"] = "sepas-hub"
        return psycopg.connect(self._dsn, autocommit=False, **extra)

    def _drop(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            for tid, (_, c) in list(self._conns.items()):
                if c is conn:
                    del self._conns[tid]
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        conn.close()

    def _ensure_schema(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            if self._schema_ready:
                return
            with conn.transaction():
                conn.execute("SET LOCAL client_min_messages = warning")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
                # Only when the schema is missing: even CREATE INDEX IF NOT EXISTS takes a
                # SHARE lock on its table, so a worker starting while batches commit would
                # queue behind them and stall every insert queued behind it.
                meta = f"{sql.Identifier(self._schema).as_string(None)}.meta"
                if conn.execute("SELECT to_regclass(%s)", (meta,)).fetchone() == (None,):
                    for stmt in self._ddl.split(";\n"):
                        conn.execute(stmt)  # type: ignore[call-overload]  # built from constants
                row = conn.execute(self._q["schema_version"]).fetchone()  # type: ignore[call-overload]
            version = row[0] if row else None
            if version != SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"schema {self._schema!r} at {self._where} has version {version}; "
                    f"this hub knows version {SCHEMA_VERSION}",
                    hint="Upgrade sepas-hub to the version that wrote this schema.",
                )
            self._schema_ready = True

    @contextmanager
    def _errors(self, op: str) -> Iterator[None]:
        """The one place psycopg errors become StorageError (STYLE.md 3.5)."""
        try:
            yield
        except psycopg.Error as e:
            conn = getattr(self._local, "conn", None)
            if conn is not None and (conn.closed or conn.broken):
                self._drop(conn)
            raise self._map(e, op) from e

    def _map(self, err: psycopg.Error, op: str) -> StorageError:
        state = f", SQLSTATE {err.sqlstate}" if err.sqlstate else ""
        text = err.diag.message_primary or (str(err).strip().splitlines() or [""])[0]
        mapped = StorageError(
            f"PostgreSQL {op} failed ({type(err).__name__}{state}): {text[:300]}",
            hint=self._hint,
        )
        # Connection loss, timeouts, deadlocks, serialization failures: try again later.
        mapped.transient = isinstance(err, psycopg.OperationalError)
        return mapped

    def _run(self, op: str, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        with self._errors(op):
            conn = self._conn()
            with conn.transaction():
                return fn(conn)

    def _x(self, conn: psycopg.Connection[Any], name: str, params: Any = None) -> psycopg.Cursor:
        return conn.execute(self._q[name], params)  # type: ignore[call-overload]

    # -- the node registry -----------------------------------------------------------------
    def add_node_key(self, node_id: str, public_key_pem: bytes, fingerprint: str) -> None:
        now = _ts(time.time())

        def tx(conn: psycopg.Connection[Any]) -> None:
            # The upsert locks the node's row: concurrent key changes for a node serialise.
            self._x(conn, "upsert_node", (node_id, now))
            self._x(conn, "upsert_key", (node_id, fingerprint, bytes(public_key_pem), now))
            self._x(
                conn,
                "retire_old_keys",
                (now, node_id, fingerprint, node_id, fingerprint, MAX_ACTIVE_KEYS - 1),
            )

        self._run("add_node_key", tx)

    def revoke_node(self, node_id: str) -> bool:
        now = _ts(time.time())

        def tx(conn: psycopg.Connection[Any]) -> bool:
            if self._x(conn, "revoke_node", (node_id,)).fetchone() is None:
                return False
            self._x(conn, "revoke_keys", (now, node_id))
            return True

        return bool(self._run("revoke_node", tx))

    def active_keys(self, node_id: str) -> list[bytes]:
        rows = self._run("active_keys", lambda c: self._x(c, "active_keys", (node_id,)).fetchall())
        return [bytes(r[0]) for r in rows]

    def nodes(self) -> list[NodeInfo]:
        return self._run("nodes", lambda c: self._node_infos(c, None))

    def node(self, node_id: str) -> NodeInfo | None:
        found = self._run("node", lambda c: self._node_infos(c, node_id))
        return found[0] if found else None

    def _node_infos(self, conn: psycopg.Connection[Any], node_id: str | None) -> list[NodeInfo]:
        params = {"node_id": node_id}
        keys: dict[str, list[NodeKey]] = {}
        for nid, fp, pem, added, revoked in self._x(conn, "key_rows", params):
            keys.setdefault(nid, []).append(
                NodeKey(fp, bytes(pem), added.timestamp(), _secs(revoked))
            )
        return [
            NodeInfo(
                node_id=nid,
                status=status,
                keys=tuple(keys.get(nid, ())),
                records=int(records),
                last_batch_at=_secs(last_at),
                heartbeat=body,
                heartbeat_at=_secs(hb_at),
            )
            for nid, status, body, hb_at, records, last_at in self._x(conn, "node_rows", params)
        ]

    # -- replay protection -----------------------------------------------------------------
    def remember_nonce(self, node_id: str, nonce: str, *, now: float, ttl_secs: float) -> bool:
        sweep = not (0 <= now - self._last_nonce_sweep < NONCE_SWEEP_EVERY_SECS)

        def tx(conn: psycopg.Connection[Any]) -> bool:
            if sweep:
                self._x(conn, "expire_nonces", (_ts(now),))
            row = self._x(conn, "nonce", (node_id, nonce, _ts(now + ttl_secs), _ts(now)))
            return row.fetchone() is not None

        fresh = bool(self._run("remember_nonce", tx))
        if sweep:
            self._last_nonce_sweep = now
        return fresh

    # -- batches ---------------------------------------------------------------------------
    def begin_batch(self, node_id: str, key: str, digest: str, *, now: float) -> Claim:
        token = secrets.token_hex(16)
        at, stale_before = _ts(now), _ts(now - self._claim_timeout)

        def tx(conn: psycopg.Connection[Any]) -> Claim | None:
            # A claim row that stays locked this long is being committed right now.
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (BEGIN_LOCK_TIMEOUT,))
            if self._x(conn, "claim", (node_id, key, digest, token, at)).fetchone():
                return Claim(ClaimState.NEW)
            # Taken over only with the same digest, while still in flight and older than
            # the timeout; the row lock makes one of several concurrent takeovers win, and
            # a commit holding the lock finishes first (then the row is done, not taken).
            taken = (token, at, node_id, key, digest, stale_before)
            if self._x(conn, "takeover", taken).fetchone():
                return Claim(ClaimState.NEW)
            row = self._x(conn, "claim_row", (node_id, key)).fetchone()
            if row is None:
                return None  # released or expired between our statements: try again
            stored_digest, state, response = row
            if stored_digest != digest:
                return Claim(ClaimState.CONFLICT)
            if state == _DONE:
                return Claim(ClaimState.REPLAY, bytes(response))
            return Claim(ClaimState.IN_FLIGHT)

        for _ in range(5):
            try:
                claim = self._run("begin_batch", tx)
            except StorageError as e:
                if isinstance(e.__cause__, psycopg.errors.LockNotAvailable):
                    return Claim(ClaimState.IN_FLIGHT)
                raise
            if claim is not None:
                if claim.state is ClaimState.NEW:
                    with self._lock:
                        self._claims[(node_id, key)] = (token, now)
                return claim
        raise StorageError(
            "PostgreSQL begin_batch: the claim kept disappearing under concurrent releases",
            hint="Retry the request; if it persists, check for a process deleting claims.",
        )

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
            held = self._claims.get((node_id, key))
        token = held[0] if held else None
        at = _ts(received_at)
        ordered = sorted(records, key=lambda r: r.id)  # one lock order for every transaction

        def tx(conn: psycopg.Connection[Any]) -> bytes:
            row = self._x(conn, "lock_claim", (node_id, key)).fetchone()
            if token is None or row is None or row[0] != _IN_FLIGHT or row[1] != token:
                raise _ClaimLost
            inserted: dict[str, str] = {}
            if ordered:
                params = (
                    node_id,
                    at,
                    at.date(),
                    [r.id for r in ordered],
                    [r.service for r in ordered],
                    [r.occurred_at for r in ordered],
                    [bytes(r.envelope) for r in ordered],
                )
                inserted = dict(self._x(conn, "insert_records", params).fetchall())
            if inserted:
                per_service: dict[str, int] = {}
                for service in inserted.values():
                    per_service[service] = per_service.get(service, 0) + 1
                services = sorted(per_service)
                counts = [per_service[s] for s in services]
                self._x(conn, "bump_counts", (node_id, services, counts))
            response = bytes(respond(set(inserted)))
            self._x(conn, "finish_claim", (response, node_id, key))
            self._x(conn, "node_batch_at", (at, node_id))
            return response

        try:
            response: bytes = self._run("commit_batch", tx)
        except _ClaimLost:
            self._forget_claim(node_id, key, token)
            lost = StorageError(
                f"batch {key[:36]!r} of node {node_id!r}: this request no longer holds its "
                "idempotency claim (taken over after the claim timeout, released or expired); "
                "nothing was stored",
                hint="The node's retry gets the stored response or processes the batch afresh.",
            )
            lost.transient = True  # answer 503: a retry later succeeds (REPLAY or NEW)
            raise lost from None
        self._forget_claim(node_id, key, token)
        return response

    def abandon_batch(self, node_id: str, key: str) -> None:
        with self._lock:
            held = self._claims.get((node_id, key))
        if held is None:
            return
        token = held[0]
        self._run("abandon_batch", lambda c: self._x(c, "abandon", (node_id, key, token)))
        self._forget_claim(node_id, key, token)

    def _forget_claim(self, node_id: str, key: str, token: str | None) -> None:
        with self._lock:
            held = self._claims.get((node_id, key))
            if held is not None and held[0] == token:
                del self._claims[(node_id, key)]

    def expire(self, *, now: float, idempotency_ttl_secs: float) -> None:
        before = now - idempotency_ttl_secs

        def tx(conn: psycopg.Connection[Any]) -> None:
            self._x(conn, "expire_idempotency", (_ts(before),))
            self._x(conn, "expire_nonces", (_ts(now),))

        self._run("expire", tx)
        with self._lock:
            for k in [k for k, (_, at) in self._claims.items() if at < before]:
                del self._claims[k]

    # -- what a node sees of itself --------------------------------------------------------
    def counts_by_service(self, node_id: str) -> dict[str, int]:
        rows = self._run("counts_by_service", lambda c: self._x(c, "counts", (node_id,)).fetchall())
        return {service: int(n) for service, n in rows if n}

    def day_digests(self, node_id: str, days: Sequence[str]) -> list[DayDigest]:
        wanted = [date.fromisoformat(d) for d in days]
        if not wanted:
            return []
        rows = self._run(
            "day_digests", lambda c: self._x(c, "day_digests", (wanted, node_id)).fetchall()
        )
        found = {
            day: (int(n), _ZERO_DIGEST if bits is None else f"{int(bits, 2):064x}")
            for day, n, bits in rows
        }
        return [DayDigest(d.isoformat(), *found[d]) for d in wanted]

    def save_heartbeat(self, node_id: str, body: dict[str, Any], *, now: float) -> None:
        params = (node_id, Jsonb(body), _ts(now))
        self._run("save_heartbeat", lambda c: self._x(c, "heartbeat", params))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [c for _, c in self._conns.values()] if self._pid == os.getpid() else []
            self._conns = {}
        self._local = threading.local()
        for conn in conns:
            conn.close()


class _ClaimLost(Exception):
    """Internal: raised inside commit_batch's transaction to roll it back."""


def _describe_dsn(dsn: str) -> str:
    """host, port, database and user of a DSN, for messages; never the password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "an unparsable DSN"
    parts = [f"{k}={params[k]}" for k in ("host", "port", "dbname", "user") if params.get(k)]
    return " ".join(parts) or "the libpq defaults (PGHOST, PGDATABASE…)"
