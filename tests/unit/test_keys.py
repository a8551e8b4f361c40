"""agent.keys: the node's identity key and the buffer's data key on disk."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent import keys
from agent.errors import KeyFileError

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | Ed25519PrivateKey


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _pkcs8(key: PrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


# --- init_key ---------------------------------------------------------------------------


def test_init_key_writes_an_unencrypted_pkcs8_pem_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    key = keys.init_key(path)

    assert _mode(path) == 0o600
    data = path.read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, not OpenSSH/raw
    loaded = serialization.load_pem_private_key(data, password=None)
    assert isinstance(loaded, Ed25519PrivateKey)
    assert keys.fingerprint(loaded.public_key()) == keys.fingerprint(key.public_key())


def test_init_key_creates_a_missing_parent_directory_with_mode_0700(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "sepas" / "node.key"
    keys.init_key(path)
    assert _mode(path.parent) == 0o700
    assert _mode(path) == 0o600


def test_init_key_is_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        keys.init_key(tmp_path / "node.key")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "node.key") == 0o600


def test_init_key_leaves_no_temporary_file_behind(tmp_path: Path) -> None:
    keys.init_key(tmp_path / "node.key")
    keys.init_key(tmp_path / "node.key", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]


def test_init_key_refuses_to_overwrite_without_force_and_keeps_the_old_key(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node.key"
    keys.init_key(path)
    before = path.read_bytes()

    with pytest.raises(KeyFileError, match="already exists") as info:
        keys.init_key(path)

    assert "--force" in info.value.hint
    assert "register the new public key" in info.value.hint
    assert path.read_bytes() == before


def test_init_key_with_force_replaces_the_key_and_keeps_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    old = keys.init_key(path)
    new = keys.init_key(path, force=True)
    assert keys.fingerprint(new) != keys.fingerprint(old)
    assert keys.fingerprint(keys.load_private_key(path)) == keys.fingerprint(new)
    assert _mode(path) == 0o600


# --- load_private_key -------------------------------------------------------------------


def test_load_private_key_returns_the_key_init_wrote(tmp_path: Path) -> None:
    key = keys.init_key(tmp_path / "node.key")
    loaded = keys.load_private_key(tmp_path / "node.key")
    assert keys.public_pem(loaded) == keys.public_pem(key)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660])
def test_load_private_key_refuses_a_file_group_or_others_can_read_or_write(
    tmp_path: Path, mode: int
) -> None:
    path = tmp_path / "node.key"
    keys.init_key(path)
    path.chmod(mode)

    with pytest.raises(KeyFileError) as info:
        keys.load_private_key(path)

    message = str(info.value)
    assert f"{mode:04o}" in message
    assert f"chmod 600 {path}" in message
    assert f"chmod 600 {path}" in info.value.hint


def test_load_private_key_accepts_an_owner_read_only_file(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    keys.init_key(path)
    path.chmod(0o400)
    assert isinstance(keys.load_private_key(path), Ed25519PrivateKey)


def test_load_private_key_says_when_the_file_is_missing(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist") as info:
        keys.load_private_key(tmp_path / "absent.key")
    assert "keys init" in info.value.hint


def test_load_private_key_refuses_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    path.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        keys.load_private_key(path)


def test_load_private_key_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    os.mkfifo(path, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        keys.load_private_key(path)


def test_load_private_key_refuses_a_file_that_is_not_pem(tmp_path: Path) -> None:
    path = _write(tmp_path / "node.key", b"\x00\x01 definitely not a key\n")
    with pytest.raises(KeyFileError, match="not a PEM file"):
        keys.load_private_key(path)


def test_load_private_key_refuses_a_pem_that_holds_no_private_key(tmp_path: Path) -> None:
    pem = keys.public_pem(Ed25519PrivateKey.generate()).encode()
    path = _write(tmp_path / "node.key", pem)
    with pytest.raises(KeyFileError, match="holds no private key"):
        keys.load_private_key(path)


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RSA"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "EC"),
    ],
    ids=["rsa", "ec"],
)
def test_load_private_key_refuses_a_key_that_is_not_ed25519(
    tmp_path: Path, make: Callable[[], PrivateKey], kind: str
) -> None:
    path = _write(tmp_path / "node.key", _pkcs8(make()))
    with pytest.raises(
        KeyFileError, match=re.escape(f"holds a {kind} key; PROTOCOL.md requires Ed25519")
    ):
        keys.load_private_key(path)


def test_load_private_key_refuses_an_encrypted_key(tmp_path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.BestAvailableEncryption(b"secret"),
    )
    path = _write(tmp_path / "node.key", pem)
    with pytest.raises(KeyFileError, match="encrypted"):
        keys.load_private_key(path)


def test_key_file_errors_never_contain_key_material(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    keys.init_key(path)
    secret_line = path.read_text().splitlines()[1]
    path.chmod(0o644)
    with pytest.raises(KeyFileError) as info:
        keys.load_private_key(path)
    assert secret_line not in str(info.value)
    assert secret_line not in info.value.hint


# --- public key, fingerprint ------------------------------------------------------------


def test_fingerprint_is_sha256_of_the_raw_public_key_in_unpadded_base64() -> None:
    # RFC 8032 section 7.1, TEST 1: a public key whose raw bytes are known.
    raw = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    public_key = Ed25519PublicKey.from_public_bytes(raw)
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")

    assert keys.fingerprint(public_key) == expected
    # Pinned too, so that the recipe cannot drift on both sides at once.
    assert expected == "SHA256:If4x36FUomFia/hUBG/SJxt77UtqvkWqWId+9H+XIbk"


def test_fingerprint_of_a_private_key_is_that_of_its_public_half() -> None:
    key = Ed25519PrivateKey.generate()
    assert keys.fingerprint(key) == keys.fingerprint(key.public_key())


def test_public_pem_is_spki_and_loads_back_as_the_same_key() -> None:
    key = Ed25519PrivateKey.generate()
    pem = keys.public_pem(key)
    assert pem.startswith("-----BEGIN PUBLIC KEY-----\n")
    loaded = keys.load_public_key_pem(pem.encode())
    assert keys.fingerprint(loaded) == keys.fingerprint(key)
    assert keys.public_pem(key.public_key()) == pem


def test_load_public_key_pem_refuses_an_rsa_public_key() -> None:
    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )
    with pytest.raises(KeyFileError, match=re.escape("RSA; PROTOCOL.md requires Ed25519")):
        keys.load_public_key_pem(pem)


def test_load_public_key_pem_refuses_garbage() -> None:
    with pytest.raises(KeyFileError, match="Not a PEM public key"):
        keys.load_public_key_pem(b"ssh-ed25519 AAAA...")


# --- data key ---------------------------------------------------------------------------


def test_init_data_key_writes_one_prefixed_base64_line_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "data.key"
    key = keys.init_data_key(path)

    assert len(key) == 32
    assert _mode(path) == 0o600
    text = path.read_text()
    assert text == "sepas-data-key-v1:" + base64.b64encode(key).decode() + "\n"


def test_init_data_key_never_overwrites_an_existing_key(tmp_path: Path) -> None:
    path = tmp_path / "data.key"
    first = keys.init_data_key(path)
    before = path.read_bytes()
    assert keys.init_data_key(path) == first
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.key"]


def test_init_data_key_refuses_an_existing_unsafe_file_rather_than_replacing_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "data.key"
    keys.init_data_key(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="0644"):
        keys.init_data_key(path)


def test_load_data_key_reads_what_init_wrote(tmp_path: Path) -> None:
    key = keys.init_data_key(tmp_path / "data.key")
    assert keys.load_data_key(tmp_path / "data.key") == key


def test_load_data_key_says_when_the_file_is_missing(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        keys.load_data_key(tmp_path / "data.key")


def test_load_data_key_refuses_mode_0644_naming_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "data.key"
    keys.init_data_key(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match=re.escape(f"chmod 600 {path}")):
        keys.load_data_key(path)


@pytest.mark.parametrize(
    "content",
    [
        "sepas-data-key-v1:" + base64.b64encode(b"k" * 31).decode(),  # 31 bytes
        "sepas-data-key-v1:" + base64.b64encode(b"k" * 33).decode(),  # 33 bytes
        "sepas-data-key-v1:not base64!",
        "sepas-data-key-v2:" + base64.b64encode(b"k" * 32).decode(),  # unknown format
        base64.b64encode(b"k" * 32).decode(),  # no prefix
        "",
    ],
    ids=["short", "long", "not-base64", "other-version", "no-prefix", "empty"],
)
def test_load_data_key_refuses_a_malformed_file(tmp_path: Path, content: str) -> None:
    path = _write(tmp_path / "data.key", content.encode())
    with pytest.raises(KeyFileError, match="sepas-data-key-v1"):
        keys.load_data_key(path)


def test_load_data_key_refuses_raw_binary_key_bytes(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.key", bytes(range(200, 232)))
    with pytest.raises(KeyFileError, match="sepas-data-key-v1"):
        keys.load_data_key(path)
