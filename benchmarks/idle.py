"""Idle footprint of `sepas-agent run` with four adapters (issue 6).

Starts the real agent as a subprocess (``.venv/bin/sepas-agent run -c agent.toml``)
with four adapters, all on 127.0.0.1 or local files:

  hl7-mllp   listening on 127.0.0.1 (nobody connects)
  hl7-files  polling an empty temp folder every 10 s
  sql        polling a temp SQLite "HIS" file (3 rows, uploaded at start) every 10 s
  dicom      C-FIND against a closed 127.0.0.1 port every 10 min (one failed poll at
             start), its storage SCP listening on 127.0.0.1

and hub.url at the real reference hub (uvicorn, SQLite store) in this process, with
the node's key registered. After a warm-up (ready, then --settle seconds) it samples,
once a second for --secs seconds, the agent's RSS (VmRSS in /proc/PID/status) and CPU
(utime+stime in /proc/PID/stat). The baseline, over the same window: a bare
``python -c "import time; time.sleep(N)"`` with the same interpreter. Target
(issue 6): RSS < 120 MB and CPU < 1% (of one core).

Usage:
    .venv/bin/python benchmarks/idle.py [--secs 60] [--settle 10]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from agent.config import DATA_DIR_ENV
from agent.demo import _free_port, _Hub, _write_his
from agent.keys import fingerprint, init_key, public_pem

NODE_ID = "IDLE-0001"
TARGET_RSS_MB = 120.0
TARGET_CPU_PCT = 1.0
READY_SECS = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(msg: str = "") -> None:
    print(msg, flush=True)


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB (10^6 bytes) of ``pid``."""
    vals = {"VmRSS": 0.0, "VmHWM": 0.0}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            name = line.split(":", 1)[0]
            if name in vals:
                vals[name] = int(line.split()[1]) * 1024 / 1e6
    return vals["VmRSS"], vals["VmHWM"]


def cpu_secs(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def agent_config(root: Path, hub_url: str) -> tuple[Path, int]:
    spool = root / "spool"
    spool.mkdir()
    his = root / "his.db"
    _write_his(his, rows=3, now=datetime.now(UTC))
    telemetry_port = _free_port()
    cfg: dict[str, Any] = {
        "node": {"id": NODE_ID, "data_dir": str(root / "data")},
        "hub": {"url": hub_url},
        "buffer": {"max_bytes": 1_000_000_000},
        "telemetry": {
            "listen": f"127.0.0.1:{telemetry_port}",
            "log_format": "json",
            "log_level": "info",
        },
        "adapters": [
            {
                "name": "lis",
                "kind": "hl7-mllp",
                "listen": f"127.0.0.1:{_free_port()}",
                "allow": ["127.0.0.1/32"],
            },
            {
                "name": "lis-files",
                "kind": "hl7-files",
                "directory": str(spool),
                "poll_every": "10s",
            },
            {
                "name": "his-db",
                "kind": "sql",
                "url": f"sqlite:///{his}",
                "query": "SELECT * FROM v_referral WHERE changed_at > :cursor ORDER BY changed_at",
                "cursor_column": "changed_at",
                "initial_cursor": "2000-01-01",
                "key_columns": ["id"],
                "service": "referral",
                "poll_every": "10s",
                "fields": {
                    "occurred_at": "referred_at",
                    "national_id": "nid",
                    "local_id": "mrn",
                    "family": "family",
                    "given": "given",
                },
            },
            {
                "name": "pacs",
                "kind": "dicom",
                "ae_title": "SEPASAGENT",
                "listen": f"127.0.0.1:{_free_port()}",
                "poll_every": "10m",
                "retrieve": "metadata",
                "peer": {"ae_title": "PACS", "host": "127.0.0.1", "port": _free_port()},
            },
        ],
    }
    path = root / "agent.toml"
    path.write_text(tomli_w.dumps(cfg), encoding="utf-8")
    return path, telemetry_port


def wait_ready(proc: subprocess.Popen[bytes], port: int) -> float:
    t0 = time.monotonic()
    with httpx.Client(trust_env=False, timeout=1.0) as c:
        while time.monotonic() - t0 < READY_SECS:
            if proc.poll() is not None:
                raise RuntimeError(f"the agent exited with {proc.returncode} before it was ready")
            with contextlib.suppress(httpx.TransportError):
                if c.get(f"http://127.0.0.1:{port}/healthz").status_code < 500:
                    return time.monotonic() - t0
            time.sleep(0.1)  # between polls of a bounded loop
    raise RuntimeError(f"the agent did not answer /healthz within {READY_SECS:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--secs", type=float, default=60.0, help="sampling window (default 60)")
    ap.add_argument("--settle", type=float, default=10.0, help="after ready (default 10)")
    ap.add_argument("--keep-log", action="store_true", help="print the agent's log tail")
    args = ap.parse_args(argv)
    secs = max(2.0, min(args.secs, 3600.0))
    say(
        f"SEPAS idle benchmark: {secs:.0f} s; Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    agent_bin = Path(sys.executable).parent / "sepas-agent"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.pop(DATA_DIR_ENV, None)
    with tempfile.TemporaryDirectory(prefix="sepas-bench-idle-") as tmp:
        root = Path(tmp)
        hub_dir = root / "hub"
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
        agent: subprocess.Popen[bytes] | None = None
        base: subprocess.Popen[bytes] | None = None
        log_path = root / "agent.log"
        try:
            data = root / "data"
            data.mkdir(mode=0o700)
            key = init_key(data / "node.key")
            hub.store.add_node_key(NODE_ID, public_pem(key).encode("ascii"), fingerprint(key))
            toml, tport = agent_config(root, hub.url)
            with log_path.open("wb") as log:
                agent = subprocess.Popen(
                    [str(agent_bin), "run", "-c", str(toml)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
                ready = wait_ready(agent, tport)
                say(f"- agent pid {agent.pid} ready in {ready:.1f} s; settling {args.settle:.0f} s")
                time.sleep(max(0.0, min(args.settle, 300.0)))
                nap = int(secs + args.settle + 30)
                base = subprocess.Popen(
                    [sys.executable, "-c", f"import time; time.sleep({nap})"], env=env
                )
                time.sleep(1.0)  # let the baseline finish starting (imports)
                pids = {"agent": agent.pid, "baseline": base.pid}
                cpu0 = {k: cpu_secs(p) for k, p in pids.items()}
                peak = dict.fromkeys(pids, 0.0)
                rss_sum = dict.fromkeys(pids, 0.0)
                n = 0
                t0 = time.monotonic()
                while time.monotonic() - t0 < secs and n < 100_000:
                    if agent.poll() is not None:
                        raise RuntimeError(f"the agent exited with {agent.returncode}")
                    for k, p in pids.items():
                        r, _ = rss_mb(p)
                        peak[k] = max(peak[k], r)
                        rss_sum[k] += r
                    n += 1
                    time.sleep(1.0)  # the sampling period
                wall = time.monotonic() - t0
                cpu = {k: cpu_secs(p) - cpu0[k] for k, p in pids.items()}
                hwm = {k: rss_mb(p)[1] for k, p in pids.items()}
                nthreads = threads(agent.pid)
                at_hub = sum(hub.store.counts_by_service(NODE_ID).values())
        finally:
            rc = stop(agent) if agent is not None else None
            if base is not None:
                base.kill()
                base.wait(timeout=5)
            hub.stop()
        log_lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        if args.keep_log:
            for line in log_lines[-20:]:
                say(f"  | {line[:200]}")

    pct = {k: cpu[k] / wall * 100 for k in cpu}
    avg = {k: rss_sum[k] / n for k in rss_sum}
    pk = {k: max(peak[k], hwm[k]) for k in peak}
    say(f"- sampled {n} times over {wall:.1f} s; agent threads {nthreads}; agent exit {rc}")
    say(f"- records at the hub (the 3 HIS rows): {at_hub}; agent log lines {len(log_lines)}")
    say()
    say("=" * 90)
    say("Summary (MB = 10^6 bytes; CPU % of one core; peak RSS = max(samples, VmHWM))")
    head = f"  {'':<22}{'avg RSS':>10}{'peak RSS':>10}{'CPU s':>8}{'CPU %':>8}"
    say(head)
    for k in ("agent", "baseline"):
        say(f"  {k:<22}{avg[k]:>10.1f}{pk[k]:>10.1f}{cpu[k]:>8.2f}{pct[k]:>8.3f}")
    cpu_ratio = f"{pct['agent'] / pct['baseline']:.1f}x" if pct["baseline"] > 0 else "n/a (0)"
    say(
        f"  ratio agent/baseline: peak RSS {pk['agent'] / pk['baseline']:.1f}x "
        f"(+{pk['agent'] - pk['baseline']:.1f} MB), CPU {cpu_ratio}"
    )
    say(
        f"  target peak RSS < {TARGET_RSS_MB:.0f} MB: {pk['agent']:.1f} MB "
        f"{'PASS' if pk['agent'] < TARGET_RSS_MB else 'MISS'}"
    )
    say(
        f"  target CPU < {TARGET_CPU_PCT:g}%: {pct['agent']:.3f}% "
        f"{'PASS' if pct['agent'] < TARGET_CPU_PCT else 'MISS'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
