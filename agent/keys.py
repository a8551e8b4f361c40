"""The node's secrets on disk: its Ed25519 identity and the buffer's data key.

Responsibility: create, load and describe the two key files a node owns.

- The identity key signs every request to the hub (PROTOCOL.md, "Identity and keys").
  It is a PKCS#8 PEM file, unencrypted, mode 0600; the hub knows its public half
  (SPKI PEM) and the operator compares fingerprints (``SHA256:`` + unpadded standard
  base64 of the SHA-256 of the raw 32-byte public key). That is OpenSSH's notation but
  not its input (OpenSSH hashes its own key blob), so ``ssh-keygen -l`` prints another
  value for the same key: compare only with `fingerprint`.
- The data key encrypts the buffer at rest. It is one line of text,
  ``sepas-data-key-v1:<base64 of 32 bytes>``, so that an operator can copy it into a
  password manager or print it for the safe. Losing it loses the records buffered but
  not yet uploaded, so it is never overwritten.

Invariants:
- A key file is never readable or writable by group or others: created 0600, and
  refused on load when ``mode & 0o077`` (the agent refuses to start, PROTOCOL.md).
- A key file appears whole or not at all: written to a temporary file in the same
  directory (``O_CREAT | O_EXCL``, 0600), fsynced, then renamed (or hard-linked, when
  it must not replace an existing file), and the directory fsynced.
- Nothing here ever logs or puts key material into an exception message.

Must never: overwrite the identity key without ``force``; overwrite a data key at all.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import secrets
import stat
from pathlib import Path
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent.errors import KeyFileError

#: First field of a data-key file; a new format gets a new prefix.
DATA_KEY_PREFIX: Final = "sepas-data-key-v1:"
DATA_KEY_BYTES: Final = 32

# Key files are tiny (an Ed25519 PKCS#8 PEM is 119 bytes); refuse to read a big file.
_MAX_KEY_FILE_BYTES: Final = 64 * 1024

_OVERWRITE_HINT: Final = (
    "Pass --force to replace it. The node then has a new identity: register the new "
    "public key (`sepas-agent keys show`) at the hub, or it will refuse every upload."
)


# --- identity key -----------------------------------------------------------------------


def init_key(path: Path, *, force: bool = False) -> Ed25519PrivateKey:
    """Generate a new Ed25519 identity key and write it to ``path``.

    The file is PKCS#8 PEM, unencrypted, mode 0600, created atomically. A missing
    parent directory is created with mode 0700.

    Args:
        path: where to write the private key.
        force: replace an existing key file. The hub's registration must then be
            updated with the new public key.

    Returns:
        The new private key.

    Raises:
        KeyFileError: ``path`` exists and ``force`` is false, or it cannot be written.
    """
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    try:
        _write_secret_file(path, pem, overwrite=force)
    except FileExistsError:
        raise KeyFileError(
            f"Key file {path} already exists; refusing to overwrite the node's identity.",
            hint=_OVERWRITE_HINT,
        ) from None
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load the node's Ed25519 private key, refusing an unsafe or unsuitable file.

    Raises:
        KeyFileError: the file is missing, not a regular file, readable or writable by
            group or others, not PEM, encrypted, or not an Ed25519 key.
    """
    data = _read_secret_file(path, what="Key file")
    if b"-----BEGIN" not in data:
        raise KeyFileError(
            f"Key file {path} is not a PEM file.",
            hint="Point node.key_file at the file written by `sepas-agent keys init`.",
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography raises TypeError when the PEM is encrypted and no password given.
        raise KeyFileError(
            f"Key file {path} is encrypted; the agent needs an unencrypted PKCS#8 key "
            "protected by its file mode.",
            hint="Create one with `sepas-agent keys init`.",
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(
            f"Key file {path} is PEM but holds no private key the agent can read.",
            hint="Create one with `sepas-agent keys init`.",
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"Key file {path} holds a {_key_kind(key)} key; PROTOCOL.md requires Ed25519.",
            hint="Create an Ed25519 key with `sepas-agent keys init`.",
        )
    return key


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The public key as SPKI PEM text, what the hub's registry stores."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    ).decode("ascii")


def fingerprint(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """``SHA256:`` + unpadded standard base64 of SHA-256 of the raw 32-byte public key.

    A private key is accepted for convenience and fingerprinted by its public half.
    """
    pub = public_key.public_key() if isinstance(public_key, Ed25519PrivateKey) else public_key
    raw = pub.public_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
    )
    digest = hashlib.sha256(raw).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def load_public_key_pem(data: bytes) -> Ed25519PublicKey:
    """Parse an SPKI PEM public key, as registered at the hub.

    Raises:
        KeyFileError: ``data`` is not a PEM public key, or not an Ed25519 one.
    """
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(
            "Not a PEM public key.",
            hint="Use the output of `sepas-agent keys show` on the node.",
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(
            f"The public key is {_key_kind(key)}; PROTOCOL.md requires Ed25519.",
            hint="Use the output of `sepas-agent keys show` on the node.",
        )
    return key


# --- data key ---------------------------------------------------------------------------


def init_data_key(path: Path) -> bytes:
    """Return the buffer's data key, creating ``path`` with a new one if it is missing.

    Never overwrites: if the file exists (or another process creates it first) it is
    loaded and checked like `load_data_key`.

    Raises:
        KeyFileError: the existing file is unsafe or malformed, or it cannot be written.
    """
    if os.path.lexists(path):
        return load_data_key(path)
    key = secrets.token_bytes(DATA_KEY_BYTES)
    line = DATA_KEY_PREFIX + base64.b64encode(key).decode("ascii") + "\n"
    try:
        _write_secret_file(path, line.encode("ascii"), overwrite=False)
    except FileExistsError:
        return load_data_key(path)  # lost a race with another process: use its key
    return key


def load_data_key(path: Path) -> bytes:
    """Read the buffer's 32-byte data key from ``path``.

    Raises:
        KeyFileError: the file is missing, not a regular file, readable or writable by
            group or others, or not one ``sepas-data-key-v1:`` line holding 32 bytes.
    """
    data = _read_secret_file(path, what="Data key file")
    bad = KeyFileError(
        f"Data key file {path} is not a `{DATA_KEY_PREFIX}<base64 of 32 bytes>` line.",
        hint="Restore the file from your backup; without it, buffered records are lost.",
    )
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise bad from None
    if not text.startswith(DATA_KEY_PREFIX):
        raise bad
    try:
        key = base64.b64decode(text[len(DATA_KEY_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise bad from None
    if len(key) != DATA_KEY_BYTES:
        raise bad
    return key


# --- files ------------------------------------------------------------------------------


def _read_secret_file(path: Path, *, what: str) -> bytes:
    """Read a key file after checking, on the open descriptor, that it is safe."""
    try:
        # O_NONBLOCK: opening a FIFO planted at the path must not hang the agent.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} does not exist.") from None
    except PermissionError:
        raise KeyFileError(
            f"{what} {path} cannot be read: permission denied.",
            hint="Run the agent as the user that owns the key file.",
        ) from None
    except OSError as err:
        raise KeyFileError(f"{what} {path} cannot be opened: {err.strerror}.") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(
                f"{what} {path} is not a regular file.",
                hint="Point the configuration at the key file itself.",
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            fix = f"chmod 600 {path}"
            raise KeyFileError(
                f"{what} {path} has mode {mode:04o}: it is readable or writable by group "
                f"or others. Run `{fix}`.",
                hint=f"Run `{fix}`; if others could read it, treat the key as leaked.",
            )
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 8192):
            chunks.append(chunk)
            size += len(chunk)
            if size > _MAX_KEY_FILE_BYTES:
                raise KeyFileError(f"{what} {path} is too large to be a key file.")
        return b"".join(chunks)
    except OSError as err:
        raise KeyFileError(f"{what} {path} cannot be read: {err.strerror}.") from None
    finally:
        os.close(fd)


def _write_secret_file(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        KeyFileError: anything else went wrong; no partial file is left behind.
    """
    directory = path.parent
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise KeyFileError(f"Cannot create directory {directory}: {err.strerror}.") from None
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(path)
    tmp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask left
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
        _fsync_dir(directory)
    except FileExistsError:
        raise
    except OSError as err:
        raise KeyFileError(f"Cannot write {path}: {err.strerror}.") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _link_new(tmp: Path, path: Path) -> None:
    """Give ``tmp``'s inode the name ``path`` only if that name is free.

    A hard link fails atomically with FileExistsError when ``path`` exists, so two
    processes initialising the same data key cannot replace each other's key (one of
    them would otherwise encrypt with a key that no longer exists on disk).
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        # A filesystem without hard links: fall back to check-then-rename.
        if os.path.lexists(path):
            raise FileExistsError(path) from None
        os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _key_kind(key: object) -> str:
    """A short name for a key's algorithm, for error messages."""
    name = type(key).__name__.removeprefix("_")  # RSAPrivateKey, ECPublicKey, ...
    return name.removesuffix("PrivateKey").removesuffix("PublicKey") or "unknown"
