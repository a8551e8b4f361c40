"""Fixtures for the real agent uploader against the real hub over HTTP on 127.0.0.1.

- `sync_hub`: start hubs under uvicorn (conftest's `_serve`: a thread, a free port),
  over a SQLite store or, when asked, a PostgreSQL store in its own schema. The store
  the app uses is a `TapStore`: it delegates to the real store and lets a test see
  every commit in order and run code before or after one (gate it, revoke the node,
  fail once with a transient error).
- `make_node`: a node as `agent.uploader.build` wires it (a real `AgentConfig`, a
  real `Buffer` in tmp_path, a `HubClient` over real sockets), with the clock, sleep,
  key and node id a test chooses.
- `Tap`: an httpx transport in front of the real one that lets a test tamper with,
  record, replay or cut a request after the signer has signed it: the man in the
  middle the signatures exist for.
- `stored_ids`, `delete_stored_day`: read and damage the hub's store directly (SQL), to
  check what it holds without going through the code under test.
- `pg_dsn_or_skip`: SEPAS_TEST_PG_DSN, or skip (fail under SEPAS_REQUIRE_PEERS=1).

Import the fixtures by their function names (``sync_hub_fixture``,
``make_node_fixture``); tests ask for them as ``sync_hub`` and ``make_node``.

Nothing here sleeps to wait for something: waits are bounded loops on conditions.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.buffer import Buffer, State
from agent.config import AgentConfig, HubSettings, NodeSettings
from agent.record import Record
from agent.uploader import HubClient, SigningAuth, Uploader, build
from hub.app import create_app
from hub.blobs import BlobStore
from hub.settings import HubSettings as HubServerSettings
from hub.settings import LimitSettings, StoreSettings
from hub.store import HubStore, IncomingRecord
from hub.store_sqlite import SqliteStore
from tests.hubkit import NODE, register, require_peer
from tests.interop.conftest import _serve

__all__ = [
    "DSN_ENV",
    "NODE",
    "Exchange",
    "SyncHub",
    "SyncNode",
    "Tap",
    "TapStore",
    "delete_stored_day",
    "make_node_fixture",
    "pg_dsn_or_skip",
    "stored_envelopes",
    "stored_ids",
    "sync_hub_fixture",
    "utc_today",
    "wait_for",
]

DSN_ENV = "SEPAS_TEST_PG_DSN"
#: Longest any condition is waited for before a test fails.
WAIT_SECS = 30.0


def wait_for(what: str, cond: Callable[[], bool], *, timeout: float = WAIT_SECS) -> None:
    """Poll ``cond`` (a cheap check) until it holds; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)  # between polls of a bounded loop


def pg_dsn_or_skip() -> str:
    """The PostgreSQL DSN for tests: skip without one (fail under SEPAS_REQUIRE_PEERS=1)."""
    dsn = os.environ.get(DSN_ENV, "")
    if not dsn:
        require_peer("PostgreSQL", f"{DSN_ENV} is not set")
    try:
        import psycopg
    except ImportError:
        require_peer("PostgreSQL", "psycopg is not installed (pip install -e '.[postgres]')")
    try:
        psycopg.connect(dsn, connect_timeout=5).close()
    except psycopg.Error as e:
        require_peer("PostgreSQL", f"unreachable from {DSN_ENV} ({type(e).__name__})")
    return dsn


# -- the hub ------------------------------------------------------------------------------


class TapStore:
    """A `HubStore` that delegates to ``inner`` and lets tests watch and steer commits.

    ``commits``: ids of each committed batch, in commit order. Hooks (None: off):
    ``before_begin(node, key)``, ``before_commit(key, records)``,
    ``after_commit(key, records)``; a hook may raise to make the hub fail there.
    """

    def __init__(self, inner: HubStore) -> None:
        self.inner = inner
        self.commits: list[list[str]] = []
        self.before_begin: Callable[[str, str], None] | None = None
        self.before_commit: Callable[[str, Sequence[IncomingRecord]], None] | None = None
        self.after_commit: Callable[[str, Sequence[IncomingRecord]], None] | None = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def begin_batch(self, node_id: str, key: str, digest: str, *, now: float) -> Any:
        if self.before_begin is not None:
            self.before_begin(node_id, key)
        return self.inner.begin_batch(node_id, key, digest, now=now)

    def commit_batch(
        self,
        node_id: str,
        key: str,
        records: Sequence[IncomingRecord],
        *,
        received_at: float,
        respond: Callable[[set[str]], bytes],
    ) -> bytes:
        if self.before_commit is not None:
            self.before_commit(key, records)
        out = self.inner.commit_batch(
            node_id, key, records, received_at=received_at, respond=respond
        )
        with self._lock:
            self.commits.append([r.id for r in records])
        if self.after_commit is not None:
            self.after_commit(key, records)
        return out


@dataclass
class SyncHub:
    """A hub under uvicorn on 127.0.0.1 whose store a test can reach directly."""

    kind: str  # "sqlite" | "postgresql"
    base_url: str
    port: int
    store: TapStore  # what the app uses
    blobs: BlobStore
    key: Ed25519PrivateKey  # registered for NODE
    settings: HubServerSettings
    sqlite_path: Path | None = None
    pg: tuple[str, str] | None = None  # (dsn, schema)

    @property
    def url(self) -> str:
        """``hub.url`` as a node's config writes it."""
        return self.base_url + "/"


@pytest.fixture(name="sync_hub")
def sync_hub_fixture(tmp_path: Path) -> Iterator[Callable[..., SyncHub]]:
    """``start(kind="sqlite", **limits)``: a running hub; all are stopped at teardown
    (and a PostgreSQL schema dropped)."""
    running: list[tuple[uvicorn.Server, threading.Thread, SyncHub]] = []

    def start(kind: str = "sqlite", **limits: Any) -> SyncHub:
        n = len(running)
        blobs = BlobStore(tmp_path / f"hub-blobs{n}")
        inner: HubStore
        sqlite_file: Path | None = None
        pg: tuple[str, str] | None = None
        if kind == "sqlite":
            sqlite_file = tmp_path / f"hub{n}.db"
            inner = SqliteStore(sqlite_file)
            url = f"sqlite://{sqlite_file}"
        elif kind == "postgresql":
            from hub.store_pg import PostgresStore

            dsn = pg_dsn_or_skip()
            schema = f"sepas_sync_{secrets.token_hex(6)}"
            inner = PostgresStore(dsn, schema=schema)
            pg = (dsn, schema)
            url = dsn
        else:
            raise ValueError(kind)
        key = Ed25519PrivateKey.generate()
        register(inner, NODE, key)
        settings = HubServerSettings(
            store=StoreSettings(url=url, blob_dir=blobs.root), limits=LimitSettings(**limits)
        )
        store = TapStore(inner)
        app = create_app(settings, store, blobs=blobs)  # type: ignore[arg-type]
        server, thread, port = _serve(app)
        hub = SyncHub(
            kind=kind,
            base_url=f"http://127.0.0.1:{port}",
            port=port,
            store=store,
            blobs=blobs,
            key=key,
            settings=settings,
            sqlite_path=sqlite_file,
            pg=pg,
        )
        running.append((server, thread, hub))
        return hub

    yield start
    for server, thread, hub in running:
        server.should_exit = True
        thread.join(timeout=15)
        hub.store.inner.close()
        if hub.pg is not None:
            import psycopg

            dsn, schema = hub.pg
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        assert not thread.is_alive(), "the hub's uvicorn thread did not stop"


def _hub_rows(hub: SyncHub, sql_sqlite: str, sql_pg: str, params: tuple[Any, ...]) -> list[Any]:
    if hub.sqlite_path is not None:
        with contextlib.closing(sqlite3.connect(hub.sqlite_path, timeout=30)) as db:
            return db.execute(sql_sqlite, params).fetchall()
    import psycopg

    assert hub.pg is not None
    dsn, schema = hub.pg
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql_pg.replace("{s}", f'"{schema}"'), params).fetchall()  # type: ignore[call-overload]


def stored_ids(hub: SyncHub, node_id: str = NODE) -> list[str]:
    """Every record id the hub's store holds for ``node_id`` (one per row), read with
    SQL, not through the store's code."""
    rows = _hub_rows(
        hub,
        "SELECT id FROM records WHERE node_id = ?",
        "SELECT id FROM {s}.records WHERE node_id = %s",
        (node_id,),
    )
    return [r[0] for r in rows]


def stored_envelopes(hub: SyncHub, node_id: str = NODE) -> dict[str, bytes]:
    """id -> the envelope bytes the hub stored."""
    rows = _hub_rows(
        hub,
        "SELECT id, envelope FROM records WHERE node_id = ?",
        "SELECT id, envelope FROM {s}.records WHERE node_id = %s",
        (node_id,),
    )
    return {r[0]: bytes(r[1]) for r in rows}


def delete_stored_day(hub: SyncHub, day: str, ids: Sequence[str], node_id: str = NODE) -> int:
    """Delete these records of ``day`` from a SQLite hub store, as a restore from an
    older backup would lose them. Returns how many rows went."""
    assert hub.sqlite_path is not None, "only for the SQLite store"
    with contextlib.closing(sqlite3.connect(hub.sqlite_path, timeout=30)) as db, db:
        marks = ",".join("?" * len(ids))
        return db.execute(
            f"DELETE FROM records WHERE node_id = ? AND received_day = ? AND id IN ({marks})",  # noqa: S608
            (node_id, day, *ids),
        ).rowcount


# -- the node -----------------------------------------------------------------------------


@dataclass
class SyncNode:
    """A node's buffer and its uploader, wired by `agent.uploader.build`."""

    buffer: Buffer
    client: HubClient
    uploader: Uploader
    sleeps: list[float] = field(default_factory=list)

    def put(self, records: Sequence[Record]) -> list[str]:
        self.buffer.put(records)
        return [r.id for r in records]

    def state_counts(self, ids: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for rid in ids:
            st = self.buffer.state_of(rid)
            name = "missing" if st is None else State(st).value
            out[name] = out.get(name, 0) + 1
        return out

    def retry_now(self, **kw: Any) -> Any:
        """What an operator's ``sync --once`` does: make everything due, sync."""
        self.buffer.make_due()
        return self.uploader.sync_once(force=True, **kw)


@pytest.fixture(name="make_node")
def make_node_fixture(tmp_path: Path) -> Iterator[Callable[..., SyncNode]]:
    """``make(hub_url, key, *, node_id=NODE, clock=time.time, sleep=None, transport=None,
    buffer_clock=None, sign_as=None, seed=7, **hub_settings)``: a node; its buffer and
    client are closed at teardown. ``sign_as`` signs with another key id than the node
    id (a misconfigured node); ``seed`` fixes the backoff jitter. ``sleep`` defaults
    to one that records the wait and returns at once (the hub in these tests never
    needs the time to pass)."""
    made: list[SyncNode] = []

    def make(
        hub_url: str,
        key: Ed25519PrivateKey,
        *,
        node_id: str = NODE,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] | None = None,
        transport: httpx.BaseTransport | None = None,
        buffer_clock: Callable[[], float] | None = None,
        sign_as: str | None = None,
        seed: int = 7,
        **hub_settings: Any,
    ) -> SyncNode:
        data_dir = tmp_path / f"node{len(made)}"
        hub_settings.setdefault("timeout_secs", 20.0)
        cfg = AgentConfig(
            node=NodeSettings(id=node_id, data_dir=data_dir),
            hub=HubSettings(url=hub_url, **hub_settings),
        )
        buffer = Buffer.open(data_dir, data_key=None, clock=buffer_clock or clock)
        sleeps: list[float] = []

        def record_sleep(secs: float) -> None:
            sleeps.append(secs)

        client, uploader = build(
            cfg, buffer, key, transport=transport, clock=clock, sleep=sleep or record_sleep
        )
        if sign_as is not None:  # a node whose key id is not its node id
            client.close()
            client = HubClient(
                cfg.hub,
                SigningAuth(key, sign_as, clock=clock),
                node_id=node_id,
                transport=transport,
                clock=clock,
                sleep=sleep or record_sleep,
            )
            uploader.client = client
        uploader._rand = random.Random(seed).random  # deterministic jitter
        node = SyncNode(buffer, client, uploader, sleeps)
        made.append(node)
        return node

    yield make
    for node in made:
        node.client.close()
        node.buffer.close()


# -- a man in the middle ------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """One request a `Tap` let through, and the status and headers of the answer."""

    method: str
    path: str
    headers: dict[str, str]  # the request's, lower-case names
    status: int | None = None  # None: no answer (the hook cut it, or the network)
    response_headers: dict[str, str] = field(default_factory=dict)


class Tap(httpx.BaseTransport):
    """A real HTTP transport with a hook between the signer and the socket.

    ``hook(request) -> request | None`` sees every request after it was signed; it may
    change it (tamper), return None to forward it unchanged, or raise an httpx error
    (a cut connection). ``exchanges`` keeps what went out and what came back.
    """

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.hook: Callable[[httpx.Request], httpx.Request | None] | None = None
        self.exchanges: list[Exchange] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.hook is not None:
            request = self.hook(request) or request
        sent = (request.method, request.url.path, dict(request.headers))
        try:
            response = self.inner.handle_request(request)
        except httpx.HTTPError:
            self.exchanges.append(Exchange(*sent))
            raise
        self.exchanges.append(Exchange(*sent, response.status_code, dict(response.headers)))
        return response

    def batches(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.path == "/v1/batches"]

    def close(self) -> None:
        self.inner.close()


def utc_today() -> str:
    return datetime.now(UTC).date().isoformat()
