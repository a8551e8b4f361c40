"""`sepas-hub` and its configuration: the example config, errors with key paths, the node
registry commands, and what `serve` hands to uvicorn."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import typer.main
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel
from typer.testing import CliRunner

from agent.errors import ConfigError
from agent.keys import fingerprint, public_pem
from hub import cli
from hub.app import app_from_env
from hub.settings import (
    CONFIG_ENV,
    SETTINGS_ENV,
    HubSettings,
    load_settings,
    open_store,
    sqlite_path,
)
from hub.store_sqlite import SqliteStore

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "hub.example.toml"


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setenv(SETTINGS_ENV, "")  # empty is unset; restored after `serve` sets it


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(cli.app, list(args), catch_exceptions=False)


def _pub(tmp_path: Path, name: str) -> tuple[Path, str]:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / f"{name}.pub"
    path.write_text(public_pem(key))
    return path, fingerprint(key)


# --- configuration ------------------------------------------------------------------------


def test_the_example_config_is_valid_and_equals_the_defaults() -> None:
    assert load_settings(EXAMPLE) == HubSettings()


def test_the_example_config_shows_every_option() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for section, model in HubSettings.model_fields.items():
        assert f"[{section}]" in text
        sub = model.annotation
        assert isinstance(sub, type)
        assert issubclass(sub, BaseModel)
        for name in sub.model_fields:
            assert re.search(rf"^#? ?{name} = ", text, re.M), f"{section}.{name} is not shown"


def test_a_bad_config_lists_every_problem_with_its_key_path(tmp_path: Path) -> None:
    path = tmp_path / "hub.toml"
    path.write_text(
        '[server]\nlisten = "nowhere"\ncolour = "blue"\n'
        '[limits]\nidempotency_ttl_days = 3\n[store]\nurl = "mysql://x"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    keys = [p.key for p in caught.value.problems]
    assert sorted(keys) == [
        "limits.idempotency_ttl_days",
        "server.colour",
        "server.listen",
        "store.url",
    ]


def test_relative_paths_in_a_config_file_are_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "hub.toml"
    path.parent.mkdir()
    path.write_text('[store]\nurl = "sqlite:data/hub.db"\nblob_dir = "blobs"\n')
    settings = load_settings(path)
    assert sqlite_path(settings.store.url) == tmp_path / "etc" / "data" / "hub.db"
    assert settings.store.blob_dir == tmp_path / "etc" / "blobs"


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///var/lib/sepas-hub/hub.db", "/var/lib/sepas-hub/hub.db"),
        ("sqlite:hub.db", "hub.db"),
        ("sqlite:./data/hub.db", "data/hub.db"),
    ],
)
def test_sqlite_urls_name_their_file(url: str, path: str) -> None:
    assert sqlite_path(url) == Path(path)


@pytest.mark.parametrize("url", ["sqlite:", "sqlite://relative/x", "sqlite:///dir/", "mysql://h"])
def test_unusable_store_urls_are_refused(url: str) -> None:
    with pytest.raises((ValueError, ConfigError)):
        sqlite_path(url) if url.startswith("sqlite") else open_store(url)


def test_tls_needs_both_files(tmp_path: Path) -> None:
    path = tmp_path / "hub.toml"
    path.write_text('[server]\ntls_cert = "cert.pem"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert "tls_cert and tls_key" in str(caught.value)


# --- commands -----------------------------------------------------------------------------


def _commands(group: Any, prefix: str = "sepas-hub") -> list[tuple[str, Any]]:
    # Duck-typed: typer vendors its own click, so click.Group is not its base class.
    out = []
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            out += _commands(cmd, f"{prefix} {name}")
        else:
            out.append((f"{prefix} {name}", cmd))
    return out


def test_every_command_has_help_with_an_example() -> None:
    commands = _commands(typer.main.get_command(cli.app))
    assert {name for name, _ in commands} == {
        "sepas-hub serve",
        "sepas-hub nodes add",
        "sepas-hub nodes list",
        "sepas-hub nodes revoke",
    }
    for name, cmd in commands:
        assert cmd.help, f"{name} has no help"
        assert "Example: sepas-hub" in cmd.help, f"{name} --help has no example"


def test_nodes_add_list_and_revoke(tmp_path: Path) -> None:
    store = f"sqlite:{tmp_path / 'hub.db'}"
    a, fp_a = _pub(tmp_path, "a")
    b, fp_b = _pub(tmp_path, "b")
    c, fp_c = _pub(tmp_path, "c")
    for pub in (a, b, c):
        result = _invoke("nodes", "add", "FAC-0001", "--public-key", str(pub), "--store", store)
        assert result.exit_code == 0, result.output
    assert f"retired key {fp_a}" in result.stderr  # a third key retires the oldest
    listed = json.loads(_invoke("nodes", "list", "--json", "--store", store).stdout)
    assert [n["node_id"] for n in listed] == ["FAC-0001"]
    active = {k["fingerprint"] for k in listed[0]["keys"] if k["revoked_at"] is None}
    assert active == {fp_b, fp_c}
    table = _invoke("nodes", "list", "--store", store)
    assert table.exit_code == 0
    assert "FAC-0001" in table.stdout
    assert fp_b in table.stdout  # wide enough not to truncate, even in a pipe
    assert _invoke("nodes", "revoke", "FAC-0001", "--store", store).exit_code == 0
    listed = json.loads(_invoke("nodes", "list", "--json", "--store", store).stdout)
    assert listed[0]["status"] == "revoked"


def test_nodes_revoke_of_an_unknown_node_fails_with_a_hint(tmp_path: Path) -> None:
    result = _invoke("nodes", "revoke", "FAC-0404", "--store", f"sqlite:{tmp_path / 'h.db'}")
    assert result.exit_code == 1
    assert "FAC-0404" in result.stderr
    assert "hint:" in result.stderr


def test_nodes_add_refuses_what_is_not_an_ed25519_public_key(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pub"
    junk.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    store = f"sqlite:{tmp_path / 'hub.db'}"
    result = _invoke("nodes", "add", "FAC-0001", "--public-key", str(junk), "--store", store)
    assert result.exit_code == 1
    assert "error:" in result.stderr
    assert _invoke("nodes", "add", "no spaces", "--public-key", str(junk)).exit_code == 2


def test_without_a_config_file_or_store_the_command_exits_2_with_a_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "absent.toml"))
    result = _invoke("nodes", "list")
    assert result.exit_code == 2
    assert "--store" in result.stderr


def test_serve_hands_uvicorn_the_bounds_and_the_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import uvicorn

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app, **kwargs))
    config = tmp_path / "hub.toml"
    config.write_text(f'[server]\nmax_connections = 50\n[store]\nblob_dir = "{tmp_path}/b"\n')
    store = f"sqlite:{tmp_path / 'hub.db'}"
    args = [
        "serve",
        "-c",
        str(config),
        "--store",
        store,
        "--listen",
        "127.0.0.1:9",
        "--workers",
        "3",
    ]
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    assert seen["app"] == "hub.app:app_from_env"
    assert seen["factory"] is True
    assert (seen["host"], seen["port"], seen["workers"]) == ("127.0.0.1", 9, 3)
    assert (seen["limit_concurrency"], seen["backlog"]) == (100, 50)
    assert seen["proxy_headers"] is False
    assert seen["server_header"] is False
    assert seen["date_header"] is False  # the app sends exactly one Date itself
    # The workers rebuild the same settings from the environment.
    settings = HubSettings.model_validate_json(os.environ[SETTINGS_ENV])
    assert settings.store.url == store
    assert settings.server.listen == "127.0.0.1:9"
    app = app_from_env()
    assert app.state.hub.settings == settings
    assert isinstance(app.state.hub.store, SqliteStore)
    app.state.hub.store.close()
