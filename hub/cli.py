"""`sepas-hub`: the reference hub's command line. A thin shell: parse, call, render.

Every command takes ``--config`` (else ``$SEPAS_HUB_CONFIG``, else
/etc/sepas-hub/hub.toml) and ``--store URL``, which overrides ``[store] url``; when
no config file exists and ``--store`` is given, the defaults apply. Exit codes: 0 ok,
1 failure, 2 usage or config error. An error is one red line plus a hint;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from agent.errors import ConfigError, ConfigProblem, KeyFileError, SepasError
from agent.keys import fingerprint, load_public_key_pem
from hub.settings import (
    CONFIG_ENV,
    SETTINGS_ENV,
    HubSettings,
    load_settings,
    open_store,
    resolve_config_path,
    split_host_port,
    validate_settings,
)
from hub.store import HubStore, NodeInfo

T = TypeVar("T")

#: The same rule as the agent's ``node.id``.
_NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: PROTOCOL.md: a node may have two active keys at once (the stores retire the oldest).
MAX_ACTIVE_KEYS = 2
_MAX_KEY_FILE_BYTES = 64 * 1024

app = typer.Typer(
    name="sepas-hub",
    help="SEPAS reference hub: receives signed batches from node agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
nodes_app = typer.Typer(help="The registry of nodes and their keys.", no_args_is_help=True)
app.add_typer(nodes_app, name="nodes")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help=f"Config file (default: ${CONFIG_ENV}, else /etc/sepas-hub/hub.toml).",
        show_default=False,
    ),
]
StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="Store URL, overriding store.url: sqlite:///PATH or postgresql://...",
        show_default=False,
    ),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]


def _fail(e: SepasError) -> NoReturn:
    err.print(f"[bold red]error:[/] {e}", soft_wrap=True, markup=True)
    if e.hint:
        err.print(f"[yellow]hint:[/] {e.hint}", soft_wrap=True)
    raise typer.Exit(2 if isinstance(e, ConfigError) else 1)


def _run(debug: bool, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except SepasError as e:
        if debug:
            raise
        _fail(e)


def load(config: Path | None, store_url: str | None, **overrides: Any) -> HubSettings:
    """The effective settings: the file (or defaults, when there is none and ``--store``
    is given) with the command line's overrides applied.

    Raises:
        ConfigError: the file is missing or invalid, or an override is.
    """
    path = resolve_config_path(config)
    if config is None and not path.exists():
        if store_url is None:
            raise ConfigError(
                str(path),
                [ConfigProblem("", "file not found")],
                hint=f"Pass --config FILE, set ${CONFIG_ENV}, or give --store URL to run "
                "with the defaults (config/hub.example.toml shows them).",
            )
        settings = HubSettings()
    else:
        settings = load_settings(path)
    data = settings.model_dump(mode="json")
    if store_url is not None:
        data["store"]["url"] = store_url
    for key, value in overrides.items():
        if value is not None:
            section, name = key.split(".")
            data[section][name] = value
    return validate_settings(data, source=str(path) + " (with command-line options)")


@contextmanager
def _store(settings: HubSettings) -> Iterator[HubStore]:
    try:
        store = open_store(settings.store.url)
    except SepasError:
        raise
    except Exception as e:
        # sqlite3 and psycopg errors, and OSError (a directory that cannot be made),
        # become one line; anything else is a bug and keeps its traceback.
        if not isinstance(e, OSError) and type(e).__module__.split(".")[0] not in (
            "sqlite3",
            "psycopg",
        ):
            raise
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise SepasError(
            f"Cannot open the store: {type(e).__name__}: {first_line}",
            hint="Check store.url: the database must be reachable, the file writable.",
        ) from None
    try:
        yield store
    finally:
        store.close()


@app.callback(invoke_without_command=True)
def _root() -> None:
    """SEPAS reference hub."""


# -- serve ------------------------------------------------------------------------------


@app.command("serve")
def serve(
    config: ConfigOpt = None,
    listen: Annotated[
        str | None,
        typer.Option("--listen", help="HOST:PORT to bind, overriding server.listen."),
    ] = None,
    store: StoreOpt = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Worker processes, overriding server.workers.")
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Run the hub (uvicorn): PROTOCOL.md's API on server.listen.

    Past server.max_connections requests at once (per worker) the hub answers 503.

    TLS when server.tls_cert and server.tls_key are set; else put a TLS proxy in front.

    Example: sepas-hub serve --config /etc/sepas-hub/hub.toml --listen 0.0.0.0:8443
    """

    def body() -> None:
        import uvicorn

        settings = load(config, store, **{"server.listen": listen, "server.workers": workers})
        with _store(settings) as hub_store:
            hub_store.active_keys("-")  # connect (and create the schema) here, once, so
            # that an unusable store fails with one line rather than in every worker
        host, port = split_host_port(settings.server.listen)
        os.environ[SETTINGS_ENV] = settings.model_dump_json()
        scheme = "https" if settings.server.tls_cert else "http"
        err.print(f"sepas-hub listening on {scheme}://{settings.server.listen}", markup=False)
        uvicorn.run(
            "hub.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=settings.server.workers,
            # The app answers 503 problem+json past max_connections requests at once;
            # uvicorn's bound (plain-text 503, counting idle keep-alive connections
            # too) is a backstop against connection floods, above the app's.
            limit_concurrency=2 * settings.server.max_connections,
            backlog=settings.server.max_connections,
            ssl_certfile=settings.server.tls_cert,
            ssl_keyfile=settings.server.tls_key,
            proxy_headers=False,
            server_header=False,
            date_header=False,  # the app sends Date on every response itself
            access_log=False,  # the app logs requests without query strings (hub.access)
            log_config=_log_config(),  # applied in every worker process
        )

    _run(debug, body)


def _log_config() -> dict[str, Any]:
    """uvicorn's logging config plus the hub's loggers, one line per event on stderr."""
    import uvicorn.config

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["hub"] = {"()": "hub.app.LineFormatter"}
    config["handlers"]["hub"] = {
        "formatter": "hub",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
    }
    config["loggers"]["hub"] = {"handlers": ["hub"], "level": "INFO", "propagate": False}
    return config


# -- nodes ------------------------------------------------------------------------------


@nodes_app.command("add")
def nodes_add(
    node_id: Annotated[
        str, typer.Argument(help="The node's id: node.id in its agent config (e.g. FAC-0001).")
    ],
    public_key: Annotated[
        Path,
        typer.Option("--public-key", help="SPKI PEM from `sepas-agent keys show` on the node."),
    ],
    config: ConfigOpt = None,
    store: StoreOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Register a node's public key; a second one while the node rotates keys.

    A node has at most two active keys: a third retires the oldest.

    Adding a key to a revoked node makes it active again with that key.

    Example: sepas-hub nodes add FAC-0001 --public-key FAC-0001.pub
    """

    def body() -> None:
        if not _NODE_ID_RE.fullmatch(node_id):
            raise typer.BadParameter(
                "must be 1 to 64 letters, digits, '.', '_' or '-' (the agent's node.id)",
                param_hint="NODE_ID",
            )
        pem = _read_public_key(public_key)
        fp = fingerprint(load_public_key_pem(pem))
        settings = load(config, store)
        with _store(settings) as hub_store:
            before = _active_fingerprints(hub_store.node(node_id))
            if fp in before:
                err.print(f"{node_id} already has key {fp} (active)", markup=False)
                return
            hub_store.add_node_key(node_id, pem, fp)
            after = _active_fingerprints(hub_store.node(node_id))
        out.print(f"added key {fp} for {node_id} ({len(after)} active)", markup=False)
        for retired in sorted(before - after):
            err.print(
                f"retired key {retired}: a node has at most {MAX_ACTIVE_KEYS} active keys",
                markup=False,
            )

    _run(debug, body)


def _active_fingerprints(info: NodeInfo | None) -> set[str]:
    return set() if info is None else {k.fingerprint for k in info.keys if k.revoked_at is None}


def _read_public_key(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise KeyFileError(
            f"Cannot read {path}: {e.strerror or e}.",
            hint="Save the output of `sepas-agent keys show` on the node to a file.",
        ) from None
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path} is too large to be a public key.")
    return data


@nodes_app.command("list")
def nodes_list(
    config: ConfigOpt = None,
    store: StoreOpt = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """List nodes: status, keys, records held, last batch, and the last heartbeat.

    Example: sepas-hub nodes list --json
    """

    def body() -> None:
        settings = load(config, store)
        with _store(settings) as hub_store:
            infos = hub_store.nodes()
        now = time.time()
        if json_out:
            sys.stdout.write(json.dumps([_node_json(i) for i in infos], indent=2) + "\n")
            return
        table = Table(
            "node",
            "status",
            "keys",
            "records",
            "last batch",
            "last heartbeat",
            "pending",
            "oldest pending",
            "dead",
            "clock skew",
            "version",
        )
        for info in infos:
            hb = info.heartbeat or {}
            keys = "\n".join(k.fingerprint for k in info.keys if k.revoked_at is None) or "-"
            table.add_row(
                info.node_id,
                info.status,
                keys,
                str(info.records),
                _ago(now, info.last_batch_at),
                _ago(now, info.heartbeat_at),
                _num(hb.get("pending")),
                _secs(hb.get("oldest_pending_age_s")),
                _num(hb.get("dead")),
                _secs(hb.get("clock_skew_s"), signed=True),
                str(hb.get("version", "-")),
            )
        # A pipe gets 80 columns by default, too few for this table: do not truncate.
        wide = Console(highlight=False, width=None if out.is_terminal else 200)
        wide.print(table)

    _run(debug, body)


def _node_json(info: NodeInfo) -> dict[str, Any]:
    def iso(ts: float | None) -> str | None:
        return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()

    return {
        "node_id": info.node_id,
        "status": info.status,
        "keys": [
            {
                "fingerprint": k.fingerprint,
                "added_at": iso(k.added_at),
                "revoked_at": iso(k.revoked_at),
            }
            for k in info.keys
        ],
        "records": info.records,
        "last_batch_at": iso(info.last_batch_at),
        "heartbeat_at": iso(info.heartbeat_at),
        "heartbeat": info.heartbeat,
    }


def _ago(now: float, ts: float | None) -> str:
    return "-" if ts is None else _secs(now - ts) + " ago"


def _num(value: object) -> str:
    return "-" if value is None else str(value)


def _secs(value: object, *, signed: bool = False) -> str:
    if not isinstance(value, int | float):
        return "-"
    sign = ("+" if value >= 0 else "-") if signed else ""
    v = abs(value)
    if v < 120:
        return f"{sign}{v:.0f}s"
    if v < 7200:
        return f"{sign}{v / 60:.0f}m"
    if v < 172_800:
        return f"{sign}{v / 3600:.0f}h"
    return f"{sign}{v / 86_400:.0f}d"


@nodes_app.command("revoke")
def nodes_revoke(
    node_id: Annotated[str, typer.Argument(help="The node whose keys to revoke.")],
    config: ConfigOpt = None,
    store: StoreOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Revoke every key of a node: its requests are refused (401 key-revoked) at once.

    Records it uploaded stay. `nodes add` with a key makes it active again.

    Example: sepas-hub nodes revoke FAC-0001
    """

    def body() -> None:
        settings = load(config, store)
        with _store(settings) as hub_store:
            known = hub_store.revoke_node(node_id)
        if not known:
            raise SepasError(
                f"No node {node_id} is registered.", hint="See `sepas-hub nodes list`."
            )
        out.print(f"revoked every key of {node_id}", markup=False)

    _run(debug, body)


def main() -> None:
    """Console script entry point."""
    app()
