"""hub.store_pg.PostgresStore against a real PostgreSQL server.

Needs SEPAS_TEST_PG_DSN (e.g. postgresql://postgres@127.0.0.1:5432/test); without it the
tests skip, except under SEPAS_REQUIRE_PEERS=1, where a missing DSN or an unreachable
server fails. Every test works in its own schema (random name), dropped afterwards.
The HubStore conformance suite (tests/unit/test_hub_store.py) covers the behaviour
shared with SqliteStore; this module covers what only a real server can show:
concurrency across threads and processes, schema creation races, SQL-side digests,
lost connections, and the bulk insert's speed.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import SchemaVersionError, StorageError
from agent.wire import day_digest
from hub.store import ClaimState, IncomingRecord

try:
    import psycopg
    from psycopg.conninfo import make_conninfo

    from hub.store_pg import PostgresStore
except ImportError:  # the `postgres` extra is not installed
    psycopg = None  # type: ignore[assignment]

pytestmark = [pytest.mark.peers]

DSN_ENV = "SEPAS_TEST_PG_DSN"
WAIT = 60.0  # seconds any event or queue is waited for before the test fails
DAY = 86_400.0
T0 = 1_795_000_000.0  # 2026-11-18T…Z: a fixed hub clock


# -- fixtures ------------------------------------------------------------------------------
def _pg_dsn() -> str:
    required = os.environ.get("SEPAS_REQUIRE_PEERS") == "1"

    def missing(why: str) -> None:
        if required:
            pytest.fail(f"SEPAS_REQUIRE_PEERS=1 but {why}", pytrace=False)
        pytest.skip(why)

    if psycopg is None:
        missing("psycopg is not installed (pip install -e '.[postgres]')")
    dsn = os.environ.get(DSN_ENV, "")
    if not dsn:
        missing(f"{DSN_ENV} is not set")
    try:
        psycopg.connect(dsn, connect_timeout=5).close()
    except psycopg.Error as e:
        missing(f"PostgreSQL from {DSN_ENV} is unreachable ({type(e).__name__})")
    return dsn


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    return _pg_dsn()


@pytest.fixture
def schema(pg_dsn: str) -> Iterator[str]:
    name = f"sepas_test_{secrets.token_hex(6)}"
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def store(pg_dsn: str, schema: str) -> Iterator[PostgresStore]:
    s = PostgresStore(pg_dsn, schema=schema)
    yield s
    s.close()


@pytest.fixture
def other_store(pg_dsn: str, schema: str) -> Iterator[PostgresStore]:
    """A second store on the same schema: another hub worker."""
    s = PostgresStore(pg_dsn, schema=schema)
    yield s
    s.close()


# -- helpers -------------------------------------------------------------------------------
def rid(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


def make_records(tags: list[str], *, service: str = "lab-result", pad: int = 0) -> list[Any]:
    """Synthetic records: no patient data, just an id, a service and some bytes."""
    out = []
    for tag in tags:
        env = {"id": rid(tag), "service": service, "body": {"resourceType": "Bundle"}}
        if pad:
            env["pad"] = hashlib.sha256(tag.encode()).hexdigest() * (pad // 64 + 1)
        out.append(
            IncomingRecord(rid(tag), service, "2026-11-24T09:30:00+03:30", json.dumps(env).encode())
        )
    return out


def respond_with_ids(ids: set[str]) -> bytes:
    return json.dumps({"inserted": sorted(ids)}).encode()


def stored_rows(dsn: str, schema: str, node_id: str | None = None) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            f'SELECT node_id, id FROM "{schema}".records '  # noqa: S608  our random name
            "WHERE %(n)s::text IS NULL OR node_id = %(n)s ORDER BY 1, 2",
            {"n": node_id},
        ).fetchall()


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).date().isoformat()


# -- two requests with one Idempotency-Key -------------------------------------------------
RACE_NODE, RACE_KEY, RACE_DIGEST, RACE_N = "FAC-0001", "0193a2b4-race", "sha-256=:abc:", 300


def _race(store: PostgresStore, barrier: Any, saw_in_flight: Any, committed: Any) -> dict:
    """One of two requests carrying the same batch. The one that gets NEW waits until
    the other has seen IN_FLIGHT before it commits, so both orders are exercised by
    the test's assertions, not left to timing."""
    records = make_records([f"race-{i}" for i in range(RACE_N)])
    barrier.wait(WAIT)
    claim = store.begin_batch(RACE_NODE, RACE_KEY, RACE_DIGEST, now=T0)
    if claim.state is ClaimState.NEW:
        saw = saw_in_flight.wait(WAIT)
        seen: list[set[str]] = []

        def respond(ids: set[str]) -> bytes:
            seen.append(ids)
            return respond_with_ids(ids)

        response = store.commit_batch(
            RACE_NODE, RACE_KEY, records, received_at=T0 + 1, respond=respond
        )
        committed.set()
        return {"role": "new", "saw": saw, "response": response, "inserted": len(seen[0])}
    states = [str(claim.state)]
    saw_in_flight.set()
    done = committed.wait(WAIT)
    again = store.begin_batch(RACE_NODE, RACE_KEY, RACE_DIGEST, now=T0 + 2)
    states.append(str(again.state))
    return {"role": "other", "done": done, "states": states, "response": again.response}


def _race_in_process(dsn: str, schema: str, barrier: Any, saw: Any, committed: Any, q: Any):
    try:
        with PostgresStore(dsn, schema=schema) as store:
            q.put(_race(store, barrier, saw, committed))
    except BaseException as e:  # noqa: BLE001  report it to the parent, don't die silently
        q.put({"role": "error", "error": repr(e)})


def _check_race(results: list[dict], dsn: str, schema: str) -> None:
    by_role = {r["role"]: r for r in results}
    assert sorted(by_role) == ["new", "other"], results
    new, other = by_role["new"], by_role["other"]
    assert new["saw"]
    assert other["done"]
    assert new["inserted"] == RACE_N
    assert other["states"] == ["in-flight", "replay"]
    assert other["response"] == new["response"]
    assert len(stored_rows(dsn, schema)) == RACE_N


def test_same_batch_from_two_threads(pg_dsn: str, schema: str, store: PostgresStore) -> None:
    barrier, saw, committed = threading.Barrier(2), threading.Event(), threading.Event()
    with ThreadPoolExecutor(2) as pool:  # one store shared by both, as the hub's threads do
        futs = [pool.submit(_race, store, barrier, saw, committed) for _ in range(2)]
        results = [f.result(timeout=WAIT) for f in futs]
    _check_race(results, pg_dsn, schema)


def test_same_batch_from_two_processes(pg_dsn: str, schema: str, store: PostgresStore) -> None:
    store.counts_by_service("x")  # create the schema first: this test is not about that race
    ctx = multiprocessing.get_context("spawn")
    barrier, saw, committed, q = ctx.Barrier(2), ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_race_in_process, args=(pg_dsn, schema, barrier, saw, committed, q))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    try:
        results = [q.get(timeout=WAIT) for _ in procs]
    finally:
        for p in procs:
            p.join(WAIT)
    _check_race(results, pg_dsn, schema)


def test_overlapping_batches_committed_at_once_store_each_record_once(
    pg_dsn: str, schema: str, store: PostgresStore, other_store: PostgresStore
) -> None:
    # Two batches (two keys) sharing half their records, sent in opposite orders: each
    # record is inserted by exactly one of them, and sorting inside commit_batch keeps
    # the two transactions from deadlocking on each other's rows.
    a = make_records([f"ov-{i}" for i in range(3000)])
    b = list(reversed(make_records([f"ov-{i}" for i in range(1500, 4500)])))
    store.begin_batch("FAC-0001", "key-a", "da", now=T0)
    other_store.begin_batch("FAC-0001", "key-b", "db", now=T0)
    barrier = threading.Barrier(2)

    def commit(s: PostgresStore, key: str, recs: list[Any]) -> set[str]:
        got: list[set[str]] = []

        def respond(ids: set[str]) -> bytes:
            got.append(ids)
            return b"{}"

        barrier.wait(WAIT)
        s.commit_batch("FAC-0001", key, recs, received_at=T0, respond=respond)
        return got[0]

    with ThreadPoolExecutor(2) as pool:
        fa = pool.submit(commit, store, "key-a", a)
        fb = pool.submit(commit, other_store, "key-b", b)
        ins_a, ins_b = fa.result(timeout=WAIT), fb.result(timeout=WAIT)
    assert not ins_a & ins_b
    assert ins_a | ins_b == {r.id for r in a} | {r.id for r in b}
    assert len(stored_rows(pg_dsn, schema)) == 4500
    assert store.counts_by_service("FAC-0001") == {"lab-result": 4500}


# -- claims: conflict, abandon, stale takeover ---------------------------------------------
def test_same_key_other_digest_is_conflict(store: PostgresStore) -> None:
    recs = make_records(["c-1", "c-2"])
    assert store.begin_batch("FAC-0001", "k", "d1", now=T0).state is ClaimState.NEW
    assert store.begin_batch("FAC-0001", "k", "d2", now=T0).state is ClaimState.CONFLICT
    assert store.begin_batch("FAC-0001", "k", "d1", now=T0).state is ClaimState.IN_FLIGHT
    resp = store.commit_batch("FAC-0001", "k", recs, received_at=T0, respond=respond_with_ids)
    assert store.begin_batch("FAC-0001", "k", "d2", now=T0).state is ClaimState.CONFLICT
    claim = store.begin_batch("FAC-0001", "k", "d1", now=T0)
    assert (claim.state, claim.response) == (ClaimState.REPLAY, resp)
    # The same key from another node is another key.
    assert store.begin_batch("FAC-0002", "k", "d2", now=T0).state is ClaimState.NEW


def test_abandoned_claim_can_be_retaken(pg_dsn: str, schema: str, store: PostgresStore) -> None:
    assert store.begin_batch("FAC-0001", "k", "d", now=T0).state is ClaimState.NEW
    store.abandon_batch("FAC-0001", "k")
    assert store.begin_batch("FAC-0001", "k", "d", now=T0 + 1).state is ClaimState.NEW
    resp = store.commit_batch(
        "FAC-0001", "k", make_records(["ab-1"]), received_at=T0 + 1, respond=respond_with_ids
    )
    claim = store.begin_batch("FAC-0001", "k", "d", now=T0 + 2)
    assert (claim.state, claim.response) == (ClaimState.REPLAY, resp)
    assert len(stored_rows(pg_dsn, schema)) == 1


def test_stale_claim_is_taken_over_and_the_old_holder_cannot_commit(
    pg_dsn: str, schema: str, store: PostgresStore, other_store: PostgresStore
) -> None:
    recs = make_records(["st-1", "st-2", "st-3"])
    assert store.begin_batch("FAC-0001", "k", "d", now=T0).state is ClaimState.NEW
    # Not yet stale (default timeout 300 s): another worker gets 409.
    assert other_store.begin_batch("FAC-0001", "k", "d", now=T0 + 299).state == "in-flight"
    # Stale but another digest: still a reuse of the key with other content.
    assert other_store.begin_batch("FAC-0001", "k", "x", now=T0 + 301).state == "conflict"
    # Stale, same digest: the first worker is presumed dead; the retry takes over.
    assert other_store.begin_batch("FAC-0001", "k", "d", now=T0 + 301).state is ClaimState.NEW
    # ... and the new claim is fresh again for everyone else.
    assert store.begin_batch("FAC-0001", "k", "d", now=T0 + 302).state is ClaimState.IN_FLIGHT

    with pytest.raises(StorageError, match="no longer holds") as lost:
        store.commit_batch("FAC-0001", "k", recs, received_at=T0 + 303, respond=respond_with_ids)
    assert lost.value.transient  # the hub answers 503; the node's retry gets the replay
    store.abandon_batch("FAC-0001", "k")  # what the hub does next: must not free B's claim
    assert stored_rows(pg_dsn, schema) == []  # rolled back, nothing half-stored

    resp = other_store.commit_batch(
        "FAC-0001", "k", recs, received_at=T0 + 304, respond=respond_with_ids
    )
    claim = store.begin_batch("FAC-0001", "k", "d", now=T0 + 305)
    assert (claim.state, claim.response) == (ClaimState.REPLAY, resp)
    assert len(stored_rows(pg_dsn, schema)) == 3


def test_concurrent_takeovers_of_a_stale_claim_give_one_new(
    pg_dsn: str, schema: str, store: PostgresStore
) -> None:
    assert store.begin_batch("FAC-0001", "k", "d", now=T0).state is ClaimState.NEW
    stores = [PostgresStore(pg_dsn, schema=schema) for _ in range(4)]
    barrier = threading.Barrier(len(stores))

    def take(s: PostgresStore) -> str:
        barrier.wait(WAIT)
        return str(s.begin_batch("FAC-0001", "k", "d", now=T0 + 1000).state)

    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            states = sorted(pool.map(take, stores, timeout=WAIT))
    finally:
        for s in stores:
            s.close()
    assert states == ["in-flight", "in-flight", "in-flight", "new"]


def test_takeover_never_interleaves_with_a_commit_in_progress(
    pg_dsn: str, schema: str, store: PostgresStore, other_store: PostgresStore
) -> None:
    # The holder is inside commit_batch (its respond() is running) when a retry arrives
    # long after the claim timeout: the retry must not take the claim over. It waits for
    # the row lock (lock_timeout), answers IN_FLIGHT, and then sees the stored response.
    assert store.begin_batch("FAC-0001", "k", "d", now=T0).state is ClaimState.NEW
    inside, release = threading.Event(), threading.Event()

    def respond(ids: set[str]) -> bytes:
        inside.set()
        assert release.wait(WAIT)
        return respond_with_ids(ids)

    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(
            store.commit_batch,
            "FAC-0001",
            "k",
            make_records(["il-1"]),
            received_at=T0 + 1000,
            respond=respond,
        )
        assert inside.wait(WAIT)
        try:
            claim = other_store.begin_batch("FAC-0001", "k", "d", now=T0 + 1000)
        finally:
            release.set()
        resp = fut.result(timeout=WAIT)
    assert claim.state is ClaimState.IN_FLIGHT
    again = other_store.begin_batch("FAC-0001", "k", "d", now=T0 + 1001)
    assert (again.state, again.response) == (ClaimState.REPLAY, resp)


def test_failed_respond_rolls_back_and_the_claim_can_be_abandoned(
    pg_dsn: str, schema: str, store: PostgresStore
) -> None:
    store.begin_batch("FAC-0001", "k", "d", now=T0)

    def boom(ids: set[str]) -> bytes:
        raise RuntimeError("respond failed")

    with pytest.raises(RuntimeError, match="respond failed"):
        store.commit_batch("FAC-0001", "k", make_records(["rb-1"]), received_at=T0, respond=boom)
    assert stored_rows(pg_dsn, schema) == []
    assert store.counts_by_service("FAC-0001") == {}
    store.abandon_batch("FAC-0001", "k")
    assert store.begin_batch("FAC-0001", "k", "d", now=T0).state is ClaimState.NEW


# -- records and reconciliation ------------------------------------------------------------
def test_same_record_id_from_two_nodes_is_stored_for_each(
    pg_dsn: str, schema: str, store: PostgresStore
) -> None:
    recs = make_records(["shared-1", "shared-2"])
    got = {}
    for node in ("FAC-0001", "FAC-0002"):
        store.begin_batch(node, "same-key", "d", now=T0)
        got[node] = json.loads(
            store.commit_batch(node, "same-key", recs, received_at=T0, respond=respond_with_ids)
        )["inserted"]
    assert got["FAC-0001"] == got["FAC-0002"] == sorted(r.id for r in recs)
    assert len(stored_rows(pg_dsn, schema)) == 4
    assert store.day_digests("FAC-0001", [utc_day(T0)]) == store.day_digests(
        "FAC-0002", [utc_day(T0)]
    )


def test_day_digests_equal_wire_day_digest_across_batches_and_days(
    pg_dsn: str, schema: str, store: PostgresStore
) -> None:
    midnight = (T0 // DAY + 1) * DAY  # a UTC midnight
    batches = [  # (received_at, record tags); repeats keep the day they first arrived on
        (midnight - 1e-3, [f"d1-{i}" for i in range(50)]),
        (midnight, [f"d2-{i}" for i in range(40)] + [f"d1-{i}" for i in range(10)]),
        (midnight + DAY - 1, [f"d2-{i}" for i in range(30, 70)]),
        (midnight + 2 * DAY, [f"d3-{i}" for i in range(5)] + [f"d1-{i}" for i in range(45, 55)]),
    ]
    model: dict[str, set[str]] = {}
    seen: set[str] = set()
    for n, (at, tags) in enumerate(batches):
        store.begin_batch("FAC-0001", f"b{n}", "d", now=at)
        store.commit_batch(
            "FAC-0001", f"b{n}", make_records(tags), received_at=at, respond=respond_with_ids
        )
        for tag in tags:
            if rid(tag) not in seen:
                seen.add(rid(tag))
                model.setdefault(utc_day(at), set()).add(rid(tag))
    # Noise the digests must not see: another node's records on the same days.
    store.begin_batch("FAC-0002", "b0", "d", now=midnight)
    store.commit_batch(
        "FAC-0002",
        "b0",
        make_records(["d1-0", "x"]),
        received_at=midnight,
        respond=respond_with_ids,
    )

    days = [utc_day(midnight + k * DAY) for k in (-1, 0, 1, 2, 3)]
    got = store.day_digests("FAC-0001", days)
    assert [d.day for d in got] == days
    assert [d.count for d in got] == [50, 70, 0, 10, 0]  # 40 + 30 new; 5 + 5 new
    for d in got:
        assert d.count == len(model.get(d.day, ()))
        assert d.digest == day_digest(model.get(d.day, set()))
    assert got[3].digest != "0" * 64
    assert got[4].digest == "0" * 64
    # The SQL recipe agrees with the shared Python one over what the table holds, too.
    with psycopg.connect(pg_dsn) as conn:
        for d in got:
            ids = [
                r[0]
                for r in conn.execute(
                    f'SELECT id FROM "{schema}".records '  # noqa: S608  our random name
                    "WHERE node_id = %s AND received_day = %s",
                    ("FAC-0001", d.day),
                )
            ]
            assert d.digest == day_digest(ids)
    # Requested order is kept, repeats included (as SqliteStore does).
    again = store.day_digests("FAC-0001", [days[1], days[0], days[1]])
    assert again == [got[1], got[0], got[1]]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ids=st.sets(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80)))
def test_sql_xor_digest_equals_wire_day_digest(store: PostgresStore, ids: set[str]) -> None:
    node = f"FAC-{secrets.token_hex(4)}"
    recs = [IncomingRecord(i, "patient", "2026-11-24", b"{}") for i in ids]
    store.begin_batch(node, "k", "d", now=T0)
    store.commit_batch(node, "k", recs, received_at=T0, respond=respond_with_ids)
    (got,) = store.day_digests(node, [utc_day(T0)])
    assert (got.count, got.digest) == (len(ids), day_digest(ids))


# -- schema, connections, errors -----------------------------------------------------------
def _open_store_in_process(dsn: str, schema: str, barrier: Any, q: Any) -> None:
    try:
        barrier.wait(WAIT)
        with PostgresStore(dsn, schema=schema) as store:
            q.put(("ok", store.counts_by_service("FAC-0001")))
    except BaseException as e:  # noqa: BLE001  report it to the parent, don't die silently
        q.put(("error", repr(e)))


def test_schema_creation_by_four_processes_at_once(pg_dsn: str, schema: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier, q = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=_open_store_in_process, args=(pg_dsn, schema, barrier, q))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    try:
        results = [q.get(timeout=WAIT) for _ in procs]
    finally:
        for p in procs:
            p.join(WAIT)
    assert results == [("ok", {})] * 4
    with psycopg.connect(pg_dsn) as conn:
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (schema,),
            )
        }
    assert tables == {
        "meta",
        "nodes",
        "node_keys",
        "records",
        "service_counts",
        "idempotency",
        "nonces",
        "heartbeats",
    }


def test_a_worker_starting_during_a_commit_is_not_blocked(
    pg_dsn: str, schema: str, store: PostgresStore
) -> None:
    # A fresh worker's first call must not wait for batches in progress (schema DDL on an
    # existing schema would queue for a SHARE lock behind their inserts).
    store.begin_batch("FAC-0001", "k", "d", now=T0)
    inside, release = threading.Event(), threading.Event()

    def respond(ids: set[str]) -> bytes:
        inside.set()
        assert release.wait(WAIT)
        return b"{}"

    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(
            store.commit_batch,
            "FAC-0001",
            "k",
            make_records(["w-1"]),
            received_at=T0,
            respond=respond,
        )
        assert inside.wait(WAIT)
        try:
            with PostgresStore(pg_dsn, schema=schema) as late:
                assert late.counts_by_service("FAC-0001") == {}  # the commit is not visible yet
        finally:
            release.set()
        fut.result(timeout=WAIT)
    assert store.counts_by_service("FAC-0001") == {"lab-result": 1}


def test_newer_schema_version_is_refused(pg_dsn: str, schema: str, store: PostgresStore) -> None:
    store.counts_by_service("x")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'UPDATE "{schema}".meta SET schema_version = 99')  # noqa: S608
    with PostgresStore(pg_dsn, schema=schema) as newer, pytest.raises(SchemaVersionError):
        newer.counts_by_service("x")


def test_lost_connection_is_reported_transient_then_reconnected(pg_dsn: str, schema: str) -> None:
    app = f"sepas-test-{secrets.token_hex(4)}"
    with PostgresStore(make_conninfo(pg_dsn, application_name=app), schema=schema) as store:
        store.save_heartbeat("FAC-0001", {"version": "1"}, now=T0)
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            (n,) = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (app,),
            ).fetchone()
        assert n == 1
        with pytest.raises(StorageError) as info:
            store.counts_by_service("FAC-0001")
        assert info.value.transient
        assert "host=" in info.value.hint
        assert store.counts_by_service("FAC-0001") == {}  # a fresh connection


def test_unreachable_server_error_names_host_and_db_but_not_password() -> None:
    if psycopg is None:
        pytest.skip("psycopg is not installed")
    secret = "s3cret-pw"  # noqa: S105  a made-up password that must not leak
    dsn = f"postgresql://hub:{secret}@127.0.0.1:1/sepasdb?connect_timeout=2"
    with PostgresStore(dsn) as s, pytest.raises(StorageError) as info:
        s.active_keys("FAC-0001")
    err = info.value
    assert err.transient
    assert "host=127.0.0.1" in err.hint
    assert "dbname=sepasdb" in err.hint
    for text in (str(err), err.hint, repr(s)):
        assert secret not in text
    assert isinstance(err.__cause__, psycopg.OperationalError)


# -- registry, nonces, heartbeats ----------------------------------------------------------
def test_registry_rotation_revocation_heartbeat(store: PostgresStore) -> None:
    assert store.node("FAC-0001") is None
    assert store.revoke_node("FAC-0001") is False
    store.add_node_key("FAC-0001", b"PEM-1", "SHA256:one")
    store.add_node_key("FAC-0001", b"PEM-2", "SHA256:two")
    assert store.active_keys("FAC-0001") == [b"PEM-1", b"PEM-2"]
    store.add_node_key("FAC-0001", b"PEM-3", "SHA256:three")  # a third retires the oldest
    assert store.active_keys("FAC-0001") == [b"PEM-2", b"PEM-3"]
    assert store.revoke_node("FAC-0001") is True
    assert store.active_keys("FAC-0001") == []
    info = store.node("FAC-0001")
    assert info is not None
    assert info.status == "revoked"
    assert all(k.revoked_at is not None for k in info.keys)
    store.add_node_key("FAC-0001", b"PEM-3", "SHA256:three")  # re-adding reactivates
    assert store.active_keys("FAC-0001") == [b"PEM-3"]

    store.begin_batch("FAC-0001", "k", "d", now=T0)
    store.commit_batch(
        "FAC-0001",
        "k",
        make_records(["r1", "r2"]) + make_records(["r3"], service="patient"),
        received_at=T0 + 5,
        respond=respond_with_ids,
    )
    store.save_heartbeat("FAC-0001", {"version": "0.1.0", "pending": 3}, now=T0 + 6)
    store.save_heartbeat("FAC-0001", {"version": "0.1.0", "pending": 0}, now=T0 + 7)
    info = store.node("FAC-0001")
    assert info is not None
    assert (info.status, info.records, info.last_batch_at) == ("active", 3, T0 + 5)
    assert (info.heartbeat, info.heartbeat_at) == ({"version": "0.1.0", "pending": 0}, T0 + 7)
    assert store.counts_by_service("FAC-0001") == {"lab-result": 2, "patient": 1}
    assert [n.node_id for n in store.nodes()] == ["FAC-0001"]


def test_nonce_once_inside_its_expiry(store: PostgresStore) -> None:
    assert store.remember_nonce("FAC-0001", "n1", now=T0, ttl_secs=300) is True
    assert store.remember_nonce("FAC-0001", "n1", now=T0 + 299, ttl_secs=300) is False
    assert store.remember_nonce("FAC-0002", "n1", now=T0 + 1, ttl_secs=300) is True
    assert store.remember_nonce("FAC-0001", "n1", now=T0 + 300, ttl_secs=300) is True


def test_expire_forgets_old_idempotency_entries(store: PostgresStore) -> None:
    store.begin_batch("FAC-0001", "old", "d", now=T0)
    store.commit_batch("FAC-0001", "old", [], received_at=T0, respond=respond_with_ids)
    store.begin_batch("FAC-0001", "new", "d", now=T0 + 7 * DAY)
    store.expire(now=T0 + 7 * DAY + 1, idempotency_ttl_secs=7 * DAY)
    assert store.begin_batch("FAC-0001", "old", "other", now=T0 + 8 * DAY).state == "new"
    assert store.begin_batch("FAC-0001", "new", "d", now=T0 + 7 * DAY + 2).state == "in-flight"


# -- speed ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_5000_record_batch_commit_time(
    store: PostgresStore, capsys: pytest.CaptureFixture[str]
) -> None:
    recs = make_records([f"perf-{i}" for i in range(5000)], pad=2000)
    size = sum(len(r.envelope) for r in recs)
    store.counts_by_service("warm-up")  # connect and create the schema outside the timing
    store.begin_batch("FAC-0001", "perf", "d", now=T0)
    t = time.perf_counter()
    store.commit_batch("FAC-0001", "perf", recs, received_at=T0, respond=respond_with_ids)
    fresh = time.perf_counter() - t
    store.begin_batch("FAC-0001", "perf-again", "d", now=T0)
    t = time.perf_counter()
    store.commit_batch("FAC-0001", "perf-again", recs, received_at=T0, respond=respond_with_ids)
    dups = time.perf_counter() - t
    with capsys.disabled():
        print(  # noqa: T201  the figure is the point of this test; no timing is asserted
            f"\nPostgresStore.commit_batch, 5,000 records ({size / 2**20:.1f} MiB): "
            f"{fresh:.3f} s new ({5000 / fresh:,.0f} records/s), {dups:.3f} s all duplicates"
        )
    assert store.counts_by_service("FAC-0001") == {"lab-result": 5000}
