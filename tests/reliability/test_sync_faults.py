"""Exactly once in effect, through faults: the real uploader, the real hub, and between
them a TCP proxy (127.0.0.1 only) that drops connections, delays requests, holds one
past the node's timeout and forwards it anyway, and cuts answers after the hub
committed (it forwards the request, reads the whole answer, then closes the node's
side without sending it, or after sending half of it).

After many seeded sync rounds the hub must hold every record the node captured
exactly once (its store read with SQL: as many rows as distinct ids, and the set of
ids equal to the set put into the buffer), every blob byte for byte, and the node's
buffer must show every record sent and its ledger agree with the hub's. Run over the
SQLite store and, with SEPAS_TEST_PG_DSN, the PostgreSQL store.

The last test runs ``sepas-hub serve --workers 2`` over PostgreSQL as a process and
sends it the same batches from two clients at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.buffer import State
from agent.config import HubSettings
from agent.errors import HubError
from agent.record import BlobRef, Service
from agent.uploader import HubClient, SigningAuth
from agent.uploader.batching import BatchItem, form_batch
from agent.uploader.reconcile import reconcile
from tests.factories import make_record, make_records
from tests.hubkit import register
from tests.interop.sync_fixtures import (  # noqa: F401 - make_node/sync_hub: fixtures
    DSN_ENV,
    NODE,
    SyncHub,
    SyncNode,
    make_node_fixture,
    pg_dsn_or_skip,
    stored_ids,
    sync_hub_fixture,
    wait_for,
)

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

SEED = 20251121
#: Every socket operation of the proxy gives up after this long.
IO_TIMEOUT = 15.0
#: The node's per-request timeout in the fault test; a "stall" holds a request longer.
NODE_TIMEOUT = 2.0
MAX_ROUNDS = 200
MAX_SECS = 60.0


# -- the proxy ----------------------------------------------------------------------------


def read_message(
    reader: BinaryIO, *, response_to: str | None = None
) -> tuple[bytes, str, dict[str, str]] | None:
    """One HTTP/1.1 message from ``reader`` as raw bytes, with its start line and
    headers; None at a clean end of stream. ``response_to``: the request's method, when
    reading a response (a HEAD answer, 1xx, 204 and 304 have no body)."""
    start = reader.readline(65537)
    if not start:
        return None
    raw = [start]
    headers: dict[str, str] = {}
    while True:
        line = reader.readline(65537)
        if not line:
            raise ConnectionError("the stream ended inside a header")
        raw.append(line)
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    first = start.decode("latin-1").strip()
    no_body = False
    if response_to is not None:
        status = int(first.split()[1])
        no_body = response_to == "HEAD" or status in (204, 304) or 100 <= status < 200
    if not no_body:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = reader.readline(1024)
                raw.append(size_line)
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while (trailer := reader.readline(65537)) not in (b"\r\n", b"\n", b""):
                        raw.append(trailer)
                    raw.append(b"\r\n")
                    break
                raw.append(_read_exactly(reader, size + 2))
        elif "content-length" in headers:
            raw.append(_read_exactly(reader, int(headers["content-length"])))
    return b"".join(raw), first, headers


def _read_exactly(reader: BinaryIO, n: int) -> bytes:
    data = reader.read(n)
    if len(data) != n:
        raise ConnectionError("the stream ended inside a body")
    return data


FAULTS = ("pass", "refuse", "cut-after-commit", "half-answer", "delay", "stall")
WEIGHTS = (45, 12, 20, 8, 12, 3)


#: The first batch uploads meet these, in order (so that each kind of fault surely
#: hits a batch at least once, whatever order the random draws fall in).
SCRIPTED_BATCH_FAULTS = ("stall", "cut-after-commit", "half-answer", "refuse")


class FaultProxy:
    """A thread-per-connection HTTP/1.1 proxy on 127.0.0.1 that injects faults per
    exchange: first `SCRIPTED_BATCH_FAULTS` on batch uploads, then faults drawn from a
    seeded RNG, at most ``max_faults`` in all (then it only passes, so a run always
    ends). ``counts`` says what it did."""

    def __init__(self, upstream_port: int, *, seed: int, max_faults: int, max_stalls: int):
        self.scripted = list(SCRIPTED_BATCH_FAULTS)
        self.upstream = ("127.0.0.1", upstream_port)
        self.rng = random.Random(seed)
        self.faults_left = max_faults
        self.stalls_left = max_stalls
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def set_faults(self, n: int) -> None:
        with self._lock:
            self.faults_left = n

    def _choose(self, path: str) -> str:
        with self._lock:
            if self.faults_left <= 0:
                fault = "pass"
            elif path == "/v1/batches" and self.scripted:
                fault = self.scripted.pop(0)
                self.faults_left -= 1
                if fault == "stall":
                    self.stalls_left -= 1
            else:
                fault = self.rng.choices(FAULTS, WEIGHTS)[0]
                if fault == "stall":
                    if self.stalls_left <= 0:
                        fault = "pass"
                    else:
                        self.stalls_left -= 1
                if fault != "pass":
                    self.faults_left -= 1
            self.counts[fault] += 1
            delay = self.rng.uniform(0.02, 0.2)
            return fault if fault != "delay" else f"delay:{delay}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed by stop()
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._sockets.add(conn)
                self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            client.settimeout(IO_TIMEOUT)
            reader = client.makefile("rb")
            up_reader: BinaryIO | None = None
            while True:
                request = read_message(reader)
                if request is None:
                    return
                raw, start, _ = request
                method, path = start.split()[:2]
                fault = self._choose(path)
                if fault == "refuse":
                    return  # the hub never sees it
                if fault.startswith("delay:"):
                    time.sleep(float(fault.split(":")[1]))  # the fault itself: a slow path
                if fault == "stall":
                    time.sleep(NODE_TIMEOUT + 0.5)  # the node gives up; the hub still gets it
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, timeout=IO_TIMEOUT)
                    with self._lock:
                        self._sockets.add(upstream)
                    up_reader = upstream.makefile("rb")
                assert up_reader is not None
                upstream.sendall(raw)
                answer = read_message(up_reader, response_to=method)
                if answer is None:
                    return
                data, _, headers = answer
                if fault in ("cut-after-commit", "stall"):
                    return  # the hub answered (and committed); the node never hears it
                if fault == "half-answer":
                    client.sendall(data[: len(data) // 2])
                    return
                client.sendall(data)
                if headers.get("connection", "").lower() == "close":
                    return
        except (OSError, ValueError, ConnectionError) as e:
            # The node timed out and closed, or stop(): the exchange simply ends.
            with self._lock:
                self.errors.append(type(e).__name__)
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._acceptor.join(timeout=5)
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=IO_TIMEOUT)
        assert not any(t.is_alive() for t in threads), "a proxy thread did not end"


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    made: list[FaultProxy] = []

    def make(upstream_port: int, **kw: Any) -> FaultProxy:
        proxy = FaultProxy(upstream_port, **kw)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.stop()


# -- exactly once through faults -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_every_record_arrives_exactly_once_through_drops_delays_and_cut_answers(
    kind: str,
    sync_hub: Callable[..., SyncHub],
    make_node: Callable[..., SyncNode],
    fault_proxy: Callable[..., FaultProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.uploader")
    hub = sync_hub(kind)
    proxy = fault_proxy(hub.port, seed=SEED, max_faults=80, max_stalls=2)
    node = make_node(
        proxy.url, hub.key, batch_max_records=8, timeout_secs=NODE_TIMEOUT, lease_secs=60.0
    )
    clinical = make_records(0, 120)
    imaging = []
    for i in range(8):
        blob = random.Random(i).randbytes(20_000 + 5_000 * i)
        sha, size = node.buffer.add_blob(blob, media_type="application/dicom")
        ref = BlobRef(sha256=sha, media_type="application/dicom", size=size)
        imaging.append(
            dataclasses.replace(
                make_record(1000 + i, service=Service.IMAGING_STUDY, adapter="pacs"), blobs=(ref,)
            )
        )
    put = set(node.put([*clinical, *imaging]))
    assert len(put) == 128

    rounds = duplicates = 0
    deadline = time.monotonic() + MAX_SECS
    while node.buffer.stats().total(State.SENT) < len(put):
        rounds += 1
        if rounds > MAX_ROUNDS or time.monotonic() > deadline:
            pytest.fail(f"not delivered after {rounds - 1} rounds: {dict(proxy.counts)}")
        duplicates += node.retry_now().duplicate
        assert node.buffer.stats().total(State.INFLIGHT) == 0  # every lease settled

    held = stored_ids(hub)
    assert len(held) == len(set(held)) == len(put)
    assert set(held) == put
    assert node.state_counts(sorted(put)) == {"sent": len(put)}
    for rec in imaging:
        (ref,) = rec.blobs
        assert hub.blobs.read(ref.sha256) == node.buffer.blob_path(ref.sha256).read_bytes()
    # The faults happened (each on a batch at least once: SCRIPTED_BATCH_FAULTS) ...
    assert all(proxy.counts[f] >= 1 for f in FAULTS)
    # ... and answers were lost after the hub committed: the node heard of those
    # batches from the stored answer (a retry under the same key) or as duplicates
    # (the records again, under a new key).
    replayed = len(
        [
            r
            for r in caplog.records
            if getattr(r, "event", "") == "upload.batch_sent" and getattr(r, "replayed", False)
        ]
    )
    assert replayed + duplicates > 0
    # What the node holds as delivered, per hub day, is what the hub holds.
    proxy.set_faults(0)
    check = reconcile(node.buffer, node.client, days=2, include_today=True)
    assert check.differing == ()
    print(  # noqa: T201
        f"{kind}: {rounds} rounds, {replayed} replayed answers, {duplicates} duplicates, "
        f"proxy {dict(proxy.counts)}"
    )


# -- two hub worker processes --------------------------------------------------------------


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database (the served hub uses its default schema), dropped
    afterwards; its DSN."""
    import psycopg

    dsn = pg_dsn_or_skip()
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        pytest.fail(f"{DSN_ENV} must be a postgresql:// URL for `sepas-hub serve --store`")
    name = f"sepas_w2_{secrets.token_hex(5)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield urlunsplit(parts._replace(path=f"/{name}"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(p) for p in text.split()]
    return []


def test_two_hub_workers_store_a_batch_sent_twice_at_once_exactly_once(
    pg_database: str, tmp_path: Path
) -> None:
    from hub.store_pg import PostgresStore

    key = Ed25519PrivateKey.generate()
    with PostgresStore(pg_database) as store:
        register(store, NODE, key)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEPAS_")}
    hub_cmd = [
        str(Path(sys.executable).parent / "sepas-hub"),
        "serve",
        "--workers",
        "2",
        "--store",
        pg_database,
        "--listen",
        f"127.0.0.1:{port}",
    ]
    # The blob directory comes from a config file (--store overrides its store.url).
    config = tmp_path / "hub.toml"
    config.write_text(f'[store]\nblob_dir = "{tmp_path / "blobs"}"\n', encoding="utf-8")
    hub_cmd += ["--config", str(config)]
    log = tmp_path / "hub.log"
    with (
        log.open("wb") as log_file,
        subprocess.Popen(hub_cmd, env=env, stdout=log_file, stderr=log_file) as server,
    ):
        try:
            _wait_until_serving(server, port, log)
            wait_for("two worker processes", lambda: len(_children(server.pid)) >= 2)
            _send_the_same_batches_from_two_clients(port, key, pg_database)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)


def _wait_until_serving(server: subprocess.Popen[bytes], port: int, log: Path) -> None:
    def up() -> bool:
        if server.poll() is not None:
            output = log.read_text(errors="replace")[-2000:]
            pytest.fail(f"sepas-hub serve exited {server.returncode}: {output}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for("sepas-hub serve to answer /v1/health", up)


def _send_the_same_batches_from_two_clients(port: int, key: Ed25519PrivateKey, dsn: str) -> None:
    settings = HubSettings(url=f"http://127.0.0.1:{port}/", timeout_secs=20.0)
    clients = [HubClient(settings, SigningAuth(key, NODE), node_id=NODE) for _ in range(2)]
    expected: set[str] = set()
    try:
        for n in range(12):
            records = make_records(n * 40, 40)
            items = [BatchItem(r.id, r.service.value, r.to_json()) for r in records]
            expected |= {r.id for r in records}
            if n % 2 == 0:  # the same batch (same key, same bytes) twice at once
                batches = [form_batch(items, node_id=NODE, now=time.time())] * 2
            else:  # the same records under two keys (a node restored from backup)
                batches = [form_batch(items, node_id=NODE, now=time.time()) for _ in range(2)]
            results = _post_at_once(clients, batches)
            if n % 2 == 0:
                assert results[0].results == results[1].results  # one answer, stored
                assert [r.status for r in results[0].results] == ["accepted"] * 40
                # One request was processed; the other got its stored answer (at once,
                # or after 409s while the first was still in flight).
                assert sorted(r.replayed for r in results) == [False, True]
            else:
                accepted = Counter(
                    r.id for result in results for r in result.results if r.status == "accepted"
                )
                assert sorted(accepted) == sorted(i.id for i in items)
                assert set(accepted.values()) == {1}  # each accepted by exactly one worker
    finally:
        for client in clients:
            client.close()
    ids = _pg_ids(dsn)
    assert len(ids) == len(set(ids)) == len(expected)
    assert set(ids) == expected


def _post_at_once(clients: list[HubClient], batches: list[Any]) -> list[Any]:
    """Post batches[i] with clients[i] at the same moment; a 409 (the other request
    still in flight) is retried until the stored answer comes back."""
    barrier = threading.Barrier(len(clients))
    results: list[Any] = [None] * len(clients)
    errors: list[BaseException] = []

    def post(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            deadline = time.monotonic() + 30
            while True:
                try:
                    results[i] = clients[i].post_batch(batches[i])
                    return
                except HubError as e:
                    if e.status != 409 or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)  # between retries of a bounded loop
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert all(r is not None for r in results)
    return results


def _pg_ids(dsn: str) -> list[str]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT id FROM sepas_hub.records WHERE node_id = %s", (NODE,))
        return [r[0] for r in rows.fetchall()]
