"""The README and the code agree: every command is documented, the two opening
commands are the ones CI runs, and the tree is lint-clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from agent.cli import app

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _is_group(cmd: object) -> bool:
    # typer >= 0.29 vendors its own click, so no isinstance against the click package.
    return hasattr(cmd, "commands")


def _commands(group: object, prefix: str = "sepas-agent") -> list[str]:
    names = []
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        if _is_group(cmd):
            names += _commands(cmd, f"{prefix} {name}")
        else:
            names.append(f"{prefix} {name}")
    return names


def _shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("command", _commands(typer.main.get_command(app)))
def test_every_cli_command_is_in_the_readme_with_help_and_an_example(command: str) -> None:
    assert f"`{command}" in README, f"{command} is not documented in README.md"
    cmd = typer.main.get_command(app)
    for part in command.split()[1:]:
        assert _is_group(cmd)
        cmd = cmd.commands[part]
    assert cmd.help, f"{command} has no --help text"
    assert "Example:" in cmd.help, f"{command} --help has no example"


def test_readme_opens_with_exactly_two_commands() -> None:
    before_prose = README.split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", before_prose, flags=re.S)
    assert len(blocks) == 2
    assert all(len(b.strip().splitlines()) == 1 for b in blocks)


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    test_command = _shell_blocks()[1].strip()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_command.replace(" -q ", " ") in ci.replace(" -q ", " ")
    assert "SEPAS_REQUIRE_PEERS=1" in ci


def _ruff() -> list[str]:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("ruff is not installed in this environment")
    return [exe]


def test_ruff_check_is_clean() -> None:
    res = subprocess.run([*_ruff(), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_format_is_clean() -> None:
    res = subprocess.run(
        [*_ruff(), "format", "--check", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
