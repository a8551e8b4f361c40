"""Retrieval: C-MOVE of whole studies to our own AE, and the storage SCP that takes them in.

Responsibility: run a C-STORE SCP on ``settings.listen`` that accepts associations only
from the configured PACS, writes every instance it receives into the buffer's blob store
(`RecordSink.add_blob`: content-addressed, fsync'd, its row committed) and answers
success only then; and `Retriever.retrieve_study`, which asks the PACS to C-MOVE one
study (Study Root, STUDY level, PS3.4 C.4.2) to our AE title and judges, by counts,
whether every instance arrived.

How an instance travels: the PACS opens a second association to our SCP and sends one
C-STORE per instance. pynetdicom writes the P-DATA fragments straight into a temporary
Part 10 file (preamble, a File Meta group it builds from the command set, then the
dataset bytes exactly as received): `pynetdicom._config.STORE_RECV_CHUNKED_DATASET`,
set by `configure_pynetdicom`. We read only the first elements of that file (up to
SeriesInstanceUID) to learn which study it belongs to, stream the file into
``add_blob`` and answer 0x0000. The dataset is never decoded or re-encoded, so a blob
holds the instance as the PACS sent it, in the transfer syntax it chose (every one
pydicom knows is accepted), and memory stays flat whatever the instance's size.

Reading "the first elements" is a scan of element headers for little-endian
datasets (`read_identity`: ~0.2 ms; pydicom's ``read_partial`` took ~1 ms per instance
here and remains the fallback for anything else).

C-STORE answers (PS3.4 B.2.3, PS3.7 C):
- 0x0000 only after ``add_blob`` returned;
- 0xA700 (Refused: Out of Resources) when storing failed (disk or buffer full, I/O
  error), when the instance is over `RetrieveLimits.max_instance_bytes`, or while
  stopping: the PACS counts a failed sub-operation and the study is retried later;
- 0xC000 (Cannot Understand) when the dataset has no readable StudyInstanceUID;
- 0x0124 (Refused: Not Authorised) for an instance of a study no `retrieve_study` is
  waiting for (a late sub-operation, or a PACS pushing on its own): nothing we could
  attach it to, so nothing is stored.

Who may connect: a TCP connection from any address other than the peer's (``peer.host``
resolved, re-resolved at most every 30 s) is closed at accept, before a byte is read
(pynetdicom reads a whole PDU of whatever length the peer declares); from the peer's
address, an A-ASSOCIATE-RQ whose calling AE title is not ``peer.ae_title`` is
rejected (A-ASSOCIATE-RJ, permanent, "calling AE title not recognised").

Completeness (issue 5: judged by counts, never by the absence of errors): a move is
complete only when the final C-MOVE status is 0x0000, it carries Number of Completed
Sub-operations, that number equals the C-STOREs of this study we answered with
success during the move, no sub-operation failed (the PACS's count and ours) and at
least one instance arrived. An empty or missing status, an abort, a timeout, a
warning, a cancel, or any disagreement makes it incomplete: `RetrieveResult` says
why, and the adapter retries on a later poll. Never reported complete otherwise.

Never: answer success before ``add_blob`` returned; decode a received dataset; log
patient data (study and instance UIDs appear only as `ref` hashes, never names or
IDs); let one bad association or instance stop the SCP.

Bounds (`RetrieveLimits`): concurrent associations into the SCP, the PDU size we
accept, the size of one instance (2 GiB: settings have no such key), connect / ACSE /
DIMSE / idle timeouts, and a deadline for a whole move.

Known limits of pynetdicom 3.0.4 that this module works around or accepts:
- the temporary files live in the system temp directory (``TMPDIR``), which must
  hold ``max_associations`` instances of the largest size; a file left behind by an
  association aborted mid-instance is removed when its connection closes;
- ``STORE_RECV_CHUNKED_DATASET`` is process-wide: any other C-STORE SCP in this
  process gets files too (``event.dataset`` still works; ``encoded_dataset()`` does
  not);
- the size cap is checked when the instance is complete, so a PACS may fill up to
  one instance beyond it in the temp directory before being refused;
- the server deep-copies its supported contexts for every association (~0.25 s for
  every storage SOP class x our transfer syntaxes): `_SharedContexts` shares them;
- the rest is pynetdicom's own cost, measured with Orthanc (benchmarks/README.md):
  ~7 ms of CPU per instance (polling reactors, pydicom-encoded command sets, the temp
  file's File Meta) and ~30 ms to negotiate each association Orthanc opens to move a
  study (it proposes 126 presentation contexts).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, Protocol

from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.transport import ThreadedAssociationServer

from adapters.dicom import net, status
from adapters.dicom.settings import DicomSettings
from agent.config import split_host_port
from agent.errors import AdapterError, PeerProtocolError

log = logging.getLogger(__name__)

#: What the blobs are (PROTOCOL.md BlobRef.media_type); equal to mapping.BLOB_MEDIA_TYPE.
MEDIA_TYPE: Final = "application/dicom"

#: C-STORE statuses we answer (PS3.4 B.2.3; 0x0124 is a general status, PS3.7 C.5).
SUCCESS: Final = 0x0000
OUT_OF_RESOURCES: Final = 0xA700
CANNOT_UNDERSTAND: Final = 0xC000
NOT_AUTHORISED: Final = 0x0124

#: One instance larger than this is refused (0xA700). Settings have no such key; 2 GiB
#: is above any single CT/MR/CR/DX/MG instance seen in practice and below the 4 GiB
#: a DICOM element length can express, so only a broken or hostile sender hits it.
MAX_INSTANCE_BYTES: Final = 2 * 1024**3

#: The transfer syntaxes our SCP accepts, in the order pynetdicom prefers them when a
#: PACS offers several in one presentation context: uncompressed, then lossless, then
#: the rest, so that a PACS that transcodes is never led to a lossy one. Every syntax
#: pydicom knows except JPIP (its pixel data is a URL, not in the dataset).
_PREFERRED: Final = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    RLELossless,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
STORAGE_TRANSFER_SYNTAXES: Final = [
    *_PREFERRED,
    *(ts for ts in AllTransferSyntaxes if ts not in _PREFERRED and "JPIP" not in ts.name),
]

#: Timeouts of the SCP and of a move (`net.Timeouts`); see `RetrieveLimits.timeouts`.
RETRIEVE_TIMEOUTS: Final = net.Timeouts(connect=10.0, acse=30.0, dimse=300.0, network=120.0)

_SOP_INSTANCE_UID: Final = 0x00080018
_STUDY_INSTANCE_UID: Final = 0x0020000D
_SERIES_INSTANCE_UID: Final = 0x0020000E
_IDENTITY_TAGS: Final = frozenset({_SOP_INSTANCE_UID, _STUDY_INSTANCE_UID, _SERIES_INSTANCE_UID})
_ITEM: Final = 0xFFFEE000
_ITEM_END: Final = 0xFFFEE00D
_SEQUENCE_END: Final = 0xFFFEE0DD
_UNDEFINED: Final = 0xFFFFFFFF
#: VRs whose explicit-VR header has a 4-byte length (PS3.5 Table 7.1-1).
_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_HEAD_BYTES: Final = 256 * 1024  # enough for the elements before SeriesInstanceUID
_MAX_NESTING: Final = 16
_PEER_RESOLVE_EVERY_SECS: Final = 30.0
_LOG_EVERY_SECS: Final = 60.0


class BlobSink(Protocol):
    """What the storage SCP needs of the buffer (a `RecordSink` is one)."""

    def add_blob(self, src: IO[bytes] | bytes, *, media_type: str) -> tuple[str, int]: ...


@dataclass(frozen=True, slots=True)
class RetrieveLimits:
    """Bounds of the storage SCP and of one move. Seconds and bytes."""

    #: Associations into our SCP at once; more are rejected (transient, local limit).
    max_associations: int = 4
    #: Largest P-DATA PDU we accept (A-ASSOCIATE maximum length). 1 MiB: few PDUs per
    #: instance, bounded memory per association.
    max_pdu_bytes: int = 1024 * 1024
    max_instance_bytes: int = MAX_INSTANCE_BYTES
    #: ``dimse``: the longest wait for the next C-MOVE response, i.e. for one
    #: sub-operation (a large instance over a slow link); ``network``: an idle
    #: association into our SCP is closed after this.
    timeouts: net.Timeouts = RETRIEVE_TIMEOUTS
    #: A whole move; checked between responses, so a move ends at the latest
    #: ``move_timeout_secs + timeouts.dimse`` after it started.
    move_timeout_secs: float = 3600.0


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """One instance that arrived and is in the blob store."""

    sop_instance_uid: str
    series_instance_uid: str
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class RetrieveResult:
    """What one C-MOVE of a study brought.

    ``complete`` is the only thing that says the study is whole; ``instances`` lists
    what arrived (stored as blobs) either way. ``failed`` and ``warning`` are the
    PACS's sub-operation counts (plus instances we refused), ``status`` its final
    C-MOVE status (None: none came), ``detail`` why the move is incomplete ("" when
    complete). ``error`` is the PeerProtocolError behind an abort or timeout.
    """

    complete: bool
    instances: list[StoredInstance]
    failed: int
    warning: int
    status: int | None
    detail: str
    completed: int | None = None  # the PACS's Number of Completed Sub-operations
    error: AdapterError | None = None


def ref(uid: str) -> str:
    """A short stable hash of a UID for logs: correlatable, not the identifier itself."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:12]


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings this module relies on (idempotent).

    Received C-STORE datasets go to temporary files undecoded; pynetdicom's own
    per-PDU/DIMSE event logging is not bound (CPU on every message, DEBUG only);
    identifiers are never logged (`net.quiet_pynetdicom`).
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.LOG_HANDLER_LEVEL = "none"
    net.quiet_pynetdicom()


# -- the storage SCP's bookkeeping -----------------------------------------------------


@dataclass(slots=True)
class _Move:
    """The instances of one study arriving during one `retrieve_study`."""

    study_uid: str
    instances: dict[str, StoredInstance] = field(default_factory=dict)
    stored: int = 0  # C-STOREs of this study answered with success
    refused: int = 0  # C-STOREs of this study we answered with a failure
    refusal: str = ""  # why, the first time


class _Throttle:
    """One WARNING per reason per minute; the rest at DEBUG, counted in the next one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}

    def warn(self, reason: str, msg: str, *args: object, event: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._last) > 1000:  # reasons carry peer addresses: keep it bounded
                self._last.clear()
            last, suppressed = self._last.get(reason, (-_LOG_EVERY_SECS, 0))
            loud = now - last >= _LOG_EVERY_SECS
            self._last[reason] = (now, 0) if loud else (last, suppressed + 1)
        if loud:
            log.warning(
                "%s (%d more like it in the last minute)" if suppressed else "%s",
                msg % args,
                *((suppressed,) if suppressed else ()),
                extra={"event": event, "count": suppressed + 1},
            )
        else:
            log.debug(msg, *args, extra={"event": event})


def _normalise_ip(text: str) -> str:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _resolve(host: str) -> frozenset[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return frozenset()
    return frozenset(_normalise_ip(str(info[4][0])) for info in infos)


def _stop_after_series_uid(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) > _SERIES_INSTANCE_UID


class _Unusual(Exception):
    """An encoding `_scan` leaves to pydicom."""


def _element(buf: bytes, pos: int, explicit: bool) -> tuple[int, int, int, bool]:
    """(tag, where the value starts, its length, whether nested content is explicit VR).

    PS3.5 7.1: explicit VR has a 2-byte length, or for the VRs in `_LONG_VRS` two
    reserved bytes and a 4-byte length; implicit VR and the item/delimiter tags of
    group FFFE have a 4-byte length. An UN value of undefined length holds implicit VR
    (PS3.5 6.2.2).
    """
    group, elem = struct.unpack_from("<HH", buf, pos)
    tag = group << 16 | elem
    if not explicit or group == 0xFFFE:
        return tag, pos + 8, struct.unpack_from("<L", buf, pos + 4)[0], explicit
    vr = buf[pos + 4 : pos + 6]
    if vr in _LONG_VRS:
        return tag, pos + 12, struct.unpack_from("<L", buf, pos + 8)[0], vr != b"UN"
    return tag, pos + 8, struct.unpack_from("<H", buf, pos + 6)[0], True


def _skip_sequence(buf: bytes, pos: int, explicit: bool, depth: int) -> int:
    """The position after the delimiter of an undefined-length sequence starting at pos."""
    if depth > _MAX_NESTING:
        raise _Unusual
    while True:
        tag, pos, length, _ = _element(buf, pos, explicit)
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unusual
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an item of undefined length: elements until its delimiter
            tag, vpos, length, nested = _element(buf, pos, explicit)
            if tag == _ITEM_END:
                pos = vpos
                break
            if length == _UNDEFINED:
                pos = _skip_sequence(buf, vpos, nested, depth + 1)
            else:
                pos = vpos + length


def _scan(buf: bytes, explicit: bool, *, whole: bool) -> dict[int, str]:
    """The UIDs among the first top-level elements of a little-endian dataset, up to
    SeriesInstanceUID: element headers only, values of three elements.

    Raises:
        _Unusual: malformed, nested too deep, or ``buf`` (not ``whole``) ended first.
    """
    found: dict[int, str] = {}
    pos = 0
    try:
        while pos < len(buf):
            tag, vpos, length, nested = _element(buf, pos, explicit)
            if tag > _SERIES_INSTANCE_UID:
                return found
            if length == _UNDEFINED:
                pos = _skip_sequence(buf, vpos, nested, 0)
                continue
            if tag in _IDENTITY_TAGS:
                if vpos + length > len(buf):
                    raise _Unusual
                found[tag] = buf[vpos : vpos + length].decode("ascii", "replace").rstrip("\0 ")
            pos = vpos + length
    except struct.error:
        raise _Unusual from None
    if not whole:
        raise _Unusual
    return found


def read_identity(path: Path | str, transfer_syntax: str | None = None) -> tuple[str, str, str]:
    """(StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) of a Part 10 file, read
    from the first elements only (never the pixel data).

    With the ``transfer_syntax`` the dataset was received in, little-endian datasets
    are scanned element header by element header (~0.2 ms per instance here, where
    pydicom's ``read_partial`` costs ~1 ms); deflated and big-endian ones, and anything
    the scan finds unusual, are read with ``read_partial``.

    Raises:
        ValueError: the file has no StudyInstanceUID (or is not DICOM at all).
    """
    ts = UID(transfer_syntax) if transfer_syntax else None
    if ts is not None and ts.is_little_endian and not ts.is_deflated:
        with open(path, "rb") as fp:
            head = fp.read(_HEAD_BYTES)
            whole = not fp.read(1)
        # pynetdicom's file: preamble, "DICM", then (0002,0000) UL 4 <group length>.
        if head[128:136] == b"DICM\x02\x00\x00\x00" and head[136:140] == b"UL\x04\x00":
            start = 144 + int.from_bytes(head[140:144], "little")
            with contextlib.suppress(_Unusual):
                found = _scan(head[start:], not ts.is_implicit_VR, whole=whole)
                study = found.get(_STUDY_INSTANCE_UID, "")
                if not study:
                    raise ValueError("no StudyInstanceUID")
                return study, found.get(_SERIES_INSTANCE_UID, ""), found.get(_SOP_INSTANCE_UID, "")
    with open(path, "rb") as fp:
        ds = read_partial(fp, stop_when=_stop_after_series_uid)
    study = str(ds.get("StudyInstanceUID", "") or "").strip()
    if not study:
        raise ValueError("no StudyInstanceUID")
    series = str(ds.get("SeriesInstanceUID", "") or "").strip()
    sop = str(ds.get("SOPInstanceUID", "") or "").strip()
    if not sop:
        sop = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "").strip()
    return study, series, sop


class _StorageServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, closing connections from other hosts at accept."""

    daemon_threads = True

    def __init__(self, *args: Any, allow: Callable[[str], bool], **kwargs: Any) -> None:
        self._allow = allow
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self._allow(str(client_address[0]))

    def shutdown(self) -> None:
        # pynetdicom's shutdown also removes the server from ae._servers, where
        # make_server never put it (only start_server does).
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class _SharedContexts(list[Any]):
    """The SCP's supported presentation contexts, shared by all its associations.

    pynetdicom 3.0.4 deep-copies the server's contexts for every association it
    accepts (``RequestHandler._create_association``): every storage SOP class times our
    transfer syntaxes, ~0.25 s of CPU here, paid once per study moved. Negotiation only
    reads them (``negotiate_as_acceptor``), so one shared list is safe.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedContexts:
        return self


def _remove_partial_dataset(event: Any) -> None:
    """EVT_CONN_CLOSE: delete the temp file of an instance cut off mid-transfer.

    pynetdicom keeps the half-received message on ``assoc.dimse.message`` and never
    deletes its ``delete=False`` temp file (3.0.4). A notification handler: never raises.
    """
    with contextlib.suppress(Exception):
        msg = event.assoc.dimse.message
        tmp = getattr(msg, "_data_set_file", None) if msg is not None else None
        if tmp is not None:
            tmp.close()
            os.unlink(tmp.name)
            msg._data_set_file = None


# -- the Retriever ---------------------------------------------------------------------


class Retriever:
    """The storage SCP (`start` / `stop`) and C-MOVE of whole studies (`retrieve_study`).

    ``sink`` is the buffer (only ``add_blob`` is used). ``ae_factory(ae_title, *,
    requested, timeouts) -> AE`` makes the AEs, as `net.make_ae` (the default) does:
    one for the SCP, one reused for every C-MOVE association. ``limits`` bound both.

    Thread-safe: several studies may be retrieved at once (each on its own C-MOVE
    association); two retrievals of the same study run one after the other.
    """

    def __init__(
        self,
        settings: DicomSettings,
        sink: BlobSink,
        *,
        ae_factory: Callable[..., AE] | None = None,
        limits: RetrieveLimits | None = None,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.limits = limits or RetrieveLimits()
        self.peer = net.Peer(settings.peer.ae_title, settings.peer.host, settings.peer.port)
        self._ae_factory = ae_factory or net.make_ae
        self._host, self._port = split_host_port(settings.listen)
        self._lock = threading.Condition()
        self._moves: dict[str, _Move] = {}
        self._inflight = 0  # C-STORE handlers running
        self._move_assocs: set[Any] = set()
        self._stopping = False
        self._server: _StorageServer | None = None
        self._thread: threading.Thread | None = None
        self._scu_ae: AE | None = None
        self._peer_ips: frozenset[str] = frozenset()
        self._peer_resolved_at = -_PEER_RESOLVE_EVERY_SECS
        self._throttle = _Throttle()

    # -- lifecycle --------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """Where the SCP listens (the real port when ``listen`` asked for port 0)."""
        if self._server is None:
            return self._host, self._port
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Listen on ``settings.listen``. Idempotent.

        Raises:
            AdapterError: the address cannot be bound.
        """
        if self._server is not None:
            return
        configure_pynetdicom()
        self._refresh_peer_ips(force=True)
        t = self.limits.timeouts
        ae = self._ae_factory(self.settings.ae_title, requested=(), timeouts=t)
        ae.maximum_associations = self.limits.max_associations
        ae.maximum_pdu_size = self.limits.max_pdu_bytes
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, STORAGE_TRANSFER_SYNTAXES)
        ae.add_supported_context(net.VERIFICATION, list(net.TRANSFER_SYNTAXES))
        handlers: list[Any] = [
            *net.NODELAY_HANDLERS,
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_CONN_CLOSE, _remove_partial_dataset),
        ]
        try:
            server = ae.make_server(
                (self._host, self._port),
                contexts=_SharedContexts(ae.supported_contexts),
                evt_handlers=handlers,
                server_class=_StorageServer,
                allow=self._allowed_address,
            )
        except OSError as e:
            raise AdapterError(
                f"dicom storage SCP: cannot listen on {self.settings.listen}: {e.strerror or e}",
                hint="Another program may hold the port (ss -ltnp), or ports below 1024 "
                "need privileges; change `listen`.",
            ) from None
        assert isinstance(server, _StorageServer)  # noqa: S101 - narrows make_server's type
        with self._lock:
            self._stopping = False
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="dicom-storage-scp",
            daemon=True,
        )
        self._thread.start()
        host, port = self.address
        log.info(
            "The DICOM storage SCP listens on %s:%d as %s for %s.",
            host,
            port,
            self.settings.ae_title,
            self.peer,
            extra={"event": "dicom.scp_started"},
        )

    def stop(self, *, timeout_secs: float = 10.0) -> None:
        """Stop accepting, let the C-STOREs being committed finish and be answered,
        abort the associations left (ours and the PACS's), return within the timeout."""
        deadline = time.monotonic() + timeout_secs
        server, self._server = self._server, None
        with self._lock:
            self._stopping = True
            move_assocs = list(self._move_assocs)
        for assoc in move_assocs:  # a running move ends as incomplete
            with contextlib.suppress(Exception):
                assoc.abort()
        if server is None:
            return
        server.shutdown()  # the accept loop ends within its poll interval
        with self._lock:
            while self._inflight and time.monotonic() < deadline:
                self._lock.wait(timeout=max(0.0, deadline - time.monotonic()))
        assocs = list(server.active_associations)
        for assoc in assocs:
            with contextlib.suppress(Exception):
                assoc.abort()
        for assoc in assocs:
            assoc.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
            self._thread = None
        log.info("The DICOM storage SCP stopped.", extra={"event": "dicom.scp_stopped"})

    # -- who may connect ---------------------------------------------------------------

    def _refresh_peer_ips(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._peer_resolved_at >= _PEER_RESOLVE_EVERY_SECS:
            self._peer_resolved_at = now
            ips = _resolve(self.settings.peer.host)
            if ips or force:
                self._peer_ips = ips

    def _allowed_address(self, ip: str) -> bool:
        ip = _normalise_ip(ip)
        if ip in self._peer_ips:
            return True
        self._refresh_peer_ips()  # DNS may have moved the peer: at most every 30 s
        if ip in self._peer_ips:
            return True
        self._throttle.warn(
            f"ip:{ip}",
            "The DICOM storage SCP closed a connection from %s: only the PACS %s may "
            "connect (peer.host).",
            ip,
            self.peer,
            event="dicom.scp_connection_refused",
        )
        return False

    def _on_requested(self, event: Any) -> None:
        """EVT_REQUESTED: reject an A-ASSOCIATE-RQ from anyone but the configured peer."""
        assoc = event.assoc
        try:
            calling = str(assoc.requestor.primitive.calling_ae_title or "").strip()
            ip = _normalise_ip(str(assoc.requestor.address))
        except Exception:  # noqa: BLE001 - a notification handler never breaks pynetdicom
            calling, ip = "", ""
        if calling == self.settings.peer.ae_title and ip in self._peer_ips:
            return
        # PS3.8 9.3.4: rejected-permanent, service-user, calling AE title not recognised.
        # Then wait, as pynetdicom's own rejections do, until the A-ASSOCIATE-RJ is out
        # and the requestor closed (ARTIM-bounded): the acceptor closes the socket as
        # soon as this handler returns, which could otherwise beat the queued RJ.
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        assoc.kill()
        self._throttle.warn(
            f"aet:{calling}@{ip}",
            "The DICOM storage SCP rejected an association from %r at %s: only %s may "
            "store here (peer.ae_title, peer.host).",
            calling,
            ip,
            self.peer,
            event="dicom.scp_association_rejected",
        )

    # -- C-STORE -----------------------------------------------------------------------

    def _on_c_store(self, event: Any) -> int:
        with self._lock:
            self._inflight += 1
        try:
            return self._store(event)
        finally:
            with self._lock:
                self._inflight -= 1
                self._lock.notify_all()

    def _store(self, event: Any) -> int:
        if self._stopping:
            return OUT_OF_RESOURCES
        path = Path(event.dataset_path)
        try:
            size = path.stat().st_size
        except OSError as e:
            self._throttle.warn(
                "tmp",
                "A received instance vanished from the temp dir: %s.",
                e.strerror,
                event="dicom.store_failed",
            )
            return OUT_OF_RESOURCES
        if size > self.limits.max_instance_bytes:
            self._throttle.warn(
                "size",
                "Refused an instance of %d bytes: over the %d-byte limit per instance.",
                size,
                self.limits.max_instance_bytes,
                event="dicom.store_refused",
            )
            self._refuse_unattributed(path, f"an instance over {self.limits.max_instance_bytes} B")
            return OUT_OF_RESOURCES
        try:
            study, series, sop = read_identity(path, event.context.transfer_syntax)
            sop = sop or str(event.request.AffectedSOPInstanceUID)
        except Exception as e:  # noqa: BLE001 - any parse failure of peer data is a refusal
            self._throttle.warn(
                "unreadable",
                "Refused an instance whose StudyInstanceUID cannot be read (%s).",
                type(e).__name__,
                event="dicom.store_refused",
            )
            return CANNOT_UNDERSTAND
        with self._lock:
            move = self._moves.get(study)
        if move is None:
            self._throttle.warn(
                "unsolicited",
                "Refused an instance of study %s: no C-MOVE of ours is waiting for it "
                "(late, or pushed by the PACS on its own).",
                ref(study),
                event="dicom.store_refused",
            )
            return NOT_AUTHORISED
        try:
            with open(path, "rb") as f:
                sha256, stored_size = self.sink.add_blob(f, media_type=MEDIA_TYPE)
        except Exception as e:  # noqa: BLE001 - every storage failure is answered, not raised
            why = f"{type(e).__name__}: {e}"
            with self._lock:
                move.refused += 1
                move.refusal = move.refusal or why
            self._throttle.warn(
                f"store:{type(e).__name__}",
                "Could not store a received instance (%s); answered 0xA700 so the PACS "
                "counts a failed sub-operation and the study is retried.",
                why,
                event="dicom.store_failed",
            )
            return OUT_OF_RESOURCES
        with self._lock:
            move.stored += 1
            move.instances[sop] = StoredInstance(sop, series, sha256, stored_size)
        log.debug(
            "Stored instance %s of study %s (%d bytes).",
            ref(sop),
            ref(study),
            stored_size,
            extra={"event": "dicom.instance_stored"},
        )
        return SUCCESS

    def _refuse_unattributed(self, path: Path, why: str) -> None:
        # An instance too big to read is refused before we know its study; count it
        # against the only move running, if there is exactly one.
        with self._lock:
            if len(self._moves) == 1:
                move = next(iter(self._moves.values()))
                move.refused += 1
                move.refusal = move.refusal or why

    # -- C-MOVE ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _waiting_for(self, study_uid: str) -> Iterator[_Move]:
        deadline = time.monotonic() + self.limits.move_timeout_secs + self.limits.timeouts.dimse
        with self._lock:
            while study_uid in self._moves:  # the same study, retrieved concurrently
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerProtocolError(
                        f"C-MOVE from {self.peer}: another retrieval of the study is still running"
                    )
                self._lock.wait(timeout=left)
            move = _Move(study_uid)
            self._moves[study_uid] = move
        try:
            yield move
        finally:
            with self._lock:
                del self._moves[study_uid]
                self._lock.notify_all()

    def _scu(self) -> AE:
        if self._scu_ae is None:
            self._scu_ae = self._ae_factory(
                self.settings.ae_title,
                requested=(net.STUDY_ROOT_MOVE,),
                timeouts=self.limits.timeouts,
            )
        return self._scu_ae

    def retrieve_study(self, study_uid: str) -> RetrieveResult:
        """C-MOVE one study to our AE title; wait for it; say whether it is complete.

        The storage SCP must be running (`start`). Every instance that arrives is in
        the blob store when this returns, complete or not.

        Raises:
            PeerUnavailableError: the PACS refused, rejected or did not answer the
                association (nothing was moved).
            PeerProtocolError: it accepted no Study Root C-MOVE context, or the same
                study is still being retrieved past the move deadline.
        """
        if self._server is None:
            raise AdapterError(
                "retrieve_study needs the storage SCP: call Retriever.start() first",
                hint="This is a bug in the agent; please report it.",
            )
        study_uid = study_uid.strip()
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study_uid
        t = self.limits.timeouts
        started = time.monotonic()
        with (
            self._waiting_for(study_uid) as move,
            net.associate(self._scu(), self.peer, timeouts=t) as session,
        ):
            with self._lock:
                self._move_assocs.add(session.assoc)
            try:
                outcome = self._move(session, identifier, started)
            finally:
                with self._lock:
                    self._move_assocs.discard(session.assoc)
            with self._lock:  # every sub-operation was answered before the final response
                instances = list(move.instances.values())
                stored, refused, refusal = move.stored, move.refused, move.refusal
        result = _judge(outcome, instances, stored, refused, refusal)
        self._log_result(study_uid, result, time.monotonic() - started)
        return result

    def _move(self, session: net.Session, identifier: Dataset, started: float) -> _Outcome:
        assoc = session.assoc
        try:
            responses = assoc.send_c_move(identifier, self.settings.ae_title, net.STUDY_ROOT_MOVE)
        except (ValueError, RuntimeError) as e:
            raise PeerProtocolError(
                f"C-MOVE to {self.peer}: cannot send ({e})",
                hint="The PACS did not accept Study Root Query/Retrieve - MOVE for our AE "
                "title; enable C-MOVE for it on the PACS.",
            ) from None
        outcome = _Outcome()
        since = time.monotonic()
        deadline = started + self.limits.move_timeout_secs
        for rsp, _ident in responses:
            code = getattr(rsp, "Status", None)
            if code is None:
                outcome.error = session.lost("C-MOVE", since=since)
                break
            outcome.responses += 1
            outcome.completed = _count(rsp, "NumberOfCompletedSuboperations", outcome.completed)
            outcome.failed = _count(rsp, "NumberOfFailedSuboperations", outcome.failed)
            outcome.warning = _count(rsp, "NumberOfWarningSuboperations", outcome.warning)
            if not status.is_final(int(code)):
                if time.monotonic() > deadline:
                    assoc.abort()
                    outcome.error = PeerProtocolError(
                        f"C-MOVE from {self.peer}: not finished after "
                        f"{self.limits.move_timeout_secs:g} s; aborted",
                        hint="A very large study or a slow PACS: the agent retries later.",
                    )
                    break
                since = time.monotonic()
                continue
            outcome.status = int(code)
            outcome.final_has_completed = "NumberOfCompletedSuboperations" in rsp
            break
        return outcome

    def _log_result(self, study_uid: str, result: RetrieveResult, secs: float) -> None:
        if result.complete:
            log.debug(
                "Retrieved study %s: %d instances in %.1f s.",
                ref(study_uid),
                len(result.instances),
                secs,
                extra={"event": "dicom.move_done", "count": len(result.instances)},
            )
        else:
            log.warning(
                "C-MOVE of study %s from %s incomplete after %.1f s: %s; retried later.",
                ref(study_uid),
                self.peer,
                secs,
                result.detail,
                extra={"event": "dicom.move_incomplete", "count": len(result.instances)},
            )


@dataclass(slots=True)
class _Outcome:
    """What the C-MOVE responses said."""

    status: int | None = None  # the final status; None: no final response
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    final_has_completed: bool = False
    responses: int = 0
    error: PeerProtocolError | None = None


def _count(rsp: Dataset, keyword: str, previous: int | None) -> int | None:
    value = rsp.get(keyword)
    if value is None:
        return previous
    try:
        return int(value)
    except (TypeError, ValueError):
        return previous


def _judge(
    outcome: _Outcome,
    instances: list[StoredInstance],
    stored: int,
    refused: int,
    refusal: str,
) -> RetrieveResult:
    """Completeness by counts (module docstring); a pure function of what happened."""
    failed = max(outcome.failed or 0, refused)  # the PACS's count includes our refusals
    warning = outcome.warning or 0
    problems: list[str] = []
    if outcome.error is not None:
        problems.append(f"{type(outcome.error).__name__}: {outcome.error}")
    elif outcome.status is None:
        problems.append("no final C-MOVE response")
    elif outcome.status != SUCCESS:
        problems.append(f"final status {status.describe(outcome.status, service='C-MOVE')}")
    if outcome.status == SUCCESS and not outcome.final_has_completed:
        problems.append("the final response has no Number of Completed Sub-operations")
    completed = outcome.completed
    if outcome.final_has_completed and completed != stored:
        problems.append(
            f"the PACS counts {completed} completed sub-operations, {stored} instances "
            "arrived and were stored"
        )
    if failed:
        problems.append(f"{failed} sub-operations failed")
    if refused:
        problems.append(f"we refused {refused} instances ({refusal})")
    if warning:
        problems.append(f"{warning} sub-operations with warnings")
    if not problems and stored == 0:
        problems.append("the PACS moved no instances")
    return RetrieveResult(
        complete=not problems,
        instances=instances,
        failed=failed,
        warning=warning,
        status=outcome.status,
        detail="; ".join(problems),
        completed=completed,
        error=outcome.error,
    )
