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
from agent.errors import ConfigError, KeyFileError, SepasError
from agent.keys import (
    fingerprint,
    init_data_key,
    init_key,
    load_data_key,
    load_private_key,
    public_pem,
)

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


def open_buffer(cfg: AgentConfig) -> Buffer:
    """The buffer of this config, with its data key (created on first use).

    A buffer that exists without its key file is an error, not a fresh key: the
    records in it could never be read again.
    """
    data_dir = cfg.node.data_dir
    key: bytes | None = None
    if cfg.buffer.encrypt:
        key_path = cfg.buffer_key_path
        if (data_dir / "buffer.db").exists() and not key_path.exists():
            raise KeyFileError(
                f"{key_path} is missing but {data_dir / 'buffer.db'} exists",
                hint="Restore buffer.key from backup; a new key cannot read the records.",
            )
        key = init_data_key(key_path) if not key_path.exists() else load_data_key(key_path)
    return Buffer.open(
        data_dir,
        data_key=key,
        max_bytes=cfg.buffer.max_bytes,
        retention_days=cfg.buffer.retention_days,
    )


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


def status_data(cfg: AgentConfig, stats: BufferStats | None, now: float) -> dict[str, Any]:
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
    sync = data["sync"]
    out.print(f"last sync: {json.dumps(sync, ensure_ascii=False) if sync else 'never'}")
    if check.reasons:
        out.print(f"[{color}]attention:[/] " + "; ".join(check.reasons))


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
        data = status_data(cfg, stats, now)
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
