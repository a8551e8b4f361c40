"""Logs, metrics and the /healthz + /metrics listener of `sepas-agent run`.

Responsibility: one `configure` that makes every log line of the process safe and
useful (JSON lines for journald, plain text on a terminal), a `Metrics` facade the
rest of the agent calls without importing prometheus-client, and `TelemetryServer`,
the only HTTP server the agent itself runs.

Logging (STYLE.md 3.7):
- JSON lines (``ts``, ``level``, ``logger``, ``event``, ``msg``, then the call's
  extras) when ``log_format = "json"``, or ``"auto"`` and the stream is not a
  terminal; plain text on a terminal.
- `PhiGuard`: defence in depth, since call sites must already keep patient data out.
  Anything that looks like a national code (10 digits, ASCII, Persian or
  Arabic-Indic, or written ``ddd-dddddd-d``) in a message, its arguments, its extras
  or a traceback is replaced by ``nc:<12 hex>``, the keyed hash `set_hash_key`
  configures (the same recipe as `AdapterContext.patient_hash`, so both hashes of one
  patient agree). A side effect: a 10-digit Unix time written into a message is
  hashed too; write times as RFC 3339 text.
- `RepeatLimiter`: a warning or error that repeats (same event, same error type) is
  logged once per minute, the next line carrying ``suppressed`` (how many were
  dropped). `FailureLog` adds the INFO line on recovery with the failure count.
- Third-party loggers are tamed: ``pynetdicom`` (and its identifier logging) and
  ``httpx``/``httpcore`` at WARNING, ``apscheduler`` at ERROR (its warnings are about
  runs skipped by design: ``max_instances=1`` and coalescing; job bodies record their
  own outcome).

Metrics: names ``sepas_<area>_<noun>_<unit>[_total]`` on a dedicated registry; label
values are bounded (`_BoundedLabel`): at most `MAX_LABEL_VALUES` per label, then
``other``. Observer calls never raise into the pipeline (pynetdicom's notification
rule): their exceptions are logged.

Never: log a request body, a record, or a patient; serve anything but /healthz and
/metrics.
"""

from __future__ import annotations

import functools
import http.server
import json
import logging
import re
import secrets
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol, TextIO, TypeVar, cast

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent import __version__
from agent.config import TelemetrySettings, split_host_port
from agent.errors import ConfigError, ConfigProblem
from agent.nationalcode import short_hash
from agent.persian import ascii_digits

__all__ = [
    "MAX_LABEL_VALUES",
    "CachedStats",
    "FailureLog",
    "Health",
    "JsonFormatter",
    "Metrics",
    "PhiGuard",
    "RepeatLimiter",
    "StatsSource",
    "TelemetryServer",
    "TextFormatter",
    "configure",
    "scrub",
    "set_hash_key",
    "tame_pynetdicom",
    "unconfigure",
]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

#: One line per (event, error type) per this many seconds.
REPEAT_WINDOW_SECS: Final = 60.0
#: Distinct values a metric label may take before further ones read ``other``.
MAX_LABEL_VALUES: Final = 64
#: Concurrent requests the telemetry listener serves; more are answered 503.
MAX_CONCURRENT_REQUESTS: Final = 8
#: Seconds a telemetry client may take to send its request.
REQUEST_TIMEOUT_SECS: Final = 5.0
#: Upload latency buckets (seconds): a batch takes tens of ms on a LAN, seconds on a
#: slow provincial link; the hub's timeout is 30 s by default.
LATENCY_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_THIRD_PARTY_LEVELS: Final = {
    "pynetdicom": logging.WARNING,
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    "apscheduler": logging.ERROR,
}

# ------------------------------------------------------------------------ PHI guard

_D: Final = "0-9\u06f0-\u06f9\u0660-\u0669"  # ASCII, Persian, Arabic-Indic digits
#: A national code: 10 digits (or ddd-dddddd-d) not inside a longer word or number.
_NATIONAL_CODE_RE: Final = re.compile(
    rf"(?<![A-Za-z{_D}])(?:[{_D}]{{10}}|[{_D}]{{3}}-[{_D}]{{6}}-[{_D}])(?![A-Za-z{_D}])"
)

_hash_key: bytes = secrets.token_bytes(32)  # until set_hash_key: unlinkable across runs


def set_hash_key(key: bytes) -> None:
    """The key of the guard's hashes: the runtime's log key (`AdapterContext.log_key`),
    so the guard's hash of a national code equals the adapters' `patient_hash` of it."""
    global _hash_key
    if not key:
        raise ValueError("the log hash key must not be empty")
    _hash_key = bytes(key)


def _hash_match(m: re.Match[str]) -> str:
    code = ascii_digits(m.group(0)).replace("-", "")
    return "nc:" + short_hash(code, _hash_key)


def scrub(text: str) -> str:
    """``text`` with every national-code-like number replaced by its keyed hash."""
    if not any(c.isdigit() for c in text):
        return text
    return _NATIONAL_CODE_RE.sub(_hash_match, text)


def _scrub_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if depth > 4:
        return value
    if isinstance(value, Mapping):
        return {k: _scrub_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_value(v, depth + 1) for v in value]
    return value


#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS: Final = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))
) | {"message", "asctime", "taskName", "suppressed"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class PhiGuard(logging.Filter):
    """Hashes national-code-like numbers in the message, its arguments, its extras and
    its traceback. Attach it to a handler (filters on a handler see every record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string must not lose the line
            message = str(record.msg)
        record.msg = scrub(message)
        record.args = None
        for key, value in _extras(record).items():
            if isinstance(value, str | Mapping | list | tuple):
                setattr(record, key, _scrub_value(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


# --------------------------------------------------------------------- repetition


class RepeatLimiter(logging.Filter):
    """At most one warning-or-worse line per (event, error type) per window; the next
    line of that kind carries ``suppressed``: how many were dropped meanwhile."""

    def __init__(
        self,
        window_secs: float = REPEAT_WINDOW_SECS,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        super().__init__()
        self.window_secs = window_secs
        self._clock = clock
        self._max_keys = max_keys
        self._seen: OrderedDict[tuple[str, str], list[float]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(record: logging.LogRecord) -> tuple[str, str]:
        event = getattr(record, "event", None) or f"{record.name}:{record.msg}"
        error = getattr(record, "error", None)
        if error is None and record.exc_info and record.exc_info[0] is not None:
            error = record.exc_info[0].__name__
        return str(event), str(error or "")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = self.key(record)
        now = self._clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.window_secs:
                entry[1] += 1
                return False
            if entry is not None and entry[1]:
                record.suppressed = int(entry[1])
            self._seen[key] = [now, 0]
            self._seen.move_to_end(key)
            while len(self._seen) > self._max_keys:
                self._seen.popitem(last=False)
        return True


class FailureLog:
    """Failure streaks per key (an adapter, a job): each failure goes to the log (where
    `RepeatLimiter` keeps one line a minute), and the first success after a streak logs
    one INFO line with the number of failures (Litestream's ``monitor()``)."""

    def __init__(self) -> None:
        self._streaks: dict[str, int] = {}
        self._lock = threading.Lock()

    def failed(
        self,
        logger: logging.Logger,
        key: str,
        message: str,
        *args: object,
        event: str,
        error: BaseException,
        level: int = logging.WARNING,
        **extra: object,
    ) -> int:
        """Log a failure of ``key``; returns the streak's length."""
        with self._lock:
            n = self._streaks.get(key, 0) + 1
            self._streaks[key] = n
        logger.log(
            level,
            message,
            *args,
            extra={"event": event, "error": type(error).__name__, "failures": n, **extra},
        )
        return n

    def succeeded(
        self, logger: logging.Logger, key: str, message: str, *, event: str, **extra: object
    ) -> int:
        """Note a success; logs ``message`` (with ``%d`` for the count) only after a streak."""
        with self._lock:
            n = self._streaks.pop(key, 0)
        if n:
            logger.info(message, n, extra={"event": event, "failures": n, **extra})
        return n

    def streak(self, key: str) -> int:
        with self._lock:
            return self._streaks.get(key, 0)


# ------------------------------------------------------------------------ formats


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _plain(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, msg, then the extras."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None),
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            if key not in doc:
                doc[key] = _plain(value)
        suppressed = getattr(record, "suppressed", None)
        if suppressed:
            doc["suppressed"] = suppressed
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = record.stack_info
        return json.dumps(doc, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``HH:MM:SS LEVEL logger: message [event key=value …]`` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).astimezone().strftime("%H:%M:%S")
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        extras = _extras(record)
        event = extras.pop("event", None)
        suppressed = getattr(record, "suppressed", None)
        if suppressed:
            extras["suppressed"] = suppressed
        tail = " ".join(f"{k}={v}" for k, v in extras.items() if v is not None)
        if event or tail:
            line += f"  [{' '.join(x for x in (str(event or ''), tail) if x)}]"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


# -------------------------------------------------------------------- configure

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _Installed:
    handler: logging.Handler | None = None
    excepthook: Callable[[threading.ExceptHookArgs], Any] | None = None
    root_level: int | None = None


_installed = _Installed()
_configure_lock = threading.Lock()


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def configure(
    settings: TelemetrySettings, *, stream: TextIO | None = None, hash_key: bytes | None = None
) -> logging.Handler:
    """Install the process's one log handler on the root logger (replacing one an
    earlier call installed; handlers others added are left alone), with `PhiGuard`
    and `RepeatLimiter`; set levels; tame third-party loggers; log uncaught thread
    exceptions through it. Returns the handler."""
    stream = stream if stream is not None else sys.stdout
    if hash_key is not None:
        set_hash_key(hash_key)
    use_json = settings.log_format == "json" or (
        settings.log_format == "auto" and not _is_tty(stream)
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.addFilter(RepeatLimiter())
    handler.addFilter(PhiGuard())
    root = logging.getLogger()
    with _configure_lock:
        if _installed.handler is not None:
            root.removeHandler(_installed.handler)
        else:
            _installed.root_level = root.level
            _installed.excepthook = threading.excepthook
        _installed.handler = handler
        root.addHandler(handler)
        root.setLevel(_LEVELS[settings.log_level])
        for name, level in _THIRD_PARTY_LEVELS.items():
            logging.getLogger(name).setLevel(level)
        tame_pynetdicom()
        threading.excepthook = _log_thread_exception
    return handler


def unconfigure() -> None:
    """Undo `configure` (tests): remove the handler, restore the root level and hook."""
    with _configure_lock:
        if _installed.handler is None:
            return
        root = logging.getLogger()
        root.removeHandler(_installed.handler)
        if _installed.root_level is not None:
            root.setLevel(_installed.root_level)
        if _installed.excepthook is not None:
            threading.excepthook = _installed.excepthook
        _installed.handler = None


def tame_pynetdicom() -> None:
    """Turn pynetdicom's identifier logging off (it logs C-FIND identifiers, i.e.
    patient names and ids, at INFO by default). Imports nothing: call again after
    the dicom adapter was built, when pynetdicom is loaded."""
    module = sys.modules.get("pynetdicom._config")
    if module is None and "pynetdicom" in sys.modules:
        import pynetdicom._config as module
    if module is not None:
        module.LOG_REQUEST_IDENTIFIERS = False  # type: ignore[attr-defined]
        module.LOG_RESPONSE_IDENTIFIERS = False  # type: ignore[attr-defined]


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("agent.thread").error(
        "Thread %s stopped on an unexpected error.",
        name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
        extra={"event": "thread.crashed", "error": args.exc_type.__name__},
    )


# ------------------------------------------------------------------------ metrics


class _BoundedLabel:
    """A label's values: safe characters only, and at most ``limit`` distinct ones."""

    _SAFE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: object) -> str:
        text = str(value)
        if not self._SAFE.fullmatch(text):
            return "other"
        with self._lock:
            if text in self._seen:
                return text
            if len(self._seen) >= self.limit:
                return "other"
            self._seen.add(text)
            return text


def _observer(fn: F) -> F:
    """Observer methods never raise into the pipeline: their errors are logged."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - notification rule (STYLE.md 3.5)
            log.warning(
                "A metrics observer failed (%s); the pipeline goes on.",
                type(e).__name__,
                extra={"event": "telemetry.observer_failed", "error": type(e).__name__},
            )
            return None

    return cast(F, wrapper)


class _Settled(Protocol):
    """What `Metrics.records_settled` reads of an uploader's batch item."""

    @property
    def service(self) -> str: ...
    @property
    def envelope(self) -> bytes: ...


class _HasRecordLabels(Protocol):
    @property
    def service(self) -> Any: ...
    @property
    def source(self) -> Any: ...


_SOURCE_ADAPTER: Final = b'"source":{"adapter":"'


def _adapter_of(envelope: bytes) -> str:
    """The adapter of a canonical record envelope, without parsing it: ``source`` is its
    last key and ``adapter`` the first key of ``source`` (sorted keys)."""
    at = envelope.rfind(_SOURCE_ADAPTER)
    if at < 0:
        return "unknown"
    start = at + len(_SOURCE_ADAPTER)
    end = envelope.find(b'"', start, start + 80)
    return envelope[start:end].decode("ascii", "replace") if end > 0 else "unknown"


class StatsSource(Protocol):
    """Where the buffer collector reads its numbers (at scrape time, cached)."""

    def __call__(self) -> Any: ...


class Metrics:
    """The agent's metrics, on a dedicated registry. Pass it around; callers need not
    import prometheus-client. Every method is an observer: it never raises.

    It implements the uploader's observer (`batch_answered`, `records_settled`).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._service = _BoundedLabel()
        self._adapter = _BoundedLabel()
        self._error = _BoundedLabel()
        self._status = _BoundedLabel()
        r = self.registry
        self.received = Counter(
            "sepas_records_received_total",
            "Records committed to the buffer for the first time, by service and adapter.",
            ["service", "adapter"],
            registry=r,
        )
        self.sent = Counter(
            "sepas_records_sent_total",
            "Records the hub confirmed (accepted, or duplicate: it had them already).",
            ["service", "adapter"],
            registry=r,
        )
        self.duplicate = Counter(
            "sepas_records_duplicate_total",
            "Records the hub answered as duplicate (included in sepas_records_sent_total).",
            ["service", "adapter"],
            registry=r,
        )
        self.rejected = Counter(
            "sepas_records_rejected_total",
            "Records the hub rejected; they are in the dead-letter store.",
            ["service", "adapter"],
            registry=r,
        )
        self.latency = Histogram(
            "sepas_upload_duration_seconds",
            "Time from sending a batch to the hub's answer.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.responses = Counter(
            "sepas_upload_responses_total",
            "Answers to batch uploads by HTTP status ('none': no answer, network error).",
            ["status"],
            registry=r,
        )
        self.adapter_errors = Counter(
            "sepas_adapter_errors_total",
            "Adapter failures (start, poll) by adapter and error class.",
            ["adapter", "error"],
            registry=r,
        )
        self.adapter_up_gauge = Gauge(
            "sepas_adapter_up",
            "1 when the adapter runs (last start/poll succeeded), else 0.",
            ["adapter"],
            registry=r,
        )
        self.skew = Gauge(
            "sepas_hub_clock_skew_seconds",
            "This node's clock minus the hub's, from the last answer's Date header.",
            registry=r,
        )
        self.last_sync = Gauge(
            "sepas_sync_last_success_timestamp_seconds",
            "Unix time of the last sync run that ended without an error.",
            registry=r,
        )
        self.sync_runs = Counter(
            "sepas_sync_runs_total",
            "Sync runs by how they ended (drained, deadline, backing-off, unreachable, ...).",
            ["stopped"],
            registry=r,
        )
        self.info = Gauge(
            "sepas_agent_info", "Constant 1, labelled with the version.", ["version"], registry=r
        )
        self.info.labels(__version__).set(1)
        self.started = Gauge(
            "sepas_agent_start_time_seconds", "Unix time the service started.", registry=r
        )
        self.started.set(time.time())

    # -- intake -----------------------------------------------------------------------

    @_observer
    def records_received(self, records: Sequence[_HasRecordLabels], inserted: int) -> None:
        """``inserted`` of ``records`` were new to the buffer (a put's report).

        When a put held duplicates beside new records, the new ones are counted in
        the order given (the buffer does not say which were new)."""
        left = inserted
        for rec in records:
            if left <= 0:
                break
            service = getattr(rec.service, "value", rec.service)
            self.received.labels(self._service(service), self._adapter(rec.source.adapter)).inc()
            left -= 1

    # -- upload (the uploader's observer) -----------------------------------------------

    @_observer
    def batch_answered(self, status: int | None, secs: float) -> None:
        self.responses.labels(self._status(status if status is not None else "none")).inc()
        if status is not None:
            self.latency.observe(max(0.0, secs))

    @_observer
    def records_settled(self, outcome: str, items: Iterable[_Settled]) -> None:
        """``outcome``: accepted, duplicate or rejected."""
        for item in items:
            labels = (self._service(item.service), self._adapter(_adapter_of(item.envelope)))
            if outcome == "rejected":
                self.rejected.labels(*labels).inc()
                continue
            self.sent.labels(*labels).inc()
            if outcome == "duplicate":
                self.duplicate.labels(*labels).inc()

    # -- the service ------------------------------------------------------------------

    @_observer
    def sync_finished(
        self, *, stopped: str, ok: bool, at: float, clock_skew_s: float | None
    ) -> None:
        self.sync_runs.labels(self._status(stopped)).inc()
        if ok:
            self.last_sync.set(at)
        if clock_skew_s is not None:
            self.skew.set(clock_skew_s)

    @_observer
    def last_success(self, at: float) -> None:
        """The last successful sync, as the sync state remembers it (at start)."""
        self.last_sync.set(at)

    @_observer
    def adapter_error(self, adapter: str, error: BaseException | str) -> None:
        name = error if isinstance(error, str) else type(error).__name__
        self.adapter_errors.labels(self._adapter(adapter), self._error(name)).inc()

    @_observer
    def adapter_up(self, adapter: str, up: bool) -> None:
        self.adapter_up_gauge.labels(self._adapter(adapter)).set(1 if up else 0)

    def watch_buffer(self, stats: StatsSource, *, max_bytes: int) -> None:
        """Expose the buffer's numbers, read by ``stats()`` (a `BufferStats` or None)
        when scraped."""
        self.registry.register(_BufferCollector(stats, max_bytes))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _BufferCollector(Collector):
    def __init__(self, stats: StatsSource, max_bytes: int) -> None:
        self._stats = stats
        self._max_bytes = max_bytes

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            stats = self._stats()
        except Exception as e:  # noqa: BLE001 - a scrape must not fail on the buffer
            log.warning(
                "Buffer numbers unavailable for /metrics: %s",
                type(e).__name__,
                extra={"event": "telemetry.stats_failed", "error": type(e).__name__},
            )
            return
        if stats is None:
            return
        yield GaugeMetricFamily(
            "sepas_buffer_used_bytes", "Live buffer bytes (records + blobs).", stats.used_bytes
        )
        yield GaugeMetricFamily(
            "sepas_buffer_capacity_bytes",
            "buffer.max_bytes: past it intake is refused.",
            self._max_bytes,
        )
        yield GaugeMetricFamily(
            "sepas_buffer_file_bytes", "buffer.db and its WAL on disk.", stats.file_bytes
        )
        by_state = GaugeMetricFamily(
            "sepas_buffer_records", "Records in the buffer by state.", labels=["state"]
        )
        totals: dict[str, int] = {"pending": 0, "inflight": 0, "sent": 0, "dead": 0}
        for (_service, state), n in stats.counts.items():
            totals[str(state)] = totals.get(str(state), 0) + n
        for state, n in sorted(totals.items()):
            by_state.add_metric([state], n)
        yield by_state
        yield GaugeMetricFamily(
            "sepas_buffer_pending_records",
            "Records not yet confirmed by the hub (pending + inflight).",
            totals.get("pending", 0) + totals.get("inflight", 0),
        )
        oldest = stats.oldest_pending_at
        yield GaugeMetricFamily(
            "sepas_buffer_oldest_pending_age_seconds",
            "Age of the oldest record not yet confirmed by the hub (0: none).",
            0.0 if oldest is None else max(0.0, time.time() - oldest),
        )
        yield GaugeMetricFamily(
            "sepas_buffer_quarantined_records",
            "Input that could not be parsed or mapped, waiting for an operator.",
            stats.quarantined,
        )
        yield GaugeMetricFamily(
            "sepas_buffer_unmapped_raw_records",
            "Raw input committed and not yet mapped into records.",
            stats.unmapped_raw,
        )


class CachedStats:
    """``read()`` at most every ``ttl`` seconds; thread-safe. Scrapes and the state file
    share it, so a busy Prometheus cannot make the agent read SQLite more often."""

    def __init__(
        self,
        read: Callable[[], Any],
        *,
        ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._at: float | None = None
        self._value: Any = None

    def __call__(self) -> Any:
        with self._lock:
            now = self._clock()
            if self._at is None or now - self._at >= self._ttl:
                self._value = self._read()
                self._at = now
            return self._value


# ------------------------------------------------------------------ the listener


@dataclass(frozen=True, slots=True)
class Health:
    """What /healthz answers: 200 when ``ok``, else 503; ``detail`` is the JSON body."""

    ok: bool
    detail: Mapping[str, Any]


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "sepas-agent"
    sys_version = ""
    timeout = REQUEST_TIMEOUT_SECS
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        server = cast(_Server, self.server)
        if not server.slots.acquire(blocking=False):
            self._send(503, "text/plain; charset=utf-8", b"busy\n")
            return
        try:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, server.metrics.render())
            elif path == "/healthz":
                health = server.health()
                body = json.dumps(
                    {"status": "ok" if health.ok else "failing", **health.detail},
                    ensure_ascii=False,
                    default=str,
                ).encode()
                self._send(200 if health.ok else 503, "application/json", body + b"\n")
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: /healthz, /metrics\n")
        except Exception as e:  # noqa: BLE001 - one bad scrape must not kill the listener
            log.warning(
                "The telemetry listener failed to answer: %s",
                type(e).__name__,
                extra={"event": "telemetry.request_failed", "error": type(e).__name__},
            )
            self._send(500, "text/plain; charset=utf-8", b"internal error\n")
        finally:
            server.slots.release()

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client went away

    def log_message(self, format: str, *args: Any) -> None:
        return  # access lines are noise at a facility; errors are logged above


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    metrics: Metrics
    health: Callable[[], Health]
    slots: threading.BoundedSemaphore


class TelemetryServer:
    """/healthz and /metrics on exactly ``listen`` (``host:port``; port 0 picks one)."""

    def __init__(self, listen: str, *, metrics: Metrics, health: Callable[[], Health]) -> None:
        self.listen = listen
        self.metrics = metrics
        self.health = health
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The address bound (the real port when ``listen`` asked for port 0)."""
        if self._server is None:
            raise RuntimeError("the telemetry listener is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Bind and serve in a daemon thread.

        Raises:
            ConfigError: ``telemetry.listen`` cannot be bound (in use, not an address of
                this host, a privileged port).
        """
        host, port = split_host_port(self.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_cls = type("_BoundServer", (_Server,), {"address_family": family})
        try:
            server = server_cls((host, port), _Handler)
        except OSError as e:
            raise ConfigError(
                "[telemetry]",
                [
                    ConfigProblem(
                        "telemetry.listen",
                        f"cannot listen on {self.listen}: {e.strerror or type(e).__name__}",
                    )
                ],
                hint="Free the port, or set [telemetry] listen to another address.",
            ) from None
        server.metrics = self.metrics
        server.health = self.health
        server.slots = threading.BoundedSemaphore(MAX_CONCURRENT_REQUESTS)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="telemetry-http",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
