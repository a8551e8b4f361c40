"""The ``dicom`` adapter: finds new and changed studies on a PACS, one Record per version.

Responsibility: incremental polling (`DicomAdapter.poll`), backfill of past days
(`DicomAdapter.backfill`), C-ECHO for ``doctor`` (`DicomAdapter.checks`), and, with
``retrieve = "instances"``, running the storage SCP (`start`/`stop`) and retrieving
each new study version with C-MOVE before its record is committed.

Polling: each poll asks about the days from (cursor - ``lookback``) to today, in
Asia/Tehran, with study-level C-FINDs whose capped windows are split
(`adapters.dicom.query`). The cursor (the time the poll started) is committed with
the poll's last records, and only when every window was answered in full and every
new study version was described (and retrieved) completely; otherwise the records
already made are committed (their ids de-duplicate) and the cursor stays, so the
next poll asks again. The overlap (``lookback``) finds studies that reach the PACS
late; record ids make repeated answers harmless. The first poll (no cursor) looks
back ``lookback`` only: older studies come in with ``sepas-agent backfill``.

Changed studies: a study's record id is `agent.record.dicom_id` over its (series,
instance) UIDs, so a study that gained an instance gets a new id (a new version) and
an unchanged one the same id (the buffer de-duplicates it). To avoid SERIES/IMAGE
queries, and C-MOVEs, for studies that did not change, an in-memory LRU remembers per
StudyInstanceUID the counts the PACS declared (NumberOfStudyRelatedSeries/Instances)
and the id last committed: equal declared counts skip the detail queries; an equal
id skips retrieval and mapping. The LRU is a cache only: after a restart the first
poll describes the lookback window again (and, with ``retrieve = "instances"``,
moves it again), and ids de-duplicate the result.

Errors: association failures become PeerUnavailableError / PeerProtocolError in
`adapters.dicom.net`; poll and backfill catch them and return a PollReport with
``complete = False`` and a note naming the peer and the status, so the scheduler
never loses its job to a PACS outage. Buffer errors (CapacityExceededError,
StorageError) propagate: polls pause when the buffer is full.

Never: log patient names, IDs or national codes (records appear as ``id[:12]``);
report a partially retrieved study as complete; advance a cursor past a window that
was not answered.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from pydicom.dataset import Dataset

from adapters.dicom import mapping, net, query, status
from adapters.dicom.settings import DicomSettings
from agent.adapter import AdapterContext, Check, PollReport
from agent.buffer import Cursor
from agent.dates import TEHRAN
from agent.errors import (
    AdapterError,
    InputRejectedError,
    PeerProtocolError,
)
from agent.record import BlobRef, Record, dicom_id

log = logging.getLogger(__name__)

#: Records committed per buffer transaction.
BATCH_RECORDS: Final = 50
#: Studies remembered by the change-detection LRU.
CACHE_STUDIES: Final = 50_000
#: Notes kept per report; the rest are counted.
MAX_NOTES: Final = 20


class StoredInstanceLike(Protocol):
    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def series_instance_uid(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def size(self) -> int: ...


class RetrieveResultLike(Protocol):
    @property
    def complete(self) -> bool: ...
    @property
    def instances(self) -> Sequence[StoredInstanceLike]: ...
    @property
    def failed(self) -> int: ...
    @property
    def warning(self) -> int: ...
    @property
    def status(self) -> int | None: ...
    @property
    def detail(self) -> str: ...


class RetrieverLike(Protocol):
    """`adapters.dicom.retrieve.Retriever`: C-MOVE to our AE, storage SCP to the buffer."""

    def start(self) -> None: ...

    def stop(self, *, timeout_secs: float = ...) -> None: ...

    def retrieve_study(self, study_uid: str) -> RetrieveResultLike: ...


RetrieverFactory = Callable[[DicomSettings, Any], RetrieverLike]


def _default_retriever(settings: DicomSettings, sink: Any) -> RetrieverLike:
    from adapters.dicom.retrieve import Retriever  # only with retrieve = "instances"

    retriever: RetrieverLike = Retriever(settings, sink)
    return retriever


def build(settings: DicomSettings, ctx: AdapterContext) -> DicomAdapter:
    """The runtime's factory (adapters.BUILDERS["dicom"])."""
    return DicomAdapter(settings, ctx)


@dataclass(frozen=True, slots=True)
class _Known:
    declared: tuple[int | None, int | None]  # what the PACS said at study level
    record_id: str


class _RetrieveIncomplete(Exception):
    """A C-MOVE that did not bring every instance of the study version."""


class _Batch:
    """Records on their way to the buffer, with the LRU updates that follow a commit."""

    def __init__(self, adapter: DicomAdapter, report: PollReport) -> None:
        self.adapter = adapter
        self.report = report
        self.records: list[Record] = []
        self.known: list[tuple[str, _Known]] = []

    def add(self, rec: Record, study_uid: str, known: _Known) -> None:
        self.records.append(rec)
        self.known.append((study_uid, known))
        if len(self.records) >= BATCH_RECORDS:
            self.flush()

    def remember(self, study_uid: str, known: _Known) -> None:
        """An LRU update that needs no commit (the study did not change)."""
        self.adapter._remember(study_uid, known)

    def flush(self, cursor: Cursor | None = None) -> None:
        if not self.records and cursor is None:
            return
        put = self.adapter.ctx.sink.put(self.records, cursor=cursor)
        self.report.new += put.inserted
        self.report.duplicates += put.duplicates
        for uid, known in self.known:
            self.adapter._remember(uid, known)
        if put.inserted:
            self.adapter.ctx.on_committed()
        self.records.clear()
        self.known.clear()


def _note(report: PollReport, text: str) -> None:
    if len(report.notes) < MAX_NOTES:
        report.notes.append(text)
    elif len(report.notes) == MAX_NOTES:
        report.notes.append("(more problems; see the log)")


class DicomAdapter:
    """A Poller (and, with ``retrieve = "instances"``, a Listener) for one PACS."""

    kind = "dicom"

    def __init__(
        self,
        settings: DicomSettings,
        ctx: AdapterContext,
        *,
        timeouts: net.Timeouts = net.DEFAULT_TIMEOUTS,
        retriever_factory: RetrieverFactory | None = None,
        cache_studies: int = CACHE_STUDIES,
    ) -> None:
        self.settings = settings
        self.ctx = ctx
        self.name = settings.name
        self.timeouts = timeouts
        self.peer = net.Peer(settings.peer.ae_title, settings.peer.host, settings.peer.port)
        self._ae = net.make_ae(
            settings.ae_title, requested=(net.VERIFICATION, net.STUDY_ROOT_FIND), timeouts=timeouts
        )
        self._modalities = frozenset(settings.modalities)
        self._retriever_factory = retriever_factory or _default_retriever
        self._retriever: RetrieverLike | None = None
        self._retriever_lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._cache: OrderedDict[str, _Known] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._cache_size = cache_studies

    # -- Listener (the storage SCP, with retrieve = "instances") ------------------------

    @property
    def retrieves(self) -> bool:
        return self.settings.retrieve == "instances"

    def start(self) -> None:
        """Start the storage SCP when instances are retrieved; nothing otherwise.

        Raises:
            AdapterError: the SCP cannot listen (address in use, permission).
        """
        if self.retrieves:
            self._ensure_retriever()

    def stop(self, *, timeout_secs: float = 10.0) -> None:
        """Stop the storage SCP (if running). Polls in progress fail and are retried."""
        with self._retriever_lock:
            retriever, self._retriever = self._retriever, None
        if retriever is not None:
            retriever.stop(timeout_secs=timeout_secs)

    def _ensure_retriever(self) -> RetrieverLike:
        with self._retriever_lock:
            if self._retriever is None:
                retriever = self._retriever_factory(self.settings, self.ctx.sink)
                try:
                    retriever.start()
                except OSError as e:
                    raise AdapterError(
                        f"dicom adapter {self.name!r}: the storage SCP cannot listen on "
                        f"{self.settings.listen}: {e.strerror or e}",
                        hint="Another process (the running service, during a backfill?) "
                        "holds the port; stop it or change `listen`.",
                    ) from None
                self._retriever = retriever
            return self._retriever

    # -- Adapter ------------------------------------------------------------------------

    def checks(self) -> Sequence[Check]:
        """C-ECHO the PACS. Never raises."""
        name = f"{self.name}: C-ECHO {self.peer}"
        started = time.monotonic()
        try:
            code = net.echo(self.settings.ae_title, self.peer, timeouts=self.timeouts)
        except AdapterError as e:
            return [Check(name, False, str(e), e.hint)]
        except Exception as e:  # noqa: BLE001 - doctor never raises
            return [Check(name, False, f"{type(e).__name__}: {e}")]
        ms = (time.monotonic() - started) * 1000
        ok = code == 0
        detail = f"{status.describe(code, service='C-ECHO')} in {ms:.0f} ms"
        return [Check(name, ok, detail, "" if ok else "The PACS answered C-ECHO with an error.")]

    # -- Poller -------------------------------------------------------------------------

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.ctx.clock(), TEHRAN)

    def poll(self) -> PollReport:
        """Ask about (cursor - lookback) .. now; commit new study versions and the
        cursor together. Never raises for a PACS problem: the report says what failed.

        Raises:
            CapacityExceededError, StorageError: from the buffer.
        """
        with self._poll_lock:
            now = self._now()
            stored = self.ctx.sink.cursor(self.name)
            start = now
            if stored is not None:
                try:
                    start = min(dt.datetime.fromisoformat(stored), now)
                except ValueError:
                    log.warning(
                        "The dicom adapter's cursor is unreadable; polling from the lookback.",
                        extra={"event": "dicom.cursor_unreadable", "adapter": self.name},
                    )
                if start.utcoffset() is None:
                    start = start.replace(tzinfo=TEHRAN)
            since = (start - self.settings.lookback).astimezone(TEHRAN)
            window = query.Window(min(since.date(), now.date()), now.date())
            report = PollReport(cursor=stored)
            batch = _Batch(self, report)
            complete = self._run(window_list=[window], report=report, batch=batch)
            if complete:
                value = now.isoformat()
                batch.flush(cursor=Cursor(self.name, value))
                report.cursor = value
            else:
                batch.flush()
                report.complete = False
        self._log_done("poll", report, window)
        return report

    def backfill(
        self,
        since: dt.date,
        until: dt.date,
        *,
        progress: Callable[[PollReport], None] | None = None,
    ) -> PollReport:
        """Walk ``since``..``until`` (inclusive) day by day, busy days split.

        Resumable: the last day answered in full is committed with that day's records
        under the cursor ``<name>:backfill``; a run over the same range continues after
        it (a run after a complete one starts again: ids de-duplicate). Uses its own
        association, so it is safe while the service polls. ``progress`` gets the
        running report after each day. The live cursor is never moved.

        Raises:
            AdapterError: ``until`` is before ``since``.
            CapacityExceededError, StorageError: from the buffer.
        """
        if until < since:
            raise AdapterError(
                f"backfill of {self.name!r}: until ({until}) is before since ({since})",
                hint="Give --since on or before --until.",
            )
        cursor_name = f"{self.name}:backfill"
        prefix = f"{since.isoformat()}..{until.isoformat()} done "
        stored = self.ctx.sink.cursor(cursor_name)
        first = since
        if stored is not None and stored.startswith(prefix):
            try:
                done = dt.date.fromisoformat(stored[len(prefix) :])
            except ValueError:
                done = None
            if done is not None and since <= done < until:
                first = done + dt.timedelta(days=1)
        report = PollReport(cursor=stored)
        batch = _Batch(self, report)
        days = [first + dt.timedelta(days=i) for i in range((until - first).days + 1)]
        contiguous = True

        def day_done(day: dt.date, complete: bool) -> None:
            nonlocal contiguous
            if complete and contiguous:
                value = prefix + day.isoformat()
                batch.flush(cursor=Cursor(cursor_name, value))
                report.cursor = value
            else:
                contiguous = False
                batch.flush()
            if progress is not None:
                try:
                    progress(report)
                except Exception:  # an observer never breaks the backfill (STYLE.md 3.5)
                    log.exception(
                        "A backfill progress observer failed.",
                        extra={"event": "dicom.observer_failed", "adapter": self.name},
                    )

        # No poll lock: a backfill runs beside polls on its own association.
        complete = self._run(
            window_list=[query.Window(d, d) for d in days],
            report=report,
            batch=batch,
            after_window=day_done,
        )
        batch.flush()
        report.complete = complete and contiguous
        self._log_done("backfill", report, query.Window(since, until))
        return report

    # -- the work -----------------------------------------------------------------------

    def _run(
        self,
        *,
        window_list: Sequence[query.Window],
        report: PollReport,
        batch: _Batch,
        after_window: Callable[[dt.date, bool], None] | None = None,
    ) -> bool:
        """Sweep the windows on one association; False if anything was not answered."""
        complete = True
        try:
            with net.associate(self._ae, self.peer, timeouts=self.timeouts) as session:
                for window in window_list:
                    ok = self._sweep(session, window, report, batch)
                    complete = complete and ok
                    if after_window is not None:
                        after_window(window.first, ok)
        except AdapterError as e:  # the PACS, or the storage SCP (retrieve = "instances")
            log.warning(
                "The dicom adapter could not finish asking the PACS: %s",
                e,
                extra={
                    "event": "dicom.peer_failed",
                    "adapter": self.name,
                    "error": type(e).__name__,
                },
            )
            _note(report, str(e))
            batch.flush()
            return False
        return complete

    def _sweep(
        self, session: net.Session, window: query.Window, report: PollReport, batch: _Batch
    ) -> bool:
        complete = True
        cap = self.settings.max_results_per_query
        for answer in query.find_studies(session, window, cap=cap):
            if not answer.complete:
                complete = False
                _note(
                    report,
                    f"{self.peer}: studies of {answer.window} are still capped at "
                    f"{len(answer.studies)} results in one second; raise the PACS's C-FIND "
                    "limit (Orthanc: LimitFindResults) or max_results_per_query",
                )
            for ident in answer.studies:
                report.found += 1
                try:
                    self._study(session, ident, batch)
                except query.CappedDetailError as e:
                    complete = False
                    _note(report, str(e))
                except _RetrieveIncomplete as e:
                    complete = False
                    _note(report, str(e))
                except InputRejectedError as e:
                    raw = mapping.raw_json(ident)
                    self.ctx.sink.quarantine(
                        raw, adapter=self.name, reason=str(e), media_type=mapping.RAW_MEDIA_TYPE
                    )
                    report.quarantined += 1
        return complete

    def _study(self, session: net.Session, ident: Dataset, batch: _Batch) -> None:
        uid = str(ident.get("StudyInstanceUID", "") or "").strip()
        if not uid:
            raise InputRejectedError("a study-level C-FIND match without StudyInstanceUID")
        if self._modalities:
            in_study = mapping.modalities_in_study(ident)
            if in_study and not in_study & self._modalities:
                return
        declared = mapping.declared_counts(ident)
        known = self._recall(uid)
        if known is not None and declared[1] is not None and known.declared == declared:
            return  # the PACS says the study has the same series and instances
        detail = query.study_detail(session, ident, cap=self.settings.max_results_per_query)
        if self._modalities and detail.modalities and not detail.modalities & self._modalities:
            return
        pairs = detail.instance_uids()
        if not pairs:
            return  # nothing to describe yet (a study still arriving); asked again later
        rid = dicom_id(self.ctx.node_id, uid, pairs)
        if known is not None and known.record_id == rid:
            batch.remember(uid, _Known(declared, rid))
            return
        blobs: tuple[BlobRef, ...] = ()
        if self.retrieves:
            blobs = self._retrieve(uid, pairs)
        rec = mapping.study_record(
            detail,
            node_id=self.ctx.node_id,
            adapter=self.name,
            captured_at=dt.datetime.fromtimestamp(self.ctx.clock(), dt.UTC),
            blobs=blobs,
        )
        batch.add(rec, uid, _Known(declared, rid))

    def _retrieve(self, study_uid: str, pairs: Iterable[tuple[str, str]]) -> tuple[BlobRef, ...]:
        """C-MOVE the study; its blobs if every instance we described arrived.

        Raises:
            _RetrieveIncomplete: failed or partial sub-operations, or instances missing.
            PeerUnavailableError: the PACS refused the C-MOVE association (ends the poll).
        """
        retriever = self._ensure_retriever()
        try:
            result = retriever.retrieve_study(study_uid)
        except PeerProtocolError as e:
            raise _RetrieveIncomplete(f"C-MOVE from {self.peer}: {e}") from None
        stored = {i.sop_instance_uid: i for i in result.instances}
        wanted = [sop for _series, sop in pairs]
        missing = [sop for sop in wanted if sop not in stored]
        if not result.complete or missing or result.failed:
            raise _RetrieveIncomplete(
                f"C-MOVE from {self.peer} incomplete: {len(wanted) - len(missing)} of "
                f"{len(wanted)} instances received, {result.failed} failed, "
                f"{result.warning} with warnings, final "
                f"{status.describe(result.status, service='C-MOVE')}"
                + (f"; {result.detail}" if result.detail else "")
                + "; retried on the next poll"
            )
        blobs = {
            stored[sop].sha256: BlobRef(
                sha256=stored[sop].sha256, media_type=mapping.BLOB_MEDIA_TYPE, size=stored[sop].size
            )
            for sop in wanted
        }
        return tuple(blobs[k] for k in sorted(blobs))

    # -- the LRU ------------------------------------------------------------------------

    def _recall(self, study_uid: str) -> _Known | None:
        with self._cache_lock:
            known = self._cache.get(study_uid)
            if known is not None:
                self._cache.move_to_end(study_uid)
            return known

    def _remember(self, study_uid: str, known: _Known) -> None:
        with self._cache_lock:
            self._cache[study_uid] = known
            self._cache.move_to_end(study_uid)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _log_done(self, what: str, report: PollReport, window: query.Window) -> None:
        level = logging.INFO if report.new or not report.complete else logging.DEBUG
        log.log(
            level,
            "The dicom adapter's %s of %s found %d studies, %d new records%s.",
            what,
            window,
            report.found,
            report.new,
            "" if report.complete else " (incomplete: asked again next time)",
            extra={
                "event": f"dicom.{what}_done",
                "adapter": self.name,
                "count": report.found,
                "new": report.new,
                "complete": report.complete,
            },
        )
