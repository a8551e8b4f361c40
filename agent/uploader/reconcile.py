"""Ledger reconciliation (PROTOCOL.md, ``POST /v1/reconcile``).

The buffer keeps, per UTC day of the hub's ``received_at`` (the record's
``hub_day``), the ids of the records it holds as sent. For the last N days this
module sends the day list to the hub, compares the hub's count and digest with its
own (`agent.wire.day_digest`, the one recipe both ends use), and re-queues every
record of a day that differs (sent -> pending). The hub's de-duplication makes
re-sending safe: what the hub holds comes back ``duplicate``, what it lost is
``accepted`` again.

Choices, and why:
- Today (UTC) is not checked by default: batches of the current day may be
  committed at the hub and not yet settled here, which would look like a gap.
- Days older than ``retention_days - 1`` are never checked: pruning has removed
  some of their sent records here, and they would always differ.
- At most 62 days per request (PROTOCOL.md).
- A day is re-queued again only if something changed since it was last re-queued
  (our count/digest or the hub's). Some differences cannot be repaired by re-sending:
  a record settled as ``duplicate`` under another day than the one the hub counts it
  on, or sent records pruned early to make room. Re-queuing those days on every run
  would re-send them forever; instead they are reported as ``unresolved``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

from agent.buffer import Buffer
from agent.uploader.client import DayDigest
from agent.wire import day_digest

log = logging.getLogger(__name__)

#: PROTOCOL.md: at most 62 days per reconcile request.
MAX_DAYS: Final = 62
_EMPTY: Final = day_digest(())


class Reconciler(Protocol):
    """What reconciliation needs of a hub client."""

    def reconcile(self, days: Sequence[str]) -> list[DayDigest]: ...


@dataclass(frozen=True, slots=True)
class DayDiff:
    day: str
    ours: int
    hub: int
    requeued: int
    unresolved: bool  # differed the same way after an earlier re-queue: not re-queued


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    at: float
    days: tuple[str, ...]
    differing: tuple[DayDiff, ...] = field(default=())

    @property
    def requeued(self) -> int:
        return sum(d.requeued for d in self.differing)

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "days_checked": len(self.days),
            "first_day": self.days[0] if self.days else None,
            "last_day": self.days[-1] if self.days else None,
            "days_differing": [asdict(d) for d in self.differing],
            "requeued": self.requeued,
        }


def days_to_check(
    now: float, *, days: int, retention_days: int, include_today: bool = False
) -> list[str]:
    """The UTC days to reconcile, oldest first: ``days`` days ending yesterday (today
    with ``include_today``), at most `MAX_DAYS` and never older than retention."""
    today = datetime.fromtimestamp(now, UTC).date()
    last = today if include_today else today - timedelta(days=1)
    n = min(days, MAX_DAYS, max(retention_days - 1, 0))
    return [(last - timedelta(days=k)).isoformat() for k in range(n - 1, -1, -1)]


def reconcile(
    buffer: Buffer,
    client: Reconciler,
    *,
    days: int = 7,
    retention_days: int = 30,
    include_today: bool = False,
    clock: Callable[[], float] = time.time,
) -> ReconcileReport:
    """Compare the ledger with the hub for the last ``days`` days; re-queue the days
    that differ. Records the result in the sync state (``reconcile``).

    Raises:
        HubError: the hub could not be asked (nothing is re-queued then).
        StorageError: the buffer failed.
    """
    now = clock()
    wanted = days_to_check(
        now, days=days, retention_days=retention_days, include_today=include_today
    )
    if not wanted:
        return ReconcileReport(at=now, days=())
    ours = buffer.ledger(wanted)
    theirs = {d.day: d for d in client.reconcile(wanted)}
    before = buffer.sync_state().get("reconcile") or {}
    keys_before: dict[str, str] = dict(before.get("requeued_keys") or {})
    keys: dict[str, str] = {}
    diffs: list[DayDiff] = []
    for day in wanted:
        count, digest = ours[day]
        hub = theirs.get(day)
        hub_count, hub_digest = (hub.count, hub.digest) if hub is not None else (0, _EMPTY)
        if (count, digest) == (hub_count, hub_digest):
            continue
        key = f"{count}:{digest}:{hub_count}:{hub_digest}"
        if keys_before.get(day) == key:
            keys[day] = key
            diffs.append(DayDiff(day, count, hub_count, 0, unresolved=True))
            continue
        n = buffer.requeue_day(day)
        if n:
            keys[day] = key
        elif day in keys_before:
            keys[day] = keys_before[day]
        diffs.append(DayDiff(day, count, hub_count, n, unresolved=False))
    report = ReconcileReport(at=now, days=tuple(wanted), differing=tuple(diffs))
    state = report.to_dict()
    state["requeued_keys"] = keys
    buffer.update_sync_state({"reconcile": state})
    if diffs:
        log.warning(
            "Reconciliation: %d of %d days differ from the hub; %d records re-queued.",
            len(diffs),
            len(wanted),
            report.requeued,
            extra={"event": "upload.reconcile_differs", "count": report.requeued},
        )
    else:
        log.info(
            "Reconciliation: %d days agree with the hub.",
            len(wanted),
            extra={"event": "upload.reconcile_ok"},
        )
    return report
