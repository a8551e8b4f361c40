"""The ``sql`` adapter against a real SQLite file standing in for a HIS database.

The HIS side is a table behind a view (what HIS vendors expose), written by the test
with the sqlite3 module; the agent side is a real Buffer in tmp_path. Every patient is
synthetic (tests.factories).
"""

# Naive datetimes here are deliberate: they are what a HIS stores (Asia/Tehran).
# ruff: noqa: DTZ001

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from adapters import build as build_adapter
from adapters.fhir import JALALI_BIRTH_DATE_EXT, NATIONAL_ID_SYSTEM, NATIONAL_ID_VALID_EXT
from adapters.sql.mapping import (
    SQL_COLUMN_EXT,
    SqlQueryError,
    decode_cursor,
    encode_cursor,
    parse_when,
)
from adapters.sql.poller import SqlPoller
from adapters.sql.settings import SqlSettings
from agent.adapter import AdapterContext, Poller, PollReport
from agent.buffer import Buffer, Cursor
from agent.dates import TEHRAN
from agent.errors import BackfillUnsupportedError, PeerUnavailableError, StorageError
from agent.record import Record, Service, sql_id
from tests.factories import national_code, patient_name

NODE = "FAC-SQL"
ADAPTER = "his"
LOG_KEY = b"test-log-key"
QUERY = "SELECT * FROM v_lab WHERE changed_at > :cursor ORDER BY changed_at"
T0 = dt.datetime(2025, 3, 21, 9, 0)  # naive: Asia/Tehran, as the HIS stores it


# -- the HIS stand-in ---------------------------------------------------------------------


class His:
    """A SQLite HIS database: table ``lab`` behind view ``v_lab``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._db() as db:
            db.executescript(
                """
                CREATE TABLE lab (
                    id INTEGER PRIMARY KEY, rev INTEGER NOT NULL DEFAULT 1,
                    nid TEXT, mrn TEXT, family TEXT, given TEXT, dob TEXT, sex TEXT,
                    taken_at TEXT, changed_at TEXT, test TEXT, value TEXT
                );
                CREATE VIEW v_lab AS
                    SELECT id, rev, nid, mrn, family, given, dob, sex, taken_at, changed_at,
                           test, value
                    FROM lab;
                """
            )

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path)

    def add(self, i: int, *, changed: dt.datetime | None = None, **cols: Any) -> None:
        """Row ``i`` (synthetic patient ``i``), changed at T0 + i minutes unless given."""
        given, family = patient_name(i).split(" ")
        row: dict[str, Any] = {
            "id": i,
            "nid": national_code(i),
            "mrn": f"MRN-{i}",
            "family": family,
            "given": given,
            "dob": "1980-01-01",
            "sex": "F" if i % 2 else "M",
            "taken_at": f"{T0 + dt.timedelta(minutes=i):%Y-%m-%d %H:%M:%S}",
            "changed_at": _ts(changed or T0 + dt.timedelta(minutes=i)),
            "test": "GLU",
            "value": f"5.{i}",
        }
        row.update(cols)
        names = ", ".join(row)
        marks = ", ".join("?" * len(row))
        with self._db() as db:
            db.execute(f"INSERT INTO lab ({names}) VALUES ({marks})", list(row.values()))  # noqa: S608

    def update(self, i: int, *, changed: dt.datetime, bump: bool = True, **cols: Any) -> None:
        sets = {"changed_at": _ts(changed), **cols}
        assignments = ", ".join(f"{k} = ?" for k in sets)
        rev = ", rev = rev + 1" if bump else ""
        with self._db() as db:
            db.execute(
                f"UPDATE lab SET {assignments}{rev} WHERE id = ?",  # noqa: S608
                [*sets.values(), i],
            )


def _ts(t: dt.datetime) -> str:
    return f"{t:%Y-%m-%d %H:%M:%S}"


@pytest.fixture
def his(tmp_path: Path) -> His:
    return His(tmp_path / "his.db")


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[Buffer]:
    b = Buffer.open(tmp_path / "agent", data_key=None)
    yield b
    b.close()


def settings_for(his: His, **overrides: Any) -> SqlSettings:
    fields = {
        "occurred_at": "taken_at",
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
        "url": f"sqlite:///{his.path}",
        "query": QUERY,
        "cursor_column": "changed_at",
        "initial_cursor": "2000-01-01",
        "key_columns": ["id"],
        "version_columns": ["rev"],
        "service": "lab-result",
        "fields": fields,
        "batch_rows": 500,
    }
    data.update(overrides)
    return SqlSettings.model_validate(data)


@pytest.fixture
def make_poller() -> Iterator[Callable[..., SqlPoller]]:
    """Build pollers the way the runtime does (adapters.build); closed at teardown."""
    made: list[SqlPoller] = []

    def make(his: His, sink: Any, **overrides: Any) -> SqlPoller:
        ctx = AdapterContext(node_id=NODE, sink=sink, log_key=LOG_KEY)
        poller = build_adapter(settings_for(his, **overrides), ctx)
        assert isinstance(poller, SqlPoller)
        assert isinstance(poller, Poller)
        made.append(poller)
        return poller

    yield make
    for p in made:
        p.close()


def stored(buffer: Buffer) -> list[Record]:
    """Every record in the buffer, in intake order (leased, then given back)."""
    lease = buffer.lease(max_records=100_000, max_bytes=10**12, lease_secs=60)
    if lease is None:
        return []
    buffer.release(lease)
    return [it.record() for it in lease.items]


def refs(records: Sequence[Record]) -> list[str]:
    return [r.source.ref for r in records]


class CrashingSink:
    """The buffer, except that the n-th put (1-based) raises as a crash would."""

    def __init__(self, buffer: Buffer, *, fail_on: int) -> None:
        self.buffer = buffer
        self.fail_on = fail_on
        self.puts: list[tuple[int, str | None]] = []  # (records, cursor) per put

    def put(self, records: Sequence[Record], *, cursor: Cursor | None = None, **kw: Any) -> Any:
        if len(self.puts) + 1 == self.fail_on:
            self.puts.append((-1, None))
            raise StorageError("simulated crash before the commit")
        self.puts.append((len(records), None if cursor is None else cursor.value))
        return self.buffer.put(records, cursor=cursor, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.buffer, name)


# -- polling ------------------------------------------------------------------------------


def test_first_poll_takes_every_row_and_the_second_only_new_ones(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    for i in (1, 2, 3):
        his.add(i)
    poller = make_poller(his, buffer)

    first = poller.poll()
    assert (first.found, first.new, first.duplicates, first.quarantined) == (3, 3, 0, 0)
    assert first.cursor == "str:" + _ts(T0 + dt.timedelta(minutes=3))
    assert buffer.cursor(ADAPTER) == first.cursor

    his.add(4)
    his.add(5)
    second = poller.poll()
    assert (second.found, second.new, second.duplicates) == (2, 2, 0)
    assert refs(stored(buffer)) == ["1", "2", "3", "4", "5"]

    third = poller.poll()
    assert (third.found, third.new) == (0, 0)
    assert third.cursor == second.cursor


def test_an_updated_row_with_a_new_version_yields_a_new_record(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    his.add(1)
    his.add(2)
    poller = make_poller(his, buffer)
    poller.poll()
    before = {r.source.ref: r.id for r in stored(buffer)}

    his.update(1, changed=T0 + dt.timedelta(hours=1), value="6.1")
    report = poller.poll()

    assert (report.found, report.new, report.duplicates) == (1, 1, 0)
    records = stored(buffer)
    assert refs(records) == ["1", "2", "1"]
    assert records[2].id != before["1"]
    assert records[2].id == sql_id(NODE, ADAPTER, '["1"]', '["2"]')  # key, then rev 2


def test_a_row_touched_without_a_new_version_yields_no_record(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    his.add(1)
    poller = make_poller(his, buffer)
    poller.poll()

    his.update(1, changed=T0 + dt.timedelta(hours=1), bump=False)  # same rev
    report = poller.poll()

    assert (report.found, report.new, report.duplicates) == (1, 0, 1)
    assert len(stored(buffer)) == 1
    assert report.cursor == "str:" + _ts(T0 + dt.timedelta(hours=1))


def test_without_version_columns_the_cursor_value_is_the_version(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    his.add(1)
    poller = make_poller(his, buffer, version_columns=[])
    poller.poll()
    his.update(1, changed=T0 + dt.timedelta(hours=1), bump=False)
    assert poller.poll().new == 1

    ids = [r.id for r in stored(buffer)]
    assert ids == [
        sql_id(NODE, ADAPTER, '["1"]', json.dumps([_ts(T0 + dt.timedelta(minutes=1))])),
        sql_id(NODE, ADAPTER, '["1"]', json.dumps([_ts(T0 + dt.timedelta(hours=1))])),
    ]


@pytest.mark.parametrize("fail_on", [2, 3])
def test_the_cursor_commits_with_the_records_so_a_crash_mid_poll_skips_and_doubles_nothing(
    his: His, tmp_path: Path, make_poller: Callable[..., SqlPoller], fail_on: int
) -> None:
    for i in range(1, 8):
        his.add(i)
    buffer = Buffer.open(tmp_path / "agent", data_key=None)
    sink = CrashingSink(buffer, fail_on=fail_on)
    with pytest.raises(StorageError, match="simulated crash"):
        make_poller(his, sink, batch_rows=2).poll()
    # Chunks of 2; each commit holds back its last row (a later one may share its value):
    # put 1 = [1], put 2 = [2, 3], put 3 = [4, 5]. What the failed put carried is not in.
    committed = {2: 1, 3: 3}[fail_on]
    assert refs(stored(buffer)) == [str(i) for i in range(1, committed + 1)]
    assert buffer.cursor(ADAPTER) == "str:" + _ts(T0 + dt.timedelta(minutes=committed))
    buffer.close()

    reopened = Buffer.open(tmp_path / "agent", data_key=None)
    try:
        report = make_poller(his, reopened, batch_rows=2).poll()
        assert (report.found, report.new, report.duplicates) == (7 - committed, 7 - committed, 0)
        assert refs(stored(reopened)) == [str(i) for i in range(1, 8)]
    finally:
        reopened.close()


def test_rows_sharing_a_cursor_value_across_a_chunk_boundary_are_not_skipped(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    tie = T0 + dt.timedelta(minutes=30)
    his.add(1)
    for i in (2, 3, 4):
        his.add(i, changed=tie)
    his.add(5, changed=T0 + dt.timedelta(minutes=40))
    sink = CrashingSink(buffer, fail_on=0)

    report = make_poller(his, sink, batch_rows=2).poll()

    # Chunk [1, 2]: row 1 committed; 2 held (its value may go on).  Chunk [3, 4]: still
    # the same value, and as many rows as a chunk: committed without moving the cursor.
    # Chunk [5]: the group is complete, so 5 is held and the cursor passes the tie.
    assert sink.puts == [
        (1, "str:" + _ts(T0 + dt.timedelta(minutes=1))),
        (3, None),
        (1, "str:" + _ts(T0 + dt.timedelta(minutes=40))),
    ]
    assert (report.found, report.new, report.duplicates) == (5, 5, 0)
    assert sorted(refs(stored(buffer))) == ["1", "2", "3", "4", "5"]


@pytest.mark.parametrize("fail_on", [2, 3])
def test_a_crash_inside_a_group_of_equal_cursor_values_loses_none_of_the_group(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller], fail_on: int
) -> None:
    tie = T0 + dt.timedelta(minutes=30)
    his.add(1)
    for i in (2, 3, 4):
        his.add(i, changed=tie)
    his.add(5, changed=T0 + dt.timedelta(minutes=40))

    with pytest.raises(StorageError):
        make_poller(his, CrashingSink(buffer, fail_on=fail_on), batch_rows=2).poll()
    # The cursor never reached the tie's value while part of the group was uncommitted.
    assert buffer.cursor(ADAPTER) == "str:" + _ts(T0 + dt.timedelta(minutes=1))

    report = make_poller(his, buffer, batch_rows=2).poll()
    assert report.found == 4
    assert sorted(refs(stored(buffer))) == ["1", "2", "3", "4", "5"]


def test_an_integer_cursor_binds_back_as_an_integer(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    for i in (1, 2):
        his.add(i)
    poller = make_poller(
        his,
        buffer,
        query="SELECT * FROM v_lab WHERE id > :cursor ORDER BY id",
        cursor_column="id",
        initial_cursor="int:0",
    )
    assert poller.poll().cursor == "int:2"
    his.add(10)
    report = poller.poll()
    # A text "2" would compare above every integer in SQLite and find nothing.
    assert (report.new, report.cursor) == (1, "int:10")


# -- mapping ------------------------------------------------------------------------------


def test_persian_digits_in_a_national_code_are_normalised_and_an_invalid_code_is_flagged(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    code = national_code(1)
    persian = code.translate(str.maketrans("0123456789", "۰۱۲۳۴۵۶۷۸۹"))
    bad = code[:9] + str((int(code[9]) + 1) % 10)
    his.add(1, nid=f" {persian[:3]}-{persian[3:]} ")
    his.add(2, nid=bad)
    his.add(3, nid=None)

    assert make_poller(his, buffer).poll().new == 3

    one, two, three = stored(buffer)
    assert one.patient is not None
    assert two.patient is not None
    assert three.patient is not None
    assert (one.patient.national_id, one.patient.national_id_valid) == (code, True)
    assert (two.patient.national_id, two.patient.national_id_valid) == (bad, False)
    assert (three.patient.national_id, three.patient.local_id) == (None, "MRN-3")
    ident = two.body["entry"][0]["resource"]["identifier"][0]
    assert (ident["system"], ident["value"]) == (NATIONAL_ID_SYSTEM, bad)
    assert ident["extension"] == [{"url": NATIONAL_ID_VALID_EXT, "valueBoolean": False}]


def test_a_row_becomes_a_bundle_with_the_patient_first_and_the_service_resource(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    his.add(1, family="كريمي", given="علي", dob="1362/07/04", sex="زن")
    make_poller(his, buffer).poll()

    (rec,) = stored(buffer)
    assert rec.service is Service.LAB_RESULT
    assert rec.occurred_at == dt.datetime(2025, 3, 21, 9, 1, tzinfo=TEHRAN)
    assert (rec.source.adapter, rec.source.kind, rec.source.ref) == (ADAPTER, "sql", "1")
    bundle = rec.body
    assert (bundle["resourceType"], bundle["type"]) == ("Bundle", "collection")
    patient, basic = (e["resource"] for e in bundle["entry"])
    assert patient["resourceType"] == "Patient"
    assert patient["name"][0]["family"] == "کریمی"  # Arabic yeh and kaf folded
    assert patient["name"][0]["given"] == ["علی"]
    assert patient["gender"] == "female"
    assert patient["birthDate"] == "1983-09-26"  # the Jalali date converted, and kept:
    assert patient["_birthDate"]["extension"] == [
        {"url": JALALI_BIRTH_DATE_EXT, "valueString": "1362/07/04"}
    ]
    assert basic["resourceType"] == "Basic"
    assert basic["code"]["coding"][0]["code"] == "lab-result"
    assert basic["subject"] == {"reference": bundle["entry"][0]["fullUrl"]}
    assert basic["created"] == "2025-03-21"
    columns = {
        e["extension"][0]["valueString"]: e["extension"][1]["valueString"]
        for e in basic["extension"]
        if e["url"] == SQL_COLUMN_EXT
    }
    assert columns == {
        "id": "1",
        "rev": "1",
        "changed_at": _ts(T0 + dt.timedelta(minutes=1)),
        "test": "GLU",
        "value": "5.1",
    }
    assert rec.raw.media_type == "application/json"
    assert rec.raw.data is not None
    assert json.loads(rec.raw.data)["family"] == "كريمي"  # raw is the row as read


@pytest.mark.parametrize(
    ("service", "status", "period"),
    [("admission", "in-progress", "start"), ("discharge", "finished", "end")],
)
def test_admission_and_discharge_rows_become_encounters(
    his: His,
    buffer: Buffer,
    make_poller: Callable[..., SqlPoller],
    service: str,
    status: str,
    period: str,
) -> None:
    his.add(1, taken_at="۱۴۰۴/۰۱/۰۱ ۰۸:۳۰")  # Jalali, Persian digits
    make_poller(his, buffer, service=service).poll()

    (rec,) = stored(buffer)
    assert rec.occurred_at == dt.datetime(2025, 3, 21, 8, 30, tzinfo=TEHRAN)
    enc = rec.body["entry"][1]["resource"]
    assert (enc["resourceType"], enc["status"], enc["class"]["code"]) == (
        "Encounter",
        status,
        "IMP",
    )
    assert enc["period"][period] == "2025-03-21T08:30:00+03:30"
    assert enc["period"]["_" + period]["extension"][0]["valueString"] == "۱۴۰۴/۰۱/۰۱ ۰۸:۳۰"


def test_a_row_that_cannot_be_mapped_is_quarantined_and_the_poll_goes_on(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    his.add(1)
    his.add(2, taken_at=None)
    his.add(3, taken_at="yesterday morning")
    his.add(4)
    poller = make_poller(his, buffer, batch_rows=2)

    report = poller.poll()

    assert (report.found, report.new, report.quarantined) == (4, 2, 2)
    assert refs(stored(buffer)) == ["1", "4"]
    entries = buffer.quarantined()
    assert [e.reason for e in entries] == [
        "occurred_at column 'taken_at' is NULL",
        "occurred_at column 'taken_at' is not a date or time "
        "(str in neither a Gregorian nor a Jalali form)",
    ]
    assert all(e.adapter == ADAPTER and e.media_type == "application/json" for e in entries)
    assert json.loads(buffer.quarantined_data(entries[1].id))["id"] == "3"
    # The cursor went past the quarantined rows: they are not read again.
    assert poller.poll().found == 0


@pytest.mark.parametrize(
    ("value", "expected", "jalali"),
    [
        (dt.datetime(2025, 3, 21, 8, 30), dt.datetime(2025, 3, 21, 8, 30, tzinfo=TEHRAN), None),
        (dt.date(2025, 3, 21), dt.datetime(2025, 3, 21, tzinfo=TEHRAN), None),
        ("2025-03-21T05:00:00Z", dt.datetime(2025, 3, 21, 5, tzinfo=dt.UTC), None),
        ("2025/03/21 08:30:15.5", dt.datetime(2025, 3, 21, 8, 30, 15, 500000, tzinfo=TEHRAN), None),
        ("20250321083000", dt.datetime(2025, 3, 21, 8, 30, tzinfo=TEHRAN), None),
        ("1404-01-01", dt.datetime(2025, 3, 21, tzinfo=TEHRAN), "1404-01-01"),
        ("۱۴۰۴/۰۱/۰۱ ۰۸:۳۰", dt.datetime(2025, 3, 21, 8, 30, tzinfo=TEHRAN), "۱۴۰۴/۰۱/۰۱ ۰۸:۳۰"),
    ],
)
def test_source_times_are_read_as_tehran_unless_they_carry_an_offset(
    value: Any, expected: dt.datetime, jalali: str | None
) -> None:
    when = parse_when(value)
    assert when is not None
    assert when.at == expected
    assert when.at.utcoffset() == expected.utcoffset()
    assert when.jalali == jalali


@pytest.mark.parametrize("value", [None, "", "yesterday", "1404-13-01", "2025-02-30", 17, 1.5])
def test_values_that_are_no_time_are_refused(value: Any) -> None:
    assert parse_when(value) is None


@pytest.mark.parametrize(
    "value",
    [
        "str:2025-03-21 10:00:00",
        dt.datetime(2025, 3, 21, 10, 0, 0, 123456),
        dt.datetime(2025, 3, 21, 10, tzinfo=dt.timezone(dt.timedelta(hours=3, minutes=30))),
        dt.date(2025, 3, 21),
        dt.time(10, 30),
        42,
        Decimal("12.50"),
        0.1,
        b"\x00\x00\x00\x00\x00\x01\xa2\x3f",  # a SQL Server rowversion
    ],
)
def test_cursor_values_keep_their_type(value: Any) -> None:
    text = encode_cursor(value)
    back = decode_cursor(text)
    assert type(back) is type(value)
    assert back == value
    if isinstance(value, dt.datetime):
        assert back.utcoffset() == value.utcoffset()


def test_an_untagged_initial_cursor_is_bound_as_text() -> None:
    assert decode_cursor("2025-03-21T00:00:00") == "2025-03-21T00:00:00"
    assert decode_cursor("1404/01/01") == "1404/01/01"


# -- errors -------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_database_raises_peer_unavailable_without_the_password(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    pytest.importorskip("psycopg")
    port = _closed_port()
    url = f"postgresql+psycopg://reader:S3cret-Pw@127.0.0.1:{port}/hisdb"
    poller = make_poller(his, buffer, url=url)

    with pytest.raises(PeerUnavailableError) as caught:
        poller.poll()

    err = caught.value
    assert "S3cret-Pw" not in str(err)
    assert "S3cret-Pw" not in err.hint
    assert ADAPTER in str(err)
    assert f"127.0.0.1:{port}" in str(err)
    assert "hisdb" in str(err)
    assert "S3cret-Pw" not in poller.shown_url
    checks = poller.checks()
    assert not checks[0].ok
    assert all("S3cret-Pw" not in c.detail + c.hint for c in checks)
    assert buffer.cursor(ADAPTER) is None


def test_a_password_from_password_file_never_shows(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller], tmp_path: Path
) -> None:
    pytest.importorskip("psycopg")
    secret = tmp_path / "pw"
    secret.write_text("file-S3cret\n")
    secret.chmod(0o600)
    url = f"postgresql+psycopg://reader@127.0.0.1:{_closed_port()}/hisdb"
    poller = make_poller(his, buffer, url=url, password_file=str(secret))

    with pytest.raises(PeerUnavailableError) as caught:
        poller.poll()

    assert "file-S3cret" not in str(caught.value)
    assert "file-S3cret" not in poller.shown_url
    assert [c.ok for c in poller.checks()] == [False, False, True]


def test_a_missing_sqlite_file_is_unavailable_and_never_created(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller], tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere.db"
    poller = make_poller(his, buffer, url=f"sqlite:///{missing}")
    with pytest.raises(PeerUnavailableError, match=r"nowhere\.db"):
        poller.poll()
    assert not missing.exists()


def test_the_poller_cannot_write_to_the_his_database(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    import sqlalchemy as sa

    his.add(1)
    poller = make_poller(his, buffer)
    with (
        poller._engine.connect() as conn,
        pytest.raises(sa.exc.OperationalError, match=r"readonly|read-only|read only"),
    ):
        conn.exec_driver_sql("DELETE FROM lab")
    assert poller.poll().new == 1


def test_a_query_the_database_refuses_is_an_error_naming_the_adapter(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    poller = make_poller(
        his, buffer, query="SELECT * FROM v_missing WHERE changed_at > :cursor ORDER BY 1"
    )
    with pytest.raises(SqlQueryError, match=r"sql adapter 'his'.*v_missing"):
        poller.poll()
    check = poller.checks()[1]
    assert not check.ok
    assert "v_missing" in check.detail


def test_a_missing_configured_column_is_named(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    his.add(1)
    poller = make_poller(his, buffer, fields={"national_id": "national_code"})
    with pytest.raises(SqlQueryError, match="no column 'national_code'"):
        poller.poll()
    assert stored(buffer) == []


def test_column_names_match_ignoring_case(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    his.add(1)
    poller = make_poller(
        his,
        buffer,
        cursor_column="CHANGED_AT",
        key_columns=["ID"],
        fields={"occurred_at": "Taken_At"},
        query="SELECT * FROM v_lab WHERE changed_at > :cursor ORDER BY CHANGED_AT",
    )
    assert poller.poll().new == 1


def test_a_query_without_order_by_is_refused_before_it_runs(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    his.add(1)
    poller = make_poller(his, buffer, query="SELECT * FROM v_lab WHERE changed_at > :cursor")
    with pytest.raises(SqlQueryError, match="ORDER BY"):
        poller.poll()
    assert not poller.checks()[1].ok


def test_rows_out_of_cursor_order_are_refused_before_the_cursor_passes_them(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    for i in (1, 2, 3):
        his.add(i)
    poller = make_poller(
        his, buffer, query="SELECT * FROM v_lab WHERE changed_at > :cursor ORDER BY id DESC"
    )
    with pytest.raises(SqlQueryError, match="not in ascending order"):
        poller.poll()
    assert buffer.cursor(ADAPTER) is None
    assert stored(buffer) == []


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM v_lab ORDER BY changed_at",
        "SELECT * FROM v_lab WHERE changed_at > :cursor AND id > :since ORDER BY changed_at",
    ],
)
def test_a_query_must_bind_cursor_and_nothing_else(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller], query: str
) -> None:
    settings = settings_for(his).model_copy(update={"query": query})
    with pytest.raises(SqlQueryError, match=":cursor"):
        SqlPoller(settings, AdapterContext(node_id=NODE, sink=buffer, log_key=LOG_KEY))


def test_a_first_poll_with_a_null_cursor_that_finds_nothing_says_why(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    his.add(1)
    report = make_poller(his, buffer, initial_cursor=None).poll()
    assert report.found == 0
    assert any("initial_cursor" in n for n in report.notes)
    assert buffer.cursor(ADAPTER) is None


def test_checks_pass_on_a_healthy_database(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    his.add(1)
    checks = make_poller(his, buffer).checks()
    assert [c.ok for c in checks] == [True, True], checks


# -- backfill -----------------------------------------------------------------------------


def test_backfill_takes_the_days_asked_for_without_moving_the_cursor_and_is_idempotent(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    changes = {  # two rows on each of three days; one at midnight sharp
        1: dt.datetime(2025, 3, 20, 0, 0),
        2: dt.datetime(2025, 3, 20, 23, 59, 59),
        3: dt.datetime(2025, 3, 21, 0, 0),
        4: dt.datetime(2025, 3, 21, 23, 59, 59),
        5: dt.datetime(2025, 3, 22, 0, 0),
        6: dt.datetime(2025, 3, 22, 12, 0),
    }
    for i, changed in changes.items():
        his.add(i, changed=changed)
    poller = make_poller(his, buffer, batch_rows=1)
    seen: list[int] = []

    first = poller.backfill(
        dt.date(2025, 3, 21), dt.date(2025, 3, 21), progress=lambda r: seen.append(r.new)
    )
    assert (first.found, first.new, first.duplicates) == (2, 2, 0)
    assert seen[-1] == 2
    assert sorted(refs(stored(buffer))) == ["3", "4"]
    assert buffer.cursor(ADAPTER) is None

    again = poller.backfill(dt.date(2025, 3, 21), dt.date(2025, 3, 21))
    assert (again.new, again.duplicates) == (0, 2)

    whole = poller.backfill(dt.date(2025, 3, 20), dt.date(2025, 3, 22))
    assert (whole.new, whole.duplicates) == (4, 2)
    assert buffer.cursor(ADAPTER) is None
    live = poller.poll()
    assert (live.new, live.duplicates) == (0, 6)


def test_backfill_of_an_integer_cursor_is_unsupported(
    his: His, buffer: Buffer, make_poller: Callable[..., SqlPoller]
) -> None:
    his.add(1)
    poller = make_poller(
        his,
        buffer,
        query="SELECT * FROM v_lab WHERE id > :cursor ORDER BY id",
        cursor_column="id",
        initial_cursor="int:0",
    )
    with pytest.raises(BackfillUnsupportedError):
        poller.backfill(dt.date(2025, 3, 21), dt.date(2025, 3, 21))


# -- logs ---------------------------------------------------------------------------------


def test_logs_carry_no_patient_data(
    his: His,
    buffer: Buffer,
    make_poller: Callable[..., SqlPoller],
    caplog: pytest.LogCaptureFixture,
) -> None:
    his.add(1)
    his.add(2, taken_at=None)
    caplog.set_level(logging.DEBUG)
    make_poller(his, buffer).poll()
    text = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    for i in (1, 2):
        assert national_code(i) not in text
        for part in patient_name(i).split(" "):
            assert part not in text
    assert "quarantined" in text


def test_a_failing_observer_does_not_break_the_poll(
    his: His, buffer: Buffer, caplog: pytest.LogCaptureFixture
) -> None:
    his.add(1)

    def boom() -> None:
        raise RuntimeError("observer bug")

    ctx = AdapterContext(node_id=NODE, sink=buffer, log_key=LOG_KEY, on_committed=boom)
    poller = SqlPoller(settings_for(his), ctx)
    try:
        report: PollReport = poller.poll()
    finally:
        poller.close()
    assert report.new == 1
    assert buffer.cursor(ADAPTER) == report.cursor
    assert any(r.levelno == logging.ERROR for r in caplog.records)
