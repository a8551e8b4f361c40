"""The HubStore conformance suite: every implementation of hub.store.HubStore passes it.

Parametrised over "sqlite" (always) and "postgres" (when SEPAS_TEST_PG_DSN is set; each
test in a fresh schema, dropped afterwards; a missing DSN fails under
SEPAS_REQUIRE_PEERS=1). Litestream's rule: one suite, every backend.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import StorageError
from agent.keys import fingerprint, public_pem
from agent.wire import day_digest
from hub.store import ClaimState, HubStore, IncomingRecord
from hub.store_sqlite import SqliteStore
from tests.hubkit import require_peer

DSN_ENV = "SEPAS_TEST_PG_DSN"
T0 = 1_795_000_000.0  # 2026-11-18T…Z, a fixed hub clock
DAY = 86_400.0
NODE = "FAC-0001"
OTHER = "FAC-0002"


def _rid(i: int) -> str:
    return hashlib.sha256(f"record {i}".encode()).hexdigest()


def _rec(i: int, service: str = "lab-result") -> IncomingRecord:
    return IncomingRecord(
        id=_rid(i),
        service=service,
        occurred_at="2026-11-17T09:30:00+03:30",
        envelope=f'{{"id":"{_rid(i)}"}}'.encode(),
    )


def _pem(key: Ed25519PrivateKey) -> bytes:
    return public_pem(key).encode("ascii")


def _register(store: HubStore, node: str = NODE) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    store.add_node_key(node, _pem(key), fingerprint(key))
    return key


def _respond(inserted: set[str]) -> bytes:
    return ",".join(sorted(inserted)).encode()


def _commit(store: HubStore, key: str, records: list[IncomingRecord], at: float = T0) -> bytes:
    claim = store.begin_batch(NODE, key, "d-" + key, now=at)
    assert claim.state is ClaimState.NEW
    return store.commit_batch(NODE, key, records, received_at=at, respond=_respond)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HubStore]:
    if request.param == "sqlite":
        sqlite = SqliteStore(tmp_path / "hub.db")
        yield sqlite
        sqlite.close()
        return
    dsn = os.environ.get(DSN_ENV)
    if not dsn:
        require_peer("postgresql", f"set {DSN_ENV} to run the suite against PostgreSQL")
    try:
        import psycopg

        from hub.store_pg import PostgresStore
    except ImportError as err:
        require_peer("postgresql", f"cannot import the PostgreSQL store ({err})")
    schema = f"sepas_test_{secrets.token_hex(6)}"
    pg = PostgresStore(dsn, schema=schema)
    try:
        pg.active_keys("probe")  # connects and creates the schema
    except StorageError as err:
        pg.close()
        require_peer("postgresql", f"unreachable at {DSN_ENV} ({err})")
    yield pg
    pg.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


# -- records ------------------------------------------------------------------------------


def test_a_record_is_stored_once_however_often_it_arrives(store: HubStore) -> None:
    _register(store)
    first = _commit(store, "b1", [_rec(1), _rec(2)])
    second = _commit(store, "b2", [_rec(2), _rec(3, "imaging-study")])
    assert first == f"{_rid(1)},{_rid(2)}".encode()  # respond() saw both as new
    assert second == _rid(3).encode()  # record 2 was already held
    assert store.counts_by_service(NODE) == {"lab-result": 2, "imaging-study": 1}
    info = store.node(NODE)
    assert info is not None
    assert (info.records, info.last_batch_at) == (3, T0)


def test_records_are_kept_per_node(store: HubStore) -> None:
    _register(store)
    _register(store, OTHER)
    _commit(store, "b1", [_rec(1)])
    claim = store.begin_batch(OTHER, "b1", "d-b1", now=T0)
    assert claim.state is ClaimState.NEW  # keys are per node too
    out = store.commit_batch(OTHER, "b1", [_rec(1)], received_at=T0, respond=_respond)
    assert out == _rid(1).encode()  # the same id from another node is another record
    assert store.counts_by_service(OTHER) == {"lab-result": 1}


def test_a_failing_respond_stores_nothing(store: HubStore) -> None:
    _register(store)
    assert store.begin_batch(NODE, "b1", "d", now=T0).state is ClaimState.NEW

    def boom(inserted: set[str]) -> bytes:
        raise RuntimeError("respond failed")

    with pytest.raises(RuntimeError):
        store.commit_batch(NODE, "b1", [_rec(1)], received_at=T0, respond=boom)
    assert store.counts_by_service(NODE) == {}
    store.abandon_batch(NODE, "b1")
    assert store.begin_batch(NODE, "b1", "d", now=T0).state is ClaimState.NEW


# -- idempotency --------------------------------------------------------------------------


def test_begin_batch_claims_once_then_replays_the_stored_response(store: HubStore) -> None:
    _register(store)
    assert store.begin_batch(NODE, "k", "digest-a", now=T0).state is ClaimState.NEW
    assert store.begin_batch(NODE, "k", "digest-a", now=T0 + 1).state is ClaimState.IN_FLIGHT
    response = store.commit_batch(NODE, "k", [_rec(1)], received_at=T0, respond=_respond)
    replay = store.begin_batch(NODE, "k", "digest-a", now=T0 + 2)
    assert replay.state is ClaimState.REPLAY
    assert replay.response == response


@pytest.mark.parametrize("finished", [False, True], ids=["in-flight", "done"])
def test_the_same_key_with_another_digest_conflicts(store: HubStore, finished: bool) -> None:
    _register(store)
    assert store.begin_batch(NODE, "k", "digest-a", now=T0).state is ClaimState.NEW
    if finished:
        store.commit_batch(NODE, "k", [], received_at=T0, respond=_respond)
    assert store.begin_batch(NODE, "k", "digest-b", now=T0 + 1).state is ClaimState.CONFLICT


def test_abandon_lets_a_retry_claim_the_key(store: HubStore) -> None:
    _register(store)
    assert store.begin_batch(NODE, "k", "d", now=T0).state is ClaimState.NEW
    store.abandon_batch(NODE, "k")
    assert store.begin_batch(NODE, "k", "d", now=T0 + 1).state is ClaimState.NEW


def test_abandon_after_commit_keeps_the_response(store: HubStore) -> None:
    _register(store)
    response = _commit(store, "k", [_rec(1)])
    store.abandon_batch(NODE, "k")
    claim = store.begin_batch(NODE, "k", "d-k", now=T0 + 1)
    assert (claim.state, claim.response) == (ClaimState.REPLAY, response)


def test_commit_without_the_claim_stores_nothing_and_raises(store: HubStore) -> None:
    _register(store)
    assert store.begin_batch(NODE, "k", "d", now=T0).state is ClaimState.NEW
    store.abandon_batch(NODE, "k")
    with pytest.raises(StorageError):
        store.commit_batch(NODE, "k", [_rec(1)], received_at=T0, respond=_respond)
    assert store.counts_by_service(NODE) == {}


def test_a_claim_whose_worker_died_is_taken_over_after_the_timeout(store: HubStore) -> None:
    _register(store)
    assert store.begin_batch(NODE, "k", "d", now=T0).state is ClaimState.NEW
    assert store.begin_batch(NODE, "k", "d", now=T0 + 60).state is ClaimState.IN_FLIGHT
    assert store.begin_batch(NODE, "k", "other", now=T0 + 3600).state is ClaimState.CONFLICT
    assert store.begin_batch(NODE, "k", "d", now=T0 + 3600).state is ClaimState.NEW


def test_concurrent_claims_of_one_key_yield_exactly_one_new(store: HubStore) -> None:
    _register(store)
    states: list[ClaimState] = []
    barrier = threading.Barrier(8)

    def claim() -> None:
        barrier.wait(timeout=10)
        states.append(store.begin_batch(NODE, "k", "d", now=T0).state)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(states) == sorted([ClaimState.NEW] + [ClaimState.IN_FLIGHT] * 7)


def test_expire_forgets_idempotency_entries_past_the_ttl(store: HubStore) -> None:
    _register(store)
    _commit(store, "old", [_rec(1)], at=T0)
    _commit(store, "new", [_rec(2)], at=T0 + 6 * DAY)
    store.expire(now=T0 + 7 * DAY + 1, idempotency_ttl_secs=7 * DAY)
    assert store.begin_batch(NODE, "old", "d-old", now=T0 + 8 * DAY).state is ClaimState.NEW
    assert store.begin_batch(NODE, "new", "d-new", now=T0 + 8 * DAY).state is ClaimState.REPLAY
    assert store.counts_by_service(NODE) == {"lab-result": 2}  # records are never expired


# -- nonces -------------------------------------------------------------------------------


def test_a_nonce_is_accepted_once_per_node_inside_its_expiry(store: HubStore) -> None:
    assert store.remember_nonce(NODE, "n1", now=T0, ttl_secs=600) is True
    assert store.remember_nonce(NODE, "n1", now=T0 + 599, ttl_secs=600) is False
    assert store.remember_nonce(OTHER, "n1", now=T0 + 1, ttl_secs=600) is True
    assert store.remember_nonce(NODE, "n1", now=T0 + 601, ttl_secs=600) is True  # expired


def test_expire_forgets_nonces_past_their_expiry(store: HubStore) -> None:
    assert store.remember_nonce(NODE, "n1", now=T0, ttl_secs=600)
    store.expire(now=T0 + 601, idempotency_ttl_secs=7 * DAY)
    assert store.remember_nonce(NODE, "n1", now=T0 + 602, ttl_secs=600)


# -- reconciliation -----------------------------------------------------------------------


def test_day_digests_match_the_nodes_recipe(store: HubStore) -> None:
    _register(store)
    day1 = T0 - (T0 % DAY) + 10  # 2026-11-18T00:00:10Z
    _commit(store, "b1", [_rec(1), _rec(2)], at=day1)
    _commit(store, "b2", [_rec(3), _rec(2)], at=day1 + DAY - 20)  # same UTC day, 2 is a dup
    _commit(store, "b3", [_rec(4)], at=day1 + DAY)  # the next UTC day
    got = store.day_digests(NODE, ["2026-11-18", "2026-11-19", "2026-11-20"])
    assert [(d.day, d.count) for d in got] == [
        ("2026-11-18", 3),
        ("2026-11-19", 1),
        ("2026-11-20", 0),
    ]
    assert got[0].digest == day_digest([_rid(3), _rid(1), _rid(2)])  # order-free
    assert got[1].digest == day_digest([_rid(4)])
    assert got[2].digest == "0" * 64
    assert store.day_digests(OTHER, ["2026-11-18"])[0].count == 0


# -- the node registry --------------------------------------------------------------------


def test_a_node_may_hold_two_active_keys_while_rotating(store: HubStore) -> None:
    old, new = _register(store), _register(store)
    assert sorted(store.active_keys(NODE)) == sorted([_pem(old), _pem(new)])
    newest = _register(store)  # a third retires the oldest
    assert sorted(store.active_keys(NODE)) == sorted([_pem(new), _pem(newest)])
    info = store.node(NODE)
    assert info is not None
    assert info.status == "active"
    revoked = {k.fingerprint for k in info.keys if k.revoked_at is not None}
    assert revoked == {fingerprint(old)}


def test_re_adding_an_active_key_changes_nothing(store: HubStore) -> None:
    key = _register(store)
    store.add_node_key(NODE, _pem(key), fingerprint(key))
    assert store.active_keys(NODE) == [_pem(key)]


def test_revoke_refuses_every_key_and_re_adding_one_reactivates(store: HubStore) -> None:
    a, b = _register(store), _register(store)
    assert store.revoke_node(NODE) is True
    assert store.active_keys(NODE) == []
    info = store.node(NODE)
    assert info is not None
    assert info.status == "revoked"
    assert all(k.revoked_at is not None for k in info.keys)
    store.add_node_key(NODE, _pem(b), fingerprint(b))
    assert store.active_keys(NODE) == [_pem(b)]
    assert store.active_keys("FAC-UNKNOWN") == []
    del a


def test_revoking_an_unknown_node_says_so(store: HubStore) -> None:
    assert store.revoke_node("FAC-UNKNOWN") is False
    assert store.node("FAC-UNKNOWN") is None


def test_nodes_lists_every_node_with_its_heartbeat(store: HubStore) -> None:
    _register(store, OTHER)
    _register(store)
    body: dict[str, Any] = {"node_id": NODE, "version": "0.1.0", "pending": 3}
    store.save_heartbeat(NODE, body, now=T0)
    store.save_heartbeat(NODE, {**body, "pending": 0}, now=T0 + 60)  # the latest is kept
    infos = {i.node_id: i for i in store.nodes()}
    assert sorted(infos) == [NODE, OTHER]
    assert infos[NODE].heartbeat == {**body, "pending": 0}
    assert infos[NODE].heartbeat_at == T0 + 60
    assert infos[OTHER].heartbeat is None
    assert infos[OTHER].last_batch_at is None
