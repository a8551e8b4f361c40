"""The ``dicom`` adapter (poll, backfill, checks, retrieval) against an in-process PACS.

The PACS is tests.fakepacs (a real pynetdicom SCP on 127.0.0.1); the buffer is a real
Buffer in tmp_path, wrapped to see which records each commit carried with which
cursor. Retrieval uses a fake Retriever with the interface of
adapters.dicom.retrieve (C-MOVE is proven in the interop tests).
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from adapters import build as build_adapter
from adapters.dicom import net
from adapters.dicom.adapter import DicomAdapter
from adapters.dicom.settings import DicomSettings
from agent.adapter import AdapterContext, Listener, Poller, PollReport
from agent.buffer import Buffer, Cursor, PutReport
from agent.dates import TEHRAN
from agent.errors import AdapterError
from agent.record import Record, Service, dicom_id
from agent.testing import FakeClock
from tests.fakepacs import FakePacs
from tests.interop.pacs_peers import PERSIAN_DIGIT_ID, PERSIAN_NAME, free_port, make_study

pytestmark = pytest.mark.timeout(60)

NODE = "FAC-0001"
NOW = dt.datetime(2025, 3, 22, 12, 0, tzinfo=TEHRAN)
QUICK = net.Timeouts(connect=3, acse=5, dimse=5, network=10)


class SpySink:
    """The Buffer, with a log of every put (records, cursor)."""

    def __init__(self, buf: Buffer) -> None:
        self.buf = buf
        self.puts: list[tuple[list[Record], Cursor | None]] = []

    def put(self, records: Sequence[Record], *, cursor: Cursor | None = None, raw_ids=()):  # type: ignore[no-untyped-def]
        self.puts.append((list(records), cursor))
        return self.buf.put(records, cursor=cursor)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.buf, name)

    @property
    def records(self) -> list[Record]:
        return [r for recs, _ in self.puts for r in recs]


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SpySink]:
    buf = Buffer.open(tmp_path / "agent", data_key=None)
    yield SpySink(buf)
    buf.close()


@pytest.fixture
def pacs() -> Iterator[FakePacs]:
    with FakePacs() as p:
        yield p


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW.timestamp())


def make(
    pacs: FakePacs | dict[str, Any],
    sink: Any,
    clock: FakeClock,
    *,
    timeouts: net.Timeouts = QUICK,
    retriever_factory: Any = None,
    **overrides: Any,
) -> DicomAdapter:
    peer = pacs.peer if isinstance(pacs, FakePacs) else pacs
    data = {"name": "pacs", "kind": "dicom", "peer": peer, **overrides}
    settings = DicomSettings.model_validate(data)
    ctx = AdapterContext(node_id=NODE, sink=sink, log_key=b"k" * 32, clock=clock)
    return DicomAdapter(settings, ctx, timeouts=timeouts, retriever_factory=retriever_factory)


def day(d: int) -> str:
    return (NOW.date() - dt.timedelta(days=d)).strftime("%Y%m%d")


def another_instance(ds: Dataset) -> Dataset:
    """One more instance in the same series as ``ds``."""
    new = copy.deepcopy(ds)
    new.SOPInstanceUID = generate_uid()
    new.file_meta.MediaStorageSOPInstanceUID = new.SOPInstanceUID
    new.InstanceNumber = int(ds.InstanceNumber) + 100
    return new


def levels(pacs: FakePacs) -> list[str]:
    return [str(q.QueryRetrieveLevel) for q in pacs.queries]


# -- the contract ----------------------------------------------------------------------


def test_built_through_the_registry_it_is_a_poller_and_a_listener(pacs, sink, clock):
    ctx = AdapterContext(node_id=NODE, sink=sink, log_key=b"k" * 32, clock=clock)
    settings = DicomSettings.model_validate({"name": "pacs", "kind": "dicom", "peer": pacs.peer})
    adapter = build_adapter(settings, ctx)
    assert isinstance(adapter, DicomAdapter)
    assert isinstance(adapter, Poller)
    assert isinstance(adapter, Listener)
    adapter.start()  # metadata only: nothing to listen on
    adapter.stop(timeout_secs=1)


# -- polling ---------------------------------------------------------------------------


def test_first_poll_records_every_study_with_the_cursor_in_the_same_commit(pacs, sink, clock):
    studies = [make_study(study_date=day(d), series=2, instances=2) for d in (0, 1, 2)]
    for s in studies:
        pacs.add(s)
    adapter = make(pacs, sink, clock)
    report = adapter.poll()
    assert report.complete
    assert report.found == 3
    assert report.new == 3
    assert report.cursor == NOW.isoformat()
    records, cursor = sink.puts[-1]
    assert cursor == Cursor("pacs", NOW.isoformat())
    assert records
    assert sink.cursor("pacs") == NOW.isoformat()
    by_uid = {r.source.ref: r for r in sink.records}
    for s in studies:
        rec = by_uid[str(s[0].StudyInstanceUID)]
        pairs = [(str(d.SeriesInstanceUID), str(d.SOPInstanceUID)) for d in s]
        assert rec.id == dicom_id(NODE, str(s[0].StudyInstanceUID), pairs)
        assert rec.service is Service.IMAGING_STUDY
        assert rec.patient is not None
        assert rec.patient.national_id == "0012345679"
        assert rec.patient.national_id_valid
        assert rec.occurred_at == dt.datetime.combine(
            dt.date.fromisoformat(str(s[0].StudyDate)), dt.time(9, 30), TEHRAN
        )
    # Lookback: the first poll asked about the last two days and today.
    assert str(pacs.queries[0].StudyDate) == f"{day(2)}-{day(0)}"


def test_a_second_poll_commits_nothing_and_asks_no_series_or_image_queries(pacs, sink, clock):
    for d in (0, 1):
        pacs.add(make_study(study_date=day(d), instances=3))
    adapter = make(pacs, sink, clock)
    assert adapter.poll().new == 2
    pacs.queries.clear()
    clock.advance(300)
    report = adapter.poll()
    assert report.complete
    assert report.found == 2
    assert report.new == 0
    assert levels(pacs) == ["STUDY"]  # declared counts unchanged: no detail queries
    assert sink.puts[-1] == (
        [],
        Cursor("pacs", dt.datetime.fromtimestamp(clock(), TEHRAN).isoformat()),
    )


def test_a_study_that_gained_an_instance_yields_a_new_version(pacs, sink, clock):
    study = make_study(study_date=day(0), instances=2)
    pacs.add(study)
    adapter = make(pacs, sink, clock)
    adapter.poll()
    first = sink.records[-1]
    pacs.add([another_instance(study[-1])])
    report = adapter.poll()
    assert report.new == 1
    second = sink.records[-1]
    assert second.id != first.id
    assert second.source.ref == first.source.ref
    imaging = second.body["entry"][1]["resource"]
    assert imaging["numberOfInstances"] == 3
    assert len(imaging["series"][0]["instance"]) == 3


def test_without_declared_counts_unchanged_studies_yield_no_new_record(sink, clock):
    # dcmqrscp-like: no NumberOfStudyRelated*, no SOPClassUID at IMAGE level.
    with FakePacs(counts=False, sop_class=False) as pacs:
        study = make_study(study_date=day(0), instances=2)
        pacs.add(study)
        adapter = make(pacs, sink, clock)
        assert adapter.poll().new == 1
        assert adapter.poll().new == 0
        assert "IMAGE" in levels(pacs)[-2:]  # it had to look, and found the same id
        pacs.add([another_instance(study[0])])
        assert adapter.poll().new == 1
    imaging = sink.records[-1].body["entry"][1]["resource"]
    assert imaging["numberOfInstances"] == 3
    assert "instance" not in imaging["series"][0]  # sopClass unknown: counted, not listed


def test_a_restarted_agent_re_describes_the_lookback_but_commits_only_duplicates(pacs, sink, clock):
    pacs.add(make_study(study_date=day(1)))
    make(pacs, sink, clock).poll()
    report = make(pacs, sink, clock).poll()  # a new adapter: empty LRU
    assert report.new == 0
    assert report.duplicates == 1


def test_busy_days_are_split_until_no_window_is_capped(sink, clock):
    with FakePacs(cap=2, cap_status=0x0000) as pacs:  # truncates silently at 2
        uids = set()
        for i in range(7):
            s = make_study(study_date=day(i % 2), study_time=f"{8 + i:02d}0000", instances=1)
            pacs.add(s)
            uids.add(str(s[0].StudyInstanceUID))
        adapter = make(pacs, sink, clock, max_results_per_query=2)
        report = adapter.poll()
    assert report.complete
    assert report.found == 7
    assert {r.source.ref for r in sink.records} == uids


def test_a_pacs_that_is_down_gives_an_incomplete_report_and_keeps_the_cursor(sink, clock):
    sink.buf.set_cursor(Cursor("pacs", "2025-03-21T08:00:00+03:30"))
    port = free_port()
    adapter = make({"ae_title": "PACS", "host": "127.0.0.1", "port": port}, sink, clock)
    report = adapter.poll()
    assert not report.complete
    assert report.new == 0
    assert f"PACS@127.0.0.1:{port}" in report.notes[0]
    assert "refused" in report.notes[0]
    assert sink.cursor("pacs") == "2025-03-21T08:00:00+03:30"


def test_an_abort_mid_poll_keeps_the_cursor_and_the_next_poll_completes(pacs, sink, clock):
    for i in range(3):
        pacs.add(make_study(study_date=day(0), study_time=f"1{i}0000"))
    adapter = make(pacs, sink, clock)
    pacs.abort_next(after=1)
    report = adapter.poll()
    assert not report.complete
    assert "ABORT" in report.notes[0]
    assert sink.cursor("pacs") is None
    report = adapter.poll()
    assert report.complete
    assert report.new == 3
    assert sink.cursor("pacs") is not None


def test_a_failure_status_names_the_peer_and_status_and_keeps_the_cursor(pacs, sink, clock):
    pacs.add(make_study(study_date=day(0)))
    adapter = make(pacs, sink, clock)
    pacs.fail_next(0xC000)
    report = adapter.poll()
    assert not report.complete
    assert "0xC000" in report.notes[0]
    assert f"FAKEPACS@127.0.0.1:{pacs.port}" in report.notes[0]
    assert sink.cursor("pacs") is None


def test_a_timeout_mid_poll_is_reported_not_raised(pacs, sink, clock):
    pacs.add(make_study(study_date=day(0)))
    adapter = make(pacs, sink, clock, timeouts=net.Timeouts(connect=3, acse=5, dimse=0.5))
    pacs.hang_next()
    report = adapter.poll()
    assert not report.complete
    assert "DIMSE timeout" in report.notes[0]


def test_a_window_still_capped_in_one_second_keeps_the_cursor(sink, clock):
    with FakePacs(cap=2) as pacs:
        for _ in range(3):
            pacs.add(make_study(study_date=day(0), study_time="101010"))
        report = make(pacs, sink, clock).poll()
    assert not report.complete
    assert "still capped" in report.notes[0]
    assert report.new == 2  # what was seen is committed; ids make the retry harmless
    assert sink.cursor("pacs") is None


def test_the_modalities_filter_keeps_only_matching_studies(pacs, sink, clock):
    ct = make_study(study_date=day(0), modality="CT")
    mr = make_study(study_date=day(0), modality="MR")
    pacs.add(ct)
    pacs.add(mr)
    report = make(pacs, sink, clock, modalities=["MR"]).poll()
    assert report.found == 2
    assert report.new == 1
    assert sink.records[0].source.ref == str(mr[0].StudyInstanceUID)


def test_next_poll_overlaps_the_last_window_by_the_lookback(pacs, sink, clock):
    adapter = make(pacs, sink, clock, lookback="6h")
    adapter.poll()
    clock.advance(24 * 3600)
    adapter.poll()
    # cursor 2025-03-22 12:00, minus 6 h -> from 2025-03-22, up to the new today.
    assert str(pacs.queries[-1].StudyDate) == "20250322-20250323"


# -- backfill --------------------------------------------------------------------------


def test_backfill_walks_day_by_day_reports_progress_and_resumes(pacs, sink, clock):
    days = [dt.date(2025, 1, d) for d in range(1, 6)]
    for d in days:
        pacs.add(make_study(study_date=d.strftime("%Y%m%d")))
    adapter = make(pacs, sink, clock)
    seen: list[int] = []
    original = pacs._answer
    failed: list[str] = []

    def answer(q: Dataset) -> Any:
        # Day 3's study-level C-FIND fails once: days 1-2 are committed, with the cursor.
        if q.QueryRetrieveLevel == "STUDY" and q.StudyDate == "20250103" and not failed:
            failed.append(str(q.StudyDate))
            return iter([(0xC000, None)])
        return original(q)

    pacs._answer = answer  # type: ignore[method-assign]
    report = adapter.backfill(days[0], days[-1], progress=lambda r: seen.append(r.found))
    assert not report.complete
    assert sink.cursor("pacs:backfill") == "2025-01-01..2025-01-05 done 2025-01-02"
    assert sink.cursor("pacs") is None  # the live cursor is never moved
    pacs._answer = original  # type: ignore[method-assign]
    pacs.queries.clear()
    seen.clear()
    report = adapter.backfill(days[0], days[-1], progress=lambda r: seen.append(r.found))
    assert report.complete
    assert [str(q.StudyDate) for q in pacs.queries if q.QueryRetrieveLevel == "STUDY"] == [
        "20250103",
        "20250104",
        "20250105",
    ]
    assert sink.cursor("pacs:backfill") == "2025-01-01..2025-01-05 done 2025-01-05"
    assert len({r.source.ref for r in sink.records}) == 5
    assert seen == [1, 2, 3]  # a callback per day, with the run's running totals


def test_backfill_repeated_is_harmless(pacs, sink, clock):
    pacs.add(make_study(study_date="20250101"))
    adapter = make(pacs, sink, clock)
    first = adapter.backfill(dt.date(2025, 1, 1), dt.date(2025, 1, 2))
    again = make(pacs, sink, clock).backfill(dt.date(2025, 1, 1), dt.date(2025, 1, 2))
    assert first.new == 1
    assert again.new == 0
    assert again.duplicates == 1


def test_backfill_refuses_a_range_that_ends_before_it_starts(pacs, sink, clock):
    with pytest.raises(AdapterError, match="before"):
        make(pacs, sink, clock).backfill(dt.date(2025, 1, 2), dt.date(2025, 1, 1))


# -- retrieval (the adapter side; C-MOVE itself is adapters.dicom.retrieve) -------------


@dataclass
class Stored:
    sop_instance_uid: str
    series_instance_uid: str
    sha256: str
    size: int


@dataclass
class Result:
    complete: bool
    instances: list[Stored]
    failed: int = 0
    warning: int = 0
    status: int | None = 0x0000
    detail: str = ""


@dataclass
class FakeRetriever:
    pacs: FakePacs
    sink: Any
    drop: int = 0  # instances to lose on the next retrieval (a partial C-MOVE)
    started: int = 0
    stopped: int = 0
    moves: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.started += 1

    def stop(self, *, timeout_secs: float = 10.0) -> None:
        self.stopped += 1

    def retrieve_study(self, study_uid: str) -> Result:
        self.moves.append(study_uid)
        st = self.pacs.studies[study_uid]
        out = []
        for _first, instances in st.series.values():
            for ds in instances:
                sha, size = self.sink.add_blob(
                    f"DICM {ds.SOPInstanceUID}".encode(), media_type="application/dicom"
                )
                out.append(Stored(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), sha, size))
        if self.drop:
            out, self.drop = out[self.drop :], 0
            return Result(False, out, failed=1, status=0xB000, detail="1 sub-operation failed")
        return Result(True, out)


def test_retrieved_instances_are_blobs_and_only_complete_studies_are_committed(pacs, sink, clock):
    study = make_study(study_date=day(0), series=2, instances=2)
    pacs.add(study)
    made: list[FakeRetriever] = []

    def factory(settings: DicomSettings, s: Any) -> FakeRetriever:
        made.append(FakeRetriever(pacs, s, drop=1))
        return made[-1]

    adapter = make(pacs, sink, clock, retrieve="instances", retriever_factory=factory)
    adapter.start()
    assert made[0].started == 1
    report = adapter.poll()  # the C-MOVE lost one instance
    assert not report.complete
    assert report.new == 0
    assert "3 of 4 instances received" in report.notes[0]
    assert "0xB000" in report.notes[0]
    assert sink.cursor("pacs") is None
    report = adapter.poll()  # retried, complete this time
    assert report.complete
    assert report.new == 1
    rec = sink.records[-1]
    assert len(rec.blobs) == 4
    assert {b.media_type for b in rec.blobs} == {"application/dicom"}
    assert rec.to_wire()["blobs"]
    assert adapter.poll().new == 0
    assert len(made[0].moves) == 2
    adapter.stop()
    assert made[0].stopped == 1


# -- doctor, logs ----------------------------------------------------------------------


def test_checks_report_c_echo_success_and_a_rejected_association(pacs, sink, clock):
    [ok] = make(pacs, sink, clock).checks()
    assert ok.ok
    assert "0x0000" in ok.detail
    assert "FAKEPACS@127.0.0.1" in ok.name
    with FakePacs(known_callers=("OTHER",)) as strict:
        [bad] = make(strict, sink, clock).checks()
    assert not bad.ok
    assert "rejected" in bad.detail
    assert bad.hint
    [down] = make({"ae_title": "X", "host": "127.0.0.1", "port": free_port()}, sink, clock).checks()
    assert not down.ok
    assert "refused" in down.detail


def test_logs_carry_no_patient_names_or_national_codes(pacs, sink, clock, caplog):
    caplog.set_level(logging.DEBUG)
    pacs.add(make_study(study_date=day(0)))
    adapter = make(pacs, sink, clock)
    adapter.poll()
    pacs.fail_next(0xC000)
    adapter.poll()
    text = caplog.text
    assert caplog.records  # pynetdicom and the adapter did log
    for phi in (PERSIAN_NAME, "کریمی", "0012345679", PERSIAN_DIGIT_ID):
        assert phi not in text


def test_poll_report_type(pacs, sink, clock):
    assert isinstance(make(pacs, sink, clock).poll(), PollReport)
    assert isinstance(sink.put([]), PutReport)
