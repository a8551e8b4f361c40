"""`sepas-agent`: the command line. A thin shell: parse, call the library, render.

Every command takes ``--config`` (else ``SEPAS_AGENT_CONFIG``, else
/etc/sepas-agent/agent.toml). Exit codes: 0 ok, 1 failure, 2 usage or config error;
``status --check`` follows the monitoring-plugin convention (0 OK, 1 WARNING,
2 CRITICAL). A SepasError is printed as one red line plus its hint; ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import stat
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

import adapters
from agent import __version__
from agent.adapter import Adapter, AdapterContext, Check, PollReport
from agent.buffer import Buffer, BufferStats, State, open_stats
from agent.config import (
    AdapterSettings,
    AgentConfig,
    load_config,
    render_effective,
    resolve_config_path,
    split_host_port,
)
from agent.dates import TEHRAN, parse_cli_date
from agent.errors import (
    BackfillUnsupportedError,
    ConfigError,
    HubError,
    InputRejectedError,
    SepasError,
    StorageError,
)
from agent.keys import (
    fingerprint,
    init_data_key,
    init_key,
    load_private_key,
    public_pem,
)
from agent.runtime import data_key, derive_log_key, open_buffer, read_service_state
from agent.uploader import build as build_uploader
from agent.uploader.client import SKEW_WARN_SECS
from agent.uploader.reconcile import reconcile as reconcile_ledger
from agent.uploader.uploader import utc_text

T = TypeVar("T")

app = typer.Typer(
    name="sepas-agent",
    help="SEPAS node agent: takes HIS/LIS/PACS data in, keeps it safe, uploads it to the hub.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Check and show the configuration.", no_args_is_help=True)
keys_app = typer.Typer(
    help="The node's signing key and the buffer's data key.", no_args_is_help=True
)
dead_app = typer.Typer(
    help="Records the hub rejected and input that could not be mapped: inspect, retry, purge.",
    no_args_is_help=True,
)
app.add_typer(config_app, name="config")
app.add_typer(keys_app, name="keys")
app.add_typer(dead_app, name="dead-letter")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Config file [default: $SEPAS_AGENT_CONFIG, else /etc/sepas-agent/agent.toml].",
        show_default=False,
    ),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]

#: Test seam, not an option: an httpx transport (``httpx.MockTransport(FakeHub)``) that
#: `sync` uses instead of the network. Never set in production.
_hub_transport: Any = None
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _fail(e: SepasError) -> NoReturn:
    err.print(f"[bold red]error:[/] {e}", soft_wrap=True)
    if e.hint:
        err.print(f"[yellow]hint:[/] {e.hint}", soft_wrap=True)
    raise typer.Exit(2 if isinstance(e, ConfigError) else 1)


def _run(debug: bool, fn: Callable[[], T]) -> T:
    """Run a command body: our errors become one line and an exit code."""
    try:
        return fn()
    except SepasError as e:
        if debug:
            raise
        _fail(e)


def _load(config: Path | None) -> tuple[Path, AgentConfig]:
    path = resolve_config_path(config)
    return path, load_config(path, adapters.KINDS)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    if version:
        out.print(f"sepas-agent {__version__}")
        raise typer.Exit(0)


# -- config ---------------------------------------------------------------------------


@config_app.command("check")
def config_check(config: ConfigOpt = None, debug: DebugOpt = False) -> None:
    """Validate the config and print the effective config (defaults filled, secrets masked).

    Example: sepas-agent config check --config /etc/sepas-agent/agent.toml
    """

    def body() -> None:
        path, cfg = _load(config)
        sys.stdout.write(render_effective(cfg))
        err.print(f"[green]ok:[/] {path} is valid ({len(cfg.adapters)} adapters)")

    _run(debug, body)


# -- keys -----------------------------------------------------------------------------


@keys_app.command("init")
def keys_init(
    config: ConfigOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing node key (re-register it!).")
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Create the node's Ed25519 key (0600) and the buffer's data key if missing.

    Example: sepas-agent keys init --config /etc/sepas-agent/agent.toml
    """

    def body() -> None:
        _, cfg = _load(config)
        key = init_key(cfg.node.key_path, force=force)
        if cfg.buffer.encrypt and not cfg.buffer_key_path.exists():
            init_data_key(cfg.buffer_key_path)
            err.print(
                f"[green]created[/] data key {cfg.buffer_key_path} "
                "(back it up: without it the buffer cannot be read)"
            )
        err.print(f"[green]created[/] node key {cfg.node.key_path}")
        sys.stdout.write(public_pem(key.public_key()))
        print(f"fingerprint: {fingerprint(key.public_key())}")
        err.print(
            f"Register it at the hub: sepas-hub nodes add {cfg.node.id} --public-key FILE",
            markup=False,
        )

    _run(debug, body)


@keys_app.command("show")
def keys_show(config: ConfigOpt = None, json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Print the node's public key (SPKI PEM) and fingerprint, to register at the hub.

    Example: sepas-agent keys show > FAC-0001.pub
    """

    def body() -> None:
        _, cfg = _load(config)
        pub = load_private_key(cfg.node.key_path).public_key()
        if json_out:
            data = {
                "node_id": cfg.node.id,
                "public_key": public_pem(pub),
                "fingerprint": fingerprint(pub),
            }
            print(json.dumps(data, indent=2))
            return
        sys.stdout.write(public_pem(pub))
        err.print(f"fingerprint: {fingerprint(pub)}", markup=False)

    _run(debug, body)


# -- status ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    code: int  # 0 OK, 1 WARNING, 2 CRITICAL
    reasons: list[str]


def evaluate_check(stats: BufferStats | None, cfg: AgentConfig, now: float) -> CheckResult:
    """Thresholds of `[alerts]` applied to the buffer's numbers, worst level wins."""
    a = cfg.alerts
    if stats is None:
        return CheckResult(1, ["buffer does not exist yet (the agent has not run)"])
    code = 0
    reasons: list[str] = []

    def level(value: float, warn: float | None, crit: float | None, what: str) -> None:
        nonlocal code
        if crit is not None and value >= crit:
            code = 2
            reasons.append(f"{what} CRITICAL")
        elif warn is not None and value >= warn:
            code = max(code, 1)
            reasons.append(f"{what} WARNING")

    age = now - stats.oldest_pending_at if stats.oldest_pending_at else 0.0
    level(
        age,
        a.oldest_pending_warn.total_seconds(),
        a.oldest_pending_crit.total_seconds(),
        f"oldest pending {_age(age)}",
    )
    pct = 100.0 * stats.used_bytes / cfg.buffer.max_bytes
    level(pct, a.capacity_warn_percent, a.capacity_crit_percent, f"buffer {pct:.0f}% full")
    level(stats.total(State.DEAD), a.dead_warn, a.dead_crit, f"{stats.total(State.DEAD)} dead")
    level(
        stats.quarantined,
        a.quarantine_warn,
        a.quarantine_crit,
        f"{stats.quarantined} quarantined",
    )
    alarm = (stats.sync or {}).get("alarm")
    if alarm:
        code = 2
        reasons.append(f"hub refuses this node ({alarm.get('status')}) CRITICAL")
    skew = (stats.sync or {}).get("clock_skew_s")
    if isinstance(skew, int | float) and abs(skew) > SKEW_WARN_SECS:
        code = max(code, 1)
        reasons.append(f"clock skew {skew:+.0f}s WARNING")
    return CheckResult(code, reasons)


def _age(secs: float | None) -> str:
    if secs is None:
        return "-"
    secs = int(secs)
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60}m"
    if secs < 172800:
        return f"{secs // 3600}h{(secs % 3600) // 60:02d}m"
    return f"{secs // 86400}d{(secs % 86400) // 3600}h"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def uploads_data(sync: dict[str, Any], sent: list[int] | None, now: float) -> dict[str, Any]:
    """The uploader's part of `status`: from the sync state the uploader keeps, and the
    records sent in the last hour and day."""
    until = sync.get("backoff_until")
    skew = sync.get("clock_skew_s")
    rec = dict(sync.get("reconcile") or {})
    rec.pop("requeued_keys", None)
    return {
        "last_attempt_at": utc_text(sync.get("last_attempt_at")),
        "last_success_at": utc_text(sync.get("last_success_at")),
        "last_error": sync.get("last_error"),
        "alarm": sync.get("alarm"),
        "sent_last_hour": sent[0] if sent else 0,
        "sent_last_day": sent[1] if sent else 0,
        "backoff_until": utc_text(until)
        if isinstance(until, int | float) and until > now
        else None,
        "backoff_reason": sync.get("backoff_reason")
        if isinstance(until, int | float) and until > now
        else None,
        "clock_skew_s": skew,
        "clock_skew_warning": isinstance(skew, int | float) and abs(skew) > SKEW_WARN_SECS,
        "last_run": sync.get("last_run"),
        "reconcile": rec or None,
    }


def service_data(state: dict[str, Any] | None) -> dict[str, Any]:
    """The service part of `status`: from its heartbeat file (`read_service_state`)."""
    if state is None:
        return {"running": False, "ever_ran": False, "pid": None, "heartbeat_age_s": None}
    health = state.get("health") if isinstance(state.get("health"), dict) else None
    return {
        "running": bool(state.get("service_running")),
        "ever_ran": True,
        "pid": state.get("pid"),
        "heartbeat_age_s": state.get("heartbeat_age_s"),
        "started_at": state.get("started_at"),
        "updated_at": state.get("updated_at"),
        "stopped_at": state.get("stopped_at"),
        "version": state.get("version"),
        "telemetry_listen": state.get("telemetry_listen"),
        "health": health,
        "error": state.get("error"),
    }


def adapters_data(
    cfg: AgentConfig, state: dict[str, Any] | None, stats: BufferStats | None
) -> dict[str, dict[str, Any]]:
    """Each configured adapter: the service's view of it (last poll, error, failure
    streak) when the heartbeat has it, and its cursor from the buffer."""
    seen = (state or {}).get("adapters")
    seen = seen if isinstance(seen, dict) else {}
    cursors = stats.cursors if stats is not None else {}
    out: dict[str, dict[str, Any]] = {}
    for a in cfg.adapters:
        found = seen.get(a.name)
        view: dict[str, Any] = found if isinstance(found, dict) else {}
        cursor = view.get("cursor")
        if cursor is None and a.name in cursors:
            value, at = cursors[a.name]
            cursor = {"value": str(value)[:200], "updated_at": utc_text(at)}
        out[a.name] = {
            "kind": a.kind,
            "enabled": a.enabled,
            "state": view.get("state") if a.enabled else "disabled",
            "last_ok": view.get("last_ok"),
            "last_poll": view.get("last_poll"),
            "cursor": cursor,
            "last_error": view.get("last_error"),
            "consecutive_failures": view.get("consecutive_failures", 0),
            "next_retry_at": view.get("next_retry_at"),
        }
    return out


def status_data(
    cfg: AgentConfig,
    stats: BufferStats | None,
    now: float,
    *,
    sent: list[int] | None = None,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What `status --json` prints; also the basis of the table. ``state`` is the
    service heartbeat (`read_service_state`)."""
    if stats is None:
        return {
            "node_id": cfg.node.id,
            "data_dir": str(cfg.node.data_dir),
            "buffer": None,
            "service": service_data(state),
            "adapters": adapters_data(cfg, state, None),
        }
    services: dict[str, dict[str, int]] = {}
    for (service, st), n in sorted(stats.counts.items()):
        services.setdefault(service, {s.value: 0 for s in State})[st] = n
    return {
        "node_id": cfg.node.id,
        "data_dir": str(cfg.node.data_dir),
        "buffer": {
            "used_bytes": stats.used_bytes,
            "max_bytes": cfg.buffer.max_bytes,
            "used_percent": round(100.0 * stats.used_bytes / cfg.buffer.max_bytes, 2),
            "file_bytes": stats.file_bytes,
            "blobs": stats.blob_count,
            "blob_bytes": stats.blob_bytes,
            "schema_version": stats.schema_version,
        },
        "totals": {s.value: stats.total(s) for s in State},
        "services": services,
        "oldest_pending_age_s": None
        if stats.oldest_pending_at is None
        else round(now - stats.oldest_pending_at, 1),
        "quarantined": stats.quarantined,
        "unmapped_raw": stats.unmapped_raw,
        "cursors": {a: {"value": v, "updated_at": t} for a, (v, t) in stats.cursors.items()},
        "sync": stats.sync or None,
        "uploads": uploads_data(stats.sync or {}, sent, now),
        "service": service_data(state),
        "adapters": adapters_data(cfg, state, stats),
    }


def _check_line(
    result: CheckResult, stats: BufferStats | None, cfg: AgentConfig, data: dict[str, Any]
) -> str:
    """One monitoring-plugin line: status, reasons, then performance data."""
    label = ("OK", "WARNING", "CRITICAL")[result.code]
    text = "; ".join(result.reasons) or "buffer healthy"
    if stats is None:
        return f"SEPAS-AGENT {label} - {text}"
    perf = {
        "pending": stats.total(State.PENDING),
        "inflight": stats.total(State.INFLIGHT),
        "dead": stats.total(State.DEAD),
        "quarantined": stats.quarantined,
        "oldest_pending_age": f"{data['oldest_pending_age_s'] or 0}s",
        "used_bytes": f"{stats.used_bytes}B;;;0;{cfg.buffer.max_bytes}",
    }
    return f"SEPAS-AGENT {label} - {text} | " + " ".join(f"{k}={v}" for k, v in perf.items())


def _render_service(svc: dict[str, Any]) -> None:
    if svc["running"]:
        out.print(
            f"service: [green]running[/] (pid {svc['pid']}, heartbeat "
            f"{_age(svc['heartbeat_age_s'])} ago, since {svc.get('started_at') or '?'})"
        )
        health = svc.get("health") or {}
        if health and not health.get("ok", True):
            out.print("  unhealthy: " + "; ".join(health.get("reasons") or []), markup=False)
    elif not svc["ever_ran"]:
        out.print("service: [yellow]not running[/] (it never ran with this data dir)")
    elif svc.get("error"):
        out.print(f"service: [yellow]unknown[/] ({svc['error']})", markup=False)
    else:
        last = svc.get("stopped_at") or svc.get("updated_at") or "?"
        out.print(f"service: [red]not running[/] (last heartbeat {last})")


def _poll_text(poll: Any) -> str:
    if not isinstance(poll, dict):
        return "-"
    return f"{poll.get('at') or '?'}: {poll.get('found', 0)} found, {poll.get('new', 0)} new"


def _render_adapters(adapters_: dict[str, dict[str, Any]]) -> None:
    if not adapters_:
        return
    table = Table(title="adapters", title_justify="left")
    for col in ("name", "kind", "state", "last poll", "cursor", "failures", "last error"):
        table.add_column(col, overflow="fold")
    for name, a in adapters_.items():
        err_ = a.get("last_error")
        err_text = "-"
        if isinstance(err_, dict):
            err_text = f"{err_.get('at') or ''} {err_.get('message') or err_.get('error') or ''}"
        cursor = a.get("cursor")
        table.add_row(
            name,
            a["kind"],
            a.get("state") or "-",
            _poll_text(a.get("last_poll")),
            str(cursor["value"]) if isinstance(cursor, dict) else "-",
            str(a.get("consecutive_failures") or 0),
            err_text.strip() or "-",
        )
    out.print(table, markup=False)


def _render_status(data: dict[str, Any], check: CheckResult) -> None:
    out.print(f"[bold]SEPAS node {data['node_id']}[/]  data dir {data['data_dir']}")
    _render_service(data["service"])
    buf = data["buffer"]
    if buf is None:
        out.print("buffer: [yellow]none yet[/] (the agent has not run, nothing is buffered)")
        _render_adapters(data["adapters"])
        return
    color = {0: "green", 1: "yellow", 2: "red"}[check.code]
    out.print(
        f"buffer: {_bytes(buf['used_bytes'])} of {_bytes(buf['max_bytes'])} "
        f"([{color}]{buf['used_percent']:.1f}%[/]), file {_bytes(buf['file_bytes'])}, "
        f"{buf['blobs']} blobs"
    )
    table = Table(title="records by service and state", title_justify="left")
    table.add_column("service")
    for s in State:
        table.add_column(s.value, justify="right")
    for service, row in data["services"].items():
        table.add_row(service, *(f"{row[s.value]:,}" for s in State))
    table.add_row("[bold]total[/]", *(f"[bold]{data['totals'][s.value]:,}[/]" for s in State))
    out.print(table)
    out.print(f"oldest pending: {_age(data['oldest_pending_age_s'])}")
    out.print(
        f"dead letters: {data['totals']['dead']}   quarantined: {data['quarantined']}   "
        f"awaiting mapping: {data['unmapped_raw']}"
    )
    _render_adapters(data["adapters"])
    for name, cur in data["cursors"].items():
        if name not in data["adapters"]:
            out.print(f"cursor {name}: {cur['value']}", markup=False)
    _render_uploads(data["uploads"], data["sync"])
    if check.reasons:
        out.print(f"[{color}]attention:[/] " + "; ".join(check.reasons))


def _when(text: str | None) -> str:
    return text if text else "never"


def _render_uploads(up: dict[str, Any], sync: dict[str, Any] | None) -> None:
    if not sync:
        out.print("uploads: [yellow]never synced[/]")
        return
    out.print(
        f"last successful sync: {_when(up['last_success_at'])}   "
        f"last attempt: {_when(up['last_attempt_at'])}"
    )
    out.print(
        f"sent: {up['sent_last_hour']:,} in the last hour, {up['sent_last_day']:,} in the last day"
    )
    if up["alarm"]:
        alarm = up["alarm"]
        out.print(
            f"[bold red]hub refuses this node[/] ({alarm.get('status')} "
            f"{alarm.get('problem_type') or ''}): {alarm.get('message')}",
            markup=True,
        )
    err_ = up["last_error"]
    if err_:
        out.print(
            f"last error: {err_.get('message')} (status {err_.get('status')}, "
            f"type {err_.get('problem_type') or '-'}) at {utc_text(err_.get('at'))}",
            markup=False,
        )
    if up["backoff_until"]:
        out.print(f"[yellow]backing off[/] ({up['backoff_reason']}) until {up['backoff_until']}")
    skew = up["clock_skew_s"]
    if skew is not None:
        color = "red" if up["clock_skew_warning"] else "green"
        out.print(f"clock skew vs hub: [{color}]{skew:+.1f} s[/]")
    rec = up["reconcile"]
    if rec:
        differing = rec.get("days_differing") or []
        line = (
            f"last reconciliation: {utc_text(rec.get('at'))}, {rec.get('days_checked')} days "
            f"checked, {len(differing)} differing, {rec.get('requeued', 0):,} records re-queued"
        )
        out.print(line, markup=False)
        for d in differing:
            note = " (unresolved: unchanged since re-queued)" if d.get("unresolved") else ""
            out.print(
                f"  gap on {d['day']}: node {d['ours']:,}, hub {d['hub']:,}{note}", markup=False
            )


@app.command()
def status(
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Monitoring-plugin mode: one line, exit 0 OK / 1 WARNING / 2 CRITICAL "
            "by the [alerts] thresholds.",
        ),
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Show the service, its adapters, and the buffer per service and state.

    Safe while the agent runs.

    Example: sepas-agent status --check   (for Zabbix/Nagios)
    """

    def body() -> int:
        _, cfg = _load(config)
        now = time.time()
        stats = open_stats(cfg.node.data_dir)
        result = evaluate_check(stats, cfg, now)
        sent = Buffer.read_sent_since(cfg.node.data_dir, [now - 3600, now - 86400])
        state = read_service_state(cfg.node.data_dir, now=now)
        data = status_data(cfg, stats, now, sent=sent, state=state)
        if check:
            print(_check_line(result, stats, cfg, data))
            return result.code
        if json_out:
            data["check"] = {"code": result.code, "reasons": result.reasons}
            print(json.dumps(data, indent=2, ensure_ascii=False))
            return 0
        _render_status(data, result)
        return 0

    if check and not debug:
        try:
            code = body()
        except SepasError as e:
            # A monitoring system must see a broken agent as CRITICAL, with the reason.
            print(f"SEPAS-AGENT CRITICAL - {str(e).splitlines()[0]}")
            code = 2
        raise typer.Exit(code)
    code = _run(debug, body)
    raise typer.Exit(code)


# -- sync -------------------------------------------------------------------------------


def _adapter_status(cfg: AgentConfig, buffer: Buffer) -> list[dict[str, Any]]:
    """The heartbeat's adapters: configured ones, last_ok from their cursor's time."""
    cursors = buffer.stats().cursors
    return [
        {
            "name": a.name,
            "kind": a.kind,
            "last_ok": utc_text(cursors[a.name][1]) if a.name in cursors else None,
            "last_error": None,
        }
        for a in cfg.adapters
        if a.enabled
    ]


def _render_sync(data: dict[str, Any]) -> None:
    rep_ = data["sync"]
    reached = rep_["hub_reached"] and not rep_["auth_refused"]
    head = "[green]hub reached[/]" if reached else "[red]hub not reached[/]"
    out.print(
        f"{head}: {rep_['sent']:,} sent, {rep_['duplicate']:,} already at the hub, "
        f"{rep_['rejected']:,} rejected (dead-letter), {rep_['retried']:,} to retry; "
        f"{rep_['batches']} batches, blobs {rep_['blobs_uploaded']} uploaded / "
        f"{rep_['blobs_present']} already there"
    )
    if rep_["error"]:
        e = rep_["error"]
        out.print(
            f"last error: {e['message']} (status {e['status']}, type {e['problem_type'] or '-'})",
            markup=False,
        )
    if rep_["backoff_until"]:
        out.print(f"next attempt not before {utc_text(rep_['backoff_until'])}")
    rec = data.get("reconcile")
    if rec:
        out.print(
            f"reconciliation: {rec['days_checked']} days checked, "
            f"{len(rec['days_differing'])} differing, {rec['requeued']:,} records re-queued"
        )
    elif data.get("reconcile_error"):
        out.print(f"reconciliation failed: {data['reconcile_error']}", markup=False)
    out.print(f"heartbeat: {'sent' if rep_['heartbeat_sent'] else 'not sent'}")


@app.command()
def sync(
    config: ConfigOpt = None,
    once: Annotated[
        bool,
        typer.Option("--once", help="Sync once and exit (required; `run` syncs continuously)."),
    ] = False,
    json_out: JsonOpt = False,
    reconcile_days: Annotated[
        int,
        typer.Option(
            "--reconcile-days",
            min=0,
            max=62,
            help="Reconcile the ledger with the hub over this many days (0: skip).",
        ),
    ] = 7,
    debug: DebugOpt = False,
) -> None:
    """Upload what is due to the hub now, reconcile the ledger, send a heartbeat.

    Records waiting out a backoff are tried at once.

    Exit 0: hub reached (even if it rejected records); 1: unreachable or signature refused.

    Example: sepas-agent sync --once --json
    """
    if not once:
        err.print(
            "[bold red]error:[/] sync needs --once "
            "(the service, `sepas-agent run`, syncs continuously)"
        )
        raise typer.Exit(2)

    def body() -> int:
        _, cfg = _load(config)
        key = load_private_key(cfg.node.key_path)
        buffer = open_buffer(cfg)
        data: dict[str, Any] = {"node_id": cfg.node.id}
        try:
            client, uploader = build_uploader(
                cfg,
                buffer,
                key,
                transport=_hub_transport,
                adapters=lambda: _adapter_status(cfg, buffer),
            )
            with client:
                data["made_due"] = buffer.make_due()
                report = uploader.sync_once(force=True)
                if report.hub_reached and not report.auth_refused and reconcile_days > 0:
                    try:
                        rec = reconcile_ledger(
                            buffer,
                            client,
                            days=reconcile_days,
                            retention_days=cfg.buffer.retention_days,
                        )
                    except HubError as e:
                        data["reconcile_error"] = str(e)
                    else:
                        data["reconcile"] = rec.to_dict()
                        if rec.requeued:
                            again = uploader.sync_once(force=True)
                            data["resent"] = again.to_dict()
        finally:
            buffer.close()
        data["sync"] = report.to_dict()
        if json_out:
            print(json.dumps(data, indent=2, ensure_ascii=False))
        else:
            _render_sync(data)
        return 0 if report.hub_reached and not report.auth_refused else 1

    raise typer.Exit(_run(debug, body))


# -- dead-letter ------------------------------------------------------------------------

#: A record id prefix must be at least this long to name a dead record.
MIN_PREFIX = 8
_HL7_KINDS = ("hl7-mllp", "hl7-files")


def _open_existing_buffer(cfg: AgentConfig) -> Buffer | None:
    """The buffer if it exists (None: the agent never ran here); never creates one."""
    if not (cfg.node.data_dir / "buffer.db").exists():
        return None
    return open_buffer(cfg)


@dataclass(frozen=True)
class _Target:
    kind: str  # "dead" or "quarantine"
    id: str  # a record id, or "q<N>"
    qid: int = 0


def _all_dead_ids(buffer: Buffer) -> list[str]:
    return [d.id for d in buffer.dead(limit=10**9)]


def _resolve(buffer: Buffer, ident: str) -> _Target:
    """An operator's ID: ``q<N>`` for a quarantine entry, else a dead record's id or a
    unique prefix of at least `MIN_PREFIX` hex digits.

    Raises:
        SepasError: no such entry, or an ambiguous prefix.
    """
    text = ident.strip().lower()
    if text.startswith("q") and text[1:].isdigit():
        qid = int(text[1:])
        if not _q_exists(buffer, qid):
            raise SepasError(
                f"no quarantine entry {ident}", hint="See `sepas-agent dead-letter list`."
            )
        return _Target("quarantine", f"q{qid}", qid)
    if len(text) < MIN_PREFIX or any(c not in "0123456789abcdef" for c in text):
        raise SepasError(
            f"{ident!r} is not an id: give q<N> for a quarantine entry, or a dead record's id "
            f"(or its first {MIN_PREFIX}+ hex digits)",
            hint="See `sepas-agent dead-letter list`.",
        )
    matches = [i for i in _all_dead_ids(buffer) if i.startswith(text)]
    if not matches:
        state = buffer.state_of(text) if len(text) == 64 else None
        extra = f" (it is {state.value}, not dead)" if state is not None else ""
        raise SepasError(
            f"no dead record {ident}{extra}", hint="See `sepas-agent dead-letter list`."
        )
    if len(matches) > 1:
        raise SepasError(
            f"{ident} matches {len(matches)} dead records", hint="Give more digits of the id."
        )
    return _Target("dead", matches[0])


def _q_exists(buffer: Buffer, qid: int) -> bool:
    try:
        buffer.quarantined_data(qid)
    except KeyError:
        return False
    return True


def _quarantine_entry(buffer: Buffer, qid: int) -> Any:
    offset = 0
    while True:
        page = buffer.quarantined(limit=500, offset=offset)
        for e in page:
            if e.id == qid:
                return e
        if len(page) < 500:
            return None
        offset += 500


def dead_letter_rows(buffer: Buffer, limit: int) -> list[dict[str, Any]]:
    """Quarantined inputs and dead records, oldest first, without any patient data."""
    rows: list[dict[str, Any]] = []
    for q in buffer.quarantined(limit=limit):
        rows.append(
            {
                "id": f"q{q.id}",
                "type": "quarantine",
                "adapter": q.adapter,
                "service": None,
                "at": utc_text(q.received_at),
                "at_unix": q.received_at,
                "reason": q.reason,
                "media_type": q.media_type or None,
                "size": q.size,
            }
        )
    for d in buffer.dead(limit=limit):
        rows.append(
            {
                "id": d.id,
                "type": "dead",
                "adapter": d.adapter,
                "service": d.service,
                "at": utc_text(d.settled_at),
                "at_unix": d.settled_at,
                "reason": d.reason,
                "media_type": None,
                "size": None,
            }
        )
    rows.sort(key=lambda r: r["at_unix"] or 0.0)
    return rows[:limit]


@dead_app.command("list")
def dead_list(
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Show at most N entries.")] = 100,
    debug: DebugOpt = False,
) -> None:
    """List quarantined input and dead records: id, adapter/service, when, reason.

    Never shows patient data. Quarantine ids are q<N>; dead records are named by their
    record id (the first 8+ hex digits are enough).

    Example: sepas-agent dead-letter list --limit 20
    """

    def body() -> int:
        _, cfg = _load(config)
        buffer = _open_existing_buffer(cfg)
        if buffer is None:
            rows: list[dict[str, Any]] = []
            totals = {"quarantined": 0, "dead": 0}
        else:
            try:
                rows = dead_letter_rows(buffer, limit)
                st = buffer.stats()
                totals = {"quarantined": st.quarantined, "dead": st.total(State.DEAD)}
            finally:
                buffer.close()
        if json_out:
            for r in rows:
                r.pop("at_unix", None)
            print(json.dumps({"entries": rows, "totals": totals}, indent=2, ensure_ascii=False))
            return 0
        if not rows:
            out.print("[green]nothing in quarantine or dead-letter[/]")
            return 0
        # Plain lines, not a table: ids stay whole at any terminal width (and grep-able).
        for r in rows:
            rid = r["id"] if r["type"] == "quarantine" else r["id"][:16]
            who = r["adapter"] or "-"
            if r["service"]:
                who += f"/{r['service']}"
            out.print(
                f"{rid:<16}  {r['type']:<10}  {who}  {r['at'] or '-'}  {r['reason']}",
                markup=False,
            )
        shown = len(rows)
        total = totals["quarantined"] + totals["dead"]
        out.print(
            f"{totals['quarantined']} quarantined, {totals['dead']} dead"
            + (f" (showing {shown}; use --limit)" if shown < total else "")
        )
        return 0

    raise typer.Exit(_run(debug, body))


@dead_app.command("show")
def dead_show(
    ident: Annotated[str, typer.Argument(metavar="ID", help="q<N>, or a dead record's id.")],
    config: ConfigOpt = None,
    raw: Annotated[
        bool,
        typer.Option("--raw", help="Quarantine entry: write its bytes (patient data!) to stdout."),
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Show a dead record's envelope (decrypted) or a quarantine entry's metadata.

    This is an operator's explicit action: the output can contain patient data, and
    goes to stdout only, never to the logs.

    Example: sepas-agent dead-letter show q12 --raw > msg.hl7
    """

    def body() -> int:
        _, cfg = _load(config)
        buffer = _open_existing_buffer(cfg)
        if buffer is None:
            raise SepasError(f"no entry {ident}: the buffer does not exist yet")
        try:
            target = _resolve(buffer, ident)
            if target.kind == "dead":
                rec = buffer.record(target.id)
                if rec is None:
                    raise SepasError(f"no dead record {ident}")
                entry = next((d for d in buffer.dead(limit=10**9) if d.id == target.id), None)
                meta = {
                    "id": target.id,
                    "type": "dead",
                    "reason": entry.reason if entry else None,
                    "settled_at": utc_text(entry.settled_at) if entry else None,
                }
                err.print(json.dumps(meta, ensure_ascii=False), markup=False)
                envelope = json.loads(rec.to_json())
                print(json.dumps(envelope, indent=2, ensure_ascii=False))
                return 0
            q = _quarantine_entry(buffer, target.qid)
            if q is None:
                raise SepasError(f"no quarantine entry {ident}")
            if raw:
                data = buffer.quarantined_data(target.qid)
                sys.stdout.flush()
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
                return 0
            meta = {
                "id": f"q{q.id}",
                "type": "quarantine",
                "adapter": q.adapter,
                "received_at": utc_text(q.received_at),
                "reason": q.reason,
                "media_type": q.media_type or None,
                "size": q.size,
                "sha256": q.sha256,
            }
            print(json.dumps(meta, indent=2, ensure_ascii=False))
            return 0
        finally:
            buffer.close()

    raise typer.Exit(_run(debug, body))


def _targets(buffer: Buffer, ids: list[str] | None, all_: bool) -> list[_Target]:
    if all_:
        out_: list[_Target] = []
        offset = 0
        while page := buffer.quarantined(limit=500, offset=offset):
            out_ += [_Target("quarantine", f"q{q.id}", q.id) for q in page]
            offset += len(page)
        out_ += [_Target("dead", i) for i in _all_dead_ids(buffer)]
        return out_
    return [_resolve(buffer, i) for i in ids or []]


def retry_quarantined(cfg: AgentConfig, buffer: Buffer, qid: int) -> tuple[bool, str]:
    """Re-check and re-map a quarantined HL7 message with the current code. On success
    its records are put (pending) and the entry dropped; on failure the entry stays
    with the new reason. Returns (ok, what happened), never patient data."""
    entry = _quarantine_entry(buffer, qid)
    if entry is None:
        return False, "gone (already retried or purged?)"
    settings = next((a for a in cfg.adapters if a.name == entry.adapter), None)
    if settings is None:
        return False, (
            f"its adapter {entry.adapter!r} is no longer configured; purge it, or restore "
            "the adapter and retry"
        )
    if settings.kind not in _HL7_KINDS:
        return False, (
            f"{settings.kind} input is not re-mapped from the quarantine: the adapter "
            "reads its source again (see `sepas-agent backfill`); purge the entry once done"
        )
    from adapters.hl7 import intake, mapping  # the current code, imported on demand

    data = buffer.quarantined_data(qid)
    encoding = str(getattr(settings, "encoding", "cp1256"))
    try:
        checked = intake.check(data, default_encoding=encoding)
        records = mapping.map_message(
            checked.text,
            data,
            node_id=cfg.node.id,
            adapter=settings.name,
            kind=settings.kind,
            settings=settings,
            captured_at=datetime.fromtimestamp(entry.received_at, UTC),
        )
    except InputRejectedError as e:
        reason = str(e)[:500]
    except Exception as e:  # noqa: BLE001 - a mapper bug is the entry's new reason
        reason = f"mapping failed: {type(e).__name__}"
    else:
        put = buffer.put(records)
        buffer.drop_quarantined([qid])
        return True, (
            f"re-mapped: {put.inserted} new record(s), {put.duplicates} already in the buffer"
        )
    buffer.quarantine(
        data, adapter=entry.adapter, reason=f"retry: {reason}", media_type=entry.media_type
    )
    return False, f"still refused: {reason}"


IdsArg = Annotated[
    list[str] | None,
    typer.Argument(metavar="[ID]...", help="q<N>, or dead records' ids (8+ hex digits)."),
]
AllOpt = Annotated[bool, typer.Option("--all", help="Every quarantine entry and dead record.")]


def _need_ids(ids: list[str] | None, all_: bool) -> None:
    if bool(ids) == all_:
        err.print("[bold red]error:[/] give one or more IDs, or --all (not both)")
        raise typer.Exit(2)


@dead_app.command("retry")
def dead_retry(
    ids: IdsArg = None,
    all_: AllOpt = False,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Retry dead records (back to pending) and quarantined HL7 input (re-mapped).

    Quarantined HL7 input is re-checked and re-mapped with the current code: its
    records are stored and the entry dropped, or the entry stays with the new reason.
    Safe while the service runs.

    Exit 0: everything retried; 1: some could not be.

    Example: sepas-agent dead-letter retry q3 9f2c41d0
    """
    _need_ids(ids, all_)

    def body() -> int:
        _, cfg = _load(config)
        buffer = _open_existing_buffer(cfg)
        if buffer is None:
            raise SepasError("nothing to retry: the buffer does not exist yet")
        results: list[dict[str, Any]] = []
        try:
            for t in _targets(buffer, ids, all_):
                if t.kind == "dead":
                    n = buffer.requeue_dead([t.id])
                    ok, what = n == 1, "pending again" if n else "not dead any more"
                else:
                    ok, what = retry_quarantined(cfg, buffer, t.qid)
                results.append({"id": t.id, "type": t.kind, "ok": ok, "result": what})
        finally:
            buffer.close()
        if json_out:
            print(json.dumps({"results": results}, indent=2, ensure_ascii=False))
        else:
            for r in results:
                mark = "[green]ok[/]" if r["ok"] else "[red]kept[/]"
                out.print(f"{mark} {r['id']}: ", end="")
                out.print(r["result"], markup=False)
            if not results:
                out.print("nothing to retry")
        return 0 if all(r["ok"] for r in results) else 1

    raise typer.Exit(_run(debug, body))


@dead_app.command("purge")
def dead_purge(
    ids: IdsArg = None,
    all_: AllOpt = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Delete dead records and quarantine entries for good (asks first, unless --yes).

    Example: sepas-agent dead-letter purge --all --yes
    """
    _need_ids(ids, all_)

    def body() -> int:
        _, cfg = _load(config)
        buffer = _open_existing_buffer(cfg)
        if buffer is None:
            raise SepasError("nothing to purge: the buffer does not exist yet")
        try:
            targets = _targets(buffer, ids, all_)
            if not targets:
                out.print("nothing to purge")
                return 0
            if not yes:
                if not sys.stdin.isatty():
                    err.print(
                        "[bold red]error:[/] purge deletes for good; confirm with --yes "
                        "(stdin is not a terminal)"
                    )
                    return 2
                if not typer.confirm(f"Delete {len(targets)} entries for good?", default=False):
                    err.print("nothing deleted")
                    return 1
            dead = [t.id for t in targets if t.kind == "dead"]
            quarantine = [t.qid for t in targets if t.kind == "quarantine"]
            n_dead = buffer.purge_dead(dead) if dead else 0
            n_q = buffer.drop_quarantined(quarantine) if quarantine else 0
        finally:
            buffer.close()
        out.print(f"purged {n_dead} dead record(s) and {n_q} quarantine entr(y/ies)")
        return 0

    raise typer.Exit(_run(debug, body))


# -- backfill ---------------------------------------------------------------------------


class _ProgressView:
    """Backfill progress: a rich bar on a terminal, a plain line a second otherwise."""

    def __init__(self, name: str, *, tty: bool) -> None:
        self.name = name
        self.tty = tty
        self.started = time.monotonic()
        self._last_line = 0.0
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _ProgressView:
        if self.tty:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                TextColumn("{task.fields[found]:,} found, {task.fields[new]:,} new"),
                TextColumn("{task.fields[rate]:.1f}/s"),
                TimeElapsedColumn(),
                console=err,
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(
                f"backfill {self.name}", total=None, found=0, new=0, rate=0.0
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)

    def __call__(self, report: PollReport) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = report.found / elapsed
        if self._progress is not None:
            self._progress.update(self._task, found=report.found, new=report.new, rate=rate)
            return
        now = time.monotonic()
        if now - self._last_line >= 1.0:
            self._last_line = now
            err.print(
                f"backfill {self.name}: {report.found:,} found, {report.new:,} new, {rate:.1f}/s",
                markup=False,
            )


def _adapter_settings(cfg: AgentConfig, name: str) -> AdapterSettings:
    for a in cfg.adapters:
        if a.name == name:
            return a
    names = ", ".join(a.name for a in cfg.adapters) or "none"
    err.print(
        f"[bold red]error:[/] no adapter named {name!r} in the config; configured: {names}",
        soft_wrap=True,
    )
    raise typer.Exit(2)


def _cli_date(value: str, what: str) -> date:
    try:
        return parse_cli_date(value)
    except ValueError as e:
        err.print(f"[bold red]error:[/] {what}: ", end="")
        err.print(str(e), markup=False)
        raise typer.Exit(2) from None


def _close(adapter: Any) -> None:
    close = getattr(adapter, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):  # closing after the work is done
            close()


@app.command()
def backfill(
    adapter_name: Annotated[str, typer.Argument(metavar="ADAPTER", help="The adapter's name.")],
    since: Annotated[
        str, typer.Option("--since", help="First day: 2025-03-21 or Jalali 1404-01-01.")
    ],
    until: Annotated[
        str | None, typer.Option("--until", help="Last day (inclusive) [default: today].")
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Ask a source (sql, dicom) for a past period again; stored records stay single.

    Safe while the service runs. Days are Asia/Tehran, inclusive.

    Exit 0: done; 1: the adapter cannot backfill, or failed, or part of the period was
    not answered (run it again); 2: unknown adapter or bad dates.

    Example: sepas-agent backfill his-db --since 1404-01-01 --until 1404-01-31
    """

    def body() -> int:
        _, cfg = _load(config)
        settings = _adapter_settings(cfg, adapter_name)
        first = _cli_date(since, "--since")
        last = _cli_date(until, "--until") if until else datetime.now(TEHRAN).date()
        if last < first:
            err.print(f"[bold red]error:[/] --until ({last}) is before --since ({first})")
            raise typer.Exit(2)
        key = data_key(cfg)
        buffer = open_buffer(cfg, key=key)
        adapter: Any = None
        try:
            ctx = AdapterContext(node_id=cfg.node.id, sink=buffer, log_key=derive_log_key(cfg, key))
            adapter = adapters.build(settings, ctx)
            if not callable(getattr(adapter, "backfill", None)):
                raise BackfillUnsupportedError(
                    f"adapter {settings.name!r} ({settings.kind}) cannot backfill: it "
                    "listens, and senders push each message once as it happens",
                    hint="Ask the sender to resend the period (most LIS/HIS interfaces can "
                    "replay); messages already stored are stored once.",
                )
            started = time.monotonic()
            with _ProgressView(settings.name, tty=err.is_terminal) as view:
                report = adapter.backfill(first, last, progress=view)
            secs = time.monotonic() - started
        finally:
            _close(adapter)
            buffer.close()
        data = {
            "adapter": settings.name,
            "kind": settings.kind,
            "since": first.isoformat(),
            "until": last.isoformat(),
            "found": report.found,
            "new": report.new,
            "duplicates": report.duplicates,
            "quarantined": report.quarantined,
            "complete": report.complete,
            "secs": round(secs, 2),
            "notes": list(report.notes),
        }
        if json_out:
            print(json.dumps(data, indent=2, ensure_ascii=False))
        else:
            out.print(
                f"backfill {settings.name} {first}..{last}: {report.found:,} found, "
                f"{report.new:,} new, {report.duplicates:,} already stored, "
                f"{report.quarantined:,} quarantined in {secs:.1f} s",
                markup=False,
            )
            for note in report.notes:
                out.print(f"  {note}", markup=False)
        if not report.complete:
            err.print("[yellow]incomplete:[/] part of the period was not answered; run it again")
            return 1
        return 0

    raise typer.Exit(_run(debug, body))


# -- doctor -----------------------------------------------------------------------------

OK, WARN, FAIL = "OK", "WARN", "FAIL"
#: Seconds any one doctor check may take.
CHECK_TIMEOUT_SECS = 10.0
SKEW_FAIL_SECS = 300.0


@dataclass
class DoctorCheck:
    name: str
    status: str
    detail: str
    hint: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "hint": self.hint}


def _timed(
    pool: ThreadPoolExecutor,
    name: str,
    fn: Callable[[], list[DoctorCheck]],
    timeout: float = CHECK_TIMEOUT_SECS,
) -> list[DoctorCheck]:
    """Run checks with a timeout; an exception or a timeout is a FAIL, never raised."""
    future = pool.submit(fn)
    try:
        return future.result(timeout=timeout)
    except FutureTimeout:
        return [DoctorCheck(name, FAIL, f"no answer within {timeout:.0f} s")]
    except SepasError as e:
        return [DoctorCheck(name, FAIL, str(e).splitlines()[0], e.hint or "")]
    except Exception as e:  # noqa: BLE001 - doctor never raises
        return [DoctorCheck(name, FAIL, f"{type(e).__name__}: {str(e)[:200]}")]


def _mode_check(name: str, path: Path, *, required: bool, missing_hint: str) -> DoctorCheck:
    if not path.exists():
        return DoctorCheck(name, FAIL if required else WARN, f"{path} does not exist", missing_hint)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return DoctorCheck(
            name,
            FAIL,
            f"{path} has mode {mode:04o}: others can read it",
            f"chmod 600 {path}",
        )
    return DoctorCheck(name, OK, f"{path} (mode {mode:04o})")


def _check_keys(cfg: AgentConfig) -> list[DoctorCheck]:
    out_ = [
        _mode_check(
            "node key",
            cfg.node.key_path,
            required=True,
            missing_hint="Create it: sepas-agent keys init; then register it at the hub.",
        )
    ]
    if out_[0].status == OK:
        load_private_key(cfg.node.key_path)  # malformed -> KeyFileError -> FAIL
    if cfg.buffer.encrypt:
        has_buffer = (cfg.node.data_dir / "buffer.db").exists()
        check = _mode_check(
            "buffer key",
            cfg.buffer_key_path,
            required=has_buffer,
            missing_hint="Restore buffer.key from backup; without it the buffer is unreadable."
            if has_buffer
            else "Created by `sepas-agent keys init` or the first run; back it up.",
        )
        out_.append(check)
    else:
        out_.append(DoctorCheck("buffer key", WARN, "buffer.encrypt = false: records are plain"))
    return out_


def _check_data_dir(cfg: AgentConfig) -> list[DoctorCheck]:
    d = cfg.node.data_dir
    if not d.is_dir():
        return [
            DoctorCheck(
                "data dir",
                WARN,
                f"{d} does not exist yet",
                "It is created by `sepas-agent keys init` or the first run.",
            )
        ]
    if not os.access(d, os.W_OK | os.X_OK):
        return [
            DoctorCheck(
                "data dir",
                FAIL,
                f"{d} is not writable by this user",
                f"chown the agent's user (sepas) {d}; mode 0700",
            )
        ]
    out_ = [DoctorCheck("data dir", OK, f"{d} exists and is writable")]
    usage = shutil.disk_usage(d)
    stats = open_stats(d) if (d / "buffer.db").exists() else None
    used = stats.used_bytes if stats else 0
    need = max(cfg.buffer.max_bytes - used, 0)
    text = f"{_bytes(usage.free)} free; the buffer may grow by {_bytes(need)} more"
    if usage.free < min(need, 100_000_000):
        out_.append(DoctorCheck("disk space", FAIL, text, "Free disk space on that filesystem."))
    elif usage.free < need:
        out_.append(
            DoctorCheck(
                "disk space",
                WARN,
                text,
                "The disk fills before buffer.max_bytes: lower it or free space.",
            )
        )
    else:
        out_.append(DoctorCheck("disk space", OK, text))
    return out_


def _check_buffer(cfg: AgentConfig, deep: bool) -> list[DoctorCheck]:
    path = cfg.node.data_dir / "buffer.db"
    if not path.exists():
        return [DoctorCheck("buffer", OK, "not created yet (the first run creates it)")]
    buffer = open_buffer(cfg)
    try:
        st = buffer.stats()
    finally:
        buffer.close()
    detail = (
        f"opens; {st.total(State.PENDING):,} pending, {st.total(State.DEAD):,} dead, "
        f"{st.quarantined:,} quarantined"
    )
    out_ = [DoctorCheck("buffer", OK, detail)]
    if deep:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
        out_.append(
            DoctorCheck("buffer integrity", OK, "quick_check ok")
            if result == "ok"
            else DoctorCheck(
                "buffer integrity",
                FAIL,
                f"quick_check: {str(result)[:200]}",
                "Stop the agent and restore the buffer from backup.",
            )
        )
    return out_


def _check_hub(cfg: AgentConfig) -> list[DoctorCheck]:
    from agent.uploader.client import HubClient
    from agent.uploader.signing import SigningAuth

    settings = cfg.hub.model_copy(update={"timeout_secs": min(cfg.hub.timeout_secs, 5.0)})
    try:
        key = load_private_key(cfg.node.key_path)
    except SepasError:
        key = None
    auth: Any = SigningAuth(key, cfg.node.id) if key is not None else None
    client = HubClient(settings, auth, node_id=cfg.node.id, transport=_hub_transport)
    try:
        if not client.health():
            skipped = "not checked: the hub's health check failed"
            return [
                DoctorCheck(
                    "hub health",
                    FAIL,
                    f"GET {cfg.hub.url.rstrip('/')}/v1/health did not answer ok",
                    "Check hub.url, the network path and any proxy; is the hub up?",
                ),
                DoctorCheck("hub registration", WARN, skipped),
                DoctorCheck("clock skew", WARN, skipped),
            ]
        out_ = [DoctorCheck("hub health", OK, f"{cfg.hub.url} answers")]
        if key is None:
            out_.append(
                DoctorCheck(
                    "hub registration", FAIL, "no node key to sign with", "sepas-agent keys init"
                )
            )
        else:
            try:
                client.node_view()
                out_.append(
                    DoctorCheck(
                        "hub registration",
                        OK,
                        f"signed request accepted: {cfg.node.id} is registered",
                    )
                )
            except HubError as e:
                if e.status in (401, 403):
                    out_.append(
                        DoctorCheck(
                            "hub registration",
                            FAIL,
                            f"the hub refuses this node ({e.status}, "
                            f"{e.problem_type or 'no problem type'})",
                            f"Register the key (sepas-agent keys show) at the hub: sepas-hub nodes "
                            f"add {cfg.node.id}; or it was revoked.",
                        )
                    )
                else:
                    out_.append(
                        DoctorCheck("hub registration", FAIL, str(e).splitlines()[0], e.hint or "")
                    )
        skew = client.last_skew
        if skew is None:
            out_.append(DoctorCheck("clock skew", WARN, "the hub sent no Date header"))
        else:
            level = (
                FAIL if abs(skew) > SKEW_FAIL_SECS else WARN if abs(skew) > SKEW_WARN_SECS else OK
            )
            out_.append(
                DoctorCheck(
                    "clock skew",
                    level,
                    f"{skew:+.1f} s vs the hub",
                    ""
                    if level == OK
                    else "Fix time sync (chrony / systemd-timesyncd); "
                    "past 300 s the hub refuses every upload.",
                )
            )
        return out_
    finally:
        client.close()


class _NoSink:
    """The sink of adapters built only for their checks: any write is a bug."""

    def __getattr__(self, name: str) -> Any:
        raise StorageError(f"doctor: adapters built for checks do not write ({name})")


def _check_adapter(cfg: AgentConfig, settings: AdapterSettings, running: bool) -> list[DoctorCheck]:
    ctx = AdapterContext(node_id=cfg.node.id, sink=_NoSink(), log_key=b"doctor")  # type: ignore[arg-type]
    adapter: Adapter = adapters.build(settings, ctx)
    try:
        results: list[Check] = list(adapter.checks())
    finally:
        _close(adapter)
    out_: list[DoctorCheck] = []
    for c in results:
        if not c.ok and running and c.name.endswith(": listen"):
            out_.append(DoctorCheck(c.name, OK, "in use by the running agent"))
        else:
            out_.append(DoctorCheck(c.name, OK if c.ok else FAIL, c.detail, c.hint))
    return out_ or [DoctorCheck(settings.name, OK, "no checks")]


def _check_port(name: str, listen: str, running: bool) -> list[DoctorCheck]:
    host, port = split_host_port(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        if running:
            return [DoctorCheck(name, OK, f"{listen} in use by the running agent")]
        return [
            DoctorCheck(
                name,
                FAIL,
                f"cannot bind {listen}: {e.strerror or e}",
                "Another program holds the port: stop it or change the address.",
            )
        ]
    finally:
        sock.close()
    return [DoctorCheck(name, OK, f"{listen} is free")]


def doctor_checks(config: Path | None, *, deep: bool = False) -> list[DoctorCheck]:
    """Every doctor check, in order; never raises."""
    try:
        path, cfg = _load(config)
    except SepasError as e:
        return [DoctorCheck("config", FAIL, str(e), e.hint or "")]
    except Exception as e:  # noqa: BLE001 - doctor never raises
        return [DoctorCheck("config", FAIL, f"{type(e).__name__}: {e}")]
    checks = [DoctorCheck("config", OK, f"{path} is valid ({len(cfg.adapters)} adapters)")]
    state = read_service_state(cfg.node.data_dir)
    running = bool(state and state.get("service_running"))
    checks.append(
        DoctorCheck(
            "service",
            OK,
            f"running (pid {state.get('pid')})" if running and state else "not running",
        )
    )
    enabled = [a for a in cfg.adapters if a.enabled]
    with ThreadPoolExecutor(max_workers=4 + len(enabled)) as pool:
        checks += _timed(pool, "keys", lambda: _check_keys(cfg))
        checks += _timed(pool, "data dir", lambda: _check_data_dir(cfg))
        checks += _timed(
            pool, "buffer", lambda: _check_buffer(cfg, deep), 60.0 if deep else CHECK_TIMEOUT_SECS
        )
        checks += _timed(pool, "hub health", lambda: _check_hub(cfg), 20.0)
        checks += _timed(
            pool,
            "telemetry.listen",
            lambda: _check_port("telemetry.listen", cfg.telemetry.listen, running),
        )
        for a in enabled:
            checks += _timed(pool, a.name, partial(_check_adapter, cfg, a, running), 20.0)
            listen = getattr(a, "listen", None)
            if isinstance(listen, str) and a.kind != "hl7-mllp":  # mllp's own check binds
                checks += _timed(
                    pool,
                    f"{a.name}: listen",
                    partial(_check_port, f"{a.name}: listen", listen, running),
                )
        pool.shutdown(wait=False, cancel_futures=True)
    return checks


@app.command()
def doctor(
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
    deep: Annotated[
        bool, typer.Option("--deep", help="Also run SQLite's quick_check on the buffer.")
    ] = False,
) -> None:
    """Check everything the agent needs; each check is OK, WARN or FAIL with a hint.

    Config, keys, data dir, buffer, hub (health, a signed request, clock skew), each
    adapter's source (C-ECHO, SQL connect, ports, folders) and the listening ports.

    Exit 0: no FAIL; 1: at least one FAIL.

    Example: sepas-agent doctor --json
    """
    checks = doctor_checks(config, deep=deep)
    failed = any(c.status == FAIL for c in checks)
    if json_out:
        print(
            json.dumps(
                {"ok": not failed, "checks": [c.to_dict() for c in checks]},
                indent=2,
                ensure_ascii=False,
            )
        )
    else:
        color = {OK: "green", WARN: "yellow", FAIL: "red"}
        for c in checks:
            out.print(f"[{color[c.status]}]{c.status:<4}[/] [bold]{c.name}[/]: ", end="")
            out.print(c.detail, markup=False)
            if c.hint and c.status != OK:
                out.print(f"     hint: {c.hint}", markup=False)
        counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
        out.print(f"{counts[OK]} ok, {counts[WARN]} warnings, {counts[FAIL]} failures")
    raise typer.Exit(1 if failed else 0)


# -- demo -------------------------------------------------------------------------------


@app.command()
def demo(
    workdir: Annotated[
        Path | None,
        typer.Option(
            "--workdir", help="Keep everything in this directory [default: a temporary one]."
        ),
    ] = None,
    records: Annotated[
        int, typer.Option("--records", min=2, help="How many synthetic messages to send.")
    ] = 40,
) -> None:
    """Run the whole flow on this machine: a hub, a LIS over MLLP, a HIS, the agent.

    Everything is synthetic and on 127.0.0.1. Exit 0 when every record reached the hub
    exactly once, 1 otherwise.

    Example: sepas-agent demo --records 100
    """
    from agent.demo import run_demo  # its imports (uvicorn, the hub) only when asked

    raise typer.Exit(run_demo(workdir, records=records, console=out))


# -- run --------------------------------------------------------------------------------


@app.command()
def run(config: ConfigOpt = None, debug: DebugOpt = False) -> None:
    """Run the agent as a service: adapters, buffer, uploads, /healthz and /metrics.

    Logs go to stdout: JSON lines (for journald) or text on a terminal. Stops cleanly
    on SIGTERM or Ctrl-C within 10 s. Exit 0 after a clean stop, 1 when it cannot
    start (missing node key, unusable buffer), 2 on a config error.

    Example: sepas-agent run --config /etc/sepas-agent/agent.toml
    """
    from agent.runtime import Runtime  # the service's imports (APScheduler, prometheus)

    _, cfg = _run(debug, lambda: _load(config))
    raise typer.Exit(Runtime(cfg, hub_transport=_hub_transport).run_forever())


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
