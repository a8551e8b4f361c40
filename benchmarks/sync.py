"""Upload throughput: drain a backlog through the real uploader (issue 3).

Fills one buffer with N ~1 KB lab records (bulk puts), copies it three times, and
drains each copy with the real `agent.uploader` (`build(...)` then `sync_once` in a
loop until the buffer is empty or the time limit passes), over loopback:

  hub          the real reference hub (uvicorn, SQLite store) on 127.0.0.1
  signed+gzip  the same uploader against a trivial Starlette endpoint that reads the
               body, discards it, and answers "accepted" for every record
  plain        the same trivial endpoint, the same uploader, but batches are sent
               identity-encoded (no gzip) and unsigned (no Signature headers)

The ratio signed+gzip / plain (records/s) isolates what signing and gzip cost the
node: everything else (lease, batch forming, HTTP, settling in the buffer) is the
same code in both. Target (issue 3): signing+gzip cost < 10%, i.e. the plain rate is
< 1.1x the signed+gzip rate; and the real hub drains >= 5,000 records/s.

Usage:
    .venv/bin/python benchmarks/sync.py [--records N] [--quick] [--time-limit SECS]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import tomli_w
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent))

from buffer import NODE_ID, make_records  # benchmarks/buffer.py

import adapters
from agent import wire
from agent.buffer import Buffer
from agent.config import DATA_DIR_ENV, load_config
from agent.demo import _Hub, _without_env
from agent.keys import fingerprint, init_key, public_pem
from agent.uploader import batching, build

TARGET_RATE = 5_000.0  # records/s through the real hub
TARGET_OVERHEAD = 0.10  # signing+gzip: < 10% slower than plain
READY_SECS = 10.0


def say(msg: str = "") -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------ servers ----------


class _Trivial:
    """A Starlette app under uvicorn on 127.0.0.1: POST /v1/batches reads the body,
    discards it, and answers every record "accepted" (the ids come from the benchmark,
    not from the body, so the server does no JSON or gzip work). Anything else: 204."""

    def __init__(self) -> None:
        self.ids: dict[str, list[str]] = {}  # Idempotency-Key -> record ids
        self.bytes_in = 0

        async def batches(request: Request) -> Response:
            body = await request.body()
            self.bytes_in += len(body)
            bid = request.headers.get("idempotency-key", "")
            now = datetime.now(UTC).isoformat()
            results = [{"id": i, "status": "accepted"} for i in self.ids.pop(bid, [])]
            return JSONResponse({"batch_id": bid, "received_at": now, "results": results})

        async def other(request: Request) -> Response:
            await request.body()
            return Response(status_code=204)

        app = Starlette(
            routes=[
                Route("/v1/batches", batches, methods=["POST"]),
                Route("/{rest:path}", other, methods=["GET", "POST", "PUT", "HEAD"]),
            ]
        )
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        cfg = uvicorn.Config(
            app,
            log_config=None,
            log_level="warning",
            lifespan="off",
            ws="none",
            access_log=False,
            server_header=False,
        )
        self._server = uvicorn.Server(cfg)
        self._sock = sock
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + READY_SECS
        with httpx.Client(trust_env=False, timeout=1.0) as c:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if c.get(self.url + "ready").status_code == 204:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError("the trivial endpoint did not start")
                time.sleep(0.02)  # between polls of a bounded loop

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


class _NoAuth(httpx.Auth):
    """The "plain" variant: no signature, and no Content-Encoding (the content is
    identity, see `_identity_gzip`)."""

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        request.headers.pop("content-encoding", None)
        yield request


# batching.form_batch calls gzip.compress(body, compresslevel=..., mtime=0)
_identity_gzip = types.SimpleNamespace(
    compress=lambda data, **_: bytes(data), decompress=lambda data: bytes(data)
)


# ------------------------------------------------------------------ scenarios --------


def _config(root: Path, name: str, hub_url: str, data_dir: Path) -> Any:
    toml = root / f"{name}.toml"
    toml.write_text(
        tomli_w.dumps(
            {
                "node": {"id": NODE_ID, "data_dir": str(data_dir)},
                "hub": {"url": hub_url},
                "buffer": {"max_bytes": 50_000_000_000},
                "telemetry": {"listen": "127.0.0.1:0", "log_level": "warning"},
                "adapters": [
                    {
                        "name": "lis-files",
                        "kind": "hl7-files",
                        "directory": str(root / "spool"),
                        "poll_every": "1h",
                    }
                ],
            }
        ),
        encoding="utf-8",
    )
    (root / "spool").mkdir(exist_ok=True)
    with _without_env(DATA_DIR_ENV):
        return load_config(toml, adapters.KINDS)


def bench_records(start: int, n: int) -> list[Any]:
    """Lab results as `benchmarks/buffer.py` makes them, with the body a FHIR Bundle
    (Patient + Observation) as the hub requires, ~1 KB. The Observation's note is
    ~700 B of lab-report text plus 400 hex digits of random bytes, so that gzip does
    not get a 15x ratio from identical bodies (here it gets ~2x)."""
    out = []
    for rec in make_records(start, n, 700, tag="s"):
        obs = dict(rec.body)
        note = obs["note"][0]["text"][:700] + os.urandom(200).hex()
        obs["note"] = [{"text": note}]
        nid = rec.patient.national_id
        body = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {"resource": {"resourceType": "Patient", "identifier": [{"value": nid}]}},
                {"resource": obs},
            ],
        }
        out.append(dataclasses.replace(rec, body=body))
    return out


def fill(root: Path, data_key: bytes, n: int, limit_secs: float) -> tuple[int, float]:
    buf = Buffer.open(root / "template", data_key=data_key)
    t0 = time.perf_counter()
    done = 0
    try:
        while done < n and time.perf_counter() - t0 < limit_secs:
            recs = bench_records(done, min(1000, n - done))
            buf.put(recs)
            done += len(recs)
    finally:
        buf.close()
    return done, time.perf_counter() - t0


def drain(
    name: str,
    data_dir: Path,
    data_key: bytes,
    cfg: Any,
    key: Any,
    expected: int,
    limit_secs: float,
    tweak: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    buf = Buffer.open(data_dir, data_key=data_key)
    client, uploader = build(cfg, buf, key, transport=httpx.HTTPTransport())
    if tweak is not None:
        tweak(client)
    sent = 0
    runs = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    stop_at = t0 + limit_secs
    try:
        while sent < expected and runs < 1000 and time.perf_counter() < stop_at:
            report = uploader.sync_once(deadline=time.time() + (stop_at - time.perf_counter()))
            runs += 1
            sent += report.sent + report.duplicate
            if report.error is not None:
                say(f"  {name}: upload error {report.error}")
                break
            if report.stopped == "drained":
                break
        secs = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        stats = buf.stats()
        left = stats.total("pending") + stats.total("inflight")
    finally:
        client.close()
        buf.close()
    out = {"name": name, "sent": sent, "secs": secs, "cpu": cpu, "left": left}
    out["rate"] = sent / secs if secs else 0.0
    say(
        f"- {name}: {sent:,} in {secs:.2f} s = {out['rate']:,.0f} rec/s "
        f"(process CPU {cpu / secs:.2f} cores; {left:,} left)"
    )
    return out


def microbench(root: Path, data_key: bytes, key: Any) -> dict[str, float]:
    """Per 500-record batch: form_batch with gzip vs identity, and one signature."""
    buf = Buffer.open(root / "template", data_key=data_key)
    try:
        lease = buf.lease(max_records=500, max_bytes=10_000_000, lease_secs=60)
        assert lease is not None
        items = [batching.BatchItem.from_leased(r) for r in lease.items]
        buf.release(lease, lease.ids)
    finally:
        buf.close()
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        b = batching.form_batch(items, node_id=NODE_ID, now=time.time())
    gz = (time.perf_counter() - t) / reps
    with mock.patch.object(batching, "gzip", _identity_gzip):
        t = time.perf_counter()
        for _ in range(reps):
            plain = batching.form_batch(items, node_id=NODE_ID, now=time.time())
        ident = (time.perf_counter() - t) / reps
    headers = {
        "content-type": "application/json",
        "content-digest": wire.content_digest(b.content),
        "idempotency-key": b.batch_id,
    }
    t = time.perf_counter()
    for _ in range(reps * 10):
        wire.sign_request(
            method="POST",
            path="/v1/batches",
            headers=headers,
            key=key,
            key_id=NODE_ID,
            created=int(time.time()),
        )
    sign = (time.perf_counter() - t) / (reps * 10)
    return {
        "records": len(items),
        "form_gzip_ms": gz * 1000,
        "form_plain_ms": ident * 1000,
        "sign_ms": sign * 1000,
        "gzip_bytes": len(b.content),
        "plain_bytes": len(plain.content),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--records", type=int, default=None, help="default 100,000 (--quick 10,000)")
    ap.add_argument("--quick", action="store_true", help="10,000 records")
    ap.add_argument(
        "--time-limit", type=float, default=120.0, help="per phase (fill, each drain), seconds"
    )
    ap.add_argument("--dir", type=Path, default=None, help="where to make the temp dir")
    args = ap.parse_args(argv)
    n = args.records or (10_000 if args.quick else 100_000)
    say(
        f"SEPAS sync benchmark: {n:,} records of ~1 KB; Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="sepas-bench-sync-", dir=args.dir) as tmp:
        root = Path(tmp)
        data_key = os.urandom(32)
        key = init_key(root / "node.key")
        filled, fsecs = fill(root, data_key, n, args.time_limit)
        say(f"- fill: {filled:,} records in {fsecs:.1f} s ({filled / fsecs:,.0f}/s, bulk 1,000)")
        if filled < n:
            say(f"  (fill time limit hit: running with {filled:,} records)")
        micro = microbench(root, data_key, key)
        for name in ("hub", "signed", "plain"):
            shutil.copytree(root / "template", root / name)

        trivial = _Trivial()
        trivial.start()

        def register(client: Any) -> None:
            orig = client.post_batch

            def post_batch(batch: Any) -> Any:
                trivial.ids[batch.batch_id] = batch.ids
                return orig(batch)

            client.post_batch = post_batch

        def plain(client: Any) -> None:
            register(client)
            client._auth = _NoAuth()

        try:
            cfg_t = _config(root, "trivial", trivial.url, root / "x")
            results["signed"] = drain(
                "trivial endpoint, signed+gzip",
                root / "signed",
                data_key,
                cfg_t,
                key,
                filled,
                args.time_limit,
                register,
            )
            bytes_signed = trivial.bytes_in
            with mock.patch.object(batching, "gzip", _identity_gzip):
                results["plain"] = drain(
                    "trivial endpoint, unsigned+identity",
                    root / "plain",
                    data_key,
                    cfg_t,
                    key,
                    filled,
                    args.time_limit,
                    plain,
                )
            bytes_plain = trivial.bytes_in - bytes_signed
        finally:
            trivial.stop()

        hub_dir = root / "hubd"
        hub_dir.mkdir()
        (hub_dir / "hub.toml").write_text(
            tomli_w.dumps(
                {
                    "server": {"listen": "127.0.0.1:0"},
                    "store": {"url": f"sqlite://{hub_dir / 'hub.db'}", "blob_dir": "blobs"},
                }
            ),
            encoding="utf-8",
        )
        hub = _Hub(hub_dir / "hub.toml")
        hub.start()
        try:
            hub.store.add_node_key(NODE_ID, public_pem(key).encode("ascii"), fingerprint(key))
            cfg_h = _config(root, "hub", hub.url, root / "x")
            results["hub"] = drain(
                "real hub (SQLite store), signed+gzip",
                root / "hub",
                data_key,
                cfg_h,
                key,
                filled,
                args.time_limit,
            )
            at_hub = sum(hub.store.counts_by_service(NODE_ID).values())
        finally:
            hub.stop()

    s, p, h = results["signed"], results["plain"], results["hub"]
    ratio = s["rate"] / p["rate"] if p["rate"] else 0.0
    overhead = (p["rate"] / s["rate"] - 1) if s["rate"] else float("inf")
    say()
    say("=" * 90)
    say("Summary")
    say(f"  records in the backlog: {filled:,} (~1 KB bodies; envelope ~1.5 KB)")
    say(
        f"  real hub: {h['sent']:,} drained in {h['secs']:.1f} s = {h['rate']:,.0f} rec/s; "
        f"hub store holds {at_hub:,}; {h['left']:,} left"
    )
    say(
        f"    target >= {TARGET_RATE:,.0f} rec/s: "
        f"{'PASS' if h['rate'] >= TARGET_RATE and h['left'] == 0 else 'MISS'}"
    )
    say(
        f"  trivial endpoint: signed+gzip {s['rate']:,.0f} rec/s, unsigned+identity "
        f"{p['rate']:,.0f} rec/s"
    )
    say(
        f"    ratio signed+gzip / plain = {ratio:.2f}x; signing+gzip cost = "
        f"{overhead:+.1%} time per record; target < {TARGET_OVERHEAD:.0%}: "
        f"{'PASS' if overhead < TARGET_OVERHEAD else 'MISS'}"
    )
    say(
        f"    bytes on the wire: gzip {bytes_signed / 1e6:,.1f} MB, "
        f"identity {bytes_plain / 1e6:,.1f} MB"
    )
    cpu_s = s["cpu"] / max(s["sent"], 1)
    cpu_p = p["cpu"] / max(p["sent"], 1)
    say(
        f"    process CPU per record: signed+gzip / plain = {cpu_s / cpu_p:.2f}x "
        f"(less sensitive to neighbours than the wall-clock ratio)"
    )
    per_batch_plain_ms = micro["records"] / p["rate"] * 1000 if p["rate"] else 0.0
    if per_batch_plain_ms:
        say(
            f"    of which (micro, below): gzip "
            f"{(micro['form_gzip_ms'] - micro['form_plain_ms']) / per_batch_plain_ms:.1%}, "
            f"signing {micro['sign_ms'] / per_batch_plain_ms:.1%} of a plain batch's "
            f"{per_batch_plain_ms:.0f} ms"
        )
    say(f"  real hub / trivial signed+gzip = {h['rate'] / s['rate']:.2f}x (the hub's own cost)")
    say(
        f"  per {micro['records']}-record batch (micro): form_batch with gzip "
        f"{micro['form_gzip_ms']:.1f} ms, identity {micro['form_plain_ms']:.1f} ms "
        f"({micro['gzip_bytes']:,} vs {micro['plain_bytes']:,} B); one signature "
        f"{micro['sign_ms']:.2f} ms"
    )
    say(
        "  CPU (process, incl. the in-process server): "
        + ", ".join(
            f"{label} {r['cpu'] / max(r['sent'], 1) * 1e6:.0f} us/rec"
            for label, r in (("real hub", h), ("signed+gzip", s), ("plain", p))
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
