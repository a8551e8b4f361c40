"""C-MOVE into our storage SCP, against a pynetdicom Q/R SCP in process as the "PACS".

What it proves: a whole study arrives, is counted, and every blob is a valid Part 10
file whose dataset bytes are exactly what the PACS sent (compressed transfer syntaxes
kept as sent); completeness is judged by counts (a PACS claiming success for an
instance it never sent, a storage failure answered 0xA700, an abort in the middle, an
empty status, a warning: all incomplete); only the configured peer (AE title and
address) may store; success is answered only after ``add_blob`` returned; unsolicited,
unreadable and oversized instances are refused; TCP_NODELAY on both of our sockets; a
PACS that is down raises PeerUnavailableError; stop() is bounded.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import encode
from pynetdicom.transport import ThreadedAssociationServer

from adapters.dicom import net, retrieve
from adapters.dicom.retrieve import (
    CANNOT_UNDERSTAND,
    NOT_AUTHORISED,
    OUT_OF_RESOURCES,
    RetrieveLimits,
    Retriever,
    _judge,
    _Outcome,
)
from adapters.dicom.settings import DicomPeer, DicomSettings
from agent.buffer import Buffer
from agent.errors import CapacityExceededError, PeerProtocolError, PeerUnavailableError
from tests.interop.pacs_peers import SECONDARY_CAPTURE, free_port, make_study

pytestmark = pytest.mark.timeout(60)

OUR_AE = "SEPASTEST"
PACS_AE = "FAKEPACS"
QUICK = net.Timeouts(connect=3, acse=5, dimse=5, network=10)
LIMITS = RetrieveLimits(timeouts=QUICK, move_timeout_secs=20)


# -- a Q/R SCP that performs C-MOVE sub-operations ------------------------------------


class ClosingAE(AE):
    """An AE that closes, at `close_sockets`, every socket its associations opened:
    pynetdicom 3.0.4 leaves the socket of a refused or cut association unclosed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raw_sockets: list[socket.socket] = []

    def _create_socket(self, assoc: Association, address: Any, tls_args: Any) -> Any:
        sock = super()._create_socket(assoc, address, tls_args)
        if sock.socket is not None:
            self.raw_sockets.append(sock.socket)
        return sock

    def close_sockets(self) -> None:
        for sock in self.raw_sockets:
            sock.close()


class MovePacs:
    """A pynetdicom C-MOVE SCP (Study Root) holding datasets in memory.

    ``dest`` maps our AE title to (host, port); ``store_kwargs`` go to the sub-operation
    association (``bind_address``, ``evt_handlers``); ``abort_after`` aborts the C-MOVE
    association after that many sub-operations.
    """

    def __init__(self, *, ae_title: str = PACS_AE) -> None:
        self.ae_title = ae_title
        self.studies: dict[str, list[Dataset]] = {}
        self.dest: dict[str, tuple[str, int]] = {}
        self.store_kwargs: dict[str, Any] = {}
        self.abort_after: int | None = None
        self.store_statuses: list[int] = []  # C-STORE-RSP statuses it received
        self.events: list[tuple[str, str]] = []  # shared log with the test's sink
        self._lock = threading.Lock()
        ae = ClosingAE(ae_title=ae_title)
        ae.add_supported_context(net.STUDY_ROOT_MOVE)
        ae.network_timeout = ae.dimse_timeout = ae.acse_timeout = 10
        self.ae = ae
        self._requested: set[tuple[str, str]] = set()

    def add(self, datasets: list[Dataset]) -> None:
        for ds in datasets:
            self.studies.setdefault(str(ds.StudyInstanceUID), []).append(ds)
            key = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
            if key not in self._requested:
                self._requested.add(key)
                self.ae.add_requested_context(*key)

    def _on_dimse_recv(self, event: Any) -> None:
        msg = event.message
        if type(msg).__name__ == "C_STORE_RSP":
            code = int(msg.command_set.Status)
            with self._lock:
                self.store_statuses.append(code)
                self.events.append(("rsp", str(msg.command_set.AffectedSOPInstanceUID)))

    def _on_move(self, event: Any) -> Iterator[Any]:
        uid = str(event.identifier.StudyInstanceUID)
        dest = str(event.move_destination).strip()
        if dest not in self.dest:
            yield None, None
            return
        host, port = self.dest[dest]
        kwargs = dict(self.store_kwargs)
        kwargs["evt_handlers"] = [
            *kwargs.get("evt_handlers", []),
            (evt.EVT_DIMSE_RECV, self._on_dimse_recv),
        ]
        yield host, port, kwargs
        datasets = self.studies.get(uid, [])
        yield len(datasets)
        for i, ds in enumerate(datasets):
            if self.abort_after is not None and i == self.abort_after:
                event.assoc.abort()
                return
            yield 0xFF00, ds

    def __enter__(self) -> MovePacs:
        handlers: list[Any] = [*net.NODELAY_HANDLERS, (evt.EVT_C_MOVE, self._on_move)]
        server = self.ae.make_server(
            ("127.0.0.1", 0), evt_handlers=handlers, server_class=ThreadedAssociationServer
        )
        self.ae._servers.append(server)
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()
        self._server = server
        self.port = int(server.server_address[1])
        return self

    def __exit__(self, *exc: object) -> None:
        self.ae.shutdown()
        self.ae.close_sockets()


# -- sinks -----------------------------------------------------------------------------


class RecordingSink:
    """A real Buffer's add_blob, logging when each call returned; may block or fail."""

    def __init__(self, buffer: Buffer, events: list[tuple[str, str]]) -> None:
        self.buffer = buffer
        self.events = events
        self.block_first = threading.Event()  # set: the first add_blob waits for release
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_with: Exception | None = None
        self.calls = 0

    def add_blob(self, src: IO[bytes] | bytes, *, media_type: str) -> tuple[str, int]:
        self.calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        if self.block_first.is_set() and self.calls == 1:
            self.entered.set()
            assert self.release.wait(20)
        assert not isinstance(src, bytes)
        sop = str(dcmread(src.name, stop_before_pixels=True).SOPInstanceUID)
        digest, size = self.buffer.add_blob(src, media_type=media_type)
        self.events.append(("stored", sop))
        return digest, size


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[Buffer]:
    buf = Buffer.open(tmp_path / "data", data_key=None)
    yield buf
    buf.close()


@pytest.fixture
def pacs() -> Iterator[MovePacs]:
    with MovePacs() as p:
        yield p


def _settings(pacs: MovePacs, *, peer_ae: str = PACS_AE, peer_host: str = "127.0.0.1") -> Any:
    return DicomSettings(
        name="pacs",
        kind="dicom",
        ae_title=OUR_AE,
        listen="127.0.0.1:0",
        peer=DicomPeer(ae_title=peer_ae, host=peer_host, port=pacs.port),
        retrieve="instances",
    )


@pytest.fixture
def start(
    pacs: MovePacs, buffer: Buffer
) -> Iterator[Callable[..., tuple[Retriever, RecordingSink]]]:
    started: list[Retriever] = []

    def start(
        *, limits: RetrieveLimits = LIMITS, ae_factory: Any = None, **settings: Any
    ) -> tuple[Retriever, RecordingSink]:
        sink = RecordingSink(buffer, pacs.events)
        r = Retriever(_settings(pacs, **settings), sink, ae_factory=ae_factory, limits=limits)
        r.start()
        started.append(r)
        pacs.dest[OUR_AE] = r.address
        return r, sink

    yield start
    for r in started:
        r.stop(timeout_secs=5)


def _study(n: int = 3, **kw: Any) -> list[Dataset]:
    return make_study(series=1, instances=n, pixels=16, **kw)


def _dataset_bytes(path: Path) -> tuple[Dataset, bytes]:
    """The Part 10 file's dataset (after the File Meta group), as bytes."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    # (0002,0000) UL, explicit VR: tag 4 + VR 2 + length 2, then the 4-byte value.
    assert data[132:138] == b"\x02\x00\x00\x00UL"
    group_len = int.from_bytes(data[140:144], "little")
    return dcmread(path), data[144 + group_len :]


# -- the move --------------------------------------------------------------------------


def test_a_whole_study_arrives_counted_and_byte_for_byte(pacs, start, buffer):
    datasets = _study(3) + _study(2)  # two studies: only the one asked for moves
    pacs.add(datasets)
    r, _sink = start()
    study_uid = str(datasets[0].StudyInstanceUID)

    result = r.retrieve_study(study_uid)

    assert result.complete, result.detail
    assert (result.status, result.completed, result.failed, result.warning) == (0, 3, 0, 0)
    assert result.detail == ""
    assert result.error is None
    sent = {str(ds.SOPInstanceUID): ds for ds in datasets[:3]}
    assert {i.sop_instance_uid for i in result.instances} == set(sent)
    for inst in result.instances:
        ds = sent[inst.sop_instance_uid]
        assert inst.series_instance_uid == str(ds.SeriesInstanceUID)
        path = buffer.blob_path(inst.sha256)
        assert path.stat().st_size == inst.size
        assert buffer.blob_info(inst.sha256)[:2] == ("application/dicom", inst.size)
        stored, dataset_bytes = _dataset_bytes(path)
        ts = stored.file_meta.TransferSyntaxUID
        assert ts == ExplicitVRLittleEndian  # the first the PACS offered and we prefer
        assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert dataset_bytes == encode(ds, ts.is_implicit_VR, ts.is_little_endian)
        assert stored.PixelData == ds.PixelData
    assert pacs.store_statuses == [0, 0, 0]


def test_a_compressed_instance_is_kept_in_the_transfer_syntax_it_was_sent_in(pacs, start, buffer):
    ds = _study(1)[0]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel = 8, 8, 7, 3
    ds.PlanarConfiguration = 0
    ds.PixelData = encapsulate([b"\xff\xd8not really a jpeg\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    pacs.add([ds])
    r, _ = start()

    result = r.retrieve_study(str(ds.StudyInstanceUID))

    assert result.complete, result.detail
    stored, dataset_bytes = _dataset_bytes(buffer.blob_path(result.instances[0].sha256))
    assert stored.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert dataset_bytes == encode(ds, False, True)


def test_a_pacs_claiming_success_for_an_instance_it_never_sent_is_incomplete(
    pacs, start, monkeypatch
):
    datasets = _study(3)
    pacs.add(datasets)
    skipped = str(datasets[1].SOPInstanceUID)
    real = Association.send_c_store

    def lying(self: Association, dataset: Any, *args: Any, **kw: Any) -> Dataset:
        if self.ae is pacs.ae and str(dataset.SOPInstanceUID) == skipped:
            ok = Dataset()
            ok.Status = 0x0000
            return ok
        return real(self, dataset, *args, **kw)

    monkeypatch.setattr(Association, "send_c_store", lying)
    r, _ = start()

    result = r.retrieve_study(str(datasets[0].StudyInstanceUID))

    assert not result.complete
    assert (result.status, result.completed, len(result.instances)) == (0x0000, 3, 2)
    assert "3 completed sub-operations, 2 instances arrived" in result.detail


def test_a_storage_failure_answers_out_of_resources_and_the_move_is_incomplete(pacs, start):
    datasets = _study(2)
    pacs.add(datasets)
    r, sink = start()
    sink.fail_with = CapacityExceededError("the buffer is full")

    result = r.retrieve_study(str(datasets[0].StudyInstanceUID))

    assert pacs.store_statuses == [OUT_OF_RESOURCES, OUT_OF_RESOURCES]
    assert not result.complete
    assert result.instances == []
    assert result.failed == 2
    assert result.status == 0xA702  # pynetdicom: every sub-operation failed
    assert "CapacityExceededError" in result.detail


def test_success_is_answered_only_after_add_blob_returned(pacs, start):
    datasets = _study(3)
    pacs.add(datasets)
    r, sink = start()
    sink.block_first.set()
    results: list[Any] = []
    t = threading.Thread(
        target=lambda: results.append(r.retrieve_study(str(datasets[0].StudyInstanceUID)))
    )
    t.start()
    try:
        assert sink.entered.wait(10), "the first instance never reached add_blob"
        time.sleep(0.5)  # give a wrongly early answer time to reach the PACS
        assert pacs.store_statuses == [], "answered before add_blob returned"
    finally:
        sink.release.set()
    t.join(20)

    assert results, "retrieve_study did not return"
    assert results[0].complete, results[0].detail
    sops = [str(ds.SOPInstanceUID) for ds in datasets]
    order = pacs.events
    for sop in sops:
        assert order.index(("stored", sop)) < order.index(("rsp", sop))


def test_an_abort_in_the_middle_of_a_move_is_incomplete_with_a_protocol_error(pacs, start):
    datasets = _study(4)
    pacs.add(datasets)
    pacs.abort_after = 2
    r, _ = start()

    result = r.retrieve_study(str(datasets[0].StudyInstanceUID))

    assert not result.complete
    assert result.status is None
    assert len(result.instances) == 2
    assert isinstance(result.error, PeerProtocolError)
    assert result.detail.startswith("PeerProtocolError: ")
    assert f"{PACS_AE}@127.0.0.1:{pacs.port}" in result.detail


# -- who may store ---------------------------------------------------------------------


@pytest.fixture
def direct() -> Iterator[Callable[..., Association]]:
    """Associate with our SCP directly, as ``calling`` from ``bind``."""
    aes: list[ClosingAE] = []

    def associate(port: int, *, calling: str, bind: str = "127.0.0.1", **kw: Any) -> Association:
        ae = ClosingAE(ae_title=calling)
        aes.append(ae)
        ae.add_requested_context(SECONDARY_CAPTURE, [ExplicitVRLittleEndian])
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 5
        return ae.associate("127.0.0.1", port, ae_title=OUR_AE, bind_address=(bind, 0), **kw)

    yield associate
    for ae in aes:
        ae.shutdown()
        ae.close_sockets()


def test_an_association_from_another_ae_title_is_rejected(pacs, start, buffer, direct):
    r, _ = start(peer_ae="THEPACS")  # the real PACS calls itself FAKEPACS
    intruder = direct(r.address[1], calling="INTRUDER")
    assert intruder.is_rejected
    rj = intruder.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)

    datasets = _study(1)
    pacs.add(datasets)
    result = r.retrieve_study(str(datasets[0].StudyInstanceUID))
    assert not result.complete
    assert result.instances == []
    assert buffer.stats().blob_count == 0
    assert result.status == 0xA801  # pynetdicom: move destination unknown / unreachable


def test_a_connection_from_another_address_is_closed_at_accept(pacs, start, buffer, direct):
    r, _ = start()  # the peer is 127.0.0.1
    other = direct(r.address[1], calling=PACS_AE, bind="127.0.0.2")
    assert not other.is_established
    assert not other.is_rejected

    datasets = _study(1)
    pacs.add(datasets)
    pacs.store_kwargs = {"bind_address": ("127.0.0.2", 0)}
    result = r.retrieve_study(str(datasets[0].StudyInstanceUID))
    assert not result.complete
    assert result.status == 0xA801
    assert buffer.stats().blob_count == 0


def test_a_peer_given_by_host_name_is_recognised(pacs, start):
    datasets = _study(1)
    pacs.add(datasets)
    r, _ = start(peer_host="localhost")
    assert r.retrieve_study(str(datasets[0].StudyInstanceUID)).complete


# -- what the SCP refuses --------------------------------------------------------------


def _store_directly(direct: Callable[..., Association], port: int, ds: Dataset) -> int:
    assoc = direct(port, calling=PACS_AE)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _sc_instance(**kw: Any) -> Dataset:
    ds = _study(1)[0]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
    for key, value in kw.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def test_an_instance_no_move_is_waiting_for_is_refused_and_not_stored(start, buffer, direct):
    r, sink = start()
    assert _store_directly(direct, r.address[1], _sc_instance()) == NOT_AUTHORISED
    assert sink.calls == 0
    assert buffer.stats().blob_count == 0


def test_an_instance_without_study_instance_uid_cannot_be_understood(start, direct):
    r, sink = start()
    ds = _sc_instance(StudyInstanceUID=None)
    assert _store_directly(direct, r.address[1], ds) == CANNOT_UNDERSTAND
    assert sink.calls == 0


def test_an_instance_over_the_size_limit_is_refused(pacs, start):
    datasets = _study(2)
    pacs.add(datasets)
    r, sink = start(limits=RetrieveLimits(timeouts=QUICK, max_instance_bytes=600))
    result = r.retrieve_study(str(datasets[0].StudyInstanceUID))
    assert pacs.store_statuses == [OUT_OF_RESOURCES, OUT_OF_RESOURCES]
    assert not result.complete
    assert sink.calls == 0
    assert "over 600 B" in result.detail


def test_a_half_received_instance_leaves_no_temp_file(start, direct, tmp_path, monkeypatch):
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    r, sink = start(limits=RetrieveLimits(timeouts=QUICK, max_pdu_bytes=4096))
    ds = _sc_instance()
    ds.Rows = ds.Columns = 128  # 32 KiB of pixels: 8+ PDUs of 4 KiB
    ds.PixelData = os.urandom(128 * 128 * 2)
    sent = []

    def cut(event: Any) -> None:
        if type(event.pdu).__name__ == "P_DATA_TF":
            sent.append(1)
            if len(sent) == 3:
                event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

    assoc = direct(r.address[1], calling=PACS_AE, evt_handlers=[(evt.EVT_PDU_SENT, cut)])
    assert assoc.is_established
    assoc.send_c_store(ds)
    assoc.abort()
    deadline = time.monotonic() + 5
    while list(spool.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)  # between polls of a bounded loop
    assert len(sent) >= 3
    assert list(spool.iterdir()) == []
    assert sink.calls == 0


# -- sockets, peers, lifecycle ---------------------------------------------------------


def test_tcp_nodelay_is_set_on_the_move_association_and_on_accepted_sockets(pacs, start):
    seen: dict[str, int] = {}

    def factory(title: str, **kw: Any) -> AE:
        ae = net.make_ae(title, **kw)
        real_associate, real_make_server = ae.associate, ae.make_server

        def associate(*a: Any, **k: Any) -> Association:
            assoc = real_associate(*a, **k)
            sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
            assert sock is not None
            seen["scu"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            return assoc

        def on_established(event: Any) -> None:
            sock = event.assoc.dul.socket.socket
            assert sock is not None
            seen["scp"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

        def make_server(*a: Any, **k: Any) -> Any:
            k["evt_handlers"] = [*k["evt_handlers"], (evt.EVT_ESTABLISHED, on_established)]
            return real_make_server(*a, **k)

        ae.associate, ae.make_server = associate, make_server  # type: ignore[method-assign]
        return ae

    datasets = _study(1)
    pacs.add(datasets)
    r, _ = start(ae_factory=factory)
    assert r.retrieve_study(str(datasets[0].StudyInstanceUID)).complete
    assert seen["scu"]
    assert seen["scp"]


def test_a_pacs_that_is_down_raises_peer_unavailable(buffer):
    settings = DicomSettings(
        name="pacs",
        kind="dicom",
        ae_title=OUR_AE,
        listen="127.0.0.1:0",
        peer=DicomPeer(ae_title=PACS_AE, host="127.0.0.1", port=free_port()),
    )
    r = Retriever(settings, buffer, limits=LIMITS)
    r.start()
    try:
        with pytest.raises(PeerUnavailableError, match=rf"{PACS_AE}@127\.0\.0\.1"):
            r.retrieve_study("1.2.3")
    finally:
        r.stop(timeout_secs=5)


def test_stop_is_bounded_and_closes_the_port(start):
    r, _ = start()
    port = r.address[1]
    t0 = time.monotonic()
    r.stop(timeout_secs=3)
    assert time.monotonic() - t0 < 3
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_retrieve_before_start_is_an_error(pacs, buffer):
    r = Retriever(_settings(pacs), buffer, limits=LIMITS)
    with pytest.raises(Exception, match="start"):
        r.retrieve_study("1.2.3")


# -- the completeness rule -------------------------------------------------------------


def _inst(i: int) -> retrieve.StoredInstance:
    return retrieve.StoredInstance(f"1.2.{i}", "1.2", f"{i:064x}", 10)


@pytest.mark.parametrize(
    ("outcome", "stored", "complete", "why"),
    [
        (_Outcome(0x0000, 2, 0, 0, True), 2, True, ""),
        (_Outcome(0x0000, 2, None, None, True), 2, True, ""),
        (_Outcome(None, 1, 0, 0), 1, False, "no final C-MOVE response"),
        (_Outcome(0x0000, 2, 0, 0, False), 2, False, "no Number of Completed"),
        (_Outcome(0x0000, 3, 0, 0, True), 2, False, "3 completed sub-operations, 2"),
        (_Outcome(0x0000, 1, 0, 0, True), 2, False, "1 completed sub-operations, 2"),
        (_Outcome(0xB000, 1, 1, 0, True), 1, False, "1 sub-operations failed"),
        (_Outcome(0x0000, 2, 0, 1, True), 2, False, "1 sub-operations with warnings"),
        (_Outcome(0xFE00, 1, 0, 0, True), 1, False, "0xFE00 (Cancel"),
        (_Outcome(0xA702, 0, 0, 0, True), 0, False, "0xA702 (Failure"),
        (_Outcome(0x0000, 0, 0, 0, True), 0, False, "moved no instances"),
    ],
)
def test_a_move_is_complete_only_when_the_counts_agree(outcome, stored, complete, why):
    result = _judge(outcome, [_inst(i) for i in range(stored)], stored, 0, "")
    assert result.complete is complete
    assert why in result.detail
    assert result.complete == (result.detail == "")


def test_our_own_refusals_make_a_move_incomplete_even_if_the_pacs_says_success():
    result = _judge(_Outcome(0x0000, 1, 0, 0, True), [_inst(1)], 1, 1, "disk full")
    assert not result.complete
    assert result.failed == 1
    assert "disk full" in result.detail


def test_an_empty_status_is_incomplete_with_the_error():
    err = PeerProtocolError("C-MOVE to X: no status")
    result = _judge(_Outcome(None, None, None, None, False, 0, err), [], 0, 0, "")
    assert not result.complete
    assert result.error is err
    assert result.detail.startswith("PeerProtocolError: C-MOVE to X")


def test_the_storage_syntaxes_prefer_uncompressed_then_lossless_and_skip_jpip():
    syntaxes = retrieve.STORAGE_TRANSFER_SYNTAXES
    assert syntaxes[:2] == [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert JPEGBaseline8Bit in syntaxes
    assert syntaxes.index(JPEGBaseline8Bit) > syntaxes.index(JPEG2000Lossless)
    assert not any("JPIP" in ts.name for ts in syntaxes)
    assert len(set(syntaxes)) == len(syntaxes)


def test_read_identity_reads_only_the_first_elements(tmp_path):
    ds = _study(1)[0]
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    study, series, sop = retrieve.read_identity(path)
    assert (study, series, sop) == (
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
    )
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    meta.MediaStorageSOPInstanceUID = UID("1.2.3")
    meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
    bad = Dataset()
    bad.file_meta = meta
    bad.PatientID = "X"
    bad.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        retrieve.read_identity(tmp_path / "bad.dcm")


def _with_sequences(*, undefined: bool) -> Dataset:
    ds = _study(1)[0]
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "X1", "99LOCAL", "odd"
    item = Dataset()
    item.ReferencedSOPClassUID = SECONDARY_CAPTURE
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.PurposeOfReferenceCodeSequence = [inner]
    ds.ReferencedStudySequence = [item, Dataset()]  # (0008,1110), before the UIDs
    ds.ProcedureCodeSequence = [inner]  # (0008,1032)
    ds.add_new(0x00091010, "UN", b"\x00" * 6)  # a private element, unknown VR
    for elem in (ds["ReferencedStudySequence"], ds["ProcedureCodeSequence"]):
        elem.is_undefined_length = undefined
        for it in elem.value:
            it.is_undefined_length_sequence_item = undefined
    return ds


@pytest.mark.parametrize("undefined", [True, False], ids=["undefined-lengths", "defined-lengths"])
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_the_identity_scan_agrees_with_pydicom(tmp_path, ts, undefined):
    ds = _with_sequences(undefined=undefined)
    ds.file_meta.TransferSyntaxUID = ts
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    want = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    assert retrieve.read_identity(path, ts) == want  # the scan
    assert retrieve.read_identity(path) == want  # pydicom


def test_the_identity_scan_leaves_a_head_it_cannot_finish_to_pydicom(tmp_path, monkeypatch):
    ds = _with_sequences(undefined=True)
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    monkeypatch.setattr(retrieve, "_HEAD_BYTES", 400)  # ends inside the sequences
    calls = []
    real = retrieve.read_partial

    def counting(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(retrieve, "read_partial", counting)
    assert retrieve.read_identity(path, ExplicitVRLittleEndian)[0] == str(ds.StudyInstanceUID)
    assert calls == [1]


def test_the_identity_scan_of_garbage_is_unusual():
    with pytest.raises(retrieve._Unusual):
        # an undefined-length sequence whose content is not an item
        retrieve._scan(
            b"\x08\x00\x10\x11SQ\x00\x00" + b"\xff" * 4 + b"\x08\x00" * 4, True, whole=True
        )
    with pytest.raises(retrieve._Unusual):
        retrieve._scan(b"\x08\x00\x18\x00UI\x40\x001.2", True, whole=True)
