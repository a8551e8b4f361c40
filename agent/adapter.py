"""What an adapter is, and what it may see of the agent: declared by the side that uses it.

Adapters turn source data (HL7 v2, SQL rows, DICOM studies) into Records and hand them
to a RecordSink (the buffer). They never talk to the hub, never hold records in memory
beyond a batch, and never acknowledge upstream before the sink has committed.

Kinds of adapter:
- Listener (hl7-mllp, the dicom C-STORE side): ``start()`` / ``stop()``.
- Poller (sql, dicom query, hl7-files): ``poll()`` on the scheduler's interval, and
  ``backfill(since, until)`` where the source can be asked about the past; adapters
  whose source cannot raise BackfillUnsupportedError.
The runtime builds them with `adapters.build(settings, ctx)`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import IO, Protocol, runtime_checkable

from agent.buffer import Cursor, PutReport, RawEntry
from agent.record import Record


class RecordSink(Protocol):
    """What an adapter sees of the buffer, and nothing else."""

    def put(
        self,
        records: Sequence[Record],
        *,
        cursor: Cursor | None = None,
        raw_ids: Iterable[int] = (),
    ) -> PutReport: ...

    def put_raw(
        self, data: bytes, *, adapter: str, media_type: str, dedupe_key: str | None = None
    ) -> tuple[int, bool]: ...

    def unmapped_raw(self, adapter: str, *, limit: int = 100) -> list[RawEntry]: ...

    def quarantine_raw(self, raw_id: int, *, reason: str) -> None: ...

    def quarantine(
        self, data: bytes, *, adapter: str, reason: str, media_type: str = ""
    ) -> int: ...

    def cursor(self, adapter: str) -> str | None: ...

    def add_blob(self, src: IO[bytes] | bytes, *, media_type: str) -> tuple[str, int]: ...


@dataclass(frozen=True, slots=True)
class AdapterContext:
    """What the runtime gives every adapter it builds."""

    node_id: str
    sink: RecordSink
    #: Key for `patient_hash`: logs show a short keyed hash instead of a patient.
    log_key: bytes
    #: Called after records were committed, so the sync job can start at once.
    on_committed: Callable[[], None] = lambda: None
    clock: Callable[[], float] = time.time

    def patient_hash(self, value: str | None) -> str:
        """A short keyed hash of a national code, MRN or name, safe to log."""
        if not value:
            return "-"
        return hmac.new(self.log_key, value.encode(), hashlib.sha256).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Check:
    """One line of `sepas-agent doctor`."""

    name: str
    ok: bool
    detail: str
    hint: str = ""


@dataclass(slots=True)
class PollReport:
    """What one poll or backfill did."""

    found: int = 0  # source items seen (messages, rows, studies)
    new: int = 0  # records committed for the first time
    duplicates: int = 0  # records the buffer already had
    quarantined: int = 0
    cursor: str | None = None
    complete: bool = True  # False: part of the window was not answered; retry it
    notes: list[str] = field(default_factory=list)


@runtime_checkable
class Adapter(Protocol):
    name: str
    kind: str

    def checks(self) -> Sequence[Check]:
        """For `doctor`: reachability and configuration. Never raises."""
        ...


@runtime_checkable
class Listener(Adapter, Protocol):
    def start(self) -> None: ...

    def stop(self, *, timeout_secs: float = 10.0) -> None:
        """Stop taking input, finish what is being committed, return within the timeout."""
        ...


@runtime_checkable
class Poller(Adapter, Protocol):
    def poll(self) -> PollReport:
        """Fetch what is new since the cursor; commit records and cursor together."""
        ...

    def backfill(
        self,
        since: date,
        until: date,
        *,
        progress: Callable[[PollReport], None] | None = None,
    ) -> PollReport:
        """Walk a past date range; harmless to repeat (ids de-duplicate).

        Raises:
            BackfillUnsupportedError: the source cannot be asked about the past.
        """
        ...
