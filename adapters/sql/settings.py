"""Options of a ``sql`` adapter: polls a HIS/LIS database with a cursor query.

Each poll runs ``query`` with ``:cursor`` bound to the last cursor value committed
with the previous batch's records (DESIGN.md: records and cursor in one
transaction), so a poll never skips or doubles rows.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from agent.config import AdapterSettings, ConfigModel, Duration, field_problems
from agent.record import Service

Column = Annotated[str, Field(min_length=1)]

_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:\+[A-Za-z0-9_]+)?://.*", re.DOTALL)
_CURSOR_RE = re.compile(r":cursor\b")


class SqlFields(ConfigModel):
    """Which result column holds each Record field; unset fields are left empty."""

    occurred_at: Column  # the event time; naive values are read as Asia/Tehran
    national_id: Column | None = None  # کد ملی; normalised and checked, never dropped
    local_id: Column | None = None  # the facility's own patient id (MRN)
    family: Column | None = None
    given: Column | None = None
    birth_date: Column | None = None  # DATE, or a Jalali string (e.g. 1362/07/04)
    gender: Column | None = None


class SqlSettings(AdapterSettings):
    """``kind = "sql"``: pull rows from a database (SQLAlchemy URL) on a schedule."""

    kind: Literal["sql"]
    # SQLAlchemy URL, e.g. "postgresql+psycopg://reader@10.0.0.7/his". Prefer
    # password_file to a password written in the URL; either way it is masked in
    # `config check`.
    url: str
    password_file: Path | None = None  # file holding the password (mode 0600)
    query: Annotated[str, Field(min_length=1)]  # must use :cursor, e.g. "WHERE updated > :cursor"
    cursor_column: Column  # the result column whose last value becomes the next :cursor
    initial_cursor: str | None = None  # :cursor on the first poll; None binds NULL
    key_columns: Annotated[tuple[Column, ...], Field(min_length=1)]  # identify a row
    version_columns: tuple[Column, ...] = ()  # a changed row gets a new record id
    service: Service  # what every row of this query is, e.g. "lab-result"
    fields: SqlFields
    poll_every: Duration = timedelta(minutes=1)
    batch_rows: Annotated[int, Field(ge=1, le=100_000)] = 500  # rows per fetch and commit

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not _URL_RE.fullmatch(value):
            raise ValueError(
                "expected a SQLAlchemy URL such as 'postgresql+psycopg://user@host/db'"
            )
        return value

    @field_validator("query")
    @classmethod
    def _check_query(cls, value: str) -> str:
        if not _CURSOR_RE.search(value):
            raise ValueError(
                "must use the :cursor parameter (e.g. 'WHERE updated_at > :cursor'), "
                "otherwise every poll reads the whole table again"
            )
        return value

    @model_validator(mode="after")
    def _check_password_source(self) -> SqlSettings:
        userinfo = self.url.partition("://")[2].partition("/")[0].rpartition("@")[0]
        if self.password_file is not None and ":" in userinfo:
            raise field_problems(
                ("password_file", "is set, but url also has a password: keep only one")
            )
        return self
