"""HL7 v2 over MLLP: the hl7-mllp listener against a minimal raw-store listener, and the
mapping against hl7apy's plain parse, as ratios measured in the same run.

Run from the repository root::

    .venv/bin/python benchmarks/mllp.py            # full run, about a minute
    .venv/bin/python benchmarks/mllp.py --quick    # smoke run, about 20 s

1. ACK throughput and latency. Senders (1, then 8 at once, each on its own connection)
   send a ~1 KB ORU^R01, wait for its ACK and check it (MSA-1 = AA, MSA-2 = the
   message's MSH-10) before sending the next. Against:
   - baseline: a minimal raw-store listener: one thread per connection, split the MSH
     line, one INSERT + commit per message into SQLite (WAL, ``synchronous=FULL``),
     then ACK; no intake checks, no mapping;
   - ours: ``MllpListener`` over ``Buffer`` (encryption on, ``synchronous=FULL``) with
     the mapping worker running behind the ACK, as in production.
   Targets (issue 4): ours >= 0.5x the baseline's messages/s at 8 senders, and our p99
   ACK latency < 50 ms.
2. Mapping throughput: messages/s fully mapped to FHIR Records by
   ``adapters.hl7.mapping.map_message`` against hl7apy's ``parse_message(text,
   find_groups=False)`` alone. Target: >= 10x.

Every loop is bounded by a count and by a time limit. A missed target prints MISS; the
exit status stays 0. Loopback TCP only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import logging
import os
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.hl7 import ack
from adapters.hl7.mapping import map_message
from adapters.hl7_mllp.framing import Frame, MllpDecoder, frame
from adapters.hl7_mllp.listener import MllpListener
from adapters.hl7_mllp.settings import Hl7MllpSettings
from agent.adapter import AdapterContext
from agent.buffer import Buffer

NODE_ID = "FAC-BENCH"
ADAPTER = "lis-bench"
TARGET_ACK_RATIO = 0.5  # ours vs the raw-store baseline, 8 senders
TARGET_P99_MS = 50.0
TARGET_MAP_RATIO = 10.0  # map_message vs hl7apy parse_message(find_groups=False)
SB, EB_CR = b"\x0b", b"\x1c\x0d"


# ---------------------------------------------------------------- the message -------


def oru(control: str, i: int) -> bytes:
    """A ~1 KB ORU^R01 (UTF-8, a Persian name, ten results and a note)."""
    segs = [
        f"MSH|^~\\&|LIS|HOSP|SEPAS|NODE|20251125093000||ORU^R01|{control}|P|2.5||||||UNICODE UTF-8",
        f"PID|1||MRN-{i}^^^HOSP^MR~0499370899^^^NOCR^NNIRN||محمدی^علی||19800101|M",
        "PV1|1|O|LAB^^^HOSP",
        f"OBR|1|ORD{i}|FIL{i}|CBC^Complete blood count^L|||20251125080000" + "|" * 17 + "|F",
    ]
    tests = [
        ("WBC^White cells", "6.1", "10*9/L", "4.0-10.0", "N"),
        ("RBC^Red cells", "4.9", "10*12/L", "4.5-5.9", "N"),
        ("HGB^Haemoglobin", "14.2", "g/dL", "13.5-17.5", "N"),
        ("HCT^Haematocrit", "43", "%", "41-53", "N"),
        ("PLT^Platelets", "460", "10*9/L", "150-400", "H"),
        ("GLU^Glucose", "5.4", "mmol/L", "3.9-6.1", "N"),
        ("CRE^Creatinine", "88", "umol/L", "62-106", "N"),
        ("K^Potassium", "3.2", "mmol/L", "3.5-5.1", "L"),
        ("NA^Sodium", "139", "mmol/L", "135-145", "N"),
        ("ALT^Alanine aminotransferase", "31", "U/L", "7-56", "N"),
    ]
    for n, (code, value, units, ref, flag) in enumerate(tests, 1):
        segs.append(f"OBX|{n}|NM|{code}^L||{value}|{units}|{ref}|{flag}|||F|||20251125090000")
    segs.append("NTE|1|L|Sample received haemolysed; potassium may read high.")
    return ("\r".join(segs) + "\r").encode("utf-8")


# ---------------------------------------------------------------- the baseline ------


class RawStoreListener:
    """The baseline: frame, split MSH, one INSERT + commit (synchronous=FULL), ACK."""

    def __init__(self, db_path: Path) -> None:
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute(
            "CREATE TABLE raw (id INTEGER PRIMARY KEY, control TEXT, received REAL, payload BLOB)"
        )
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.address = self._sock.getsockname()[:2]

    def start(self) -> None:
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self._sock.close()
        self._db.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        conn.settimeout(0.2)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while (end := buf.find(EB_CR)) >= 0:
                    start = buf.find(SB)
                    payload = buf[start + 1 : end] if 0 <= start < end else b""
                    buf = buf[end + 2 :]
                    conn.sendall(frame(self._store(payload)))

    def _store(self, payload: bytes) -> bytes:
        msh = payload.split(b"\r", 1)[0].decode("utf-8", "replace").split("|")
        control = msh[9] if len(msh) > 9 else ""
        version = msh[11] if len(msh) > 11 else "2.5"
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT INTO raw(control, received, payload) VALUES (?, ?, ?)",
                (control, time.time(), payload),
            )
            self._db.execute("COMMIT")
        now = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        return (
            f"MSH|^~\\&|SEPAS|NODE|LIS|HOSP|{now}||ACK^R01|A{control}|P|{version}\r"
            f"MSA|AA|{control}\r"
        ).encode()


# ---------------------------------------------------------------- the senders -------


@dataclass
class Result:
    name: str
    messages: int
    secs: float
    latencies_ms: list[float]
    note: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.secs if self.secs else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def drive(
    port: int, senders: int, total: int, limit_secs: float, prefix: str
) -> tuple[int, float, list[float]]:
    """``senders`` connections, each sending and awaiting one message at a time, until
    ``total`` messages in all or ``limit_secs``; returns (acked, secs, latencies ms)."""
    counter = itertools.count()
    lock = threading.Lock()
    lat: list[float] = []
    errors: list[str] = []
    start_line = threading.Barrier(senders + 1)
    deadline = [0.0]

    def one(s: int) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        decoder = MllpDecoder(1 << 20)
        mine: list[float] = []
        start_line.wait(30)
        try:
            while time.monotonic() < deadline[0]:
                with lock:
                    n = next(counter)
                if n >= total:
                    break
                control = f"{prefix}-{n}"
                wire = frame(oru(control, n))
                began = time.perf_counter()
                sock.sendall(wire)
                reply = None
                while reply is None:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("closed without an ACK")
                    frames = [e for e in decoder.feed(data) if isinstance(e, Frame)]
                    reply = frames[0].payload if frames else None
                mine.append((time.perf_counter() - began) * 1000)
                got = ack.parse_ack(reply)
                if got["MSA-1"] != "AA" or got["MSA-2"] != control:
                    raise AssertionError(f"bad ACK: {got.get('MSA-1')} {got.get('MSA-2')}")
        except Exception as e:  # noqa: BLE001 - reported, the benchmark then fails
            with lock:
                errors.append(f"sender {s}: {e}")
        finally:
            sock.close()
            with lock:
                lat.extend(mine)

    threads = [threading.Thread(target=one, args=(s,), daemon=True) for s in range(senders)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + limit_secs
    began = time.monotonic()
    start_line.wait(30)
    for t in threads:
        t.join(limit_secs + 60)
    secs = time.monotonic() - began
    if errors:
        raise SystemExit("benchmark failed: " + "; ".join(errors[:3]))
    return len(lat), secs, lat


@contextlib.contextmanager
def baseline_listener(root: Path) -> Iterator[int]:
    lst = RawStoreListener(root / "raw.db")
    lst.start()
    try:
        yield int(lst.address[1])
    finally:
        lst.stop()


@contextlib.contextmanager
def our_listener(root: Path, notes: list[str]) -> Iterator[int]:
    buf = Buffer.open(root / "data", data_key=os.urandom(32))
    ctx = AdapterContext(node_id=NODE_ID, sink=buf, log_key=b"k" * 32)
    conf = Hl7MllpSettings(name=ADAPTER, kind="hl7-mllp", listen="127.0.0.1:0", max_connections=64)
    lst = MllpListener(conf, ctx)  # mapping worker on, as in production
    lst.start()
    try:
        yield lst.address[1]
        left = len(buf.unmapped_raw(ADAPTER, limit=1_000_000))
        notes.append(f"{left} not yet mapped at the end")
    finally:
        lst.stop(timeout_secs=30)
        buf.close()


def ack_scenario(
    name: str,
    make: Callable[[Path], contextlib.AbstractContextManager[int]],
    senders: int,
    total: int,
    limit: float,
) -> Result:
    with (
        tempfile.TemporaryDirectory(prefix="sepas-mllp-bench-") as tmp,
        make(Path(tmp)) as port,
    ):
        drive(port, senders, 20, 10, f"WARM-{name[:1]}")  # warm-up, not timed
        n, secs, lat = drive(port, senders, total, limit, f"{name[:1]}{senders}")
    return Result(f"{name}, {senders} sender(s)", n, secs, lat)


# ---------------------------------------------------------------- mapping -----------


def mapping_rate(total: int, limit: float) -> tuple[Result, Result]:
    from hl7apy.parser import parse_message  # type: ignore[import-untyped]

    conf = Hl7MllpSettings(name=ADAPTER, kind="hl7-mllp", listen="127.0.0.1:0")
    raws = [oru(f"MAP-{i}", i) for i in range(total)]
    texts = [r.decode("utf-8") for r in raws]
    captured = datetime.now(UTC)
    recs = map_message(
        texts[0],
        raws[0],
        node_id=NODE_ID,
        adapter=ADAPTER,
        kind="hl7-mllp",
        settings=conf,
        captured_at=captured,
    )
    assert len(recs) == 1, "the mapping produced no Record"
    assert recs[0].body["entry"], "the mapping produced an empty Bundle"
    out = []
    for name, fn in (
        (
            "map_message (to FHIR Records)",
            lambda t, r: map_message(
                t,
                r,
                node_id=NODE_ID,
                adapter=ADAPTER,
                kind="hl7-mllp",
                settings=conf,
                captured_at=captured,
            ),
        ),
        (
            "hl7apy parse_message(find_groups=False)",
            lambda t, r: parse_message(t, find_groups=False),
        ),
    ):
        fn(texts[0], raws[0])  # warm-up
        began = time.perf_counter()
        deadline = began + limit
        n = 0
        for t, r in zip(texts, raws, strict=True):
            fn(t, r)
            n += 1
            if time.perf_counter() > deadline:
                break
        out.append(Result(name, n, time.perf_counter() - began, []))
    return out[0], out[1]


# ---------------------------------------------------------------- report ------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts, ~20 s")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    total, limit = (600, 3.0) if args.quick else (6000, 10.0)
    map_total, map_limit = (300, 3.0) if args.quick else (3000, 8.0)

    print(f"1 KB ORU^R01: {len(oru('X-0', 0))} bytes; each ACK awaited and checked\n")
    rows: list[tuple[Result, str, str]] = []
    for senders in (1, 8):
        base = ack_scenario("baseline raw store", baseline_listener, senders, total, limit)
        notes: list[str] = []
        ours = ack_scenario(
            "hl7-mllp listener",
            functools.partial(our_listener, notes=notes),
            senders,
            total,
            limit,
        )
        ours.note = "; ".join(notes)
        ratio = ours.rate / base.rate if base.rate else float("nan")
        target = ""
        if senders == 8:
            target = f">= {TARGET_ACK_RATIO}x: {verdict(ratio >= TARGET_ACK_RATIO)}; "
            target += f"p99 < {TARGET_P99_MS:.0f} ms: {verdict(ours.pct(0.99) < TARGET_P99_MS)}"
        rows.append((base, "", ""))
        rows.append((ours, f"{ratio:.2f}x", target))
    print("| scenario | messages | secs | msg/s | p50 ms | p99 ms | ratio | target | note |")
    print("|---|--:|--:|--:|--:|--:|--:|---|---|")
    for r, shown, target in rows:
        print(
            f"| {r.name} | {r.messages:,} | {r.secs:.2f} | {r.rate:,.0f} | "
            f"{r.pct(0.5):.1f} | {r.pct(0.99):.1f} | {shown} | {target} | {r.note} |"
        )

    mapped, parsed = mapping_rate(map_total, map_limit)
    ratio = mapped.rate / parsed.rate if parsed.rate else float("nan")
    print("\n| mapping | messages | secs | msg/s | ratio | target |")
    print("|---|--:|--:|--:|--:|---|")
    print(f"| {parsed.name} | {parsed.messages:,} | {parsed.secs:.2f} | {parsed.rate:,.1f} | | |")
    print(
        f"| {mapped.name} | {mapped.messages:,} | {mapped.secs:.2f} | {mapped.rate:,.1f} | "
        f"{ratio:.1f}x | >= {TARGET_MAP_RATIO:.0f}x: {verdict(ratio >= TARGET_MAP_RATIO)} |"
    )
    print(f"\nload average: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
