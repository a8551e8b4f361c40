"""Real PACS peers for tests and benchmarks: Orthanc and dcmtk's dcmqrscp, on loopback.

- `orthanc(tmp_path, ...) -> OrthancPeer`: Orthanc (Debian's ``/usr/sbin/Orthanc``)
  with its own JSON config, storage and index in ``tmp_path``, DICOM and HTTP on free
  127.0.0.1 ports. ``add_modality`` registers a C-MOVE destination / known AE over its
  REST API; ``limit_find_results`` sets ``LimitFindResults`` (capped C-FIND);
  ``tcp_nodelay`` sets DCMTK's ``TCP_NODELAY`` environment variable (Nagle off/on);
  ``known_aes_only`` refuses associations from AEs it does not know;
  ``check_called_ae`` makes it refuse associations addressed to another AE title.
- `dcmqrscp(tmp_path, ...) -> DcmtkPeer`: dcmqrscp with its own config and storage area.
- `make_study(...) -> list[Dataset]`: one synthetic study built in code (no file from
  pydicom's test data, which may try to download), small pixel data, names in
  ISO_IR 192 (UTF-8 Persian) or ISO_IR 127 (ISO-8859-6 Arabic), Persian-digit IDs.
- `load(peer, datasets)`: C-STORE them into a peer (pynetdicom, TCP_NODELAY, every
  status checked; an empty status is retried on a new association: issue 5).
- `bind_shim() -> Path`: the LD_PRELOAD library that keeps both peers on loopback.

Confinement: Orthanc 1.10 has no listen-address option and binds 0.0.0.0 (DICOM and
HTTP), and dcmqrscp has none either. Both are dynamically linked against glibc, so an
LD_PRELOAD shim, compiled with gcc on first use, rewrites ``bind()`` to the wildcard
address (0.0.0.0 or ::) into loopback and refuses any other non-loopback address.
A network namespace was the alternative; it was not taken because the peer would get
its *own* loopback, unreachable from the test process (and Orthanc must connect back
to our C-STORE SCP for C-MOVE), unless the tests ran inside the namespace too or a
veth pair with routes were set up, which needs CAP_NET_ADMIN. After start-up each
fixture checks /proc/net/tcp{,6}: every listening socket on the peer's ports must be
on a loopback address, or the peer is stopped and the test fails, so a future
statically linked Orthanc cannot silently listen on every interface.

Every process started here is stopped by its own pid (its process group, which it
leads), never by name. Readiness is a bounded poll of the ports (no fixed sleeps).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from tests.hubkit import require_peer

__all__ = [
    "CT_IMAGE_STORAGE",
    "MR_IMAGE_STORAGE",
    "SECONDARY_CAPTURE",
    "DcmtkPeer",
    "OrthancPeer",
    "bind_shim",
    "dcmqrscp",
    "free_port",
    "load",
    "make_study",
    "orthanc",
]

HOST = "127.0.0.1"
READY_TIMEOUT_SECS = 20.0
STOP_TIMEOUT_SECS = 10.0

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_SOP_CLASS_OF_MODALITY = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}

#: Synthetic patients (no real person): Persian in UTF-8, Arabic letters in ISO-8859-6
#: (which has no Persian پ چ ژ گ ی ک: a Windows-era PACS writes ي and ك instead).
PERSIAN_NAME = "کریمی^زهرا"
ARABIC_NAME = "كريمي^علي"  # Arabic kaf and yeh: folds to کریمی^علی
PERSIAN_DIGIT_ID = "۰۰۱۲۳۴۵۶۷۹"  # 0012345679, a valid (made-up) national code

# -- the loopback shim ----------------------------------------------------------------

_SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

/* Test peers (Orthanc, dcmqrscp) bind 0.0.0.0: keep them on loopback. */
typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind;
    if (!real_bind) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in a;
        memcpy(&a, addr, sizeof a);
        if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        } else if ((ntohl(a.sin_addr.s_addr) >> 24) != 127) {
            errno = EADDRNOTAVAIL;
            return -1;
        }
        return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
    }
    if (addr && addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 a;
        memcpy(&a, addr, sizeof a);
        if (IN6_IS_ADDR_UNSPECIFIED(&a.sin6_addr)) {
            a.sin6_addr = in6addr_loopback;
        } else if (!IN6_IS_ADDR_LOOPBACK(&a.sin6_addr)) {
            errno = EADDRNOTAVAIL;
            return -1;
        }
        return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
    }
    return real_bind(fd, addr, len);
}
"""

_shim_lock = threading.Lock()
_shim_path: Path | None = None


def bind_shim() -> Path:
    """The LD_PRELOAD library (compiled once per process into a private temp dir)."""
    global _shim_path
    with _shim_lock:
        if _shim_path is not None and _shim_path.exists():
            return _shim_path
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc is None:
            require_peer("gcc", "needed to build the loopback bind shim for Orthanc/dcmqrscp")
        tag = hashlib.sha256(_SHIM_SOURCE.encode()).hexdigest()[:12]
        work = Path(tempfile.mkdtemp(prefix="sepas-bindshim-"))
        atexit.register(shutil.rmtree, work, True)
        src = work / "bindshim.c"
        out = work / f"bindshim-{tag}.so"
        src.write_text(_SHIM_SOURCE)
        proc = subprocess.run(
            [gcc, "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"could not compile the bind shim: {proc.stderr.strip()}")
        _shim_path = out
        return out


# -- ports, processes -----------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the peer binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0


def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp) of sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)
            for line in f:
                parts = line.split()
                local, state = parts[1], parts[3]
                addr, _, hexport = local.partition(":")
                if state == "0A" and int(hexport, 16) == port:
                    found.append(addr)
    return found


_LOOPBACK_HEX = {
    "0100007F",  # 127.0.0.1 (little-endian in /proc)
    "00000000000000000000000001000000",  # ::1
    "0000000000000000FFFF00000100007F",  # ::ffff:127.0.0.1
}


def _assert_loopback_only(name: str, ports: Iterable[int]) -> None:
    for port in ports:
        addrs = _listeners(port)
        if not addrs:
            raise RuntimeError(f"{name}: nothing listens on port {port}")
        for a in addrs:
            # IPv4 127.0.0.0/8 appears as ..7F (the last byte in /proc's order).
            if a not in _LOOPBACK_HEX and not (len(a) == 8 and a.endswith("7F")):
                raise RuntimeError(f"{name} listens beyond loopback on port {port} ({a})")


def _stop_process(proc: subprocess.Popen[bytes], *, graceful: bool = True) -> None:
    """Stop the process group the peer leads (started with start_new_session): SIGTERM
    then SIGKILL after the timeout, or SIGKILL at once. By pid only, never by name."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            proc.wait(timeout=STOP_TIMEOUT_SECS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_SECS)
    else:
        # dcmqrscp forks a child per association; make sure none outlives the test.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_ready(
    name: str, proc: subprocess.Popen[bytes], ports: Sequence[int], log_path: Path
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECS
    while not all(_port_open(p) for p in ports):
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise RuntimeError(f"{name} exited with {proc.returncode} before it was ready:\n{tail}")
        if time.monotonic() > deadline:
            _stop_process(proc)
            raise RuntimeError(f"{name} did not open ports {list(ports)} in time")
        time.sleep(0.05)  # between polls of a bounded loop, not a wait for readiness


def _spawn(
    argv: list[str], *, log_path: Path, env: Mapping[str, str], cwd: Path
) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    finally:
        log.close()


def _peer_env(*, tcp_nodelay: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ", "HOME")}
    env["LD_PRELOAD"] = str(bind_shim())
    # DCMTK (inside Orthanc and dcmqrscp) reads TCP_NODELAY: "0" leaves Nagle on.
    env["TCP_NODELAY"] = "1" if tcp_nodelay else "0"
    return env


class DicomPeerLike(Protocol):
    host: str
    port: int
    ae_title: str


# -- Orthanc --------------------------------------------------------------------------


@dataclass
class OrthancPeer:
    """An Orthanc running on 127.0.0.1 with its own config and storage."""

    host: str
    port: int  # DICOM
    ae_title: str
    http_port: int
    root: Path
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] = field(repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def rest(self, method: str, path: str, body: Any = None) -> Any:
        """Call Orthanc's REST API; returns the decoded JSON (or None)."""
        content = None if body is None else json.dumps(body).encode()
        r = httpx.request(method, self.base_url + path, content=content, timeout=30.0)
        r.raise_for_status()
        return r.json() if r.content and "json" in r.headers.get("content-type", "") else None

    def add_modality(self, ae_title: str, host: str, port: int, *, name: str | None = None) -> None:
        """Make ``ae_title`` known to Orthanc (C-FIND/C-MOVE allowed; C-MOVE target)."""
        self.rest(
            "PUT",
            f"/modalities/{name or ae_title.lower()}",
            {
                "AET": ae_title,
                "Host": host,
                "Port": port,
                "AllowEcho": True,
                "AllowFind": True,
                "AllowMove": True,
                "AllowGet": True,
                "AllowStore": True,
            },
        )

    def study_count(self) -> int:
        return len(self.rest("GET", "/studies"))

    def instance_uids(self, study_uid: str) -> list[str]:
        """SOPInstanceUIDs Orthanc holds for a study."""
        found = self.rest(
            "POST",
            "/tools/find",
            {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
        )
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in found]

    def stop(self, *, graceful: bool = False) -> None:
        """Stop Orthanc. Its graceful stop takes about 3 s (its HTTP and DICOM servers
        poll once a second), so a throwaway test instance is killed unless asked."""
        _stop_process(self.proc, graceful=graceful)

    def __enter__(self) -> OrthancPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None
    )


def orthanc(
    tmp_path: Path,
    *,
    limit_find_results: int | None = None,
    tcp_nodelay: bool = True,
    ae_title: str = "ORTHANC",
    known_aes_only: bool = False,
    check_called_ae: bool = False,
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> OrthancPeer:
    """Start Orthanc on free 127.0.0.1 ports. Stop it with ``stop()`` (or ``with``).

    Args:
        limit_find_results: Orthanc's ``LimitFindResults`` (C-FIND answers per query).
        tcp_nodelay: Nagle off (True) or on (False) on Orthanc's DICOM sockets.
        known_aes_only: refuse associations from AE titles not in ``DicomModalities``
            (every ``DicomAlwaysAllow*`` off); otherwise any AE may echo, store, find.
        check_called_ae: refuse associations whose called AE title is not ``ae_title``.
        modalities: name -> (AE title, host, port), known from the start.
        extra_config: merged last into the JSON config.
    """
    binary = orthanc_binary()
    if binary is None:
        require_peer("Orthanc", "install the Debian package 'orthanc'")
    root = Path(tmp_path) / f"orthanc-{os.urandom(3).hex()}"
    storage = root / "storage"
    storage.mkdir(parents=True)
    config_path = root / "orthanc.json"
    log_path = root / "orthanc.log"
    last_error: Exception | None = None
    for _attempt in range(3):  # a free port may be taken between probe and bind
        port, http_port = free_port(), free_port()
        allow = not known_aes_only
        config: dict[str, Any] = {
            "Name": "sepas-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "Plugins": [],
            "ConcurrentJobs": 2,
            "HttpServerEnabled": True,
            "HttpPort": http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpDescribeErrors": True,
            "DicomServerEnabled": True,
            "DicomAet": ae_title,
            "DicomPort": port,
            "DicomCheckCalledAet": check_called_ae,
            "DicomAlwaysAllowEcho": allow,
            "DicomAlwaysAllowStore": allow,
            "DicomAlwaysAllowFind": allow,
            "DicomAlwaysAllowFindWorklist": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "DicomCheckModalityHost": False,
            "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
            "DicomModalitiesInDatabase": False,
            "DicomScpTimeout": 30,
            "DicomAssociationCloseDelay": 0,
            "DefaultEncoding": "Utf8",
            "LimitFindResults": limit_find_results or 0,
            "LimitFindInstances": 0,
            "SaveJobs": False,
            "StableAge": 1,
            "HttpTimeout": 30,
        }
        config.update(extra_config or {})
        config_path.write_text(json.dumps(config, indent=1))
        proc = _spawn(
            [str(binary), str(config_path)],
            log_path=log_path,
            env=_peer_env(tcp_nodelay=tcp_nodelay),
            cwd=root,
        )
        try:
            _wait_ready("Orthanc", proc, [port, http_port], log_path)
            _assert_loopback_only("Orthanc", [port, http_port])
        except RuntimeError as e:
            _stop_process(proc)
            last_error = e
            continue
        return OrthancPeer(
            host=HOST,
            port=port,
            ae_title=ae_title,
            http_port=http_port,
            root=root,
            config_path=config_path,
            log_path=log_path,
            proc=proc,
        )
    raise RuntimeError(f"Orthanc did not start: {last_error}")


# -- dcmqrscp -------------------------------------------------------------------------


@dataclass
class DcmtkPeer:
    """dcmqrscp running on 127.0.0.1 with its own config and storage area."""

    host: str
    port: int
    ae_title: str
    root: Path
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] = field(repr=False)

    def stop(self) -> None:
        _stop_process(self.proc)

    def __enter__(self) -> DcmtkPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def dcmqrscp(
    tmp_path: Path,
    *,
    ae_title: str = "DCMQRSCP",
    move_destinations: Mapping[str, tuple[str, int]] | None = None,
    tcp_nodelay: bool = True,
) -> DcmtkPeer:
    """Start dcmqrscp on a free 127.0.0.1 port.

    Args:
        move_destinations: AE title -> (host, port): C-MOVE destinations it knows
            (dcmqrscp reads its host table only at start-up).
    """
    binary = shutil.which("dcmqrscp")
    if binary is None:
        require_peer("dcmqrscp", "install the Debian package 'dcmtk'")
    root = Path(tmp_path) / f"dcmqrscp-{os.urandom(3).hex()}"
    area = root / "db"
    area.mkdir(parents=True)
    config_path = root / "dcmqrscp.cfg"
    log_path = root / "dcmqrscp.log"
    last_error: Exception | None = None
    for _attempt in range(3):
        port = free_port()
        hosts = "\n".join(
            f"dest{i} = ({ae}, {host}, {p})"
            for i, (ae, (host, p)) in enumerate((move_destinations or {}).items())
        )
        config_path.write_text(
            f"NetworkTCPPort = {port}\n"
            "MaxPDUSize = 65536\n"
            "MaxAssociations = 16\n"
            "HostTable BEGIN\n"
            f"{hosts}\n"
            "HostTable END\n"
            "VendorTable BEGIN\n"
            "VendorTable END\n"
            "AETable BEGIN\n"
            f"{ae_title} {area} RW (500, 1024mb) ANY\n"
            "AETable END\n"
        )
        proc = _spawn(
            [binary, "-c", str(config_path), "--fork", str(port)],
            log_path=log_path,
            env=_peer_env(tcp_nodelay=tcp_nodelay),
            cwd=root,
        )
        try:
            _wait_ready("dcmqrscp", proc, [port], log_path)
            _assert_loopback_only("dcmqrscp", [port])
        except RuntimeError as e:
            _stop_process(proc)
            last_error = e
            continue
        return DcmtkPeer(
            host=HOST,
            port=port,
            ae_title=ae_title,
            root=root,
            config_path=config_path,
            log_path=log_path,
            proc=proc,
        )
    raise RuntimeError(f"dcmqrscp did not start: {last_error}")


# -- synthetic studies ----------------------------------------------------------------


def make_study(
    *,
    study_uid: str | None = None,
    patient_name: str = PERSIAN_NAME,
    patient_id: str | None = None,
    charset: str = "ISO_IR 192",
    issuer_of_patient_id: str | None = None,
    other_patient_ids: Sequence[tuple[str, str]] = (),
    birth_date: str = "19830926",
    sex: str = "F",
    study_date: str = "20250321",
    study_time: str = "093000",
    accession: str = "ACC0001",
    study_description: str = "CT chest",
    referring_physician: str = "Rahimi^Ali",
    modality: str = "CT",
    series: int = 1,
    instances: int = 2,
    body_part: str = "CHEST",
    pixels: int = 8,
    series_offset: int = 0,
) -> list[Dataset]:
    """One synthetic study: ``series`` x ``instances`` datasets with file meta.

    ``pixels`` is the side of the square 16-bit image (8: 128 bytes; 70: about 10 KB).
    Pass the same ``study_uid`` and a ``series_offset`` to add series to a study.
    ``patient_id`` defaults to the national code in Persian digits, or in ASCII digits
    for ISO_IR 127 (ISO-8859-6 has no Persian or Arabic-Indic digits).
    ``other_patient_ids`` are (ID, issuer) pairs for OtherPatientIDsSequence.
    """
    study_uid = study_uid or generate_uid()
    if patient_id is None:
        patient_id = PERSIAN_DIGIT_ID if charset == "ISO_IR 192" else "0012345679"
    sop_class = _SOP_CLASS_OF_MODALITY.get(modality, SECONDARY_CAPTURE)
    out = []
    for s in range(series):
        series_uid = generate_uid()
        for i in range(instances):
            ds = Dataset()
            ds.SpecificCharacterSet = charset
            ds.SOPClassUID = sop_class
            ds.SOPInstanceUID = generate_uid()
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.PatientName = patient_name
            ds.PatientID = patient_id
            if issuer_of_patient_id:
                ds.IssuerOfPatientID = issuer_of_patient_id
            if other_patient_ids:
                seq = []
                for value, issuer in other_patient_ids:
                    item = Dataset()
                    item.PatientID = value
                    item.IssuerOfPatientID = issuer
                    seq.append(item)
                ds.OtherPatientIDsSequence = seq
            ds.PatientBirthDate = birth_date
            ds.PatientSex = sex
            ds.StudyDate = study_date
            ds.StudyTime = study_time
            ds.StudyID = "1"
            ds.AccessionNumber = accession
            ds.StudyDescription = study_description
            ds.ReferringPhysicianName = referring_physician
            ds.Modality = modality
            ds.SeriesNumber = series_offset + s + 1
            ds.SeriesDescription = f"{modality} series {series_offset + s + 1}"
            ds.BodyPartExamined = body_part
            ds.InstanceNumber = i + 1
            ds.SeriesDate = study_date
            ds.ContentDate = study_date
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = pixels
            ds.Columns = pixels
            ds.BitsAllocated = 16
            ds.BitsStored = 12
            ds.HighBit = 11
            ds.PixelRepresentation = 0
            ds.PixelData = bytes((i + s + k) % 251 for k in range(pixels * pixels * 2))
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = sop_class
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta = meta
            out.append(ds)
    return out


# -- loading over C-STORE -------------------------------------------------------------


def load(
    peer: DicomPeerLike,
    datasets: Sequence[Dataset],
    *,
    calling_ae: str = "LOADER",
    attempts: int = 3,
) -> int:
    """C-STORE ``datasets`` into ``peer``; returns how many were stored.

    One association (re-opened on failure); each status is checked. An empty or
    missing status (issue 5: about 1 in 6,000 pynetdicom sends) is retried.

    Raises:
        RuntimeError: the peer refused or kept failing an instance.
    """
    from pynetdicom import AE, evt  # test helper: the agent's own code uses adapters.dicom.net

    sop_classes = sorted({str(ds.SOPClassUID) for ds in datasets})
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = 30
    ae.dimse_timeout = 30
    ae.network_timeout = 30
    for uid in sop_classes:
        ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

    def nodelay(event: Any) -> None:
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    handlers = [(evt.EVT_CONN_OPEN, nodelay)]
    pending = list(datasets)
    stored = 0
    for _attempt in range(attempts):
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=handlers)
        if not assoc.is_established:
            continue
        try:
            while pending:
                status = assoc.send_c_store(pending[0])
                code = getattr(status, "Status", None)
                if code is None:
                    break  # empty status: a failure to retry on a new association
                if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                    raise RuntimeError(f"C-STORE refused with status 0x{code:04X}")
                pending.pop(0)
                stored += 1
        finally:
            if assoc.is_established:
                assoc.release()
        if not pending:
            return stored
    raise RuntimeError(
        f"could not store {len(pending)} of {len(datasets)} instances into "
        f"{peer.ae_title}@{peer.host}:{peer.port}"
    )
