"""The Iranian national code (کد ملی): cleaning, validation, and a log-safe hash.

Responsibility: DESIGN.md's check-digit rule and HL7-INTAKE.md rule 5's cleaning, in
one place for every adapter. The rule: ten digits d[0..9]; s = Σ d[i]·(10−i) for
i = 0..8; r = s mod 11; valid iff d[9] == r when r < 2, else 11 − r; and not all ten
digits the same (those all pass the check digit, and are placeholders, not codes).

Never: raise for bad input in `normalise` (an invalid code flags a record, it never
drops one); put a code in a warning, an exception message or a log line (logs carry
`short_hash` only).

Invariants: `is_valid` accepts exactly 10 ASCII digits; `normalise(...).valid`
implies ``is_valid(normalise(...).value)``.

Known weakness of the rule (not ours to fix): r = 1 and r = 10 both give check digit
1, so for codes ending in 1 a single changed digit can go undetected.
"""

from __future__ import annotations

import hashlib
import hmac
import unicodedata
from dataclasses import dataclass
from typing import Final

from agent.persian import ascii_digits

LENGTH: Final = 10
#: Longest digit string `normalise` keeps as `value` when invalid; longer is not a
#: mistyped national code but some other number, and is not carried.
MAX_KEPT_DIGITS: Final = 20

# Warnings: stable, and free of the code itself (they may reach logs and `status`).
PADDED_NINE_DIGITS: Final = "national-code-padded-nine-digits"
WRONG_LENGTH: Final = "national-code-wrong-length"
NOT_DIGITS: Final = "national-code-not-digits"
SAME_DIGITS: Final = "national-code-all-digits-same"
BAD_CHECK_DIGIT: Final = "national-code-bad-check-digit"

_ASCII_DIGITS: Final = frozenset("0123456789")
#: Dropped by `clean` besides whitespace: dashes (category Pd: U+002D, U+2010-U+2015,
#: U+FE58, U+FE63, U+FF0D, ...), U+2212 MINUS SIGN, and invisible format marks copied
#: along with identifiers (category Cf: LRM U+200E, RLM U+200F, ALM U+061C, LRE..RLO
#: U+202A-U+202E with PDF U+202C, LRI..PDI U+2066-U+2069, ZWNJ U+200C, ZWJ U+200D,
#: ZWSP U+200B, BOM U+FEFF, soft hyphen U+00AD).
_DROPPED_CATEGORIES: Final = frozenset({"Pd", "Cf"})


def clean(value: str) -> str:
    """Clean a national code as typed or sent, without judging it.

    Persian and Arabic-Indic digits become ASCII; whitespace (any, including NBSP),
    hyphens and dashes (Unicode category Pd, and U+2212 MINUS SIGN) and invisible
    format marks (category Cf: LRM, RLM, ALM, LRE..PDF, LRI..PDI, ZWJ, ZWNJ, ...) are
    dropped. Everything else is kept, so a letter or a dot makes the result invalid.
    """
    return "".join(
        c
        for c in ascii_digits(value)
        if not (c.isspace() or c == "\u2212" or unicodedata.category(c) in _DROPPED_CATEGORIES)
    )


def _remainder(digits: str) -> int:
    return sum(int(d) * (LENGTH - i) for i, d in enumerate(digits[:9])) % 11


def _check_digit(prefix9: str) -> str:
    r = _remainder(prefix9)
    return str(r if r < 2 else 11 - r)


def _is_ten_ascii_digits(code: str) -> bool:
    return len(code) == LENGTH and all(c in _ASCII_DIGITS for c in code)


def is_valid(code: str) -> bool:
    """Whether `code` is a valid national code *as given*: no cleaning is done.

    Exactly 10 ASCII digits, not all the same, and the check digit holds. Use
    `normalise` for input from a source.
    """
    return _is_ten_ascii_digits(code) and len(set(code)) > 1 and code[9] == _check_digit(code[:9])


@dataclass(frozen=True, slots=True)
class NationalCode:
    """A national code as a source sent it, cleaned and judged.

    ``value`` is the cleaned ASCII digit string (padded when `normalise` padded it), or
    None when the input was empty, contained anything but digits after cleaning, or
    was longer than `MAX_KEPT_DIGITS` digits. It is kept even when invalid, because an
    invalid code is sent flagged (PROTOCOL.md), never dropped. ``warnings`` are the
    module's constants, in the order found; none of them contains the code.
    """

    value: str | None
    valid: bool
    warnings: tuple[str, ...] = ()


def normalise(raw: str | None, *, pad_nine: bool = False) -> NationalCode:
    """Clean and judge a national code from a source. Never raises for bad input.

    Args:
        raw: the code as received (any digits, separators, bidi marks), or None.
        pad_nine: left-pad a 9-digit code with "0" (a leading zero lost by a system
            that stored the code as a number). The padding is recorded as
            `PADDED_NINE_DIGITS`, and the result is valid only if the padded code is.
            Without it a 9-digit code is flagged invalid as written.
    """
    if raw is None:
        return NationalCode(None, False)
    code = clean(raw)
    if not code:
        return NationalCode(None, False)
    if not all(c in _ASCII_DIGITS for c in code):
        return NationalCode(None, False, (NOT_DIGITS,))
    if len(code) > MAX_KEPT_DIGITS:
        return NationalCode(None, False, (WRONG_LENGTH,))
    warnings: list[str] = []
    if len(code) == LENGTH - 1 and pad_nine:
        code = "0" + code
        warnings.append(PADDED_NINE_DIGITS)
    if len(code) != LENGTH:
        warnings.append(WRONG_LENGTH)
    elif len(set(code)) == 1:
        warnings.append(SAME_DIGITS)
    elif code[9] != _check_digit(code[:9]):
        warnings.append(BAD_CHECK_DIGIT)
    valid = is_valid(code)
    return NationalCode(code, valid, tuple(warnings))


def short_hash(value: str, key: bytes) -> str:
    """A keyed, log-safe stand-in for a national code or a name: HMAC-SHA256, 12 hex.

    Keyed because there are only about 10**9 valid codes: an unkeyed hash of one is
    reversed by enumeration in minutes. Pass the normalised value so that the same
    patient always hashes the same; keep `key` secret and stable across restarts.

    Raises:
        ValueError: `key` is empty (that would be an unkeyed hash).
    """
    if not key:
        raise ValueError("short_hash needs a non-empty secret key")
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:12]


def make_valid(prefix9: str) -> str:
    """Append the check digit to nine ASCII digits: a synthetic valid code.

    For tests and the demo; never for "repairing" a code from a source.

    Raises:
        ValueError: `prefix9` is not nine ASCII digits, or is nine equal digits (the
            result would be all one digit, which is never valid).
    """
    if len(prefix9) != LENGTH - 1 or not all(c in _ASCII_DIGITS for c in prefix9):
        raise ValueError("make_valid needs exactly nine ASCII digits")
    if len(set(prefix9)) == 1:
        raise ValueError("make_valid: nine equal digits cannot make a valid code")
    return prefix9 + _check_digit(prefix9)
