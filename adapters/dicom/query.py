"""C-FIND, Study Root (PS3.4 annex C.6.2), at STUDY, SERIES and IMAGE level.

Responsibility: the identifiers we send, the date/time windows we ask about, and the
splitting of windows whose answers were capped, so that a poll sees every study of a
window or knows that it did not.

Windows: a study-level C-FIND asks ``StudyDate`` ``first-last`` (range matching,
inclusive both ends, PS3.4 C.2.2.2.5). A window is *capped* when the PACS says it
stopped early (Cancel 0xFE00 after Orthanc's ``LimitFindResults``, a Warning such as
0xB001 "response limit reached", or 0xA700 "out of resources") or when the number of
matches reaches ``max_results_per_query`` (PACS that truncate silently with Success).
A capped window is split in halves, by date while it spans days, then by
``StudyTime`` ranges within its day (``HHMMSS-HHMMSS.999999``, so fractional
seconds fall in exactly one half), and asked again, until no window is capped. A
window of one second that is still capped cannot be split: it is reported as
incomplete, never as answered.

Limits, stated so nobody relies on more: a study without ``StudyDate`` matches no date
range, so it is never found; on a day busy enough to be split by time, a study
without ``StudyTime`` matches no time range (Orthanc 1.10, measured). Both are rare
on modalities that fill the Study module, and neither is silently claimed complete
for studies we did see.

We send ``SpecificCharacterSet = ISO_IR 192`` so that the PACS answers in UTF-8 where
it can (Orthanc and dcmqrscp both convert); pydicom decodes each identifier by the
SpecificCharacterSet it carries, so an ISO_IR 127 answer decodes right too.

Never: log identifiers or their values; treat a missing final status as the end of
the matches.
"""

from __future__ import annotations

import datetime as dt
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from adapters.dicom import status
from adapters.dicom.status import Category
from agent.errors import PeerProtocolError

STUDY_ROOT_FIND: Final = "1.2.840.10008.5.1.4.1.2.2.1"
CHARSET: Final = "ISO_IR 192"

#: Return keys of our study-level query (universal matching: empty values).
STUDY_KEYS: Final = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
)
SERIES_KEYS: Final = (
    "SeriesInstanceUID",
    "SeriesNumber",
    "Modality",
    "SeriesDescription",
    "BodyPartExamined",
    "SeriesDate",
    "SeriesTime",
    "NumberOfSeriesRelatedInstances",
)
IMAGE_KEYS: Final = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")

_LAST_SECOND: Final = 24 * 3600 - 1


class Finder(Protocol):
    """What the query needs of an association (`adapters.dicom.net.Session`)."""

    def find(
        self, identifier: Dataset, *, model: str = ...
    ) -> Iterator[tuple[int, Dataset | None]]: ...


@dataclass(frozen=True, slots=True)
class Window:
    """Days ``first``..``last`` (inclusive); within one day, optionally the seconds
    ``seconds[0]``..``seconds[1]`` after midnight (inclusive)."""

    first: dt.date
    last: dt.date
    seconds: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.last < self.first:
            raise ValueError("a window ends before it starts")
        if self.seconds is not None and (
            self.first != self.last or not 0 <= self.seconds[0] <= self.seconds[1] <= _LAST_SECOND
        ):
            raise ValueError("a time window lies within one day")

    def __str__(self) -> str:
        if self.seconds is not None:
            a, b = self.seconds
            return f"{self.first} {_hms(a, ':')}-{_hms(b, ':')}"
        return f"{self.first}" if self.first == self.last else f"{self.first}..{self.last}"

    @property
    def study_date(self) -> str:
        a, b = self.first.strftime("%Y%m%d"), self.last.strftime("%Y%m%d")
        return a if a == b else f"{a}-{b}"

    @property
    def study_time(self) -> str | None:
        if self.seconds is None:
            return None
        a, b = self.seconds
        return f"{_hms(a)}-{_hms(b)}.999999"

    def halves(self) -> tuple[Window, Window] | None:
        """Two windows covering this one, or None for one second (cannot split)."""
        if self.first != self.last:
            mid = self.first + dt.timedelta(days=(self.last - self.first).days // 2)
            return Window(self.first, mid), Window(mid + dt.timedelta(days=1), self.last)
        lo, hi = self.seconds if self.seconds is not None else (0, _LAST_SECOND)
        if lo >= hi:
            return None
        half = (lo + hi) // 2
        day = self.first
        return Window(day, day, (lo, half)), Window(day, day, (half + 1, hi))


def _hms(secs: int, sep: str = "") -> str:
    return sep.join(f"{v:02d}" for v in (secs // 3600, secs // 60 % 60, secs % 60))


def _identifier(level: str, keys: Sequence[str], **match: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = CHARSET
    ds.QueryRetrieveLevel = level
    for key in keys:
        setattr(ds, key, "")
    for key, value in match.items():
        setattr(ds, key, value)
    return ds


def study_identifier(window: Window) -> Dataset:
    """The study-level C-FIND identifier for a window."""
    ds = _identifier("STUDY", STUDY_KEYS, StudyDate=window.study_date)
    if window.study_time is not None:
        ds.StudyTime = window.study_time
    # The national code often travels as another patient id (issuer NOCR); Orthanc
    # returns the sequence at study level, dcmqrscp ignores the key.
    ds.OtherPatientIDsSequence = DicomSequence([])
    return ds


def series_identifier(study_uid: str) -> Dataset:
    return _identifier("SERIES", SERIES_KEYS, StudyInstanceUID=study_uid)


def image_identifier(study_uid: str, series_uid: str) -> Dataset:
    return _identifier(
        "IMAGE", IMAGE_KEYS, StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid
    )


@dataclass(slots=True)
class Answer:
    """All responses of one C-FIND: matches, final status, and whether it was capped."""

    matches: list[Dataset]
    status: int
    capped: bool


def run_find(finder: Finder, identifier: Dataset, *, cap: int | None, what: str) -> Answer:
    """Send one C-FIND and collect every match.

    Raises:
        PeerProtocolError: a Failure status (other than out-of-resources, which is a
            cap), an unknown status, or no final status.
    """
    matches: list[Dataset] = []
    final: int | None = None
    for code, ident in finder.find(identifier, model=STUDY_ROOT_FIND):
        if status.category(code) is Category.PENDING:
            if ident is not None:
                matches.append(ident)
            continue
        final = code
        break
    peer = getattr(finder, "peer", "the PACS")
    if final is None:
        raise PeerProtocolError(f"C-FIND ({what}) to {peer}: no final status")
    cat = status.category(final)
    if final != status.OUT_OF_RESOURCES and cat in (Category.FAILURE, Category.UNKNOWN):
        raise PeerProtocolError(
            f"C-FIND ({what}) to {peer} failed: {status.describe(final)}",
            hint="Check the PACS's logs for why it refused the query; the agent retries.",
        )
    capped = status.find_capped(final) or (cap is not None and len(matches) >= cap)
    return Answer(matches, final, capped)


@dataclass(frozen=True, slots=True)
class WindowAnswer:
    """The studies of one window that needed no further split (``complete``), or of a
    window that could not be split further and was still capped (not complete)."""

    window: Window
    studies: list[Dataset]
    complete: bool
    status: int


def find_studies(finder: Finder, window: Window, *, cap: int | None) -> Iterator[WindowAnswer]:
    """Study-level C-FIND over ``window``, splitting capped windows; ascending order.

    Each yielded window was answered in full, or is marked incomplete (a one-second
    window still capped). The matches of a capped window are dropped: its halves are
    asked again.

    Raises:
        PeerProtocolError, PeerUnavailableError: as the finder and `run_find`.
    """
    todo: deque[Window] = deque([window])
    while todo:
        w = todo.popleft()
        answer = run_find(finder, study_identifier(w), cap=cap, what=f"studies of {w}")
        if not answer.capped:
            yield WindowAnswer(w, answer.matches, True, answer.status)
            continue
        halves = w.halves()
        if halves is None:
            yield WindowAnswer(w, answer.matches, False, answer.status)
            continue
        todo.extendleft(reversed(halves))


@dataclass(frozen=True, slots=True)
class SeriesDetail:
    """A series-level identifier and the image-level identifiers of its instances."""

    identifier: Dataset
    instances: tuple[Dataset, ...]

    @property
    def uid(self) -> str:
        return str(self.identifier.get("SeriesInstanceUID", ""))


@dataclass(frozen=True, slots=True)
class StudyDetail:
    """What we know of one study: its study-level identifier and its series."""

    identifier: Dataset
    series: tuple[SeriesDetail, ...]

    @property
    def uid(self) -> str:
        return str(self.identifier.get("StudyInstanceUID", ""))

    def instance_uids(self) -> list[tuple[str, str]]:
        """(SeriesInstanceUID, SOPInstanceUID) pairs: what `agent.record.dicom_id` takes."""
        return [
            (s.uid, str(i.SOPInstanceUID))
            for s in self.series
            for i in s.instances
            if i.get("SOPInstanceUID")
        ]

    @property
    def modalities(self) -> set[str]:
        return {str(s.identifier.get("Modality", "") or "") for s in self.series} - {""}


class CappedDetailError(PeerProtocolError):
    """A SERIES or IMAGE level answer was capped: the study cannot be described whole."""

    hint = (
        "The PACS limits how many results a C-FIND returns; raise that limit for "
        "SERIES/IMAGE queries (Orthanc: LimitFindInstances / LimitFindResults), or set "
        'retrieve = "instances".'
    )


def study_detail(finder: Finder, identifier: Dataset, *, cap: int | None) -> StudyDetail:
    """SERIES then IMAGE level C-FINDs for one study.

    Raises:
        CappedDetailError: a series or image list was capped.
        PeerProtocolError, PeerUnavailableError: as `run_find`.
    """
    study_uid = str(identifier.StudyInstanceUID)
    series = run_find(finder, series_identifier(study_uid), cap=cap, what="series of a study")
    if series.capped:
        raise CappedDetailError(
            f"C-FIND for the series of a study to {getattr(finder, 'peer', 'the PACS')} was "
            f"capped ({status.describe(series.status)})"
        )
    out = []
    for s in sorted(series.matches, key=series_order):
        series_uid = str(s.get("SeriesInstanceUID", "") or "")
        if not series_uid:
            continue
        images = run_find(
            finder, image_identifier(study_uid, series_uid), cap=cap, what="instances of a series"
        )
        if images.capped:
            raise CappedDetailError(
                f"C-FIND for the instances of a series to {getattr(finder, 'peer', 'the PACS')} "
                "was capped "
                f"({status.describe(images.status)})"
            )
        out.append(SeriesDetail(s, tuple(sorted(images.matches, key=instance_order))))
    return StudyDetail(identifier, tuple(out))


def _int(value: object) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def series_order(ds: Dataset) -> tuple[int, str]:
    """Sort key: SeriesNumber (absent last), then SeriesInstanceUID."""
    n = _int(ds.get("SeriesNumber"))
    return (n if n is not None else 1 << 31, str(ds.get("SeriesInstanceUID", "")))


def instance_order(ds: Dataset) -> tuple[int, str]:
    """Sort key: InstanceNumber (absent last), then SOPInstanceUID."""
    n = _int(ds.get("InstanceNumber"))
    return (n if n is not None else 1 << 31, str(ds.get("SOPInstanceUID", "")))


def count(ds: Dataset, keyword: str) -> int | None:
    """An IS count from an identifier (NumberOfStudyRelated...), or None if absent."""
    return _int(ds.get(keyword)) if ds.get(keyword) not in (None, "") else None
