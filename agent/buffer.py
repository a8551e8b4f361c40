"""The durable local buffer: the only code that touches the SQLite schema.

Responsibility: hold every captured Record, raw intake row, quarantined input, cursor
and blob until the hub has taken it, across crashes, power loss and days offline.

Invariants (tested in tests/unit/test_buffer*.py and tests/reliability/):

- MUST commit with ``journal_mode=WAL`` and ``synchronous=FULL``: when ``put``
  returns, the records survive a power cut. Callers acknowledge upstream only then.
- MUST keep ``put`` atomic (records, the adapter's cursor and the raw rows they were
  mapped from, in one transaction) and idempotent on record id, also when SQLite
  reports a failure for a commit that did in fact succeed (the "database is locked"
  trap): every write op is safe to re-run.
- Every record is in exactly one state: ``pending -> inflight -> sent``, or
  ``inflight -> dead`` for records the hub rejected. ``inflight`` rows carry a lease
  that expires; an expired lease makes its rows claimable again. Transient failures
  return rows to ``pending`` with ``next_attempt_at``; there is no attempt limit.
- MUST NOT drop anything accepted to make room: past ``max_bytes`` intake is refused
  with CapacityExceededError. Only records already delivered (``sent``) are pruned:
  after ``retention_days``, or earlier when space is needed.
- Patient data at rest (the record envelope, raw input, quarantined input) is sealed
  with AES-GCM under the data key; ids, services, states, sizes and times stay in
  clear so that ``status`` needs no key.
- One writer thread owns the write connection; producers on any thread (or asyncio
  task) hand it operations, and it commits what queued up together in one
  transaction with one fsync (group commit), each op in its own savepoint so one
  op's refusal does not sink the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Final, NamedTuple, TypeVar

import sqlite_utils
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.errors import (
    CapacityExceededError,
    KeyFileError,
    SchemaVersionError,
    StorageCorruptError,
    StorageError,
)
from agent.record import Record

log = logging.getLogger(__name__)

T = TypeVar("T")

DB_NAME: Final = "buffer.db"
#: PRAGMA application_id: "SEPA". Tells our file from any other SQLite file.
APPLICATION_ID: Final = 0x53455041
SCHEMA_VERSION: Final = 1
#: Most ops one group commit holds; bounds the latency a producer can wait behind.
GROUP_MAX_OPS: Final = 64
#: WAL pages before SQLite checkpoints inside a commit; idle checkpoints come first.
WAL_AUTOCHECKPOINT_PAGES: Final = 16384
#: Seconds without work after which the writer checkpoints the WAL into the file.
IDLE_CHECKPOINT_SECS: Final = 1.0
#: Retries of a whole group when another process holds the write lock.
BUSY_RETRIES: Final = 50

_SEALED: Final = b"\x01"  # AES-GCM: version byte, 12-byte nonce, ciphertext+tag
_PLAIN: Final = b"\x00"

# SQLite primary result codes (extended codes carry them in the low byte).
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 5, 6, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL = 10, 11, 13
_SQLITE_CANTOPEN, _SQLITE_NOTADB, _SQLITE_PERM = 14, 26, 3


class State(StrEnum):
    PENDING = "pending"
    INFLIGHT = "inflight"
    SENT = "sent"
    DEAD = "dead"


class Cursor(NamedTuple):
    """An adapter's position in its source, committed with the records it produced."""

    adapter: str
    value: str


@dataclass(frozen=True, slots=True)
class PutReport:
    inserted: int
    duplicates: int


@dataclass(frozen=True, slots=True)
class LeasedRecord:
    id: str
    service: str
    size: int
    attempts: int
    envelope: bytes  # the Record's canonical JSON, decrypted

    def record(self) -> Record:
        return Record.from_json(self.envelope)


@dataclass(frozen=True, slots=True)
class Lease:
    id: str
    expires_at: float
    items: tuple[LeasedRecord, ...]

    @property
    def ids(self) -> list[str]:
        return [it.id for it in self.items]


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    id: int
    adapter: str
    received_at: float
    reason: str
    media_type: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class RawEntry:
    id: int
    adapter: str
    received_at: float
    media_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class DeadEntry:
    id: str
    service: str
    adapter: str
    settled_at: float
    reason: str


@dataclass(frozen=True, slots=True)
class PruneReport:
    records: int
    blobs: int
    bytes_before: int
    bytes_after: int


@dataclass(frozen=True, slots=True)
class BufferStats:
    """What `status` shows; readable without the data key, while the agent writes."""

    counts: dict[tuple[str, str], int]  # (service, state) -> count
    oldest_pending_at: float | None  # unix time the oldest unsent record was enqueued
    quarantined: int
    unmapped_raw: int
    used_bytes: int  # live pages + blobs: what max_bytes is compared with
    file_bytes: int  # buffer.db + its WAL on disk
    blob_count: int
    blob_bytes: int
    cursors: dict[str, tuple[str, float]]
    sync: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def total(self, state: State | str) -> int:
        return sum(n for (_, st), n in self.counts.items() if st == state)


class _Stop:
    pass


_STOP: Final = _Stop()


@dataclass(slots=True)
class _Op:
    fn: Callable[[sqlite3.Connection], Any]
    future: Future[Any]
    in_txn: bool = True  # False: runs alone between groups (checkpoints, vacuum)


def _code(err: sqlite3.Error) -> int:
    return int(getattr(err, "sqlite_errorcode", 0) or 0) & 0xFF


def _map_sqlite_error(err: sqlite3.Error, path: Path) -> StorageError:
    """The one place sqlite3 errors become our errors (STYLE.md 3.5)."""
    code = _code(err)
    text = str(err)
    if code == _SQLITE_FULL or "disk is full" in text:
        return CapacityExceededError(f"buffer {path}: the disk (or the database) is full")
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or "malformed" in text:
        return StorageCorruptError(f"buffer {path} is damaged or not a database: {text}")
    if code in (_SQLITE_READONLY, _SQLITE_PERM, _SQLITE_CANTOPEN):
        return StorageError(
            f"buffer {path} cannot be written: {text}",
            hint=f"The agent's user must be able to write {path.parent} and the files in it.",
        )
    if code == _SQLITE_IOERR:
        return StorageError(f"I/O error on buffer {path}: {text}")
    return StorageError(f"buffer {path}: {text}")


class _Sealer:
    """AES-GCM for patient data at rest; the row id is the associated data, so a
    sealed payload moved to another row does not open."""

    def __init__(self, key: bytes | None) -> None:
        self._aead = AESGCM(key) if key is not None else None

    @property
    def encrypting(self) -> bool:
        return self._aead is not None

    def seal(self, data: bytes, aad: bytes) -> bytes:
        if self._aead is None:
            return _PLAIN + data
        nonce = os.urandom(12)
        return _SEALED + nonce + self._aead.encrypt(nonce, data, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        tag, rest = blob[:1], blob[1:]
        if tag == _PLAIN:
            return rest
        if tag != _SEALED:
            raise StorageCorruptError("a buffer row has an unknown payload format")
        if self._aead is None:
            raise KeyFileError(
                "the buffer holds encrypted rows but no data key was given",
                hint="Restore buffer.key from backup into the data directory.",
            )
        try:
            return self._aead.decrypt(rest[:12], rest[12:], aad)
        except InvalidTag:
            raise StorageCorruptError(
                "a buffer row does not decrypt: wrong data key, or the row was altered"
            ) from None


def key_id(key: bytes) -> str:
    """A fingerprint of the data key, kept in the buffer to detect a wrong key."""
    return hashlib.sha256(b"sepas-buffer-key-id\x00" + key).hexdigest()[:16]


# ---------------------------------------------------------------- schema -----------


def _migrate_v1(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["records"].create(
        {
            "seq": int,  # intake order; ROWID alias
            "id": str,
            "service": str,
            "lane": int,  # 0 clinical, 1 imaging: lower uploads first
            "adapter": str,
            "patient_key": str,  # keyed hash, for per-patient ordering
            "occurred_at": str,
            "enqueued_at": float,
            "state": str,
            "next_attempt_at": float,
            "attempts": int,
            "lease_id": str,
            "lease_expires_at": float,
            "last_error": str,
            "settled_at": float,
            "hub_day": str,  # UTC day of the hub's received_at: the reconciliation ledger
            "size": int,  # bytes of the envelope JSON
            "payload": bytes,  # sealed envelope JSON
        },
        pk="seq",
        not_null=["id", "service", "lane", "adapter", "enqueued_at", "state", "size", "payload"],
        defaults={"next_attempt_at": 0.0, "attempts": 0},
    )
    db["records"].create_index(["id"], unique=True)
    db["records"].create_index(["state", "lane", "seq"])
    db["records"].create_index(["service", "state"])
    # Only inflight rows carry a lease id: a partial index costs pending inserts nothing.
    db.execute("CREATE INDEX records_lease ON records(lease_id) WHERE lease_id IS NOT NULL")
    db.execute("CREATE INDEX records_sent_settled ON records(settled_at) WHERE state = 'sent'")
    db["record_blobs"].create(
        {"record_id": str, "sha256": str}, pk=("record_id", "sha256"), not_null=["sha256"]
    )
    db["record_blobs"].create_index(["sha256"])
    db["blobs"].create(
        {"sha256": str, "media_type": str, "size": int, "created_at": float, "uploaded_at": float},
        pk="sha256",
        not_null=["media_type", "size", "created_at"],
    )
    db["cursors"].create({"adapter": str, "value": str, "updated_at": float}, pk="adapter")
    db["quarantine"].create(
        {
            "id": int,
            "adapter": str,
            "received_at": float,
            "reason": str,
            "media_type": str,
            "size": int,
            "sha256": str,
            "payload": bytes,
        },
        pk="id",
        not_null=["adapter", "received_at", "reason", "size", "sha256", "payload"],
    )
    db["quarantine"].create_index(["adapter", "sha256"], unique=True)
    db["raw_intake"].create(
        {
            "id": int,
            "adapter": str,
            "dedupe_key": str,
            "received_at": float,
            "media_type": str,
            "size": int,
            "mapped_at": float,
            "payload": bytes,
        },
        pk="id",
        not_null=["adapter", "received_at", "size", "payload"],
    )
    db["raw_intake"].create_index(["adapter", "dedupe_key"], unique=True)
    db.execute("CREATE INDEX raw_unmapped ON raw_intake(adapter, id) WHERE mapped_at IS NULL")


#: Migration i takes user_version i to i+1; never edit one that has shipped.
MIGRATIONS: Final[tuple[Callable[[sqlite_utils.Database], None], ...]] = (_migrate_v1,)


# ---------------------------------------------------------------- buffer -----------


class Buffer:
    """The node's durable store. Open with `Buffer.open`; close with `close`."""

    def __init__(
        self,
        path: Path,
        conn: sqlite3.Connection,
        *,
        sealer: _Sealer,
        patient_salt: bytes,
        max_bytes: int,
        retention_days: int,
        clock: Callable[[], float],
    ) -> None:
        self.path = path
        self.blob_dir = path.parent / "blobs"
        self.max_bytes = max_bytes
        self.retention_days = retention_days
        self._conn = conn
        self._sealer = sealer
        self._patient_salt = patient_salt
        self._clock = clock
        self._queue: queue.SimpleQueue[_Op | _Stop] = queue.SimpleQueue()
        self._readers: list[sqlite3.Connection] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        self._submit_lock = threading.Lock()  # orders "not closed" + enqueue vs close's stop
        self._closed = False
        self._room: int | None = None  # bytes left under max_bytes, within one group
        self._wal_dirty = False
        self._blob_bytes = int(
            conn.execute("SELECT COALESCE(SUM(size), 0) FROM blobs").fetchone()[0]
        )
        self._writer = threading.Thread(target=self._run_writer, name="buffer-writer", daemon=True)
        self._writer.start()

    # -- opening ----------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        data_dir: Path,
        *,
        data_key: bytes | None,
        max_bytes: int = 20_000_000_000,
        retention_days: int = 30,
        clock: Callable[[], float] = time.time,
        busy_timeout_ms: int = 5000,
        _max_page_count: int | None = None,
    ) -> Buffer:
        """Open (creating if needed) the buffer in ``data_dir``.

        ``data_key`` is the 32-byte AES key for records at rest, or None to store them
        in clear (tests, or `buffer.encrypt = false`). ``_max_page_count`` is a test
        hook: it caps the file (PRAGMA max_page_count) to simulate a full disk.

        Raises:
            StorageError: the directory or file cannot be created or written.
            StorageCorruptError: the file is not a SEPAS buffer, or is damaged.
            SchemaVersionError: the file was written by a newer agent.
            KeyFileError: the data key is not the one the buffer was created with.
        """
        path = Path(data_dir) / DB_NAME
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise StorageError(
                f"cannot create data directory {path.parent}: {e.strerror}",
                hint="Create it for the agent's user, or set node.data_dir to a writable place.",
            ) from None
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise StorageError(
                f"data directory {path.parent} is not writable by this user",
                hint=f"Give the agent's user write access: chown sepas {path.parent}.",
            )
        try:
            conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000
            )
        except sqlite3.Error as e:
            raise _map_sqlite_error(e, path) from None
        try:
            salt = cls._prepare(conn, path, data_key)
            if _max_page_count is not None:
                conn.execute(f"PRAGMA max_page_count = {int(_max_page_count)}")
            with contextlib.suppress(OSError):
                os.chmod(path, 0o600)
            return cls(
                path,
                conn,
                sealer=_Sealer(data_key),
                patient_salt=salt,
                max_bytes=max_bytes,
                retention_days=retention_days,
                clock=clock,
            )
        except sqlite3.Error as e:
            # __init__ reads the blobs table: a damaged file can fail there too.
            conn.close()
            raise _map_sqlite_error(e, path) from None
        except BaseException:
            conn.close()
            raise

    @staticmethod
    def _prepare(conn: sqlite3.Connection, path: Path, data_key: bytes | None) -> bytes:
        try:
            # One snapshot for the three: another process may be creating the schema.
            conn.execute("BEGIN")
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            n_tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            conn.execute("COMMIT")
            if app_id != APPLICATION_ID and (n_tables or version):
                raise StorageCorruptError(
                    f"{path} is an SQLite file of another application, not a SEPAS buffer",
                    hint=f"Point node.data_dir elsewhere, or move {path} aside.",
                )
            if version > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{path} has schema version {version}; this agent knows up to {SCHEMA_VERSION}"
                )
            if n_tables == 0:
                # Must precede the first table: only then can pruning return pages to the OS.
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            for attempt in range(BUSY_RETRIES + 1):
                if mode.lower() == "wal":
                    break
                try:
                    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                except sqlite3.OperationalError as e:
                    # A new file that another process is creating right now: this switch
                    # does not wait on the busy timeout, so wait here.
                    if _code(e) not in (_SQLITE_BUSY, _SQLITE_LOCKED) or attempt == BUSY_RETRIES:
                        raise
                    time.sleep(min(0.01 * 2**attempt, 0.5))
            if mode.lower() != "wal":
                raise StorageError(f"{path}: cannot switch to WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            # The writer checkpoints when idle; this only bounds the WAL (64 MiB of 4 KiB
            # pages) under sustained load, so that commits rarely pay for a checkpoint.
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
            db = sqlite_utils.Database(conn)
            if version < SCHEMA_VERSION:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    # Read again under the write lock: another process opening the same
                    # buffer may have migrated it while this one waited for the lock.
                    version = conn.execute("PRAGMA user_version").fetchone()[0]
                    for step in MIGRATIONS[version:]:
                        step(db)
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    if version == 0:
                        conn.executemany(
                            "INSERT INTO meta(key, value) VALUES (?, ?)",
                            [
                                ("created_at", str(time.time())),
                                ("patient_salt", os.urandom(16).hex()),
                            ],
                        )
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                if version < SCHEMA_VERSION:
                    log.info(
                        "Buffer schema migrated.",
                        extra={"event": "buffer.schema_migrated", "from": version},
                    )
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            want = key_id(data_key) if data_key is not None else None
            have = meta.get("data_key_id")
            if have is None and want is not None:
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('data_key_id', ?)", (want,))
            elif have is not None and want is not None and have != want:
                raise KeyFileError(
                    f"the data key does not match the one {path} was written with",
                    hint="Restore the buffer.key that belongs to this buffer from backup.",
                )
            if data_key is not None:
                return hmac.digest(data_key, b"sepas-patient-key", "sha256")
            return bytes.fromhex(meta["patient_salt"])
        except sqlite3.Error as e:
            raise _map_sqlite_error(e, path) from None

    # -- the writer thread --------------------------------------------------------------

    def _submit(self, fn: Callable[[sqlite3.Connection], T], *, in_txn: bool = True) -> Future[T]:
        fut: Future[T] = Future()
        with self._submit_lock:
            # Checked and queued under one lock: an op can never land behind the stop
            # marker, where the writer would never answer it.
            if self._closed:
                raise StorageError("the buffer is closed", hint="This is a bug in the caller.")
            self._queue.put(_Op(fn, fut, in_txn))
        return fut

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self._submit(fn).result()

    def _run_writer(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=IDLE_CHECKPOINT_SECS if self._wal_dirty else None)
            except queue.Empty:
                # Idle: move the WAL into the file now rather than inside a later commit.
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                self._wal_dirty = False
                continue
            self._wal_dirty = True
            if isinstance(first, _Stop):
                return
            group = [first]
            stop = False
            alone: _Op | None = None
            while first.in_txn and len(group) < GROUP_MAX_OPS:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(nxt, _Stop):
                    stop = True
                    break
                if not nxt.in_txn:
                    alone = nxt
                    break
                group.append(nxt)
            if first.in_txn:
                self._commit_group(group)
            else:
                self._run_alone(first)
            if alone is not None:
                self._run_alone(alone)
            if stop:
                return

    def _run_alone(self, op: _Op) -> None:
        try:
            op.future.set_result(op.fn(self._conn))
        except sqlite3.Error as e:
            op.future.set_exception(_map_sqlite_error(e, self.path))
        except BaseException as e:  # noqa: BLE001 - the writer must outlive any op
            op.future.set_exception(e)

    def _commit_group(self, group: list[_Op]) -> None:
        conn = self._conn
        for attempt in range(BUSY_RETRIES + 1):
            results: list[tuple[bool, Any]] = []
            self._room = None
            try:
                conn.execute("BEGIN IMMEDIATE")
                for op in group:
                    conn.execute("SAVEPOINT op")
                    try:
                        results.append((True, op.fn(conn)))
                    except (StorageError, KeyFileError, ValueError) as e:
                        # A refusal of this op alone (capacity, bad argument): undo it, keep
                        # the rest of the group.
                        conn.execute("ROLLBACK TO op")
                        results.append((False, e))
                    conn.execute("RELEASE op")
                conn.execute("COMMIT")
            except BaseException as e:  # noqa: BLE001 - the writer must outlive any op
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                self._resync_counters()
                if not isinstance(e, sqlite3.Error):
                    for op in group:
                        op.future.set_exception(e)
                    return
                if _code(e) in (_SQLITE_BUSY, _SQLITE_LOCKED) and attempt < BUSY_RETRIES:
                    # Another process (a CLI command, a backfill) holds the lock. Every op is
                    # idempotent, so re-running the whole group is safe even if SQLite said
                    # "locked" for a commit that went through.
                    time.sleep(min(0.01 * 2**attempt, 0.5))
                    continue
                if len(group) > 1:
                    # Find out which op it was: run each alone.
                    for op in group:
                        self._commit_group([op])
                    return
                group[0].future.set_exception(_map_sqlite_error(e, self.path))
                return
            for op, (ok, value) in zip(group, results, strict=True):
                if ok:
                    op.future.set_result(value)
                else:
                    op.future.set_exception(value)
            return

    # -- helpers inside the writer ----------------------------------------------------

    def _resync_counters(self) -> None:
        # In-memory counters changed by ops of a group that rolled back are wrong now.
        with contextlib.suppress(sqlite3.Error):
            self._blob_bytes = int(
                self._conn.execute("SELECT COALESCE(SUM(size), 0) FROM blobs").fetchone()[0]
            )

    def _used_bytes(self, conn: sqlite3.Connection) -> int:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        return (pages - free) * size + self._blob_bytes

    def _ensure_room(self, conn: sqlite3.Connection, needed: int) -> None:
        """Refuse intake past max_bytes, after giving back what delivered records hold.

        The first op of a group measures the file exactly; later ops of the same group
        draw on that measurement, so a group can pass max_bytes by at most its own
        size (page overhead included), and the next group measures again.
        """
        if self._room is not None and needed <= self._room:
            self._room -= needed
            return
        self._room = self.max_bytes - self._used_bytes(conn)
        if needed <= self._room:
            self._room -= needed
            return
        # Delivered records are only kept for reconciliation; space for new clinical
        # data matters more. Undelivered ones are never touched.
        while self._used_bytes(conn) + needed > self.max_bytes:
            n = conn.execute(
                "DELETE FROM records WHERE seq IN (SELECT seq FROM records "
                "WHERE state = 'sent' ORDER BY settled_at LIMIT 500)"
            ).rowcount
            if n == 0:
                raise CapacityExceededError(
                    f"buffer is full ({self._used_bytes(conn):,} of {self.max_bytes:,} bytes "
                    "used by records not yet delivered)"
                )
            log.warning(
                "Pruned delivered records early to make room.",
                extra={"event": "buffer.early_pruned", "count": n},
            )
        self._room = self.max_bytes - self._used_bytes(conn) - needed

    def _patient_key(self, rec: Record) -> str | None:
        if rec.patient is None:
            return None
        who = rec.patient.national_id or rec.patient.local_id
        if not who:
            return None
        return hmac.digest(self._patient_salt, who.encode(), "sha256").hex()[:24]

    # -- intake -----------------------------------------------------------------------

    def put(
        self,
        records: Sequence[Record],
        *,
        cursor: Cursor | None = None,
        raw_ids: Iterable[int] = (),
    ) -> PutReport:
        """Commit records, the adapter's cursor and the raw rows they map, atomically.

        Idempotent on record id: a record already in the buffer (in any state) is
        counted as a duplicate and left as it is. When this returns, all of it is on
        disk (fsync'd); when it raises, none of it is.

        Raises:
            CapacityExceededError: over max_bytes or the disk is full; nothing stored.
            StorageError: the buffer cannot be written.
        """
        return self._submit(self._put_op(records, cursor, tuple(raw_ids))).result()

    async def put_async(
        self,
        records: Sequence[Record],
        *,
        cursor: Cursor | None = None,
        raw_ids: Iterable[int] = (),
    ) -> PutReport:
        """`put` for asyncio producers: waits without blocking the event loop."""
        fut = self._submit(self._put_op(records, cursor, tuple(raw_ids)))
        return await asyncio.wrap_future(fut)

    def _put_op(
        self, records: Sequence[Record], cursor: Cursor | None, raw_ids: tuple[int, ...]
    ) -> Callable[[sqlite3.Connection], PutReport]:
        # Serialise and seal on the producer's thread: the writer only does I/O.
        rows = []
        seen: set[str] = set()
        for rec in records:
            if rec.id in seen:
                continue
            seen.add(rec.id)
            env = rec.to_json()
            rows.append(
                (
                    rec.id,
                    rec.service.value,
                    rec.service.lane,
                    rec.source.adapter,
                    self._patient_key(rec),
                    rec.occurred_at.isoformat(),
                    len(env),
                    self._sealer.seal(env, rec.id.encode()),
                    [(rec.id, b.sha256) for b in rec.blobs],
                )
            )

        links = [link for r in rows for link in r[8]]
        total = sum(len(r[7]) for r in rows)

        def op(conn: sqlite3.Connection) -> PutReport:
            now = self._clock()
            new = rows
            if rows and self._room is not None and total > self._room:
                # Near capacity: find what is really new, so a redelivery of records
                # the buffer already holds is still accepted when it is full.
                existing: set[str] = set()
                ids = [r[0] for r in rows]
                for i in range(0, len(ids), 500):
                    chunk = ids[i : i + 500]
                    q = f"SELECT id FROM records WHERE id IN ({','.join('?' * len(chunk))})"  # noqa: S608
                    existing.update(x for (x,) in conn.execute(q, chunk))
                new = [r for r in rows if r[0] not in existing]
            inserted = 0
            if new:
                try:
                    self._ensure_room(conn, sum(len(r[7]) for r in new))
                except CapacityExceededError:
                    if new is not rows:
                        raise
                    # The estimate said no: look at which records are really new first.
                    self._room = 0
                    return op(conn)
                inserted = conn.executemany(
                    "INSERT INTO records(id, service, lane, adapter, patient_key, occurred_at, "
                    "enqueued_at, state, size, payload) VALUES (?,?,?,?,?,?,?,'pending',?,?) "
                    "ON CONFLICT(id) DO NOTHING",
                    [(*r[:6], now, r[6], r[7]) for r in new],
                ).rowcount
                if links:
                    conn.executemany(
                        "INSERT OR IGNORE INTO record_blobs(record_id, sha256) VALUES (?, ?)",
                        links,
                    )
            if cursor is not None:
                conn.execute(
                    "INSERT INTO cursors(adapter, value, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT(adapter) DO UPDATE SET value = excluded.value, "
                    "updated_at = excluded.updated_at",
                    (cursor.adapter, cursor.value, now),
                )
            if raw_ids:
                conn.executemany(
                    "UPDATE raw_intake SET mapped_at = ? WHERE id = ? AND mapped_at IS NULL",
                    [(now, i) for i in raw_ids],
                )
            return PutReport(inserted=inserted, duplicates=len(records) - inserted)

        return op

    def set_cursor(self, cursor: Cursor) -> None:
        """Advance a cursor with no records (a poll window that found nothing)."""
        self.put((), cursor=cursor)

    def cursor(self, adapter: str) -> str | None:
        row = (
            self._reader()
            .execute("SELECT value FROM cursors WHERE adapter = ?", (adapter,))
            .fetchone()
        )
        return None if row is None else str(row[0])

    # -- raw intake (HL7-INTAKE.md rule 15) -------------------------------------------

    def put_raw(
        self, data: bytes, *, adapter: str, media_type: str, dedupe_key: str | None = None
    ) -> tuple[int, bool]:
        """Commit raw input to be mapped later; returns (row id, was it new).

        With ``dedupe_key`` (e.g. MSH-10 + MSH-7), a second delivery returns the first
        row's id and False, so a resent message is stored once.
        """
        # Without a key, one unique to this call: re-running the op (after a commit that
        # was reported as failed but went through) then finds its row, not a second one.
        key = dedupe_key if dedupe_key is not None else f"call:{uuid.uuid4().hex}"

        # Sealed inside the op: the row id, known only there, is the associated data.
        def op(conn: sqlite3.Connection) -> tuple[int, bool]:
            row = conn.execute(
                "SELECT id FROM raw_intake WHERE adapter = ? AND dedupe_key = ?",
                (adapter, key),
            ).fetchone()
            if row is not None:
                # A key of our own means the row is this very call's, found on a re-run.
                return int(row[0]), dedupe_key is None
            self._ensure_room(conn, len(data) + 64)
            cur = conn.execute(
                "INSERT INTO raw_intake(adapter, dedupe_key, received_at, media_type, size, "
                "payload) VALUES (?, ?, ?, ?, ?, x'')",
                (adapter, key, self._clock(), media_type, len(data)),
            )
            rid = int(cur.lastrowid or 0)
            conn.execute(
                "UPDATE raw_intake SET payload = ? WHERE id = ?",
                (self._sealer.seal(data, f"raw:{rid}".encode()), rid),
            )
            return rid, True

        return self._call(op)

    def unmapped_raw(self, adapter: str, *, limit: int = 100) -> list[RawEntry]:
        rows = self._reader().execute(
            "SELECT id, adapter, received_at, media_type, payload FROM raw_intake "
            "WHERE adapter = ? AND mapped_at IS NULL ORDER BY id LIMIT ?",
            (adapter, limit),
        )
        return [
            RawEntry(i, a, t, m or "", self._sealer.open(p, f"raw:{i}".encode()))
            for i, a, t, m, p in rows
        ]

    def quarantine_raw(self, raw_id: int, *, reason: str) -> None:
        """Move a raw row that could not be mapped to quarantine, in one transaction."""

        def op(conn: sqlite3.Connection) -> None:
            row = conn.execute(
                "SELECT adapter, media_type, payload FROM raw_intake "
                "WHERE id = ? AND mapped_at IS NULL",
                (raw_id,),
            ).fetchone()
            if row is None:
                return
            data = self._sealer.open(row[2], f"raw:{raw_id}".encode())
            self._quarantine_in(conn, data, adapter=row[0], reason=reason, media_type=row[1])
            conn.execute(
                "UPDATE raw_intake SET mapped_at = ? WHERE id = ?", (self._clock(), raw_id)
            )

        self._call(op)

    # -- quarantine ---------------------------------------------------------------------

    def quarantine(self, data: bytes, *, adapter: str, reason: str, media_type: str = "") -> int:
        """Keep input that could not be parsed or mapped, with the reason, until an
        operator acts. The same bytes quarantined twice by one adapter are one entry."""
        return self._call(
            lambda conn: self._quarantine_in(
                conn, data, adapter=adapter, reason=reason, media_type=media_type
            )
        )

    def _quarantine_in(
        self, conn: sqlite3.Connection, data: bytes, *, adapter: str, reason: str, media_type: str
    ) -> int:
        digest = hashlib.sha256(data).hexdigest()
        row = conn.execute(
            "SELECT id FROM quarantine WHERE adapter = ? AND sha256 = ?", (adapter, digest)
        ).fetchone()
        if row is not None:
            conn.execute("UPDATE quarantine SET reason = ? WHERE id = ?", (reason, row[0]))
            return int(row[0])
        self._ensure_room(conn, len(data) + 64)
        cur = conn.execute(
            "INSERT INTO quarantine(adapter, received_at, reason, media_type, size, sha256, "
            "payload) VALUES (?, ?, ?, ?, ?, ?, x'')",
            (adapter, self._clock(), reason, media_type, len(data), digest),
        )
        qid = int(cur.lastrowid or 0)
        conn.execute(
            "UPDATE quarantine SET payload = ? WHERE id = ?",
            (self._sealer.seal(data, f"quarantine:{qid}".encode()), qid),
        )
        return qid

    def quarantined(self, *, limit: int = 100, offset: int = 0) -> list[QuarantineEntry]:
        rows = self._reader().execute(
            "SELECT id, adapter, received_at, reason, COALESCE(media_type, ''), size, sha256 "
            "FROM quarantine ORDER BY id LIMIT ? OFFSET ?",
            (limit, offset),
        )
        return [QuarantineEntry(*r) for r in rows]

    def quarantined_data(self, qid: int) -> bytes:
        row = (
            self._reader().execute("SELECT payload FROM quarantine WHERE id = ?", (qid,)).fetchone()
        )
        if row is None:
            raise KeyError(qid)
        return self._sealer.open(row[0], f"quarantine:{qid}".encode())

    def drop_quarantined(self, ids: Iterable[int]) -> int:
        ids = list(ids)
        return self._call(
            lambda conn: sum(
                conn.execute("DELETE FROM quarantine WHERE id = ?", (i,)).rowcount for i in ids
            )
        )

    # -- upload side ------------------------------------------------------------------

    def lease(self, *, max_records: int, max_bytes: int, lease_secs: float) -> Lease | None:
        """Claim the next records due for upload, clinical lanes first, in intake order.

        Leases whose time ran out are given back first, so records of an uploader that
        died are taken again. At least one record is claimed if any is due, even one
        larger than ``max_bytes`` (the hub's 413 then decides its fate).
        """

        def op(conn: sqlite3.Connection) -> Lease | None:
            now = self._clock()
            conn.execute(
                "UPDATE records SET state = 'pending', lease_id = NULL, lease_expires_at = NULL "
                "WHERE state = 'inflight' AND lease_expires_at <= ?",
                (now,),
            )
            picked: list[tuple[int, str, str, int, int, bytes]] = []
            total = 0
            rows = conn.execute(
                "SELECT seq, id, service, size, attempts, payload FROM records "
                "WHERE state = 'pending' AND next_attempt_at <= ? ORDER BY lane, seq LIMIT ?",
                (now, max_records),
            ).fetchall()
            for row in rows:
                if picked and total + row[3] > max_bytes:
                    break
                picked.append(row)
                total += row[3]
            if not picked:
                return None
            lease_id = uuid.uuid4().hex
            expires = now + lease_secs
            conn.executemany(
                "UPDATE records SET state = 'inflight', lease_id = ?, lease_expires_at = ? "
                "WHERE seq = ?",
                [(lease_id, expires, r[0]) for r in picked],
            )
            items = tuple(
                LeasedRecord(rid, service, size, attempts, self._sealer.open(p, rid.encode()))
                for _, rid, service, size, attempts, p in picked
            )
            return Lease(lease_id, expires, items)

        return self._call(op)

    def mark_sent(self, lease: Lease, ids: Iterable[str], *, hub_day: str | None = None) -> int:
        """The hub holds these (accepted or duplicate). Applies even if the lease ran out:
        the hub's word is final, and a second upload of a sent record is harmless."""
        ids = list(ids)

        def op(conn: sqlite3.Connection) -> int:
            now = self._clock()
            return sum(
                conn.execute(
                    "UPDATE records SET state = 'sent', settled_at = ?, hub_day = ?, "
                    "lease_id = NULL, lease_expires_at = NULL, last_error = NULL "
                    "WHERE id = ? AND state IN ('pending', 'inflight')",
                    (now, hub_day, i),
                ).rowcount
                for i in ids
            )

        return self._call(op)

    def retry_later(
        self, lease: Lease, ids: Iterable[str], *, not_before: float, reason: str
    ) -> int:
        """A transient failure: back to pending, due again at ``not_before``."""
        ids = list(ids)

        def op(conn: sqlite3.Connection) -> int:
            return sum(
                conn.execute(
                    "UPDATE records SET state = 'pending', next_attempt_at = ?, "
                    "attempts = attempts + 1, last_error = ?, lease_id = NULL, "
                    "lease_expires_at = NULL WHERE id = ? AND lease_id = ? AND state = 'inflight'",
                    (not_before, reason, i, lease.id),
                ).rowcount
                for i in ids
            )

        return self._call(op)

    def dead_letter(self, lease: Lease, reasons: Mapping[str, str]) -> int:
        """The hub rejected these for good: keep them as dead, with the hub's reason."""

        def op(conn: sqlite3.Connection) -> int:
            now = self._clock()
            return sum(
                conn.execute(
                    "UPDATE records SET state = 'dead', settled_at = ?, last_error = ?, "
                    "lease_id = NULL, lease_expires_at = NULL "
                    "WHERE id = ? AND lease_id = ? AND state = 'inflight'",
                    (now, reason, i, lease.id),
                ).rowcount
                for i, reason in reasons.items()
            )

        return self._call(op)

    def release(self, lease: Lease, ids: Iterable[str] | None = None) -> int:
        """Give leased records back untouched (shutdown): pending, due now."""
        ids = lease.ids if ids is None else list(ids)

        def op(conn: sqlite3.Connection) -> int:
            return sum(
                conn.execute(
                    "UPDATE records SET state = 'pending', lease_id = NULL, "
                    "lease_expires_at = NULL WHERE id = ? AND lease_id = ? AND state = 'inflight'",
                    (i, lease.id),
                ).rowcount
                for i in ids
            )

        return self._call(op)

    # -- dead letters -------------------------------------------------------------------

    def dead(self, *, limit: int = 100, offset: int = 0) -> list[DeadEntry]:
        rows = self._reader().execute(
            "SELECT id, service, adapter, settled_at, COALESCE(last_error, '') FROM records "
            "WHERE state = 'dead' ORDER BY settled_at, seq LIMIT ? OFFSET ?",
            (limit, offset),
        )
        return [DeadEntry(*r) for r in rows]

    def requeue_dead(self, ids: Iterable[str]) -> int:
        """Operator's retry: dead records go back to pending, due now."""
        ids = list(ids)
        return self._call(
            lambda conn: sum(
                conn.execute(
                    "UPDATE records SET state = 'pending', next_attempt_at = 0, settled_at = NULL "
                    "WHERE id = ? AND state = 'dead'",
                    (i,),
                ).rowcount
                for i in ids
            )
        )

    def purge_dead(self, ids: Iterable[str]) -> int:
        """Operator's purge: delete dead records for good."""
        ids = list(ids)

        def op(conn: sqlite3.Connection) -> int:
            n = 0
            for i in ids:
                n += conn.execute(
                    "DELETE FROM records WHERE id = ? AND state = 'dead'", (i,)
                ).rowcount
                conn.execute(
                    "DELETE FROM record_blobs WHERE record_id = ? AND NOT EXISTS "
                    "(SELECT 1 FROM records WHERE id = ?)",
                    (i, i),
                )
            return n

        return self._call(op)

    def record(self, record_id: str) -> Record | None:
        """One record, decrypted (dead-letter show, tests)."""
        row = (
            self._reader()
            .execute("SELECT payload FROM records WHERE id = ?", (record_id,))
            .fetchone()
        )
        if row is None:
            return None
        return Record.from_json(self._sealer.open(row[0], record_id.encode()))

    def state_of(self, record_id: str) -> State | None:
        row = (
            self._reader()
            .execute("SELECT state FROM records WHERE id = ?", (record_id,))
            .fetchone()
        )
        return None if row is None else State(row[0])

    # -- blobs --------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256[:2] / sha256[2:]

    def add_blob(self, src: IO[bytes] | bytes, *, media_type: str) -> tuple[str, int]:
        """Store content-addressed bytes (fsync'd) and their row; returns (sha256, size).

        The file is complete on disk before its row exists, so a row never points at a
        partial file; a crash in between leaves only an orphan temp file.
        """
        tmp_dir = self.blob_dir / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        h = hashlib.sha256()
        size = 0
        tmp = tmp_dir / uuid.uuid4().hex
        try:
            with open(tmp, "xb") as out:
                os.chmod(tmp, 0o600)
                if isinstance(src, bytes):
                    chunks: Iterable[bytes] = (src,)
                else:
                    chunks = iter(lambda: src.read(1 << 20), b"")
                for chunk in chunks:
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = h.hexdigest()
            final = self.blob_path(digest)
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if e.errno == 28:  # ENOSPC
                raise CapacityExceededError("the disk is full; blob not stored") from None
            raise StorageError(f"cannot store blob under {self.blob_dir}: {e.strerror}") from None

        def op(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM blobs WHERE sha256 = ?", (digest,)).fetchone():
                return
            self._ensure_room(conn, size)
            conn.execute(
                "INSERT INTO blobs(sha256, media_type, size, created_at) VALUES (?, ?, ?, ?)",
                (digest, media_type, size, self._clock()),
            )
            self._blob_bytes += size

        self._call(op)
        return digest, size

    def mark_blob_uploaded(self, sha256: str) -> None:
        self._call(
            lambda conn: conn.execute(
                "UPDATE blobs SET uploaded_at = ? WHERE sha256 = ?", (self._clock(), sha256)
            )
        )

    # -- sync state (written by the uploader, shown by status) ----------------------------

    def set_sync_state(self, state: Mapping[str, Any]) -> None:
        data = json.dumps(dict(state), sort_keys=True)
        self._call(
            lambda conn: conn.execute("INSERT OR REPLACE INTO meta VALUES ('sync', ?)", (data,))
        )

    # -- retention ------------------------------------------------------------------------

    def prune(self, *, now: float | None = None) -> PruneReport:
        """Delete delivered records older than retention_days and blobs nothing needs,
        then give the freed pages back to the file system."""
        cutoff = (self._clock() if now is None else now) - self.retention_days * 86400
        before = self._file_bytes()

        def op(conn: sqlite3.Connection) -> tuple[int, list[tuple[str, int]]]:
            n = conn.execute(
                "DELETE FROM records WHERE state = 'sent' AND settled_at < ?", (cutoff,)
            ).rowcount
            conn.execute(
                "DELETE FROM record_blobs WHERE NOT EXISTS "
                "(SELECT 1 FROM records r WHERE r.id = record_blobs.record_id)"
            )
            gone = conn.execute(
                "SELECT sha256, size FROM blobs b WHERE created_at < ? AND NOT EXISTS "
                "(SELECT 1 FROM record_blobs rb WHERE rb.sha256 = b.sha256)",
                (cutoff,),
            ).fetchall()
            conn.executemany("DELETE FROM blobs WHERE sha256 = ?", [(s,) for s, _ in gone])
            self._blob_bytes -= sum(size for _, size in gone)
            return n, gone

        n, gone = self._call(op)
        for digest, _ in gone:
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(digest).unlink()
        self._vacuum()
        return PruneReport(n, len(gone), before, self._file_bytes())

    def _vacuum(self) -> None:
        def op(conn: sqlite3.Connection) -> None:
            # Not execute(): it steps a statement with no result columns only once, and
            # incremental_vacuum frees one page per step. executescript steps to the end.
            conn.executescript("PRAGMA incremental_vacuum")
            # Freed pages leave the file only once the WAL is checkpointed into it.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        # Neither may run inside a transaction, so this op runs alone between groups.
        self._submit(op, in_txn=False).result()

    def _file_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    # -- reading ------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect_reader(self.path)
            self._local.conn = conn
            with self._lock:
                self._readers.append(conn)
        return conn

    def stats(self) -> BufferStats:
        return read_stats(self._reader(), self.path)

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Finish queued writes, then close. Safe to call twice."""
        with self._submit_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._writer.join()
        with self._lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self._conn.close()

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- uploader support (issue 3) -------------------------------------------------------
    # What agent/uploader/ needs beyond lease/mark/retry: keeping a lease alive across
    # in-process retries, settling duplicates without moving them in the ledger, the
    # sync state, and the per-day ledger that reconciliation compares with the hub.

    def extend_lease(self, lease: Lease, *, lease_secs: float) -> Lease:
        """Push the expiry of ``lease`` to now + ``lease_secs`` (a long upload or an
        in-process retry must not let a second upload take the same records)."""

        def op(conn: sqlite3.Connection) -> Lease:
            expires = self._clock() + lease_secs
            conn.execute(
                "UPDATE records SET lease_expires_at = ? WHERE lease_id = ? AND state = 'inflight'",
                (expires, lease.id),
            )
            return Lease(lease.id, expires, lease.items)

        return self._call(op)

    def mark_duplicate(
        self, lease: Lease, ids: Iterable[str], *, hub_day: str | None = None
    ) -> int:
        """The hub already held these: sent, like `mark_sent`, but a record that already
        has a ledger day keeps it (the hub counts it on the day it first received it,
        not on the day of this batch; moving it would make reconciliation differ)."""
        ids = list(ids)

        def op(conn: sqlite3.Connection) -> int:
            now = self._clock()
            return sum(
                conn.execute(
                    "UPDATE records SET state = 'sent', settled_at = ?, "
                    "hub_day = COALESCE(hub_day, ?), lease_id = NULL, lease_expires_at = NULL, "
                    "last_error = NULL WHERE id = ? AND state IN ('pending', 'inflight')",
                    (now, hub_day, i),
                ).rowcount
                for i in ids
            )

        return self._call(op)

    def make_due(self) -> int:
        """Every pending record waiting for a backoff becomes due now (`sync --once`)."""
        return self._call(
            lambda conn: (
                conn.execute(
                    "UPDATE records SET next_attempt_at = 0 "
                    "WHERE state = 'pending' AND next_attempt_at > 0"
                ).rowcount
            )
        )

    def sync_state(self) -> dict[str, Any]:
        """The uploader's state as last written (`set_sync_state`, `update_sync_state`)."""
        row = self._reader().execute("SELECT value FROM meta WHERE key = 'sync'").fetchone()
        return dict(json.loads(row[0])) if row else {}

    def update_sync_state(self, patch: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``patch`` into the sync state's top-level keys, atomically (the uploader
        and reconciliation write different keys and must not undo each other)."""
        patch = dict(patch)

        def op(conn: sqlite3.Connection) -> dict[str, Any]:
            row = conn.execute("SELECT value FROM meta WHERE key = 'sync'").fetchone()
            state: dict[str, Any] = dict(json.loads(row[0])) if row else {}
            state.update(patch)
            conn.execute(
                "INSERT OR REPLACE INTO meta VALUES ('sync', ?)",
                (json.dumps(state, sort_keys=True),),
            )
            return state

        return self._call(op)

    def blob_info(self, sha256: str) -> tuple[str, int, float | None] | None:
        """(media_type, size, uploaded_at) of a stored blob, or None if it is not here."""
        row = (
            self._reader()
            .execute("SELECT media_type, size, uploaded_at FROM blobs WHERE sha256 = ?", (sha256,))
            .fetchone()
        )
        return None if row is None else (str(row[0]), int(row[1]), row[2])

    def sent_since(self, since: float) -> int:
        """How many records were settled as sent at or after ``since`` (unix time)."""
        return self._count_sent_since(self._reader(), [since])[0]

    @staticmethod
    def read_sent_since(data_dir: Path, since: Sequence[float]) -> list[int] | None:
        """`sent_since` for each time in ``since``, without opening a writer or the data
        key (for `status`, beside the service); None when no buffer exists yet."""
        path = Path(data_dir) / DB_NAME
        if not path.exists():
            return None
        try:
            conn = _connect_reader(path)
        except sqlite3.Error as e:
            raise _map_sqlite_error(e, path) from None
        try:
            return Buffer._count_sent_since(conn, since)
        except sqlite3.Error as e:
            raise _map_sqlite_error(e, path) from None
        finally:
            conn.close()

    def ledger(self, days: Iterable[str]) -> dict[str, tuple[int, str]]:
        """Per UTC day (``YYYY-MM-DD``, the hub's ``received_at`` day), the count and the
        `agent.wire.day_digest` of the records this node holds as sent. Every day asked
        for is in the answer; a day with none is (0, 64 zeros)."""
        from agent.wire import day_digest  # wire imports nothing of the agent

        wanted = sorted(set(days))
        ids: dict[str, list[str]] = {d: [] for d in wanted}
        conn = self._reader()
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            q = (
                "SELECT hub_day, id FROM records WHERE state = 'sent' "  # noqa: S608
                f"AND hub_day IN ({','.join('?' * len(chunk))})"
            )
            for day, rid in conn.execute(q, chunk):
                ids[day].append(rid)
        return {d: (len(v), day_digest(v)) for d, v in ids.items()}

    def requeue_day(self, day: str) -> int:
        """Reconciliation found ``day`` differs from the hub: its sent records go back
        to pending, due now. They keep their ledger day, so that a duplicate answer
        leaves them where the hub counts them (`mark_duplicate`)."""
        return self._call(
            lambda conn: (
                conn.execute(
                    "UPDATE records SET state = 'pending', next_attempt_at = 0, settled_at = NULL "
                    "WHERE state = 'sent' AND hub_day = ?",
                    (day,),
                ).rowcount
            )
        )

    @staticmethod
    def _count_sent_since(conn: sqlite3.Connection, since: Sequence[float]) -> list[int]:
        # settled_at of sent rows has a partial index (records_sent_settled).
        return [
            int(
                conn.execute(
                    "SELECT count(*) FROM records WHERE state = 'sent' AND settled_at >= ?",
                    (t,),
                ).fetchone()[0]
            )
            for t in since
        ]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _connect_reader(path: Path) -> sqlite3.Connection:
    # query_only, not mode=ro: a read-only open cannot create the WAL index when no
    # writer has the file open, and then fails on a perfectly good buffer.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
    conn.execute("PRAGMA query_only = ON")
    return conn


def read_stats(conn: sqlite3.Connection, path: Path) -> BufferStats:
    """Counts and sizes, without the data key. Safe while another process writes."""
    try:
        conn.execute("BEGIN")  # one snapshot for all the numbers
        try:
            counts = {
                (s, st): n
                for s, st, n in conn.execute(
                    "SELECT service, state, count(*) FROM records GROUP BY service, state"
                )
            }
            oldest = None
            for lane in (0, 1):
                for st in ("pending", "inflight"):
                    row = conn.execute(
                        "SELECT enqueued_at FROM records WHERE state = ? AND lane = ? "
                        "ORDER BY seq LIMIT 1",
                        (st, lane),
                    ).fetchone()
                    if row and (oldest is None or row[0] < oldest):
                        oldest = row[0]
            quarantined = conn.execute("SELECT count(*) FROM quarantine").fetchone()[0]
            unmapped = conn.execute(
                "SELECT count(*) FROM raw_intake WHERE mapped_at IS NULL"
            ).fetchone()[0]
            blob_count, blob_bytes = conn.execute(
                "SELECT count(*), COALESCE(SUM(size), 0) FROM blobs"
            ).fetchone()
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            cursors = {
                a: (v, t)
                for a, v, t in conn.execute("SELECT adapter, value, updated_at FROM cursors")
            }
            sync_row = conn.execute("SELECT value FROM meta WHERE key = 'sync'").fetchone()
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        finally:
            conn.execute("COMMIT")
    except sqlite3.Error as e:
        raise _map_sqlite_error(e, path) from None
    file_bytes = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(FileNotFoundError):
            file_bytes += os.stat(f"{path}{suffix}").st_size
    return BufferStats(
        counts=counts,
        oldest_pending_at=oldest,
        quarantined=quarantined,
        unmapped_raw=unmapped,
        used_bytes=(pages - free) * page_size + blob_bytes,
        file_bytes=file_bytes,
        blob_count=blob_count,
        blob_bytes=blob_bytes,
        cursors=cursors,
        sync=json.loads(sync_row[0]) if sync_row else {},
        schema_version=version,
    )


def open_stats(data_dir: Path) -> BufferStats | None:
    """Stats of the buffer in ``data_dir`` for `status`, or None if none exists yet.

    Opens no writer and needs no key, so it runs beside the service.

    Raises:
        StorageCorruptError: the file is not a SEPAS buffer or is damaged.
        SchemaVersionError: written by a newer agent.
    """
    path = Path(data_dir) / DB_NAME
    if not path.exists():
        return None
    try:
        conn = _connect_reader(path)
    except sqlite3.Error as e:
        raise _map_sqlite_error(e, path) from None
    try:
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as e:
            raise _map_sqlite_error(e, path) from None
        if app_id != APPLICATION_ID:
            raise StorageCorruptError(f"{path} is not a SEPAS buffer")
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{path} has schema version {version}; this agent knows up to {SCHEMA_VERSION}"
            )
        return read_stats(conn, path)
    finally:
        conn.close()
