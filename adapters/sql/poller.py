"""The ``sql`` adapter: polls a HIS/LIS database (often only views) with a cursor query.

Responsibility: run the operator's ``query`` with ``:cursor`` bound to the last cursor
committed, stream the rows in chunks of ``batch_rows``, map them (`mapping`), and
commit each chunk's Records together with the cursor they reach, in one buffer
transaction (DESIGN.md), so that a crash between chunks neither skips nor doubles a
row. The only module that imports SQLAlchemy; its errors are mapped here.

The query's contract (README and config/agent.example.toml say the same):

- It is a SELECT that uses ``:cursor`` once or more and no other parameter, e.g.
  ``SELECT ... FROM v_lab WHERE changed_at > :cursor ORDER BY changed_at``. Cast in
  standard SQL (``CAST(:cursor AS timestamp)``): ``:cursor::timestamp`` is not a
  parameter to SQLAlchemy.
- It MUST return its rows in ascending order of ``cursor_column`` (``ORDER BY``; the
  adapter refuses a query without one). A row that goes backwards stops the poll with
  SqlQueryError before that row or any after it is committed.
- ``initial_cursor`` is bound on the first poll; without it ``:cursor`` is NULL, which
  matches nothing under ``>`` (write ``CAST(:cursor AS timestamp) IS NULL OR ...``
  to read everything on the first poll).

Ties: rows that share a cursor value may straddle a chunk boundary. The cursor is
advanced to a value only once every row with that value has been committed: the
trailing group of equal values of a chunk is held back for the next one. A group
larger than ``batch_rows`` is committed in parts without moving the cursor, so a
crash re-reads it and record ids de-duplicate it. The cursor's text keeps its type
(``datetime:2025-03-21T10:00:00+03:30``, ``int:42``, ``str:...``) and binds back as
that type.

Never: write to the source database. Every connection is opened read-only where the
database allows it (PostgreSQL ``SET SESSION CHARACTERISTICS AS TRANSACTION READ
ONLY``, MySQL/MariaDB ``SET SESSION TRANSACTION READ ONLY``, Oracle ``SET
TRANSACTION READ ONLY`` per transaction, SQLite ``mode=ro`` and ``PRAGMA
query_only``), and every transaction is rolled back, never committed. SQL Server has
no such switch: give the adapter a login that can only SELECT the views. Never log or
raise with the URL's password (URLs are shown with ``***``), or with a row's values.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine

from adapters.sql.mapping import (
    MEDIA_TYPE,
    Columns,
    RowMapper,
    SqlQueryError,
    cursor_tag,
    decode_cursor,
    encode_cursor,
    parse_when,
    row_json,
)
from adapters.sql.settings import SqlSettings
from agent.adapter import AdapterContext, Check, PollReport, RecordSink
from agent.buffer import Cursor
from agent.dates import TEHRAN
from agent.errors import (
    AdapterError,
    BackfillUnsupportedError,
    InputRejectedError,
    PeerUnavailableError,
)
from agent.record import Record

log = logging.getLogger(__name__)

#: Seconds to wait for the database to accept a connection.
CONNECT_TIMEOUT_SECS: Final = 10
#: PostgreSQL ``statement_timeout`` (each FETCH of a streamed result is one statement).
STATEMENT_TIMEOUT_SECS: Final = 300
#: Reconnect after this long: firewalls in front of HIS servers drop idle connections.
POOL_RECYCLE_SECS: Final = 1800

#: driver -> its keyword for the connect timeout (seconds).
_CONNECT_TIMEOUT_ARG: Final = {
    "psycopg": "connect_timeout",
    "psycopg2": "connect_timeout",
    "pg8000": "timeout",
    "pymysql": "connect_timeout",
    "mysqldb": "connect_timeout",
    "mysqlconnector": "connection_timeout",
    "pyodbc": "timeout",
    "pymssql": "login_timeout",
    "oracledb": "tcp_connect_timeout",
    "pysqlite": "timeout",
}
#: backend -> statements run once on every new connection.
_ON_CONNECT: Final = {
    "postgresql": (
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        f"SET statement_timeout = {STATEMENT_TIMEOUT_SECS * 1000}",
    ),
    "mysql": ("SET SESSION TRANSACTION READ ONLY",),
    "mariadb": ("SET SESSION TRANSACTION READ ONLY",),
    "sqlite": ("PRAGMA query_only = ON",),
}
#: backend -> statement run first in every transaction (no session-wide switch).
_ON_BEGIN: Final = {"oracle": "SET TRANSACTION READ ONLY"}

_ORDER_BY: Final = re.compile(r"\border\s+by\b", re.IGNORECASE)
_NOTHING: Final[Any] = object()
_NULL_CURSOR_NOTE: Final = (
    ":cursor was NULL (no cursor yet, no initial_cursor) and the query found no rows; "
    "'column > NULL' matches nothing: set initial_cursor, e.g. \"2025-03-21\""
)


def build(settings: SqlSettings, ctx: AdapterContext) -> SqlPoller:
    """The runtime's factory (adapters.BUILDERS["sql"]).

    Raises:
        AdapterError: password_file cannot be read, or the query's parameters are wrong.
    """
    return SqlPoller(settings, ctx)


# -- the engine ---------------------------------------------------------------------------


def _read_password(path: Path, adapter: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except OSError as e:
        raise AdapterError(
            f"sql adapter {adapter!r}: cannot read password_file {path}: {e.strerror}",
            hint="Create the file for the agent's user (chmod 600), or fix password_file.",
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "The sql adapter's password file is readable by group or others.",
            extra={"event": "sql.password_file_exposed", "adapter": adapter, "path": str(path)},
        )
    return text.rstrip("\r\n")


def _source_url(settings: SqlSettings) -> URL:
    url = sa.make_url(settings.url)
    if settings.password_file is not None:
        url = url.set(password=_read_password(settings.password_file, settings.name))
    db = url.database or ""
    if (
        url.get_backend_name() == "sqlite"
        and db not in ("", ":memory:")
        and not db.startswith("file:")
    ):
        # Open the file read-only: never create an empty database where the HIS file
        # was expected, never write to it. (A "file:" URI is the operator's own.)
        url = url.set(
            database="file:" + quote(db),
            query={**url.query, "mode": "ro", "uri": "true"},
        )
    return url


def _where(url: URL) -> str:
    """Host and database of a URL, for messages (no user, no password)."""
    if url.get_backend_name() == "sqlite":
        return f"SQLite file {url.database}"
    host = url.host or "localhost"
    port = f":{url.port}" if url.port else ""
    return f"{url.get_backend_name()} database {url.database or ''!r} on {host}{port}"


def make_engine(url: URL) -> Engine:
    """An engine that connects with a timeout, pings before use, and never writes."""
    connect_args: dict[str, Any] = {}
    arg = _CONNECT_TIMEOUT_ARG.get(url.get_driver_name())
    if arg is not None and arg not in url.query:
        connect_args[arg] = CONNECT_TIMEOUT_SECS
    engine = sa.create_engine(
        url,
        pool_pre_ping=True,
        pool_recycle=POOL_RECYCLE_SECS,
        hide_parameters=True,  # error messages never show bound values
        connect_args=connect_args,
    )
    on_connect = _ON_CONNECT.get(url.get_backend_name(), ())
    if on_connect:

        def read_only_session(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            try:
                for statement in on_connect:
                    cur.execute(statement)
            finally:
                cur.close()
            dbapi_conn.commit()  # PostgreSQL: a SET inside a rolled-back transaction is undone

        sa.event.listen(engine, "connect", read_only_session)
    on_begin = _ON_BEGIN.get(url.get_backend_name())
    if on_begin is not None:

        def read_only_transaction(conn: Connection) -> None:
            conn.exec_driver_sql(on_begin)

        sa.event.listen(engine, "begin", read_only_transaction)
    return engine


# -- the poller ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    """Rows read but not yet committed, in cursor order."""

    rows: list[dict[str, Any]]
    values: list[Any]


class SqlPoller:
    """A Poller over one query. Thread-safe: polls and backfills are serialised."""

    kind = "sql"

    def __init__(self, settings: SqlSettings, ctx: AdapterContext) -> None:
        """Raises:
        AdapterError: password_file cannot be read.
        SqlQueryError: the query uses a parameter other than :cursor, or none.
        """
        self.name = settings.name
        self.settings = settings
        self._ctx = ctx
        self._sink: RecordSink = ctx.sink
        self._url = _source_url(settings)
        self._secret = self._url.password
        #: The URL as it may be shown: password replaced by ***.
        self.shown_url = self._url.render_as_string(hide_password=True)
        self.where = _where(sa.make_url(settings.url))
        self._statement = sa.text(settings.query)
        self._lock = threading.Lock()
        params = set(self._statement.compile().params)
        if params != {"cursor"}:
            raise SqlQueryError(
                f"sql adapter {self.name!r}: the query must use :cursor and no other "
                f"parameter (it uses {', '.join(sorted(params)) or 'none'})",
                hint=(
                    "Bind only :cursor; cast it as CAST(:cursor AS timestamp), since "
                    "':cursor::timestamp' is not read as a parameter."
                ),
            )
        self._engine = make_engine(self._url)

    # -- Poller protocol ----------------------------------------------------------------

    def poll(self) -> PollReport:
        """Read what is new since the cursor; commit records and cursor together.

        Raises:
            PeerUnavailableError: the database cannot be reached, or timed out.
            SqlQueryError: the database refused the query, a configured column is
                missing, or the rows are not in cursor order.
            CapacityExceededError, StorageError: from the buffer; nothing of that
                chunk was committed.
        """
        with self._lock:
            stored = self._sink.cursor(self.name)
            text = stored if stored is not None else self.settings.initial_cursor
            report = PollReport(cursor=stored)
            self._read(decode_cursor(text) if text is not None else None, report)
        if text is None and not report.found:
            report.notes.append(_NULL_CURSOR_NOTE)
            log.warning(
                "The sql adapter's first poll bound :cursor to NULL and found no rows.",
                extra={"event": "sql.null_cursor_empty", "adapter": self.name},
            )
        self._log_done("poll", report)
        return report

    def backfill(
        self,
        since: dt.date,
        until: dt.date,
        *,
        progress: Callable[[PollReport], None] | None = None,
    ) -> PollReport:
        """Re-read the rows whose cursor value falls on the days since..until
        (inclusive, Asia/Tehran), without moving the live cursor. Harmless to repeat.

        Works when cursor_column holds dates or times (a date/time type, or text in
        ISO form); the range is of that column (e.g. the row's last change), not of
        occurred_at.

        Raises:
            BackfillUnsupportedError: the cursor column is not a date or time.
            PeerUnavailableError, SqlQueryError, StorageError: as `poll`.
        """
        if until < since:
            raise AdapterError(
                f"backfill of {self.name!r}: until ({until}) is before since ({since})",
                hint="Give --since on or before --until.",
            )
        start = dt.datetime.combine(since, dt.time(), TEHRAN)
        end = dt.datetime.combine(until + dt.timedelta(days=1), dt.time(), TEHRAN)
        with self._lock:
            bind = self._backfill_bind(since)
            report = PollReport()
            self._read(bind, report, window=(start, end), progress=progress)
        self._log_done("backfill", report)
        return report

    def checks(self) -> Sequence[Check]:
        """For `doctor`: the database answers, and the query runs and fits. Never raises."""
        connect = self._check_connect()
        query = (
            self._check_query()
            if connect.ok
            else Check(f"{self.name}: query", False, "not run: the database is unreachable")
        )
        out = [connect, query]
        if self.settings.password_file is not None:
            out.append(self._check_password_file(self.settings.password_file))
        return out

    def close(self) -> None:
        """Close the pooled connections."""
        self._engine.dispose()

    # -- reading ------------------------------------------------------------------------

    @contextmanager
    def _rows(self, bind: Any) -> Iterator[tuple[Columns, Iterator[list[dict[str, Any]]]]]:
        """Run the query; yield its resolved columns and its rows in chunks."""
        if not _ORDER_BY.search(self.settings.query):
            raise SqlQueryError(
                f"sql adapter {self.name!r}: the query has no ORDER BY; its rows must come "
                f"in ascending order of cursor column {self.settings.cursor_column!r}",
                hint=f"End the query with 'ORDER BY {self.settings.cursor_column}'.",
            )
        try:
            conn = self._engine.connect()
        except (sa_exc.DBAPIError, sa_exc.TimeoutError) as e:
            raise self._unavailable(e) from None
        try:
            try:
                result = conn.execute(
                    self._statement,
                    {"cursor": bind},
                    execution_options={"stream_results": True, "yield_per": self._batch},
                )
            except sa_exc.DBAPIError as e:
                raise self._query_failed(e) from None
            with result:
                if not result.returns_rows:
                    raise SqlQueryError(
                        f"sql adapter {self.name!r}: the query returns no rows; it must be a SELECT"
                    )
                names = result.keys()
                keys = [str(k) for k in names]
                doubled = sorted({k for k in keys if keys.count(k) > 1})
                if doubled:
                    raise SqlQueryError(
                        f"sql adapter {self.name!r}: the query returns column(s) "
                        f"{', '.join(map(repr, doubled))} more than once",
                        hint="Give each result column its own name (AS ...).",
                    )
                columns = Columns.resolve(self.settings, keys, adapter=self.name)

                def chunks() -> Iterator[list[dict[str, Any]]]:
                    while True:
                        try:
                            rows = result.fetchmany(self._batch)
                        except sa_exc.DBAPIError as e:
                            raise self._query_failed(e) from None
                        if not rows:
                            return
                        yield [dict(zip(keys, row, strict=True)) for row in rows]

                yield columns, chunks()
        finally:
            conn.close()  # rolls back: nothing is ever committed to the source

    @property
    def _batch(self) -> int:
        return self.settings.batch_rows

    def _read(
        self,
        bind: Any,
        report: PollReport,
        *,
        window: tuple[dt.datetime, dt.datetime] | None = None,
        progress: Callable[[PollReport], None] | None = None,
    ) -> None:
        with self._rows(bind) as (columns, chunks):
            mapper = RowMapper(
                node_id=self._ctx.node_id,
                adapter=self.name,
                service=self.settings.service,
                columns=columns,
                clock=self._ctx.clock,
            )
            if window is None:
                self._read_live(mapper, chunks, report)
            else:
                self._read_window(mapper, chunks, report, window, progress)

    def _read_live(
        self, mapper: RowMapper, chunks: Iterator[list[dict[str, Any]]], report: PollReport
    ) -> None:
        col = mapper.columns.cursor
        pending = _Pending([], [])
        last: Any = _NOTHING
        for rows in chunks:
            report.found += len(rows)
            for row in rows:
                value = row[col]
                if value is None:
                    self._quarantine(mapper, row, f"cursor column {col!r} is NULL", report)
                    continue
                if last is not _NOTHING and self._goes_back(value, last):
                    # Commit nothing of this chunk: the rows held so far may have equals
                    # after the disorder, and the cursor must not pass rows not yet seen.
                    raise SqlQueryError(
                        f"sql adapter {self.name!r}: the query's rows are not in ascending "
                        f"order of cursor column {col!r} (a value went backwards; rows "
                        "from there on were not committed)",
                        hint=f"Order the query by the cursor column: 'ORDER BY {col}'.",
                    )
                last = value
                pending.rows.append(row)
                pending.values.append(value)
            if not pending.rows:
                continue
            # The trailing group of equal values may go on in the next chunk: hold it.
            tail = len(pending.values)
            while tail > 0 and pending.values[tail - 1] == last:
                tail -= 1
            if tail > 0:
                self._commit(mapper, pending.rows[:tail], pending.values[tail - 1], report)
                del pending.rows[:tail], pending.values[:tail]
            if len(pending.rows) >= self._batch:
                # One value shared by more rows than a chunk: commit them without moving
                # the cursor (a crash re-reads the group; ids de-duplicate it).
                self._commit(mapper, pending.rows, _NOTHING, report)
                pending = _Pending([], [])
        if last is not _NOTHING and (pending.rows or report.cursor != encode_cursor(last)):
            self._commit(mapper, pending.rows, last, report)

    def _read_window(
        self,
        mapper: RowMapper,
        chunks: Iterator[list[dict[str, Any]]],
        report: PollReport,
        window: tuple[dt.datetime, dt.datetime],
        progress: Callable[[PollReport], None] | None,
    ) -> None:
        start, end = window
        col = mapper.columns.cursor
        for rows in chunks:
            take: list[dict[str, Any]] = []
            past_end = False
            for row in rows:
                when = parse_when(row[col])
                if when is None:
                    if row[col] is None:
                        continue
                    raise BackfillUnsupportedError(
                        f"backfill of {self.name!r}: cursor column {col!r} holds "
                        f"{type(row[col]).__name__} values, not dates or times",
                        hint="Backfill needs a date/time cursor column; poll instead.",
                    )
                if when.at < start:
                    continue
                if when.at >= end:
                    past_end = True
                    break
                take.append(row)
            report.found += len(take)
            if take:
                self._commit(mapper, take, _NOTHING, report)
            if progress is not None:
                self._notify(progress, report)
            if past_end:
                return

    def _backfill_bind(self, since: dt.date) -> Any:
        """A :cursor before every row of `since`, of the cursor column's type.

        The type is that of the live cursor (or of a tagged initial_cursor); without
        either, text on SQLite and a naive timestamp elsewhere. One day early, so that
        no time zone reading of it can start after `since`; rows before it are
        dropped here by their exact time.
        """
        text = self._sink.cursor(self.name) or self.settings.initial_cursor
        tag = cursor_tag(text)
        if tag is None:
            tag = "str" if self._url.get_backend_name() == "sqlite" else "datetime"
            text = None
        day_before = since - dt.timedelta(days=1)
        if tag == "str":
            return day_before.isoformat()
        if tag == "date":
            return day_before
        if tag == "datetime":
            naive = dt.datetime.combine(day_before, dt.time())
            aware = text is not None and decode_cursor(text).utcoffset() is not None
            return naive.replace(tzinfo=TEHRAN) if aware else naive
        raise BackfillUnsupportedError(
            f"backfill of {self.name!r}: its cursor column holds {tag} values, not dates",
            hint="Backfill needs a date/time cursor column; a sequence can only be polled.",
        )

    @staticmethod
    def _goes_back(value: Any, last: Any) -> bool:
        try:
            return bool(value < last)
        except TypeError:  # mixed types, or aware beside naive: no order to trust
            return True

    # -- committing ---------------------------------------------------------------------

    def _commit(
        self, mapper: RowMapper, rows: Sequence[Mapping[str, Any]], value: Any, report: PollReport
    ) -> None:
        records: list[Record] = []
        for row in rows:
            try:
                records.append(mapper.record(row))
            except InputRejectedError as e:
                self._quarantine(mapper, row, str(e), report)
        cursor = None if value is _NOTHING else Cursor(self.name, encode_cursor(value))
        if not records and cursor is None:
            return
        put = self._sink.put(records, cursor=cursor)
        report.new += put.inserted
        report.duplicates += put.duplicates
        if cursor is not None:
            report.cursor = cursor.value
        if put.inserted:
            self._notify(lambda _r: self._ctx.on_committed(), report)

    def _quarantine(
        self, mapper: RowMapper, row: Mapping[str, Any], reason: str, report: PollReport
    ) -> None:
        self._sink.quarantine(
            row_json(row), adapter=self.name, reason=reason, media_type=MEDIA_TYPE
        )
        report.quarantined += 1

    def _notify(self, fn: Callable[[PollReport], None], report: PollReport) -> None:
        try:
            fn(report)
        except Exception:  # an observer never breaks the poll (STYLE.md 3.5)
            log.exception(
                "An observer of the sql adapter failed.",
                extra={"event": "sql.observer_failed", "adapter": self.name},
            )

    def _log_done(self, what: str, report: PollReport) -> None:
        level = logging.INFO if report.new or report.quarantined else logging.DEBUG
        log.log(
            level,
            "Sql %s of %s: %d rows, %d new records, %d duplicates, %d quarantined.",
            what,
            self.name,
            report.found,
            report.new,
            report.duplicates,
            report.quarantined,
            extra={"event": f"sql.{what}_completed", "adapter": self.name, "count": report.new},
        )
        if report.quarantined:
            log.warning(
                "Rows the sql adapter could not map were quarantined.",
                extra={
                    "event": "sql.rows_quarantined",
                    "adapter": self.name,
                    "count": report.quarantined,
                },
            )

    # -- errors -------------------------------------------------------------------------

    def _reason(self, e: BaseException) -> str:
        orig = getattr(e, "orig", None) or e
        lines = str(orig).strip().splitlines()
        text = f"{type(orig).__name__}: {lines[0] if lines else ''}".rstrip(": ")
        if self._secret:
            text = text.replace(self._secret, "***")
        return text[:300]

    def _unavailable(self, e: BaseException) -> PeerUnavailableError:
        return PeerUnavailableError(
            f"sql adapter {self.name!r}: cannot reach the {self.where}: {self._reason(e)}",
            hint=(
                f"Check that the {self.where} is up and reachable from this node (host, "
                "port, firewall), and that the user in the adapter's url may log in; the "
                "next poll tries again."
            ),
        )

    def _query_failed(self, e: sa_exc.DBAPIError) -> AdapterError:
        if e.connection_invalidated or isinstance(e, sa_exc.InterfaceError):
            return self._unavailable(e)
        if isinstance(e, sa_exc.OperationalError):
            # Elsewhere OperationalError is the server's trouble (timeout, lock, shutdown);
            # SQLite also reports a bad query with it.
            message = str(e.orig).lower()
            if self._url.get_backend_name() != "sqlite" or any(
                w in message for w in ("locked", "busy", "unable to open", "disk i/o")
            ):
                return self._unavailable(e)
        # A DataError can quote a value of the source: show its type only.
        detail = type(e.orig).__name__ if isinstance(e, sa_exc.DataError) else self._reason(e)
        return SqlQueryError(
            f"sql adapter {self.name!r}: the {self.where} refused the query: {detail}"
        )

    # -- checks -------------------------------------------------------------------------

    def _check_connect(self) -> Check:
        name = f"{self.name}: database"
        try:
            with self._engine.connect() as conn:
                conn.execute(sa.select(sa.literal_column("1"))).scalar()
        except Exception as e:  # noqa: BLE001 - checks never raise
            err = self._unavailable(e)
            return Check(name, False, str(err), err.hint)
        return Check(name, True, f"{self.where} answers ({self.shown_url})")

    def _check_query(self) -> Check:
        name = f"{self.name}: query"
        try:
            text = self._sink.cursor(self.name) or self.settings.initial_cursor
            with self._rows(decode_cursor(text) if text is not None else None) as (_, chunks):
                next(chunks, None)
        except AdapterError as e:
            return Check(name, False, str(e), e.hint)
        except Exception as e:  # noqa: BLE001 - checks never raise
            return Check(name, False, f"{type(e).__name__}: {self._reason(e)}")
        return Check(name, True, "runs with :cursor and returns every configured column")

    @staticmethod
    def _check_password_file(path: Path) -> Check:
        name = "password_file"
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            return Check(name, False, f"{path}: {e.strerror}", "Create it, mode 0600.")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            return Check(name, False, f"{path} is readable by others", f"chmod 600 {path}")
        return Check(name, True, f"{path} (mode 0600)")
