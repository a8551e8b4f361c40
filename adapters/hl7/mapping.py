"""One HL7 v2 message -> the Record(s) PROTOCOL.md describes: dispatch and Patient.

Responsibility: pick the service for MSH-9, build the Patient from PID
(HL7-INTAKE.md rules 5, 6 and 8), hand the rest to `encounters`, `results` or
`orders`, and wrap it all in a Record whose body is a FHIR R4 ``collection`` Bundle
with the Patient first and whose id comes from `agent.record.hl7_id`.

What each message type becomes (the services of PROTOCOL.md):

=====================================  =================  ==============================
MSH-9                                  service            resources after the Patient
=====================================  =================  ==============================
ADT^A01 A04                            admission          Encounter (+ Practitioner)
ADT^A05 (pre-admit)                    admission          Encounter, status planned
ADT^A03                                discharge          Encounter, status finished
ADT^A08 A02 A06 A07 A11 A12 A13        encounter-update   Encounter
ADT^A28 A31                            patient            (none)
ADT^A40                                patient-merge      prior Patient, linked
ORU^R01                                lab-result         DiagnosticReport + Observations
ORU^R01, every OBR-24 pathological     pathology-report   same, category and text kept
RDE^O11 O01, OMP^O09, ORM^O01/OML^O21
  with RXO/RXE                         e-prescription     MedicationRequest per order
ORM^O01, OML^O21 otherwise             order              ServiceRequest (+ Specimen)
=====================================  =================  ==============================

Never: refuse a message for an invalid national code (it is sent flagged); put
patient data (names, codes, identifiers, free text) in an exception or a log line;
map a message with more than one patient into one record (refused instead, so it goes
to quarantine rather than silently losing a patient).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import date, datetime
from typing import Final

from adapters.fhir import bundle, local_id_system, patient
from adapters.hl7 import encounters, orders, results
from adapters.hl7.er7 import Message, Segment, Value, parse
from adapters.hl7.fhir_map import (
    Entries,
    Hl7Time,
    Options,
    Resource,
    first_time,
    human_name,
    parse_ts,
)
from agent.dates import JALALI_BEFORE_YEAR, TEHRAN, jalali_to_gregorian
from agent.errors import InputRejectedError
from agent.nationalcode import NationalCode, clean, normalise
from agent.persian import ascii_digits
from agent.record import PatientRef, RawRef, Record, Service, SourceRef, hl7_id

log = logging.getLogger(__name__)

MEDIA_TYPE: Final = "application/hl7-v2"

_ADT_SERVICES: Final = {
    "A01": Service.ADMISSION,
    "A04": Service.ADMISSION,
    "A05": Service.ADMISSION,
    "A03": Service.DISCHARGE,
    "A08": Service.ENCOUNTER_UPDATE,
    "A02": Service.ENCOUNTER_UPDATE,
    "A06": Service.ENCOUNTER_UPDATE,
    "A07": Service.ENCOUNTER_UPDATE,
    "A11": Service.ENCOUNTER_UPDATE,
    "A12": Service.ENCOUNTER_UPDATE,
    "A13": Service.ENCOUNTER_UPDATE,
    "A28": Service.PATIENT,
    "A31": Service.PATIENT,
    "A40": Service.PATIENT_MERGE,
}

#: (MSH-9.1, MSH-9.2) pairs this mapping turns into records. Anything else is refused
#: (AE before the ACK, HL7-INTAKE.md rule 10).
SUPPORTED_TYPES: Final[frozenset[tuple[str, str]]] = frozenset(
    {("ADT", trigger) for trigger in _ADT_SERVICES}
    | {
        ("ORU", "R01"),
        ("ORM", "O01"),
        ("OML", "O21"),
        ("RDE", "O11"),
        ("RDE", "O01"),  # v2.3's trigger for the pharmacy encoded order
        ("OMP", "O09"),
    }
)

_REQUIRED: Final[dict[tuple[str, str], tuple[str, ...]]] = {
    ("ADT", "A40"): ("PID", "MRG"),
    ("ORU", "R01"): ("PID", "OBR"),
    ("ORM", "O01"): ("PID", "ORC"),
    ("OML", "O21"): ("PID", "ORC"),
    ("RDE", "O11"): ("PID", "RXE"),
    ("RDE", "O01"): ("PID", "RXE"),
    ("OMP", "O09"): ("PID", "RXO"),
}

_CODE: Final = re.compile(r"[A-Z0-9]{1,3}", re.ASCII)


def is_supported(msg_type: str, trigger: str) -> bool:
    """Whether MSH-9 (message type, trigger event) is one this mapping handles."""
    return (msg_type.strip().upper(), trigger.strip().upper()) in SUPPORTED_TYPES


def required_segments(msg_type: str, trigger: str) -> tuple[str, ...]:
    """Segments a supported message must carry to be mapped (PID for every type).

    For the intake's structural check before the ACK; () for unsupported types.
    """
    key = (msg_type.strip().upper(), trigger.strip().upper())
    if key not in SUPPORTED_TYPES:
        return ()
    return _REQUIRED.get(key, ("PID",))


def message_type_label(msg_type: str, trigger: str) -> str:
    """``ADT^A99`` for error messages, or a placeholder when MSH-9 is not a code
    (so that a sender who put something else in MSH-9 cannot leak it into a log)."""
    t, e = msg_type.strip().upper(), trigger.strip().upper()
    if _CODE.fullmatch(t) and (not e or _CODE.fullmatch(e)):
        return f"{t}^{e}" if e else t
    return "(MSH-9 is not a message type code)"


def map_message(
    text: str,
    raw: bytes,
    *,
    node_id: str,
    adapter: str,
    kind: str,
    settings: object,
    captured_at: datetime,
) -> list[Record]:
    """Map one decoded HL7 v2 message to its Record(s) (one, for every type handled now).

    Args:
        text: the message decoded to str (adapters.hl7.intake.decode), segments
            separated by CR (LF and CRLF are accepted too).
        raw: the bytes exactly as received; kept in ``Record.raw``.
        node_id, adapter, kind: the node id, the adapter's name and kind
            (``hl7-mllp`` / ``hl7-files``).
        settings: the adapter's settings; `Options.of` reads what the mapping needs.
        captured_at: when the agent received it (tz-aware).

    Raises:
        InputRejectedError: an unsupported message type, a required segment missing,
            more than one patient, or a field that cannot be read. The message never
            contains patient data.
    """
    opts = Options.of(settings)
    msg = parse(text)
    msh = msg.msh
    msg_type, trigger = msh.get(9, 1).strip().upper(), msh.get(9, 2).strip().upper()
    label = message_type_label(msg_type, trigger)
    if (msg_type, trigger) not in SUPPORTED_TYPES:
        raise InputRejectedError(f"unsupported message type {label}")
    for name in required_segments(msg_type, trigger):
        if msg.find(name) is None:
            raise InputRejectedError(f"{label} without a {name} segment")
    pids = msg.all("PID")
    if len(pids) > 1:
        raise InputRejectedError(f"{label} with {len(pids)} PID segments (one patient only)")
    # As sent (escapes not decoded), like the intake's duplicate key (rule 13).
    control_id, msh7 = msh.raw(10), msh.raw(7)
    record_id = hl7_id(node_id, adapter, control_id, msh7)
    entries = Entries(record_id, node_id, adapter)
    pid = pids[0]
    national, local_id = national_code(pid, opts), local_identifier(pid, opts)
    entries.add(patient_resource(pid, entries, national, local_id, opts))

    mapper = _mapper(msg_type, trigger, msg, opts)
    service, event_time = mapper(msg, entries)
    when = event_time or first_time(msh.get(7))
    occurred_at = when.at if when is not None else captured_at.astimezone(TEHRAN)
    ref = PatientRef(
        national_id=national.value if national.value and len(national.value) == 10 else None,
        national_id_valid=national.valid,
        local_id=local_id.comp(1).strip() if local_id else None,
    )
    if national.warnings:
        log.debug(
            "National code flagged.",
            extra={"event": "hl7.national_code_flagged", "warnings": list(national.warnings)},
        )
    return [
        Record(
            id=record_id,
            service=service,
            occurred_at=occurred_at,
            captured_at=captured_at,
            source=SourceRef(adapter=adapter, kind=kind, ref=control_id),
            patient=ref,
            body=bundle(record_id, entries.resources),
            raw=RawRef.of(raw, MEDIA_TYPE),
        )
    ]


#: Adds a message's resources after the Patient; returns its service and event time.
Mapper = Callable[[Message, Entries], tuple[Service, Hl7Time | None]]


def _mapper(msg_type: str, trigger: str, msg: Message, opts: Options) -> Mapper:
    if msg_type == "ADT":
        service = _ADT_SERVICES[trigger]
        if service is Service.PATIENT:
            return lambda m, e: (service, _evn_time(m))
        if service is Service.PATIENT_MERGE:
            return lambda m, e: (service, merge(m, e, opts))
        return lambda m, e: (service, encounters.map_adt(m, e, trigger))
    if msg_type == "ORU":
        return lambda m, e: results.map_oru(m, e, opts)
    if msg_type in ("RDE", "OMP") or any(s.name in ("RXO", "RXE") for s in msg):
        return lambda m, e: (Service.E_PRESCRIPTION, orders.map_orders(m, e))
    return lambda m, e: (Service.ORDER, orders.map_orders(m, e))


def _evn_time(msg: Message) -> Hl7Time | None:
    """EVN-2 (recorded), else EVN-6 (occurred)."""
    evn = msg.find("EVN")
    return first_time(evn.get(2), evn.get(6)) if evn is not None else None


# --- Patient --------------------------------------------------------------------------


def _is_national(cx: Value, opts: Options) -> bool:
    return (
        cx.comp(5).strip().upper() == opts.national_id_type.upper()
        or cx.comp(4).strip().upper() == opts.national_id_authority.upper()
    )


def national_code(pid: Segment, opts: Options) -> NationalCode:
    """HL7-INTAKE.md rule 5, first hit wins: the PID-3 repetition whose CX.5 is the
    national identifier type (or CX.4 the national authority); else PID-19; else PID-2
    when it cleans to 10 digits. A candidate that holds no digits at all ("UNKNOWN",
    "-") is no hit. Never raises; an invalid code comes back flagged, not dropped."""
    candidates = [cx.comp(1) for cx in pid.reps(3) if _is_national(cx, opts)]
    candidates.append(pid.get(19))
    external = clean(pid.get(2))
    if len(external) == 10 and external.isdigit() and external.isascii():
        candidates.append(external)
    for candidate in candidates:
        code = normalise(candidate)
        if code.value is not None:
            return code
    return NationalCode(None, False)


def local_identifier(pid: Segment, opts: Options) -> Value | None:
    """The facility's own id: the PID-3 repetition typed MR, else the first non-national one."""
    others = [cx for cx in pid.reps(3) if not _is_national(cx, opts) and cx.comp(1).strip()]
    for cx in others:
        if cx.comp(5).strip().upper() == "MR":
            return cx
    return others[0] if others else None


_COMPACT_DATE: Final = re.compile(r"(\d{4})(\d{2})?(\d{2})?", re.ASCII)
_SEPARATED_DATE: Final = re.compile(r"(\d{4})([/-])(\d{1,2})\2(\d{1,2})(?!\d)", re.ASCII)
#: Jalali birth years below this (Gregorian 1821) are not birth dates of the living.
_OLDEST_JALALI_BIRTH_YEAR: Final = 1200


def _birth_date(pid: Segment) -> tuple[date | None, str | None, str | None]:
    """PID-7 -> (full date, else a FHIR partial date, and the Jalali string as sent).

    TS is ``YYYY[MM[DD…]]``; ``YYYY/MM/DD`` and ``YYYY-MM-DD`` (which Iranian HIS
    write) are read too. A year below 1700 is Jalali (rule 8): converted when it is a
    real Jalali date, and the string is kept as sent either way; a date that does not
    exist gives no birth date, never a guessed one.
    """
    sent = pid.get(7).strip()
    digits = ascii_digits(sent)
    sep = _SEPARATED_DATE.match(digits)
    if sep is not None:
        year, month, day = int(sep[1]), int(sep[3]), int(sep[4])
    else:
        m = _COMPACT_DATE.match(digits)
        if m is None:
            return None, None, None
        year = int(m[1])
        month = int(m[2]) if m[2] else None
        day = int(m[3]) if m[2] and m[3] else None
    if year < JALALI_BEFORE_YEAR:
        if month is None or day is None or year < _OLDEST_JALALI_BIRTH_YEAR:
            return None, None, sent
        try:
            return jalali_to_gregorian(year, month, day), None, sent
        except ValueError:
            return None, None, sent
    if month is None:
        return None, f"{year:04d}", None
    if day is None:
        return (None, f"{year:04d}-{month:02d}", None) if 1 <= month <= 12 else (None, None, None)
    try:
        return date(year, month, day), None, None
    except ValueError:
        return None, None, None


def patient_resource(
    pid: Segment,
    entries: Entries,
    national: NationalCode,
    local_id: Value | None,
    opts: Options,
) -> Resource:
    """The record's Patient from PID (rules 5, 6 and 8)."""
    birth, partial_birth, jalali = _birth_date(pid)
    name = pid.first(5)
    res = patient(
        national=national,
        local_id=local_id.comp(1).strip() if local_id else None,
        local_system=local_id_system(entries.node_id, entries.adapter),
        family=name.comp(1),  # XPN.1: FN.1 in 2.4+ is its first subcomponent
        given=[name.comp(2), name.comp(3)],
        birth_date=birth,
        birth_date_jalali=jalali,
        sex=pid.get(8),
    )
    if partial_birth:
        res["birthDate"] = partial_birth
    _more_identifiers(res, pid, entries, opts, local_id)
    _address_and_telecom(res, pid)
    death = parse_ts(pid.get(29))
    if death is not None:
        res["deceasedDateTime"] = death.fhir()
    elif pid.get(30).strip().upper() in ("Y", "N"):
        res["deceasedBoolean"] = pid.get(30).strip().upper() == "Y"
    return res


def _more_identifiers(
    res: Resource, pid: Segment, entries: Entries, opts: Options, local_id: Value | None
) -> None:
    """Every other PID-3 repetition (insurance, passport…) as a secondary identifier."""
    extra = []
    for cx in pid.reps(3):
        value = cx.comp(1).strip()
        if not value or _is_national(cx, opts) or (local_id is not None and cx == local_id):
            continue
        authority, id_type = cx.comp(4).strip(), cx.comp(5).strip()
        ident: Resource = {
            "use": "secondary",
            "system": entries.local_system("id", authority or id_type or "other"),
            "value": value,
        }
        if id_type:
            ident["type"] = {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": id_type}
                ]
            }
        extra.append(ident)
    if extra:
        res.setdefault("identifier", []).extend(extra)


def _address_and_telecom(res: Resource, pid: Segment) -> None:
    """PID-11 and PID-13, verbatim (rule 7: addresses keep their digits and text)."""
    addresses = []
    for xad in pid.reps(11):
        addr: Resource = {}
        lines = [line for line in (xad.comp(1), xad.comp(2)) if line.strip()]
        if lines:
            addr["line"] = lines
        for key, n in (("city", 3), ("state", 4), ("postalCode", 5), ("country", 6)):
            if xad.comp(n).strip():
                addr[key] = xad.comp(n)
        if addr:
            addresses.append(addr)
    if addresses:
        res["address"] = addresses
    telecom = []
    for xtn in pid.reps(13):
        number = xtn.comp(1) or xtn.comp(12)
        if number.strip():
            telecom.append({"system": "phone", "value": number.strip()})
        elif xtn.comp(4).strip():
            telecom.append({"system": "email", "value": xtn.comp(4).strip()})
    if telecom:
        res["telecom"] = telecom


# --- ADT^A40 ----------------------------------------------------------------------------


def merge(msg: Message, entries: Entries, opts: Options) -> Hl7Time | None:
    """ADT^A40: the surviving Patient (entry 0) ``replaces`` the prior one from MRG.

    FHIR R4 has no merge resource; ``Patient.link`` is how R4 says it (and what R5's
    $merge writes): the survivor links to the prior record with type ``replaces``, the
    prior record (``active: false``, identifiers from MRG-1) links back with
    ``replaced-by``. Both are Patients in the Bundle, so the hub sees the whole event.
    """
    mrgs = msg.all("MRG")
    if len(mrgs) > 1:
        raise InputRejectedError(f"ADT^A40 with {len(mrgs)} MRG segments (one merge only)")
    mrg = mrgs[0]
    prior: Resource = {"resourceType": "Patient", "active": False}
    identifiers = []
    national = None
    for cx in mrg.reps(1):
        value = cx.comp(1).strip()
        if not value:
            continue
        if _is_national(cx, opts) and national is None:
            national = normalise(value)
            continue
        identifiers.append(
            {
                "use": "old",
                "system": local_id_system(entries.node_id, entries.adapter),
                "value": value,
            }
        )
    if national is not None and national.value:
        prior_national = patient(national=national)["identifier"]
        identifiers.insert(0, prior_national[0])
    if not identifiers:
        raise InputRejectedError("ADT^A40 without a prior patient identifier in MRG-1")
    prior["identifier"] = identifiers
    old_name = mrg.first(7)
    if old_name:
        name = human_name(old_name.comp(1), [old_name.comp(2), old_name.comp(3)])
        if name:
            prior["name"] = [name]
    prior["link"] = [{"other": entries.patient, "type": "replaced-by"}]
    prior_ref = entries.add(prior)
    entries.resources[0]["link"] = [{"other": prior_ref, "type": "replaces"}]
    return _evn_time(msg)
