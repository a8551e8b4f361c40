"""Blobs at the hub: a content-addressed directory (PROTOCOL.md, PUT /v1/blobs/sha256/…).

Responsibility: keep each blob (a DICOM instance, a PDF…) once, under the SHA-256 of
its bytes: ``<root>/ab/cdef…`` where ``abcdef…`` is the 64-hex digest.

Invariants:
- A blob file appears whole or not at all: written to a temporary file in the same
  directory, fsynced, renamed into place, and the directory fsynced. A crash leaves
  at most a ``.tmp`` file, never a short blob under a digest name.
- The name is the digest of the content: `put` checks it before anything is written,
  so a file under a digest name always holds those bytes.
- Files are 0600 and directories 0700: blobs hold patient data.

Must never: log or put blob content in an exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path
from typing import Final

_HEX_RE: Final = re.compile(r"[0-9a-f]{64}")


def is_sha256_hex(value: str) -> bool:
    """Whether ``value`` is 64 lower-case hex digits, the only form the hub accepts."""
    return _HEX_RE.fullmatch(value) is not None


class BlobStore:
    """Content-addressed files under ``root``. Safe for several threads and processes:
    two writers of one digest write the same bytes and the later rename wins."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sha256_hex: str) -> Path:
        """Where the blob with this digest lives (whether or not it exists).

        Raises:
            ValueError: ``sha256_hex`` is not 64 lower-case hex digits.
        """
        if not is_sha256_hex(sha256_hex):
            raise ValueError("a blob name is 64 lower-case hex digits")
        return self.root / sha256_hex[:2] / sha256_hex[2:]

    def has(self, sha256_hex: str) -> bool:
        """Whether the blob is held."""
        return self.path(sha256_hex).is_file()

    def put(self, sha256_hex: str, data: bytes) -> bool:
        """Store ``data`` under its digest; True if it is new, False if already held.

        Raises:
            ValueError: ``sha256_hex`` is malformed or is not the SHA-256 of ``data``.
            OSError: the directory cannot be written.
        """
        final = self.path(sha256_hex)
        if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), sha256_hex):
            raise ValueError("the content's SHA-256 is not the blob's name")
        if final.is_file():
            return False
        directory = final.parent
        if not directory.is_dir():
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.mkdir(mode=0o700, exist_ok=True)
            _fsync_dir(self.root)  # the new directory's entry survives a power cut too
        tmp = directory / f".{final.name[:16]}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            _fsync_dir(directory)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return True

    def read(self, sha256_hex: str) -> bytes:
        """The blob's bytes (for tools and tests; the HTTP API never serves blobs).

        Raises:
            FileNotFoundError: the blob is not held.
        """
        return self.path(sha256_hex).read_bytes()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
