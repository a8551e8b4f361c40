"""The hub's configuration: pydantic models, loading, and opening the store it names.

Responsibility: turn one TOML file (``config/hub.example.toml`` shows every option
with its default) into one frozen, validated `HubSettings`, or into one `ConfigError`
that lists every problem found with its key path, like the agent's config. Only the
command layer (`hub.cli`) and the ASGI factory (`hub.app.app_from_env`) read config;
the rest of the hub receives typed values.

This module deliberately does not import ``agent.config`` (STYLE.md 3.2: the hub
imports only ``agent.wire``, ``agent.record`` and ``agent.errors``); its loader is a
small local one with the same rules.

Invariants:
- Unknown keys are errors, everywhere (``extra="forbid"``); models are frozen.
- Relative paths in a file (``blob_dir``, TLS files, a relative ``sqlite:`` URL) are
  relative to that file's directory.
- ``limits.idempotency_ttl_days`` is at least 7: PROTOCOL.md promises nodes that an
  Idempotency-Key is remembered that long.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import ConfigError, ConfigProblem

if TYPE_CHECKING:
    from hub.store import HubStore

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "SETTINGS_ENV",
    "HubSettings",
    "LimitSettings",
    "ServerSettings",
    "StoreSettings",
    "load_settings",
    "open_store",
    "resolve_config_path",
    "split_host_port",
    "sqlite_path",
]

CONFIG_ENV: Final = "SEPAS_HUB_CONFIG"
#: Set by ``sepas-hub serve`` for its uvicorn workers: the effective settings as JSON
#: (the file with the command line's overrides applied). Not meant for operators.
SETTINGS_ENV: Final = "SEPAS_HUB_SETTINGS"
DEFAULT_CONFIG_PATH: Final = Path("/etc/sepas-hub/hub.toml")

KiB: Final = 1024
MiB: Final = 1024 * 1024

_BASE_DIR: Final = "sepas_config_base_dir"
_HOSTNAME_RE: Final = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def split_host_port(value: str) -> tuple[str, int]:
    """Split ``"host:port"`` (IPv6 as ``"[::1]:8080"``) into host and port.

    Raises:
        ValueError: when it is not a valid host:port (port 0..65535).
    """
    error = ValueError(f"expected 'host:port' (IPv6 in brackets, '[::1]:8080'), got {value!r}")
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isascii() or not port_text.isdigit():
        raise error
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise error from None
        return host[1:-1], port
    if ":" in host:
        raise error
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not _HOSTNAME_RE.fullmatch(host):
            raise error from None
    return host, port


def sqlite_path(url: str) -> Path:
    """The file a ``sqlite:`` store URL names.

    ``sqlite:///var/lib/sepas-hub/hub.db`` is the absolute path
    ``/var/lib/sepas-hub/hub.db`` (the part after ``sqlite://`` is the path; unlike
    SQLAlchemy, three slashes mean absolute); ``sqlite:hub.db`` is relative.

    Raises:
        ValueError: not a ``sqlite:`` URL, or it names no file.
    """
    if not url.startswith("sqlite:"):
        raise ValueError(f"not a sqlite: URL: {url!r}")
    rest = url[len("sqlite:") :]
    if rest.startswith("//"):
        rest = rest[2:]  # the empty authority of sqlite:///path
        if not rest.startswith("/"):
            raise ValueError("expected sqlite:///ABSOLUTE/PATH or sqlite:RELATIVE/PATH")
    if not rest or rest.endswith("/") or "?" in rest or "#" in rest:
        raise ValueError("expected sqlite:///ABSOLUTE/PATH or sqlite:RELATIVE/PATH")
    return Path(rest)


def _is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_store(url: str) -> HubStore:
    """Open the store a URL names: ``sqlite:...`` or ``postgresql://...``.

    The PostgreSQL store (psycopg) is imported only when asked for, so a SQLite hub
    does not need the ``postgres`` extra installed.

    Raises:
        ConfigError: the URL names no store this hub knows, or psycopg is missing.
    """
    if url.startswith("sqlite:"):
        from hub.store_sqlite import SqliteStore

        try:
            path = sqlite_path(url)
        except ValueError as err:
            raise ConfigError("store.url", [ConfigProblem("store.url", str(err))]) from None
        return SqliteStore(path)
    if _is_postgres(url):
        try:
            from hub.store_pg import PostgresStore
        except ImportError as err:
            raise ConfigError(
                "store.url",
                [ConfigProblem("store.url", f"PostgreSQL support is not installed ({err.name})")],
                hint="Install the extra: pip install 'sepas-agent[postgres]'.",
            ) from None
        return PostgresStore(url)
    raise ConfigError(
        "store.url",
        [ConfigProblem("store.url", "expected sqlite:///PATH or postgresql://...")],
    )


# --------------------------------------------------------------------------- models


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="after")
    @classmethod
    def _resolve_relative_path(cls, value: Any, info: Any) -> Any:
        base = (info.context or {}).get(_BASE_DIR)
        if base is not None and isinstance(value, Path) and not value.is_absolute():
            return base / value
        return value


class ServerSettings(_Model):
    """``[server]``: where and how ``sepas-hub serve`` listens."""

    # Loopback by default: binding to a public address is a deliberate choice.
    listen: str = "127.0.0.1:8080"
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    # Requests processed at once per worker, past it 503; also the listen backlog.
    # uvicorn's --limit-concurrency (connections, idle ones too) is set to twice this.
    max_connections: Annotated[int, Field(ge=1)] = 1000
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, serve https
    tls_key: Path | None = None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        split_host_port(value)
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        return self


class StoreSettings(_Model):
    """``[store]``: where records, keys and idempotency entries live, and blobs."""

    url: str = "sqlite:///var/lib/sepas-hub/hub.db"
    blob_dir: Path = Path("/var/lib/sepas-hub/blobs")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str, info: Any) -> str:
        if value.startswith("sqlite:"):
            path = sqlite_path(value)
            base = (info.context or {}).get(_BASE_DIR)
            if base is not None and not path.is_absolute():
                return f"sqlite://{base / path}"
            return value
        if _is_postgres(value):
            return value
        raise ValueError("expected sqlite:///PATH or postgresql://USER@HOST/DB")


class LimitSettings(_Model):
    """``[limits]``: PROTOCOL.md's bounds, each configurable at the hub."""

    max_body_bytes: Annotated[int, Field(ge=KiB)] = 16 * MiB  # on the wire; past it 413
    max_decompressed_bytes: Annotated[int, Field(ge=KiB)] = 64 * MiB  # past it 413
    max_records_per_batch: Annotated[int, Field(ge=1)] = 5000  # past it 413
    max_skew_secs: Annotated[float, Field(gt=0, le=3600)] = 300.0  # |created - now|
    idempotency_ttl_days: Annotated[int, Field(ge=7)] = 7  # PROTOCOL.md: at least 7
    max_reconcile_days: Annotated[int, Field(ge=1, le=366)] = 62


class HubSettings(_Model):
    """The whole hub config file."""

    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    limits: LimitSettings = LimitSettings()


# -------------------------------------------------------------------------- loading


def resolve_config_path(cli_value: Path | None) -> Path:
    """``--config``, else ``$SEPAS_HUB_CONFIG``, else ``/etc/sepas-hub/hub.toml``."""
    if cli_value is not None:
        return cli_value
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_settings(path: Path) -> HubSettings:
    """Read and validate the hub config at ``path``.

    Raises:
        ConfigError: listing every problem (missing or unreadable file, TOML syntax,
            unknown keys, wrong values), each with its key path.
    """

    def fail(problem: str) -> ConfigError:
        return ConfigError(str(path), [ConfigProblem("", problem)], hint=_HINT)

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise fail(f"file not found (give --config PATH or set ${CONFIG_ENV})") from None
    except IsADirectoryError:
        raise fail("is a directory, not a config file") from None
    except OSError as err:
        raise fail(f"cannot be read: {err.strerror or err}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise fail(f"is not UTF-8 text (byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise fail(f"not valid TOML: {err}") from None
    return validate_settings(data, source=str(path), base_dir=path.absolute().parent)


def validate_settings(
    data: dict[str, Any], *, source: str = "<settings>", base_dir: Path | None = None
) -> HubSettings:
    """Validate already-parsed settings (a TOML table, or JSON from ``serve``).

    Raises:
        ConfigError: listing every problem with its key path.
    """
    context = {_BASE_DIR: base_dir} if base_dir is not None else None
    try:
        return HubSettings.model_validate(data, context=context)
    except ValidationError as err:
        raise ConfigError(source, _problems(err), hint=_HINT) from None


_HINT: Final = "Fix the listed keys; config/hub.example.toml shows every option."


def _problems(err: ValidationError) -> list[ConfigProblem]:
    out = []
    for e in err.errors(include_url=False):
        key = ".".join(str(part) for part in e["loc"])
        kind = e["type"]
        if kind == "extra_forbidden":
            message = "unknown key"
        elif kind == "missing":
            message = "missing (required)"
        elif kind == "value_error":
            message = str((e.get("ctx") or {}).get("error", e["msg"]))
        else:
            message = f"{e['msg'][:1].lower()}{e['msg'][1:]}"
            got = e.get("input")
            if isinstance(got, int | float | bool) or (isinstance(got, str) and len(got) < 80):
                message += f", got {got!r}"
        out.append(ConfigProblem(key, message))
    return out
