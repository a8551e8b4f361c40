"""agent.dates: CLI dates in ISO or Jalali, Jalali conversion, Asia/Tehran."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.dates import ACCEPTED_FORMS, TEHRAN, jalali_to_gregorian, parse_cli_date


@pytest.mark.parametrize(
    ("jalali", "gregorian"),
    [
        ((1362, 7, 4), dt.date(1983, 9, 26)),
        ((1404, 1, 1), dt.date(2025, 3, 21)),
        ((1403, 12, 30), dt.date(2025, 3, 20)),  # 1403 is a Jalali leap year
        ((1399, 1, 1), dt.date(2020, 3, 20)),
    ],
)
def test_jalali_to_gregorian_known_dates(jalali, gregorian):
    assert jalali_to_gregorian(*jalali) == gregorian


def test_no_such_jalali_date_is_a_value_error():
    with pytest.raises(ValueError, match="no such Jalali date: 1404-12-30"):
        jalali_to_gregorian(1404, 12, 30)


@pytest.mark.parametrize(
    "text",
    ["2025-03-21", "1404-01-01", "۱۴۰۴-۰۱-۰۱", "٢٠٢٥-٠٣-٢١", "1404/01/01", "1404-1-1", "۲۰۲۵/۳/۲۱"],
)
def test_iso_and_jalali_in_any_digits_give_the_same_day(text):
    assert parse_cli_date(text) == dt.date(2025, 3, 21)


def test_jalali_birth_date_converts():
    assert parse_cli_date("1362-07-04") == dt.date(1983, 9, 26)


def test_bidi_marks_and_whitespace_copied_with_a_persian_date_are_ignored():
    assert parse_cli_date(" \u200f۱۴۰۴-۰۱-۰۱\u200e \n") == dt.date(2025, 3, 21)


def test_year_1700_and_later_is_gregorian():
    assert parse_cli_date("1700-01-01") == dt.date(1700, 1, 1)
    assert parse_cli_date("1699-01-01") == jalali_to_gregorian(1699, 1, 1)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "21/03/2025",
        "2025-03",
        "2025-03-21T00:00",
        "2025-03/21",  # mixed separators
        "20250321",
        "2025-003-21",
        "۱۴۰۴-۰۱-۰۱x",
        "2025-02-29",  # no such Gregorian date
        "2025-13-01",
        "1404-12-30",  # no such Jalali date
        "1404-07-31",  # Jalali months 7-11 have 30 days
        "0000-01-01",
    ],
)
def test_bad_dates_are_value_errors_that_show_both_accepted_forms(text):
    with pytest.raises(ValueError, match="expected") as info:
        parse_cli_date(text)
    assert "2025-03-21" in str(info.value)
    assert "1404-01-01" in str(info.value)
    assert ACCEPTED_FORMS in str(info.value)


@given(st.dates(min_value=dt.date(1700, 1, 1), max_value=dt.date(9999, 12, 31)))
def test_any_gregorian_iso_date_parses_to_itself(day):
    assert parse_cli_date(day.isoformat()) == day


def test_tehran_has_had_no_daylight_saving_since_september_2022():
    summer = dt.datetime(2023, 7, 1, 12, 0, tzinfo=TEHRAN)
    assert summer.utcoffset() == dt.timedelta(hours=3, minutes=30)
    assert summer.astimezone(dt.UTC) == dt.datetime(2023, 7, 1, 8, 30, tzinfo=dt.UTC)
    assert summer.isoformat() == "2023-07-01T12:00:00+03:30"


def test_tehran_zone_still_knows_the_old_summer_time():
    # Proves the zone carries real history (it is not a fixed +03:30 offset).
    assert dt.datetime(2021, 7, 1, 12, tzinfo=TEHRAN).utcoffset() == dt.timedelta(
        hours=4, minutes=30
    )


def test_tehran_zone_comes_from_the_tzdata_package():
    assert str(TEHRAN) == "Asia/Tehran"
    assert TEHRAN.key == "Asia/Tehran"
