"""The dicom adapter against a real Orthanc (Debian's 1.10), confined to loopback.

Orthanc is started per test by tests.interop.pacs_peers with its own config and
storage on free 127.0.0.1 ports (an LD_PRELOAD bind shim keeps it off every other
interface; the fixture checks /proc/net/tcp), and loaded over C-STORE with
synthetic studies. Skipped without Orthanc, failed under SEPAS_REQUIRE_PEERS=1.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from adapters.dicom import net
from adapters.dicom.adapter import DicomAdapter
from adapters.dicom.settings import DicomSettings
from agent.adapter import AdapterContext
from agent.buffer import Buffer
from agent.dates import TEHRAN
from agent.record import Record
from agent.testing import FakeClock
from tests.interop.pacs_peers import (
    ARABIC_NAME,
    OrthancPeer,
    free_port,
    load,
    make_study,
    orthanc,
)

pytestmark = [pytest.mark.peers, pytest.mark.timeout(90)]

NODE = "FAC-0001"
NOW = dt.datetime(2025, 3, 22, 12, 0, tzinfo=TEHRAN)
TIMEOUTS = net.Timeouts(connect=5, acse=10, dimse=20, network=30)


def day(d: int) -> str:
    return (NOW.date() - dt.timedelta(days=d)).strftime("%Y%m%d")


@pytest.fixture
def start_orthanc(tmp_path: Path) -> Iterator[Callable[..., OrthancPeer]]:
    started: list[OrthancPeer] = []

    def start(**kw: Any) -> OrthancPeer:
        started.append(orthanc(tmp_path, **kw))
        return started[-1]

    yield start
    for peer in started:
        peer.stop()


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[Buffer]:
    buf = Buffer.open(tmp_path / "agent", data_key=None)
    yield buf
    buf.close()


def adapter_for(
    peer: OrthancPeer, buffer: Buffer, *, ae_title: str = "SEPASAGENT", **overrides: Any
) -> DicomAdapter:
    settings = DicomSettings.model_validate(
        {
            "name": "pacs",
            "kind": "dicom",
            "ae_title": ae_title,
            "peer": {"ae_title": peer.ae_title, "host": peer.host, "port": peer.port},
            **overrides,
        }
    )
    ctx = AdapterContext(
        node_id=NODE, sink=buffer, log_key=b"k" * 32, clock=FakeClock(NOW.timestamp())
    )
    return DicomAdapter(settings, ctx, timeouts=TIMEOUTS)


def committed(buffer: Buffer) -> list[Record]:
    lease = buffer.lease(max_records=1000, max_bytes=1 << 30, lease_secs=60)
    if lease is None:
        return []
    buffer.release(lease)
    return [item.record() for item in lease.items]


@pytest.mark.parametrize("nagle", [False, True], ids=["nodelay", "nagle-at-orthanc"])
def test_polling_finds_loaded_studies_and_a_second_poll_yields_nothing_new(
    start_orthanc, buffer, nagle
):
    peer = start_orthanc(tcp_nodelay=not nagle)
    persian = make_study(study_date=day(0), series=2, instances=2)
    arabic = make_study(patient_name=ARABIC_NAME, charset="ISO_IR 127", study_date=day(1))
    load(peer, persian + arabic)
    adapter = adapter_for(peer, buffer)
    report = adapter.poll()
    assert report.complete, report.notes
    assert report.found == 2
    assert report.new == 2
    records = {r.source.ref: r for r in committed(buffer)}
    names = {
        ref: rec.body["entry"][0]["resource"]["name"][0]["family"] for ref, rec in records.items()
    }
    assert names == {
        str(persian[0].StudyInstanceUID): "کریمی",
        str(arabic[0].StudyInstanceUID): "کریمی",  # ISO-8859-6 ك/ي, folded
    }
    study = records[str(persian[0].StudyInstanceUID)].body["entry"][1]["resource"]
    assert study["numberOfSeries"] == 2
    assert study["numberOfInstances"] == 4
    again = adapter.poll()
    assert again.complete
    assert again.found == 2
    assert again.new == 0


def test_a_study_gaining_an_instance_yields_a_new_version(start_orthanc, buffer):
    peer = start_orthanc()
    study = make_study(study_date=day(0), instances=2)
    load(peer, study)
    adapter = adapter_for(peer, buffer)
    assert adapter.poll().new == 1
    extra = copy.deepcopy(study[-1])
    extra.SOPInstanceUID = generate_uid()
    extra.file_meta.MediaStorageSOPInstanceUID = extra.SOPInstanceUID
    extra.InstanceNumber = 3
    load(peer, [extra])
    report = adapter.poll()
    assert report.new == 1
    versions = [r for r in committed(buffer) if r.source.ref == str(study[0].StudyInstanceUID)]
    assert len(versions) == 2
    counts = sorted(v.body["entry"][1]["resource"]["numberOfInstances"] for v in versions)
    assert counts == [2, 3]


def test_limit_find_results_capped_windows_are_split_until_every_study_is_found(
    start_orthanc, buffer
):
    peer = start_orthanc(limit_find_results=3)
    uids = set()
    datasets = []
    for i in range(8):  # 6 on the busy day, 2 the day before
        s = make_study(study_date=day(0 if i < 6 else 1), study_time=f"{7 + i:02d}1500")
        datasets += s
        uids.add(str(s[0].StudyInstanceUID))
    load(peer, datasets)
    report = adapter_for(peer, buffer).poll()
    assert report.complete, report.notes
    assert report.found == 8
    assert {r.source.ref for r in committed(buffer)} == uids
    assert "Too many results" in peer.log_path.read_text()  # Orthanc did cap


def test_a_pacs_that_is_down_gives_an_incomplete_report_naming_it(start_orthanc, buffer):
    peer = start_orthanc()
    adapter = adapter_for(peer, buffer)
    peer.stop()
    report = adapter.poll()
    assert not report.complete
    assert f"ORTHANC@127.0.0.1:{peer.port}" in report.notes[0]
    assert buffer.cursor("pacs") is None
    [check] = adapter.checks()
    assert not check.ok
    assert "refused" in check.detail


def test_orthanc_rejecting_our_ae_is_reported_until_it_knows_us(start_orthanc, buffer):
    peer = start_orthanc(known_aes_only=True)
    adapter = adapter_for(peer, buffer)
    report = adapter.poll()
    assert not report.complete
    assert "rejected the association" in report.notes[0]
    assert f"ORTHANC@127.0.0.1:{peer.port}" in report.notes[0]
    [check] = adapter.checks()
    assert not check.ok
    assert "modalities" in check.hint
    peer.add_modality("SEPASAGENT", "127.0.0.1", 11113)  # what the hint tells the operator
    assert adapter.poll().complete
    [check] = adapter.checks()
    assert check.ok


def test_orthanc_checking_the_called_ae_rejects_a_wrong_peer_title(start_orthanc, buffer):
    peer = start_orthanc(check_called_ae=True)
    wrong = adapter_for(peer, buffer)
    wrong.peer = net.Peer("NOTORTHANC", peer.host, peer.port)
    report = wrong.poll()
    assert not report.complete
    assert "rejected" in report.notes[0]
    assert "called ae title not recognised" in report.notes[0].lower()
    assert adapter_for(peer, buffer).poll().complete


def test_c_echo_check_against_orthanc(start_orthanc, buffer):
    peer = start_orthanc()
    [check] = adapter_for(peer, buffer).checks()
    assert check.ok
    assert "0x0000" in check.detail


def test_backfill_walks_days_against_orthanc(start_orthanc, buffer):
    peer = start_orthanc(limit_find_results=2)
    for d in range(3):
        load(peer, make_study(study_date=f"202501{d + 1:02d}", study_time="080000"))
        load(peer, make_study(study_date=f"202501{d + 1:02d}", study_time="160000"))
        load(peer, make_study(study_date=f"202501{d + 1:02d}", study_time="200000"))
    seen: list[int] = []
    report = adapter_for(peer, buffer).backfill(
        dt.date(2025, 1, 1), dt.date(2025, 1, 3), progress=lambda r: seen.append(r.found)
    )
    assert report.complete, report.notes
    assert report.new == 9
    assert seen == [3, 6, 9]
    assert buffer.cursor("pacs:backfill") == "2025-01-01..2025-01-03 done 2025-01-03"


def test_instances_mode_commits_each_study_with_its_retrieved_blobs(start_orthanc, buffer):
    peer = start_orthanc()
    port = free_port()
    peer.add_modality("SEPASAGENT", "127.0.0.1", port)
    study = make_study(study_date=day(0), series=2, instances=3)
    load(peer, study)
    adapter = adapter_for(peer, buffer, retrieve="instances", listen=f"127.0.0.1:{port}")
    adapter.start()
    try:
        report = adapter.poll()
        assert report.complete, report.notes
        assert report.new == 1
        [rec] = committed(buffer)
        assert len(rec.blobs) == 6
        for blob in rec.blobs:
            data = buffer.blob_path(blob.sha256).read_bytes()
            assert len(data) == blob.size
            assert data[128:132] == b"DICM"
        assert adapter.poll().new == 0  # unchanged: no second C-MOVE needed
    finally:
        adapter.stop(timeout_secs=5)
