"""HL7 v2 ER7 ("pipe and hat") text split into segments, fields, repetitions,
components and subcomponents, for the mapping.

Responsibility: read an already decoded, already structurally checked message
(adapters.hl7.intake does that before the ACK) so that the mapping can ask for
"PID-3, every repetition, component 5" without caring about delimiters or escapes.

Why not hl7apy's parser here (hl7apy 1.3.5, tried with ``find_groups=False`` and
``VALIDATION_LEVEL.TOLERANT``): it has no unescaping, and the values it gives back
escape again what it does not know (``\\X0D\\`` comes back as ``\\E\\X0D\\E\\``,
``\\.br\\`` as ``\\E\\.br\\E\\``, in ``.value`` and ``.to_er7()`` alike); it refuses
versions it has no tables for (2.7.1, 2.9, an empty MSH-12) although their ER7 is the
same. Splitting by the delimiters of MSH-1/MSH-2 is all the mapping needs, behaves
the same from 2.3 to 2.8, and cannot be surprised by Z-segments.

Rules (HL7-INTAKE.md rules 1, 2 and 4):
- segments end at CR, LF or CRLF; a BOM before MSH is ignored;
- delimiters come from MSH-1 and MSH-2; a fifth encoding character (v2.7 truncation,
  ``#``) is accepted and only means that ``\\P\\`` stands for it;
- values are split by the delimiters *first* and unescaped *after*, leaf by leaf
  (`adapters.hl7.intake.unescape`), so an escape sequence can never create a field,
  component or segment;
- ``""`` (HL7's explicit null) reads as empty.

Never: log or put message content in an exception message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from adapters.hl7 import intake
from agent.errors import InputRejectedError

_SEGMENT_END: Final = re.compile(r"\r\n|\r|\n")
#: Control characters a value may carry after unescaping (FHIR strings allow these).
_ALLOWED_CONTROLS: Final = frozenset("\t\n\r")


@dataclass(frozen=True, slots=True)
class Delimiters:
    """MSH-1 and MSH-2 (four encoding characters, or five with v2.7's truncation)."""

    field: str = "|"
    encoding: str = "^~\\&"

    @property
    def component(self) -> str:
        return self.encoding[0]

    @property
    def repetition(self) -> str:
        return self.encoding[1]

    @property
    def escape(self) -> str:
        return self.encoding[2]

    @property
    def subcomponent(self) -> str:
        return self.encoding[3]


@dataclass(frozen=True, slots=True)
class Text:
    """How escaped bytes (``\\Xhh…\\``) become text: the message's codec."""

    codec: str = "utf-8"


def unescape(value: str, delims: Delimiters, text: Text | None = None) -> str:
    """Decode HL7 escape sequences in one leaf value (rule 4), with
    `adapters.hl7.intake.unescape` (the one implementation of the rule).

    Raises:
        InputRejectedError: an escape decodes to a control character other than
            TAB, CR or LF (``\\X00\\``): HL7-INTAKE.md rule 11 refuses control
            bytes inside fields, and PostgreSQL's jsonb cannot hold U+0000.
    """
    if delims.escape not in value:
        return value
    result = intake.unescape(
        value, delims.encoding, field_sep=delims.field, codec=(text or Text()).codec
    )
    if any(ord(ch) < 0x20 and ch not in _ALLOWED_CONTROLS for ch in result):
        raise InputRejectedError("an escape sequence decodes to a control character")
    return result


@dataclass(frozen=True, slots=True)
class Value:
    """One repetition of a field (or a whole component): raw ER7 text plus how to read it."""

    raw: str
    delims: Delimiters
    text_: Text

    def __bool__(self) -> bool:
        return bool(self.raw) and self.raw != '""'

    def _part(self, raw: str) -> str:
        return "" if raw == '""' else unescape(raw, self.delims, self.text_)

    def text(self) -> str:
        """The whole repetition unescaped, delimiters inside it kept: free text (ST/TX/FT)."""
        return self._part(self.raw)

    def components(self) -> list[Value]:
        return [Value(p, self.delims, self.text_) for p in self.raw.split(self.delims.component)]

    def comp(self, n: int, sub: int = 1) -> str:
        """Component ``n`` (1-based), subcomponent ``sub``, unescaped; "" when absent."""
        parts = self.raw.split(self.delims.component)
        if n > len(parts):
            return ""
        subs = parts[n - 1].split(self.delims.subcomponent)
        return self._part(subs[sub - 1]) if sub <= len(subs) else ""


@dataclass(frozen=True, slots=True)
class Segment:
    """One segment. ``field(n)`` follows HL7 numbering, MSH included (MSH-1 is "|")."""

    name: str
    fields: tuple[str, ...]  # fields[0] is the segment name; MSH: fields[1] is MSH-2
    delims: Delimiters
    text_: Text

    def raw(self, n: int) -> str:
        """Field ``n`` exactly as sent (escapes not decoded)."""
        if self.name == "MSH":
            if n == 1:
                return self.delims.field
            n -= 1
        return self.fields[n] if 0 < n < len(self.fields) else ""

    def reps(self, n: int) -> list[Value]:
        """Every non-empty repetition of field ``n``."""
        raw = self.raw(n)
        if self.name == "MSH" and n in (1, 2):
            return []  # the delimiters themselves, not data
        values = [Value(p, self.delims, self.text_) for p in raw.split(self.delims.repetition)]
        return [v for v in values if v]

    def first(self, n: int) -> Value:
        """The first non-empty repetition of field ``n`` (an empty Value if none)."""
        reps = self.reps(n)
        return reps[0] if reps else Value("", self.delims, self.text_)

    def get(self, n: int, comp: int = 1, sub: int = 1) -> str:
        """Field ``n``, first repetition, component ``comp``, subcomponent ``sub``."""
        return self.first(n).comp(comp, sub)

    def text(self, n: int) -> str:
        """Field ``n`` unescaped as one string, repetitions and components kept as sent."""
        raw = self.raw(n)
        if self.name == "MSH" and n in (1, 2):
            return raw
        return "" if raw == '""' else unescape(raw, self.delims, self.text_)


@dataclass(frozen=True, slots=True)
class Message:
    segments: tuple[Segment, ...]
    delims: Delimiters

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    def all(self, name: str) -> list[Segment]:
        return [s for s in self.segments if s.name == name]

    def find(self, name: str) -> Segment | None:
        return next((s for s in self.segments if s.name == name), None)

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)


#: MSH-18 (HL7 table 0211, and labels seen in the field) -> the codec for escaped
#: bytes (``\\Xhh\\``); HL7-INTAKE.md rule 3. Empty or unknown: UTF-8.
_CODECS: Final = {
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "UNICODE": "utf-8",
    "8859/6": "cp1256",  # a superset in practice: what 8859/6 senders really use
    "8859/1": "latin-1",
    "ASCII": "ascii",
    "WINDOWS-1256": "cp1256",
    "CP1256": "cp1256",
}


def parse(text: str) -> Message:
    """Split a decoded message into segments and learn its delimiters.

    Raises:
        InputRejectedError: no MSH segment first, or MSH-1/MSH-2 unusable (the intake
            refuses those before the ACK; this is the mapping's own guard).
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = [line for line in _SEGMENT_END.split(text) if line.strip()]
    if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 8:
        raise InputRejectedError("message does not start with an MSH segment")
    msh = lines[0]
    fsep = msh[3]
    enc = msh[4:].partition(fsep)[0]
    if not 4 <= len(enc) <= 5 or fsep in enc or len(set(enc)) != len(enc) or fsep.isalnum():
        raise InputRejectedError("MSH-1/MSH-2 do not give usable delimiters")
    delims = Delimiters(fsep, enc)
    msh_fields = msh.split(fsep)
    label = ""
    if len(msh_fields) > 17:
        label = " ".join(msh_fields[17].split(delims.repetition)[0].upper().split())
    how = Text(_CODECS.get(label, "utf-8"))
    segments = []
    for line in lines:
        fields = tuple(line.split(fsep))
        segments.append(Segment(fields[0].strip(), fields, delims, how))
    return Message(tuple(segments), delims)
