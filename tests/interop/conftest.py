"""Fixtures for tests against real peers.

- `live_hub` / `start_hub`: the hub served by a real uvicorn on 127.0.0.1 (a free port,
  bound before the server starts), in a background thread, over a fresh SqliteStore
  with one registered node key. Ready when GET /v1/health answers (a bounded poll);
  shut down in teardown.
- `require_peer(name, reason)`: call it when a peer is absent; it skips, or fails
  under ``SEPAS_REQUIRE_PEERS=1`` (CI installs every peer).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hub.app import create_app
from hub.blobs import BlobStore
from hub.settings import HubSettings, LimitSettings, StoreSettings
from hub.store_sqlite import SqliteStore
from tests.hubkit import NODE, register, require_peer

__all__ = ["LiveHub", "require_peer"]

#: How long a server may take to answer its first health check.
READY_TIMEOUT_SECS = 10.0


@dataclass
class LiveHub:
    """A hub running under uvicorn on 127.0.0.1."""

    base_url: str
    host: str
    port: int
    store: SqliteStore
    blobs: BlobStore
    key: Ed25519PrivateKey  # registered for NODE
    settings: HubSettings


def _serve(app: Any) -> tuple[uvicorn.Server, threading.Thread, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="on",
        ws="none",
        proxy_headers=False,
        server_header=False,
        date_header=False,  # as `sepas-hub serve`: the app sends Date itself
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-hub", daemon=True
    )
    thread.start()
    url = f"http://127.0.0.1:{port}/v1/health"
    deadline = time.monotonic() + READY_TIMEOUT_SECS
    while True:
        if not thread.is_alive():
            pytest.fail("the hub's uvicorn thread exited before it was ready")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.should_exit = True
            pytest.fail(f"the hub did not answer {url} within {READY_TIMEOUT_SECS:.0f} s")
        time.sleep(0.02)  # between polls of a bounded loop, not a wait for readiness
    return server, thread, port


@pytest.fixture
def start_hub(tmp_path: Path) -> Iterator[Callable[..., LiveHub]]:
    """Start a hub with these ``[limits]``; every hub started is stopped at teardown."""
    running: list[tuple[uvicorn.Server, threading.Thread, SqliteStore]] = []

    def start(**limits: Any) -> LiveHub:
        n = len(running)
        store = SqliteStore(tmp_path / f"hub{n}.db")
        blobs = BlobStore(tmp_path / f"blobs{n}")
        key = Ed25519PrivateKey.generate()
        register(store, NODE, key)
        settings = HubSettings(
            store=StoreSettings(url=f"sqlite://{tmp_path}/hub{n}.db", blob_dir=blobs.root),
            limits=LimitSettings(**limits),
        )
        server, thread, port = _serve(create_app(settings, store, blobs=blobs))
        running.append((server, thread, store))
        return LiveHub(
            base_url=f"http://127.0.0.1:{port}",
            host="127.0.0.1",
            port=port,
            store=store,
            blobs=blobs,
            key=key,
            settings=settings,
        )

    yield start
    for server, thread, store in running:
        server.should_exit = True
        thread.join(timeout=10)
        store.close()
        assert not thread.is_alive(), "the hub's uvicorn thread did not stop"


@pytest.fixture
def live_hub(start_hub: Callable[..., LiveHub]) -> LiveHub:
    """A hub with the default limits."""
    return start_hub()
