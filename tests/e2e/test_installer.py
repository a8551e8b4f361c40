"""installer/install.sh and uninstall.sh, run for real into a staging root (--root).

The module installs once from the project directory (fresh), then, after facility IT
has edited agent.toml and the agent has buffered a record, again from a wheel of the
project (the upgrade); the tests check what each run left behind.

Speed without cheating: pip really creates the virtualenv and installs the agent and
its dependencies, but offline, from a wheelhouse (``--wheelhouse``, the option for
sites without PyPI) that the test fills by repacking the dependencies already
installed in this test environment as wheels (same files, same versions, a second or
two), and it does not byte-compile them (see `_installer_env`). Only the build
backend (setuptools) comes from the package index, once, since it is not installed
here; without an index the tests skip (fail under SEPAS_REQUIRE_PEERS=1). The module
takes about 45 s on an idle two-core machine, most of it in the fresh install.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from agent.buffer import Buffer
from agent.keys import load_data_key, load_private_key, public_pem
from tests.factories import make_record
from tests.hubkit import require_peer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
INSTALLER = ROOT / "installer"
UNIT = "etc/systemd/system/sepas-agent.service"
CONFIG = "etc/sepas-agent/agent.toml"
DATA = "var/lib/sepas-agent"
VENV = "opt/sepas-agent"
COPY_IGNORE = shutil.ignore_patterns(
    ".venv",
    ".git",
    "*.egg-info",
    "__pycache__",
    "build",
    "dist",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "demo-data",
)
#: Appended to the installed agent.toml before the upgrade: facility IT's edit, with
#: an MLLP listener on a port below 1024.
IT_EDIT = """
# Edited by facility IT before the upgrade.
[[adapters]]
name = "his-legacy"
kind = "hl7-mllp"
listen = "0.0.0.0:104"
"""
HARDENING = (
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "NoNewPrivileges=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectControlGroups=yes",
    "RestrictNamespaces=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
    "SystemCallFilter=@system-service",
    "UMask=0077",
    "Restart=on-failure",
    "RestartSec=5",
    "TimeoutStopSec=15",
    "User=sepas",
    "Group=sepas",
)


# -- a wheelhouse from the installed environment ------------------------------------------


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions that ``requirements`` need (no extras)."""
    found: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = _normalize(req.name)
        if name in found:
            continue
        dist = metadata.distribution(name)
        found[name] = dist
        todo += [Requirement(r) for r in dist.requires or []]
    return found


def _wheel_tag(dist: metadata.Distribution) -> str:
    """The compressed tag set of the wheel ``dist`` was installed from (its WHEEL file)."""
    lines = (dist.read_text("WHEEL") or "").splitlines()
    tags = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Tag:")]
    parts: list[list[str]] = [[], [], []]
    for tag in tags or ["py3-none-any"]:
        for i, part in enumerate(tag.split("-")):
            if part not in parts[i]:
                parts[i].append(part)
    return "-".join(".".join(p) for p in parts)


def _repack(dist: metadata.Distribution, out: Path) -> Path:
    """Write the installed ``dist`` back out as a wheel: its files from RECORD, minus
    bytecode and scripts (pip regenerates both), with a fresh RECORD."""
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    wheel = out / f"{name}-{dist.version}-{_wheel_tag(dist)}.whl"
    base = Path(str(dist.locate_file("")))
    record: list[str] = []
    info_dir = ""
    skip = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as z:
        for f in dist.files or []:
            path = f.as_posix()
            if path.startswith("..") or "__pycache__/" in path or path.endswith(".pyc"):
                continue
            top, _, rest = path.partition("/")
            if top.endswith(".dist-info"):
                info_dir = top
                if rest in skip:
                    continue
            data = (base / path).read_bytes()
            z.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{path},sha256={digest.decode()},{len(data)}")
        record.append(f"{info_dir}/RECORD,,")
        z.writestr(f"{info_dir}/RECORD", "\n".join(record) + "\n")
    return wheel


def _hermetic_env() -> dict[str, str]:
    """No pip config (indexes, find-links, constraints) and no SEPAS_AGENT_* leaks."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIP_", "SEPAS_AGENT_", "VIRTUAL_ENV"))
    }
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _installer_env() -> dict[str, str]:
    """The installer's environment: hermetic, and pip skips byte-compiling what it
    installs (two thirds of an install's time, pydicom's and hl7apy's big tables).
    ``PIP_NO_COMPILE=0`` is how pip spells --no-compile in the environment: it reads the
    value as the option's dest, ``compile``. The script itself is unchanged."""
    return {**_hermetic_env(), "PIP_NO_COMPILE": "0"}


@dataclass(frozen=True)
class Release:
    source: Path  # a copy of the project directory, as a release tarball unpacks
    wheelhouse: Path  # every dependency and the build backend, as wheels
    dist: Path  # where the wheel of the project is being built
    build: subprocess.Popen[str]  # ...in the background, while the fresh install runs

    def wheel(self) -> Path:
        """The project built as a wheel from the copy."""
        _, stderr = self.build.communicate(timeout=300)
        assert self.build.returncode == 0, stderr
        (wheel,) = self.dist.glob("sepas_agent-*.whl")
        return wheel


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    base = tmp_path_factory.mktemp("release")
    source = base / "sepas-agent"
    shutil.copytree(ROOT, source, ignore=COPY_IGNORE, symlinks=True)
    pyproject = tomllib.loads((source / "pyproject.toml").read_text(encoding="utf-8"))
    wheelhouse = base / "wheelhouse"
    wheelhouse.mkdir()
    for dist in _closure(pyproject["project"]["dependencies"]).values():
        _repack(dist, wheelhouse)
    backend = pyproject["build-system"]["requires"]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    got = subprocess.run(
        [*pip, "download", "--only-binary", ":all:", "-d", str(wheelhouse), *backend],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if got.returncode != 0:
        require_peer("package index", f"pip download {backend} failed: {got.stderr[-500:]}")
    # Built from a second copy: pip builds in the source tree, and the fresh install
    # builds from the first one at the same time.
    wheel_source = base / "wheel-source"
    shutil.copytree(source, wheel_source, symlinks=True)
    build = subprocess.Popen(
        [
            *pip,
            *("wheel", "--no-deps", "--no-index", "--find-links", str(wheelhouse)),
            *("-w", str(base / "dist"), str(wheel_source)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_hermetic_env(),
    )
    release = Release(source, wheelhouse, base / "dist", build)
    yield release
    if build.poll() is None:
        build.kill()
        build.wait()


# -- the install runs ---------------------------------------------------------------------


def install(release: Release, stage: Path, *, source: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *("bash", str(release.source / "installer" / "install.sh"), "--root", str(stage)),
            *("--source", str(source), "--wheelhouse", str(release.wheelhouse)),
            *("--python", sys.executable, "--no-start"),
        ],
        capture_output=True,
        text=True,
        env=_installer_env(),
        timeout=300,
    )


def uninstall(stage: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALLER / "uninstall.sh"), "--root", str(stage), *args],
        capture_output=True,
        text=True,
        env=_hermetic_env(),
        stdin=subprocess.DEVNULL,
        timeout=60,
    )


def file_hashes(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@dataclass
class Snapshot:
    run: subprocess.CompletedProcess[str]
    unit: str
    config: bytes
    data: dict[str, str]
    modes: dict[str, int]


def snapshot(stage: Path, run: subprocess.CompletedProcess[str]) -> Snapshot:
    paths = {
        "config": stage / CONFIG,
        "etc": stage / "etc/sepas-agent",
        "data": stage / DATA,
        "node.key": stage / DATA / "node.key",
        "buffer.key": stage / DATA / "buffer.key",
        "unit": stage / UNIT,
    }
    return Snapshot(
        run=run,
        unit=(stage / UNIT).read_text(encoding="utf-8"),
        config=(stage / CONFIG).read_bytes(),
        data=file_hashes(stage / DATA),
        modes={k: mode(p) for k, p in paths.items()},
    )


@dataclass
class Installs:
    stage: Path
    fresh: Snapshot
    upgrade: Snapshot
    buffered_ids: list[str]
    edited_config: bytes
    data_before_upgrade: dict[str, str]


@pytest.fixture(scope="module")
def installs(release: Release, tmp_path_factory: pytest.TempPathFactory) -> Installs:
    stage = tmp_path_factory.mktemp("stage")
    first = install(release, stage, source=release.source)
    assert first.returncode == 0, first.stdout + first.stderr
    fresh = snapshot(stage, first)

    # Facility IT edits the config; the agent buffers a record.
    with (stage / CONFIG).open("a", encoding="utf-8") as f:
        f.write(IT_EDIT)
    edited = (stage / CONFIG).read_bytes()
    data = stage / DATA
    records = [make_record(i) for i in range(3)]
    with Buffer.open(data, data_key=load_data_key(data / "buffer.key")) as buf:
        buf.put(records)
    (data / "marker").write_text("written by the test before the upgrade\n", encoding="utf-8")
    before = file_hashes(data)

    second = install(release, stage, source=release.wheel())
    assert second.returncode == 0, second.stdout + second.stderr
    return Installs(
        stage=stage,
        fresh=fresh,
        upgrade=snapshot(stage, second),
        buffered_ids=[r.id for r in records],
        edited_config=edited,
        data_before_upgrade=before,
    )


def _expected_owner() -> tuple[int, int]:
    """Whom install.sh can give files to: the sepas user when it exists and we are root
    (--root creates no user), else whoever runs the test."""
    try:
        sepas = pwd.getpwnam("sepas")
    except KeyError:
        return os.getuid(), os.getgid()
    if os.geteuid() != 0:
        return os.getuid(), os.getgid()
    return sepas.pw_uid, sepas.pw_gid


# -- the tests: quick ones first ----------------------------------------------------------


def test_install_help_exits_0_and_an_unknown_option_exits_2() -> None:
    ok = subprocess.run(
        ["bash", str(INSTALLER / "install.sh"), "--help"], capture_output=True, text=True
    )
    assert ok.returncode == 0
    for option in ("--root", "--source", "--python", "--wheelhouse", "--no-start"):
        assert option in ok.stdout
    bad = subprocess.run(
        ["bash", str(INSTALLER / "install.sh"), "--bogus"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "unknown argument: --bogus" in bad.stderr


def _fake_python(tmp_path: Path, body: str) -> Path:
    fake = tmp_path / "python3-fake"
    fake.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    fake.chmod(0o755)
    return fake


def test_install_without_python_venv_fails_with_the_package_to_install(tmp_path: Path) -> None:
    # A Python >= 3.11 whose venv/ensurepip cannot be imported (Debian without python3-venv).
    fake = _fake_python(
        tmp_path,
        'case "$*" in *ensurepip*) exit 1 ;; esac\nexec "' + sys.executable + '" "$@"',
    )
    res = subprocess.run(
        [
            *("bash", str(INSTALLER / "install.sh"), "--root", str(tmp_path / "stage")),
            *("--python", str(fake), "--no-start"),
        ],
        capture_output=True,
        text=True,
        env=_hermetic_env(),
        timeout=60,
    )
    assert res.returncode == 1
    assert "Python's venv module" in res.stderr
    hints = [line for line in res.stderr.splitlines() if line.strip().startswith("hint:")]
    assert hints, res.stderr
    package = ("apt-get install python3-venv", "dnf install python", "python3-venv package")
    assert any(p in hints[0] for p in package), hints
    assert not (tmp_path / "stage" / VENV).exists()


def test_install_refuses_a_python_older_than_3_11(tmp_path: Path) -> None:
    fake = _fake_python(tmp_path, "exit 1")  # fails the version probe, like Python 3.9
    res = subprocess.run(
        [
            *("bash", str(INSTALLER / "install.sh"), "--root", str(tmp_path / "stage")),
            *("--python", str(fake)),
        ],
        capture_output=True,
        text=True,
        env=_hermetic_env(),
        timeout=60,
    )
    assert res.returncode == 1
    assert "older than Python 3.11" in res.stderr


def test_install_refuses_a_data_dir_that_is_a_system_directory(tmp_path: Path) -> None:
    # It would chmod 0700 and chown it: a typo must not take over /var/lib.
    stage = tmp_path / "stage"
    config = stage / CONFIG
    config.parent.mkdir(parents=True)
    text = '[node]\nid = "FAC-0001"\ndata_dir = "/var/lib"\n[hub]\nurl = "https://hub.example/"\n'
    config.write_text(text, encoding="utf-8")
    res = subprocess.run(
        [
            *("bash", str(INSTALLER / "install.sh"), "--root", str(stage)),
            *("--python", sys.executable, "--no-start"),
        ],
        capture_output=True,
        text=True,
        env=_hermetic_env(),
        timeout=60,
    )
    assert res.returncode == 1
    assert "data_dir = /var/lib" in res.stderr
    assert "not usable as the agent's own directory" in res.stderr
    assert config.read_text(encoding="utf-8") == text
    assert not (stage / "var/lib").exists()
    assert not (stage / VENV).exists()


def test_installer_scripts_parse_and_are_shellcheck_clean() -> None:
    scripts = [str(INSTALLER / "install.sh"), str(INSTALLER / "uninstall.sh")]
    for script in scripts:
        parsed = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
        assert parsed.returncode == 0, parsed.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    res = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# -- the fresh install --------------------------------------------------------------------


def test_fresh_install_creates_venv_config_data_dir_keys_and_unit_with_their_modes(
    installs: Installs,
) -> None:
    stage, fresh = installs.stage, installs.fresh
    version = subprocess.run(
        [str(stage / VENV / "bin" / "sepas-agent"), "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("sepas-agent ")
    assert os.readlink(stage / "usr/local/bin/sepas-agent") == "/opt/sepas-agent/bin/sepas-agent"
    example = (installs.stage / "etc/sepas-agent/agent.example.toml").read_bytes()
    assert fresh.config == example  # the example, as shipped with this release
    assert fresh.modes == {
        "config": 0o640,
        "etc": 0o750,
        "data": 0o700,
        "node.key": 0o600,
        "buffer.key": 0o600,
        "unit": 0o644,
    }
    uid, gid = _expected_owner()
    for path in (stage / DATA, stage / DATA / "node.key", stage / DATA / "buffer.key"):
        assert (path.stat().st_uid, path.stat().st_gid) == (uid, gid), path
    assert (stage / CONFIG).stat().st_gid == gid


def test_fresh_install_prints_the_public_key_to_register_and_what_it_did_not_do(
    installs: Installs,
) -> None:
    out = installs.fresh.run.stdout
    key = load_private_key(installs.stage / DATA / "node.key")
    assert public_pem(key.public_key()) in out
    assert "sepas-hub nodes add FAC-0001" in out
    # --root: no user, no systemctl, and it says what it would have run.
    assert "would run: useradd --system" in out
    assert "would run: systemctl daemon-reload && systemctl enable sepas-agent" in out
    assert "created from the example" in out


def test_fresh_unit_is_hardened_runs_the_venv_and_has_no_capabilities_on_default_ports(
    installs: Installs,
) -> None:
    lines = installs.fresh.unit.splitlines()
    assert (
        "ExecStart=/opt/sepas-agent/bin/sepas-agent run --config /etc/sepas-agent/agent.toml"
        in lines
    )
    for directive in HARDENING:
        assert directive in lines, directive
    # Writable: the data directory and the example's hl7-files spool (may be missing).
    assert "ReadWritePaths=/var/lib/sepas-agent -/var/spool/lis-export" in lines
    assert not any(line.startswith("AmbientCapabilities") for line in lines)
    assert "CapabilityBoundingSet=" in lines  # empty: no capabilities at all
    assert "WantedBy=multi-user.target" in lines
    assert "@" not in installs.fresh.unit.replace("@system-service", "").replace(
        "@privileged @resources", ""
    ), "an unrendered @PLACEHOLDER@"


def test_rendered_unit_passes_systemd_analyze_verify(installs: Installs, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart exists: point it at the staged virtualenv.
    for snap in (installs.fresh, installs.upgrade):
        unit = tmp_path / "sepas-agent.service"
        unit.write_text(
            snap.unit.replace("/opt/sepas-agent/", f"{installs.stage / VENV}/"),
            encoding="utf-8",
        )
        res = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
        # verify exits 0 even for unknown keys; those show as output, so none is allowed.
        assert res.returncode == 0, res.stdout + res.stderr
        assert (res.stdout + res.stderr).strip() == ""


# -- the upgrade --------------------------------------------------------------------------


def test_upgrade_upgrades_in_place_and_keeps_config_keys_and_buffer_byte_for_byte(
    installs: Installs,
) -> None:
    up = installs.upgrade
    assert "upgrading in place" in up.run.stdout
    assert "exists: kept as it is" in up.run.stdout
    assert up.config == installs.edited_config
    assert up.data == installs.data_before_upgrade
    assert {"node.key", "buffer.key", "buffer.db", "marker"} <= set(up.data)
    assert up.data["node.key"] == installs.fresh.data["node.key"]
    assert up.data["buffer.key"] == installs.fresh.data["buffer.key"]
    assert up.modes == installs.fresh.modes
    data = installs.stage / DATA
    with Buffer.open(data, data_key=load_data_key(data / "buffer.key")) as buf:
        for record_id in installs.buffered_ids:
            assert buf.record(record_id) is not None


def test_upgrade_grants_net_bind_capability_when_the_config_listens_below_1024(
    installs: Installs,
) -> None:
    lines = installs.upgrade.unit.splitlines()
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in lines
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in lines
    assert "his-legacy 0.0.0.0:104" in installs.upgrade.run.stdout
    for directive in HARDENING:
        assert directive in lines, directive


# -- uninstall ----------------------------------------------------------------------------


def test_uninstall_keeps_config_and_data_and_purge_removes_them(
    installs: Installs, tmp_path: Path
) -> None:
    stage = tmp_path / "stage"
    shutil.copytree(installs.stage, stage, symlinks=True)
    kept = uninstall(stage)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert not (stage / UNIT).exists()
    assert not (stage / VENV).exists()
    assert not (stage / "usr/local/bin/sepas-agent").is_symlink()
    assert (stage / CONFIG).read_bytes() == installs.edited_config
    assert file_hashes(stage / DATA) == installs.upgrade.data
    assert "would run: systemctl disable --now sepas-agent" in kept.stdout

    purged = uninstall(stage, "--purge")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert not (stage / "etc/sepas-agent").exists()
    assert not (stage / DATA).exists()
    assert "would run: userdel sepas" in purged.stdout
