"""C-FIND and C-MOVE against Orthanc, as ratios to dcmtk's findscu and movescu + storescp.

Run from the repository root::

    .venv/bin/python benchmarks/pacs.py            # 2,000 studies, a few minutes
    .venv/bin/python benchmarks/pacs.py --quick    # 200 studies, well under a minute

Orthanc (Debian's /usr/sbin/Orthanc) runs with its own config and storage in a temp
directory, confined to 127.0.0.1 by the LD_PRELOAD bind shim of
`tests.interop.pacs_peers`, as are storescp and the dcmtk clients. It is loaded over
C-STORE (dcmtk's storescu, one association) with synthetic studies made in code
(`pacs_peers.make_study`, 70x70 16-bit pixels: ~10 KB instances): ``--studies``
studies of ``--instances`` instances each, plus one study of ``--big`` instances.
Nagle's algorithm is off everywhere (TCP_NODELAY=1 for Orthanc and every dcmtk tool,
TCP_NODELAY on our sockets), so neither side pays the ~40 ms delayed-ACK stall.

Figures, each against a baseline measured in this same run (median of ``--rounds``,
ours and the baseline alternating):

1. full study-level C-FIND: `adapters.dicom.query.find_studies` over one window that
   holds every study vs ``findscu`` with the very same identifier (written to a query
   file). Target (issue 5): ours within 1.5x of findscu's time.
2. C-MOVE instances/s: `adapters.dicom.retrieve.Retriever.retrieve_study` (our storage
   SCP, each instance fsync'd into a real Buffer before success is answered) vs
   ``movescu`` asking Orthanc to move the same study to a ``storescp`` (which writes
   files without fsync). Big study, and ``--small-moves`` small studies one by one
   (movescu: one query file per study, one association; ours: one association per
   study, as the adapter does). Target (issue 5): >= 0.5x movescu + storescp on the
   big study.
3. diagnostic, no target: the same big move into a Retriever whose sink only hashes
   (no file, no fsync, no SQLite), to show what storage costs and what pynetdicom does.

A missed target prints MISS; the exit status is non-zero only when the benchmark itself
fails (a peer missing, Orthanc not starting, a move or query that does not complete).
Every load and loop is bounded by a count and a time limit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from adapters.dicom import net, query
from adapters.dicom.retrieve import Retriever
from adapters.dicom.settings import DicomPeer, DicomSettings
from agent.buffer import Buffer
from tests.interop import pacs_peers

TARGET_FIND_RATIO = 1.5  # ours / findscu (time): at most
TARGET_MOVE_RATIO = 0.5  # ours / movescu+storescp (instances/s): at least
OUR_AE = "SEPASBENCH"
SCP_AE = "BENCHSCP"
FIND_AE = "BENCHFIND"
FIRST_DAY = dt.date(2025, 1, 1)
DAYS = 100


def _tools_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ", "HOME")}
    env["LD_PRELOAD"] = str(pacs_peers.bind_shim())  # storescp binds 0.0.0.0 otherwise
    env["TCP_NODELAY"] = "1"
    return env


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed")
    return path


def _at(peer: pacs_peers.OrthancPeer) -> list[str]:
    return [peer.host, str(peer.port)]


def _run(argv: list[str], *, timeout: float, what: str) -> float:
    """Run a dcmtk tool; its wall time. Raises RuntimeError when it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        argv, env=_tools_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return secs


# -- data ------------------------------------------------------------------------------


def _write(ds: Dataset, path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)


def generate(root: Path, *, studies: int, instances: int, big: int, limit: float) -> dict[str, Any]:
    """Studies as Part 10 files under root/in; bounded by count and time."""
    inbox = root / "in"
    inbox.mkdir()
    deadline = time.monotonic() + limit
    small: list[tuple[str, int]] = []
    for i in range(studies):
        if time.monotonic() > deadline:
            print(f"  generation stopped by its time limit after {i} studies")
            break
        day = FIRST_DAY + dt.timedelta(days=i % DAYS)
        datasets = pacs_peers.make_study(
            instances=instances,
            pixels=70,
            study_date=day.strftime("%Y%m%d"),
            study_time=f"{8 + i % 10:02d}{i % 60:02d}00",
            accession=f"ACC{i:06d}",
        )
        sub = inbox / f"s{i // 500:03d}"
        sub.mkdir(exist_ok=True)
        for j, ds in enumerate(datasets):
            _write(ds, sub / f"{i:05d}-{j}.dcm")
        small.append((str(datasets[0].StudyInstanceUID), len(datasets)))
    big_sets = pacs_peers.make_study(
        instances=big, pixels=70, study_date=FIRST_DAY.strftime("%Y%m%d"), accession="BIG"
    )
    bigdir = inbox / "big"
    bigdir.mkdir()
    for j, ds in enumerate(big_sets):
        _write(ds, bigdir / f"{j:05d}.dcm")
    return {
        "small": small,
        "big": (str(big_sets[0].StudyInstanceUID), len(big_sets)),
        "instances": sum(n for _, n in small) + len(big_sets),
    }


def load(peer: pacs_peers.OrthancPeer, root: Path, *, limit: float) -> float:
    return _run(
        [
            _tool("storescu"),
            "-aet",
            "LOADER",
            "-aec",
            peer.ae_title,
            "+sd",
            "+r",
            *_at(peer),
            str(root / "in"),
        ],
        timeout=limit,
        what="storescu (loading Orthanc)",
    )


# -- C-FIND ----------------------------------------------------------------------------


def _window() -> query.Window:
    return query.Window(FIRST_DAY, FIRST_DAY + dt.timedelta(days=DAYS))


def find_ours(peer: pacs_peers.OrthancPeer) -> tuple[float, int]:
    timeouts = net.Timeouts(connect=10, acse=30, dimse=60, network=60)
    t0 = time.perf_counter()
    ae = net.make_ae(FIND_AE, timeouts=timeouts)
    found = 0
    with net.associate(ae, net.Peer(peer.ae_title, peer.host, peer.port), timeouts=timeouts) as s:
        for answer in query.find_studies(s, _window(), cap=None):
            if not answer.complete:
                raise RuntimeError(f"the C-FIND of {answer.window} was capped")
            found += len(answer.studies)
    return time.perf_counter() - t0, found


def find_dcmtk(peer: pacs_peers.OrthancPeer, qfile: Path) -> tuple[float, int]:
    out = qfile.parent / "findscu-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    secs = _run(
        [
            _tool("findscu"),
            "-S",
            "-aet",
            FIND_AE,
            "-aec",
            peer.ae_title,
            "-X",
            "-od",
            str(out),
            *_at(peer),
            str(qfile),
        ],
        timeout=120,
        what="findscu",
    )
    return secs, len(list(out.iterdir()))


def write_query(path: Path) -> None:
    ds = query.study_identifier(_window())
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = UID(query.STUDY_ROOT_FIND)
    meta.MediaStorageSOPInstanceUID = UID("1.2.3.4")
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)


# -- C-MOVE ----------------------------------------------------------------------------


class HashOnlySink:
    """Reads and hashes each instance; stores nothing (diagnostic only)."""

    def add_blob(self, src: IO[bytes] | bytes, *, media_type: str) -> tuple[str, int]:
        data = src if isinstance(src, bytes) else src.read()
        return hashlib.sha256(data).hexdigest(), len(data)


@dataclass
class Storescp:
    proc: subprocess.Popen[bytes]
    port: int
    out: Path

    def clear(self) -> None:
        for f in self.out.iterdir():
            f.unlink()

    def count(self) -> int:
        return len(list(self.out.iterdir()))


@contextlib.contextmanager
def storescp(root: Path) -> Iterator[Storescp]:
    out = root / "storescp-out"
    out.mkdir()
    port = pacs_peers.free_port()
    proc = subprocess.Popen(
        [_tool("storescp"), "-aet", SCP_AE, "-od", str(out), str(port)],
        env=_tools_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("storescp did not start")
            time.sleep(0.05)  # between polls of a bounded loop
        yield Storescp(proc, port, out)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _move_query(path: Path, study_uid: str) -> Path:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = UID(net.STUDY_ROOT_MOVE)
    meta.MediaStorageSOPInstanceUID = UID("1.2.3.5")
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path


def move_dcmtk(
    peer: pacs_peers.OrthancPeer, scp: Storescp, qfiles: list[Path], expect: int
) -> float:
    scp.clear()
    secs = _run(
        [
            _tool("movescu"),
            "-S",
            "-aet",
            SCP_AE,
            "-aem",
            SCP_AE,
            "-aec",
            peer.ae_title,
            *_at(peer),
            *map(str, qfiles),
        ],
        timeout=600,
        what="movescu",
    )
    if scp.count() != expect:
        raise RuntimeError(f"movescu + storescp moved {scp.count()} of {expect} instances")
    return secs


def move_ours(r: Retriever, studies: list[tuple[str, int]]) -> float:
    t0 = time.perf_counter()
    for uid, n in studies:
        result = r.retrieve_study(uid)
        if not result.complete or len(result.instances) != n:
            raise RuntimeError(f"our C-MOVE was incomplete: {result.detail}")
    return time.perf_counter() - t0


@contextlib.contextmanager
def retriever(peer: pacs_peers.OrthancPeer, sink: Any) -> Iterator[Retriever]:
    settings = DicomSettings(
        name="pacs",
        kind="dicom",
        ae_title=OUR_AE,
        listen="127.0.0.1:0",
        peer=DicomPeer(ae_title=peer.ae_title, host=peer.host, port=peer.port),
        retrieve="instances",
    )
    r = Retriever(settings, sink)
    r.start()
    peer.add_modality(OUR_AE, *r.address)
    try:
        yield r
    finally:
        r.stop(timeout_secs=10)


# -- report ----------------------------------------------------------------------------


def _median(fn: Callable[[], float], rounds: int) -> tuple[float, list[float]]:
    values = [fn() for _ in range(rounds)]
    return statistics.median(values), values


def _alternate(
    ours: Callable[[], float], base: Callable[[], float], rounds: int
) -> tuple[list[float], list[float]]:
    a, b = [], []
    for _ in range(rounds):
        b.append(base())
        a.append(ours())
    return a, b


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="200 studies, small counts")
    p.add_argument("--studies", type=int, help="small studies (default 2000; --quick 200)")
    p.add_argument("--instances", type=int, default=1, help="instances per small study")
    p.add_argument("--big", type=int, help="instances of the big study (500; --quick 150)")
    p.add_argument("--small-moves", type=int, help="small studies moved one by one (40; 10)")
    p.add_argument("--rounds", type=int, help="rounds per figure (3; --quick 2)")
    p.add_argument("--dir", type=Path, help="where the temp dir goes")
    args = p.parse_args(argv)
    studies = args.studies or (200 if args.quick else 2000)
    big = args.big or (150 if args.quick else 500)
    small_moves = args.small_moves or (10 if args.quick else 40)
    rounds = args.rounds or (2 if args.quick else 3)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # storescp overwrites etc.
    missing = [b for b in ("storescu", "findscu", "movescu", "storescp") if shutil.which(b) is None]
    if pacs_peers.orthanc_binary() is None:
        missing.append("Orthanc")
    if missing:
        print(f"cannot run: {', '.join(missing)} not installed (Debian: orthanc, dcmtk)")
        return 2

    with tempfile.TemporaryDirectory(prefix="sepas-bench-pacs-", dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"generating {studies} studies x {args.instances} + 1 x {big} instances ...")
        t0 = time.perf_counter()
        data = generate(root, studies=studies, instances=args.instances, big=big, limit=300)
        print(f"  {data['instances']} files in {time.perf_counter() - t0:.1f} s")
        peer = pacs_peers.orthanc(root / "orthanc", tcp_nodelay=True)
        try:
            peer.add_modality(SCP_AE, "127.0.0.1", 1)  # port set below
            peer.add_modality(FIND_AE, "127.0.0.1", 1)
            print("loading Orthanc with storescu ...")
            secs = load(peer, root, limit=900)
            n = peer.study_count()
            print(f"  {data['instances']} instances in {secs:.1f} s; Orthanc holds {n} studies")
            rows = run(peer, root, data, rounds=rounds, small_moves=small_moves)
        finally:
            peer.stop()
    print_report(rows, studies=n)
    return 0


def run(
    peer: pacs_peers.OrthancPeer,
    root: Path,
    data: dict[str, Any],
    *,
    rounds: int,
    small_moves: int,
) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    qfile = root / "find.dcm"
    write_query(qfile)
    found: dict[str, int] = {}

    def ours_find() -> float:
        secs, found["ours"] = find_ours(peer)
        return secs

    def dcmtk_find() -> float:
        secs, found["findscu"] = find_dcmtk(peer, qfile)
        return secs

    print("C-FIND ...")
    ours_find()  # warm-up: Orthanc's caches, our imports
    a, b = _alternate(ours_find, dcmtk_find, rounds)
    if found["ours"] != found["findscu"]:
        raise RuntimeError(f"C-FIND answers differ: ours {found['ours']}, findscu {found}")
    rows["find"] = (a, b, found["ours"])

    big_uid, big_n = data["big"]
    smalls = data["small"][:small_moves]
    small_n = sum(n for _, n in smalls)
    qdir = root / "moveq"
    qdir.mkdir()
    big_q = [_move_query(qdir / "big.dcm", big_uid)]
    small_q = [_move_query(qdir / f"s{i:04d}.dcm", uid) for i, (uid, _) in enumerate(smalls)]

    buffer = Buffer.open(root / "agent-data", data_key=None)
    try:
        with storescp(root) as scp, retriever(peer, buffer) as r:
            peer.add_modality(SCP_AE, "127.0.0.1", scp.port)
            print(f"C-MOVE of one study of {big_n} instances ...")
            move_ours(r, [(big_uid, big_n)])  # warm-up
            a, b = _alternate(
                lambda: move_ours(r, [(big_uid, big_n)]),
                lambda: move_dcmtk(peer, scp, big_q, big_n),
                rounds,
            )
            rows["move_big"] = (a, b, big_n)
            print(f"C-MOVE of {len(smalls)} studies, {small_n} instances, one by one ...")
            a, b = _alternate(
                lambda: move_ours(r, smalls),
                lambda: move_dcmtk(peer, scp, small_q, small_n),
                rounds,
            )
            rows["move_small"] = (a, b, small_n)
    finally:
        buffer.close()
    print("C-MOVE into a Retriever that stores nothing (diagnostic) ...")
    with retriever(peer, HashOnlySink()) as r:
        rows["move_hash_only"] = _median(lambda: move_ours(r, [(big_uid, big_n)]), rounds)[1]
    return rows


def print_report(rows: dict[str, Any], *, studies: int) -> None:
    print()
    print("| figure | ours | baseline | ratio | target | |")
    print("|---|--:|--:|--:|---|---|")
    a, b, found = rows["find"]
    ours, base = statistics.median(a), statistics.median(b)
    ratio = ours / base
    print(
        f"| study-level C-FIND, {found} of {studies} studies (s) | {ours:.2f} | "
        f"{base:.2f} findscu | {ratio:.2f}x | <= {TARGET_FIND_RATIO}x | "
        f"{_verdict(ratio <= TARGET_FIND_RATIO)} |"
    )
    for key, label, target in (
        ("move_big", "C-MOVE, one study", True),
        ("move_small", "C-MOVE, small studies one by one", False),
    ):
        a, b, n = rows[key]
        ours, base = n / statistics.median(a), n / statistics.median(b)
        ratio = ours / base
        verdict = _verdict(ratio >= TARGET_MOVE_RATIO) if target else ""
        tgt = f">= {TARGET_MOVE_RATIO}x" if target else ""
        print(
            f"| {label}, {n} instances (inst/s) | {ours:.0f} | {base:.0f} movescu+storescp | "
            f"{ratio:.2f}x | {tgt} | {verdict} |"
        )
    n = rows["move_big"][2]
    hash_only = n / statistics.median(rows["move_hash_only"])
    base = n / statistics.median(rows["move_big"][1])
    print(
        f"| diagnostic: C-MOVE, one study, sink hashes only (inst/s) | {hash_only:.0f} | "
        f"{base:.0f} movescu+storescp | {hash_only / base:.2f}x | | |"
    )
    print()
    for key in ("find", "move_big", "move_small"):
        a, b, _ = rows[key]
        print(f"{key}: ours {[round(x, 2) for x in a]} s, baseline {[round(x, 2) for x in b]} s")
    print(f"move_hash_only: {[round(x, 2) for x in rows['move_hash_only']]} s")


if __name__ == "__main__":
    sys.exit(main())
