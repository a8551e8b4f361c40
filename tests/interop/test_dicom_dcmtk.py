"""The dicom adapter against dcmtk's dcmqrscp (an independent Q/R SCP), on loopback.

dcmqrscp answers less than Orthanc: no NumberOfStudyRelated* counts, no SOPClassUID at
IMAGE level, no OtherPatientIDsSequence; it converts answers to the UTF-8 we ask for.
Skipped without dcmtk, failed under SEPAS_REQUIRE_PEERS=1.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Iterator
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
from tests.interop.pacs_peers import ARABIC_NAME, DcmtkPeer, dcmqrscp, load, make_study

pytestmark = [pytest.mark.peers, pytest.mark.timeout(60)]

NODE = "FAC-0001"
NOW = dt.datetime(2025, 3, 22, 12, 0, tzinfo=TEHRAN)


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[DcmtkPeer]:
    with dcmqrscp(tmp_path) as p:
        yield p


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[Buffer]:
    buf = Buffer.open(tmp_path / "agent", data_key=None)
    yield buf
    buf.close()


def adapter_for(peer: DcmtkPeer, buffer: Buffer, **overrides: Any) -> DicomAdapter:
    settings = DicomSettings.model_validate(
        {
            "name": "pacs",
            "kind": "dicom",
            "peer": {"ae_title": peer.ae_title, "host": peer.host, "port": peer.port},
            **overrides,
        }
    )
    ctx = AdapterContext(
        node_id=NODE, sink=buffer, log_key=b"k" * 32, clock=FakeClock(NOW.timestamp())
    )
    return DicomAdapter(settings, ctx, timeouts=net.Timeouts(connect=5, acse=10, dimse=20))


def committed(buffer: Buffer) -> list[Record]:
    lease = buffer.lease(max_records=1000, max_bytes=1 << 30, lease_secs=60)
    if lease is None:
        return []
    buffer.release(lease)
    return [item.record() for item in lease.items]


def test_polling_dcmqrscp_finds_studies_once_and_new_versions(peer, buffer):
    persian = make_study(study_date="20250322", series=2, instances=2)
    arabic = make_study(patient_name=ARABIC_NAME, charset="ISO_IR 127", study_date="20250321")
    load(peer, persian + arabic)
    adapter = adapter_for(peer, buffer)
    report = adapter.poll()
    assert report.complete, report.notes
    assert report.new == 2
    records = {r.source.ref: r for r in committed(buffer)}
    for study in (persian, arabic):
        pat = records[str(study[0].StudyInstanceUID)].body["entry"][0]["resource"]
        assert pat["name"][0]["family"] == "کریمی"
    imaging = records[str(persian[0].StudyInstanceUID)].body["entry"][1]["resource"]
    assert imaging["numberOfInstances"] == 4
    assert adapter.poll().new == 0  # no counts to compare: described again, same id
    extra = copy.deepcopy(persian[0])
    extra.SOPInstanceUID = generate_uid()
    extra.file_meta.MediaStorageSOPInstanceUID = extra.SOPInstanceUID
    load(peer, [extra])
    assert adapter.poll().new == 1


def test_c_echo_against_dcmqrscp(peer, buffer):
    [check] = adapter_for(peer, buffer).checks()
    assert check.ok
    assert "0x0000" in check.detail
    assert net.echo("SEPASAGENT", net.Peer(peer.ae_title, peer.host, peer.port)) == 0


def test_a_stopped_dcmqrscp_is_reported_not_raised(peer, buffer):
    adapter = adapter_for(peer, buffer)
    peer.stop()
    report = adapter.poll()
    assert not report.complete
    assert f"DCMQRSCP@127.0.0.1:{peer.port}" in report.notes[0]
