"""HL7 v2 intake: the structural check that decides AA or a refusal before the ACK.

Responsibility: HL7-INTAKE.md rule 15. Every rule that decides between AA and a
refusal (framing aside, which is `adapters.hl7_mllp.framing`'s) is checked here, over
the raw bytes, cheaply: segment terminators, the MSH and its delimiters, the character
set, required header fields, supported versions and message types, segment ids,
required segments, control bytes. Full parsing and FHIR mapping happen after the raw
message is committed and acknowledged (`adapters.hl7.runner`).

`check` returns a `CheckedMessage` or raises `Hl7Refusal` with the acknowledgement
code the sender must get:

- AR, with no usable MSH (so an empty MSA-2, rule 10): no MSH, a lower-case ``msh``,
  an MSH truncated before MSH-12 or inside MSH-2, a field separator that is unusable
  or equal to an encoding character (rule 2), UTF-16 (rule 3).
- AE, content the sender must fix, with MSA-2 = MSH-10 when it could be read:
  duplicate or invalid encoding characters (rule 2), a character set that the bytes
  do not match or that is not byte-oriented (rule 3), MSH-9 / MSH-10 / MSH-12 missing,
  an unsupported version (rule 10), a message type we cannot map (`MESSAGE_TYPES`),
  a type that requires PID without one, an invalid segment id, NUL and other control
  characters (rule 11), U+FFFD in the text (rule 3), more than one MSH in a message.

The adapters add the refusals that are not about content: oversize (AR, rule 12)
and buffer or disk problems (AR, rule 11).

Character sets (rule 3), from MSH-18's first repetition: ``UNICODE UTF-8``, ``UTF-8``,
``UNICODE`` -> UTF-8, strictly; the other single-byte table 0211 sets (and the
non-table ``WINDOWS-1256`` / ``CP1256``) strictly as labelled; ``8859/6`` -> ISO-8859-6,
unless bytes 0x80-0x9F (or bytes ISO-8859-6 leaves undefined) show Windows-1256, which
is then used with a warning; and if Windows-1256 would give mojibake while the bytes
are valid UTF-8, UTF-8 with a warning. Empty: ASCII, else UTF-8, else the adapter's
``encoding`` (with a warning). UTF-16/32 and multi-byte sets whose bytes can hide a
delimiter (GB 18030, Big5, JIS) are refused.

Never: decode escapes in `check` (`unescape` is for the mapper, on one value at a
time, so an escape can never create a field, component or segment: rule 4); produce
or accept U+FFFD; put message content in a reason, a warning or a log line (reasons
name fields and segment positions, never values, except header codes such as MSH-9,
MSH-12 and MSH-18 labels, shortened and reduced to printable ASCII).

Invariants: ``CheckedMessage.raw`` is the exact bytes received; ``text`` is what
`decode` returns for them: the decoded message with BOM removed, one CR after every
segment, blank lines dropped.
"""

from __future__ import annotations

import codecs
import itertools
import re
from dataclasses import dataclass
from typing import Final, Literal

from agent.errors import InputRejectedError
from agent.persian import contains_mojibake

MEDIA_TYPE: Final = "application/hl7-v2"
UTF8_BOM: Final = b"\xef\xbb\xbf"
DEFAULT_FIELD_SEP: Final = "|"
DEFAULT_ENCODING_CHARS: Final = "^~\\&"

#: MSH-12.1 values accepted (HL7 v2.3 to v2.8).
SUPPORTED_VERSIONS: Final = frozenset(
    {"2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8"}
)

#: Message types the mapping handles: MSH-9.1 -> accepted MSH-9.2 trigger events. A
#: message of another type is refused with AE before the ACK (the issue: "unknown
#: message types: quarantined with reason, AE"), because a type nobody can map would
#: otherwise be acknowledged and then only ever sit in quarantine. The mapper must
#: handle every entry (or quarantine it with a reason, which is never silent).
MESSAGE_TYPES: Final[dict[str, frozenset[str]]] = {
    # A01 admit, A02 transfer, A03 discharge, A04 register, A05 pre-admit, A06/A07
    # class change, A08 update, A11/A12/A13 cancellations, A28/A31 person
    # add/update, A40 merge patient (PID + MRG).
    "ADT": frozenset(
        {"A01", "A02", "A03", "A04", "A05", "A06", "A07", "A08"}
        | {"A11", "A12", "A13", "A28", "A31", "A40"}
    ),
    "ORU": frozenset({"R01"}),  # observation results: lab, pathology (OBR-24)
    "ORM": frozenset({"O01"}),  # orders (RXO: medication, else a general order)
    "OML": frozenset({"O21"}),  # laboratory orders
    "OMP": frozenset({"O09"}),  # pharmacy/treatment orders (v2.5+)
    "RDE": frozenset({"O01", "O11"}),  # pharmacy encoded orders: O01 in v2.3, O11 from v2.4
}

#: Message types that must carry a PID segment: without a patient nothing in SEPAS
#: can hold them. Every accepted ADT event above has a PID (ADT events that do not,
#: such as A20 bed status, are not accepted types at all).
PID_REQUIRED: Final = frozenset({"ADT", "ORU", "ORM", "OML", "OMP", "RDE"})

#: Batch envelope segments: a file may hold them around its messages (split_messages
#: drops them); inside one message they are refused.
BATCH_SEGMENTS: Final = frozenset({"FHS", "BHS", "BTS", "FTS"})

# HL7 table 0357 (message error condition codes), for the ACK's ERR segment.
ERR_SEGMENT_SEQUENCE: Final = "100"
ERR_REQUIRED_FIELD_MISSING: Final = "101"
ERR_DATA_TYPE: Final = "102"
ERR_UNSUPPORTED_MESSAGE_TYPE: Final = "200"
ERR_UNSUPPORTED_EVENT: Final = "201"
ERR_UNSUPPORTED_VERSION: Final = "203"
ERR_INTERNAL: Final = "207"

# Warnings: stable names, free of message content (they may reach logs and status).
WARN_8859_6_WAS_CP1256: Final = "charset-8859-6-was-windows-1256"
WARN_8859_6_WAS_UTF8: Final = "charset-8859-6-was-utf-8"
WARN_DEFAULT_ENCODING: Final = "charset-undeclared-default-encoding-used"
WARN_MSH7_EMPTY: Final = "msh-7-empty"

AckCode = Literal["AA", "AE", "AR"]

# HL7 table 0211 (alternate character sets) and the non-table labels seen in MSH-18.
_UTF8_LABELS: Final = frozenset({"UNICODE UTF-8", "UTF-8", "UTF8", "UNICODE"})
_WIDE_LABELS: Final = frozenset(
    {"UNICODE UTF-16", "UNICODE UTF-32", "UTF-16", "UTF16", "UTF-32", "UCS-2", "UCS2"}
)
_TABLE_0211: Final[dict[str, str]] = {
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859_2",
    "8859/3": "iso8859_3",
    "8859/4": "iso8859_4",
    "8859/5": "iso8859_5",
    "8859/7": "iso8859_7",
    "8859/8": "iso8859_8",
    "8859/9": "iso8859_9",
    "8859/15": "iso8859_15",
    # Not in table 0211, but what some Iranian senders write for what they use.
    "WINDOWS-1256": "cp1256",
    "CP1256": "cp1256",
    "WIN1256": "cp1256",
}
#: Table 0211 entries whose byte streams can carry ASCII delimiter bytes inside a
#: multi-byte character (or need ISO 2022 switching): the MSH cannot be split safely.
_UNSUPPORTED_LABELS: Final = frozenset(
    {"ISO IR14", "ISO IR87", "ISO IR159", "GB 18030-2000", "KS X 1001", "CNS 11643-1992", "BIG-5"}
)

_SEGMENT_ID: Final = re.compile(r"[A-Z0-9]{3}")
#: C0 controls (CR and LF never survive segment splitting), DEL, C1 controls; U+FFFD.
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f]")
_NEWLINES: Final = re.compile(rb"\r\n|\n")


@dataclass(frozen=True, slots=True)
class Msh:
    """The MSH fields the ACK and the ids need, as sent (escapes not decoded)."""

    field_sep: str = DEFAULT_FIELD_SEP  # MSH-1
    encoding_chars: str = DEFAULT_ENCODING_CHARS  # MSH-2 (4, or 5 with truncation)
    sending_application: str = ""  # MSH-3
    sending_facility: str = ""  # MSH-4
    receiving_application: str = ""  # MSH-5
    receiving_facility: str = ""  # MSH-6
    message_time: str = ""  # MSH-7
    message_code: str = ""  # MSH-9.1
    trigger_event: str = ""  # MSH-9.2
    message_structure: str = ""  # MSH-9.3
    control_id: str = ""  # MSH-10
    processing_id: str = ""  # MSH-11
    version: str = ""  # MSH-12 as sent (may have components)
    charset: str = ""  # MSH-18 as sent
    #: The Python codec the message was decoded with; its ACK is encoded with it.
    codec: str = "ascii"

    @property
    def version_id(self) -> str:
        """MSH-12.1, the version number alone."""
        return self.version.split(self.encoding_chars[:1] or "^")[0].strip()

    @property
    def dedupe_key(self) -> str:
        """MSH-10 and MSH-7: the same message delivered twice has the same key (rule 13)."""
        return f"{self.control_id}|{self.message_time}"


@dataclass(frozen=True, slots=True)
class CheckedMessage:
    """A message that passed intake: AA once its raw bytes are committed."""

    text: str  # decoded; segments each end with CR; escapes NOT decoded
    raw: bytes  # exactly as received
    charset: str  # Python codec used to decode (e.g. "utf-8", "cp1256")
    warnings: tuple[str, ...]
    msh: Msh

    @property
    def dedupe_key(self) -> str:
        return self.msh.dedupe_key

    @property
    def segments(self) -> list[str]:
        return self.text.split("\r")[:-1]


class Hl7Refusal(InputRejectedError):
    """Intake refused a message: the ACK code to answer, and why.

    ``reason`` is short, names fields and positions but never their values (except
    header codes), and is safe for logs, the quarantine and MSA-3. ``msh`` is what
    could be read of the header (None: no usable MSH, so MSA-2 stays empty).
    ``error`` is the HL7 table 0357 code and ``location`` the ERR location
    (``SEG^sequence^field``) for the ACK's ERR segment.
    """

    hint = (
        "The sender got AE/AR and kept the message. Inspect it with "
        "`sepas-agent dead-letter show`, then fix the sender's configuration."
    )

    def __init__(
        self,
        code: AckCode,
        reason: str,
        msh: Msh | None = None,
        *,
        error: str = ERR_DATA_TYPE,
        location: str = "",
    ) -> None:
        super().__init__(f"HL7 message refused ({code}): {reason}")
        self.code: AckCode = code
        self.reason = reason
        self.msh = msh
        self.error = error
        self.location = location


# ------------------------------------------------------------------ the check ------


def check(raw: bytes, *, default_encoding: str = "cp1256") -> CheckedMessage:
    """Decide whether ``raw`` (one HL7 v2 message) may be acknowledged with AA.

    Args:
        raw: the message bytes exactly as received (an MLLP payload, or one message of
            a file as `split_messages` cut it).
        default_encoding: the adapter's ``encoding``: used when MSH-18 is empty and the
            bytes are neither ASCII nor valid UTF-8 (rule 3).

    Raises:
        Hl7Refusal: with the ACK code (AE/AR) and a reason safe to log.
    """
    body = raw[len(UTF8_BOM) :] if raw.startswith(UTF8_BOM) else raw
    if body.startswith((b"\xff\xfe", b"\xfe\xff")) or body[:6] in (
        b"M\x00S\x00H\x00",
        b"\x00M\x00S\x00H",
    ):
        raise Hl7Refusal("AR", "UTF-16 is not accepted: HL7 v2 over MLLP is byte-oriented")
    segs = _segments(body)
    if not segs:
        raise Hl7Refusal("AR", "the message is empty")
    first = segs[0]
    if first[:3] != b"MSH":
        if first[:3].upper() == b"MSH":
            raise Hl7Refusal("AR", "the header segment id is not upper case (msh)")
        raise Hl7Refusal("AR", "the message does not start with an MSH segment")
    sep, enc, fields = _header(first)
    partial = _msh_from([f.decode("latin-1") for f in fields], sep, enc, "latin-1")
    _check_encoding_chars(sep, enc, partial)

    label = _charset_label(fields, enc)
    joined = b"\r".join(segs) + b"\r"
    text, codec, warnings = _decode(joined, label, default_encoding, partial)
    lines = text.split("\r")[:-1]
    msh = _msh_from(lines[0].split(sep), sep, enc, codec)

    _check_segments(lines, sep, msh)
    if not msh.control_id.strip():
        raise Hl7Refusal(
            "AE",
            "MSH-10 (message control id) is missing",
            msh,
            error=ERR_REQUIRED_FIELD_MISSING,
            location="MSH^1^10",
        )
    if not msh.message_code.strip():
        raise Hl7Refusal(
            "AE",
            "MSH-9 (message type) is missing",
            msh,
            error=ERR_REQUIRED_FIELD_MISSING,
            location="MSH^1^9",
        )
    if not msh.version_id:
        raise Hl7Refusal(
            "AE",
            "MSH-12 (version id) is missing",
            msh,
            error=ERR_REQUIRED_FIELD_MISSING,
            location="MSH^1^12",
        )
    if msh.version_id not in SUPPORTED_VERSIONS:
        raise Hl7Refusal(
            "AE",
            f"HL7 version {_show(msh.version_id)} is not supported (2.3 to 2.8)",
            msh,
            error=ERR_UNSUPPORTED_VERSION,
            location="MSH^1^12",
        )
    code, trigger = msh.message_code.strip(), msh.trigger_event.strip()
    triggers = MESSAGE_TYPES.get(code)
    if triggers is None:
        raise Hl7Refusal(
            "AE",
            f"message type {_show(code)} is not supported",
            msh,
            error=ERR_UNSUPPORTED_MESSAGE_TYPE,
            location="MSH^1^9",
        )
    if trigger not in triggers:
        raise Hl7Refusal(
            "AE",
            f"trigger event {_show(trigger)} of {_show(code)} is not supported",
            msh,
            error=ERR_UNSUPPORTED_EVENT,
            location="MSH^1^9",
        )
    if code in PID_REQUIRED and not any(line[:3] == "PID" for line in lines):
        raise Hl7Refusal(
            "AE",
            f"{code} messages need a PID segment and this one has none",
            msh,
            error=ERR_SEGMENT_SEQUENCE,
            location="PID",
        )
    if not msh.message_time.strip():
        warnings = (*warnings, WARN_MSH7_EMPTY)
    return CheckedMessage(text=text, raw=raw, charset=codec, warnings=warnings, msh=msh)


def decode(raw: bytes, default_encoding: str = "cp1256") -> str:
    """The text of one message as `check` decodes it (CR after every segment).

    For the mapper: escapes are not decoded (see `unescape`).

    Raises:
        Hl7Refusal: the message does not pass intake.
    """
    return check(raw, default_encoding=default_encoding).text


def peek_msh(head: bytes) -> Msh | None:
    """What can be read of the MSH at the start of ``head`` (e.g. the first bytes of an
    oversize message), decoded as Latin-1 so that echoing it returns the same bytes;
    None when there is no usable MSH. Never raises."""
    body = head[len(UTF8_BOM) :] if head.startswith(UTF8_BOM) else head
    segs = _segments(body.split(b"\r", 1)[0].split(b"\n", 1)[0])
    if not segs or segs[0][:3] != b"MSH":
        return None
    try:
        sep, enc, fields = _header(segs[0])
    except Hl7Refusal:
        return None
    if _encoding_chars_problem(sep, enc):
        enc = DEFAULT_ENCODING_CHARS if sep not in DEFAULT_ENCODING_CHARS else enc
    return _msh_from([f.decode("latin-1") for f in fields], sep, enc, "latin-1")


# ------------------------------------------------------------------ pieces ----------


def _segments(body: bytes) -> list[bytes]:
    """Split on CR, LF or CRLF (rule 1); blank and whitespace-only lines dropped."""
    return [s for s in _NEWLINES.sub(b"\r", body).split(b"\r") if s.strip(b" \t")]


def _valid_delimiter(ch: int) -> bool:
    return 0x21 <= ch <= 0x7E and not chr(ch).isalnum()


def _header(first: bytes) -> tuple[str, str, list[bytes]]:
    """Field separator, encoding characters and fields of the MSH (fields[n-1] is
    MSH-n for n >= 2). Refuses with AR when the MSH is unusable."""
    if len(first) < 4:
        raise Hl7Refusal("AR", "the MSH segment is truncated")
    sep_byte = first[3]
    if not _valid_delimiter(sep_byte):
        raise Hl7Refusal("AR", "MSH-1 (field separator) is not a usable delimiter")
    sep = chr(sep_byte)
    fields = first.split(bytes([sep_byte]))
    enc = fields[1] if len(fields) > 1 else b""
    if len(enc) < 4:
        if len(first) >= 8 and bytes([sep_byte]) in first[4:8]:
            raise Hl7Refusal("AR", "MSH-1 (field separator) equals an encoding character")
        raise Hl7Refusal("AR", "MSH-2 (encoding characters) is truncated")
    if len(fields) < 12:
        raise Hl7Refusal("AR", "the MSH segment is truncated before MSH-12")
    return sep, enc.decode("latin-1"), fields


def _encoding_chars_problem(sep: str, enc: str) -> str | None:
    if len(enc) > 5:
        return "MSH-2 has more than five encoding characters"
    if not all(_valid_delimiter(ord(c)) for c in enc):
        return "MSH-2 holds a character that cannot be a delimiter"
    if len(set(enc)) != len(enc):
        return "MSH-2 holds the same encoding character twice"
    return None


def _check_encoding_chars(sep: str, enc: str, partial: Msh) -> None:
    problem = _encoding_chars_problem(sep, enc)
    if problem is not None:
        # Fields can still be split (the separator is fine), so MSA-2 can name the
        # message; the ACK itself uses the default encoding characters.
        usable = DEFAULT_ENCODING_CHARS if sep not in DEFAULT_ENCODING_CHARS else enc
        msh = _replace_enc(partial, usable)
        raise Hl7Refusal("AE", problem, msh, error=ERR_DATA_TYPE, location="MSH^1^2")


def _replace_enc(msh: Msh, enc: str) -> Msh:
    return Msh(
        field_sep=msh.field_sep,
        encoding_chars=enc,
        sending_application=msh.sending_application,
        sending_facility=msh.sending_facility,
        receiving_application=msh.receiving_application,
        receiving_facility=msh.receiving_facility,
        message_time=msh.message_time,
        message_code=msh.message_code,
        trigger_event=msh.trigger_event,
        message_structure=msh.message_structure,
        control_id=msh.control_id,
        processing_id=msh.processing_id,
        version=msh.version,
        charset=msh.charset,
        codec=msh.codec,
    )


def _msh_from(fields: list[str], sep: str, enc: str, codec: str) -> Msh:
    def field(n: int) -> str:  # MSH-n, n >= 3
        return fields[n - 1] if len(fields) > n - 1 else ""

    comp = enc[0] if enc else "^"
    msg_type = field(9).split(comp)
    return Msh(
        field_sep=sep,
        encoding_chars=enc,
        sending_application=field(3),
        sending_facility=field(4),
        receiving_application=field(5),
        receiving_facility=field(6),
        message_time=field(7),
        message_code=msg_type[0],
        trigger_event=msg_type[1] if len(msg_type) > 1 else "",
        message_structure=msg_type[2] if len(msg_type) > 2 else "",
        control_id=field(10),
        processing_id=field(11),
        version=field(12),
        charset=field(18),
        codec=codec,
    )


def _charset_label(fields: list[bytes], enc: str) -> str:
    """MSH-18's first repetition (the message's character set), normalised."""
    if len(fields) < 18:
        return ""
    value = fields[17].decode("latin-1").split(enc[1])[0]
    return " ".join(value.upper().split())


def _decode(
    body: bytes, label: str, default: str, partial: Msh
) -> tuple[str, str, tuple[str, ...]]:
    """Rule 3: the text, the codec used, and warnings; never U+FFFD."""

    def refuse(reason: str) -> Hl7Refusal:
        return Hl7Refusal("AE", reason, partial, error=ERR_DATA_TYPE, location="MSH^1^18")

    def strict(codec: str) -> str | None:
        try:
            return body.decode(codec)
        except UnicodeDecodeError:
            return None

    if not label:
        if body.isascii():
            return body.decode("ascii"), "ascii", ()
        text = strict("utf-8")
        if text is not None:
            return text, "utf-8", ()
        text = strict(default)
        if text is None:
            raise refuse(f"MSH-18 is empty and the bytes are neither UTF-8 nor {default}")
        return text, codecs.lookup(default).name, (WARN_DEFAULT_ENCODING,)
    if label in _UTF8_LABELS:
        text = strict("utf-8")
        if text is None:
            raise refuse("MSH-18 says UTF-8 but the bytes are not valid UTF-8")
        return text, "utf-8", ()
    if label in _WIDE_LABELS:
        raise refuse(f"character set {_show(label)} is not accepted: HL7 v2 here is byte-oriented")
    if label == "8859/6":
        # C1 controls (0x80-0x9F) never occur in ISO-8859-6 text; Windows-1256 has
        # پ چ ژ گ ک ZWNJ there, so their presence shows what the sender really used
        # (as does a byte ISO-8859-6 leaves undefined).
        if not any(0x80 <= b <= 0x9F for b in body):
            text = strict("iso8859_6")
            if text is not None:
                return text, "iso8859-6", ()
        text = body.decode("cp1256")  # every byte is defined in cp1256
        if contains_mojibake(text):
            # Windows-1256 would store mojibake: the sender wrote UTF-8 under an
            # 8859/6 label (UTF-8 continuation bytes are mostly 0x80-0x9F too).
            utf8 = strict("utf-8")
            if utf8 is None:
                raise refuse("MSH-18 says 8859/6 but the bytes decode to mojibake")
            return utf8, "utf-8", (WARN_8859_6_WAS_UTF8,)
        return text, "cp1256", (WARN_8859_6_WAS_CP1256,)
    codec = _TABLE_0211.get(label)
    if codec is not None:
        text = strict(codec)
        if text is None:
            raise refuse(f"the bytes are not valid in the character set of MSH-18 ({_show(label)})")
        return text, codecs.lookup(codec).name, ()
    if label in _UNSUPPORTED_LABELS:
        raise refuse(f"character set {_show(label)} is not supported")
    raise refuse(f"MSH-18 names an unknown character set ({_show(label)})")


def _check_segments(lines: list[str], sep: str, msh: Msh) -> None:
    for n, line in enumerate(lines, start=1):
        seg_id = line[:3]
        if not _SEGMENT_ID.fullmatch(seg_id) or (len(line) > 3 and line[3] != sep):
            raise Hl7Refusal(
                "AE",
                f"segment {n} does not start with a valid segment id",
                msh,
                error=ERR_SEGMENT_SEQUENCE,
            )
        if "\ufffd" in line:
            raise Hl7Refusal(
                "AE",
                f"segment {n} ({seg_id}) holds U+FFFD: the text was already damaged",
                msh,
                location=f"{seg_id}^1",
            )
        bad = _CONTROL.search(line)
        if bad is not None:
            raise Hl7Refusal(
                "AE",
                f"segment {n} ({seg_id}) holds a control character U+{ord(bad.group()):04X}",
                msh,
                location=f"{seg_id}^1",
            )
        if n > 1 and seg_id == "MSH":
            raise Hl7Refusal(
                "AE",
                f"segment {n} is a second MSH: one message per frame",
                msh,
                error=ERR_SEGMENT_SEQUENCE,
                location="MSH^2",
            )
        if seg_id in BATCH_SEGMENTS:
            raise Hl7Refusal(
                "AE",
                f"segment {n} is a batch segment ({seg_id}): send messages, not batches",
                msh,
                error=ERR_SEGMENT_SEQUENCE,
                location=f"{seg_id}^1",
            )


def _show(value: str, limit: int = 24) -> str:
    """A header code for a reason: printable ASCII only, shortened."""
    kept = "".join(c if " " <= c <= "~" else "?" for c in value[:limit])
    return kept + ("..." if len(value) > limit else "")


# ------------------------------------------------------------------ escapes ---------


def unescape(
    value: str,
    enc_chars: str = DEFAULT_ENCODING_CHARS,
    *,
    field_sep: str = DEFAULT_FIELD_SEP,
    codec: str = "utf-8",
) -> str:
    """Decode the HL7 escapes in one already-split value (rule 4).

    ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` become the field, component, subcomponent,
    repetition and escape characters (``\\P\\``, v2.7, the truncation character);
    ``\\Xhh...\\`` the bytes hh..., decoded with ``codec`` (the message's, so that
    ``\\X0D\\`` is a CR and ``\\XD8A7\\`` in a UTF-8 message an alef); ``\\.br\\`` a line
    break (``\\.sp\\`` / ``\\.spN\\`` one or N); the highlighting ``\\H\\ \\N\\``,
    other formatting commands and character-set switches ``\\C..\\ \\M..\\`` are
    dropped. Anything else (``\\Z..\\``, unknown, unterminated, hex that does not
    decode) is kept verbatim, so nothing is lost and no U+FFFD is made.

    Call it on a value after the message was split into fields, components and
    subcomponents: what it produces is data, never a delimiter.
    """
    if len(enc_chars) < 4:
        raise ValueError("enc_chars needs at least four encoding characters")
    esc = enc_chars[2]
    if esc not in value:
        return value
    out: list[str] = []
    i, n = 0, len(value)
    while i < n:
        j = value.find(esc, i)
        if j < 0:
            out.append(value[i:])
            break
        out.append(value[i:j])
        k = value.find(esc, j + 1)
        if k < 0:
            out.append(value[j:])  # unterminated: verbatim
            break
        decoded = _escape(value[j + 1 : k], enc_chars, field_sep, codec)
        out.append(value[j : k + 1] if decoded is None else decoded)
        i = k + 1
    return "".join(out)


_SPACE_LINES: Final = re.compile(r"\.sp(\d*)")
#: A formatting escape asks for this many blank lines at most: 20 bytes of \.spN\ must
#: not become a billion newlines in memory.
MAX_SPACE_LINES: Final = 100
_FORMAT_CMDS: Final = re.compile(r"\.(fi|nf|ce|in[+-]?\d*|ti[+-]?\d*|sk[+-]?\d*)")
_HEX: Final = re.compile(r"(?:[0-9A-Fa-f]{2})+")


def _escape(seq: str, enc: str, field_sep: str, codec: str) -> str | None:
    simple = {"F": field_sep, "S": enc[0], "R": enc[1], "E": enc[2], "T": enc[3]}
    if seq in simple:
        return simple[seq]
    if seq == "P":
        return enc[4] if len(enc) > 4 else None
    if seq in ("H", "N"):
        return ""
    if seq == ".br":
        return "\n"
    m = _SPACE_LINES.fullmatch(seq)
    if m is not None:
        digits = m.group(1) or "1"
        return "\n" * max(1, min(int(digits[:4]), MAX_SPACE_LINES))
    if _FORMAT_CMDS.fullmatch(seq):
        return ""
    if seq[:1] == "X" and _HEX.fullmatch(seq[1:]):
        try:
            return bytes.fromhex(seq[1:]).decode(codec)
        except (UnicodeDecodeError, LookupError):
            return None
    if seq[:1] in ("C", "M") and _HEX.fullmatch(seq[1:]):
        return ""
    return None


# ------------------------------------------------------------------ files -----------

_MSH_AT_LINE_START: Final = re.compile(rb"(?:^|(?<=[\r\n]))MSH")
_ENVELOPE_AT_LINE_START: Final = re.compile(rb"(?:^|(?<=[\r\n]))(?:FHS|BHS|BTS|FTS)")


def split_messages(data: bytes) -> list[bytes]:
    """Cut the content of an HL7 file into its messages, each as its exact bytes.

    A message starts at each ``MSH`` at the start of a line (after CR, LF or CRLF).
    A UTF-8 BOM at the start of the file is dropped, and so are batch envelope
    segments (FHS, BHS, BTS, FTS) and blank lines between messages. Anything else
    outside a message (text before the first MSH, or after an envelope segment) is
    returned as a piece of its own, which intake refuses, so that it is quarantined
    rather than silently dropped.
    """
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM) :]
    starts = [m.start() for m in _MSH_AT_LINE_START.finditer(data)]
    bounds = [0, *starts, len(data)] if not starts or starts[0] != 0 else [*starts, len(data)]
    pieces: list[bytes] = []
    for a, b in itertools.pairwise(bounds):
        chunk = data[a:b]
        env = _ENVELOPE_AT_LINE_START.search(chunk)
        if env is None:
            message, rest = chunk, b""
        else:
            message, rest = chunk[: env.start()], chunk[env.start() :]
        if message.strip(b"\r\n\t "):
            pieces.append(message)
        left = [
            line
            for line in _NEWLINES.sub(b"\r", rest).split(b"\r")
            if line.strip(b"\t ") and line[:3] not in (b"FHS", b"BHS", b"BTS", b"FTS")
        ]
        if left:
            pieces.append(rest)
    return pieces
