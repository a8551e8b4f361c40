"""The uploader: lease -> blobs -> batch -> settle, as PROTOCOL.md's table says.

Responsibility: move records from the buffer to the hub, one `sync_once` at a time
(the scheduler and ``sepas-agent sync --once`` call it), and keep the sync state
that ``status`` shows.

Invariants (tested in tests/unit/test_uploader.py against agent.testing.FakeHub):
- A record leaves ``inflight`` only by the hub's word (accepted/duplicate -> sent,
  rejected -> dead) or back to ``pending`` (retry later, or given back at the
  deadline). Nothing is dropped for a transient error; there is no attempt limit.
- A record's blobs are on the hub (HEAD said so, or PUT stored them) before the
  batch that lists it is sent.
- Order: batches go out in lease order (clinical lane before imaging, then intake
  order, which keeps one patient's records in order); the first half of a split goes
  first; after a transient failure the run stops and every unsettled record of the
  lease gets the same ``not_before``, so none overtakes another.
- A batch retried in-process (409, 429, 503 within the deadline) is the same batch:
  same bytes, same Idempotency-Key, signed afresh; the lease is extended meanwhile.
- The uploader never logs patient data: records appear as ``id[:12]``.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

from agent import __version__
from agent.buffer import Buffer, BufferStats, Lease, State
from agent.errors import (
    BatchRejectedError,
    BatchTooLargeError,
    HubError,
    StorageError,
)
from agent.record import format_time
from agent.uploader.batching import (
    Batch,
    BatchItem,
    BatchResult,
    form_batches,
    lease_budget,
)
from agent.uploader.policy import Action, Verdict, action_for, delay_for

log = logging.getLogger(__name__)

#: In-process retries of one batch (409/429/503) before it is put back for later.
MAX_INLINE_RETRIES: Final = 5
#: Re-keyings of one batch after 422 before the uploader backs off instead.
MAX_REKEYS: Final = 2


class Hub(Protocol):
    """What the uploader needs of a hub client (`agent.uploader.client.HubClient`);
    a second uplink (the Ministry's gateway) would implement the same."""

    last_skew: float | None

    def post_batch(self, batch: Batch) -> BatchResult: ...
    def has_blob(self, sha256: str) -> bool: ...
    def put_blob(self, sha256: str, path: Path, media_type: str) -> bool: ...
    def heartbeat(self, body: Mapping[str, Any]) -> None: ...


class UploadObserver(Protocol):
    """Notified of uploads (metrics: `agent.telemetry.Metrics`). An observer's error is
    logged and never stops the upload (STYLE.md 3.5, notification rule)."""

    def batch_answered(self, status: int | None, secs: float) -> None: ...
    def records_settled(self, outcome: str, items: Sequence[BatchItem]) -> None: ...


@dataclass(slots=True)
class SyncReport:
    """What one `Uploader.sync_once` did."""

    started_at: float
    finished_at: float = 0.0
    batches: int = 0  # batches the hub answered with 200
    sent: int = 0  # accepted
    duplicate: int = 0  # the hub already had them: delivered
    rejected: int = 0  # moved to dead-letter, with the hub's reason
    retried: int = 0  # put back to pending for a later attempt
    released: int = 0  # given back untouched (deadline)
    blobs_uploaded: int = 0
    blobs_present: int = 0  # HEAD said the hub had them
    hub_reached: bool = False  # the hub answered something other than 401/403/5xx
    auth_refused: bool = False  # 401/403
    heartbeat_sent: bool = False
    #: why the run ended: drained, deadline, stopping, backing-off, unreachable,
    #: throttled, refused, local-error
    stopped: str = "drained"
    backoff_until: float | None = None
    error: dict[str, Any] | None = None  # message, status, problem_type, at

    @property
    def delivered(self) -> int:
        return self.sent + self.duplicate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def utc_text(t: float | None) -> str | None:
    """Unix time as RFC 3339 UTC (``…Z``), or None."""
    return None if t is None else format_time(datetime.fromtimestamp(t, UTC))


def heartbeat_body(
    stats: BufferStats,
    *,
    node_id: str,
    version: str,
    now: float,
    clock_skew_s: float | None,
    adapters: Sequence[Mapping[str, Any]] = (),
    siam_id: str | None = None,
) -> dict[str, Any]:
    """PROTOCOL.md's heartbeat body from the buffer's numbers.

    ``oldest_pending_age_s`` and ``clock_skew_s`` are null when unknown (nothing
    pending, no response measured yet). ``siam_id`` (DESIGN.md: the Ministry's
    facility id) is a backward-compatible addition the hub may ignore; it is sent
    only when configured.
    """
    body: dict[str, Any] = {
        "node_id": node_id,
        "version": version,
        "pending": stats.total(State.PENDING) + stats.total(State.INFLIGHT),
        "oldest_pending_age_s": None
        if stats.oldest_pending_at is None
        else round(max(0.0, now - stats.oldest_pending_at), 1),
        "dead": stats.total(State.DEAD),
        "quarantined": stats.quarantined,
        "buffer_bytes": stats.used_bytes,
        "clock_skew_s": clock_skew_s,
        "adapters": [
            {
                "name": str(a["name"]),
                "kind": str(a["kind"]),
                "last_ok": a.get("last_ok"),
                "last_error": a.get("last_error"),
            }
            for a in adapters
        ],
    }
    if siam_id is not None:
        body["siam_id"] = siam_id
    return body


class Uploader:
    """Moves due records from a `Buffer` to the hub. One instance per process; not
    for concurrent use (the scheduler runs `sync_once` with ``max_instances=1``)."""

    _lease: Lease  # the lease being uploaded (extended as the upload goes)

    def __init__(
        self,
        buffer: Buffer,
        client: Hub,
        *,
        node_id: str,
        batch_max_records: int = 500,
        batch_max_bytes: int = 4_000_000,
        lease_secs: float = 120.0,
        backoff_max_secs: float = 300.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
        version: str = __version__,
        siam_id: str | None = None,
        adapters: Callable[[], Sequence[Mapping[str, Any]]] | None = None,
        inline_wait_max_secs: float = 60.0,
        heartbeat: bool = True,
        observer: UploadObserver | None = None,
    ) -> None:
        """Args beyond the obvious:
        rand: uniform [0, 1) for backoff jitter (not for anything secret).
        adapters: gives the heartbeat's ``adapters`` list (name, kind, last_ok,
            last_error); none when None.
        inline_wait_max_secs: without a deadline, the longest in-process wait for a
            409/429/503 before the batch is put back for a later run instead.
        heartbeat: send a heartbeat at the end of each `sync_once`.
        observer: told of every batch answer and settled record (metrics).
        """
        self.buffer = buffer
        self.client = client
        self.node_id = node_id
        self.batch_max_records = batch_max_records
        self.batch_max_bytes = batch_max_bytes
        self.lease_secs = lease_secs
        self.backoff_max_secs = backoff_max_secs
        self._clock = clock
        self._sleep = sleep
        self._rand = rand
        self.version = version
        self.siam_id = siam_id
        self._adapters = adapters
        self.inline_wait_max_secs = inline_wait_max_secs
        self.heartbeat_enabled = heartbeat
        self.observer = observer
        self._stopping = False
        self._failures = 0
        self._blobs_done: set[str] = set()

    # -- shutdown (the runtime, on SIGTERM) ------------------------------------------------

    def request_stop(self) -> None:
        """Shutdown: from now on no batch starts and no in-process wait begins; a
        running `sync_once` gives its unsettled records back and returns, ``stopping``.
        Thread-safe; the waits of the ``sleep`` given to the constructor should also
        end (the runtime's does)."""
        self._stopping = True

    def release_unsettled(self) -> int:
        """Give the current lease's unsettled records back now: for a shutdown whose
        upload did not end in time (a hub that does not answer). Safe beside a settle
        of the same records: the buffer releases only what is still inflight under that
        lease, and a later ``mark_sent`` still applies (the hub's word is final)."""
        lease = getattr(self, "_lease", None)
        return 0 if lease is None else self.buffer.release(lease)

    # -- the run ---------------------------------------------------------------------------

    def sync_once(self, *, deadline: float | None = None, force: bool = False) -> SyncReport:
        """Upload what is due until nothing is, the deadline passes, or the hub cannot
        take more now; then send a heartbeat and save the sync state.

        Args:
            deadline: a time (this uploader's clock) after which no new batch starts;
                in-process waits (409/429/503) must also end before it.
            force: ignore a backoff still running from an earlier run (an operator's
                ``sync --once``); otherwise such a run returns at once, ``backing-off``.

        Raises:
            StorageError: the buffer failed (nothing is lost: leased records return to
                pending when their lease ends).
        """
        now = self._clock()
        report = SyncReport(started_at=now)
        state = self.buffer.sync_state()
        self._failures = int(state.get("failures") or 0)
        self._blobs_done = set()
        until = state.get("backoff_until")
        if not force and isinstance(until, int | float) and now < until:
            report.stopped = "backing-off"
            report.backoff_until = float(until)
            report.finished_at = now
            return report
        try:
            while True:
                if self._stopping:
                    report.stopped = "stopping"
                    break
                if deadline is not None and self._clock() >= deadline:
                    report.stopped = "deadline"
                    break
                lease = self.buffer.lease(
                    max_records=self.batch_max_records,
                    max_bytes=lease_budget(self.batch_max_bytes, node_id=self.node_id),
                    lease_secs=self.lease_secs,
                )
                if lease is None:
                    report.stopped = "drained"
                    break
                if not self._upload_lease(lease, report, deadline):
                    break
            # A node that falls behind (deadline reached, hub slow) must still report
            # its backlog: that is what the heartbeat is for. Only skip it when the
            # hub cannot be reached or refuses us, or we are shutting down.
            if (
                self.heartbeat_enabled
                and not self._stopping
                and (
                    report.stopped == "drained"
                    or (report.stopped == "deadline" and report.hub_reached)
                )
                and not report.auth_refused
            ):
                self._heartbeat(report)
        finally:
            report.finished_at = self._clock()
            self._save_state(report)
        return report

    def _upload_lease(self, lease: Lease, report: SyncReport, deadline: float | None) -> bool:
        """Send one lease's records; False when the run must stop."""
        queue: deque[Batch] = deque(
            form_batches(
                [BatchItem.from_leased(r) for r in lease.items],
                node_id=self.node_id,
                max_records=self.batch_max_records,
                max_bytes=self.batch_max_bytes,
                now=self._clock(),
            )
        )
        self._lease = lease
        inline = rekeys = 0
        try:
            while queue:
                batch = queue[0]
                if self._stopping or (
                    deadline is not None and self._clock() >= deadline and inline == 0
                ):
                    ids = [i for b in queue for i in b.ids]
                    report.released += self.buffer.release(self._lease, ids)
                    queue.clear()
                    report.stopped = "stopping" if self._stopping else "deadline"
                    return False
                self._keep_lease()
                outcome: BatchResult | HubError
                sent_at: float | None = None
                try:
                    bad = self._upload_blobs(batch, report)
                    if bad:
                        report.rejected += self.buffer.dead_letter(self._lease, bad)
                        rest = batch.without(bad, now=self._clock())
                        queue.popleft()
                        if rest is not None:
                            queue.appendleft(rest)
                        continue
                    self._keep_lease()
                    sent_at = time.monotonic()
                    outcome = self.client.post_batch(batch)
                except HubError as e:
                    outcome = e
                except StorageError as e:
                    self._give_back(
                        queue, report, Action(Verdict.BACKOFF), e, stopped="local-error"
                    )
                    return False
                if sent_at is not None:
                    status = 200 if isinstance(outcome, BatchResult) else outcome.status
                    self._tell("batch_answered", status, time.monotonic() - sent_at)
                action = action_for(outcome, records=len(batch))
                self._note_contact(outcome, report)
                if isinstance(outcome, BatchResult):  # Verdict.SETTLE
                    queue.popleft()
                    self._settle(batch, outcome, report)
                    self._failures = 0
                    inline = rekeys = 0
                    continue
                v = action.verdict
                if v is Verdict.SPLIT:
                    queue.popleft()
                    first, second = batch.split(now=self._clock())
                    queue.extendleft((second, first))
                    log.info(
                        "The hub refused a batch of %d records with %s; splitting it.",
                        len(batch),
                        outcome.status,
                        extra={"event": "upload.batch_split", "batch_id": batch.batch_id},
                    )
                    inline = 0
                    continue
                if v is Verdict.DEAD_LETTER:
                    queue.popleft()
                    rid = batch.ids[0]
                    reason = f"hub refused it with {outcome.status}: {outcome}"
                    report.rejected += self.buffer.dead_letter(self._lease, {rid: reason})
                    self._tell("records_settled", "rejected", batch.items[:1])
                    log.warning(
                        "The hub refused a single record (%s); it is in the dead-letter store.",
                        outcome.status,
                        extra={"event": "upload.record_dead", "record": rid[:12]},
                    )
                    inline = 0
                    continue
                if v is Verdict.REKEY and rekeys < MAX_REKEYS:
                    rekeys += 1
                    queue[0] = batch.rekey(now=self._clock())
                    log.error(
                        "The hub says batch %s was sent before with other content (422). "
                        "This is a node bug; re-sending the records under a new key.",
                        batch.batch_id,
                        extra={"event": "upload.idempotency_conflict", "batch_id": batch.batch_id},
                    )
                    continue
                if v is Verdict.REKEY:
                    action = Action(
                        Verdict.BACKOFF, status=outcome.status, problem_type=outcome.problem_type
                    )
                delay = delay_for(
                    action, failures=self._failures, cap=self.backoff_max_secs, rand=self._rand
                )
                if (
                    action.same_batch
                    and inline < MAX_INLINE_RETRIES
                    and self._may_wait(delay, deadline)
                ):
                    inline += 1
                    log.info(
                        "The hub asked to wait (%s); retrying the same batch in %.1f s.",
                        outcome.status,
                        delay,
                        extra={"event": "upload.batch_waiting", "batch_id": batch.batch_id},
                    )
                    # Hold the records through the wait: no other upload may take them.
                    self._lease = self.buffer.extend_lease(
                        self._lease, lease_secs=delay + self.lease_secs
                    )
                    self._sleep(delay)
                    continue
                stopped = {
                    Verdict.HOLD: "refused",
                    Verdict.WAIT: "throttled",
                    Verdict.RETRY_SAME: "throttled",
                }.get(action.verdict, "unreachable")
                self._give_back(queue, report, action, outcome, stopped=stopped, delay=delay)
                return False
            return True
        except BaseException:
            # Interrupted (Ctrl-C, shutdown, a buffer failure): unsettled records go
            # back at once rather than when the lease ends.
            ids = [i for b in queue for i in b.ids]
            if ids:
                try:
                    self.buffer.release(self._lease, ids)
                except StorageError:
                    log.warning(
                        "Could not give leased records back; they return when the lease ends.",
                        extra={"event": "upload.release_failed", "count": len(ids)},
                    )
            raise

    # -- steps -------------------------------------------------------------------------------

    def _upload_blobs(self, batch: Batch, report: SyncReport) -> dict[str, str]:
        """Make sure every blob the batch's records list is on the hub. Returns the
        records that cannot be sent (blob missing here, or refused by the hub) with
        the reason, for the dead-letter store.

        Raises:
            HubError: anything else the hub answered (the batch's outcome).
            StorageError: a blob file cannot be read.
        """
        bad: dict[str, str] = {}
        for item in batch.items:
            for blob in item.blobs:
                sha = blob.sha256
                if sha in self._blobs_done:
                    continue
                try:
                    if self.client.has_blob(sha):
                        report.hub_reached = True
                        report.blobs_present += 1
                        if self.buffer.blob_info(sha) is not None:
                            self.buffer.mark_blob_uploaded(sha)
                        self._blobs_done.add(sha)
                        continue
                    report.hub_reached = True
                    info = self.buffer.blob_info(sha)
                    path = self.buffer.blob_path(sha)
                    if info is None:
                        raise FileNotFoundError(str(path))
                    self.client.put_blob(sha, path, info[0] or blob.media_type)
                    self._keep_lease()
                except FileNotFoundError:
                    bad[item.id] = f"node: blob sha256:{sha[:12]} is missing from the local store"
                    log.error(
                        "A record's blob is missing from the local store; the record is in "
                        "the dead-letter store.",
                        extra={"event": "upload.blob_missing", "record": item.id[:12]},
                    )
                    break
                except (BatchRejectedError, BatchTooLargeError) as e:
                    bad[item.id] = f"hub refused blob sha256:{sha[:12]}: {e}"
                    log.warning(
                        "The hub refused a blob (%s); its record is in the dead-letter store.",
                        e.status,
                        extra={"event": "upload.blob_refused", "record": item.id[:12]},
                    )
                    break
                self.buffer.mark_blob_uploaded(sha)
                self._blobs_done.add(sha)
                report.blobs_uploaded += 1
        return bad

    def _settle(self, batch: Batch, result: BatchResult, report: SyncReport) -> None:
        by = result.by_status()
        day = result.hub_day
        accepted = [r.id for r in by.pop("accepted", [])]
        duplicate = [r.id for r in by.pop("duplicate", [])]
        rejected = {r.id: f"hub: {r.error or 'rejected'}" for r in by.pop("rejected", [])}
        unknown = [r.id for rs in by.values() for r in rs]
        if accepted:
            report.sent += self.buffer.mark_sent(self._lease, accepted, hub_day=day)
        if duplicate:
            report.duplicate += self.buffer.mark_duplicate(self._lease, duplicate, hub_day=day)
        if rejected:
            report.rejected += self.buffer.dead_letter(self._lease, rejected)
            log.warning(
                "The hub rejected %d records of batch %s; they are in the dead-letter store.",
                len(rejected),
                batch.batch_id,
                extra={"event": "upload.records_rejected", "count": len(rejected)},
            )
            for rid, reason in rejected.items():
                log.debug(
                    "Rejected record %s: %s", rid[:12], reason, extra={"event": "upload.rejected"}
                )
        if self.observer is not None:
            by_id = {it.id: it for it in batch.items}
            for outcome, ids in (("accepted", accepted), ("duplicate", duplicate)):
                self._tell("records_settled", outcome, [by_id[i] for i in ids if i in by_id])
            self._tell("records_settled", "rejected", [by_id[i] for i in rejected if i in by_id])
        if unknown:
            # Not a status PROTOCOL.md defines: never final, try again later.
            delay = delay_for(
                Action(Verdict.BACKOFF),
                failures=self._failures,
                cap=self.backoff_max_secs,
                rand=self._rand,
            )
            report.retried += self.buffer.retry_later(
                self._lease,
                unknown,
                not_before=self._clock() + delay,
                reason="hub answered a result status PROTOCOL.md does not define",
            )
        report.batches += 1
        log.info(
            "Batch uploaded: %d accepted, %d duplicate, %d rejected.",
            len(accepted),
            len(duplicate),
            len(rejected),
            extra={
                "event": "upload.batch_sent",
                "batch_id": batch.batch_id,
                "count": len(batch),
                "replayed": result.replayed,
            },
        )

    def _give_back(
        self,
        queue: deque[Batch],
        report: SyncReport,
        action: Action,
        error: BaseException,
        *,
        stopped: str,
        delay: float | None = None,
    ) -> None:
        """The run stops: every unsettled record of the lease waits the same time."""
        if delay is None:
            delay = delay_for(
                action, failures=self._failures, cap=self.backoff_max_secs, rand=self._rand
            )
        not_before = self._clock() + delay
        ids = [i for b in queue for i in b.ids]
        queue.clear()
        status = getattr(error, "status", None)
        problem_type = getattr(error, "problem_type", None)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        report.retried += self.buffer.retry_later(
            self._lease, ids, not_before=not_before, reason=message
        )
        if action.verdict is not Verdict.HOLD:
            self._failures += 1
        report.stopped = stopped
        report.backoff_until = not_before
        report.auth_refused = report.auth_refused or action.verdict is Verdict.HOLD
        report.error = {
            "at": self._clock(),
            "message": message,
            "status": status,
            "problem_type": problem_type,
            "kind": type(error).__name__,
        }
        level = logging.ERROR if action.verdict is Verdict.HOLD else logging.WARNING
        log.log(
            level,
            "Upload stopped (%s); %d records wait %.0f s. %s",
            message,
            len(ids),
            delay,
            getattr(error, "hint", ""),
            extra={
                "event": "upload.stopped",
                "reason": stopped,
                "status": status,
                "problem_type": problem_type,
                "count": len(ids),
            },
        )

    def _heartbeat(self, report: SyncReport) -> None:
        try:
            stats = self.buffer.stats()
            body = heartbeat_body(
                stats,
                node_id=self.node_id,
                version=self.version,
                now=self._clock(),
                clock_skew_s=self.client.last_skew,
                adapters=self._adapters() if self._adapters is not None else (),
                siam_id=self.siam_id,
            )
            self.client.heartbeat(body)
        except HubError as e:
            log.warning(
                "Heartbeat not delivered: %s",
                e,
                extra={"event": "upload.heartbeat_failed", "status": e.status},
            )
            return
        except Exception as e:  # noqa: BLE001 - an observer must never break the run
            log.warning(
                "Heartbeat not built: %s",
                type(e).__name__,
                extra={"event": "upload.heartbeat_failed"},
            )
            return
        report.heartbeat_sent = True
        report.hub_reached = True

    # -- helpers -----------------------------------------------------------------------------

    def _note_contact(self, outcome: BatchResult | HubError, report: SyncReport) -> None:
        if isinstance(outcome, BatchResult):
            report.hub_reached = True
            return
        status = outcome.status
        if status in (401, 403):
            report.auth_refused = True
        elif status is not None and status < 500:
            report.hub_reached = True

    def _may_wait(self, delay: float, deadline: float | None) -> bool:
        if self._stopping:
            return False
        if deadline is None:
            return delay <= self.inline_wait_max_secs
        return self._clock() + delay < deadline

    def _tell(self, method: str, *args: Any) -> None:
        """Notify the observer; its errors are logged, never raised."""
        if self.observer is None:
            return
        try:
            getattr(self.observer, method)(*args)
        except Exception as e:  # noqa: BLE001 - an observer must never break the run
            log.warning(
                "An upload observer failed: %s",
                type(e).__name__,
                extra={"event": "upload.observer_failed", "error": type(e).__name__},
            )

    def _keep_lease(self) -> None:
        if self._lease.expires_at - self._clock() < self.lease_secs / 2:
            self._lease = self.buffer.extend_lease(self._lease, lease_secs=self.lease_secs)

    def _save_state(self, report: SyncReport) -> None:
        skew = getattr(self.client, "last_skew", None)
        patch: dict[str, Any] = {
            "last_attempt_at": report.started_at,
            "last_run": {
                k: getattr(report, k)
                for k in (
                    "started_at",
                    "finished_at",
                    "batches",
                    "sent",
                    "duplicate",
                    "rejected",
                    "retried",
                    "released",
                    "blobs_uploaded",
                    "blobs_present",
                    "hub_reached",
                    "stopped",
                )
            },
            "failures": self._failures,
            "backoff_until": report.backoff_until,
        }
        if skew is not None:
            patch["clock_skew_s"] = skew
            patch["clock_skew_at"] = report.finished_at
        if report.error is not None:
            patch["last_error"] = report.error
        if report.auth_refused and report.error is not None:
            patch["alarm"] = {
                "since": report.error["at"],
                "status": report.error["status"],
                "problem_type": report.error["problem_type"],
                "message": report.error["message"],
            }
        elif report.error is None:
            patch["last_success_at"] = report.finished_at
            patch["alarm"] = None
        if report.backoff_until is None:
            patch["backoff_reason"] = None
        else:
            patch["backoff_reason"] = report.stopped
        try:
            self.buffer.update_sync_state(patch)
        except StorageError as e:
            log.warning(
                "Could not save the sync state: %s", e, extra={"event": "upload.state_failed"}
            )
