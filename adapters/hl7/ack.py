"""Original-mode HL7 v2 acknowledgements (HL7 v2.5.1 chapter 2, 2.9.2), built from
the received MSH.

Built by hand rather than with hl7apy: hl7apy 1.3.5 has no ACK builder, and an ACK
must also be made for messages that hl7apy cannot parse at all (a broken MSH, an
unsupported version, a bad character set, an oversize message of which we kept only
the head), with the sender's own delimiters and character set echoed byte for byte.
The ACK is three short segments; the version differences are listed below.

The ACK (HL7-INTAKE.md rule 10):

- MSH: the received delimiters (MSH-1, MSH-2, including a fifth truncation
  character); MSH-3/4 and MSH-5/6 swapped; MSH-7 the current time in Asia/Tehran with
  its offset (``YYYYMMDDHHMMSS+0330``); MSH-9 ``ACK^<trigger>^ACK`` (``ACK^<trigger>``
  for v2.3, whose MSH-9 has no message-structure component); a new MSH-10; MSH-11,
  MSH-12 and MSH-18 echoed. Without a usable MSH: ``|^~\\&``, MSH-11 ``P``, MSH-12
  ``2.5``.
- MSA: MSA-1 ``AA``/``AE``/``AR``; MSA-2 the received MSH-10 (empty without one);
  MSA-3 the reason, for v2.3 to v2.6 (withdrawn as of v2.7, where the reason goes to
  ERR-8 only).
- ERR, for AE and AR: v2.3 and v2.4 have ERR-1 (``seg^seq^field^code&text&HL70357``);
  v2.5 and later ERR-2 location, ERR-3 the table 0357 code, ERR-4 severity ``E`` and
  ERR-8 the reason.

Encoded with the codec the message was decoded with, so echoed header fields (a
Persian facility name in MSH-4, say) come back as the sender wrote them.

Never: put message content other than the echoed header fields into an ACK; the
reason texts come from `adapters.hl7.intake` and the adapters and hold no patient data.
"""

from __future__ import annotations

import itertools
import os
from datetime import datetime
from typing import Final
from zoneinfo import ZoneInfo

from adapters.hl7.intake import (
    DEFAULT_ENCODING_CHARS,
    DEFAULT_FIELD_SEP,
    ERR_INTERNAL,
    AckCode,
    CheckedMessage,
    Hl7Refusal,
    Msh,
)

TEHRAN: Final = ZoneInfo("Asia/Tehran")
DEFAULT_VERSION: Final = "2.5"
#: Versions whose ERR has ERR-1 (error code and location) rather than ERR-2..ERR-8.
_ERR1_VERSIONS: Final = frozenset({"2.3", "2.3.1", "2.4"})
#: Versions where MSA-3 (text message) still exists; withdrawn as of v2.7.
_MSA3_VERSIONS: Final = frozenset({"2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6"})
_ERROR_TEXT: Final = {
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "203": "Unsupported version id",
    "207": "Application internal error",
}
#: A process-unique prefix and a counter: ACK control ids never repeat.
_PREFIX: Final = os.urandom(4).hex().upper()
_COUNTER = itertools.count(1)


def accept(checked: CheckedMessage, *, now: datetime | None = None) -> bytes:
    """AA for a message whose raw bytes are committed."""
    return build_ack(checked.msh, "AA", now=now)


def refuse(refusal: Hl7Refusal, *, now: datetime | None = None) -> bytes:
    """AE or AR for a message intake refused, with its reason and ERR."""
    return build_ack(
        refusal.msh,
        refusal.code,
        text=refusal.reason,
        error=refusal.error,
        location=refusal.location,
        now=now,
    )


def reject(msh: Msh | None, reason: str, *, now: datetime | None = None) -> bytes:
    """AR for a reason other than the content (buffer full, disk error, oversize)."""
    return build_ack(msh, "AR", text=reason, error=ERR_INTERNAL, now=now)


def build_ack(
    msh: Msh | None,
    code: AckCode,
    *,
    text: str = "",
    error: str = "",
    location: str = "",
    now: datetime | None = None,
    control_id: str | None = None,
) -> bytes:
    """The ACK message's bytes (segments end with CR; no MLLP framing).

    Args:
        msh: the received header, or None when there was no usable MSH.
        code: MSA-1.
        text: the reason for AE/AR, for MSA-3 and ERR-8; never patient data.
        error: HL7 table 0357 code for ERR (default 207, application internal error).
        location: where the error is, ``SEG^sequence^field`` (ERR-1 / ERR-2).
        now: MSH-7 (default: the current time, in Asia/Tehran).
        control_id: MSH-10 of the ACK (default: a new unique id).
    """
    m = msh if msh is not None else Msh()
    sep = m.field_sep or DEFAULT_FIELD_SEP
    enc = m.encoding_chars if len(m.encoding_chars) >= 4 else DEFAULT_ENCODING_CHARS
    comp, sub = enc[0], enc[3]
    version = m.version if m.version.strip() else DEFAULT_VERSION
    version_id = m.version_id if m.version.strip() else DEFAULT_VERSION
    when = (now or datetime.now(TEHRAN)).astimezone(TEHRAN)
    msg_type = f"ACK{comp}{m.trigger_event}" if m.trigger_event else "ACK"
    if version_id != "2.3":
        msg_type = f"ACK{comp}{m.trigger_event}{comp}ACK"
    msh_fields = [
        "MSH",
        enc,
        m.receiving_application,
        m.receiving_facility,
        m.sending_application,
        m.sending_facility,
        when.strftime("%Y%m%d%H%M%S%z"),
        "",
        msg_type,
        control_id if control_id is not None else _new_control_id(),
        m.processing_id or "P",
        version,
    ]
    if m.charset:
        msh_fields += ["", "", "", "", "", m.charset]
    segments = [sep.join(msh_fields)]

    reason = escape(text, sep, enc)
    msa = ["MSA", code, m.control_id]
    if reason and version_id in _MSA3_VERSIONS:
        msa.append(reason)
    segments.append(sep.join(msa))

    if code != "AA":
        err_code = error or ERR_INTERNAL
        err_text = escape(_ERROR_TEXT.get(err_code, ""), sep, enc)
        where = location.split("^") if location else []
        loc = comp.join(escape(p, sep, enc) for p in where)
        if version_id in _ERR1_VERSIONS:
            # ERR-1 (ELD): segment ^ sequence ^ field ^ code&text&HL70357
            parts = [*where[:3], "", "", ""][:3]
            eld = comp.join(
                [*(escape(p, sep, enc) for p in parts), sub.join([err_code, err_text, "HL70357"])]
            )
            segments.append(sep.join(["ERR", eld]))
        else:
            cwe = comp.join([err_code, err_text, "HL70357"])
            segments.append(sep.join(["ERR", "", loc, cwe, "E", "", "", "", reason]))
    data = "\r".join(segments) + "\r"
    return data.encode(_codec(m.codec), errors="replace")


def escape(
    value: str, field_sep: str = DEFAULT_FIELD_SEP, enc: str = DEFAULT_ENCODING_CHARS
) -> str:
    """Escape delimiters in a text we put into a field (HL7 v2.5.1 2.7.4)."""
    if not value:
        return value
    esc = enc[2]
    table = {esc: f"{esc}E{esc}", field_sep: f"{esc}F{esc}", enc[0]: f"{esc}S{esc}"}
    table[enc[1]] = f"{esc}R{esc}"
    table[enc[3]] = f"{esc}T{esc}"
    if len(enc) > 4:
        table[enc[4]] = f"{esc}P{esc}"
    out = "".join(table.get(c, c) for c in value)
    # Our texts are one line; a CR or LF would end the segment.
    return out.replace("\r", " ").replace("\n", " ")


def parse_ack(data: bytes) -> dict[str, str]:
    """The fields of an ACK a test or a tool needs: MSA-1, MSA-2, MSH-9, MSH-12, ...

    For tests and diagnostics, not for intake: it trusts its input.
    """
    text = data.decode("latin-1")
    segs = [s for s in text.replace("\n", "\r").split("\r") if s]
    msh = segs[0]
    sep = msh[3]
    mf = msh.split(sep)
    out = {
        "field_sep": sep,
        "encoding_chars": mf[1],
        "MSH-3": mf[2],
        "MSH-4": mf[3],
        "MSH-5": mf[4],
        "MSH-6": mf[5],
        "MSH-7": mf[6],
        "MSH-9": mf[8],
        "MSH-10": mf[9],
        "MSH-11": mf[10],
        "MSH-12": mf[11],
        "MSH-18": mf[17] if len(mf) > 17 else "",
    }
    for seg in segs[1:]:
        f = seg.split(sep)
        if f[0] == "MSA":
            out["MSA-1"] = f[1] if len(f) > 1 else ""
            out["MSA-2"] = f[2] if len(f) > 2 else ""
            out["MSA-3"] = f[3] if len(f) > 3 else ""
        elif f[0] == "ERR":
            out["ERR"] = seg
    return out


def _new_control_id() -> str:
    # 20 characters at most: MSH-10 is ST(20) in v2.3 and v2.4.
    return f"SEPAS{_PREFIX}{next(_COUNTER) % 10**7:07d}"


def _codec(name: str) -> str:
    try:
        "".encode(name)
    except LookupError:
        return "ascii"
    return name
