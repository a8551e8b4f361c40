"""The ``sql`` adapter against a real PostgreSQL server standing in for a HIS database.

Needs SEPAS_TEST_PG_DSN (e.g. postgresql://postgres@127.0.0.1:5432/postgres); without it
the tests skip, except under SEPAS_REQUIRE_PEERS=1, where a missing DSN or an
unreachable server fails. Each test creates its own schema (a table behind a view, as
HIS vendors expose them) and drops it afterwards. The adapter reaches the server
through SQLAlchemy (``postgresql+psycopg://``), as an operator would configure it; the
test writes the HIS side with psycopg directly.

What only a real server shows: typed cursors (timestamp and timestamptz) bound back
as parameters, server-side cursors streamed in chunks, the read-only session, and the
server's own errors mapped to the adapter's.
"""

# Naive datetimes here are deliberate: `timestamp` columns hold Asia/Tehran wall time.
# SQL is built from the test's own random schema names, never from input.
# ruff: noqa: DTZ001, S608

from __future__ import annotations

import datetime as dt
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.sql.mapping import SqlQueryError
from adapters.sql.poller import SqlPoller, build
from adapters.sql.settings import SqlSettings
from agent.adapter import AdapterContext
from agent.buffer import Buffer
from agent.dates import TEHRAN
from agent.errors import PeerUnavailableError, StorageError
from tests.factories import national_code, patient_name
from tests.hubkit import require_peer
from tests.unit.test_sql_adapter import CrashingSink, refs, stored

try:
    import psycopg
    import sqlalchemy as sa
    from psycopg.conninfo import conninfo_to_dict
except ImportError:  # the `postgres` extra is not installed
    psycopg = None  # type: ignore[assignment]

pytestmark = [pytest.mark.peers]

DSN_ENV = "SEPAS_TEST_PG_DSN"
NODE = "FAC-PG"
ADAPTER = "his"
T0 = dt.datetime(2025, 3, 21, 9, 0)


@pytest.fixture(scope="module")
def pg_dsn() -> str:
    if psycopg is None:
        require_peer("PostgreSQL", "psycopg is not installed (pip install -e '.[postgres]')")
    dsn = os.environ.get(DSN_ENV, "")
    if not dsn:
        require_peer("PostgreSQL", f"{DSN_ENV} is not set")
    try:
        psycopg.connect(dsn, connect_timeout=5).close()
    except psycopg.Error as e:
        require_peer("PostgreSQL", f"{DSN_ENV} is unreachable ({type(e).__name__})")
    return dsn


def sqlalchemy_url(dsn: str, **changes: Any) -> str:
    """The DSN's server as the SQLAlchemy URL an operator writes in the config."""
    info = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    port = info.get("port")
    url = sa.URL.create(
        "postgresql+psycopg",
        username=info.get("user"),
        password=info.get("password"),
        host=info.get("host") or "127.0.0.1",
        port=int(port) if port else None,
        database=info.get("dbname"),
    )
    return url.set(**changes).render_as_string(hide_password=False)


class PgHis:
    """Schema ``name``: table ``adm`` behind view ``v_adm``, written with psycopg."""

    def __init__(self, dsn: str, schema: str, changed_type: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self.aware = changed_type == "timestamptz"
        self._run(
            f"""
            CREATE SCHEMA {schema};
            CREATE TABLE {schema}.adm (
                id bigint PRIMARY KEY, rev int NOT NULL DEFAULT 1,
                nid text, nid_number bigint, mrn text, family text, given text,
                dob date, sex text, admitted_at timestamp, changed_at {changed_type},
                ward text
            );
            CREATE VIEW {schema}.v_adm AS
                SELECT id, rev, nid, nid_number, mrn, family, given, dob, sex,
                       admitted_at, changed_at, ward
                FROM {schema}.adm;
            """
        )

    def _run(self, sql: str, params: Any = None) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql, params)  # type: ignore[arg-type]

    def when(self, t: dt.datetime) -> dt.datetime:
        return t.replace(tzinfo=TEHRAN) if self.aware else t

    def add(self, i: int, *, changed: dt.datetime | None = None, **cols: Any) -> None:
        given, family = patient_name(i).split(" ")
        row: dict[str, Any] = {
            "id": i,
            "nid": national_code(i),
            "nid_number": int(national_code(i)),
            "mrn": f"MRN-{i}",
            "family": family,
            "given": given,
            "dob": dt.date(1980, 1, 1),
            "sex": "F" if i % 2 else "M",
            "admitted_at": T0 + dt.timedelta(minutes=i),
            "changed_at": self.when(changed or T0 + dt.timedelta(minutes=i)),
            "ward": "ICU",
        }
        row.update(cols)
        names = ", ".join(row)
        marks = ", ".join(["%s"] * len(row))
        self._run(
            f"INSERT INTO {self.schema}.adm ({names}) VALUES ({marks})",
            list(row.values()),
        )

    def update(self, i: int, *, changed: dt.datetime) -> None:
        self._run(
            f"UPDATE {self.schema}.adm SET rev = rev + 1, changed_at = %s WHERE id = %s",
            [self.when(changed), i],
        )

    def drop(self) -> None:
        self._run(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


@pytest.fixture(params=["timestamp", "timestamptz"])
def his(request: pytest.FixtureRequest, pg_dsn: str) -> Iterator[PgHis]:
    db = PgHis(pg_dsn, f"sepas_sql_{secrets.token_hex(6)}", request.param)
    yield db
    db.drop()


@pytest.fixture
def naive_his(pg_dsn: str) -> Iterator[PgHis]:
    db = PgHis(pg_dsn, f"sepas_sql_{secrets.token_hex(6)}", "timestamp")
    yield db
    db.drop()


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[Buffer]:
    b = Buffer.open(tmp_path / "agent", data_key=None)
    yield b
    b.close()


@pytest.fixture
def make_poller(pg_dsn: str) -> Iterator[Callable[..., SqlPoller]]:
    made: list[SqlPoller] = []

    def make(his: PgHis, sink: Any, **overrides: Any) -> SqlPoller:
        fields = {
            "occurred_at": "admitted_at",
            "national_id": "nid",
            "local_id": "mrn",
            "family": "family",
            "given": "given",
            "birth_date": "dob",
            "gender": "sex",
        }
        fields.update(overrides.pop("fields", {}))
        data: dict[str, Any] = {
            "name": ADAPTER,
            "kind": "sql",
            "url": sqlalchemy_url(pg_dsn),
            # A bare string :cursor (initial_cursor) is cast by the server; later cursors
            # are bound as the timestamp or timestamptz they were read as.
            "query": (
                f"SELECT * FROM {his.schema}.v_adm WHERE changed_at > :cursor ORDER BY changed_at"
            ),
            "cursor_column": "changed_at",
            "initial_cursor": "2000-01-01",
            "key_columns": ["id"],
            "version_columns": ["rev"],
            "service": "admission",
            "fields": fields,
            "batch_rows": 500,
        }
        data.update(overrides)
        ctx = AdapterContext(node_id=NODE, sink=sink, log_key=b"k")
        poller = build(SqlSettings.model_validate(data), ctx)
        made.append(poller)
        return poller

    yield make
    for p in made:
        p.close()


def test_polls_take_new_rows_once_and_a_new_version_again(
    his: PgHis, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    for i in (1, 2, 3):
        his.add(i)
    poller = make_poller(his, buffer, batch_rows=2)  # streamed from a server-side cursor

    first = poller.poll()
    assert (first.found, first.new, first.duplicates, first.quarantined) == (3, 3, 0, 0)
    expected = his.when(T0 + dt.timedelta(minutes=3))
    assert first.cursor is not None
    assert first.cursor.startswith("datetime:")
    assert dt.datetime.fromisoformat(first.cursor.removeprefix("datetime:")) == expected

    his.add(4)
    his.update(1, changed=T0 + dt.timedelta(hours=1))
    second = poller.poll()
    assert (second.found, second.new, second.duplicates) == (2, 2, 0)
    assert poller.poll().found == 0

    records = stored(buffer)
    assert refs(records) == ["1", "2", "3", "4", "1"]
    assert len({r.id for r in records}) == 5
    rec = records[0]
    assert rec.occurred_at == dt.datetime(2025, 3, 21, 9, 1, tzinfo=TEHRAN)
    assert rec.patient is not None
    assert (rec.patient.national_id, rec.patient.national_id_valid) == (national_code(1), True)
    patient, encounter = (e["resource"] for e in rec.body["entry"])
    assert patient["birthDate"] == "1980-01-01"
    assert encounter["resourceType"] == "Encounter"
    assert encounter["period"]["start"] == "2025-03-21T09:01:00+03:30"


@pytest.mark.parametrize("fail_on", [2, 3])
def test_a_crash_mid_poll_resumes_after_the_last_committed_chunk(
    his: PgHis, tmp_path: Path, make_poller: Callable[..., SqlPoller], fail_on: int
) -> None:
    for i in range(1, 8):
        his.add(i)
    buffer = Buffer.open(tmp_path / "agent", data_key=None)
    with pytest.raises(StorageError):
        make_poller(his, CrashingSink(buffer, fail_on=fail_on), batch_rows=2).poll()
    committed = {2: 1, 3: 3}[fail_on]  # each chunk holds back its last row (ties)
    assert refs(stored(buffer)) == [str(i) for i in range(1, committed + 1)]
    buffer.close()

    reopened = Buffer.open(tmp_path / "agent", data_key=None)
    try:
        report = make_poller(his, reopened, batch_rows=2).poll()
        assert (report.new, report.duplicates) == (7 - committed, 0)
        assert refs(stored(reopened)) == [str(i) for i in range(1, 8)]
    finally:
        reopened.close()


@pytest.mark.parametrize("fail_on", [0, 2, 3])
def test_rows_sharing_a_timestamp_across_chunks_are_never_skipped(
    naive_his: PgHis, buffer: Buffer, make_poller: Callable[..., SqlPoller], fail_on: int
) -> None:
    naive_his.add(1)
    for i in (2, 3, 4):
        naive_his.add(i, changed=T0 + dt.timedelta(minutes=30))
    naive_his.add(5, changed=T0 + dt.timedelta(minutes=40))
    if fail_on:
        with pytest.raises(StorageError):
            make_poller(naive_his, CrashingSink(buffer, fail_on=fail_on), batch_rows=2).poll()
    make_poller(naive_his, buffer, batch_rows=2).poll()
    assert sorted(refs(stored(buffer))) == ["1", "2", "3", "4", "5"]


def test_a_numeric_national_code_column_gets_its_leading_zeros_back(
    naive_his: PgHis, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    code = national_code(3)
    persian = code.translate(str.maketrans("0123456789", "۰۱۲۳۴۵۶۷۸۹"))
    naive_his.add(1, nid=persian, nid_number=int("0012345679"))
    make_poller(naive_his, buffer, name="by-number", fields={"national_id": "nid_number"}).poll()
    make_poller(naive_his, buffer, name="by-text").poll()

    by_number, by_text = stored(buffer)
    assert by_number.patient is not None
    assert by_text.patient is not None
    assert (by_number.patient.national_id, by_number.patient.national_id_valid) == (
        "0012345679",
        True,
    )
    assert (by_text.patient.national_id, by_text.patient.national_id_valid) == (code, True)


def test_the_session_is_read_only(
    naive_his: PgHis, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    poller = make_poller(naive_his, buffer)
    with poller._engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW transaction_read_only").scalar() == "on"
        with pytest.raises(sa.exc.DBAPIError, match="read-only transaction"):
            conn.exec_driver_sql(f"DELETE FROM {naive_his.schema}.adm")


def test_backfill_is_idempotent_and_leaves_the_cursor_alone(
    naive_his: PgHis, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    for i, day in ((1, 20), (2, 21), (3, 21), (4, 22)):
        naive_his.add(i, changed=dt.datetime(2025, 3, day, 0, 0) + dt.timedelta(minutes=i))
    poller = make_poller(naive_his, buffer, batch_rows=1)

    first = poller.backfill(dt.date(2025, 3, 21), dt.date(2025, 3, 21))
    again = poller.backfill(dt.date(2025, 3, 21), dt.date(2025, 3, 21))
    assert (first.new, again.new, again.duplicates) == (2, 0, 2)
    assert buffer.cursor(ADAPTER) is None

    live = poller.poll()
    assert (live.new, live.duplicates) == (2, 2)
    later = poller.backfill(dt.date(2025, 3, 20), dt.date(2025, 3, 22))  # typed by the cursor
    assert (later.new, later.duplicates) == (0, 4)
    assert buffer.cursor(ADAPTER) == live.cursor


def test_a_query_the_server_refuses_names_the_adapter(
    naive_his: PgHis, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    poller = make_poller(
        naive_his,
        buffer,
        query=f"SELECT * FROM {naive_his.schema}.v_nope WHERE changed_at > :cursor ORDER BY 1",
    )
    with pytest.raises(SqlQueryError, match=r"sql adapter 'his'.*v_nope"):
        poller.poll()


def test_a_server_that_is_not_there_is_unavailable_without_the_password(
    naive_his: PgHis, buffer: Buffer, make_poller: Callable[..., SqlPoller], pg_dsn: str
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "Pg-S3cret"  # noqa: S105 - made up; the test checks it never shows
    poller = make_poller(naive_his, buffer, url=sqlalchemy_url(pg_dsn, port=port, password=secret))
    with pytest.raises(PeerUnavailableError) as caught:
        poller.poll()
    assert secret not in str(caught.value)
    assert f":{port}" in str(caught.value)

    wrong_db = make_poller(naive_his, buffer, url=sqlalchemy_url(pg_dsn, database="no_such_db"))
    with pytest.raises(PeerUnavailableError, match="no_such_db"):
        wrong_db.poll()
