"""ADT visit events -> a FHIR R4 Encounter (admission, discharge, encounter-update).

Responsibility: PV1 (and EVN, PV2) -> one Encounter referring to the record's Patient:
class from PV1-2, period from PV1-44/PV1-45 (EVN-2 when the event itself is the
start or the end), location PV1-3 (and the prior one, PV1-6, on a transfer),
attending/referring/admitting doctors PV1-7/8/17 as Practitioners, visit number PV1-19.

Never: refuse a message for a missing PV1 (the Encounter then has class "unknown");
put patient data in an exception.
"""

from __future__ import annotations

from typing import Final

from adapters.hl7.er7 import Message, Segment, Value
from adapters.hl7.fhir_map import Entries, Hl7Time, Resource, first_time, parse_ts

ACT_CODE: Final = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
NULL_FLAVOR: Final = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"
PARTICIPATION: Final = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"

#: HL7 table 0004 (patient class) -> v3 ActEncounterCode (FHIR R4 Encounter.class).
_CLASSES: Final = {
    "E": ("EMER", "emergency"),
    "I": ("IMP", "inpatient encounter"),
    "O": ("AMB", "ambulatory"),
    "P": ("PRENC", "pre-admission"),
    "R": ("AMB", "ambulatory"),  # recurring patient
    "B": ("IMP", "inpatient encounter"),  # obstetrics
    "C": ("AMB", "ambulatory"),  # commercial account
}

#: Encounter.status per trigger; A08 depends on whether PV1-45 is set.
_STATUS: Final = {
    "A01": "in-progress",
    "A04": "in-progress",
    "A05": "planned",
    "A03": "finished",
    "A02": "in-progress",
    "A06": "in-progress",
    "A07": "in-progress",
    "A11": "cancelled",
    "A12": "in-progress",
    "A13": "in-progress",
}

_PARTICIPANTS: Final = ((7, "ATND", "attender"), (8, "REF", "referrer"), (17, "ADM", "admitter"))


def encounter_class(pv1: Segment | None) -> Resource:
    code = pv1.get(2).strip().upper() if pv1 is not None else ""
    if code in _CLASSES:
        act, display = _CLASSES[code]
        return {"system": ACT_CODE, "code": act, "display": display}
    return {"system": NULL_FLAVOR, "code": "UNK", "display": "unknown"}


def _location(pl: Value, status: str) -> Resource | None:
    parts = [pl.comp(4), pl.comp(1), pl.comp(2), pl.comp(3)]  # facility, unit, room, bed
    display = " / ".join(p.strip() for p in parts if p.strip()) or pl.comp(9).strip()
    if not display:
        return None
    return {"location": {"display": display}, "status": status}


def map_adt(msg: Message, entries: Entries, trigger: str) -> Hl7Time | None:
    """Add the Encounter of an ADT visit event; return the event time (EVN-2, EVN-6)."""
    pv1, pv2, evn = msg.find("PV1"), msg.find("PV2"), msg.find("EVN")
    event = first_time(evn.get(2), evn.get(6)) if evn is not None else None
    start = parse_ts(pv1.get(44)) if pv1 is not None else None
    end = parse_ts(pv1.get(45)) if pv1 is not None else None
    if start is None and trigger in ("A01", "A04"):
        start = event
    if end is None and trigger == "A03":
        end = event
    if trigger == "A08":
        status = "finished" if end is not None else "in-progress"
    else:
        status = _STATUS[trigger]

    enc: Resource = {
        "resourceType": "Encounter",
        "status": status,
        "class": encounter_class(pv1),
        "subject": entries.patient,
    }
    entries.add(enc)  # right after the Patient; filled in below
    if pv1 is None:
        return event
    visit = pv1.first(19)
    if visit.comp(1).strip():
        enc["identifier"] = [
            {
                "use": "usual",
                "system": entries.local_system("visit"),
                "value": visit.comp(1).strip(),
            }
        ]
    period: Resource = {}
    if start is not None:
        period["start"] = start.fhir()
    if end is not None:
        period["end"] = end.fhir()
    if period:
        enc["period"] = period
    participants = []
    for field_no, code, display in _PARTICIPANTS:
        for xcn in pv1.reps(field_no):
            ref = entries.practitioner(xcn)
            if ref is not None:
                role = {"system": PARTICIPATION, "code": code, "display": display}
                participants.append({"type": [{"coding": [role]}], "individual": ref})
    if participants:
        enc["participant"] = participants
    if pv2 is not None:
        reason = entries.codeable(pv2.first(3))
        if reason:
            enc["reasonCode"] = [reason]
    hospitalization: Resource = {}
    admit_source = pv1.get(14).strip()
    if admit_source:
        hospitalization["admitSource"] = _v2_code("0023", admit_source)
    disposition = pv1.get(36).strip()
    if disposition:
        hospitalization["dischargeDisposition"] = _v2_code("0112", disposition)
    if hospitalization:
        enc["hospitalization"] = hospitalization
    locations = []
    current = _location(pv1.first(3), "completed" if status == "finished" else "active")
    if current:
        locations.append(current)
    prior = _location(pv1.first(6), "completed") if trigger == "A02" else None
    if prior:
        locations.append(prior)
    if locations:
        enc["location"] = locations
    return event


def _v2_code(table: str, code: str) -> Resource:
    return {
        "coding": [{"system": f"http://terminology.hl7.org/CodeSystem/v2-{table}", "code": code}]
    }
