"""agent.persian: HL7-INTAKE.md rules 6 and 7 (names fold, free text and digits stay)."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.persian import ascii_digits, contains_mojibake, normalise_name

ZWNJ = "\u200c"


def test_zwnj_in_a_name_survives():
    name = "علی" + ZWNJ + "رضا"
    assert normalise_name(name) == name
    assert ZWNJ in normalise_name(f"  {name}  ")


def test_arabic_yeh_and_kaf_fold_to_persian():
    # علي (Arabic yeh U+064A), موسى (alef maksura U+0649), كريمي (Arabic kaf U+0643)
    assert normalise_name("علي") == "علی"
    assert normalise_name("موسى") == "موسی"
    assert normalise_name("كريمي") == "کریمی"
    assert normalise_name("علي" + ZWNJ + "اكبر") == "علی" + ZWNJ + "اکبر"


@pytest.mark.parametrize(("heh", "name"), [("\u06be", "ھمایون"), ("\u06c1", "ہمایون")])
def test_heh_variants_fold_to_persian_heh(heh, name):
    assert heh in name
    assert normalise_name(name) == "همایون"


@pytest.mark.parametrize(
    "name",
    [
        "فاطمة",  # teh marbuta: a spelling, not an artefact
        "خانهٔ",  # heh + hamza above (ezafe)
        "خانۀ",  # heh with yeh above (ezafe), U+06C0
        "مسئول",  # yeh with hamza, U+0626
        "کوردە",  # Kurdish AE, U+06D5
    ],
)
def test_real_spellings_are_not_folded(name):
    assert normalise_name(name) == unicodedata.normalize("NFC", name)


def test_decomposed_yeh_with_hamza_composes_before_folding():
    assert normalise_name("مس\u064a\u0654ول") == "مس\u0626ول"


def test_whitespace_runs_collapse_and_ends_are_stripped():
    assert normalise_name(" \tمحمد \u00a0 \n رضایی  ") == "محمد رضایی"


def test_digits_in_names_are_not_touched():
    assert normalise_name("نوزاد ۲ خانم کریمی") == "نوزاد ۲ خانم کریمی"
    assert normalise_name("نوزاد ٢") == "نوزاد ٢"


def test_name_is_nfc():
    decomposed = "Jose\u0301"
    assert normalise_name(decomposed) == "José"


@given(st.text())
def test_normalise_name_is_idempotent_nfc_and_keeps_every_zwnj(s):
    once = normalise_name(s)
    assert normalise_name(once) == once
    assert unicodedata.is_normalized("NFC", once)
    assert once.count(ZWNJ) == unicodedata.normalize("NFC", s).count(ZWNJ)
    assert not any(c in once for c in "\u064a\u0649\u0643")


def test_ascii_digits_maps_persian_and_arabic_indic_only():
    assert ascii_digits("۰۱۲۳۴۵۶۷۸۹") == "0123456789"
    assert ascii_digits("٠١٢٣٤٥٦٧٨٩") == "0123456789"
    assert ascii_digits("a۱-٢ ３") == "a1-2 ３"  # fullwidth is left alone


PERSIAN_SAMPLES = ["سلام", "علی" + ZWNJ + "رضا", "کریمی", "محمد حسین پور", "ژاله", "۱۴۰۴"]


@pytest.mark.parametrize("text", PERSIAN_SAMPLES)
def test_real_persian_text_is_not_mojibake(text):
    assert not contains_mojibake(text)


@pytest.mark.parametrize(
    "text",
    [
        "شروع… «شروع» عکس ظرف طبیب؛ طعم؟",  # ع ط ظ followed by legitimate characters
        "Hello, World",
        "José Müller, Øre",
        "",
    ],
)
def test_ordinary_text_is_not_mojibake(text):
    assert not contains_mojibake(text)


@pytest.mark.parametrize("text", PERSIAN_SAMPLES)
@pytest.mark.parametrize("wrong", ["latin-1", "cp1252", "cp1256"])
def test_utf8_read_with_a_windows_or_latin_code_page_is_mojibake(text, wrong):
    assert contains_mojibake(text.encode("utf-8").decode(wrong, errors="replace"))


@pytest.mark.parametrize("text", ["سلام", "علي", "محمد حسين", "پدر"])
def test_windows_1256_read_as_latin_1_is_mojibake(text):
    assert contains_mojibake(text.encode("cp1256").decode("latin-1"))


def test_replacement_character_and_escaped_bytes_are_mojibake():
    assert contains_mojibake("علی\ufffd")
    assert contains_mojibake(b"\xd3\xe1".decode("utf-8", errors="surrogateescape"))
