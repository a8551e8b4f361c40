"""C-MOVE into our storage SCP from real PACS: Orthanc (Debian's 1.10) and dcmtk's dcmqrscp.

What it proves: whole studies arrive with the instance counts Orthanc holds, every
instance is a blob in the buffer; a move cut off in the middle (Orthanc frozen with
SIGSTOP, or stopped) is incomplete, names the error, and a later retry completes;
Orthanc with Nagle's algorithm on and off both work (instances/s printed: run with
``-s`` to see them); a PACS that does not know our AE title refuses the move; a move
from dcmqrscp works. The peers run on 127.0.0.1 only (`tests.interop.pacs_peers`).
Skipped when a binary is absent, failed instead under ``SEPAS_REQUIRE_PEERS=1``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from pydicom.dataset import Dataset

from adapters.dicom import net
from adapters.dicom.retrieve import RetrieveLimits, Retriever, RetrieveResult
from adapters.dicom.settings import DicomPeer, DicomSettings
from agent.buffer import Buffer
from agent.errors import PeerProtocolError, PeerUnavailableError
from tests.interop.pacs_peers import (
    ARABIC_NAME,
    OrthancPeer,
    dcmqrscp,
    free_port,
    load,
    make_study,
    orthanc,
)

pytestmark = [pytest.mark.peers, pytest.mark.timeout(90)]

OUR_AE = "SEPASAGENT"
#: Short DIMSE timeout: a frozen PACS is noticed in 3 s.
LIMITS = RetrieveLimits(
    timeouts=net.Timeouts(connect=5, acse=10, dimse=3, network=30), move_timeout_secs=60
)


class CountingSink:
    """The buffer's add_blob, counting instances, so a test can act mid-move."""

    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer
        self.count = 0
        self.reached = threading.Event()
        self.when = 0

    def add_blob(self, src: IO[bytes] | bytes, *, media_type: str) -> tuple[str, int]:
        out = self.buffer.add_blob(src, media_type=media_type)
        self.count += 1
        if self.when and self.count >= self.when:
            self.reached.set()
        return out


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[Buffer]:
    buf = Buffer.open(tmp_path / "data", data_key=None)
    yield buf
    buf.close()


@pytest.fixture
def retriever(buffer: Buffer) -> Iterator[Callable[..., tuple[Retriever, CountingSink]]]:
    """Start a Retriever for a peer; registers our AE with an Orthanc peer."""
    started: list[Retriever] = []

    def start(peer: Any, *, register: bool = True) -> tuple[Retriever, CountingSink]:
        settings = DicomSettings(
            name="pacs",
            kind="dicom",
            ae_title=OUR_AE,
            listen="127.0.0.1:0",
            peer=DicomPeer(ae_title=peer.ae_title, host=peer.host, port=peer.port),
            retrieve="instances",
        )
        sink = CountingSink(buffer)
        r = Retriever(settings, sink, limits=LIMITS)
        r.start()
        started.append(r)
        if register and isinstance(peer, OrthancPeer):
            peer.add_modality(OUR_AE, *r.address)
        return r, sink

    yield start
    for r in started:
        r.stop(timeout_secs=5)


def _check_complete(result: RetrieveResult, sent: list[Dataset], buffer: Buffer) -> None:
    assert result.complete, result.detail
    assert result.status == 0x0000
    assert result.failed == 0
    assert result.completed == len(sent)
    assert {i.sop_instance_uid for i in result.instances} == {str(d.SOPInstanceUID) for d in sent}
    for inst in result.instances:
        assert buffer.blob_path(inst.sha256).stat().st_size == inst.size
        assert buffer.blob_info(inst.sha256) is not None


# -- Orthanc ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One Orthanc (Nagle off) with three studies: 2x5, 1x3 and 1x150 instances."""
    peer = orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        studies = {
            "two_series": make_study(series=2, instances=5, pixels=70),
            "small": make_study(
                series=1, instances=3, pixels=70, charset="ISO_IR 127", patient_name=ARABIC_NAME
            ),
            "big": make_study(series=1, instances=150, pixels=70),
        }
        for datasets in studies.values():
            load(peer, datasets)
        yield {"peer": peer, **studies}
    finally:
        peer.stop()


def test_orthanc_moves_whole_studies_with_the_counts_it_holds(loaded_orthanc, retriever, buffer):
    peer: OrthancPeer = loaded_orthanc["peer"]
    r, _ = retriever(peer)
    for name in ("two_series", "small"):
        sent = loaded_orthanc[name]
        uid = str(sent[0].StudyInstanceUID)
        assert len(peer.instance_uids(uid)) == len(sent)
        _check_complete(r.retrieve_study(uid), sent, buffer)
    assert buffer.stats().blob_count == 13


def test_a_move_frozen_in_the_middle_is_incomplete_and_a_retry_completes(
    loaded_orthanc, retriever, buffer
):
    peer: OrthancPeer = loaded_orthanc["peer"]
    r, sink = retriever(peer)
    sent = loaded_orthanc["big"]
    uid = str(sent[0].StudyInstanceUID)
    sink.when = 20
    results: list[RetrieveResult] = []
    t = threading.Thread(target=lambda: results.append(r.retrieve_study(uid)))
    t.start()
    try:
        assert sink.reached.wait(30), "the move never got going"
        os.kill(peer.proc.pid, signal.SIGSTOP)  # our own child, by pid
        t.join(20)
    finally:
        os.kill(peer.proc.pid, signal.SIGCONT)
    assert results, "retrieve_study did not return"
    first = results[0]
    assert not first.complete
    assert 20 <= len(first.instances) < len(sent)
    assert isinstance(first.error, PeerProtocolError)
    assert "DIMSE timeout" in first.detail
    assert peer.ae_title in first.detail

    # Orthanc may still finish sub-operations of the first move after SIGCONT; those
    # are refused (no move waiting) or make the next attempt disagree. The adapter
    # retries on its next poll; here, up to three times.
    for _attempt in range(3):
        result = r.retrieve_study(uid)
        if result.complete:
            break
    _check_complete(result, sent, buffer)


def test_a_move_whose_pacs_stops_in_the_middle_is_incomplete(tmp_path, retriever):
    peer = orthanc(tmp_path)
    try:
        sent = make_study(series=1, instances=120, pixels=70)
        load(peer, sent)
        r, sink = retriever(peer)
        sink.when = 10
        results: list[RetrieveResult] = []
        t = threading.Thread(
            target=lambda: results.append(r.retrieve_study(str(sent[0].StudyInstanceUID)))
        )
        t.start()
        assert sink.reached.wait(30), "the move never got going"
        peer.stop()  # SIGTERM to Orthanc's process group
        t.join(20)
    finally:
        peer.stop()
    assert results, "retrieve_study did not return"
    assert not results[0].complete
    assert len(results[0].instances) < len(sent)
    assert isinstance(results[0].error, PeerProtocolError)


@pytest.mark.parametrize("nodelay", [True, False], ids=["orthanc-nodelay", "orthanc-nagle"])
def test_orthanc_with_nagle_on_or_off_both_work(tmp_path, retriever, buffer, nodelay):
    peer = orthanc(tmp_path, tcp_nodelay=nodelay)
    try:
        sent = make_study(series=1, instances=40, pixels=70)
        load(peer, sent)
        r, _ = retriever(peer)
        t0 = time.monotonic()
        result = r.retrieve_study(str(sent[0].StudyInstanceUID))
        secs = time.monotonic() - t0
    finally:
        peer.stop()
    _check_complete(result, sent, buffer)
    print(  # noqa: T201 - the figure the issue asks to see (run with -s)
        f"\nC-MOVE from Orthanc with TCP_NODELAY={int(nodelay)}: {len(sent)} instances "
        f"in {secs:.2f} s = {len(sent) / secs:.0f} instances/s"
    )


def test_a_pacs_that_does_not_know_our_ae_refuses_the_move(tmp_path, retriever, buffer):
    peer = orthanc(tmp_path, known_aes_only=True)
    try:
        sent = make_study(series=1, instances=2, pixels=8)
        peer.add_modality("LOADER", "127.0.0.1", 1)  # it may store, we may not move
        load(peer, sent)
        r, _ = retriever(peer, register=False)
        with pytest.raises(PeerUnavailableError, match=peer.ae_title):
            r.retrieve_study(str(sent[0].StudyInstanceUID))
    finally:
        peer.stop()
    assert buffer.stats().blob_count == 0


# -- dcmqrscp --------------------------------------------------------------------------


def test_dcmqrscp_moves_a_whole_study(tmp_path, buffer):
    # dcmqrscp reads its move destinations at start-up: our port is chosen first.
    port = free_port()
    peer = dcmqrscp(tmp_path, move_destinations={OUR_AE: ("127.0.0.1", port)})
    try:
        sent = make_study(series=2, instances=3, pixels=70)
        load(peer, sent)
        settings = DicomSettings(
            name="pacs",
            kind="dicom",
            ae_title=OUR_AE,
            listen=f"127.0.0.1:{port}",
            peer=DicomPeer(ae_title=peer.ae_title, host=peer.host, port=peer.port),
            retrieve="instances",
        )
        r = Retriever(settings, buffer, limits=LIMITS)
        r.start()
        try:
            result = r.retrieve_study(str(sent[0].StudyInstanceUID))
        finally:
            r.stop(timeout_secs=5)
    finally:
        peer.stop()
    _check_complete(result, sent, buffer)
