"""DICOM status codes as values: categories (PS3.7 annex C) and what they mean for us.

Responsibility: the one place that reads pynetdicom's status tables
(`pynetdicom.status.code_to_category`), so the rest of the adapter compares
`Category` members and never re-derives ranges. Protocol outcomes stay values here;
`adapters.dicom.net` and `adapters.dicom.query` decide which of them become errors.

Never: treat a missing status as success. pynetdicom yields an empty status when the
association was aborted, timed out, or the peer answered nothing usable (issue 5: about
1 in 6,000 C-STOREs); `category(None)` is `Category.NONE`, which is a failure to retry.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from pynetdicom.status import (
    QR_FIND_SERVICE_CLASS_STATUS,
    QR_MOVE_SERVICE_CLASS_STATUS,
    code_to_category,
)


class Category(StrEnum):
    """PS3.7 C.1 status categories, plus NONE for "no status received"."""

    SUCCESS = "Success"
    PENDING = "Pending"
    WARNING = "Warning"
    CANCEL = "Cancel"
    FAILURE = "Failure"
    UNKNOWN = "Unknown"  # a code outside every range the standard defines
    NONE = "None"  # no status at all: aborted, timed out, or empty response


#: C-FIND: "Refused: Out of Resources". Several PACS answer it, with no matches, when a
#: query would match more than they are willing to return; we split such a window.
OUT_OF_RESOURCES: Final = 0xA700
#: C-FIND: "Matching reached response limit, subsequent request may return additional
#: matches" (PS3.4 C.4.1.1.4, added for exactly our case).
RESPONSE_LIMIT_REACHED: Final = 0xB001
CANCEL: Final = 0xFE00


def category(code: int | None) -> Category:
    """The category of a status code; `Category.NONE` when there was no status."""
    if code is None:
        return Category.NONE
    try:
        return Category(code_to_category(code))
    except ValueError:  # pragma: no cover - pynetdicom returns only the names above
        return Category.UNKNOWN


def describe(code: int | None, *, service: str = "C-FIND") -> str:
    """``0xA700 (Failure: Refused: Out of Resources)``: for messages and notes."""
    if code is None:
        return "no status (association aborted or timed out)"
    table = {"C-FIND": QR_FIND_SERVICE_CLASS_STATUS, "C-MOVE": QR_MOVE_SERVICE_CLASS_STATUS}.get(
        service, {}
    )
    cat, text = table.get(code, (category(code).value, ""))
    return f"0x{code:04X} ({cat}{': ' + text if text else ''})"


def is_final(code: int | None) -> bool:
    """Whether this response ends the operation (every category but Pending)."""
    return category(code) is not Category.PENDING


def find_capped(code: int | None) -> bool:
    """Whether a C-FIND's final status says the peer stopped before every match.

    Cancel (Orthanc 1.10 answers 0xFE00 after ``LimitFindResults`` matches), the
    standard's "response limit reached" warning, any other warning (matches may be
    missing: we cannot tell), and "out of resources" (too many matches to answer).
    """
    cat = category(code)
    return code in (OUT_OF_RESOURCES, RESPONSE_LIMIT_REACHED) or cat in (
        Category.CANCEL,
        Category.WARNING,
    )
