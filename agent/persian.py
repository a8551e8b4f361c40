"""Persian text: name normalisation, digit folding for identifiers, a mojibake check.

Responsibility: the small, pure text rules of DESIGN.md ("Persian and Iranian
specifics") and HL7-INTAKE.md rules 5-7, in one place so that the HL7, SQL and DICOM
mappings fold names and digits the same way.

Never: touch digits in names or free text (HL7-INTAKE.md rule 7: free text is
verbatim; digits are normalised only in identifiers, by `ascii_digits`, which
`agent.nationalcode` and `agent.dates` use). Never log or raise with the text itself.

Invariants: `normalise_name` is idempotent and returns NFC text; ZWNJ (U+200C) is part
of a Persian name (علی‌رضا) and always survives.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

PERSIAN_DIGITS: Final = "۰۱۲۳۴۵۶۷۸۹"  # U+06F0..U+06F9, EXTENDED ARABIC-INDIC DIGIT
ARABIC_INDIC_DIGITS: Final = "٠١٢٣٤٥٦٧٨٩"  # U+0660..U+0669, ARABIC-INDIC DIGIT

_DIGITS_TO_ASCII: Final = str.maketrans(PERSIAN_DIGITS + ARABIC_INDIC_DIGITS, "0123456789" * 2)

#: Folds applied to names. Each is a keyboard or code-page artefact, never a spelling
#: distinction a Persian reader would make:
#: - U+064A ARABIC LETTER YEH (ي) and U+0649 ALEF MAKSURA (ى) -> U+06CC FARSI YEH (ی):
#:   Arabic keyboards and Windows-1256 (which has no U+06CC) produce them.
#: - U+0643 ARABIC LETTER KAF (ك) -> U+06A9 KEHEH (ک): same cause.
#: - U+06BE HEH DOACHASHMEE (ھ) -> U+0647 HEH (ه): Windows-1256 byte 0xAA; older
#:   Persian software typed it to force the joined initial shape of heh.
#: - U+06C1 HEH GOAL (ہ) -> U+0647 HEH (ه): produced by Urdu keyboard layouts.
#: Deliberately *not* folded, because they are real spellings: U+0629 TEH MARBUTA (ة,
#: فاطمة vs فاطمه is a choice of the person or registrar), U+06C0 HEH WITH YEH ABOVE (ۀ,
#: the Persian ezafe), U+06D5 AE (ە, a distinct Kurdish vowel letter), U+0626 YEH WITH
#: HAMZA (ئ, as in مسئول), and the tatweel U+0640 (left as sent).
NAME_FOLDS: Final[dict[str, str]] = {
    "\u064a": "\u06cc",
    "\u0649": "\u06cc",
    "\u0643": "\u06a9",
    "\u06be": "\u0647",
    "\u06c1": "\u0647",
}
_NAME_FOLDS: Final = str.maketrans(NAME_FOLDS)

_WHITESPACE_RUN: Final = re.compile(r"\s+")  # ZWNJ/ZWJ are not \s, so they survive


def normalise_name(s: str) -> str:
    """Normalise a decoded personal name for storage and matching.

    NFC; the folds in `NAME_FOLDS`; runs of whitespace (including NBSP and tabs)
    collapsed to one space; leading and trailing whitespace stripped. ZWNJ, digits,
    punctuation and everything else are kept as they are.

    NFC is applied before folding so that a decomposed yeh + hamza above (U+064A
    U+0654) first composes to U+0626 (ئ) instead of becoming a Persian yeh with a
    stray hamza; the folded letters take part in no composition, so the result stays NFC.
    """
    s = unicodedata.normalize("NFC", s).translate(_NAME_FOLDS)
    return _WHITESPACE_RUN.sub(" ", s).strip()


def ascii_digits(s: str) -> str:
    """Map Persian (U+06F0-U+06F9) and Arabic-Indic (U+0660-U+0669) digits to ASCII.

    For identifiers and dates only; free text keeps its digits (HL7-INTAKE.md rule 7).
    Other characters, including other digit scripts, are left unchanged.
    """
    return s.translate(_DIGITS_TO_ASCII)


# --- mojibake -----------------------------------------------------------------------
#
# Every Arabic-script letter (U+0600-U+06FF) is two bytes in UTF-8: a lead byte 0xD8-0xDB
# and a continuation byte 0x80-0xBF. Read with the wrong code page those become pairs
# that real text does not contain:
#   - as Latin-1 / Windows-1252: Ø Ù Ú Û followed by a Latin-1 symbol, C1 control or a
#     cp1252 typographic character ("سلام" -> "Ø³Ù\x84Ø§Ù\x85");
#   - as Windows-1256: ط ظ ع غ followed by a Latin symbol ("سلام" -> "ط³ظ„ط§ظ…").
# Windows-1256 text read as Latin-1 gives runs of accented capitals and small letters
# ("سلام" -> "ÓáÇã") and C1 controls for پ چ ژ گ ک (0x81, 0x8D, 0x8E, 0x90, 0x98).

_CONTINUATION: Final = bytes(range(0x80, 0xC0))
_LATIN_CONT: Final = frozenset(
    _CONTINUATION.decode("latin-1") + _CONTINUATION.decode("cp1252", errors="ignore")
)
#: What Windows-1256 makes of a continuation byte, minus what may legitimately follow a
#: Persian letter ending in ط ظ ع غ: letters (پ چ ژ گ ک ...), ZWNJ/ZWJ, NBSP, soft
#: hyphen, Arabic punctuation (، ؛ ؟), guillemets, dashes, quotes, bullet and ellipsis.
_CP1256_CONT: Final = frozenset(
    c
    for c in _CONTINUATION.decode("cp1256")
    if not c.isalpha() and c not in "\u200c\u200d\u00a0\u00ad،؛؟«»–—‘’“”•…"
)
_LATIN1_PAIR: Final = re.compile("[ØÙÚÛ][" + re.escape("".join(sorted(_LATIN_CONT))) + "]")
_CP1256_PAIR: Final = re.compile("[طظعغ][" + re.escape("".join(sorted(_CP1256_CONT))) + "]")
_LATIN_LETTER_RUN: Final = re.compile("[À-ÖØ-öø-ÿ]{3,}")  # no ×, no ÷
_C1_OR_SURROGATE: Final = re.compile("[\u0080-\u009f\ud800-\udfff\ufffd]")


def contains_mojibake(s: str) -> bool:
    """Whether `s` looks like text decoded with the wrong character set.

    A heuristic for flagging (never for rejecting or "repairing") input. True when any
    of these holds:

    1. U+FFFD REPLACEMENT CHARACTER is present (a decoder already gave up), or a lone
       surrogate (bytes smuggled through ``errors="surrogateescape"``), or a C1 control
       U+0080-U+009F, which no real text contains but Windows code-page bytes read as
       Latin-1 produce.
    2. UTF-8 read as Latin-1/Windows-1252: one of Ø Ù Ú Û (lead bytes 0xD8-0xDB)
       directly followed by a character those code pages give for a byte 0x80-0xBF.
    3. UTF-8 read as Windows-1256: at least two places where ط ظ ع غ is directly
       followed by a Latin symbol Windows-1256 gives for a byte 0x80-0xBF (€ ‚ „ † ‰ Œ
       © ± ³ § ...). Two, so that one odd symbol after a word ending in ع is not enough;
       any mojibaked word of two letters or more gives two.
    4. Windows-1256 read as Latin-1: three or more accented Latin letters in a row
       (À-ÿ without × ÷), which Persian text becomes ("ÓáÇã") and Western words rarely are.

    Known misses: mojibake of a single-letter word, and Windows-1256 text of one or two
    letters read as Latin-1. Known false alarms: Latin text with three accented letters
    in a row.
    """
    return bool(
        _C1_OR_SURROGATE.search(s)
        or _LATIN1_PAIR.search(s)
        or len(_CP1256_PAIR.findall(s)) >= 2
        or _LATIN_LETTER_RUN.search(s)
    )
