"""`sepas-agent`: the command line. A thin shell: parse, call the library, render.

Every command takes ``--config`` (else ``SEPAS_AGENT_CONFIG``, else
/etc/sepas-agent/agent.toml). Exit codes: 0 ok, 1 failure, 2 usage or config error;
``status --check`` follows the monitoring-plugin convention (0 OK, 1 WARNING,
2 CRITICAL). A SepasError is printed as one red line plus its hint; ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

import adapters
from agent import __version__
from agent.buffer import Buffer, BufferStats, State, open_stats
from agent.config import AgentConfig, load_config, render_effective, resolve_config_path
from agent.errors import ConfigError, HubError, SepasError
from agent.keys import (
    fingerprint,
    init_data_key,
    init_key,
    load_private_key,
    public_pem,
)
from agent.runtime import open_buffer
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
app.add_typer(config_app, name="config")
app.add_typer(keys_app, name="keys")

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


def status_data(
    cfg: AgentConfig, stats: BufferStats | None, now: float, *, sent: list[int] | None = None
) -> dict[str, Any]:
    """What `status --json` prints; also the basis of the table."""
    if stats is None:
        return {"node_id": cfg.node.id, "data_dir": str(cfg.node.data_dir), "buffer": None}
    services: dict[str, dict[str, int]] = {}
    for (service, state), n in sorted(stats.counts.items()):
        services.setdefault(service, {s.value: 0 for s in State})[state] = n
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


def _render_status(data: dict[str, Any], check: CheckResult) -> None:
    out.print(f"[bold]SEPAS node {data['node_id']}[/]  data dir {data['data_dir']}")
    buf = data["buffer"]
    if buf is None:
        out.print("buffer: [yellow]none yet[/] (the agent has not run, nothing is buffered)")
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
    for name, cur in data["cursors"].items():
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
    """Show what the buffer holds, per service and state; safe while the agent runs.

    Example: sepas-agent status --check   (for Zabbix/Nagios)
    """

    def body() -> int:
        _, cfg = _load(config)
        now = time.time()
        stats = open_stats(cfg.node.data_dir)
        result = evaluate_check(stats, cfg, now)
        sent = Buffer.read_sent_since(cfg.node.data_dir, [now - 3600, now - 86400])
        data = status_data(cfg, stats, now, sent=sent)
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
