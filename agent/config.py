"""The agent's configuration: pydantic models, loading, and the effective-config view.

Responsibility: turn one TOML file into one frozen, fully validated `AgentConfig`, or
into one `ConfigError` that lists every problem found (file, key path, readable
sentence). Defaults live only in the models below; `config/agent.example.toml`
shows each of them and a test keeps the two in step.

This module never imports ``adapters/``: each adapter package owns the settings model
of its kind and the caller passes the registry (``adapters.KINDS``) to `load_config`,
which builds the ``[[adapters]]`` discriminated union from it (`config_model`).

Invariants:
- Unknown keys are errors, everywhere (``extra="forbid"``); models are frozen.
- Relative paths in a file are relative to that file's directory, so a config means
  the same thing whatever the working directory of the process reading it.
- Loading never creates anything on disk; it only checks that ``node.data_dir``
  could be created.
- `render_effective` never prints a secret: SecretStr values and URL passwords are
  masked.
"""

from __future__ import annotations

import codecs
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Mapping, Sequence
from datetime import timedelta
from enum import Enum
from functools import lru_cache
from pathlib import Path, PurePath
from typing import Annotated, Any, Final, Literal, Union, cast
from urllib.parse import SplitResult, urlsplit, urlunsplit

import tomli_w
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretBytes,
    SecretStr,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from agent.errors import ConfigError, ConfigProblem

__all__ = [
    "CONFIG_ENV",
    "DATA_DIR_ENV",
    "DEFAULT_CONFIG_PATH",
    "MASK",
    "AdapterSettings",
    "AgentConfig",
    "AlertSettings",
    "BufferSettings",
    "CodecName",
    "ConfigModel",
    "Duration",
    "HubSettings",
    "ListenAddress",
    "NodeSettings",
    "TelemetrySettings",
    "config_model",
    "field_problems",
    "format_duration",
    "load_config",
    "mask_url_password",
    "parse_duration",
    "render_effective",
    "resolve_config_path",
    "split_host_port",
]

CONFIG_ENV: Final = "SEPAS_AGENT_CONFIG"
#: Replaces ``node.data_dir`` when set: for demos, tests and containers, where the
#: same config file is used with a throw-away or mounted data directory.
DATA_DIR_ENV: Final = "SEPAS_AGENT_DATA_DIR"
DEFAULT_CONFIG_PATH: Final = Path("/etc/sepas-agent/agent.toml")
MASK: Final = "********"

MiB: Final = 1024 * 1024
_BASE_DIR: Final = "sepas_config_base_dir"
_PROBLEMS: Final = "sepas_problems"


# --------------------------------------------------------------------------- helpers


def field_problems(*problems: tuple[str | tuple[str | int, ...], str]) -> PydanticCustomError:
    """An error for a model validator that blames specific keys of its model.

    A model validator's error is otherwise reported at the model's own key (``hub``);
    this lets it say ``hub.url`` instead, and report several keys at once. Keys are
    relative to the model: a dotted string (``"peer.port"``) or a loc tuple
    (``("adapters", 2, "name")``).

    Usage: ``raise field_problems(("tls_key", "must be set together with tls_cert"))``.
    """
    locs = tuple(
        (tuple(key.split(".")) if isinstance(key, str) else key, message)
        for key, message in problems
    )
    summary = "; ".join(f"{_render_key(loc)}: {msg}" for loc, msg in locs)
    return PydanticCustomError(_PROBLEMS, "{summary}", {"summary": summary, "problems": locs})


def _show(value: object) -> str:
    """A short, secret-free rendering of a user-supplied value for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = repr(mask_url_password(value))
        return text if len(text) <= 80 else text[:76] + "...'"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    return str(value)


# ------------------------------------------------------------------------- Duration

_DURATION_RE: Final = re.compile(
    r"(?:(?P<d>\d+)d)?\s*(?:(?P<h>\d+)h)?\s*(?:(?P<m>\d+)m)?\s*(?:(?P<s>\d+(?:\.\d+)?)s)?"
)
_DURATION_FORMS: Final = "'30s', '5m', '1h', '2d', '1h30m', or a number of seconds"


def parse_duration(value: object) -> timedelta:
    """Parse ``"30s"``, ``"5m"``, ``"1h"``, ``"2d"``, ``"1h30m"`` or a number of seconds.

    Units must come in the order d, h, m, s; only seconds may have a fraction. The
    result is always longer than zero: every duration in the config is an interval
    or a threshold, and zero would mean a busy loop or an alarm that always fires.

    Raises:
        ValueError: with a message that lists the accepted forms.
    """
    if isinstance(value, timedelta):
        td = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            td = timedelta(seconds=value)
        except (OverflowError, ValueError):
            raise ValueError(f"duration {_show(value)} is out of range") from None
    elif isinstance(value, str):
        m = _DURATION_RE.fullmatch(value.strip())
        if m is None or not any(m.groupdict().values()):
            raise ValueError(f"expected a duration such as {_DURATION_FORMS}, got {_show(value)}")
        try:
            td = timedelta(
                days=int(m["d"] or 0),
                hours=int(m["h"] or 0),
                minutes=int(m["m"] or 0),
                seconds=float(m["s"] or 0),
            )
        except (OverflowError, ValueError):
            raise ValueError(f"duration {_show(value)} is out of range") from None
    else:
        raise ValueError(f"expected a duration such as {_DURATION_FORMS}, got {_show(value)}")
    if td <= timedelta(0):
        raise ValueError(f"must be longer than zero, got {_show(value)}")
    return td


def format_duration(td: timedelta) -> str:
    """The inverse of `parse_duration`: ``timedelta(minutes=90)`` -> ``"1h30m"``."""
    micros = td // timedelta(microseconds=1)
    sign = "-" if micros < 0 else ""
    micros = abs(micros)
    secs, frac = divmod(micros, 1_000_000)
    days, secs = divmod(secs, 86_400)
    hours, secs = divmod(secs, 3_600)
    minutes, secs = divmod(secs, 60)
    out = "".join(f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n)
    if frac:
        out += f"{secs}.{frac:06d}".rstrip("0") + "s"
    elif secs or not out:
        out += f"{secs}s"
    return sign + out


#: A positive time interval, written ``"30s"``, ``"5m"``, ``"1h30m"``, ``"2d"`` or as a
#: number of seconds; a `datetime.timedelta` in Python, the short form in JSON/TOML.
Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
]


# ------------------------------------------------------------------- listen address

_HOSTNAME_RE: Final = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def split_host_port(value: str) -> tuple[str, int]:
    """Split ``"host:port"`` (IPv6 as ``"[::1]:9466"``) into host and port.

    Port 0 is allowed (the OS picks a free port), which tests rely on.

    Raises:
        ValueError: when it is not a valid host:port.
    """
    error = ValueError(
        f"expected 'host:port' (an IPv6 address in brackets, '[::1]:9466'), got {_show(value)}"
    )
    if not isinstance(value, str):
        raise error
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
    if ":" in host:  # an unbracketed IPv6 address: its last group would read as the port
        raise error
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not _HOSTNAME_RE.fullmatch(host):
            raise error from None
    return host, port


def _check_listen(value: str) -> str:
    split_host_port(value)
    return value


#: Where a server binds: ``"host:port"``; IPv6 as ``"[::1]:9466"``. Kept as written.
ListenAddress = Annotated[str, AfterValidator(_check_listen)]


def _listen_clash(a: str, b: str) -> bool:
    """Would binding both addresses fail? A wildcard clashes with its own family."""
    (host_a, port_a), (host_b, port_b) = split_host_port(a), split_host_port(b)
    if port_a != port_b or port_a == 0:
        return False

    def family(host: str) -> tuple[int | None, bool]:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None, False
        return ip.version, ip.is_unspecified

    (fam_a, any_a), (fam_b, any_b) = family(host_a), family(host_b)
    if host_a == host_b:
        return True
    if fam_a is not None and fam_a == fam_b:
        return any_a or any_b or ipaddress.ip_address(host_a) == ipaddress.ip_address(host_b)
    return False


# ----------------------------------------------------------------------- codec name


def _check_codec(value: str) -> str:
    try:
        info = codecs.lookup(value)
    except LookupError:
        raise ValueError(
            f"unknown text encoding {_show(value)}; use a Python codec name such as "
            "'cp1256', 'utf-8' or 'iso8859_6'"
        ) from None
    if info.name.startswith(("utf-16", "utf-32")):
        # HL7 v2 and SQL text are byte-oriented; a 2- or 4-byte codec cannot be right.
        raise ValueError(f"{_show(value)} is not a byte-oriented encoding")
    return value


#: A Python codec name (``"cp1256"``, ``"utf-8"``), checked with `codecs.lookup`.
CodecName = Annotated[str, AfterValidator(_check_codec)]


# ------------------------------------------------------------------------- the base


class ConfigModel(BaseModel):
    """Base of every config model: unknown keys refused, frozen, relative paths resolved.

    Subclass it for sub-tables of adapter settings (e.g. a peer) so they get the same
    rules.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="after")
    @classmethod
    def _resolve_relative_path(cls, value: Any, info: ValidationInfo) -> Any:
        # Only `load_config` passes a base directory; models built in code keep what
        # they were given.
        base = (info.context or {}).get(_BASE_DIR)
        if base is not None and isinstance(value, Path) and not value.is_absolute():
            return base / value
        return value

    def derived_values(self) -> Mapping[str, object]:
        """Values `render_effective` shows for optional fields computed from others.

        A field left unset (None) whose effective value derives from other settings
        (e.g. ``node.key_file`` from ``node.data_dir``) is shown with that value, so
        the operator sees what the agent will use.
        """
        return {}


def _check_pattern(pattern: str, what: str) -> AfterValidator:
    regex = re.compile(pattern)

    def check(value: str) -> str:
        if not regex.fullmatch(value):
            raise ValueError(f"must be {what}, got {_show(value)}")
        return value

    return AfterValidator(check)


NodeId = Annotated[
    str,
    _check_pattern(
        r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}",
        "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit",
    ),
]
AdapterName = Annotated[
    str,
    _check_pattern(
        r"[a-z0-9][a-z0-9_-]{0,31}",
        "1 to 32 lower-case letters, digits, '_' or '-', starting with a letter or digit",
    ),
]


# ------------------------------------------------------------------------- sections


class NodeSettings(ConfigModel):
    """``[node]``: who this node is and where it keeps its state."""

    id: NodeId  # the node id the hub knows (the signature's keyid), e.g. "FAC-0001"
    siam_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    data_dir: Path = Path("/var/lib/sepas-agent")  # buffer.db, blobs/, keys
    key_file: Path | None = None  # Ed25519 private key; default data_dir/node.key

    @property
    def key_path(self) -> Path:
        """The node's private key file: ``key_file``, else ``data_dir/node.key``."""
        return self.key_file if self.key_file is not None else self.data_dir / "node.key"

    def derived_values(self) -> Mapping[str, object]:
        return {"key_file": self.key_path}


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HubSettings(ConfigModel):
    """``[hub]``: where records go and how the uploader talks to it."""

    url: str = "https://hub.example/"
    # PROTOCOL.md: a hub takes at most 5,000 records and 16 MiB per batch by default.
    batch_max_records: Annotated[int, Field(ge=1, le=5000)] = 500
    batch_max_bytes: Annotated[int, Field(ge=1024, le=16 * MiB)] = 4_000_000
    timeout_secs: Annotated[float, Field(gt=0)] = 30.0
    ca_bundle: Path | None = None  # PEM CAs to trust instead of the system's
    client_cert: Path | None = None  # PEM client certificate (may also hold the key)
    client_key: Path | None = None  # PEM key for client_cert, when not in that file
    allow_insecure: bool = False  # permit plain http to a non-loopback hub
    blob_rate_limit: Annotated[int, Field(ge=1024)] | None = None  # bytes/s; None: no limit
    backoff_max_secs: Annotated[float, Field(gt=0)] = 300.0
    lease_secs: Annotated[float, Field(gt=0)] = 120.0

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        bad = ValueError(f"expected an http:// or https:// URL, got {_show(value)}")
        try:
            parts = urlsplit(value)
            _ = parts.port  # raises on a non-numeric or out-of-range port
        except ValueError:
            raise bad from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise bad
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry credentials: nodes authenticate by signature")
        return value

    @model_validator(mode="after")
    def _check_transport(self) -> HubSettings:
        problems: list[tuple[str, str]] = []
        parts = urlsplit(self.url)
        if (
            parts.scheme == "http"
            and not self.allow_insecure
            and not _is_loopback(parts.hostname or "")
        ):
            problems.append(
                (
                    "url",
                    "plain http is refused for a non-loopback hub (records would cross the "
                    "network unencrypted); use https, or set hub.allow_insecure = true",
                )
            )
        if self.client_key is not None and self.client_cert is None:
            problems.append(("client_key", "is set without hub.client_cert"))
        if self.lease_secs <= self.timeout_secs:
            # A lease that can expire while its upload is still waiting for the hub
            # lets a second upload send the same records.
            problems.append(
                ("lease_secs", f"must be longer than hub.timeout_secs ({self.timeout_secs:g})")
            )
        if problems:
            raise field_problems(*problems)
        return self


class BufferSettings(ConfigModel):
    """``[buffer]``: the local SQLite store between adapters and uploader."""

    max_bytes: Annotated[int, Field(ge=MiB)] = 20_000_000_000  # past it intake refuses
    retention_days: Annotated[int, Field(ge=1)] = 30  # sent records are pruned after this
    encrypt: bool = True  # encrypt raw payloads and blobs at rest
    key_file: Path | None = None  # default data_dir/buffer.key

    def key_path(self, data_dir: Path) -> Path:
        """The buffer's encryption key file: ``key_file``, else ``data_dir/buffer.key``."""
        return self.key_file if self.key_file is not None else data_dir / "buffer.key"


class TelemetrySettings(ConfigModel):
    """``[telemetry]``: logs, and the /healthz and /metrics listener."""

    listen: ListenAddress = "127.0.0.1:9466"
    log_format: Literal["auto", "json", "text"] = "auto"  # auto: text on a terminal
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class AlertSettings(ConfigModel):
    """``[alerts]``: thresholds for ``sepas-agent status --check`` (0 OK, 1 WARN, 2 CRIT).

    A ``*_crit`` of None never raises CRITICAL for that measure.
    """

    oldest_pending_warn: Duration = timedelta(hours=1)
    oldest_pending_crit: Duration = timedelta(hours=6)
    capacity_warn_percent: Annotated[int, Field(ge=1, le=100)] = 80
    capacity_crit_percent: Annotated[int, Field(ge=1, le=100)] = 95
    dead_warn: Annotated[int, Field(ge=1)] = 1
    dead_crit: Annotated[int, Field(ge=1)] | None = None
    quarantine_warn: Annotated[int, Field(ge=1)] = 1
    quarantine_crit: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _check_order(self) -> AlertSettings:
        pairs: tuple[tuple[str, str, Any, Any], ...] = (
            (
                "oldest_pending_warn",
                "oldest_pending_crit",
                self.oldest_pending_warn,
                self.oldest_pending_crit,
            ),
            (
                "capacity_warn_percent",
                "capacity_crit_percent",
                self.capacity_warn_percent,
                self.capacity_crit_percent,
            ),
            ("dead_warn", "dead_crit", self.dead_warn, self.dead_crit),
            ("quarantine_warn", "quarantine_crit", self.quarantine_warn, self.quarantine_crit),
        )
        problems = [
            (warn_key, f"must not exceed alerts.{crit_key}")
            for warn_key, crit_key, warn, crit in pairs
            if crit is not None and warn > crit
        ]
        if problems:
            raise field_problems(*problems)
        return self


class AdapterSettings(ConfigModel):
    """Common keys of every ``[[adapters]]`` entry; each kind subclasses it.

    A subclass sets ``kind: Literal["<kind>"]`` (the discriminator) and adds its own
    options. One that accepts connections names its bind address ``listen`` so that
    clashes between adapters are found at load time.
    """

    name: AdapterName  # the role, e.g. "lis"; unique; appears in records and metrics
    kind: str
    enabled: bool = True  # false: keep the entry but do not start it


class AgentConfig(ConfigModel):
    """The whole file. Use `config_model` for the variant that knows the adapter kinds."""

    node: NodeSettings
    hub: HubSettings = HubSettings()
    buffer: BufferSettings = BufferSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    alerts: AlertSettings = AlertSettings()
    adapters: tuple[AdapterSettings, ...] = ()

    @property
    def buffer_key_path(self) -> Path:
        """The buffer's encryption key file, with its default under ``node.data_dir``."""
        return self.buffer.key_path(self.node.data_dir)

    @field_validator("adapters", mode="after")
    @classmethod
    def _check_unique_names(
        cls, adapters: tuple[AdapterSettings, ...]
    ) -> tuple[AdapterSettings, ...]:
        first: dict[str, int] = {}
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for i, adapter in enumerate(adapters):
            if adapter.name in first:
                j = first[adapter.name]
                problems.append(((i, "name"), f"{adapter.name!r} is already used by adapters[{j}]"))
            else:
                first[adapter.name] = i
        if problems:
            raise field_problems(*problems)
        return adapters

    @model_validator(mode="after")
    def _check_listen_clashes(self) -> AgentConfig:
        bound: list[tuple[str, str]] = [("telemetry.listen", self.telemetry.listen)]
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for i, adapter in enumerate(self.adapters):
            listen = getattr(adapter, "listen", None)
            if not adapter.enabled or not isinstance(listen, str):
                continue
            for where, other in bound:
                if _listen_clash(listen, other):
                    problems.append(
                        (("adapters", i, "listen"), f"{listen!r} clashes with {where} ({other!r})")
                    )
                    break
            bound.append((f"adapters[{i}] ({adapter.name})", listen))
        if problems:
            raise field_problems(*problems)
        return self


# --------------------------------------------------------------------- the registry


def config_model(kinds: Mapping[str, type[AdapterSettings]]) -> type[AgentConfig]:
    """The `AgentConfig` subclass whose ``adapters`` is a union over ``kinds``.

    ``[[adapters]]`` entries are told apart by their ``kind`` key (a pydantic
    discriminated union), so an error names the right kind's field. Built once per
    registry.

    Raises:
        TypeError: when a registry key differs from its model's ``kind`` literal
            (a programming error, not a config one).
    """
    for key, model in kinds.items():
        field = model.model_fields.get("kind")
        values = getattr(field.annotation, "__args__", ()) if field is not None else ()
        if tuple(values) != (key,):
            raise TypeError(f"{model.__name__}.kind must be Literal[{key!r}] to register it so")
    return _config_model(tuple(sorted(kinds.items())))


@lru_cache(maxsize=16)
def _config_model(kinds: tuple[tuple[str, type[AdapterSettings]], ...]) -> type[AgentConfig]:
    if not kinds:
        return AgentConfig
    # Built at run time from the registry, so typed as Any: no static type exists.
    members: Any = tuple(model for _, model in kinds)
    union: Any = Annotated[Union[members], Field(discriminator="kind")]  # noqa: UP007
    return create_model(
        "AgentConfig",
        __base__=AgentConfig,
        __module__=__name__,
        adapters=(tuple[union, ...], ()),
    )


# -------------------------------------------------------------------------- loading


def resolve_config_path(cli_value: Path | None) -> Path:
    """Which config file to read: ``--config``, else ``$SEPAS_AGENT_CONFIG``, else
    ``/etc/sepas-agent/agent.toml``."""
    if cli_value is not None:
        return cli_value
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_config(path: Path, kinds: Mapping[str, type[AdapterSettings]]) -> AgentConfig:
    """Read, validate and return the config at ``path``.

    ``$SEPAS_AGENT_DATA_DIR``, when set, replaces ``node.data_dir``. Relative paths in
    the file are taken relative to the file's directory.

    Raises:
        ConfigError: listing every problem found (missing or unreadable file, TOML
            syntax, unknown keys, wrong values, unknown adapter kinds, duplicate
            adapter names, clashing listen addresses, an unusable data_dir).
    """
    model = config_model(kinds)
    data = _read_toml(path)
    env_dir = os.environ.get(DATA_DIR_ENV)
    if env_dir and isinstance(data.get("node"), dict):
        data["node"]["data_dir"] = Path(env_dir).absolute()
    try:
        cfg = model.model_validate(data, context={_BASE_DIR: path.absolute().parent})
    except ValidationError as err:
        raise ConfigError(str(path), _problems(err, {k for k, _ in kinds.items()})) from err
    reason = _data_dir_problem(cfg.node.data_dir)
    if reason is not None:
        if env_dir:
            reason += f" (set by ${DATA_DIR_ENV})"
        raise ConfigError(str(path), [ConfigProblem("node.data_dir", reason)])
    return cfg


def _read_toml(path: Path) -> dict[str, Any]:
    def fail(problem: str) -> ConfigError:
        return ConfigError(str(path), [ConfigProblem("", problem)])

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise fail(f"file not found (give --config PATH or set ${CONFIG_ENV})") from None
    except IsADirectoryError:
        raise fail("is a directory, not a config file") from None
    except PermissionError:
        raise fail("cannot be read: permission denied") from None
    except OSError as err:
        raise fail(f"cannot be read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise fail(f"is not UTF-8 text (byte {err.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise fail(f"not valid TOML: {err}") from None


def _data_dir_problem(data_dir: Path) -> str | None:
    """Why ``data_dir`` cannot be used, or None. Creates nothing."""
    probe = data_dir
    while True:
        try:
            st = os.stat(probe)
        except FileNotFoundError:
            if probe.is_symlink():
                return f"cannot be created: {probe} is a broken symbolic link"
        except NotADirectoryError:
            pass  # an ancestor is a file; found when the walk reaches it
        except PermissionError:
            return f"cannot be checked: permission denied looking up {probe}"
        except OSError as err:
            return f"cannot be checked: {err.strerror or err} ({probe})"
        else:
            writable = os.access(probe, os.W_OK | os.X_OK)
            if probe == data_dir:
                if not stat.S_ISDIR(st.st_mode):
                    return f"{data_dir} exists and is not a directory"
                return None if writable else f"{data_dir} is not writable by this user"
            if not stat.S_ISDIR(st.st_mode):
                return f"cannot be created: {probe} is not a directory"
            return None if writable else f"cannot be created: {probe} is not writable by this user"
        if probe.parent == probe:
            return f"cannot be created: {probe} does not exist"
        probe = probe.parent


# ------------------------------------------------------------------ error rendering


def _render_key(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_MESSAGES: Final[Mapping[str, str]] = {
    "int_type": "expected an integer, got {got}",
    "int_parsing": "expected an integer, got {got}",
    "int_from_float": "expected a whole number, got {got}",
    "float_type": "expected a number, got {got}",
    "float_parsing": "expected a number, got {got}",
    "finite_number": "expected a finite number, got {got}",
    "bool_type": "expected true or false, got {got}",
    "bool_parsing": "expected true or false, got {got}",
    "string_type": "expected a string, got {got}",
    "path_type": "expected a path (a string), got {got}",
    "list_type": "expected a list, got {got}",
    "tuple_type": "expected a list, got {got}",
    "dict_type": "expected a table, got {got}",
    "model_type": "expected a table, got {got}",
    "model_attributes_type": "expected a table, got {got}",
    "missing": "missing (required)",
    "extra_forbidden": "unknown key",
    "greater_than_equal": "must be at least {ge}, got {got}",
    "greater_than": "must be greater than {gt}, got {got}",
    "less_than_equal": "must be at most {le}, got {got}",
    "less_than": "must be less than {lt}, got {got}",
    "literal_error": "expected one of {expected}, got {got}",
    "enum": "expected one of {expected}, got {got}",
    "string_too_long": "must be at most {max_length} characters, got {got}",
    "string_pattern_mismatch": "must match {pattern}, got {got}",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
}


def _problems(err: ValidationError, kinds: set[str]) -> list[ConfigProblem]:
    expected_kinds = ", ".join(repr(k) for k in sorted(kinds))
    out: list[ConfigProblem] = []
    errors = err.errors(include_url=False)
    item_locs = [e["loc"] for e in errors]
    for e in errors:
        loc = list(e["loc"])
        if e["type"] == "too_short" and any(
            len(other) > len(loc) and list(other[: len(loc)]) == loc for other in item_locs
        ):
            continue  # pydantic counts only valid items: a bad item is reported already
        # pydantic puts the matched kind into the loc (adapters.1.hl7-mllp.listen);
        # the file has no such key.
        if len(loc) >= 3 and loc[0] == "adapters" and isinstance(loc[1], int) and loc[2] in kinds:
            del loc[2]
        ctx = e.get("ctx") or {}
        kind = e["type"]
        if kind == _PROBLEMS:
            out.extend(
                ConfigProblem(_render_key([*loc, *sub]), message)
                for sub, message in ctx["problems"]
            )
            continue
        if kind == "union_tag_invalid":
            out.append(
                ConfigProblem(
                    _render_key([*loc, "kind"]),
                    f"unknown kind {_show(ctx.get('tag'))}; expected one of {expected_kinds}",
                )
            )
            continue
        if kind == "union_tag_not_found":
            out.append(
                ConfigProblem(
                    _render_key([*loc, "kind"]),
                    f"missing (required): one of {expected_kinds}",
                )
            )
            continue
        if kind in ("value_error", "assertion_error"):
            message = str(ctx.get("error", e["msg"]))
        elif kind == "string_too_short":
            n = ctx.get("min_length", 1)
            message = "must not be empty" if n == 1 else f"must be at least {n} characters"
        elif kind in _MESSAGES:
            message = _MESSAGES[kind].format(got=_show(e.get("input")), **ctx)
        else:
            message = f"{e['msg'][:1].lower()}{e['msg'][1:]}, got {_show(e.get('input'))}"
        out.append(ConfigProblem(_render_key(loc), message))
    return out


# -------------------------------------------------------------------- effective view

_PASSWORD_PARAM_RE: Final = re.compile(r"(?i)((?:^|[&;])[^=&;]*(?:password|pwd)[^=&;]*=)[^&;]*")


def mask_url_password(value: str) -> str:
    """``postgresql://u:pw@h/db`` -> ``postgresql://u:********@h/db``.

    Query parameters whose name contains ``password`` or ``pwd`` (ODBC strings) are
    masked too. Anything that is not such a URL is returned unchanged.
    """
    if "://" not in value:
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        if colon:
            netloc = f"{user}:{MASK}@{hostport}"
    query = _PASSWORD_PARAM_RE.sub(lambda m: m.group(1) + MASK, parts.query)
    if netloc == parts.netloc and query == parts.query:
        return value
    return urlunsplit(SplitResult(parts.scheme, netloc, parts.path, query, parts.fragment))


def _plain(value: object) -> object:
    if isinstance(value, ConfigModel):
        return _table(value)
    if isinstance(value, SecretStr | SecretBytes):
        return MASK
    if isinstance(value, timedelta):
        return format_duration(value)
    if isinstance(value, Enum):
        return _plain(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, str):
        return mask_url_password(value)
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    return value


def _table(model: ConfigModel) -> dict[str, object]:
    derived = model.derived_values()
    out: dict[str, object] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if value is None:
            value = derived.get(name)
        if value is not None:  # TOML has no null: an absent key means None
            out[name] = _plain(value)
    return out


def render_effective(cfg: AgentConfig) -> str:
    """The effective config as TOML: defaults filled in, derived paths shown, secrets
    masked. It loads back with `load_config` (masked secrets then read ``********``)."""
    doc = _table(cfg)
    buffer = cast(dict[str, object], doc["buffer"])
    buffer.setdefault("key_file", str(cfg.buffer_key_path))
    return (
        "# Effective configuration: defaults filled in, derived paths shown, secrets masked.\n"
        + tomli_w.dumps(doc, multiline_strings=True)
    )
