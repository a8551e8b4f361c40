"""Throughput and memory of the durable buffer (agent/buffer.py), as ratios to plain SQLite.

Run from the repository root::

    .venv/bin/python benchmarks/buffer.py            # full run, a few minutes on 2 cores
    .venv/bin/python benchmarks/buffer.py --quick    # smoke run, about half a minute
    .venv/bin/python benchmarks/buffer.py --memory   # only the 1M-record RSS run

Every figure is a ratio against a baseline measured in this same run, in the same temp
directory (so on the same file system): machines are shared and noisy, absolute numbers
from another day or box mean little. Baselines, with plain sqlite3 in WAL mode and
``synchronous=FULL``, a table ``(seq INTEGER PRIMARY KEY, id TEXT UNIQUE, payload BLOB)``
and 1 KB payloads:

(a) one fsync'd commit per row (what a buffer without group commit would do);
(b) one transaction for all rows (the ceiling: one fsync for the lot).

The buffer runs with encryption on (a random 32-byte key) and Records of ~1 KB bodies.
Targets (from the issue) get PASS/MISS; a MISS never changes the exit status.
Every load loop is bounded by a record count and by a time limit. No network.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from agent.buffer import Buffer
from agent.record import PatientRef, RawRef, Record, Service, SourceRef, canonical_json, hl7_id

NODE_ID = "FAC-BENCH"
TEHRAN = timezone(timedelta(hours=3, minutes=30))
MB = 1024 * 1024

#: Targets from the issue.
TARGET_GROUP_RATIO = 10.0  # 16 one-record producers vs one commit per row; 16x is the limit
TARGET_BULK_RATIO = 0.5  # bulk put vs one transaction for all rows
MEMORY_BUDGET_MB = 150.0


# ---------------------------------------------------------------- plumbing ----------


@dataclass(frozen=True, slots=True)
class Profile:
    """How much load each scenario gets. Each loop stops at ``*_n`` or ``*_secs``."""

    name: str
    row_commit_n: int  # baseline (a)
    row_commit_secs: float
    ceiling_n: int  # baseline (b), rows per repeat
    ceiling_repeats: int
    ceiling_secs: float
    single_n: int  # one-record puts, per scenario
    single_secs: float
    bulk_n: int
    bulk_per_put: int
    bulk_secs: float


FULL = Profile(
    name="full",
    row_commit_n=20_000,
    row_commit_secs=5.0,
    ceiling_n=20_000,
    ceiling_repeats=3,
    ceiling_secs=15.0,
    single_n=40_000,
    single_secs=12.0,
    bulk_n=40_000,
    bulk_per_put=500,
    bulk_secs=20.0,
)
QUICK = Profile(
    name="quick",
    row_commit_n=2_000,
    row_commit_secs=1.5,
    ceiling_n=5_000,
    ceiling_repeats=1,
    ceiling_secs=5.0,
    single_n=3_000,
    single_secs=2.0,
    bulk_n=5_000,
    bulk_per_put=500,
    bulk_secs=5.0,
)


@dataclass(slots=True)
class Result:
    name: str
    count: int
    secs: float
    cpu_secs: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds per put
    groups: list[int] = field(default_factory=list)  # ops per group commit

    @property
    def rate(self) -> float:
        return self.count / self.secs if self.secs > 0 else 0.0

    def detail(self) -> str:
        bits = [f"{self.cpu_secs / self.secs:.2f} cores" if self.secs > 0 else ""]
        if self.latencies:
            lat = sorted(self.latencies)
            p50 = lat[len(lat) // 2] * 1e3
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3
            bits.append(f"put p50 {p50:.1f} ms p99 {p99:.1f} ms")
        if self.groups:
            bits.append(
                f"{len(self.groups)} commits, {statistics.fmean(self.groups):.1f} ops/commit "
                f"(max {max(self.groups)})"
            )
        return ", ".join(b for b in bits if b)


def rss_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB, from /proc/self/status."""
    vals = {"VmRSS": 0.0, "VmHWM": 0.0}
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in vals:
                vals[key] = int(line.split()[1]) / 1024
    return vals["VmRSS"], vals["VmHWM"]


@contextlib.contextmanager
def timed(name: str, count_box: list[int]) -> Iterator[Result]:
    res = Result(name, 0, 0.0)
    cpu0, t0 = time.process_time(), time.perf_counter()
    try:
        yield res
    finally:
        res.secs = time.perf_counter() - t0
        res.cpu_secs = time.process_time() - cpu0
        res.count = count_box[0]


def say(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- records -----------


def _filler(n: int) -> str:
    unit = "GLU 5.4 mmol/L (3.9-6.1) N; HbA1c 5.6 %; CREA 88 umol/L; "
    return (unit * (n // len(unit) + 1))[:n]


def make_records(start: int, n: int, body_bytes: int, tag: str = "b") -> list[Record]:
    """``n`` lab results whose body is ~``body_bytes`` of canonical JSON. Raw data is
    referenced (hash), not included, so the envelope is the body plus ~450 bytes."""
    captured = datetime(2026, 11, 25, 6, 0, tzinfo=UTC)
    msh7 = "20261125093000"

    def body_of(i: int, note: str) -> dict[str, Any]:
        return {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
            "subject": {"identifier": {"value": f"{i % 1_000_000_000:010d}"}},
            "valueQuantity": {"value": 5.4, "unit": "mmol/L"},
            "note": [{"text": note}],
        }

    # Every body has the same length but for the note, so size the note once.
    note = _filler(max(0, body_bytes - len(canonical_json(body_of(0, "")))))
    out = []
    for i in range(start, start + n):
        control = f"{tag}{i:09d}"
        body = body_of(i, note)
        raw = f"MSH|^~\\&|LIS|FAC|SEPAS|NODE|{msh7}||ORU^R01|{control}|P|2.5\r".encode()
        out.append(
            Record(
                id=hl7_id(NODE_ID, "lis", control, msh7),
                service=Service.LAB_RESULT,
                occurred_at=datetime(2026, 11, 25, 9, 30, tzinfo=TEHRAN),
                captured_at=captured,
                source=SourceRef(adapter="lis", kind="hl7-mllp", ref=control),
                patient=PatientRef(national_id=f"{i % 1_000_000_000:010d}", national_id_valid=True),
                body=body,
                raw=RawRef.of(raw, "x-application/hl7-v2+er7", include=False),
            )
        )
    return out


def open_buffer(root: Path, name: str, key: bytes) -> Buffer:
    return Buffer.open(root / name, data_key=key)


def instrument(buf: Buffer) -> list[int]:
    """Count ops per group commit. Wraps a private method for diagnosis only; if it is
    gone (the buffer was refactored) the figures are simply not shown."""
    sizes: list[int] = []
    orig = getattr(buf, "_commit_group", None)
    if orig is None:
        return sizes

    def wrapped(group: list[Any]) -> Any:
        sizes.append(len(group))
        return orig(group)

    buf._commit_group = wrapped  # type: ignore[method-assign]
    return sizes


# ---------------------------------------------------------------- baselines ---------


def _baseline_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE t (seq INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, payload BLOB NOT NULL)"
    )
    return conn


def _baseline_rows(tag: str, n: int) -> list[tuple[str, bytes]]:
    # sha256-like ids (random order into the unique index, as record ids are) and
    # incompressible 1 KB payloads.
    return [(hl7_id(NODE_ID, tag, str(i), "0"), os.urandom(1024)) for i in range(n)]


def baseline_row_commit(root: Path, tag: str, p: Profile) -> Result:
    """(a) one fsync'd commit per row."""
    conn = _baseline_db(root / f"baseline-{tag}.db")
    rows = _baseline_rows(tag, p.row_commit_n)
    done = [0]
    deadline = time.perf_counter() + p.row_commit_secs
    with timed(f"sqlite, 1 commit/row ({tag})", done) as res:
        for row in rows:
            conn.execute("INSERT INTO t (id, payload) VALUES (?, ?)", row)
            done[0] += 1
            if time.perf_counter() >= deadline:
                break
    conn.close()
    return res


def baseline_ceiling(root: Path, p: Profile) -> Result:
    """(b) all rows in one transaction (median of the repeats, each in a fresh file)."""
    rates: list[Result] = []
    for k in range(p.ceiling_repeats):
        conn = _baseline_db(root / f"ceiling-{k}.db")
        rows = _baseline_rows(f"ceiling{k}", p.ceiling_n)
        done = [0]
        deadline = time.perf_counter() + p.ceiling_secs
        with timed("sqlite, 1 transaction", done) as res:
            conn.execute("BEGIN")
            for i in range(0, len(rows), 1000):  # executemany in slices: time-bounded
                conn.executemany("INSERT INTO t (id, payload) VALUES (?, ?)", rows[i : i + 1000])
                done[0] += len(rows[i : i + 1000])
                if time.perf_counter() >= deadline:
                    break
            conn.execute("COMMIT")
        conn.close()
        rates.append(res)
    rates.sort(key=lambda r: r.rate)
    med = rates[len(rates) // 2]
    med.name = f"sqlite, 1 transaction (median of {len(rates)})"
    return med


# ---------------------------------------------------------------- buffer loads ------


def buffer_threads(
    root: Path, key: bytes, records: Sequence[Record], producers: int, p: Profile
) -> Result:
    """``producers`` threads, each putting ONE record per put() and waiting for it."""
    buf = open_buffer(root, f"threads-{producers}", key)
    buf.put(make_records(0, 1, 1024, tag="warm"))  # first write outside the timing
    groups = instrument(buf)
    limit = min(len(records), p.single_n)
    counter = itertools.count()
    lat: list[list[float]] = [[] for _ in range(producers)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(producers + 1)
    deadline = [0.0]

    def worker(mine: list[float]) -> None:
        barrier.wait()
        try:
            while True:
                i = next(counter)
                if i >= limit or time.perf_counter() >= deadline[0]:
                    return
                t = time.perf_counter()
                buf.put([records[i]])
                mine.append(time.perf_counter() - t)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(mine,)) for mine in lat]
    for t in threads:
        t.start()
    done = [0]
    deadline[0] = time.perf_counter() + p.single_secs
    with timed(
        f"buffer, {producers} thread{'s' if producers > 1 else ''} x 1 rec/put", done
    ) as res:
        barrier.wait()
        for t in threads:
            t.join()
        done[0] = sum(len(x) for x in lat)
    buf.close()
    if errors:
        raise errors[0]
    res.latencies = [x for mine in lat for x in mine]
    res.groups = groups
    return res


def buffer_asyncio(
    root: Path, key: bytes, records: Sequence[Record], producers: int, p: Profile
) -> Result:
    """``producers`` asyncio tasks, each awaiting put_async of ONE record."""
    buf = open_buffer(root, f"asyncio-{producers}", key)
    buf.put(make_records(0, 1, 1024, tag="warm"))
    groups = instrument(buf)
    limit = min(len(records), p.single_n)
    counter = itertools.count()
    lat: list[list[float]] = [[] for _ in range(producers)]
    done = [0]

    async def worker(mine: list[float], deadline: float) -> None:
        while True:
            i = next(counter)
            if i >= limit or time.perf_counter() >= deadline:
                return
            t = time.perf_counter()
            await buf.put_async([records[i]])
            mine.append(time.perf_counter() - t)

    async def main() -> None:
        deadline = time.perf_counter() + p.single_secs
        await asyncio.gather(*(worker(mine, deadline) for mine in lat))

    with timed(f"buffer, {producers} asyncio tasks x 1 rec/put", done) as res:
        asyncio.run(main())
        done[0] = sum(len(x) for x in lat)
    buf.close()
    res.latencies = [x for mine in lat for x in mine]
    res.groups = groups
    return res


def buffer_bulk(root: Path, key: bytes, records: Sequence[Record], p: Profile) -> Result:
    """One producer, ``bulk_per_put`` records per put()."""
    buf = open_buffer(root, "bulk", key)
    buf.put(make_records(0, 1, 1024, tag="warm"))
    groups = instrument(buf)
    limit = min(len(records), p.bulk_n)
    done = [0]
    lat: list[float] = []
    deadline = time.perf_counter() + p.bulk_secs
    with timed(f"buffer, bulk {p.bulk_per_put} rec/put", done) as res:
        for i in range(0, limit, p.bulk_per_put):
            chunk = records[i : i + p.bulk_per_put]
            t = time.perf_counter()
            buf.put(chunk)
            lat.append(time.perf_counter() - t)
            done[0] += len(chunk)
            if time.perf_counter() >= deadline:
                break
    buf.close()
    res.latencies = lat
    res.groups = groups
    return res


# ---------------------------------------------------------------- memory ------------


def run_memory(root: Path, n_records: int, body_bytes: int, time_limit: float) -> dict[str, Any]:
    """Enqueue ``n_records`` in bulk puts of 1,000, then drain them (lease 500 ->
    mark_sent) until empty, sampling RSS. Stops politely at ``time_limit`` seconds."""
    batch = 1000
    need = n_records * (body_bytes + 1500) * 2  # rows, indexes, WAL: generous
    free = shutil.disk_usage(root).free
    if free < need:
        n_records = max(batch, int(n_records * free / need) // batch * batch)
        say(f"  only {free / MB:,.0f} MiB free: running {n_records:,} records instead")
    rss0, _ = rss_mb()
    start = time.perf_counter()
    deadline = start + time_limit
    peak_sampled = rss0
    buf = Buffer.open(root / "memory", data_key=os.urandom(32))
    out: dict[str, Any] = {
        "records_target": n_records,
        "body_bytes": body_bytes,
        "rss_start_mb": rss0,
        "aborted": None,
    }

    def sample() -> float:
        nonlocal peak_sampled
        rss, _ = rss_mb()
        peak_sampled = max(peak_sampled, rss)
        return rss

    # -- enqueue
    say(f"  enqueue: {n_records:,} records, {batch:,} per put, ~{body_bytes} B bodies")
    enq = 0
    build_secs = put_secs = 0.0
    slices: list[float] = []  # records/s per 10% slice, to see any slowdown with size
    slice_n = max(batch, n_records // 10)
    t_phase = t_slice = time.perf_counter()
    while enq < n_records:
        if time.perf_counter() >= deadline:
            out["aborted"] = f"time limit {time_limit:.0f} s hit while enqueueing"
            break
        t0 = time.perf_counter()
        recs = make_records(enq, min(batch, n_records - enq), body_bytes, tag="m")
        t1 = time.perf_counter()
        buf.put(recs)
        put_secs += time.perf_counter() - t1
        build_secs += t1 - t0
        enq += len(recs)
        del recs
        if enq % slice_n == 0 or enq == n_records:
            now = time.perf_counter()
            slices.append(slice_n / (now - t_slice))
            t_slice = now
            rss = sample()
            say(
                f"    {enq:>9,} enqueued  {now - t_phase:7.1f} s  "
                f"{slices[-1]:8,.0f} rec/s (this slice)  RSS {rss:6.1f} MiB"
            )
        elif enq % (batch * 20) == 0:
            sample()
    out["enqueued"] = enq
    out["enqueue_secs"] = time.perf_counter() - t_phase
    out["enqueue_put_secs"] = put_secs
    out["enqueue_build_secs"] = build_secs
    out["enqueue_slices"] = slices

    # -- drain
    drained = 0
    leases = 0
    slices = []
    t_phase = t_slice = time.perf_counter()
    next_mark = slice_n
    if out["aborted"] is None:
        say("  drain: lease(max_records=500) -> mark_sent, until empty")
        while True:
            if time.perf_counter() >= deadline:
                out["aborted"] = f"time limit {time_limit:.0f} s hit while draining"
                break
            lease = buf.lease(max_records=500, max_bytes=50 * MB, lease_secs=600)
            if lease is None:
                break
            drained += buf.mark_sent(lease, lease.ids, hub_day="2026-11-25")
            leases += 1
            del lease
            if drained >= next_mark:
                now = time.perf_counter()
                slices.append(slice_n / (now - t_slice))
                t_slice = now
                next_mark += slice_n
                rss = sample()
                say(
                    f"    {drained:>9,} drained   {now - t_phase:7.1f} s  "
                    f"{slices[-1]:8,.0f} rec/s (this slice)  RSS {rss:6.1f} MiB"
                )
            elif leases % 40 == 0:
                sample()
    out["drained"] = drained
    out["drain_secs"] = time.perf_counter() - t_phase
    out["drain_slices"] = slices
    out["leases"] = leases
    stats = buf.stats()
    out["left_pending"] = stats.total("pending") + stats.total("inflight")
    out["file_mb"] = stats.file_bytes / MB
    sample()
    buf.close()
    rss_end, hwm = rss_mb()
    out["rss_end_mb"] = rss_end
    out["rss_peak_sampled_mb"] = peak_sampled
    out["vmhwm_mb"] = hwm
    # The kernel updates VmHWM lazily (RSS counters are cached per thread), so a sample
    # can exceed it by a little; the peak is the larger of the two.
    out["peak_mb"] = max(hwm, peak_sampled)
    out["total_secs"] = time.perf_counter() - start
    return out


def memory_lines(m: dict[str, Any]) -> list[str]:
    verdict = "PASS" if m["peak_mb"] < MEMORY_BUDGET_MB else "MISS"
    enq_rate = m["enqueued"] / max(m["enqueue_secs"], 1e-9)
    drain_rate = m["drained"] / max(m["drain_secs"], 1e-9)
    lines = [
        "Memory run (its own process; VmHWM = peak RSS of that process, imports included)",
        f"  records: {m['enqueued']:,} enqueued of {m['records_target']:,}, "
        f"{m['drained']:,} drained, {m['left_pending']:,} left; ~{m['body_bytes']} B bodies, "
        "encrypted",
        f"  enqueue: {m['enqueue_secs']:.1f} s = {enq_rate:,.0f} rec/s (in put "
        f"{m['enqueue_put_secs']:.1f} s, building the Records {m['enqueue_build_secs']:.1f} s)",
    ]
    if m["enqueue_slices"]:
        lines.append(
            "    rec/s per 10% slice: " + " ".join(f"{x:,.0f}" for x in m["enqueue_slices"])
        )
    lines.append(
        f"  drain:   {m['drain_secs']:.1f} s = {drain_rate:,.0f} rec/s ({m['leases']:,} leases "
        "of up to 500, each followed by mark_sent)"
    )
    if m["drain_slices"]:
        lines.append("    rec/s per 10% slice: " + " ".join(f"{x:,.0f}" for x in m["drain_slices"]))
    lines += [
        f"  buffer.db + WAL at the end: {m['file_mb']:,.0f} MiB",
        f"  RSS: start {m['rss_start_mb']:.1f} MiB, end {m['rss_end_mb']:.1f} MiB, highest "
        f"sample {m['rss_peak_sampled_mb']:.1f} MiB, peak (VmHWM) {m['vmhwm_mb']:.1f} MiB",
        f"  peak vs budget: {m['peak_mb']:.1f} / {MEMORY_BUDGET_MB:.0f} MiB = "
        f"{m['peak_mb'] / MEMORY_BUDGET_MB:.2f}x  {verdict}",
    ]
    if m["aborted"]:
        lines.append(f"  ABORTED: {m['aborted']}; the figures cover the part that ran")
    return lines


def memory_rows(m: dict[str, Any]) -> list[list[str]]:
    verdict = "PASS" if m["peak_mb"] < MEMORY_BUDGET_MB else "MISS"
    if m["aborted"]:
        verdict += " (aborted)"
    enq_rate = m["enqueued"] / max(m["enqueue_secs"], 1e-9)
    drain_rate = m["drained"] / max(m["drain_secs"], 1e-9)
    n, secs = f"{m['enqueued']:,}", f"{m['enqueue_secs']:.1f}"
    dn, dsecs = f"{m['drained']:,}", f"{m['drain_secs']:.1f}"
    ratio = f"{m['peak_mb'] / MEMORY_BUDGET_MB:.2f}x"
    return [
        [f"memory: enqueue, 1,000 x ~{m['body_bytes']} B/put", n, secs, f"{enq_rate:,.0f}"]
        + [""] * 4,
        ["memory: drain, lease 500 -> mark_sent", dn, dsecs, f"{drain_rate:,.0f}"] + [""] * 4,
        [
            f"memory: peak RSS {m['peak_mb']:.1f} MiB",
            "",
            "",
            "",
            ratio,
            "150 MiB",
            "< 1x",
            verdict,
        ],
    ]


# ---------------------------------------------------------------- report ------------


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(
        c.ljust(w) if k == 0 else c.rjust(w)
        for k, (c, w) in enumerate(zip(cells, widths, strict=True))
    ).rstrip()


def print_table(rows: list[list[str]]) -> None:
    head = ["scenario", "records", "secs", "rate/s", "ratio", "vs", "target", ""]
    widths = [max(len(r[k]) for r in [head, *rows]) for k in range(len(head))]
    say(_row(head, widths))
    say(_row(["-" * w for w in widths], widths))
    for r in rows:
        say(_row(r, widths))


def throughput(root: Path, p: Profile) -> tuple[list[list[str]], list[str]]:
    key = os.urandom(32)
    n_records = max(p.single_n, p.bulk_n)
    say(f"Building {n_records:,} Records with ~1 KB bodies ...")
    records = make_records(0, n_records, 1024)
    env = len(records[0].to_json())
    say(f"  envelope (canonical JSON) {env} B; sealing adds 29 B (version, nonce, tag)")

    results: dict[str, Result] = {}

    def step(key_: str, fn: Callable[[], Result]) -> None:
        r = fn()
        results[key_] = r
        say(f"- {r.name}: {r.count:,} in {r.secs:.2f} s = {r.rate:,.0f}/s; {r.detail()}")

    step("a1", lambda: baseline_row_commit(root, "before", p))
    step("b", lambda: baseline_ceiling(root, p))
    for n in (1, 4, 16):
        step(f"t{n}", lambda n=n: buffer_threads(root, key, records, n, p))
    step("async16", lambda: buffer_asyncio(root, key, records, 16, p))
    step("bulk", lambda: buffer_bulk(root, key, records, p))
    step("a2", lambda: baseline_row_commit(root, "after", p))

    a1, a2 = results["a1"].rate, results["a2"].rate
    base_a = (a1 + a2) / 2
    ceil_b = results["b"].rate

    def row(k: str, base: float = 0.0, vs: str = "", target: float | None = None) -> list[str]:
        r = results[k]
        cells = [r.name, f"{r.count:,}", f"{r.secs:.2f}", f"{r.rate:,.0f}"]
        if not base:
            return [*cells, "", "", "", ""]
        ratio = r.rate / base
        if target is None:
            return [*cells, f"{ratio:.2f}x", vs, "", ""]
        return [
            *cells,
            f"{ratio:.2f}x",
            vs,
            f">= {target:g}x",
            "PASS" if ratio >= target else "MISS",
        ]

    rows = [
        row("a1"),
        row("a2"),
        row("b"),
        row("t1", base_a, "(a)"),
        row("t4", base_a, "(a)"),
        row("t16", base_a, "(a)", TARGET_GROUP_RATIO),
        row("async16", base_a, "(a)"),
        row("bulk", ceil_b, "(b)", TARGET_BULK_RATIO),
    ]
    notes = [
        f"(a) one fsync'd commit per 1 KB row: {a1:,.0f}/s before and {a2:,.0f}/s after the "
        f"buffer loads (drift {abs(a1 - a2) / base_a:.0%}); ratios to (a) use the mean, "
        f"{base_a:,.0f}/s.",
        f"(b) one transaction for all rows, the ceiling: {ceil_b:,.0f}/s.",
        *(
            [
                f"WARNING: (a) drifted {abs(a1 - a2) / base_a:.0%} within this run: something "
                "else was using the disk. Ratios to (a) are unreliable; rerun on a quieter "
                "machine."
            ]
            if abs(a1 - a2) / base_a > 0.5
            else []
        ),
        "A group commit holds at most one record per waiting producer: with 16 one-record "
        "producers, 16x (a) is the limit.",
        f"Details (cores = process CPU seconds per wall second; {os.cpu_count()} CPUs here):",
    ]
    notes += [f"  {results[k].name}: {results[k].detail()}" for k in results]
    return rows, notes


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run; no memory run")
    ap.add_argument(
        "--memory", action="store_true", help="only the memory run (1M records unless --quick)"
    )
    ap.add_argument("--dir", type=Path, default=None, help="where to make the temp dir")
    ap.add_argument("--memory-records", type=int, default=None, help="default 1,000,000")
    ap.add_argument("--memory-body-bytes", type=int, default=200, help="default 200")
    ap.add_argument(
        "--memory-time-limit", type=float, default=900.0, help="seconds, then stop politely"
    )
    ap.add_argument("--json-result", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    n_mem = args.memory_records or (50_000 if args.quick else 1_000_000)
    mode = "quick" if args.quick else "full"
    if args.memory:
        mode = f"memory ({n_mem:,} records)"

    say(
        f"SEPAS buffer benchmark, {mode} run; Python {sys.version.split()[0]}, "
        f"SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    rows: list[list[str]] = []
    notes: list[str] = []
    mem: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="sepas-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        say(f"Temp dir {root} (device {os.stat(root).st_dev}); baselines and buffers both here")
        if args.memory:
            mem = run_memory(root, n_mem, args.memory_body_bytes, args.memory_time_limit)
            if args.json_result:
                args.json_result.write_text(json.dumps(mem), encoding="utf-8")
                return 0
        else:
            rows, notes = throughput(root, QUICK if args.quick else FULL)
    if not args.memory and not args.quick:
        # A fresh process, so that VmHWM is the memory run's own peak.
        say("")
        say(f"Memory run, in a fresh process: {n_mem:,} records ...")
        with tempfile.TemporaryDirectory(prefix="sepas-bench-mem-") as tmp:
            out = Path(tmp) / "memory.json"
            cmd = [sys.executable, __file__, "--memory", "--json-result", str(out)]
            cmd += ["--memory-records", str(n_mem)]
            cmd += ["--memory-body-bytes", str(args.memory_body_bytes)]
            cmd += ["--memory-time-limit", str(args.memory_time_limit)]
            if args.dir:
                cmd += ["--dir", str(args.dir)]
            proc = subprocess.run(cmd, check=False, timeout=args.memory_time_limit + 300)
            if proc.returncode == 0 and out.exists():
                mem = json.loads(out.read_text(encoding="utf-8"))
            else:
                notes.append(f"The memory run failed (exit {proc.returncode}); see above.")
    if mem is not None:
        rows += memory_rows(mem)
    say("")
    say("=" * 100)
    say("Summary")
    say("")
    if rows:
        print_table(rows)
        say("")
    for line in notes:
        say(line)
    if mem is not None:
        if notes:
            say("")
        for line in memory_lines(mem):
            say(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
