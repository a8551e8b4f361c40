"""The mapping worker behind the ACK (DESIGN.md "raw intake", HL7-INTAKE.md rule 15).

Responsibility: turn the raw HL7 rows an adapter committed (`RecordSink.put_raw`) into
Records, one row at a time, in the order received: decode, map, then
``sink.put(records, raw_ids=[row.id])``, which marks the row mapped in the same
transaction that commits its Records, so a crash between the two loses nothing and
doubles nothing. A row that cannot be mapped goes to quarantine with the reason
(``sink.quarantine_raw``), never silently away.

Runs in one thread per adapter; it wakes when the adapter commits (`MappingRunner.wake`)
and sweeps every `SWEEP_SECS` anyway, so rows left unmapped by a crash or by a
storage problem are mapped after a restart or once space is back.

Never: quarantine a row for a reason that is not the row's fault (the mapping module
missing, the buffer full or failing: the row stays and is retried); log message
content or an exception's text from the mapper (third-party parsers put field values
in their messages): only the exception type and the row id.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from adapters.hl7.intake import decode
from agent.adapter import RecordSink
from agent.errors import InputRejectedError, StorageError
from agent.record import Record

log = logging.getLogger(__name__)

#: Rows looked at per pass.
BATCH_ROWS: Final = 100
#: Seconds between sweeps when nothing wakes the runner.
SWEEP_SECS: Final = 5.0
_MAPPING: Final = "adapters.hl7.mapping"


class MapFn(Protocol):
    """``adapters.hl7.mapping.map_message``'s signature."""

    def __call__(
        self,
        text: str,
        raw: bytes,
        *,
        node_id: str,
        adapter: str,
        kind: str,
        settings: Any,
        captured_at: datetime,
    ) -> Sequence[Record]: ...


@dataclass(slots=True)
class RunReport:
    """What one pass did."""

    mapped: int = 0  # rows whose records were committed
    records: int = 0  # records committed (new or duplicates)
    quarantined: int = 0
    left: int = 0  # rows left unmapped for a later pass (storage trouble, no mapper)


class MappingRunner:
    """Maps one adapter's raw rows into Records behind the ACK."""

    def __init__(
        self,
        sink: RecordSink,
        adapter_name: str,
        kind: str,
        node_id: str,
        settings: Any,
        map_fn: MapFn | None = None,
        wake: threading.Event | None = None,
        *,
        default_encoding: str | None = None,
        on_committed: Callable[[], None] = lambda: None,
        sweep_secs: float = SWEEP_SECS,
    ) -> None:
        """Args:
        settings: the adapter's settings, handed to ``map_fn``; its ``encoding`` is
            the default character set for decoding (rule 3).
        map_fn: the mapper; None imports ``adapters.hl7.mapping.map_message`` on
            first use (until it can be imported, rows wait).
        wake: set it to make the runner look for rows now (the adapter does so after
            each commit); one is made if not given.
        on_committed: called after records were committed (the sync job's trigger).
        """
        self.sink = sink
        self.adapter_name = adapter_name
        self.kind = kind
        self.node_id = node_id
        self.settings = settings
        self._map_fn = map_fn
        self._wake = wake if wake is not None else threading.Event()
        self._encoding: str = default_encoding or str(getattr(settings, "encoding", "cp1256"))
        self._on_committed = on_committed
        self._sweep_secs = sweep_secs
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._import_failed_logged = False
        self._lock = threading.Lock()  # one pass at a time (thread, or a caller's run_once)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"hl7-mapping-{self.adapter_name}", daemon=True
        )
        self._thread.start()

    def wake(self) -> None:
        """Look for rows now (called after each commit)."""
        self._wake.set()

    def stop(self, *, timeout_secs: float = 10.0) -> None:
        """Finish the row being mapped, then stop; returns within ``timeout_secs``."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_secs)
            if self._thread.is_alive():
                log.warning(
                    "The HL7 mapping thread did not stop in time; unmapped rows stay "
                    "in the buffer and are mapped at the next start.",
                    extra={"event": "hl7.mapping_stop_timeout", "adapter": self.adapter_name},
                )
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                while not self._stopping.is_set():
                    report = self.run_once()
                    if report.mapped + report.quarantined < BATCH_ROWS or report.left:
                        break
            except Exception as e:  # noqa: BLE001 - the worker must outlive any one failure
                log.error(
                    "The HL7 mapping pass failed; it is retried at the next sweep.",
                    extra={
                        "event": "hl7.mapping_pass_failed",
                        "adapter": self.adapter_name,
                        "error_type": type(e).__name__,
                    },
                )
            self._wake.wait(self._sweep_secs)
            self._wake.clear()

    # -- one pass -------------------------------------------------------------------------

    def run_once(self, *, limit: int = BATCH_ROWS) -> RunReport:
        """Map up to ``limit`` unmapped rows; stops early on a storage problem.

        Raises:
            StorageError: the buffer cannot be read.
        """
        report = RunReport()
        with self._lock:
            map_fn = self._resolve()
            rows = self.sink.unmapped_raw(self.adapter_name, limit=limit)
            if map_fn is None:
                report.left = len(rows)
                return report
            for row in rows:
                if self._stopping.is_set():
                    report.left += 1
                    continue
                outcome = self._map_row(map_fn, row.id, row.data, row.received_at, report)
                if not outcome:
                    report.left = len(rows) - report.mapped - report.quarantined
                    break
        if report.mapped:
            with contextlib.suppress(Exception):
                self._on_committed()
        return report

    def _map_row(
        self, map_fn: MapFn, row_id: int, data: bytes, received_at: float, report: RunReport
    ) -> bool:
        """False: stop this pass (the buffer refused a write); the row stays."""
        try:
            text = decode(data, self._encoding)
            records = list(
                map_fn(
                    text,
                    data,
                    node_id=self.node_id,
                    adapter=self.adapter_name,
                    kind=self.kind,
                    settings=self.settings,
                    captured_at=datetime.fromtimestamp(received_at, UTC),
                )
            )
        except InputRejectedError as e:
            # Our errors never carry patient data (agent/errors.py), so the text is kept.
            return self._quarantine(row_id, f"mapping refused: {e}", report)
        except Exception as e:  # noqa: BLE001 - a mapper bug must not stop intake
            return self._quarantine(row_id, f"mapping failed: {type(e).__name__}", report)
        try:
            put = self.sink.put(records, raw_ids=[row_id])
        except StorageError as e:
            log.warning(
                "Mapped HL7 records could not be committed; the message stays in the "
                "buffer and is mapped again later.",
                extra={
                    "event": "hl7.mapping_commit_failed",
                    "adapter": self.adapter_name,
                    "raw_id": row_id,
                    "error_type": type(e).__name__,
                },
            )
            return False
        report.mapped += 1
        report.records += put.inserted + put.duplicates
        log.debug(
            "HL7 message mapped.",
            extra={
                "event": "hl7.message_mapped",
                "adapter": self.adapter_name,
                "raw_id": row_id,
                "count": len(records),
            },
        )
        return True

    def _quarantine(self, row_id: int, reason: str, report: RunReport) -> bool:
        try:
            self.sink.quarantine_raw(row_id, reason=reason[:500])
        except StorageError as e:
            log.warning(
                "An unmappable HL7 message could not be quarantined; it stays in the "
                "buffer and is tried again later.",
                extra={
                    "event": "hl7.quarantine_failed",
                    "adapter": self.adapter_name,
                    "raw_id": row_id,
                    "error_type": type(e).__name__,
                },
            )
            return False
        report.quarantined += 1
        log.warning(
            "An HL7 message could not be mapped and was quarantined.",
            extra={
                "event": "hl7.message_quarantined",
                "adapter": self.adapter_name,
                "raw_id": row_id,
                "reason": reason[:200],
            },
        )
        return True

    def _resolve(self) -> MapFn | None:
        if self._map_fn is not None:
            return self._map_fn
        try:
            from adapters.hl7 import mapping  # lazily: a facility may run without it
        except ImportError as e:
            if not self._import_failed_logged:
                self._import_failed_logged = True
                log.error(
                    "The HL7 mapping module cannot be imported; received messages are kept "
                    "unmapped in the buffer until it can.",
                    extra={
                        "event": "hl7.mapping_unavailable",
                        "adapter": self.adapter_name,
                        "error_type": type(e).__name__,
                    },
                )
            return None
        fn: MapFn = mapping.map_message
        self._map_fn = fn
        return fn
