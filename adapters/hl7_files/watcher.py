"""The ``hl7-files`` adapter: takes HL7 v2 files a LIS or HIS drops in a directory.

Responsibility: on each `Hl7FilesWatcher.poll`, list the files in ``directory`` that
match ``pattern`` (that directory only; never ``done/`` or ``failed/`` below it), take
those that have stopped changing, oldest first, and for each: cut it into messages
(`adapters.hl7.intake.split_messages`), judge each message as the MLLP listener does
(`adapters.hl7.intake.check`), commit the accepted ones raw (``put_raw``, keyed by
MSH-10 + MSH-7) and quarantine the refused ones, then move the file out of the
directory. The mapping worker (`adapters.hl7.runner`) turns the committed rows into
Records behind, as for MLLP.

Where a file goes:
- ``done_dir``: at least one message of it is stored, and every message is accounted
  for in the buffer: stored (raw rows) or refused and kept in the quarantine with its
  reason. A file is a transport, not a unit of meaning: its good messages must not wait
  for its bad ones, and the bad ones are where an operator looks for them anyway
  (`sepas-agent dead-letter list`), one entry each, with the reason; each refusal is
  also logged.
- ``failed_dir``, with ``<name>.reason`` beside it (short, no patient data): no message
  of it could be stored (all refused, which are then in the quarantine; or not HL7 at
  all; or empty), or a message in it was larger than ``max_message_bytes`` (not
  stored anywhere but in that file; the others are stored), or it could not be read,
  or taking it failed unexpectedly, `READ_ATTEMPTS` polls in a row (so that one bad
  file never holds up the others), or it is a symbolic link (never followed). Moving a
  failed file back into ``directory`` reads it again; what was stored before is
  recognised and stored once.

"Stopped changing": a file is taken when its size and modification time are the same
as at an earlier poll at least ``settle_secs`` ago, and it was not modified in the
last ``settle_secs`` (a time stamp in the future, from a sender's skewed clock over a
share, is judged by the first rule alone). With the defaults a new file is taken at
the second poll that sees it; ``settle_secs = 0`` takes it at the first. Hidden and
temporary names (``.x``, ``~x``, ``x~``, ``x.tmp``, ``x.part``, ...) are never taken,
so a sender that writes under such a name and renames when done is never read
half-written. The file is read only up to the size judged settled; if it changed while
being read it is not moved, and is read again once it settles.

Memory: a file is read in chunks and cut at message starts (`iter_messages`), so at
most about ``max_message_bytes`` + `CHUNK_BYTES` of it is held, whatever its size;
a larger message is skipped without being held (HL7-INTAKE.md rule 12).

Crash safety (kill -9 anywhere; tests/reliability/test_hl7_files_crash.py):
1. Every message of a file is committed (``put_raw``, fsync'd) or quarantined before
   the file leaves ``directory``. A crash before the move leaves the file where it was;
   the next poll reads it again, and both writes are idempotent: ``put_raw`` on
   MSH-10 + MSH-7 (HL7-INTAKE.md rule 13), the quarantine on the bytes' SHA-256. So a
   crash never loses a message (the file stays until all are stored) and never doubles
   one.
2. The move never overwrites and never leaves two copies: a hard link under a free
   name (``name``, then ``stem.1.ext``, ``stem.2.ext``, ...), fsync of the target
   directory, the ``.reason`` file (failed only), then unlink of the inbox name and
   fsync of the inbox. A crash between link and unlink leaves one file under two
   names; the next move finds its own link (same device and inode) and only removes
   the inbox name. Where hard links are not supported (some network shares), an
   ``os.rename`` to a name checked free (atomic; ``.reason`` written first) is used;
   it could overwrite only a file another program puts there at that very instant.
   Moving needs ``done_dir``/``failed_dir`` on the same filesystem as ``directory``
   (`checks` says so when not); a file that cannot be moved stays and is read again.

Never: log message content or file names (LIS exports are often named after the
patient or the accession): log lines carry a short keyed hash of the name (``file``,
also written in the ``.reason`` file), counts, row ids and intake reasons, which hold
no patient data; overwrite a file in ``done_dir``/``failed_dir``; follow a symbolic
link; move a file before all its messages are stored.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Final

from adapters.hl7 import intake
from adapters.hl7.intake import MEDIA_TYPE, Hl7Refusal
from adapters.hl7.runner import MapFn, MappingRunner
from adapters.hl7_files.settings import Hl7FilesSettings
from adapters.hl7_mllp.listener import _Throttle
from agent.adapter import AdapterContext, Check, PollReport
from agent.config import AdapterSettings
from agent.errors import BackfillUnsupportedError, CapacityExceededError, StorageError

log = logging.getLogger(__name__)

KIND: Final = "hl7-files"
#: Bytes read from a file at a time.
CHUNK_BYTES: Final = 1 << 20
#: Polls in a row a file may fail to be read before it is moved to failed_dir.
READ_ATTEMPTS: Final = 3
#: At most one log line per (event, key) per this many seconds (STYLE.md 3.7).
LOG_EVERY_SECS: Final = 60.0
#: Lines of per-message detail in a .reason file.
REASON_LINES: Final = 50
REASON_SUFFIX: Final = ".reason"
#: Names never taken, whatever the pattern: hidden, editor and transfer temporaries.
_TEMP_PREFIXES: Final = (".", "~")
_TEMP_SUFFIXES: Final = (
    "~",
    ".tmp",
    ".temp",
    ".part",
    ".partial",
    ".filepart",
    ".crdownload",
    ".swp",
    ".lock",
)
#: errno values of a filesystem without hard links: fall back to a checked rename.
_NO_LINKS: Final = frozenset(
    {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EACCES}
)
_O_NOFOLLOW: Final[int] = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC: Final[int] = getattr(os, "O_CLOEXEC", 0)
#: A message start inside a file: MSH at the start of a line (as split_messages cuts).
_LINE_MSH: Final = re.compile(rb"[\r\n]MSH")


@dataclass(frozen=True, slots=True)
class Oversize:
    """A message of a file larger than the limit: skipped, not held."""

    size: int


def iter_messages(
    read: Callable[[int], bytes], limit: int, *, chunk: int = CHUNK_BYTES
) -> Iterator[bytes | Oversize]:
    """The messages of a file, as `intake.split_messages` would cut its whole content,
    reading it through ``read`` in chunks and holding at most about ``limit + chunk``
    bytes. A message (or stray text) larger than ``limit`` comes out as `Oversize`."""
    buf = b""
    skipped = 0  # > 0: inside an oversize message; bytes of it dropped (not in buf)
    while True:
        data = read(chunk)
        eof = not data
        buf += data
        if skipped:
            m = _LINE_MSH.search(buf)
            if m is None:
                if eof:
                    yield Oversize(skipped + len(buf))
                    return
                keep = min(3, len(buf))  # "\rMS" may end this chunk
                skipped += len(buf) - keep
                buf = buf[len(buf) - keep :]
                continue
            yield Oversize(skipped + m.start() + 1)
            skipped = 0
            buf = buf[m.start() + 1 :]
        if eof:
            cut = len(buf)
        else:
            starts = [m.start() + 1 for m in _LINE_MSH.finditer(buf)]
            cut = starts[-1] if starts else 0
        if cut:
            for piece in intake.split_messages(buf[:cut]):
                yield piece if len(piece) <= limit else Oversize(len(piece))
            buf = buf[cut:]
        if eof:
            return
        if len(buf) > limit:
            keep = 3
            skipped = len(buf) - keep
            buf = buf[-keep:]


def is_temporary(name: str) -> bool:
    """Hidden and temporary names, never taken whatever the pattern."""
    low = name.lower()
    return low.startswith(_TEMP_PREFIXES) or low.endswith(_TEMP_SUFFIXES)


@dataclass(slots=True)
class _Seen:
    """A file's (size, mtime) and since when the polls have seen it so."""

    size: int
    mtime_ns: int
    since: float


@dataclass(slots=True)
class _Outcome:
    """What reading one file gave."""

    messages: int = 0
    stored: int = 0  # committed to raw intake (new or already there)
    new: int = 0
    quarantined: int = 0
    oversize: int = 0
    details: list[str] = field(default_factory=list)  # per message problems, for .reason


class _Halt(Exception):
    """Stop this poll: the buffer refuses writes (full, or failing)."""


class Hl7FilesWatcher:
    """A ``[[adapters]]`` entry of kind ``hl7-files``: a Poller, plus start()/stop() for
    its mapping worker."""

    kind: str = KIND

    def __init__(
        self,
        settings: Hl7FilesSettings,
        ctx: AdapterContext,
        *,
        map_fn: MapFn | None = None,
        mapping: bool = True,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        """Args:
        map_fn: the mapper for the runner (default: ``adapters.hl7.mapping``).
        mapping: False runs intake only; committed rows wait for a runner (tests, or
            a second process that maps).
        chunk_bytes: how much of a file is read at a time (tests make it small).
        """
        self.name: str = settings.name
        self.settings = settings
        self.ctx = ctx
        self._chunk = chunk_bytes
        self._lock = threading.Lock()  # one poll at a time
        self._stopping = threading.Event()
        self._seen: dict[str, _Seen] = {}
        self._read_failures: dict[str, int] = {}
        self._throttle = _Throttle(LOG_EVERY_SECS)
        self._runner = (
            MappingRunner(
                ctx.sink,
                self.name,
                KIND,
                ctx.node_id,
                settings,
                map_fn,
                default_encoding=settings.encoding,
                on_committed=ctx.on_committed,
            )
            if mapping
            else None
        )

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def runner(self) -> MappingRunner | None:
        return self._runner

    def start(self) -> None:
        """Start the mapping worker (rows committed by polls are mapped behind)."""
        self._stopping.clear()
        if self._runner is not None:
            self._runner.start()

    def stop(self, *, timeout_secs: float = 10.0) -> None:
        """Make a running poll stop after the message being committed (its file stays
        in ``directory`` and is read again later), stop the mapping worker; return
        within ``timeout_secs``."""
        self._stopping.set()
        if self._lock.acquire(timeout=max(0.0, timeout_secs / 2)):
            self._lock.release()
        if self._runner is not None:
            self._runner.stop(timeout_secs=max(0.0, timeout_secs / 2))

    # -- the Poller protocol --------------------------------------------------------------

    def backfill(
        self,
        since: date,
        until: date,
        *,
        progress: Callable[[PollReport], None] | None = None,
    ) -> PollReport:
        """Files are taken as they arrive: there is no past to ask for.

        Raises:
            BackfillUnsupportedError: always.
        """
        raise BackfillUnsupportedError(
            f"adapter {self.name!r} ({KIND}) cannot backfill: a folder holds only the "
            "files not taken yet",
            hint=f"Ask the sender to export the period again into {self.settings.directory}; "
            f"or move files back from {self.settings.done_path} into it: they are read "
            "again, and messages already stored are stored once.",
        )

    def poll(self) -> PollReport:
        """Take every settled file: store its messages, then move it to done or failed.

        Never raises: a file that cannot be read or moved, a buffer that refuses
        writes (full, failing) or an unexpected error while taking a file leave the
        file where it is for the next poll, and the report says ``complete=False``
        (with a note). A file that cannot be read, or that fails unexpectedly,
        `READ_ATTEMPTS` polls in a row goes to ``failed_dir``, so that it never holds
        up the files behind it.
        """
        report = PollReport()
        with self._lock:
            if self._stopping.is_set():
                report.complete = False
                return report
            if not self._ensure_dirs(report):
                return report
            files_done = files_failed = 0
            try:
                for name, st in self._settled(report):
                    if self._stopping.is_set():
                        report.complete = False
                        break
                    try:
                        where = self._take(name, st, report)
                    except _Halt:
                        raise
                    except Exception as e:  # noqa: BLE001 - one file never stops the others
                        where = self._attempt_failed(
                            self.settings.directory / name,
                            name,
                            f"taking it failed unexpectedly ({type(e).__name__})",
                            report,
                        )
                    files_done += where == "done"
                    files_failed += where == "failed"
            except _Halt:
                report.complete = False
            finally:
                if report.new:
                    self._after_commit()
            if files_done or files_failed:
                report.notes.append(f"{files_done} file(s) done, {files_failed} failed")
        return report

    def checks(self) -> Sequence[Check]:
        """`doctor`: the directory can be read and written; done/failed exist or can
        be created, and are on its filesystem. Never raises."""
        out: list[Check] = []
        directory = self.settings.directory
        dev: int | None = None
        name = f"{self.name}: directory"
        try:
            if not directory.is_dir():
                out.append(
                    Check(
                        name,
                        False,
                        f"{directory} does not exist or is not a directory",
                        hint="Create it (or mount the share) and give the agent's user read "
                        "and write access, or fix `directory`.",
                    )
                )
            elif not os.access(directory, os.R_OK | os.X_OK):
                out.append(
                    Check(
                        name,
                        False,
                        f"{directory} cannot be listed or read by this user",
                        hint=f"Give the agent's user read access: chgrp sepas {directory}; "
                        f"chmod g+rx {directory}.",
                    )
                )
            elif not os.access(directory, os.W_OK | os.X_OK):
                out.append(
                    Check(
                        name,
                        False,
                        f"{directory} is not writable: taken files cannot be moved out of it",
                        hint=f"Give the agent's user write access: chmod g+w {directory}.",
                    )
                )
            else:
                dev = os.stat(directory).st_dev
                waiting = self._count_waiting()
                out.append(Check(name, True, f"{directory}: {waiting} file(s) waiting"))
        except Exception as e:  # noqa: BLE001 - checks never raise
            out.append(Check(name, False, f"{directory} cannot be used: {_os_reason(e)}"))
        for key, target in (
            ("done_dir", self.settings.done_path),
            ("failed_dir", self.settings.failed_path),
        ):
            out.append(self._check_target(key, target, dev))
        return out

    # -- finding settled files ------------------------------------------------------------

    def _ensure_dirs(self, report: PollReport) -> bool:
        # Never create the watched directory itself: a share that is not mounted must
        # not be replaced by an empty folder on the local disk.
        if not self.settings.directory.is_dir():
            self._problem(
                "hl7.file_dir_missing",
                logging.ERROR,
                "The watched directory does not exist (or is not mounted); no file is taken.",
                key="missing",
                report=report,
                note="directory does not exist",
            )
            return False
        for key, target in (
            ("done_dir", self.settings.done_path),
            ("failed_dir", self.settings.failed_path),
        ):
            try:
                target.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                self._problem(
                    "hl7.file_dir_unusable",
                    logging.ERROR,
                    f"The {key} cannot be created; no file is taken until it can.",
                    key=key,
                    report=report,
                    note=f"{key} cannot be created: {_os_reason(e)}",
                    error=_os_reason(e),
                )
                return False
        return True

    def _settled(self, report: PollReport) -> list[tuple[str, os.stat_result]]:
        """Names (with their lstat) of files to take now, oldest first."""
        now = self.ctx.clock()
        settle = self.settings.settle_secs
        try:
            with os.scandir(self.settings.directory) as it:
                entries = list(it)
        except OSError as e:
            self._problem(
                "hl7.file_dir_unreadable",
                logging.ERROR,
                "The watched directory cannot be listed.",
                key=str(e.errno),
                report=report,
                note=f"directory cannot be listed: {_os_reason(e)}",
                error=_os_reason(e),
            )
            return []
        pattern = self.settings.pattern.lower()
        seen: dict[str, _Seen] = {}
        ready: list[tuple[int, str, os.stat_result]] = []
        for entry in entries:
            name = entry.name
            if is_temporary(name) or not fnmatch.fnmatchcase(name.lower(), pattern):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # gone since listed
            if stat.S_ISLNK(st.st_mode):
                ready.append((st.st_mtime_ns, name, st))  # made at once; goes to failed
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # directories (done/, failed/), FIFOs, devices: not ours
            prev = self._seen.get(name)
            if prev is None or (prev.size, prev.mtime_ns) != (st.st_size, st.st_mtime_ns):
                prev = _Seen(st.st_size, st.st_mtime_ns, now)
            seen[name] = prev
            age = now - st.st_mtime_ns / 1e9
            if now - prev.since < settle or 0 <= age < settle:
                continue
            ready.append((st.st_mtime_ns, name, st))
        self._seen = seen
        self._read_failures = {n: c for n, c in self._read_failures.items() if n in seen}
        ready.sort(key=lambda t: (t[0], t[1]))
        return [(name, st) for _, name, st in ready]

    def _count_waiting(self) -> int:
        pattern = self.settings.pattern.lower()
        with os.scandir(self.settings.directory) as it:
            return sum(
                1
                for e in it
                if not is_temporary(e.name)
                and fnmatch.fnmatchcase(e.name.lower(), pattern)
                and e.is_file(follow_symlinks=False)
            )

    # -- one file -------------------------------------------------------------------------

    def _take(self, name: str, st: os.stat_result, report: PollReport) -> str:
        """Read, store and move one file; returns "done", "failed" or "" (left)."""
        path = self.settings.directory / name
        ref = self.ctx.patient_hash(name)
        if stat.S_ISLNK(st.st_mode):
            return self._fail(
                path, ref, "it is a symbolic link; links are not followed", [], report
            )
        try:
            fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
        except FileNotFoundError:
            return ""  # removed by the sender since listed
        except OSError as e:
            return self._attempt_failed(path, name, _read_failure(e), report)
        try:
            with os.fdopen(fd, "rb") as f:
                fst = os.fstat(f.fileno())
                if (fst.st_size, fst.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                    return ""  # changed since judged settled: judged again next poll
                outcome = self._read(f.read, st.st_size, report)
                after = os.fstat(f.fileno())
        except OSError as e:
            return self._attempt_failed(path, name, _read_failure(e), report)
        self._read_failures.pop(name, None)
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            log.debug(
                "A file changed while it was read; it is read again once it settles.",
                extra={"event": "hl7.file_changed", "adapter": self.name, "file": ref},
            )
            return ""
        if outcome.stored and not outcome.oversize:
            return self._done(path, ref, outcome, report)
        if not outcome.messages:
            why = "the file is empty" if st.st_size == 0 else "the file holds no HL7 message"
        elif outcome.oversize:
            why = (
                f"{outcome.oversize} message(s) larger than max_message_bytes "
                f"({self.settings.max_message_bytes} bytes) were not stored"
            )
        else:
            why = "no message in it could be stored"
        details = [
            *outcome.details,
            f"stored: {outcome.stored} of {outcome.messages} message(s); "
            f"quarantined: {outcome.quarantined} (see `sepas-agent dead-letter list`)",
        ]
        return self._fail(path, ref, why, details, report)

    def _read(self, read: Callable[[int], bytes], size: int, report: PollReport) -> _Outcome:
        """Store or quarantine every message of the file, reading at most ``size``
        bytes (what was judged settled).

        Raises:
            _Halt: the buffer refuses writes; the file stays.
            OSError: reading failed.
        """
        left = size

        def bounded(n: int) -> bytes:
            nonlocal left
            data = read(min(n, left)) if left > 0 else b""
            left -= len(data)
            return data

        out = _Outcome()
        limit = self.settings.max_message_bytes
        for piece in iter_messages(bounded, limit, chunk=self._chunk):
            if self._stopping.is_set():
                raise _Halt
            out.messages += 1
            report.found += 1
            n = out.messages
            if isinstance(piece, Oversize):
                out.oversize += 1
                out.details.append(
                    f"message {n}: {piece.size} bytes, larger than max_message_bytes; not stored"
                )
                self._warn(
                    "hl7.message_oversize",
                    "A message in a file is over max_message_bytes; the file goes to failed.",
                    key="oversize",
                    size=piece.size,
                    limit=limit,
                )
                continue
            try:
                checked = intake.check(piece, default_encoding=self.settings.encoding)
            except Hl7Refusal as refusal:
                reason = f"{refusal.code}: {refusal.reason}"
                qid = self._quarantine(piece, f"{reason} (file message {n})")
                out.quarantined += 1
                report.quarantined += 1
                out.details.append(f"message {n}: {reason} (quarantine id {qid})")
                self._warn(
                    "hl7.message_refused",
                    "Refused an HL7 message from a file; it is in quarantine.",
                    key=refusal.reason,
                    code=refusal.code,
                    reason=refusal.reason,
                    quarantine_id=qid,
                )
                continue
            except Exception as e:  # noqa: BLE001 - an intake bug: keep the bytes, carry on
                reason = f"intake failed: {type(e).__name__}"
                qid = self._quarantine(piece, f"{reason} (file message {n})")
                out.quarantined += 1
                report.quarantined += 1
                out.details.append(f"message {n}: {reason} (quarantine id {qid})")
                self._warn(
                    "hl7.intake_failed",
                    "The HL7 intake check failed unexpectedly; the message is in quarantine.",
                    key=type(e).__name__,
                    error_type=type(e).__name__,
                    quarantine_id=qid,
                )
                continue
            for warning in checked.warnings:
                self._warn(
                    "hl7.message_warning",
                    "An accepted HL7 message needed a correction.",
                    key=warning,
                    warning=warning,
                )
            raw_id, new = self._store(piece, checked.dedupe_key)
            out.stored += 1
            out.new += new
            report.new += new
            report.duplicates += not new
            log.debug(
                "HL7 message from a file committed.",
                extra={
                    "event": "hl7.message_committed",
                    "adapter": self.name,
                    "raw_id": raw_id,
                    "new": new,
                    "size": len(piece),
                },
            )
        return out

    def _store(self, data: bytes, dedupe_key: str) -> tuple[int, bool]:
        try:
            return self.ctx.sink.put_raw(
                data, adapter=self.name, media_type=MEDIA_TYPE, dedupe_key=dedupe_key
            )
        except CapacityExceededError:
            self._warn(
                "hl7.buffer_full",
                "The buffer is full: files wait in the directory until it drains.",
                key="full",
            )
            raise _Halt from None
        except StorageError as e:
            self._store_failed(e)
            raise _Halt from None

    def _quarantine(self, data: bytes, reason: str) -> int:
        try:
            return self.ctx.sink.quarantine(
                data, adapter=self.name, reason=reason, media_type=MEDIA_TYPE
            )
        except CapacityExceededError:
            self._warn(
                "hl7.buffer_full",
                "The buffer is full: files wait in the directory until it drains.",
                key="full",
            )
            raise _Halt from None
        except StorageError as e:
            self._store_failed(e)
            raise _Halt from None

    def _store_failed(self, e: StorageError) -> None:
        held = self._throttle.allow(f"hl7.store_failed:{type(e).__name__}")
        if held is not None:
            log.error(
                "A message from a file could not be stored; the file stays and is read again.",
                extra={
                    "event": "hl7.store_failed",
                    "adapter": self.name,
                    "error_type": type(e).__name__,
                    "suppressed": held,
                },
            )

    def _attempt_failed(self, path: Path, name: str, why: str, report: PollReport) -> str:
        """A file could not be taken this time (``why``: no patient data): left for the
        next poll, or moved to failed_dir after `READ_ATTEMPTS` polls in a row."""
        ref = self.ctx.patient_hash(name)
        n = self._read_failures.get(name, 0) + 1
        self._read_failures[name] = n
        if n >= READ_ATTEMPTS:
            self._read_failures.pop(name, None)
            return self._fail(path, ref, f"{why}, {n} polls in a row", [], report)
        self._problem(
            "hl7.file_not_taken",
            logging.WARNING,
            "A file could not be taken; it is tried again at the next poll.",
            key=why,
            report=report,
            note="a file could not be taken; tried again next poll",
            file=ref,
            reason=why,
        )
        return ""

    # -- moving ---------------------------------------------------------------------------

    def _done(self, path: Path, ref: str, outcome: _Outcome, report: PollReport) -> str:
        try:
            _move_into(path, self.settings.done_path, None)
        except OSError as e:
            self._move_failed(e, ref, report)
            return ""
        log.info(
            "Took an HL7 file; moved it to done_dir.",
            extra={
                "event": "hl7.file_done",
                "adapter": self.name,
                "file": ref,
                "count": outcome.messages,
                "new": outcome.new,
                "quarantined": outcome.quarantined,
            },
        )
        return "done"

    def _fail(self, path: Path, ref: str, why: str, details: list[str], report: PollReport) -> str:
        shown = details[:REASON_LINES]
        if len(details) > REASON_LINES:
            shown.append(f"... and {len(details) - REASON_LINES} more")
        when = datetime.fromtimestamp(self.ctx.clock(), UTC).isoformat(timespec="seconds")
        text = "\n".join(
            [
                f"sepas-agent adapter {self.name!r} ({KIND}) did not take this file: {why}.",
                *shown,
                f"at: {when}; log reference (file): {ref}",
                "",
            ]
        )
        try:
            _move_into(path, self.settings.failed_path, text)
        except OSError as e:
            self._move_failed(e, ref, report)
            return ""
        log.warning(
            "Could not take an HL7 file; moved it to failed_dir with a .reason file.",
            extra={"event": "hl7.file_failed", "adapter": self.name, "file": ref, "reason": why},
        )
        return "failed"

    def _move_failed(self, e: OSError, ref: str, report: PollReport) -> None:
        cross = e.errno == errno.EXDEV
        self._problem(
            "hl7.file_move_failed",
            logging.ERROR,
            "A taken file could not be moved out of the directory; its messages are "
            "stored and it is read again at the next poll."
            + (" done_dir/failed_dir must be on the directory's filesystem." if cross else ""),
            key=str(e.errno),
            report=report,
            note=f"a file could not be moved: {_os_reason(e)}",
            file=ref,
            error=_os_reason(e),
        )

    # -- helpers --------------------------------------------------------------------------

    def _check_target(self, key: str, target: Path, dev: int | None) -> Check:
        name = f"{self.name}: {key}"
        try:
            probe = target
            while not probe.exists() and probe.parent != probe:
                probe = probe.parent
            if probe == target and not target.is_dir():
                return Check(name, False, f"{target} exists and is not a directory")
            if not os.access(probe, os.W_OK | os.X_OK):
                what = "is not writable" if probe == target else f"cannot be created in {probe}"
                return Check(
                    name,
                    False,
                    f"{target} {what}",
                    hint=f"Create {target} writable by the agent's user, or change `{key}`.",
                )
            if dev is not None and os.stat(probe).st_dev != dev:
                return Check(
                    name,
                    False,
                    f"{target} is on another filesystem than {self.settings.directory}",
                    hint=f"Files are moved by rename: put `{key}` on the same filesystem "
                    "(the default is a folder inside `directory`).",
                )
            state = "exists" if probe == target else "will be created"
            return Check(name, True, f"{target} {state}")
        except Exception as e:  # noqa: BLE001 - checks never raise
            return Check(name, False, f"{target} cannot be checked: {_os_reason(e)}")

    def _after_commit(self) -> None:
        if self._runner is not None:
            self._runner.wake()
        try:
            self.ctx.on_committed()
        except Exception as e:  # noqa: BLE001 - an observer never breaks intake
            log.warning(
                "The on_committed hook failed.",
                extra={"event": "hl7.hook_failed", "error_type": type(e).__name__},
            )

    def _warn(self, event: str, message: str, *, key: str, **extra: object) -> None:
        held = self._throttle.allow(f"{event}:{key}")
        if held is None:
            return
        log.warning(
            message,
            extra={"event": event, "adapter": self.name, "suppressed": held, **extra},
        )

    def _problem(
        self,
        event: str,
        level: int,
        message: str,
        *,
        key: str,
        report: PollReport | None,
        note: str,
        **extra: object,
    ) -> None:
        """A problem that leaves files in place: the report says so, the log once a minute."""
        if report is not None:
            report.complete = False
            if note not in report.notes:
                report.notes.append(note)
        held = self._throttle.allow(f"{event}:{key}")
        if held is not None:
            log.log(
                level,
                message,
                extra={"event": event, "adapter": self.name, "suppressed": held, **extra},
            )


def build(settings: AdapterSettings, ctx: AdapterContext) -> Hl7FilesWatcher:
    """`adapters.BUILDERS` entry for ``hl7-files``."""
    if not isinstance(settings, Hl7FilesSettings):
        raise TypeError(f"expected Hl7FilesSettings, got {type(settings).__name__}")
    return Hl7FilesWatcher(settings, ctx)


# ------------------------------------------------------------------ moving files ------


def candidate_names(name: str) -> Iterator[str]:
    """``name``, then ``stem.1.ext``, ``stem.2.ext``, ... (``name.1`` without an extension)."""
    yield name
    stem, dot, ext = name.rpartition(".")
    if not stem:  # no extension, or a leading dot only
        stem, dot, ext = name, "", ""
    for i in range(1, 100_000):
        yield f"{stem}.{i}{dot}{ext}"


def _move_into(src: Path, dest_dir: Path, reason: str | None) -> Path:
    """Move ``src`` into ``dest_dir`` under a free name, never overwriting; with
    ``reason``, write ``<target>.reason`` beside it. Crash-safe: see the module doc.

    Raises:
        OSError: src cannot be moved (EXDEV: dest_dir is on another filesystem).
    """
    src_st = os.lstat(src)
    for candidate in candidate_names(src.name):
        target = dest_dir / candidate
        try:
            tst = os.lstat(target)
        except FileNotFoundError:
            tst = None
        if tst is not None:
            if (tst.st_dev, tst.st_ino) == (src_st.st_dev, src_st.st_ino):
                # Our own link, made by a run that died before removing src.
                _fsync_dir(dest_dir)
                if reason is not None:
                    _write_reason(dest_dir, candidate, reason)
                _unlink(src)
                return target
            continue
        try:
            os.link(src, target, follow_symlinks=False)
        except FileExistsError:
            continue  # taken between lstat and link
        except OSError as e:
            if e.errno not in _NO_LINKS:
                raise
            # No hard links here: a rename to the name just checked free (atomic).
            if reason is not None:
                _write_reason(dest_dir, candidate, reason)
            os.rename(src, target)
            _fsync_dir(dest_dir)
            _fsync_dir(src.parent)
            return target
        _fsync_dir(dest_dir)
        if reason is not None:
            _write_reason(dest_dir, candidate, reason)
        _unlink(src)
        return target
    raise OSError(errno.EEXIST, f"no free name for the file in {dest_dir}")


def _unlink(src: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(src)
    _fsync_dir(src.parent)


def _write_reason(dest_dir: Path, candidate: str, text: str) -> None:
    """``<candidate>.reason`` in ``dest_dir``, replaced atomically and fsync'd."""
    final = dest_dir / (candidate + REASON_SUFFIX)
    tmp = dest_dir / f".{candidate}{REASON_SUFFIX}.tmp"
    with open(tmp, "wb") as f:
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(dest_dir)


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries durable; a no-op where the filesystem cannot."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _read_failure(e: OSError) -> str:
    return f"it could not be read: {_os_reason(e)}"


def _os_reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
