"""Study Root C-FIND against a real pynetdicom SCP in process (tests.fakepacs).

What it proves: capped windows are split (by date, then by time within a day) until
no answer is capped, whichever way the PACS signals the cap (Cancel as Orthanc does,
"out of resources", or silent truncation caught by max_results_per_query); a window
that cannot be split further is reported incomplete, never answered; failure and
pending-warning statuses; association rejected, aborted in the middle of a C-FIND,
a C-FIND that never answers, a PACS that is down, each named with peer and status;
TCP_NODELAY on both ends; an ISO_IR 127 answer decodes right over the wire.
"""

from __future__ import annotations

import datetime as dt
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset

from adapters.dicom import net, query
from adapters.dicom.mapping import patient_resource
from agent.errors import PeerProtocolError, PeerUnavailableError
from agent.nationalcode import normalise
from tests.fakepacs import FakePacs
from tests.interop.pacs_peers import ARABIC_NAME, free_port, make_study

pytestmark = pytest.mark.timeout(60)

D1, D2, D3 = dt.date(2025, 3, 20), dt.date(2025, 3, 21), dt.date(2025, 3, 22)
QUICK = net.Timeouts(connect=3, acse=5, dimse=5, network=10)


def _day(d: dt.date) -> str:
    return d.strftime("%Y%m%d")


@pytest.fixture
def pacs() -> Iterator[FakePacs]:
    with FakePacs() as p:
        yield p


def _session(pacs: FakePacs, timeouts: net.Timeouts = QUICK) -> Any:
    ae = net.make_ae("SEPASAGENT", timeouts=timeouts)
    return net.associate(ae, net.Peer(pacs.ae_title, "127.0.0.1", pacs.port), timeouts=timeouts)


def _load_busy_days(pacs: FakePacs) -> set[str]:
    uids = set()
    plan = [(D1, "080000"), (D1, "090000")]
    plan += [(D2, f"{h:02d}1500") for h in (1, 7, 9, 13, 18)]  # busy day: 5 studies
    plan += [(D3, "101010.5")]
    for day, tm in plan:
        ds = make_study(study_date=_day(day), study_time=tm, instances=1)
        pacs.add(ds)
        uids.add(str(ds[0].StudyInstanceUID))
    return uids


def _found(answers: list[query.WindowAnswer]) -> list[str]:
    return [str(s.StudyInstanceUID) for a in answers for s in a.studies]


def test_a_capped_window_is_split_by_date_then_by_time_until_no_answer_is_capped(pacs):
    pacs.cap = 3
    uids = _load_busy_days(pacs)
    with _session(pacs) as session:
        answers = list(query.find_studies(session, query.Window(D1, D3), cap=None))
    found = _found(answers)
    assert sorted(found) == sorted(uids)  # every study, each exactly once
    assert all(a.complete for a in answers)
    assert all(len(a.studies) <= 3 for a in answers)
    # The busy day was asked by StudyTime ranges (fractional seconds fall in one half).
    time_queries = [str(q.StudyTime) for q in pacs.queries if q.get("StudyTime")]
    assert time_queries
    assert all(t.endswith(".999999") for t in time_queries)
    # Windows come back in ascending order and never overlap.
    starts = [(a.window.first, (a.window.seconds or (0, 0))[0]) for a in answers]
    assert starts == sorted(starts)


def test_silent_truncation_is_caught_by_max_results_per_query(pacs):
    pacs.cap, pacs.cap_status = 3, 0x0000  # truncates and says Success
    uids = _load_busy_days(pacs)
    with _session(pacs) as session:
        blind = _found(list(query.find_studies(session, query.Window(D1, D3), cap=None)))
        told = _found(list(query.find_studies(session, query.Window(D1, D3), cap=3)))
    assert len(blind) == 3  # why the setting exists: nothing in the answer says "more"
    assert sorted(told) == sorted(uids)


def test_out_of_resources_is_treated_as_a_cap_and_split(pacs):
    uids = _load_busy_days(pacs)
    pacs.fail_next(0xA700)
    with _session(pacs) as session:
        answers = list(query.find_studies(session, query.Window(D1, D3), cap=None))
    assert sorted(_found(answers)) == sorted(uids)
    assert len(pacs.queries) == 3  # the refused window, then its two halves


def test_a_one_second_window_still_capped_is_reported_incomplete(pacs):
    pacs.cap = 3
    for _ in range(4):
        pacs.add(make_study(study_date=_day(D2), study_time="093000", instances=1))
    with _session(pacs) as session:
        answers = list(query.find_studies(session, query.Window(D2, D2), cap=None))
    incomplete = [a for a in answers if not a.complete]
    assert len(incomplete) == 1
    w = incomplete[0].window
    assert w.seconds is not None
    assert w.seconds[0] == w.seconds[1] == 9 * 3600 + 30 * 60
    assert incomplete[0].status == 0xFE00


def test_a_failure_status_raises_peer_protocol_error_naming_peer_and_status(pacs):
    pacs.fail_next(0xC311)
    with _session(pacs) as session, pytest.raises(PeerProtocolError) as e:
        list(query.find_studies(session, query.Window(D1, D1), cap=None))
    assert "0xC311" in str(e.value)
    assert f"FAKEPACS@127.0.0.1:{pacs.port}" in str(e.value)


def test_pending_with_warning_statuses_are_matches(pacs):
    a, b = make_study(study_date=_day(D1))[0], make_study(study_date=_day(D1))[0]

    def run(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        yield 0xFF01, a  # "matches are continuing, warning": optional keys unsupported
        yield 0xFF00, b
        yield 0x0000, None

    pacs.script.append(run)
    with _session(pacs) as session:
        answers = list(query.find_studies(session, query.Window(D1, D1), cap=None))
    assert len(_found(answers)) == 2
    assert answers[0].complete


def test_series_and_image_queries_describe_the_study(pacs):
    datasets = make_study(study_date=_day(D1), series=2, instances=3)
    pacs.add(datasets)
    with _session(pacs) as session:
        [answer] = list(query.find_studies(session, query.Window(D1, D1), cap=None))
        detail = query.study_detail(session, answer.studies[0], cap=None)
    assert len(detail.series) == 2
    assert all(len(s.instances) == 3 for s in detail.series)
    assert sorted(detail.instance_uids()) == sorted(
        (str(d.SeriesInstanceUID), str(d.SOPInstanceUID)) for d in datasets
    )
    assert [s.identifier.SeriesNumber for s in detail.series] == [1, 2]
    levels = [str(q.QueryRetrieveLevel) for q in pacs.queries]
    assert levels == ["STUDY", "SERIES", "IMAGE", "IMAGE"]
    assert all(q.SpecificCharacterSet == "ISO_IR 192" for q in pacs.queries)


def test_a_capped_image_level_answer_is_an_error_not_a_smaller_study(pacs):
    pacs.add(make_study(study_date=_day(D1), instances=5))
    with _session(pacs) as session:
        [answer] = list(query.find_studies(session, query.Window(D1, D1), cap=None))
        pacs.cap = 3
        with pytest.raises(query.CappedDetailError):
            query.study_detail(session, answer.studies[0], cap=None)


def test_an_iso_ir_127_answer_decodes_right_over_the_wire(pacs):
    pacs.add(make_study(patient_name=ARABIC_NAME, charset="ISO_IR 127", study_date=_day(D1)))
    with _session(pacs) as session:
        [answer] = list(query.find_studies(session, query.Window(D1, D1), cap=None))
    ident = answer.studies[0]
    assert ident.SpecificCharacterSet == "ISO_IR 127"  # sent in ISO-8859-6
    assert str(ident.PatientName) == ARABIC_NAME
    res = patient_resource(ident, normalise(str(ident.PatientID)), node_id="N", adapter="pacs")
    assert res["name"][0]["family"] == "کریمی"  # Arabic kaf/yeh folded to Persian
    assert res["name"][0]["given"] == ["علی"]


def test_association_rejected_names_the_peer_and_the_reason():
    pacs = FakePacs(known_callers=("SOMEONE",))
    with pacs, pytest.raises(PeerUnavailableError) as e, _session(pacs):
        pass
    msg = str(e.value)
    assert f"FAKEPACS@127.0.0.1:{pacs.port}" in msg
    assert "rejected" in msg
    assert "calling ae title not recognised" in msg.lower()
    assert "modalities" in e.value.hint


def test_an_abort_in_the_middle_of_a_find_is_a_peer_protocol_error(pacs):
    for _ in range(3):
        pacs.add(make_study(study_date=_day(D1), instances=1))
    pacs.abort_next(after=1)
    with _session(pacs) as session, pytest.raises(PeerProtocolError) as e:
        list(query.find_studies(session, query.Window(D1, D1), cap=None))
    assert "A-ABORT" in str(e.value) or "A-P-ABORT" in str(e.value)
    assert f"FAKEPACS@127.0.0.1:{pacs.port}" in str(e.value)


def test_a_find_that_never_answers_times_out_with_the_dimse_timeout(pacs):
    pacs.hang_next()
    quick = net.Timeouts(connect=3, acse=5, dimse=0.5, network=10)
    started = time.monotonic()
    with _session(pacs, quick) as session, pytest.raises(PeerProtocolError) as e:
        list(query.find_studies(session, query.Window(D1, D1), cap=None))
    assert "DIMSE timeout" in str(e.value)
    assert "0.5 s" in str(e.value)
    assert time.monotonic() - started < 5


def test_a_pacs_that_is_down_is_peer_unavailable():
    port = free_port()
    ae = net.make_ae("SEPASAGENT", timeouts=QUICK)
    with (
        pytest.raises(PeerUnavailableError) as e,
        net.associate(ae, net.Peer("PACS", "127.0.0.1", port), timeouts=QUICK),
    ):
        pass
    assert f"PACS@127.0.0.1:{port}" in str(e.value)
    assert "refused" in str(e.value)


def test_c_echo_answers_success(pacs):
    assert net.echo("SEPASAGENT", net.Peer(pacs.ae_title, "127.0.0.1", pacs.port)) == 0


def test_tcp_nodelay_is_set_on_our_socket_and_on_the_scp_side(pacs):
    with _session(pacs) as session:
        ours = session.assoc.dul.socket.socket
        assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        [theirs] = pacs._server.active_associations
        sock = theirs.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_windows_split_in_halves_cover_the_range_exactly():
    w = query.Window(D1, D3)
    a, b = w.halves()
    assert (a.first, a.last, b.first, b.last) == (D1, D2, D3, D3)
    day = query.Window(D2, D2)
    x, y = day.halves()
    assert x.study_time == "000000-115959.999999"
    assert y.study_time == "120000-235959.999999"
    one = query.Window(D2, D2, (5, 5))
    assert one.halves() is None
    assert one.study_time == "000005-000005.999999"
    with pytest.raises(ValueError, match="before"):
        query.Window(D2, D1)
