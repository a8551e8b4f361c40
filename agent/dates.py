"""Dates and the Tehran time zone: CLI dates in ISO or Jalali, Jalali conversion.

Responsibility: the one place that imports jdatetime (STYLE.md: each third-party
library is imported by one module, which maps its errors) and that builds the
Asia/Tehran zone.

Never: guess between calendars by anything but the year (below 1700 is Jalali, as in
HL7-INTAKE.md rule 8), or return a date built from a Jalali year as if it were
Gregorian.

Invariants: every error is a ValueError whose message names both accepted forms.
"""

from __future__ import annotations

import datetime as dt
import importlib.resources
import re
import unicodedata
import zoneinfo
from typing import Final

import jdatetime

from agent.persian import ascii_digits

#: Years below this are Jalali (Jalali 1700 is Gregorian 2321; Gregorian 1700 is Jalali 1078).
JALALI_BEFORE_YEAR: Final = 1700

ACCEPTED_FORMS: Final = "YYYY-MM-DD, Gregorian (2025-03-21) or Jalali (1404-01-01)"


def _load_tehran() -> zoneinfo.ZoneInfo:
    # zoneinfo.ZoneInfo("Asia/Tehran") searches the system's tz database *before* the
    # tzdata package, so an old system database (written before Iran abolished
    # daylight saving in September 2022) would put summer times an hour off. Read the
    # zone from the tzdata package, which is a pinned dependency, and only fall back to
    # the system when it is somehow absent. (A zone made by from_file cannot be
    # pickled; nothing in the agent pickles datetimes.)
    try:
        res = importlib.resources.files("tzdata").joinpath("zoneinfo/Asia/Tehran")
        with res.open("rb") as f:
            return zoneinfo.ZoneInfo.from_file(f, key="Asia/Tehran")
    except (ModuleNotFoundError, FileNotFoundError):  # pragma: no cover - tzdata is a dependency
        return zoneinfo.ZoneInfo("Asia/Tehran")


#: Asia/Tehran from the tzdata package: +03:30 all year since September 2022.
TEHRAN: Final = _load_tehran()

_DATE: Final = re.compile(r"(\d{4})([-/])(\d{1,2})\2(\d{1,2})", re.ASCII)


def jalali_to_gregorian(year: int, month: int, day: int) -> dt.date:
    """The Gregorian date of a Jalali (Solar Hijri) date: 1362-07-04 -> 1983-09-26.

    Raises:
        ValueError: there is no such Jalali date (1404-12-30: 1404 is not a leap year).
    """
    try:
        return jdatetime.date(year, month, day).togregorian()
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(f"no such Jalali date: {year:04d}-{month:02d}-{day:02d} ({e})") from None


def parse_cli_date(s: str) -> dt.date:
    """A date typed on the command line: Gregorian ISO or Jalali, ASCII or Persian digits.

    ``2025-03-21`` and ``1404-01-01`` give the same date, as do ``۱۴۰۴-۰۱-۰۱`` and
    ``1404/1/1``: four-digit year, then month and day of one or two digits, separated
    by the same "-" or "/". A year below 1700 is Jalali. Surrounding whitespace and bidi
    marks (which come along when a Persian date is copied) are ignored.

    Raises:
        ValueError: not in either form, or no such date; the message shows both forms.
    """
    text = "".join(c for c in ascii_digits(s) if unicodedata.category(c) != "Cf").strip()
    m = _DATE.fullmatch(text)
    if m is None:
        raise ValueError(f"not a date: {s!r}; expected {ACCEPTED_FORMS}")
    year, month, day = int(m[1]), int(m[3]), int(m[4])
    if year < JALALI_BEFORE_YEAR:
        try:
            return jalali_to_gregorian(year, month, day)
        except ValueError as e:
            raise ValueError(f"{e}; expected {ACCEPTED_FORMS}") from None
    try:
        return dt.date(year, month, day)
    except ValueError as e:
        raise ValueError(
            f"no such Gregorian date: {text} ({e}); expected {ACCEPTED_FORMS}"
        ) from None
