"""agent.nationalcode: DESIGN.md's check digit and HL7-INTAKE.md rule 5's cleaning.

All codes here are synthetic (made with make_valid or checked by hand below).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import nationalcode as nc

# "0499370899" by hand: weights 10..2 over 0 4 9 9 3 7 0 8 9 give
# 0 + 36 + 72 + 63 + 18 + 35 + 0 + 24 + 18 = 266; 266 mod 11 = 2; 2 >= 2 so the check
# digit is 11 - 2 = 9, which is d[9].
HAND_CHECKED = "0499370899"

nine_digits = st.text(alphabet="0123456789", min_size=9, max_size=9).filter(
    lambda s: len(set(s)) > 1
)


def remainder(code: str) -> int:
    """The rule restated independently of the module: Σ d[i]·(10−i) mod 11."""
    return sum(int(code[i]) * (10 - i) for i in range(9)) % 11


def test_hand_checked_code_is_valid():
    assert remainder(HAND_CHECKED) == 2
    assert nc.is_valid(HAND_CHECKED)


@pytest.mark.parametrize("prefix", ["049937089", "001234567", "123456789", "987654320"])
def test_make_valid_codes_are_valid(prefix):
    code = nc.make_valid(prefix)
    assert code.startswith(prefix)
    assert len(code) == 10
    assert nc.is_valid(code)


def test_make_valid_matches_hand_checked_code():
    assert nc.make_valid(HAND_CHECKED[:9]) == HAND_CHECKED


@pytest.mark.parametrize("wrong", "01234567" + "8")  # every digit but the right one, 9
def test_wrong_check_digit_is_invalid(wrong):
    assert not nc.is_valid(HAND_CHECKED[:9] + wrong)


@pytest.mark.parametrize("digit", "0123456789")
def test_all_same_digits_are_invalid_although_their_check_digit_holds(digit):
    code = digit * 10
    r = remainder(code)
    assert code[9] == str(r if r < 2 else 11 - r), "the checksum alone would accept it"
    assert not nc.is_valid(code)
    assert nc.normalise(code).warnings == (nc.SAME_DIGITS,)


@pytest.mark.parametrize(
    "code",
    ["049937089", "04993708999", "", "049937089a", " 0499370899", "۰۴۹۹۳۷۰۸۹۹", "049937089９"],
)
def test_is_valid_accepts_only_ten_ascii_digits_as_given(code):
    assert not nc.is_valid(code)


@pytest.mark.parametrize(
    "raw",
    [
        "۰۴۹۹۳۷۰۸۹۹",  # Persian digits
        "٠٤٩٩٣٧٠٨٩٩",  # Arabic-Indic digits
        "۰۴۹-۹۳۷۰۸۹-۹",  # hyphens
        "049 937 0899",
        "\u200f۰۴۹۹۳۷۰۸۹۹\u200f",  # RLM on both sides, as copied from an RTL field
        "\u2067۰۴۹۹\u2013۳۷۰۸۹۹\u2069",  # RLI … PDI with an en dash
        "\u202b049\u2010937\u2011089\u2212" + "9\u202c",  # RLE, Unicode hyphens, minus, PDF
        "\u061c049\u00a0937\u200c08\u200d99\ufeff",  # ALM, NBSP, ZWNJ, ZWJ, BOM
        "۰۴۹۹٣٧٠٨٩٩",  # mixed scripts
    ],
)
def test_persian_digit_code_normalises_to_ascii_and_validates(raw):
    assert nc.clean(raw) == HAND_CHECKED
    assert nc.normalise(raw) == nc.NationalCode(HAND_CHECKED, True, ())


def test_clean_keeps_letters_and_dots_so_they_make_the_code_invalid():
    assert nc.clean("04993708 9x") == "049937089x"
    assert nc.clean("0499.370.899") == "0499.370.899"
    assert not nc.is_valid(nc.clean("0499.370.899"))


def test_invalid_code_is_kept_flagged_with_its_ascii_value():
    result = nc.normalise("۰۴۹۹۳۷۰۸۹۱")
    assert result == nc.NationalCode("0499370891", False, (nc.BAD_CHECK_DIGIT,))


def test_nine_digit_code_is_padded_only_when_asked_and_the_padding_is_recorded():
    nine = HAND_CHECKED[1:]
    assert nc.normalise(nine) == nc.NationalCode(nine, False, (nc.WRONG_LENGTH,))
    padded = nc.normalise(nine, pad_nine=True)
    assert padded == nc.NationalCode(HAND_CHECKED, True, (nc.PADDED_NINE_DIGITS,))


def test_padded_nine_digit_code_is_valid_only_if_the_padded_code_is():
    result = nc.normalise("499370891", pad_nine=True)
    assert result.value == "0499370891"
    assert not result.valid
    assert result.warnings == (nc.PADDED_NINE_DIGITS, nc.BAD_CHECK_DIGIT)


def test_padding_applies_to_nine_digits_only():
    assert nc.normalise("99370899", pad_nine=True) == nc.NationalCode(
        "99370899", False, (nc.WRONG_LENGTH,)
    )


@pytest.mark.parametrize("raw", [None, "", "   ", "\u200f-\u200f"])
def test_empty_code_has_no_value(raw):
    assert nc.normalise(raw) == nc.NationalCode(None, False, ())


def test_non_digit_code_has_no_value():
    assert nc.normalise("ABC-123") == nc.NationalCode(None, False, (nc.NOT_DIGITS,))


def test_digit_strings_longer_than_twenty_are_not_kept():
    assert nc.normalise("1" * 20).value == "1" * 20
    assert nc.normalise("1" * 21) == nc.NationalCode(None, False, (nc.WRONG_LENGTH,))


@given(st.text())
def test_normalise_never_raises_and_valid_implies_a_valid_value(raw):
    result = nc.normalise(raw)
    assert result.valid == (result.value is not None and nc.is_valid(result.value))
    if result.value is not None:
        assert 1 <= len(result.value) <= nc.MAX_KEPT_DIGITS
        assert result.value.isascii()
        assert result.value.isdigit()


@given(st.text(alphabet="0123456789۰۱۲۳۴۵۶۷۸۹٠١٢٣٤٥٦٧٨٩ -\u200f", max_size=30))
def test_warnings_never_contain_the_code(raw):
    result = nc.normalise(raw, pad_nine=True)
    for warning in result.warnings:
        assert not any(c.isdigit() for c in warning)


@given(nine_digits)
def test_make_valid_is_always_valid_and_follows_the_design_rule(prefix):
    code = nc.make_valid(prefix)
    r = remainder(code)
    assert code == prefix + str(r if r < 2 else 11 - r)
    assert nc.is_valid(code)


@given(nine_digits, st.integers(0, 9), st.integers(1, 9))
def test_changing_one_digit_invalidates_except_the_r1_r10_ambiguity(prefix, pos, delta):
    code = nc.make_valid(prefix)
    changed = code[:pos] + str((int(code[pos]) + delta) % 10) + code[pos + 1 :]
    if nc.is_valid(changed):
        # The rule maps r = 1 and r = 10 both to check digit 1, so that one change of
        # a body digit can go undetected; nothing else can (11 is prime and every
        # weight and digit change is below 11).
        assert pos < 9
        assert code[9] == "1"
        assert {remainder(code), remainder(changed)} == {1, 10}


def test_the_rule_cannot_detect_every_single_digit_change_of_a_code_ending_in_1():
    # Documented so that nobody "fixes" is_valid away from DESIGN.md's rule.
    code = nc.make_valid("100000001")
    assert code == "1000000011"
    assert remainder(code) == 1
    assert nc.is_valid("1100000011")  # d[1] + 1: r becomes 10, check digit still 1


@given(nine_digits, st.integers(1, 9))
def test_changing_the_check_digit_always_invalidates(prefix, delta):
    code = nc.make_valid(prefix)
    assert not nc.is_valid(code[:9] + str((int(code[9]) + delta) % 10))


@pytest.mark.parametrize("bad", ["12345678", "1234567890", "12345678a", "۱۲۳۴۵۶۷۸۹", "111111111"])
def test_make_valid_refuses_anything_but_nine_ascii_digits_not_all_equal(bad):
    with pytest.raises(ValueError, match="nine"):
        nc.make_valid(bad)


def test_short_hash_is_keyed_short_hex_and_never_contains_the_code():
    h = nc.short_hash(HAND_CHECKED, b"k" * 32)
    assert len(h) == 12
    assert all(c in "0123456789abcdef" for c in h)
    assert h == nc.short_hash(HAND_CHECKED, b"k" * 32)
    assert h != nc.short_hash(HAND_CHECKED, b"j" * 32)
    assert h != nc.short_hash(nc.make_valid("049937088"), b"k" * 32)
    assert HAND_CHECKED not in h


def test_short_hash_refuses_an_empty_key():
    with pytest.raises(ValueError, match="key"):
        nc.short_hash(HAND_CHECKED, b"")
