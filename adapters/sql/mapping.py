"""SQL rows -> Records: the pure half of the ``sql`` adapter (no database, no buffer).

Responsibility: turn one result row (column name -> value as the driver returned it)
into a Record as PROTOCOL.md describes, or refuse it with a reason; and write cursor
values as text that reads back as the same type (`encode_cursor` / `decode_cursor`).

Never: put a column value (a name, a national code, a date of birth) into an
exception message or a reason: reasons name columns and types only, because they reach
logs, `status` and the quarantine listing. Never talk to the database.

Invariants:

- The record id is ``record.sql_id(node, adapter, key, version)`` where ``key`` is the
  JSON array of the key columns' texts and ``version`` the JSON array of the version
  columns' texts, or of the cursor column's text when no version column is set. The
  same row read twice gives the same id; a row whose version (or cursor) changed gives
  a new one.
- ``raw`` is the canonical JSON object ``{column: text or null}`` of the whole row, so
  the hub and a quarantine reader see every column exactly as read.
- The body is a ``collection`` Bundle, Patient first, then, by service:
  ``admission`` / ``discharge`` / ``encounter-update`` -> an Encounter (status
  in-progress / finished / unknown, class IMP, ``period.start`` = occurred_at for an
  admission, ``period.end`` for a discharge); ``patient`` -> the Patient alone; every
  other service -> a ``Basic`` whose ``code`` names the service and whose
  ``created`` is the event's date. Columns not mapped to the Patient or to
  occurred_at travel on the service resource (the Patient for ``patient``) as
  ``sql-column`` extensions (name, value as text), so each record stands on its own.
  A Jalali source time is converted, and its original text kept as a ``jalali-date``
  extension on the converted element (DESIGN.md: records keep the Jalali string).
- Naive times are Asia/Tehran. Strings are read as ``YYYY-MM-DD[ HH:MM[:SS[.f]]][offset]``
  with ``-`` or ``/`` (or nothing) between date parts, ASCII or Persian digits; a year
  below 1700 is Jalali (HL7-INTAKE.md rule 8).
- A national code is cleaned and judged by `agent.nationalcode.normalise`; an invalid
  one is kept and flagged, never a reason to refuse the row. A numeric column lost the
  code's leading zeros: it is zero-filled to ten digits.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from adapters import fhir
from adapters.sql.settings import SqlSettings
from agent.dates import JALALI_BEFORE_YEAR, TEHRAN, jalali_to_gregorian
from agent.errors import AdapterError, InputRejectedError
from agent.nationalcode import NationalCode, normalise
from agent.persian import ascii_digits
from agent.record import PatientRef, RawRef, Record, Service, SourceRef, canonical_json, sql_id

MEDIA_TYPE: Final = "application/json"
KIND: Final = "sql"

#: Extension and code-system URIs: ours, stable within protocol version 1 (as in fhir.py).
SQL_COLUMN_EXT: Final = "https://sepas.behdasht.gov.ir/fhir/StructureDefinition/sql-column"
OCCURRED_AT_EXT: Final = "https://sepas.behdasht.gov.ir/fhir/StructureDefinition/occurred-at"
JALALI_DATE_EXT: Final = fhir.JALALI_BIRTH_DATE_EXT  # ".../jalali-date": any Jalali original
SERVICE_SYSTEM: Final = "https://sepas.behdasht.gov.ir/fhir/CodeSystem/service"
ENCOUNTER_CLASS: Final = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
    "code": "IMP",
    "display": "inpatient encounter",
}
_ENCOUNTER_STATUS: Final = {
    Service.ADMISSION: "in-progress",
    Service.DISCHARGE: "finished",
    Service.ENCOUNTER_UPDATE: "unknown",
}

#: Gender words a HIS column may hold besides HL7 table 0001 codes (fhir.gender).
_GENDER_WORDS: Final = {
    "male": "male",
    "female": "female",
    "other": "other",
    "unknown": "unknown",
    "مرد": "male",
    "مذکر": "male",
    "آقا": "male",
    "زن": "female",
    "مونث": "female",
    "مؤنث": "female",
    "خانم": "female",
}

_WHEN: Final = re.compile(
    r"(?P<y>\d{4})(?:(?P<sep>[-/])(?P<m>\d{1,2})(?P=sep)(?P<d>\d{1,2})|(?P<m2>\d{2})(?P<d2>\d{2}))"
    r"(?:[T ]?(?P<H>\d{1,2}):?(?P<M>\d{2})(?::?(?P<S>\d{2})(?:[.,](?P<f>\d{1,6}))?)?)?"
    r"\s*(?P<tz>Z|[+-]\d{2}:?\d{2})?",
    re.ASCII,
)


# -- cursor values ----------------------------------------------------------------------

_CURSOR_DECODERS: Final[dict[str, Callable[[str], Any]]] = {
    "str": str,
    "int": int,
    "decimal": Decimal,
    "float": float,
    "datetime": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "bytes": bytes.fromhex,
}


class SqlQueryError(AdapterError):
    """The operator's query, or what it returns, does not fit the adapter's settings:
    the database refused it, a configured column is missing, the rows are not in
    cursor order, or the cursor column's type cannot be a cursor. Not transient: the
    same query fails the same way until the config is fixed."""

    hint = (
        "Fix the adapter's query or column settings in the config file, then check with "
        "`sepas-agent doctor`."
    )


_CURSOR_TYPE_HINT: Final = (
    "Use a column of a date/time, integer, decimal, text or rowversion type as cursor_column."
)


def encode_cursor(value: Any) -> str:
    """A cursor value as ``type:text``, which `decode_cursor` turns back into the same
    type (so it binds to ``:cursor`` as the database returned it).

    Raises:
        SqlQueryError: the value is of no supported type (bool, UUID, ...).
    """
    if isinstance(value, bool) or value is None:
        raise SqlQueryError(
            f"a cursor value cannot be {type(value).__name__}", hint=_CURSOR_TYPE_HINT
        )
    if isinstance(value, str):
        return "str:" + value
    if isinstance(value, int):
        return f"int:{value}"
    if isinstance(value, Decimal):
        return f"decimal:{value}"
    if isinstance(value, float):
        return f"float:{value!r}"
    if isinstance(value, dt.datetime):
        return "datetime:" + value.isoformat()
    if isinstance(value, dt.date):
        return "date:" + value.isoformat()
    if isinstance(value, dt.time):
        return "time:" + value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return "bytes:" + bytes(value).hex()
    raise SqlQueryError(f"a cursor value cannot be {type(value).__name__}", hint=_CURSOR_TYPE_HINT)


def decode_cursor(text: str) -> Any:
    """Inverse of `encode_cursor`. Text without a known ``type:`` prefix (an
    ``initial_cursor`` written by hand, e.g. ``2025-03-21``) is bound as a string and
    left to the database to convert.

    Raises:
        SqlQueryError: the prefix is known but the text after it is not of that type.
    """
    tag, sep, rest = text.partition(":")
    decoder = _CURSOR_DECODERS.get(tag) if sep else None
    if decoder is None:
        return text
    try:
        return decoder(rest)
    except (ValueError, InvalidOperation):
        raise SqlQueryError(
            f"cursor {tag!r} value is malformed",
            hint="Fix initial_cursor in the config file (e.g. 'datetime:2025-03-21T00:00:00').",
        ) from None


def cursor_tag(text: str | None) -> str | None:
    """The ``type`` of an encoded cursor, or None for an untagged or absent one."""
    if text is None:
        return None
    tag, sep, _ = text.partition(":")
    return tag if sep and tag in _CURSOR_DECODERS else None


# -- values as text -----------------------------------------------------------------------


def as_text(value: Any) -> str | None:
    """A column value as the text that ids, ``raw`` and extensions carry."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)  # int, Decimal, float, UUID, ...


def row_json(row: Mapping[str, Any]) -> bytes:
    """The canonical JSON of a whole row: ``raw`` of its record, or its quarantine entry."""
    return canonical_json({str(k): as_text(v) for k, v in row.items()})


@dataclass(frozen=True, slots=True)
class When:
    """A source time, tz-aware, with the Jalali text it was converted from."""

    at: dt.datetime
    jalali: str | None = None


def parse_when(value: Any) -> When | None:
    """A time column's value as an aware datetime (naive -> Asia/Tehran), or None when
    it is not a date or time (NULL, another type, text in neither calendar)."""
    if isinstance(value, dt.datetime):
        return When(value if value.utcoffset() is not None else value.replace(tzinfo=TEHRAN))
    if isinstance(value, dt.date):
        return When(dt.datetime.combine(value, dt.time(), TEHRAN))
    if not isinstance(value, str):
        return None
    text = ascii_digits(value).strip()
    m = _WHEN.fullmatch(text)
    if m is None:
        return None
    year = int(m["y"])
    month, day = int(m["m"] or m["m2"]), int(m["d"] or m["d2"])
    try:
        if year < JALALI_BEFORE_YEAR:
            day_of = jalali_to_gregorian(year, month, day)
        else:
            day_of = dt.date(year, month, day)
        clock = dt.time(
            int(m["H"] or 0),
            int(m["M"] or 0),
            int(m["S"] or 0),
            int((m["f"] or "0").ljust(6, "0")),
        )
    except ValueError:
        return None
    tz: dt.tzinfo = TEHRAN
    if m["tz"] == "Z":
        tz = dt.UTC
    elif m["tz"]:
        sign = -1 if m["tz"][0] == "-" else 1
        digits = m["tz"][1:].replace(":", "")
        tz = dt.timezone(sign * dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    at = dt.datetime.combine(day_of, clock, tz)
    return When(at, value.strip() if year < JALALI_BEFORE_YEAR else None)


def _birth_date(value: Any) -> tuple[dt.date | None, str | None]:
    if isinstance(value, dt.datetime):
        return value.date(), None
    if isinstance(value, dt.date):
        return value, None
    when = parse_when(value)
    if when is None:
        return None, None  # left empty; the row's raw JSON still has it
    return when.at.date(), when.jalali


def national_code(value: Any) -> NationalCode | None:
    """A national-code column: cleaned and judged; None when the column is NULL."""
    if value is None:
        return None
    if isinstance(value, Decimal) and value == value.to_integral_value():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**10:
        return normalise(f"{value:010d}")  # a numeric column dropped the leading zeros
    return normalise(as_text(value))


def gender(value: Any) -> str | None:
    """A gender column: HL7 table 0001 codes (M, F, ...) or English/Persian words."""
    text = as_text(value)
    if text is None or not text.strip():
        return None
    word = _GENDER_WORDS.get(text.strip().lower())
    return word if word is not None else fhir.gender(text)


# -- rows -> Records ----------------------------------------------------------------------


_MISSING_COLUMNS_HINT: Final = (
    "Make the query return every column named in cursor_column, key_columns, "
    "version_columns and fields (names are matched exactly, then ignoring case)."
)


def _resolve(wanted: str, keys: Sequence[str]) -> str | None:
    if wanted in keys:
        return wanted
    folded = [k for k in keys if k.casefold() == wanted.casefold()]
    return folded[0] if len(folded) == 1 else None


@dataclass(frozen=True, slots=True)
class Columns:
    """The settings' column names, resolved against one result's column names."""

    cursor: str
    keys: tuple[str, ...]
    versions: tuple[str, ...]
    occurred_at: str
    national_id: str | None
    local_id: str | None
    family: str | None
    given: str | None
    birth_date: str | None
    gender: str | None

    @classmethod
    def resolve(cls, settings: SqlSettings, result_keys: Sequence[str], *, adapter: str) -> Columns:
        """Raises:
        SqlQueryError: a configured column is not in the result (names them).
        """
        missing: list[str] = []

        def one(name: str) -> str:
            found = _resolve(name, result_keys)
            if found is None:
                missing.append(name)
                return name
            return found

        def opt(name: str | None) -> str | None:
            return None if name is None else one(name)

        f = settings.fields
        cols = cls(
            cursor=one(settings.cursor_column),
            keys=tuple(one(c) for c in settings.key_columns),
            versions=tuple(one(c) for c in settings.version_columns),
            occurred_at=one(f.occurred_at),
            national_id=opt(f.national_id),
            local_id=opt(f.local_id),
            family=opt(f.family),
            given=opt(f.given),
            birth_date=opt(f.birth_date),
            gender=opt(f.gender),
        )
        if missing:
            raise SqlQueryError(
                f"sql adapter {adapter!r}: the query returns no column "
                + ", ".join(repr(m) for m in dict.fromkeys(missing))
                + f" (it returns {', '.join(repr(k) for k in result_keys)})",
                hint=_MISSING_COLUMNS_HINT,
            )
        return cols

    @property
    def patient_columns(self) -> frozenset[str]:
        return frozenset(
            c
            for c in (
                self.national_id,
                self.local_id,
                self.family,
                self.given,
                self.birth_date,
                self.gender,
            )
            if c is not None
        )


def _framed(values: Sequence[Any]) -> str:
    return canonical_json([as_text(v) for v in values]).decode("utf-8")


def _with_jalali(element: dict[str, Any], name: str, when: When) -> None:
    element[name] = when.at.isoformat()
    if when.jalali:
        element["_" + name] = {"extension": [{"url": JALALI_DATE_EXT, "valueString": when.jalali}]}


@dataclass(frozen=True, slots=True)
class RowMapper:
    """Maps the rows of one result (its columns resolved) to Records."""

    node_id: str
    adapter: str
    service: Service
    columns: Columns
    clock: Callable[[], float]

    def row_key(self, row: Mapping[str, Any]) -> str:
        """The key columns' texts as a JSON array: the row's identity in its id."""
        return _framed([row[c] for c in self.columns.keys])

    def record(self, row: Mapping[str, Any]) -> Record:
        """The Record of one row.

        Raises:
            InputRejectedError: the row cannot be mapped (occurred_at NULL or not a
                time, a key column NULL); the reason names the column, never its value.
        """
        cols = self.columns
        for c in cols.keys:
            if row[c] is None:
                raise InputRejectedError(f"key column {c!r} is NULL")
        raw_when = row[cols.occurred_at]
        if raw_when is None:
            raise InputRejectedError(f"occurred_at column {cols.occurred_at!r} is NULL")
        when = parse_when(raw_when)
        if when is None:
            raise InputRejectedError(
                f"occurred_at column {cols.occurred_at!r} is not a date or time "
                f"({type(raw_when).__name__} in neither a Gregorian nor a Jalali form)"
            )
        key = self.row_key(row)
        versions = cols.versions or (cols.cursor,)
        rec_id = sql_id(self.node_id, self.adapter, key, _framed([row[c] for c in versions]))
        ref = (as_text(row[cols.keys[0]]) if len(cols.keys) == 1 else None) or key

        national = national_code(row[cols.national_id]) if cols.national_id else None
        local_id = as_text(row[cols.local_id]) if cols.local_id else None
        local_id = local_id.strip() or None if local_id is not None else None
        birth, birth_jalali = _birth_date(row[cols.birth_date]) if cols.birth_date else (None, None)
        given = as_text(row[cols.given]) if cols.given else None
        pat = fhir.patient(
            national=national,
            local_id=local_id,
            local_system=fhir.local_id_system(self.node_id, self.adapter),
            family=as_text(row[cols.family]) if cols.family else None,
            given=[given] if given else (),
            birth_date=birth,
            birth_date_jalali=birth_jalali,
            # a FHIR word; fhir.gender reads it by its first letter, as HL7 table 0001
            sex=gender(row[cols.gender]) if cols.gender else None,
        )
        extra = self._extra_columns(row)
        if self.service is Service.PATIENT:
            if extra:
                pat["extension"] = extra
            resources: list[dict[str, Any]] = [pat]
        else:
            resources = [pat, self._service_resource(rec_id, ref, when, extra)]
        patient_ref = None
        if (national is not None and national.value) or local_id:
            patient_ref = PatientRef(
                national_id=national.value if national is not None else None,
                national_id_valid=national.valid if national is not None else False,
                local_id=local_id,
            )
        try:
            return Record(
                id=rec_id,
                service=self.service,
                occurred_at=when.at,
                captured_at=dt.datetime.fromtimestamp(self.clock(), dt.UTC),
                source=SourceRef(adapter=self.adapter, kind=KIND, ref=ref),
                patient=patient_ref,
                body=fhir.bundle(rec_id, resources),
                raw=RawRef.of(row_json(row), MEDIA_TYPE),
            )
        except ValueError as e:  # pragma: no cover - every field was checked above
            raise InputRejectedError(f"row does not make a valid record ({e})") from None

    def _extra_columns(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        skip = self.columns.patient_columns | {self.columns.occurred_at}
        out: list[dict[str, Any]] = []
        for name, value in row.items():
            text = as_text(value)
            if name in skip or text is None:
                continue
            out.append(
                {
                    "url": SQL_COLUMN_EXT,
                    "extension": [
                        {"url": "name", "valueString": str(name)},
                        {"url": "value", "valueString": text},
                    ],
                }
            )
        return out

    def _service_resource(
        self, rec_id: str, ref: str, when: When, extra: list[dict[str, Any]]
    ) -> dict[str, Any]:
        subject = {"reference": fhir.entry_uuid(rec_id, 0)}
        identifier = [{"system": f"urn:sepas:{self.node_id}:{self.adapter}:row", "value": ref}]
        status = _ENCOUNTER_STATUS.get(self.service)
        if status is not None:
            enc: dict[str, Any] = {
                "resourceType": "Encounter",
                "identifier": identifier,
                "status": status,
                "class": dict(ENCOUNTER_CLASS),
                "subject": subject,
            }
            if self.service is Service.ADMISSION:
                enc["period"] = {}
                _with_jalali(enc["period"], "start", when)
            elif self.service is Service.DISCHARGE:
                enc["period"] = {}
                _with_jalali(enc["period"], "end", when)
            else:
                occurred: dict[str, Any] = {"url": OCCURRED_AT_EXT}
                _with_jalali(occurred, "valueDateTime", when)
                extra = [occurred, *extra]
            if extra:
                enc["extension"] = extra
            return enc
        occurred = {"url": OCCURRED_AT_EXT}
        _with_jalali(occurred, "valueDateTime", when)
        return {
            "resourceType": "Basic",
            "identifier": identifier,
            "code": {
                "coding": [{"system": SERVICE_SYSTEM, "code": self.service.value}],
                "text": self.service.value,
            },
            "subject": subject,
            "created": when.at.date().isoformat(),
            "extension": [occurred, *extra],
        }
