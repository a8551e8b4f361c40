"""The uploader: the only part of the agent that talks to the hub (PROTOCOL.md).

Modules:
    batching    lease -> immutable Batch (count/byte limits), split in halves
    policy      PROTOCOL.md's status table -> Action; backoff (full jitter, cap)
    signing     httpx.Auth that signs each send with agent.wire (RFC 9421)
    client      HubClient: the only code that sends HTTP; maps httpx errors
    uploader    Uploader.sync_once(): lease -> blobs -> send -> settle
    reconcile   per-day ledger vs the hub; re-queue the days that differ

`build` wires them from the configuration (for ``runtime.py`` and the CLI).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.buffer import Buffer
from agent.config import AgentConfig
from agent.uploader.batching import Batch, BatchItem, BatchResult, RecordResult, form_batch
from agent.uploader.client import DayDigest, HubClient
from agent.uploader.policy import Action, Verdict, action_for, backoff, delay_for
from agent.uploader.reconcile import ReconcileReport, reconcile
from agent.uploader.signing import SigningAuth
from agent.uploader.uploader import SyncReport, Uploader, heartbeat_body

__all__ = [
    "Action",
    "Batch",
    "BatchItem",
    "BatchResult",
    "DayDigest",
    "HubClient",
    "ReconcileReport",
    "RecordResult",
    "SigningAuth",
    "SyncReport",
    "Uploader",
    "Verdict",
    "action_for",
    "backoff",
    "build",
    "delay_for",
    "form_batch",
    "heartbeat_body",
    "reconcile",
]


def build(
    cfg: AgentConfig,
    buffer: Buffer,
    key: Ed25519PrivateKey,
    *,
    transport: httpx.BaseTransport | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    adapters: Callable[[], Sequence[Mapping[str, Any]]] | None = None,
) -> tuple[HubClient, Uploader]:
    """A HubClient and an Uploader for ``cfg``; close the client when done.

    Raises:
        ConfigError: hub.url refused, or TLS files that cannot be loaded.
    """
    hub = cfg.hub
    client = HubClient(
        hub,
        SigningAuth(key, cfg.node.id, clock=clock),
        node_id=cfg.node.id,
        transport=transport,
        clock=clock,
        sleep=sleep,
    )
    uploader = Uploader(
        buffer,
        client,
        node_id=cfg.node.id,
        batch_max_records=hub.batch_max_records,
        batch_max_bytes=hub.batch_max_bytes,
        lease_secs=hub.lease_secs,
        backoff_max_secs=hub.backoff_max_secs,
        clock=clock,
        sleep=sleep,
        siam_id=cfg.node.siam_id,
        adapters=adapters,
    )
    return client, uploader
