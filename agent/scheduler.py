"""APScheduler 3 wiring for `sepas-agent run`: when each job runs, and on which threads.

Responsibility: a `Scheduler` over one ``BackgroundScheduler`` whose jobs are plain
callables named by id (``poll:<adapter>``, ``sync``, ``prune``, ``reconcile``,
``state``, ``start:<adapter>``), plus the backoff rule the runtime applies to failing
adapters. What a job does is `agent.runtime`'s business.

Invariants:
- Every job has ``max_instances=1``, ``coalesce=True`` and an explicit
  ``misfire_grace_time``: a job never runs twice at once, and runs missed while the
  host slept or a run overran collapse into one.
- A job body never raises into the scheduler: `Scheduler` wraps it, logs what escaped
  (a bug) and goes on; the bodies record their own outcome for ``status``.
- Jobs run on a fixed set of daemon threads (`DaemonThreadPool`): a job stuck in I/O at
  shutdown (a hub that does not answer, a HIS query) cannot hold the process past its
  10 s, and the set is bounded, so per-thread SQLite reader connections are too.
- `Scheduler.run_at` may be called from inside the job it moves: APScheduler computes a
  job's next run under its job-store lock right after submitting it, and `run_at`
  takes the same lock, so the body's choice always lands after the scheduler's own.

Times are Unix seconds at this interface; APScheduler sees aware UTC datetimes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from apscheduler.executors.pool import BasePoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_RUNNING
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from agent.dates import TEHRAN

__all__ = ["DaemonThreadPool", "Scheduler", "backoff_delay", "poll_trigger"]

log = logging.getLogger(__name__)

#: A poller whose settings name no interval polls this often.
DEFAULT_POLL_EVERY: Final = timedelta(minutes=1)


def backoff_delay(
    failures: int, *, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds before retry number ``failures`` (1, 2, …): ``base * 2**(failures-1)``
    capped at ``cap``, with equal jitter (between half and all of it), so that adapters
    failing together do not retry in step."""
    exp = min(cap, base * (2.0 ** min(max(failures, 1) - 1, 30)))
    return exp / 2 + rand() * exp / 2


def _when(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def poll_trigger(settings: object) -> tuple[BaseTrigger, float]:
    """The trigger of a poller's job and its misfire grace (seconds), from its settings.

    ``poll_every`` (a timedelta) gives an interval. A ``poll_cron`` string (five-field
    crontab, Asia/Tehran), when a kind's settings grow one, takes precedence.
    """
    cron = getattr(settings, "poll_cron", None)
    if isinstance(cron, str) and cron.strip():
        return CronTrigger.from_crontab(cron, timezone=TEHRAN), 300.0
    every = getattr(settings, "poll_every", None)
    if not isinstance(every, timedelta) or every <= timedelta(0):
        every = DEFAULT_POLL_EVERY
    secs = every.total_seconds()
    return IntervalTrigger(seconds=secs, timezone=UTC), max(30.0, secs)


_Work = tuple[concurrent.futures.Future[Any], Callable[[], Any]]


class DaemonThreadPool(concurrent.futures.Executor):
    """A bounded pool of daemon worker threads, started as work needs them.

    `concurrent.futures.ThreadPoolExecutor` joins its workers at interpreter exit,
    which would hold a stopping agent hostage to a job stuck in a network call.
    """

    def __init__(self, max_workers: int, *, name: str = "sepas-job") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.max_workers = max_workers
        self._name = name
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._pending = 0  # submitted, not yet taken by a worker
        self._waiting = 0  # workers blocked on the queue
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._pending += 1
            self._queue.put((future, functools.partial(fn, *args, **kwargs)))
            if self._pending > self._waiting and len(self._threads) < self.max_workers:
                t = threading.Thread(
                    target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(t)
                t.start()
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                self._waiting += 1
            item = self._queue.get()
            with self._lock:
                self._waiting -= 1
                if item is not None:
                    self._pending -= 1
            if item is None:
                return
            future, call = item
            if future.set_running_or_notify_cancel():
                try:
                    result = call()
                except BaseException as e:  # noqa: BLE001 - handed to the future's owner
                    future.set_exception(e)
                else:
                    future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        if wait:
            for t in threads:
                t.join()


class _PoolExecutor(BasePoolExecutor):  # type: ignore[misc]  # APScheduler 3 is untyped
    """APScheduler's pool executor over a `DaemonThreadPool`."""

    def __init__(self, pool: DaemonThreadPool) -> None:
        super().__init__(pool)


class Scheduler:
    """The agent's jobs. Add jobs, `start`, and at shutdown `pause`, `wait_idle`,
    `shutdown`. Every method is thread-safe."""

    def __init__(self, *, max_workers: int) -> None:
        self._pool = DaemonThreadPool(max_workers)
        self._aps = BackgroundScheduler(
            timezone=UTC,
            executors={"default": _PoolExecutor(self._pool)},
            job_defaults={"coalesce": True, "max_instances": 1},
            daemon=True,
        )
        self._running: dict[str, float] = {}  # job id -> started (monotonic)
        self._cond = threading.Condition()

    # -- jobs ------------------------------------------------------------------------

    def _wrap(self, job_id: str, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with self._cond:
                self._running[job_id] = time.monotonic()
            try:
                fn()
            except Exception:
                # A job body records its own failures; this is a bug in one.
                log.exception(
                    "Job %s failed unexpectedly; it runs again at its next time.",
                    job_id,
                    extra={"event": "scheduler.job_crashed", "job": job_id},
                )
            finally:
                with self._cond:
                    self._running.pop(job_id, None)
                    self._cond.notify_all()

        return run

    def add_interval(
        self,
        job_id: str,
        fn: Callable[[], None],
        *,
        every_secs: float,
        first_at: float | None = None,
        grace_secs: float | None = None,
    ) -> None:
        """``fn`` every ``every_secs``, first at ``first_at`` (Unix time; default: one
        interval from now)."""
        self._add(
            job_id,
            fn,
            IntervalTrigger(seconds=every_secs, timezone=UTC),
            first_at=first_at,
            grace_secs=grace_secs if grace_secs is not None else every_secs,
        )

    def add_trigger(
        self,
        job_id: str,
        fn: Callable[[], None],
        trigger: BaseTrigger,
        *,
        first_at: float | None = None,
        grace_secs: float,
    ) -> None:
        """``fn`` on ``trigger`` (`poll_trigger` gives a poller's)."""
        self._add(job_id, fn, trigger, first_at=first_at, grace_secs=grace_secs)

    def add_once(self, job_id: str, fn: Callable[[], None], *, at: float) -> None:
        """``fn`` once at ``at``; replaces a pending job of that id."""
        self._add(job_id, fn, DateTrigger(_when(at), timezone=UTC), first_at=None, grace_secs=None)

    def _add(
        self,
        job_id: str,
        fn: Callable[[], None],
        trigger: BaseTrigger,
        *,
        first_at: float | None,
        grace_secs: float | None,
    ) -> None:
        kwargs: dict[str, Any] = {}
        if first_at is not None:
            kwargs["next_run_time"] = _when(first_at)
        self._aps.add_job(
            self._wrap(job_id, fn),
            trigger,
            id=job_id,
            name=job_id,
            replace_existing=True,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None if grace_secs is None else max(1, round(grace_secs)),
            **kwargs,
        )

    def run_at(self, job_id: str, at: float) -> bool:
        """Move the next run of ``job_id`` to ``at``; False if there is no such job."""
        try:
            self._aps.modify_job(job_id, next_run_time=_when(at))
        except JobLookupError:
            return False
        return True

    def remove(self, job_id: str) -> None:
        with contextlib.suppress(JobLookupError):
            self._aps.remove_job(job_id)

    def has_job(self, job_id: str) -> bool:
        return self._aps.get_job(job_id) is not None

    def next_run(self, job_id: str) -> float | None:
        job = self._aps.get_job(job_id)
        when = getattr(job, "next_run_time", None) if job is not None else None
        return when.timestamp() if when is not None else None

    # -- lifecycle -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Started, not paused, not shut down."""
        return bool(self._aps.state == STATE_RUNNING)

    def start(self) -> None:
        self._aps.start()

    def pause(self) -> None:
        """No job starts from now on; running ones go on."""
        with contextlib.suppress(SchedulerNotRunningError):
            self._aps.pause()

    def running_jobs(self) -> list[str]:
        with self._cond:
            return sorted(self._running)

    def wait_idle(self, timeout: float, *, jobs: Callable[[str], bool] = lambda _j: True) -> bool:
        """Wait until no running job matches ``jobs``; False when ``timeout`` ran out."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while any(jobs(j) for j in self._running):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def shutdown(self) -> None:
        """Stop the scheduler thread; jobs still running are left to end (or to die with
        the process: their threads are daemons)."""
        with contextlib.suppress(SchedulerNotRunningError):
            self._aps.shutdown(wait=False)
