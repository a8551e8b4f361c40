"""Config loading: the example file, every error path, masking, and the Duration type."""

from __future__ import annotations

import contextlib
import os
import re
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Literal, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, SecretStr

from adapters import KINDS
from agent.config import (
    CONFIG_ENV,
    DATA_DIR_ENV,
    DEFAULT_CONFIG_PATH,
    MASK,
    AdapterSettings,
    AgentConfig,
    ConfigModel,
    config_model,
    format_duration,
    load_config,
    parse_duration,
    render_effective,
    resolve_config_path,
    split_host_port,
)
from agent.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "config" / "agent.example.toml"

NODE = '[node]\nid = "FAC-0001"\n'


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets a writable data_dir through the documented override."""
    path = tmp_path / "data"
    monkeypatch.setenv(DATA_DIR_ENV, str(path))
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    return path


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> AgentConfig:
    return load_config(write(tmp_path, text), KINDS)


def problems_of(tmp_path: Path, text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return {p.key: p.problem for p in info.value.problems}


# ------------------------------------------------------------------ example config


def test_example_config_loads_with_one_adapter_of_each_kind(data_dir: Path) -> None:
    cfg = load_config(EXAMPLE, KINDS)

    assert cfg.node.id == "FAC-0001"
    assert cfg.node.data_dir == data_dir
    assert [(a.name, a.kind) for a in cfg.adapters] == [
        ("his", "hl7-mllp"),
        ("lis", "hl7-mllp"),
        ("lis-files", "hl7-files"),
        ("his-db", "sql"),
        ("pacs", "dicom"),
    ]
    assert {a.kind for a in cfg.adapters} == set(KINDS)


def test_example_config_names_its_data_dir_when_not_overridden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    assert re.search(r'^data_dir = "/var/lib/sepas-agent"$', text, re.MULTILINE)


def _example_keys() -> tuple[dict[str, set[str]], dict[str, dict[str, set[str]]]]:
    """Keys written in the example, commented out or not: by section, and by adapter kind.

    Returns ({"node": {...}, ...}, {"hl7-mllp": {"": {...}, "peer": {...}}, ...}).
    """
    sections: dict[str, set[str]] = {}
    kinds: dict[str, dict[str, set[str]]] = {}
    block: dict[str, set[str]] = {}
    blocks: list[dict[str, set[str]]] = []
    current: set[str] = set()
    in_string = False
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if in_string:  # inside a multi-line string: not TOML syntax
            in_string = line.count('"""') % 2 == 0
            continue
        in_string = line.count('"""') % 2 == 1
        if m := re.fullmatch(r"\[\[adapters\]\]\s*", line):
            block = {"": set()}
            blocks.append(block)
            current = block[""]
        elif m := re.fullmatch(r"\[adapters\.([a-z_]+)\]\s*", line):
            block[""].add(m[1])
            current = block.setdefault(m[1], set())
        elif m := re.fullmatch(r"\[([a-z_]+)\]\s*", line):
            current = sections.setdefault(m[1], set())
        elif m := re.match(r"#?\s?([a-z_][a-z0-9_]*) = \S", line):
            current.add(m[1])
    text = EXAMPLE.read_text(encoding="utf-8")
    kind_order = re.findall(r'^kind = "([a-z0-9-]+)"$', text, re.MULTILINE)
    assert len(kind_order) == len(blocks)
    for kind, keys in zip(kind_order, blocks, strict=True):
        merged = kinds.setdefault(kind, {})
        for sub, names in keys.items():
            merged.setdefault(sub, set()).update(names)
    return sections, kinds


def _field_tree(model: type[BaseModel]) -> dict[str, set[str]]:
    """Field names of a model ("") and of its sub-table models ("peer", ...)."""
    tree = {"": set(model.model_fields)}
    for name, field in model.model_fields.items():
        for candidate in (field.annotation, *get_args(field.annotation)):
            if isinstance(candidate, type) and issubclass(candidate, ConfigModel):
                tree[name] = set(candidate.model_fields)
    return tree


def test_every_model_field_appears_in_the_example_and_nothing_else_does() -> None:
    sections, kinds = _example_keys()

    top = AgentConfig.model_fields
    for section, field in top.items():
        if section == "adapters":
            continue
        assert isinstance(field.annotation, type)
        assert sections.get(section) == set(field.annotation.model_fields), section
    assert set(sections) == set(top) - {"adapters"}

    assert set(kinds) == set(KINDS)
    for kind, model in KINDS.items():
        assert kinds[kind] == _field_tree(model), kind


def test_every_model_refuses_unknown_keys_and_is_frozen() -> None:
    models: list[type[BaseModel]] = [AgentConfig]
    for field in AgentConfig.model_fields.values():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            models.append(field.annotation)
    for kind_model in KINDS.values():
        models.append(kind_model)
        for name in _field_tree(kind_model):
            if name:
                models.append(kind_model.model_fields[name].annotation)  # type: ignore[arg-type]
    for model in models:
        assert model.model_config.get("extra") == "forbid", model
        assert model.model_config.get("frozen") is True, model


def test_registry_keys_match_the_kind_each_model_declares() -> None:
    for kind, model in KINDS.items():
        assert get_args(model.model_fields["kind"].annotation) == (kind,)


def test_config_model_is_built_once_per_registry() -> None:
    assert config_model(KINDS) is config_model(dict(KINDS))


def test_config_model_refuses_a_registry_key_that_differs_from_the_models_kind() -> None:
    class Mislabelled(AdapterSettings):
        kind: Literal["x"]

    with pytest.raises(TypeError, match="Literal"):
        config_model({"y": Mislabelled})


# ----------------------------------------------------------------- error reporting


def test_unknown_key_is_reported_with_its_key_path(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, NODE + "[hub]\nbatch_max_record = 5\n")
    assert problems == {"hub.batch_max_record": "unknown key"}


def test_unknown_section_is_reported(tmp_path: Path) -> None:
    assert problems_of(tmp_path, NODE + "[hubb]\nurl = 'https://x/'\n") == {"hubb": "unknown key"}


def test_unknown_key_in_an_adapter_names_its_index_not_its_kind(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        NODE
        + """
        [[adapters]]
        name = "his"
        kind = "hl7-mllp"
        listen = "0.0.0.0:2575"

        [[adapters]]
        name = "lis"
        kind = "hl7-mllp"
        lisen = "0.0.0.0:2576"
        """,
    )
    assert problems == {"adapters[1].lisen": "unknown key"}


def test_wrong_type_says_what_was_expected_and_what_was_given(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, NODE + '[hub]\nbatch_max_records = "abc"\n')
    assert problems == {"hub.batch_max_records": "expected an integer, got 'abc'"}


def test_out_of_range_value_names_the_bound(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, NODE + "[hub]\nbatch_max_records = 6000\n")
    assert problems == {"hub.batch_max_records": "must be at most 5000, got 6000"}


def test_wrong_type_inside_an_adapter_sub_table_names_the_full_path(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        NODE
        + """
        [[adapters]]
        name = "pacs"
        kind = "dicom"
        peer = { ae_title = "PACS", host = "10.0.0.5", port = "one-oh-four" }
        """,
    )
    assert problems == {"adapters[0].peer.port": "expected an integer, got 'one-oh-four'"}


def test_unknown_adapter_kind_is_reported_with_the_known_kinds(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, NODE + '[[adapters]]\nname = "lis"\nkind = "hl7"\n')
    assert list(problems) == ["adapters[0].kind"]
    assert problems["adapters[0].kind"].startswith("unknown kind 'hl7'; expected one of")
    for kind in KINDS:
        assert repr(kind) in problems["adapters[0].kind"]


def test_missing_adapter_kind_is_reported(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, NODE + '[[adapters]]\nname = "lis"\n')
    assert list(problems) == ["adapters[0].kind"]
    assert problems["adapters[0].kind"].startswith("missing (required)")


def test_missing_required_key_is_reported(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "[hub]\n")
    assert problems == {"node": "missing (required)"}


def test_duplicate_adapter_names_are_reported_at_the_second_one(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        NODE
        + """
        [[adapters]]
        name = "lis"
        kind = "hl7-mllp"
        listen = "0.0.0.0:2575"

        [[adapters]]
        name = "lis"
        kind = "hl7-files"
        directory = "/srv/lis"
        """,
    )
    assert problems == {"adapters[1].name": "'lis' is already used by adapters[0]"}


def test_two_adapters_on_the_same_address_are_refused(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        NODE
        + """
        [[adapters]]
        name = "his"
        kind = "hl7-mllp"
        listen = "0.0.0.0:2575"

        [[adapters]]
        name = "lis"
        kind = "hl7-mllp"
        listen = "127.0.0.1:2575"
        """,
    )
    assert list(problems) == ["adapters[1].listen"]
    assert "adapters[0] (his)" in problems["adapters[1].listen"]


def test_an_adapter_on_the_telemetry_address_is_refused(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        NODE + '[[adapters]]\nname = "his"\nkind = "hl7-mllp"\nlisten = "127.0.0.1:9466"\n',
    )
    assert list(problems) == ["adapters[0].listen"]
    assert "telemetry.listen" in problems["adapters[0].listen"]


def test_disabled_adapters_and_port_zero_never_clash(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        NODE
        + """
        [[adapters]]
        name = "a"
        kind = "hl7-mllp"
        listen = "127.0.0.1:0"

        [[adapters]]
        name = "b"
        kind = "hl7-mllp"
        listen = "127.0.0.1:0"

        [[adapters]]
        name = "c"
        kind = "hl7-mllp"
        listen = "127.0.0.1:9466"
        enabled = false
        """,
    )
    assert len(cfg.adapters) == 3


def test_bad_toml_syntax_is_reported_with_line_and_column(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, NODE + "[hub]\nurl = https://x/\n")
    assert list(problems) == [""]
    assert "not valid TOML" in problems[""]
    assert "line 4" in problems[""]
    assert "column" in problems[""]


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml", KINDS)
    assert info.value.path == str(tmp_path / "nope.toml")
    assert "file not found" in str(info.value)


def test_a_directory_given_as_the_config_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, KINDS)


def test_a_file_that_is_not_utf8_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b'[node]\nid = "\xe1\xed"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path, KINDS)


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        """
        [node]
        id = "not a valid id!"

        [hub]
        timeout_secs = "soon"
        colour = "blue"

        [telemetry]
        log_level = "loud"

        [[adapters]]
        name = "Pacs"
        kind = "dicom"
        peer = { ae_title = "PACS", host = "10.0.0.5" }

        [[adapters]]
        name = "x"
        kind = "fax"
        """,
    )
    assert set(problems) == {
        "node.id",
        "hub.timeout_secs",
        "hub.colour",
        "telemetry.log_level",
        "adapters[0].name",
        "adapters[1].kind",
    }
    assert problems["telemetry.log_level"] == (
        "expected one of 'debug', 'info', 'warning' or 'error', got 'loud'"
    )


def test_config_error_message_names_the_file_and_each_key(tmp_path: Path) -> None:
    path = write(tmp_path, NODE + "[hub]\nbatch_max_records = 0\nfoo = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, KINDS)
    message = str(info.value)
    assert message.startswith("2 problems in config:")
    assert f"{path}: hub.batch_max_records: must be at least 1, got 0" in message
    assert f"{path}: hub.foo: unknown key" in message


def test_alert_warn_above_crit_is_reported_at_each_warn_key(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        NODE
        + '[alerts]\noldest_pending_warn = "7h"\ncapacity_warn_percent = 99\n'
        + "dead_warn = 5\ndead_crit = 2\n",
    )
    assert problems == {
        "alerts.oldest_pending_warn": "must not exceed alerts.oldest_pending_crit",
        "alerts.capacity_warn_percent": "must not exceed alerts.capacity_crit_percent",
        "alerts.dead_warn": "must not exceed alerts.dead_crit",
    }


def test_alert_crit_of_none_never_conflicts_with_warn(tmp_path: Path) -> None:
    cfg = load(tmp_path, NODE + "[alerts]\nquarantine_warn = 1000\n")
    assert cfg.alerts.quarantine_crit is None


@pytest.mark.parametrize(
    ("table", "key", "fragment"),
    [
        ('listen = "0.0.0.0"', "listen", "expected 'host:port'"),
        ('listen = "::1:2575"', "listen", "expected 'host:port'"),
        ('allow = ["10.0.0.1/8"]', "allow[0]", "expected an IP network"),
        ("allow = []", "allow", "at least 1 item"),
        ('encoding = "klingon"', "encoding", "unknown text encoding"),
        ('encoding = "utf-16"', "encoding", "not a byte-oriented"),
        ('tls_cert = "cert.pem"', "tls_key", "must be set together with tls_cert"),
    ],
)
def test_hl7_mllp_settings_are_validated(
    tmp_path: Path, table: str, key: str, fragment: str
) -> None:
    problems = problems_of(
        tmp_path, NODE + f'[[adapters]]\nname = "lis"\nkind = "hl7-mllp"\n{table}\n'
    )
    assert list(problems) == [f"adapters[0].{key}"]
    assert fragment in problems[f"adapters[0].{key}"]


@pytest.mark.parametrize(
    ("table", "key", "fragment"),
    [
        ('query = "SELECT * FROM rx"', "query", ":cursor"),
        ("key_columns = []", "key_columns", "at least 1 item"),
        ('service = "fax"', "service", "expected one of"),
        ('url = "not a url"', "url", "SQLAlchemy URL"),
        ('url = "postgresql://u:pw@h/db"\npassword_file = "pw"', "password_file", "only one"),
    ],
)
def test_sql_settings_are_validated(tmp_path: Path, table: str, key: str, fragment: str) -> None:
    defaults = {
        "url": '"postgresql://reader@h/db"',
        "query": '"SELECT * FROM rx WHERE t > :cursor"',
        "cursor_column": '"t"',
        "key_columns": '["id"]',
        "service": '"e-prescription"',
    }
    given = {line.split(" = ")[0] for line in table.splitlines()}
    body = "\n".join(f"{k} = {v}" for k, v in defaults.items() if k not in given)
    problems = problems_of(
        tmp_path,
        NODE + f'[[adapters]]\nname = "db"\nkind = "sql"\n{body}\n{table}\n'
        '[adapters.fields]\noccurred_at = "t"\n',
    )
    assert list(problems) == [f"adapters[0].{key}"]
    assert fragment in problems[f"adapters[0].{key}"]


@pytest.mark.parametrize(
    ("ae_title", "fragment"),
    [("A-TITLE-LONGER-THAN-16", "1 to 16"), ("", "1 to 16"), ("BAD\\AE", "without")],
)
def test_dicom_ae_titles_follow_the_ae_rules(tmp_path: Path, ae_title: str, fragment: str) -> None:
    problems = problems_of(
        tmp_path,
        NODE + '[[adapters]]\nname = "pacs"\nkind = "dicom"\n'
        f"ae_title = '{ae_title}'\n"
        'peer = { ae_title = "PACS", host = "h" }\n',
    )
    assert list(problems) == ["adapters[0].ae_title"]
    assert fragment in problems["adapters[0].ae_title"]


# ---------------------------------------------------------------------- data_dir


def test_data_dir_under_a_file_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    monkeypatch.setenv(DATA_DIR_ENV, str(blocker / "data"))
    problems = problems_of(tmp_path, NODE)
    assert list(problems) == ["node.data_dir"]
    assert problems["node.data_dir"].startswith(f"cannot be created: {blocker} is not a directory")
    assert DATA_DIR_ENV in problems["node.data_dir"]


def test_data_dir_that_is_a_file_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DATA_DIR_ENV)
    (tmp_path / "data").write_text("x")
    problems = problems_of(tmp_path, NODE + 'data_dir = "data"\n')
    assert problems == {"node.data_dir": f"{tmp_path / 'data'} exists and is not a directory"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory modes")
def test_data_dir_under_a_read_only_directory_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        monkeypatch.setenv(DATA_DIR_ENV, str(locked / "a" / "b"))
        problems = problems_of(tmp_path, NODE)
    finally:
        locked.chmod(0o700)
    assert problems["node.data_dir"].startswith(f"cannot be created: {locked} is not writable")


def test_loading_creates_nothing(tmp_path: Path, data_dir: Path) -> None:
    load(tmp_path, NODE)
    assert not data_dir.exists()


def test_data_dir_env_overrides_the_file(tmp_path: Path, data_dir: Path) -> None:
    cfg = load(tmp_path, NODE + 'data_dir = "/somewhere/else"\n')
    assert cfg.node.data_dir == data_dir
    assert cfg.node.key_path == data_dir / "node.key"
    assert cfg.buffer_key_path == data_dir / "buffer.key"


def test_relative_paths_resolve_against_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DATA_DIR_ENV)
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        write(
            conf_dir,
            NODE
            + 'data_dir = "state"\nkey_file = "keys/node.key"\n'
            + '[[adapters]]\nname = "f"\nkind = "hl7-files"\ndirectory = "in"\n',
        ),
        KINDS,
    )
    assert cfg.node.data_dir == conf_dir / "state"
    assert cfg.node.key_path == conf_dir / "keys" / "node.key"
    assert cfg.adapters[0].done_path == conf_dir / "in" / "done"  # type: ignore[attr-defined]


# ------------------------------------------------------------------------ hub url


@pytest.mark.parametrize(
    "url",
    ["https://hub.example/", "http://127.0.0.1:8000/", "http://localhost/", "http://[::1]:8/"],
)
def test_hub_url_https_or_loopback_http_is_accepted(tmp_path: Path, url: str) -> None:
    assert load(tmp_path, NODE + f'[hub]\nurl = "{url}"\n').hub.url == url


def test_plain_http_to_a_remote_hub_is_refused(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, NODE + '[hub]\nurl = "http://hub.example/"\n')
    assert list(problems) == ["hub.url"]
    assert "hub.allow_insecure" in problems["hub.url"]


def test_plain_http_to_a_remote_hub_is_accepted_with_allow_insecure(tmp_path: Path) -> None:
    cfg = load(tmp_path, NODE + '[hub]\nurl = "http://hub.example/"\nallow_insecure = true\n')
    assert cfg.hub.url == "http://hub.example/"


@pytest.mark.parametrize("url", ["ftp://hub.example/", "hub.example", "https://", "https://h:x/"])
def test_hub_url_must_be_an_http_url(tmp_path: Path, url: str) -> None:
    problems = problems_of(tmp_path, NODE + f'[hub]\nurl = "{url}"\n')
    assert list(problems) == ["hub.url"]
    assert problems["hub.url"].startswith("expected an http:// or https:// URL")


def test_lease_must_outlast_the_request_timeout(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, NODE + "[hub]\ntimeout_secs = 60\nlease_secs = 60\n")
    assert list(problems) == ["hub.lease_secs"]


# ------------------------------------------------------------------------ masking

SQL_WITH_PASSWORD = (
    NODE  # noqa: S608  (TOML that holds a query, not a query)
    + """
    [[adapters]]
    name = "his-db"
    kind = "sql"
    url = "postgresql://reader:s3cret-pw@10.0.0.7/his"
    query = "SELECT * FROM rx WHERE updated_at > :cursor"
    cursor_column = "updated_at"
    key_columns = ["id"]
    service = "e-prescription"
    fields = { occurred_at = "updated_at" }
    """
)


def test_effective_config_masks_a_url_password(tmp_path: Path) -> None:
    cfg = load(tmp_path, SQL_WITH_PASSWORD)
    text = render_effective(cfg)
    assert "s3cret-pw" not in text
    assert f'url = "postgresql://reader:{MASK}@10.0.0.7/his"' in text


def test_effective_config_shows_defaults_and_derived_paths(tmp_path: Path, data_dir: Path) -> None:
    text = render_effective(load(tmp_path, NODE))
    assert f'key_file = "{data_dir / "node.key"}"' in text
    assert f'key_file = "{data_dir / "buffer.key"}"' in text
    assert 'oldest_pending_crit = "6h"' in text
    assert "batch_max_records = 500" in text


def test_effective_config_loads_back_to_the_same_effective_config(tmp_path: Path) -> None:
    for source in (EXAMPLE.read_text(encoding="utf-8"), SQL_WITH_PASSWORD):
        first = render_effective(load(tmp_path, source))
        again = render_effective(load_config(write(tmp_path, first, "effective.toml"), KINDS))
        assert again == first


class _SecretSettings(AdapterSettings):
    kind: Literal["secret"]
    token: SecretStr


def test_effective_config_masks_secret_fields(tmp_path: Path) -> None:
    path = write(tmp_path, NODE + '[[adapters]]\nname = "s"\nkind = "secret"\ntoken = "tkn-1"\n')
    cfg = load_config(path, {"secret": _SecretSettings})
    assert cfg.adapters[0].token.get_secret_value() == "tkn-1"  # type: ignore[attr-defined]
    text = render_effective(cfg)
    assert "tkn-1" not in text
    assert f'token = "{MASK}"' in text


def test_error_messages_do_not_echo_url_passwords(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, NODE + '[hub]\nurl = "ftp://u:hunter2@h/"\n')
    assert "hunter2" not in problems["hub.url"]


# --------------------------------------------------------------- config file path


def test_config_path_from_the_command_line_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CONFIG_ENV, "/from/env.toml")
    assert resolve_config_path(Path("/from/cli.toml")) == Path("/from/cli.toml")


def test_config_path_from_the_environment_wins_over_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CONFIG_ENV, "/from/env.toml")
    assert resolve_config_path(None) == Path("/from/env.toml")


def test_config_path_defaults_to_etc() -> None:
    assert resolve_config_path(None) == DEFAULT_CONFIG_PATH == Path("/etc/sepas-agent/agent.toml")


# ----------------------------------------------------------------------- Duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("5m", timedelta(minutes=5)),
        ("1h", timedelta(hours=1)),
        ("2d", timedelta(days=2)),
        ("1h30m", timedelta(minutes=90)),
        ("1d2h3m4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        ("1.5s", timedelta(seconds=1.5)),
        (90, timedelta(seconds=90)),
        (0.25, timedelta(seconds=0.25)),
    ],
)
def test_duration_accepts_unit_strings_and_seconds(text: str | float, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["", "5", "5x", "1m1h", "h", "-5s", "1.5m", True, None, [1]])
def test_duration_refuses_other_forms_and_lists_the_accepted_ones(bad: object) -> None:
    with pytest.raises(ValueError, match=re.escape("'30s', '5m', '1h', '2d', '1h30m'")):
        parse_duration(bad)


@pytest.mark.parametrize("bad", [0, "0s", -1])
def test_duration_must_be_longer_than_zero(bad: object) -> None:
    with pytest.raises(ValueError, match="longer than zero"):
        parse_duration(bad)


def test_duration_error_in_a_file_names_the_key(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, NODE + '[alerts]\noldest_pending_warn = "an hour"\n')
    assert list(problems) == ["alerts.oldest_pending_warn"]
    assert "'1h30m'" in problems["alerts.oldest_pending_warn"]


@given(st.timedeltas(min_value=timedelta(microseconds=1), max_value=timedelta(days=10_000)))
def test_format_duration_round_trips_through_parse_duration(td: timedelta) -> None:
    assert parse_duration(format_duration(td)) == td


@given(
    st.integers(0, 400),
    st.integers(0, 23),
    st.integers(0, 59),
    st.integers(0, 59),
)
def test_duration_components_add_up(d: int, h: int, m: int, s: int) -> None:
    text = "".join(f"{n}{u}" for n, u in ((d, "d"), (h, "h"), (m, "m"), (s, "s")) if n)
    expected = timedelta(days=d, hours=h, minutes=m, seconds=s)
    if expected:
        assert parse_duration(text) == expected
        assert format_duration(expected) == text


@given(st.text(max_size=20))
def test_duration_parsing_never_fails_other_than_with_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        parse_duration(text)


# ------------------------------------------------------------------ listen address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9466", ("127.0.0.1", 9466)),
        ("[::1]:9466", ("::1", 9466)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),  # noqa: S104
        ("pacs.local:104", ("pacs.local", 104)),
    ],
)
def test_listen_addresses_split_into_host_and_port(text: str, expected: tuple[str, int]) -> None:
    assert split_host_port(text) == expected


@pytest.mark.parametrize("bad", ["9466", ":9466", "::1:9466", "[::1]", "h:70000", "h:-1", "a b:1"])
def test_listen_addresses_must_be_host_and_port(bad: str) -> None:
    with pytest.raises(ValueError, match="port"):
        split_host_port(bad)


def test_data_dir_whose_nearest_existing_ancestor_is_not_writable_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs as root too (where chmod cannot make a directory unwritable): the check
    # relies on os.access, so deny it for this one directory.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode)
    )
    monkeypatch.setenv(DATA_DIR_ENV, str(locked / "a" / "b"))
    problems = problems_of(tmp_path, NODE)
    assert problems == {
        "node.data_dir": f"cannot be created: {locked} is not writable by this user "
        f"(set by ${DATA_DIR_ENV})"
    }
