"""`sepas-agent run`: the composition root. Config in, running service out.

Responsibility: read the config (only here and in ``agent/cli.py``), build every
object of the flow (buffer, keys, uploader, adapters, scheduler, telemetry), keep
them running for years, and stop them cleanly. What each part does is its own
module's business; this module decides only when, on which thread, and what happens
when a part fails.

Start (`Runtime.start`): logging first (so every later failure is seen), the buffer
and its data key, the node key (refused when group or others can read it), the log
key, the uploader, the telemetry listener, the scheduler (sync, prune, reconcile,
service state), then each enabled adapter: listeners started, pollers' jobs added.

Supervision:
- An adapter whose build, ``start()`` or ``poll()`` raises is reported (log, metrics,
  state file, /healthz after `Timing.unhealthy_after_secs`) and retried with capped,
  jittered exponential backoff; the other adapters never notice.
- The sync job runs every `Timing.sync_every_secs` and is woken by every commit
  (``AdapterContext.on_committed``), debounced, so a record reaches the hub seconds
  after it was captured. While it runs, further commits make it go round again
  instead of queueing runs.
- Reconciliation runs inside the sync job (one HubClient, one thread): the reconcile
  job only marks it due.

Stop (`Runtime.stop`, on SIGTERM/SIGINT; within `Timing.stop_budget_secs`, under the
10 s systemd gives): no job starts any more; listeners stop in parallel (they finish
what they are committing and answer it); pollers' jobs go; the uploader starts no
batch and no wait and gives unsettled records back; running jobs get the rest of the
budget; a lease still held by an upload the hub does not answer is released (a later
answer still settles it); the buffer is closed; the state file says stopped.

Service heartbeat: ``data_dir/agent.state.json``, rewritten atomically every
`Timing.state_every_secs` (pid, start time, last tick, health, each adapter's last
poll, cursor, error and failure streak, each job's last run). `read_service_state`
is how ``sepas-agent status`` tells a running service from a dead one. A file and
not the buffer: no fsync'd SQLite write every 10 s, and readable when the buffer is
not.

Never: log or write patient data (errors are run through `telemetry.scrub`); let
one adapter's failure stop the service.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final, TextIO

import httpx

import adapters
from agent import __version__, telemetry
from agent.adapter import Adapter, AdapterContext, Listener, Poller, PollReport
from agent.buffer import Buffer, BufferStats, Cursor, PutReport, open_stats
from agent.config import AdapterSettings, AgentConfig
from agent.errors import ConfigError, KeyFileError, SepasError, StorageError
from agent.keys import init_data_key, load_data_key, load_private_key
from agent.record import Record
from agent.scheduler import Scheduler, backoff_delay, poll_trigger
from agent.uploader import build as build_uploader
from agent.uploader.client import HubClient
from agent.uploader.reconcile import reconcile
from agent.uploader.uploader import SyncReport, Uploader, utc_text

__all__ = [
    "LOG_KEY_FILE",
    "STATE_FILE",
    "AdapterBuilder",
    "Runtime",
    "Timing",
    "data_key",
    "derive_log_key",
    "open_buffer",
    "read_service_state",
]

log = logging.getLogger(__name__)

#: The service heartbeat, in ``node.data_dir``.
STATE_FILE: Final = "agent.state.json"
STATE_FORMAT: Final = 1
#: With ``buffer.encrypt = false`` there is no data key to derive the log key from.
LOG_KEY_FILE: Final = "log.key"
DEFAULT_STATE_EVERY_SECS: Final = 10.0
#: A heartbeat older than this many state intervals means the service is not running.
STALE_TICKS: Final = 3.5
_LOG_KEY_LABEL: Final = b"sepas-agent log key v1"

AdapterBuilder = Callable[[AdapterSettings, AdapterContext], Adapter]


@dataclass(frozen=True, slots=True)
class Timing:
    """The runtime's intervals and budgets (seconds). Tests shorten them."""

    sync_every_secs: float = 30.0
    #: One `Uploader.sync_once` ends after this (state saved, metrics updated); the
    #: job starts the next at once while more is due.
    sync_pass_max_secs: float = 60.0
    #: Delay between a commit and the sync it wakes (commits in between join it).
    wake_debounce_secs: float = 0.2
    #: The uploader's heartbeat to the hub goes with a sync at most this often.
    heartbeat_every_secs: float = 30.0
    state_every_secs: float = DEFAULT_STATE_EVERY_SECS
    prune_every_secs: float = 3600.0
    prune_first_secs: float = 60.0
    reconcile_every_secs: float = 6 * 3600.0
    reconcile_first_secs: float = 300.0
    reconcile_days: int = 7
    #: Adapter retries: first after about this, doubling up to `retry_max_secs`.
    retry_base_secs: float = 2.0
    retry_max_secs: float = 300.0
    #: An adapter failing for this long makes /healthz answer 503.
    unhealthy_after_secs: float = 300.0
    #: A buffer write refused this recently makes /healthz answer 503.
    storage_error_secs: float = 60.0
    #: SIGTERM to return from `Runtime.stop`; systemd's default kill timeout is 90 s,
    #: ours (DESIGN.md) 10 s, so this leaves time for the interpreter to exit.
    stop_budget_secs: float = 6.0
    listener_stop_secs: float = 4.0


# --------------------------------------------------------------------------- keys


def data_key(cfg: AgentConfig) -> bytes | None:
    """The buffer's data key (created on first use), or None with ``buffer.encrypt =
    false``.

    Raises:
        KeyFileError: the buffer exists without its key file (a new key could not read
            the records in it), or the key file is unsafe or malformed.
    """
    if not cfg.buffer.encrypt:
        return None
    data_dir = cfg.node.data_dir
    key_path = cfg.buffer_key_path
    if (data_dir / "buffer.db").exists() and not key_path.exists():
        raise KeyFileError(
            f"{key_path} is missing but {data_dir / 'buffer.db'} exists",
            hint="Restore buffer.key from backup; a new key cannot read the records.",
        )
    return init_data_key(key_path) if not key_path.exists() else load_data_key(key_path)


def open_buffer(cfg: AgentConfig, *, key: bytes | None = None) -> Buffer:
    """The buffer of this config, with its data key (``key``, else `data_key`).

    Raises:
        KeyFileError, StorageError: as `data_key` and `Buffer.open`.
    """
    return Buffer.open(
        cfg.node.data_dir,
        data_key=key if key is not None else data_key(cfg),
        max_bytes=cfg.buffer.max_bytes,
        retention_days=cfg.buffer.retention_days,
    )


def derive_log_key(cfg: AgentConfig, key: bytes | None) -> bytes:
    """The key of the short hashes logs show instead of patients: derived from the data
    key (one-way), else a per-install secret in ``data_dir/log.key`` (0600). Stable
    across restarts, so one patient hashes the same in every log line.

    Raises:
        KeyFileError: log.key is unsafe or malformed.
    """
    if key is not None:
        return hmac.new(key, _LOG_KEY_LABEL, hashlib.sha256).digest()
    path = cfg.node.data_dir / LOG_KEY_FILE
    return init_data_key(path) if not path.exists() else load_data_key(path)


# ---------------------------------------------------------------- service state


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process (status run as another user)
    except OSError:
        return False
    return True


def read_service_state(data_dir: Path, *, now: float | None = None) -> dict[str, Any] | None:
    """The service heartbeat (``agent.state.json``) for `status`, or None if the service
    never ran here. Adds ``service_running`` (the file says running, its process exists
    and the last tick is recent) and ``heartbeat_age_s``. Never raises: an unreadable
    file reads as ``{"service_running": False, "error": ...}``."""
    path = Path(data_dir) / STATE_FILE
    now = time.time() if now is None else now
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return {"service_running": False, "error": f"{path} unreadable: {type(e).__name__}"}
    tick = data.get("updated_at_unix")
    every = data.get("state_every_secs") or DEFAULT_STATE_EVERY_SECS
    age = now - tick if isinstance(tick, int | float) else None
    pid = data.get("pid")
    data["heartbeat_age_s"] = None if age is None else round(age, 1)
    data["service_running"] = bool(
        data.get("running")
        and isinstance(pid, int)
        and _pid_alive(pid)
        and age is not None
        and age <= STALE_TICKS * float(every)
    )
    return data


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# ------------------------------------------------------------------- adapters


def _error_view(e: BaseException, *, during: str, at: float) -> dict[str, Any]:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return {
        "at": utc_text(at),
        "during": during,
        "error": type(e).__name__,
        "message": telemetry.scrub(text)[:300],
        "hint": getattr(e, "hint", None),
    }


@dataclass(slots=True)
class _Slot:
    """One ``[[adapters]]`` entry and what became of it."""

    settings: AdapterSettings
    adapter: Adapter | None = None
    listening: bool = False
    polling: bool = False
    failures: int = 0
    failing_since: float | None = None
    next_retry_at: float | None = None
    last_ok: float | None = None
    last_error: dict[str, Any] | None = None
    last_poll: dict[str, Any] | None = None
    polls: int = 0

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def role(self) -> str:
        a = self.adapter
        if a is None:
            return "unknown"
        roles = [r for r, cls in (("listener", Listener), ("poller", Poller)) if isinstance(a, cls)]
        return "+".join(roles) or "unknown"


@dataclass(slots=True)
class _JobState:
    runs: int = 0
    last_run_at: float | None = None
    last_ok_at: float | None = None
    last_error: dict[str, Any] | None = None
    failures: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class _ObservedSink:
    """The buffer as adapters see it: counts what they commit (metrics) and notes a
    refused write (health). Everything else goes straight to the buffer."""

    def __init__(self, buffer: Buffer, runtime: Runtime) -> None:
        self._buffer = buffer
        self._runtime = runtime

    def put(
        self,
        records: Sequence[Record],
        *,
        cursor: Cursor | None = None,
        raw_ids: Iterable[int] = (),
    ) -> PutReport:
        try:
            report = self._buffer.put(records, cursor=cursor, raw_ids=raw_ids)
        except StorageError as e:
            self._runtime.note_storage(e)
            raise
        self._runtime.note_storage(None)
        if report.inserted:
            self._runtime.metrics.records_received(records, report.inserted)
        return report

    async def put_async(
        self,
        records: Sequence[Record],
        *,
        cursor: Cursor | None = None,
        raw_ids: Iterable[int] = (),
    ) -> PutReport:
        try:
            report = await self._buffer.put_async(records, cursor=cursor, raw_ids=raw_ids)
        except StorageError as e:
            self._runtime.note_storage(e)
            raise
        self._runtime.note_storage(None)
        if report.inserted:
            self._runtime.metrics.records_received(records, report.inserted)
        return report

    def put_raw(
        self, data: bytes, *, adapter: str, media_type: str, dedupe_key: str | None = None
    ) -> tuple[int, bool]:
        try:
            out = self._buffer.put_raw(
                data, adapter=adapter, media_type=media_type, dedupe_key=dedupe_key
            )
        except StorageError as e:
            self._runtime.note_storage(e)
            raise
        self._runtime.note_storage(None)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._buffer, name)


# ----------------------------------------------------------------------- runtime


class Runtime:
    """The running agent. `run_forever` for the service; `start`/`stop` for tests."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        build_adapter: AdapterBuilder = adapters.build,
        hub_transport: httpx.BaseTransport | None = None,
        timing: Timing = Timing(),
        log_stream: TextIO | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """Args beyond the obvious:
        build_adapter: the adapter factory (`adapters.build`); tests pass fakes.
        hub_transport: an httpx transport for the hub (tests: ``FakeHub``); None in
            production, so that proxies from the environment apply.
        log_stream: where log lines go (default stdout).
        rand: uniform [0, 1) for retry jitter.
        """
        self.cfg = cfg
        self.timing = timing
        self.metrics = telemetry.Metrics()
        self._build_adapter = build_adapter
        self._hub_transport = hub_transport
        self._log_stream = log_stream
        self._rand = rand
        self._failures = telemetry.FailureLog()
        self._slots: dict[str, _Slot] = {s.name: _Slot(s) for s in cfg.adapters if s.enabled}
        self._jobs: dict[str, _JobState] = {}
        self._lock = threading.RLock()  # slots and job states
        self.buffer: Buffer | None = None
        self.uploader: Uploader | None = None
        self._client: HubClient | None = None
        self._scheduler: Scheduler | None = None
        self._server: telemetry.TelemetryServer | None = None
        self._ctx: AdapterContext | None = None
        self._stats: Callable[[], BufferStats | None] = lambda: None
        self._started_at: float | None = None
        self._stop_requested = threading.Event()  # a signal arrived, or request_stop()
        self._stopping = threading.Event()  # stop() began: intake is closing
        self._stop_lock = threading.Lock()
        self._stopped = False
        self._signal: int | None = None
        # sync wake-ups (see wake_sync)
        self._wake_lock = threading.Lock()
        self._sync_running = False
        self._wake_pending = False
        self._dirty = False
        self._backoff_until: float | None = None
        self._last_heartbeat = 0.0
        self._reconcile_due = False
        # health inputs
        self._storage_error: tuple[float, str] | None = None
        self._state_error: str | None = None
        self._last_tick: float | None = None
        self._state_lock = threading.Lock()
        self._final_state_written = False

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Build and start everything. On failure, what was started is stopped again.

        Raises:
            KeyFileError: the node key is missing or readable by others; the data key
                is missing beside an existing buffer.
            StorageError: the buffer cannot be opened.
            ConfigError: the hub's TLS files, or ``telemetry.listen`` cannot be bound.
        """
        cfg = self.cfg
        telemetry.configure(cfg.telemetry, stream=self._log_stream)
        self._started_at = time.time()
        log.info(
            "Starting sepas-agent %s as node %s (%d adapters).",
            __version__,
            cfg.node.id,
            len(self._slots),
            extra={"event": "runtime.starting", "pid": os.getpid()},
        )
        try:
            self._start()
        except BaseException:
            self._teardown()
            raise

    def _start(self) -> None:
        cfg = self.cfg
        key = data_key(cfg)
        signing_key = load_private_key(cfg.node.key_path)
        log_key = derive_log_key(cfg, key)
        telemetry.set_hash_key(log_key)
        self.buffer = buffer = open_buffer(cfg, key=key)
        data_dir = cfg.node.data_dir
        self._stats = telemetry.CachedStats(lambda: open_stats(data_dir), ttl=5.0)
        self.metrics.watch_buffer(self._stats, max_bytes=cfg.buffer.max_bytes)
        self._client, self.uploader = build_uploader(
            cfg,
            buffer,
            signing_key,
            transport=self._hub_transport,
            sleep=self._sleep,
            adapters=self._heartbeat_adapters,
        )
        self.uploader.observer = self.metrics
        last = buffer.sync_state().get("last_success_at")
        if isinstance(last, int | float):
            self.metrics.last_success(last)  # from the previous run, until this one syncs
        self._server = telemetry.TelemetryServer(
            cfg.telemetry.listen, metrics=self.metrics, health=self.health
        )
        self._server.start()
        host, port = self._server.address
        log.info(
            "Serving /healthz and /metrics on %s:%d.",
            host,
            port,
            extra={"event": "runtime.telemetry_listening"},
        )
        self._ctx = AdapterContext(
            node_id=cfg.node.id,
            sink=_ObservedSink(buffer, self),
            log_key=log_key,
            on_committed=self.wake_sync,
        )
        # Workers: the core jobs, and per adapter a poll and a start retry.
        self._scheduler = sched = Scheduler(max_workers=5 + 2 * len(self._slots))
        t = self.timing
        now = time.time()
        sched.add_interval("sync", self._sync_job, every_secs=t.sync_every_secs, first_at=now)
        sched.add_interval("state", self._state_job, every_secs=t.state_every_secs, first_at=now)
        sched.add_interval(
            "prune",
            self._prune_job,
            every_secs=t.prune_every_secs,
            first_at=now + t.prune_first_secs,
        )
        sched.add_interval(
            "reconcile",
            self._reconcile_job,
            every_secs=t.reconcile_every_secs,
            first_at=now + t.reconcile_first_secs,
        )
        sched.start()
        for slot in self._slots.values():
            self._bring_up(slot)
        self._state_job()
        log.info(
            "Started: %d listening, %d polling, %d failing (retried).",
            sum(s.listening for s in self._slots.values()),
            sum(s.polling for s in self._slots.values()),
            sum(s.failures > 0 for s in self._slots.values()),
            extra={"event": "runtime.started"},
        )

    def run_forever(self, *, install_signals: bool = True) -> int:
        """Start, run until SIGTERM/SIGINT (or `request_stop`), stop. Returns the exit
        code: 0 after a clean stop, 2 for a config error, 1 for any other failure to
        start (logged with its hint)."""
        previous: dict[int, Any] = {}
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            try:
                self.start()
            except SepasError as e:
                log.error(
                    "Cannot start: %s %s",
                    e,
                    e.hint,
                    extra={"event": "runtime.start_failed", "error": type(e).__name__},
                )
                return 2 if isinstance(e, ConfigError) else 1
            while not self._stop_requested.wait(0.5):
                pass
            if self._signal is not None:
                log.info(
                    "Received %s.",
                    signal.Signals(self._signal).name,
                    extra={"event": "runtime.signal"},
                )
            self.stop()
            return 0
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # No logging here: the interrupted code may hold the logging lock.
        self._signal = signum
        self._stop_requested.set()

    def request_stop(self) -> None:
        """Make `run_forever` stop (thread-safe)."""
        self._stop_requested.set()

    def stop(self) -> None:
        """Stop intake, finish or give back what is in flight, close. Idempotent; returns
        within `Timing.stop_budget_secs` (plus a little for closing files)."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        t0 = time.monotonic()
        budget_end = t0 + self.timing.stop_budget_secs
        self._stopping.set()
        self._stop_requested.set()
        log.info("Stopping: intake first.", extra={"event": "runtime.stopping"})
        sched = self._scheduler
        if sched is not None:
            sched.pause()
        self._stop_listeners()
        if sched is not None:
            for slot in self._slots.values():
                sched.remove(f"poll:{slot.name}")
                sched.remove(f"start:{slot.name}")
        if self.uploader is not None:
            self.uploader.request_stop()
        idle = True
        if sched is not None:
            idle = sched.wait_idle(max(0.0, budget_end - 0.5 - time.monotonic()))
        stuck = sched.running_jobs() if sched is not None else []
        if "sync" in stuck and self.uploader is not None and self.buffer is not None:
            try:
                n = self.uploader.release_unsettled()
            except StorageError:
                n = 0
            log.warning(
                "The hub did not answer before the stop deadline; %d records were given "
                "back and will be sent after the restart.",
                n,
                extra={"event": "runtime.upload_abandoned", "count": n},
            )
        if stuck:
            log.warning(
                "Jobs still running at the stop deadline: %s; what they committed is safe.",
                ", ".join(stuck),
                extra={"event": "runtime.jobs_abandoned"},
            )
        if sched is not None:
            sched.shutdown()
        self._close_adapters(stuck)
        with contextlib.suppress(Exception):
            self.write_state(running=False)
        self._teardown(client_busy="sync" in stuck)
        log.info(
            "Stopped in %.1f s%s.",
            time.monotonic() - t0,
            "" if idle else " (some work abandoned, nothing lost)",
            extra={"event": "runtime.stopped"},
        )

    def _stop_listeners(self) -> None:
        slots = [s for s in self._slots.values() if s.listening and s.adapter is not None]
        if not slots:
            return
        timeout = self.timing.listener_stop_secs

        def stop_one(slot: _Slot) -> None:
            adapter = slot.adapter
            if not isinstance(adapter, Listener):
                return
            try:
                adapter.stop(timeout_secs=timeout)
            except Exception as e:  # noqa: BLE001 - one listener must not keep others open
                log.warning(
                    "Adapter %s did not stop cleanly: %s",
                    slot.name,
                    type(e).__name__,
                    extra={"event": "adapter.stop_failed", "adapter": slot.name},
                )
            slot.listening = False

        threads = [
            threading.Thread(target=stop_one, args=(s,), name=f"stop-{s.name}", daemon=True)
            for s in slots
        ]
        for th in threads:
            th.start()
        end = time.monotonic() + timeout + 0.5
        for th in threads:
            th.join(max(0.0, end - time.monotonic()))

    def _close_adapters(self, busy: Sequence[str]) -> None:
        for slot in self._slots.values():
            close = getattr(slot.adapter, "close", None)
            if callable(close) and f"poll:{slot.name}" not in busy and not slot.listening:
                with contextlib.suppress(Exception):
                    close()

    def _teardown(self, *, client_busy: bool = False) -> None:
        """Close what `start` opened (also after a failed start)."""
        if self._scheduler is not None and not self._stopped:
            self._scheduler.shutdown()
        if self._client is not None and not client_busy:
            with contextlib.suppress(Exception):
                self._client.close()
        if self.buffer is not None:
            try:
                self.buffer.close()
            except StorageError as e:
                log.error(
                    "Closing the buffer failed: %s",
                    e,
                    extra={"event": "runtime.buffer_close_failed", "error": type(e).__name__},
                )
        if self._server is not None:
            self._server.stop()

    def _sleep(self, secs: float) -> None:
        """The uploader's waits: cut short by a stop."""
        self._stopping.wait(max(0.0, secs))

    @property
    def telemetry_address(self) -> tuple[str, int]:
        """Where /healthz and /metrics are served (the real port for ``:0``)."""
        if self._server is None:
            raise RuntimeError("the runtime is not started")
        return self._server.address

    # -- adapters -----------------------------------------------------------------------

    def _bring_up(self, slot: _Slot) -> None:
        """Build the adapter if needed, start it if it listens, schedule it if it polls;
        on failure, retry later."""
        if self._stopping.is_set():
            return
        sched, ctx = self._scheduler, self._ctx
        if sched is None or ctx is None:
            return
        try:
            if slot.adapter is None:
                slot.adapter = self._build_adapter(slot.settings, ctx)
                telemetry.tame_pynetdicom()
            adapter = slot.adapter
            is_listener, is_poller = isinstance(adapter, Listener), isinstance(adapter, Poller)
            if not (is_listener or is_poller):
                raise TypeError(f"{type(adapter).__name__} is neither a Listener nor a Poller")
            if isinstance(adapter, Listener) and not slot.listening:
                adapter.start()
                slot.listening = True
            if is_poller and not slot.polling:
                trigger, grace = poll_trigger(slot.settings)
                sched.add_trigger(
                    f"poll:{slot.name}",
                    lambda: self._poll_job(slot),
                    trigger,
                    first_at=time.time(),
                    grace_secs=grace,
                )
                slot.polling = True
        except Exception as e:  # noqa: BLE001 - supervision: report, retry, go on
            delay = self._adapter_failed(slot, "start", e)
            sched.add_once(
                f"start:{slot.name}", lambda: self._bring_up(slot), at=time.time() + delay
            )
            return
        self._adapter_ok(slot, "start")

    def _poll_job(self, slot: _Slot) -> None:
        adapter = slot.adapter
        if self._stopping.is_set() or not isinstance(adapter, Poller):
            return
        started = time.time()
        try:
            report = adapter.poll()
        except Exception as e:  # noqa: BLE001 - supervision: report, back off, go on
            delay = self._adapter_failed(slot, "poll", e)
            if self._scheduler is not None:
                self._scheduler.run_at(f"poll:{slot.name}", time.time() + delay)
            self._state_job()
            return
        with self._lock:
            slot.polls += 1
            slot.last_poll = _poll_view(report, started, time.time())
        self._adapter_ok(slot, "poll")
        self._state_job()  # `status` shows a poll as soon as it ended

    def _adapter_failed(self, slot: _Slot, during: str, e: Exception) -> float:
        now = time.time()
        with self._lock:
            slot.failures += 1
            if slot.failing_since is None:
                slot.failing_since = now
            delay = backoff_delay(
                slot.failures,
                base=self.timing.retry_base_secs,
                cap=self.timing.retry_max_secs,
                rand=self._rand,
            )
            slot.next_retry_at = now + delay
            slot.last_error = _error_view(e, during=during, at=now)
        self.metrics.adapter_error(slot.name, e)
        self.metrics.adapter_up(slot.name, False)
        if self._stopping.is_set():
            log.info(
                "Adapter %s: %s interrupted by the stop (%s).",
                slot.name,
                during,
                type(e).__name__,
                extra={"event": f"adapter.{during}_interrupted", "adapter": slot.name},
            )
            return delay
        transient = getattr(e, "transient", False)
        known = isinstance(e, SepasError)
        self._failures.failed(
            log,
            f"adapter:{slot.name}",
            "Adapter %s failed to %s (%s: %s); retrying in %.0f s. %s",
            slot.name,
            during,
            type(e).__name__,
            slot.last_error["message"] if slot.last_error else "",
            delay,
            getattr(e, "hint", "") if known else "This is a bug; please report it.",
            event=f"adapter.{during}_failed",
            error=e,
            level=logging.WARNING if transient else logging.ERROR,
            adapter=slot.name,
        )
        if not known:
            log.debug("Traceback of the failure above.", exc_info=e, extra={"adapter": slot.name})
        return delay

    def _adapter_ok(self, slot: _Slot, during: str) -> None:
        with self._lock:
            slot.last_ok = time.time()
            was_failing = slot.failures > 0
            slot.failures = 0
            slot.failing_since = None
            slot.next_retry_at = None
        self.metrics.adapter_up(slot.name, True)
        if was_failing:
            self._failures.succeeded(
                log,
                f"adapter:{slot.name}",
                f"Adapter {slot.name} recovered ({during}) after %d failures.",
                event="adapter.recovered",
                adapter=slot.name,
            )

    def _heartbeat_adapters(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "name": s.name,
                    "kind": s.settings.kind,
                    "last_ok": utc_text(s.last_ok),
                    "last_error": None
                    if s.last_error is None or s.failures == 0
                    else f"{s.last_error['error']}: {s.last_error['message']}"[:300],
                }
                for s in self._slots.values()
            ]

    # -- sync -----------------------------------------------------------------------------

    def wake_sync(self) -> None:
        """``AdapterContext.on_committed``: new records are in the buffer; sync soon.

        Debounced: while a wake is pending or a sync runs, further calls only mark the
        buffer dirty (a running sync then goes round again). Never raises."""
        try:
            with self._wake_lock:
                self._dirty = True
                if self._sync_running or self._wake_pending or self._stopping.is_set():
                    return
                until = self._backoff_until
                if until is not None and time.time() < until:
                    return  # the hub asked us to wait; the records wait with the rest
                self._wake_pending = True
            sched = self._scheduler
            if sched is None or not sched.run_at(
                "sync", time.time() + self.timing.wake_debounce_secs
            ):
                with self._wake_lock:
                    self._wake_pending = False
        except Exception:  # noqa: BLE001 - an observer never breaks the intake
            log.warning("Could not wake the sync job.", extra={"event": "runtime.wake_failed"})

    def _sync_job(self) -> None:
        if self.uploader is None:
            return
        with self._wake_lock:
            self._sync_running = True
            self._wake_pending = False
            self._dirty = False
        try:
            while not self._stopping.is_set():
                report = self._sync_pass()
                if report is None:
                    return
                if (
                    self._reconcile_due
                    and report.stopped == "drained"
                    and report.hub_reached
                    and not report.auth_refused
                ):
                    self._reconcile_due = False
                    if self._reconcile() > 0:
                        continue
                with self._wake_lock:
                    more = report.stopped == "deadline" or (
                        self._dirty and report.stopped == "drained"
                    )
                    self._dirty = False
                    if not more:
                        self._sync_running = False
                        return
        finally:
            with self._wake_lock:
                self._sync_running = False

    def _sync_pass(self) -> SyncReport | None:
        uploader = self.uploader
        if uploader is None:
            return None
        now = time.time()
        uploader.heartbeat_enabled = now - self._last_heartbeat >= self.timing.heartbeat_every_secs
        self._job_started("sync", now)
        try:
            report = uploader.sync_once(deadline=now + self.timing.sync_pass_max_secs)
        except Exception as e:  # noqa: BLE001 - recorded; the job runs again
            if isinstance(e, StorageError):
                self.note_storage(e)
            self._job_failed("sync", e)
            return None
        if report.heartbeat_sent:
            self._last_heartbeat = report.finished_at
        self._backoff_until = report.backoff_until
        skew = self._client.last_skew if self._client is not None else None
        ok = report.error is None and report.stopped != "backing-off"
        self.metrics.sync_finished(
            stopped=report.stopped, ok=ok, at=report.finished_at, clock_skew_s=skew
        )
        self._job_ok(
            "sync",
            stopped=report.stopped,
            sent=report.sent,
            duplicate=report.duplicate,
            rejected=report.rejected,
            retried=report.retried,
        )
        return report

    def _reconcile_job(self) -> None:
        self._reconcile_due = True
        self.wake_sync()

    def _reconcile(self) -> int:
        """Runs inside the sync job: the HubClient is not for concurrent use."""
        if self.buffer is None or self._client is None:
            return 0
        self._job_started("reconcile", time.time())
        try:
            rep = reconcile(
                self.buffer,
                self._client,
                days=self.timing.reconcile_days,
                retention_days=self.cfg.buffer.retention_days,
            )
        except Exception as e:  # noqa: BLE001 - recorded; tried again in 6 h
            self._job_failed("reconcile", e)
            return 0
        self._job_ok("reconcile", requeued=rep.requeued)
        return rep.requeued

    # -- housekeeping ---------------------------------------------------------------------

    def _prune_job(self) -> None:
        if self.buffer is None or self._stopping.is_set():
            return
        self._job_started("prune", time.time())
        try:
            rep = self.buffer.prune()
        except Exception as e:  # noqa: BLE001 - recorded; the job runs again
            self._job_failed("prune", e)
            return
        self._job_ok("prune", records=rep.records, blobs=rep.blobs)
        if rep.records or rep.blobs:
            log.info(
                "Pruned %d delivered records and %d blobs past retention.",
                rep.records,
                rep.blobs,
                extra={"event": "buffer.pruned", "count": rep.records},
            )

    def _state_job(self) -> None:
        self._job_started("state", time.time())
        try:
            self.write_state()
        except Exception as e:  # noqa: BLE001 - recorded; /healthz reports it
            self._state_error = f"{type(e).__name__}: {telemetry.scrub(str(e))[:200]}"
            self._job_failed("state", e)
            return
        self._state_error = None
        self._job_ok("state")

    def _job_started(self, name: str, at: float) -> None:
        with self._lock:
            job = self._jobs.setdefault(name, _JobState())
            job.runs += 1
            job.last_run_at = at

    def _job_ok(self, name: str, **extra: Any) -> None:
        with self._lock:
            job = self._jobs.setdefault(name, _JobState())
            job.last_ok_at = time.time()
            job.failures = 0
            job.extra = extra
        self._failures.succeeded(
            log,
            f"job:{name}",
            f"The {name} job works again after %d failures.",
            event="runtime.job_recovered",
            job=name,
        )

    def _job_failed(self, name: str, e: Exception) -> None:
        with self._lock:
            job = self._jobs.setdefault(name, _JobState())
            job.failures += 1
            job.last_error = _error_view(e, during=name, at=time.time())
        known = isinstance(e, SepasError)
        self._failures.failed(
            log,
            f"job:{name}",
            "The %s job failed (%s: %s). %s",
            name,
            type(e).__name__,
            telemetry.scrub(str(e).splitlines()[0] if str(e) else "")[:300],
            getattr(e, "hint", "") if known else "This is a bug; please report it.",
            event=f"runtime.{name}_failed",
            error=e,
            level=logging.ERROR,
            job=name,
        )
        if not known:
            log.debug("Traceback of the failure above.", exc_info=e, extra={"job": name})

    def note_storage(self, error: StorageError | None) -> None:
        """A buffer write failed (``error``) or worked (None): an input of /healthz."""
        if error is None:
            if self._storage_error is not None:
                self._storage_error = None
            return
        self._storage_error = (time.time(), type(error).__name__)

    # -- health and state -----------------------------------------------------------------

    def health(self) -> telemetry.Health:
        """What /healthz answers: failing when the scheduler is not running, the buffer
        refuses writes (or is full), or an adapter has failed for longer than
        `Timing.unhealthy_after_secs`."""
        now = time.time()
        reasons: list[str] = []
        sched = self._scheduler
        if self._stopping.is_set():
            reasons.append("the agent is stopping")
        elif sched is None or not sched.running:
            reasons.append("the scheduler is not running")
        elif self._last_tick is not None and now - self._last_tick > STALE_TICKS * max(
            self.timing.state_every_secs, 1.0
        ):
            reasons.append(f"the scheduler has not run its jobs for {now - self._last_tick:.0f} s")
        err = self._storage_error
        if err is not None and now - err[0] <= self.timing.storage_error_secs:
            reasons.append(f"the buffer refused a write {now - err[0]:.0f} s ago ({err[1]})")
        if self._state_error is not None:
            reasons.append(f"cannot write {STATE_FILE}: {self._state_error}")
        buffer: dict[str, Any] | None = None
        try:
            stats = self._stats()
        except Exception as e:  # noqa: BLE001 - reported as a reason
            reasons.append(f"the buffer cannot be read ({type(e).__name__})")
            stats = None
        if stats is not None:
            pending = stats.total("pending") + stats.total("inflight")
            buffer = {
                "used_bytes": stats.used_bytes,
                "max_bytes": self.cfg.buffer.max_bytes,
                "pending": pending,
                "oldest_pending_age_s": None
                if stats.oldest_pending_at is None
                else round(max(0.0, now - stats.oldest_pending_at), 1),
            }
            if stats.used_bytes >= self.cfg.buffer.max_bytes:
                reasons.append("the buffer is full: intake is refused")
        adapters_view: dict[str, str] = {}
        with self._lock:
            for slot in self._slots.values():
                state = _slot_state(slot)
                adapters_view[slot.name] = state
                since = slot.failing_since
                if since is not None and now - since >= self.timing.unhealthy_after_secs:
                    error = slot.last_error["error"] if slot.last_error else "?"
                    reasons.append(
                        f"adapter {slot.name} has failed for {now - since:.0f} s ({error})"
                    )
        detail = {
            "reasons": reasons,
            "node_id": self.cfg.node.id,
            "version": __version__,
            "uptime_s": None if self._started_at is None else round(now - self._started_at, 1),
            "adapters": adapters_view,
            "buffer": buffer,
        }
        return telemetry.Health(ok=not reasons, detail=detail)

    def state(self, *, running: bool = True) -> dict[str, Any]:
        """What ``agent.state.json`` holds."""
        now = time.time()
        try:
            stats = self._stats()
        except Exception:  # noqa: BLE001 - the state is written without the cursors then
            stats = None
        cursors = stats.cursors if stats is not None else {}
        health = self.health()
        with self._lock:
            adapters_view = {
                slot.name: {
                    "kind": slot.settings.kind,
                    "role": slot.role,
                    "state": _slot_state(slot),
                    "last_ok": utc_text(slot.last_ok),
                    "last_error": slot.last_error,
                    "consecutive_failures": slot.failures,
                    "failing_since": utc_text(slot.failing_since),
                    "next_retry_at": utc_text(slot.next_retry_at),
                    "polls": slot.polls,
                    "last_poll": slot.last_poll,
                    "cursor": None
                    if slot.name not in cursors
                    else {
                        "value": telemetry.scrub(str(cursors[slot.name][0]))[:200],
                        "updated_at": utc_text(cursors[slot.name][1]),
                    },
                }
                for slot in self._slots.values()
            }
            jobs = {
                name: {
                    "runs": job.runs,
                    "last_run_at": utc_text(job.last_run_at),
                    "last_ok_at": utc_text(job.last_ok_at),
                    "consecutive_failures": job.failures,
                    "last_error": job.last_error,
                    **job.extra,
                }
                for name, job in sorted(self._jobs.items())
            }
        address: str | None = None
        if self._server is not None:
            with contextlib.suppress(RuntimeError):
                host, port = self._server.address
                address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return {
            "format": STATE_FORMAT,
            "pid": os.getpid(),
            "node_id": self.cfg.node.id,
            "version": __version__,
            "running": running,
            "stopping": self._stopping.is_set(),
            "started_at": utc_text(self._started_at),
            "updated_at": utc_text(now),
            "updated_at_unix": round(now, 3),
            "stopped_at": None if running else utc_text(now),
            "state_every_secs": self.timing.state_every_secs,
            "telemetry_listen": address,
            "health": {"ok": health.ok, "reasons": list(health.detail["reasons"])},
            "adapters": adapters_view,
            "jobs": jobs,
        }

    def write_state(self, *, running: bool = True) -> None:
        """Rewrite ``data_dir/agent.state.json`` atomically (the service heartbeat).

        Raises:
            OSError: the file cannot be written.
        """
        with self._state_lock:
            if self._final_state_written:
                return  # the stop wrote the last word; a late tick must not undo it
            self._last_tick = time.time()
            data = json.dumps(self.state(running=running), ensure_ascii=False, indent=1)
            _write_atomically(self.cfg.node.data_dir / STATE_FILE, data.encode("utf-8"))
            self._final_state_written = not running

    # -- introspection (tests, status) ----------------------------------------------------

    def adapter(self, name: str) -> Adapter | None:
        """The adapter built for ``[[adapters]] name``, if it was built."""
        slot = self._slots.get(name)
        return None if slot is None else slot.adapter


def _slot_state(slot: _Slot) -> str:
    if slot.failures:
        return "failing"
    if slot.listening or slot.polling:
        return "running"
    return "stopped" if slot.adapter is not None else "starting"


def _poll_view(report: PollReport, started: float, finished: float) -> dict[str, Any]:
    return {
        "at": utc_text(finished),
        "secs": round(finished - started, 3),
        "found": report.found,
        "new": report.new,
        "duplicates": report.duplicates,
        "quarantined": report.quarantined,
        "complete": report.complete,
        "cursor": None if report.cursor is None else telemetry.scrub(report.cursor)[:200],
        "notes": [telemetry.scrub(n)[:300] for n in report.notes[:5]],
    }
