"""A PACS in process: a pynetdicom Query/Retrieve SCP (Study Root C-FIND) on 127.0.0.1.

For unit tests of `adapters.dicom` that need a real association but scripted
behaviour: a result cap (Orthanc-style Cancel after N, silent truncation, or "out of
resources"), failure statuses, an abort in the middle of a C-FIND, a C-FIND that
never answers (released at stop, so no thread outlives the test), and an AE that
rejects unknown callers. Studies are the datasets `tests.interop.pacs_peers.make_study`
builds; answers carry each study's own SpecificCharacterSet, so an ISO_IR 127 study
is sent in ISO-8859-6 over the wire.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification
from pynetdicom.transport import ThreadedAssociationServer

from adapters.dicom import net

#: Longest a scripted hang blocks the SCP's thread (released earlier by `stop`).
HANG_SECS = 10.0


def _match(value: str, cond: str) -> bool:
    """DICOM single-value / range matching on DA/TM/UI strings (lexicographic)."""
    if cond in ("", "*"):
        return True
    if "-" in cond:
        lo, hi = cond.split("-", 1)
        return bool(value) and (not lo or value >= lo) and (not hi or value <= hi)
    return value == cond


@dataclass
class FakeStudy:
    study: Dataset
    series: dict[str, tuple[Dataset, list[Dataset]]] = field(default_factory=dict)


@dataclass
class FakePacs:
    """Start with `start()`; `peer` is the settings dict for DicomSettings.peer."""

    ae_title: str = "FAKEPACS"
    #: Matches returned per C-FIND at most (None: all).
    cap: int | None = None
    #: Final status after a capped answer: 0xFE00 (Orthanc), 0x0000 (silent), 0xA700...
    cap_status: int = 0xFE00
    #: Return NumberOfStudyRelatedSeries/Instances at study level.
    counts: bool = True
    #: Return SOPClassUID at image level (dcmqrscp does not).
    sop_class: bool = True
    #: Calling AE titles accepted; empty: any.
    known_callers: tuple[str, ...] = ()
    studies: dict[str, FakeStudy] = field(default_factory=dict)
    #: Every C-FIND identifier received, in order.
    queries: list[Dataset] = field(default_factory=list)
    #: Scripted behaviours for the next C-FINDs: each takes the event and yields the
    #: responses itself, instead of the normal answer.
    script: list[Callable[[Any], Iterator[tuple[int, Dataset | None]]]] = field(
        default_factory=list
    )
    port: int = 0
    _server: Any = None
    _thread: Any = None
    _release: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- content ------------------------------------------------------------------------

    def add(self, datasets: Iterable[Dataset]) -> None:
        with self._lock:
            for ds in datasets:
                st = self.studies.setdefault(str(ds.StudyInstanceUID), FakeStudy(ds))
                entry = st.series.setdefault(str(ds.SeriesInstanceUID), (ds, []))
                entry[1].append(ds)

    def remove_study(self, study_uid: str) -> None:
        with self._lock:
            self.studies.pop(study_uid, None)

    # -- scripting ----------------------------------------------------------------------

    def fail_next(self, status: int) -> None:
        def run(event: Any) -> Iterator[tuple[int, Dataset | None]]:
            yield status, None

        self.script.append(run)

    def abort_next(self, after: int = 1) -> None:
        """Send ``after`` matches of the normal answer, then A-ABORT."""

        def run(event: Any) -> Iterator[tuple[int, Dataset | None]]:
            for i, (code, ident) in enumerate(self._answer(event.identifier)):
                if i >= after:
                    break
                yield code, ident
            event.assoc.abort()

        self.script.append(run)

    def hang_next(self) -> None:
        """Never answer (until `stop`, or HANG_SECS): the caller's DIMSE timeout fires."""

        def run(event: Any) -> Iterator[tuple[int, Dataset | None]]:
            self._release.wait(HANG_SECS)
            return
            yield  # a generator that yields nothing

        self.script.append(run)

    # -- server -------------------------------------------------------------------------

    @property
    def peer(self) -> dict[str, Any]:
        return {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port}

    def start(self) -> FakePacs:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(Verification)
        ae.network_timeout = 30
        ae.dimse_timeout = 30
        if self.known_callers:
            ae.require_calling_aet = list(self.known_callers)
        handlers = [*net.NODELAY_HANDLERS, (evt.EVT_C_FIND, self._on_find)]
        # ae.start_server(block=False) polls for shutdown every 0.5 s; serve our own
        # thread at 0.02 s so that stopping a test's PACS costs no half second.
        server = ae.make_server(
            ("127.0.0.1", 0), evt_handlers=handlers, server_class=ThreadedAssociationServer
        )
        ae._servers.append(server)
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        self._server = server
        self.port = int(server.server_address[1])
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            self._thread.join(timeout=10)

    def __enter__(self) -> FakePacs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- C-FIND -------------------------------------------------------------------------

    def _on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        identifier = event.identifier
        with self._lock:
            self.queries.append(identifier)
            scripted = self.script.pop(0) if self.script else None
        if scripted is not None:
            yield from scripted(event)
            return
        yield from self._answer(identifier)

    def _answer(self, q: Dataset) -> Iterator[tuple[int, Dataset | None]]:
        with self._lock:
            matches = list(self._matches(q))
        for i, ds in enumerate(matches):
            if self.cap is not None and i >= self.cap:
                yield self.cap_status, None
                return
            yield 0xFF00, ds
        yield 0x0000, None

    def _matches(self, q: Dataset) -> Iterator[Dataset]:
        level = str(q.get("QueryRetrieveLevel", ""))
        want = [elem.keyword for elem in q if elem.keyword not in ("QueryRetrieveLevel",)]
        for st in self.studies.values():
            s = st.study
            if not _match(str(s.get("StudyInstanceUID", "")), str(q.get("StudyInstanceUID", ""))):
                continue
            if not _match(str(s.get("StudyDate", "")), str(q.get("StudyDate", "") or "")):
                continue
            if not _match(str(s.get("StudyTime", "")), str(q.get("StudyTime", "") or "")):
                continue
            if level == "STUDY":
                yield self._reply(s, want, level, st)
                continue
            for series_uid, (first, instances) in st.series.items():
                if not _match(series_uid, str(q.get("SeriesInstanceUID", "") or "")):
                    continue
                if level == "SERIES":
                    yield self._reply(first, want, level, st, n_series_instances=len(instances))
                    continue
                for inst in instances:
                    if _match(str(inst.SOPInstanceUID), str(q.get("SOPInstanceUID", "") or "")):
                        yield self._reply(inst, want, level, st)

    def _reply(
        self,
        src: Dataset,
        want: list[str],
        level: str,
        st: FakeStudy,
        n_series_instances: int | None = None,
    ) -> Dataset:
        out = Dataset()
        out.SpecificCharacterSet = src.get("SpecificCharacterSet", "ISO_IR 192")
        out.QueryRetrieveLevel = level
        out.RetrieveAETitle = self.ae_title
        for kw in want:
            if kw == "SpecificCharacterSet":
                continue
            if kw == "NumberOfStudyRelatedSeries":
                if self.counts:
                    out.NumberOfStudyRelatedSeries = len(st.series)
                continue
            if kw == "NumberOfStudyRelatedInstances":
                if self.counts:
                    out.NumberOfStudyRelatedInstances = sum(len(v[1]) for v in st.series.values())
                continue
            if kw == "NumberOfSeriesRelatedInstances":
                if self.counts and n_series_instances is not None:
                    out.NumberOfSeriesRelatedInstances = n_series_instances
                continue
            if kw == "ModalitiesInStudy":
                out.ModalitiesInStudy = sorted({str(v[0].Modality) for v in st.series.values()})
                continue
            if kw == "SOPClassUID" and not self.sop_class:
                continue
            if kw in src:
                out[kw] = src[kw]
            else:
                setattr(out, kw, "")
        return out
