"""Orders -> FHIR R4 MedicationRequest (e-prescription) or ServiceRequest (order).

Responsibility: split ORM^O01, OML^O21, RDE^O11/O01 and OMP^O09 into order groups
(an ORC and the segments after it, up to the next ORC) and map each group:
- with RXE or RXO: a MedicationRequest (medication RXE-2/RXO-1, dose RXE-3/4/5 or
  RXO-2/3/4, route RXR-1, quantity RXE-10/11 or RXO-11/12, instructions RXE-7/RXO-7
  verbatim in ``dosageInstruction.text``, prescriber ORC-12, authoredOn ORC-9);
- otherwise: a ServiceRequest (code OBR-4, requester ORC-12/OBR-16, authoredOn ORC-9,
  priority ORC-7.6/TQ1-9/OBR-27.6/OBR-5), with one Specimen per SPM.

Never: change prescription instructions or notes beyond unescaping (HL7-INTAKE.md
rule 7); put patient data in an exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from adapters.hl7.er7 import Message, Segment, Value
from adapters.hl7.fhir_map import (
    Entries,
    Hl7Time,
    Resource,
    absent_codeable,
    first_time,
    parse_number,
    parse_ts,
    quantity,
)

V2_0203: Final = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0162: Final = "http://terminology.hl7.org/CodeSystem/v2-0162"
GTS: Final = "http://terminology.hl7.org/CodeSystem/v3-GTSAbbreviation"
_GTS_CODES: Final = frozenset(
    {"AM", "PM", "BID", "TID", "QID", "QD", "QOD", "WK", "MO"}
    | {"Q1H", "Q2H", "Q3H", "Q4H", "Q6H", "Q8H"}
)
#: HL7 table 0119 (ORC-1 order control) and table 0038 (ORC-5 order status) -> one
#: status vocabulary; `_medication_status`/`_service_status` adapt it per resource.
_CONTROL: Final = {
    "CA": "cancelled",
    "OC": "cancelled",
    "CR": "cancelled",
    "DC": "stopped",
    "OD": "stopped",
    "DR": "stopped",
    "HD": "on-hold",
    "OH": "on-hold",
}
_ORDER_STATUS: Final = {
    "CM": "completed",
    "CA": "cancelled",
    "DC": "stopped",
    "HD": "on-hold",
    "IP": "active",
    "SC": "active",
    "A": "active",
    "ER": "entered-in-error",
}
#: Priority (TQ.6 / TQ1-9 / OBR-5, HL7 table 0027) -> request priority.
_PRIORITY: Final = {"S": "stat", "A": "asap", "R": "routine", "T": "urgent"}
_GROUP_SEGMENTS: Final = frozenset({"ORC", "OBR", "RXO", "RXE", "RXR", "NTE", "SPM", "TQ1"})


@dataclass(slots=True)
class _Order:
    orc: Segment | None
    segments: list[Segment] = field(default_factory=list)

    def find(self, name: str) -> Segment | None:
        return next((s for s in self.segments if s.name == name), None)

    def all(self, name: str) -> list[Segment]:
        return [s for s in self.segments if s.name == name]


def _groups(msg: Message) -> list[_Order]:
    groups: list[_Order] = []
    for seg in msg:
        if seg.name == "ORC":
            groups.append(_Order(seg))
        elif seg.name in _GROUP_SEGMENTS:
            if not groups:
                if seg.name == "NTE":
                    continue  # a note about the patient, before any order
                groups.append(_Order(None))  # an order without its ORC: still mapped
            groups[-1].segments.append(seg)
    return groups


def map_orders(msg: Message, entries: Entries) -> Hl7Time | None:
    """Add a MedicationRequest or ServiceRequest per order; return the ORC-9 time."""
    groups = _groups(msg)
    for order in groups:
        if order.find("RXE") or order.find("RXO"):
            _medication_request(order, entries)
        else:
            _service_request(order, entries)
    return first_time(*(o.orc.get(9) for o in groups if o.orc is not None))


def _status(order: _Order) -> str:
    orc = order.orc
    if orc is None:
        return "active"
    by_status = _ORDER_STATUS.get(orc.get(5).strip().upper())
    if by_status:
        return by_status
    return _CONTROL.get(orc.get(1).strip().upper(), "active")


def _identifiers(order: _Order, entries: Entries) -> list[Resource]:
    out = []
    obr = order.find("OBR")
    for field_no, code in ((2, "PLAC"), (3, "FILL")):
        ei = order.orc.first(field_no) if order.orc is not None else None
        if (ei is None or not ei.comp(1).strip()) and obr is not None:
            ei = obr.first(field_no)
        if ei is not None and ei.comp(1).strip():
            out.append(
                {
                    "type": {"coding": [{"system": V2_0203, "code": code}]},
                    "system": entries.local_system("placer" if code == "PLAC" else "filler"),
                    "value": ei.comp(1).strip(),
                }
            )
    return out


def _common(order: _Order, entries: Entries, res: Resource) -> None:
    """authoredOn, requester, identifiers and notes shared by both request kinds."""
    orc, obr = order.orc, order.find("OBR")
    identifiers = _identifiers(order, entries)
    if identifiers:
        res.setdefault("identifier", []).extend(identifiers)
    authored = parse_ts(orc.get(9)) if orc is not None else None
    if authored is not None:
        res["authoredOn"] = authored.fhir()
    requester = None
    for xcn in orc.reps(12) if orc is not None else []:
        requester = entries.practitioner(xcn)
        if requester:
            break
    if requester is None and obr is not None:
        requester = entries.practitioner(obr.first(16))
    if requester is not None:
        res["requester"] = requester
    notes = [
        {"text": text}
        for nte in order.all("NTE")
        if (text := "\n".join(v.text() for v in nte.reps(3))).strip()
    ]
    if notes:
        res.setdefault("note", []).extend(notes)


def _priority(order: _Order) -> str | None:
    orc, tq1, obr = order.orc, order.find("TQ1"), order.find("OBR")
    candidates = [
        orc.get(7, 6) if orc is not None else "",
        tq1.get(9) if tq1 is not None else "",
        obr.get(27, 6) if obr is not None else "",
        obr.get(5) if obr is not None else "",
    ]
    for c in candidates:
        priority = _PRIORITY.get(c.strip().upper())
        if priority:
            return priority
    return None


# --- MedicationRequest ------------------------------------------------------------------


def _instruction_text(ce: Value) -> str:
    """The text of a CE instruction: CE.2, or the whole repetition when it is plain text."""
    if ce.comp(2).strip():
        return ce.comp(2)
    if len(ce.components()) == 1:
        return ce.text()
    return ce.comp(1)


def _medication_request(order: _Order, entries: Entries) -> None:
    rxe, rxo = order.find("RXE"), order.find("RXO")
    status = _status(order)
    req: Resource = {
        "resourceType": "MedicationRequest",
        "status": status,
        "intent": "order",
        "subject": entries.patient,
    }
    entries.add(req)
    if rxe is not None:
        give, dose_min, dose_max, units = rxe.first(2), rxe.get(3), rxe.get(4), rxe.first(5)
        instructions, dispense, dispense_units = rxe.reps(7), rxe.get(10), rxe.first(11)
        refills, substitution, indications = rxe.get(12), rxe.get(9), rxe.reps(27)
        timing_text = rxe.first(1).comp(2, 1)  # TQ.2 interval, RI.1 repeat pattern
    else:
        assert rxo is not None  # noqa: S101 - map_orders only calls this with one of them
        give, dose_min, dose_max, units = rxo.first(1), rxo.get(2), rxo.get(3), rxo.first(4)
        instructions, dispense, dispense_units = rxo.reps(7), rxo.get(11), rxo.first(12)
        refills, substitution, indications = rxo.get(13), rxo.get(9), rxo.reps(20)
        timing_text = ""
    medication = entries.codeable(give)
    if medication is None and rxo is not None:  # RDE whose RXE-2 is empty: the RXO code
        medication = entries.codeable(rxo.first(1))
    req["medicationCodeableConcept"] = medication or absent_codeable()
    _common(order, entries, req)
    prescription_number = rxe.get(15).strip() if rxe is not None else ""
    if prescription_number:
        req.setdefault("identifier", []).append(
            {"system": entries.local_system("prescription"), "value": prescription_number}
        )

    dosage: Resource = {}
    text = "\n".join(t for t in (_instruction_text(v) for v in instructions) if t.strip())
    if text:
        dosage["text"] = text
    tq1 = order.find("TQ1")
    timing_text = timing_text or (tq1.get(3) if tq1 is not None else "")
    if timing_text.strip():
        code = timing_text.strip().upper()
        dosage["timing"] = {
            "code": {"coding": [{"system": GTS, "code": code}], "text": timing_text.strip()}
            if code in _GTS_CODES
            else {"text": timing_text.strip()}
        }
    rxr = order.find("RXR")
    if rxr is not None:
        route = rxr.first(1)
        concept = entries.codeable(route)
        if concept and route.comp(1).strip() and not route.comp(3).strip():
            concept["coding"][0]["system"] = V2_0162  # RXR-1's default table
        if concept:
            dosage["route"] = concept
    low, high = parse_number(dose_min), parse_number(dose_max)
    if low is not None and high is not None and high != low:
        dosage["doseAndRate"] = [
            {"doseRange": {"low": quantity(low, units), "high": quantity(high, units)}}
        ]
    elif low is not None or high is not None:
        amount = low if low is not None else high
        assert amount is not None  # noqa: S101 - one of them is set
        dosage["doseAndRate"] = [{"doseQuantity": quantity(amount, units)}]
    if dosage:
        req["dosageInstruction"] = [dosage]

    dispense_request: Resource = {}
    amount = parse_number(dispense)
    if amount is not None and amount >= 0:
        dispense_request["quantity"] = quantity(amount, dispense_units)
    repeats = parse_number(refills)
    if isinstance(repeats, int) and repeats >= 0:
        dispense_request["numberOfRepeatsAllowed"] = repeats
    if dispense_request:
        req["dispenseRequest"] = dispense_request
    sub = substitution.strip().upper()
    if sub in ("N", "G", "T"):
        req["substitution"] = {"allowedBoolean": sub != "N"}
    reasons = [c for c in (entries.codeable(v) for v in indications) if c]
    if reasons:
        req["reasonCode"] = reasons
    if rxe is not None:
        special = "\n".join(t for t in (_instruction_text(v) for v in rxe.reps(21)) if t.strip())
        if special:
            req.setdefault("note", []).append({"text": special})


# --- ServiceRequest and Specimen ------------------------------------------------------------


def _service_request(order: _Order, entries: Entries) -> None:
    status = _status(order)
    req: Resource = {
        "resourceType": "ServiceRequest",
        "status": {"cancelled": "revoked", "stopped": "revoked"}.get(status, status),
        "intent": "order",
        "subject": entries.patient,
    }
    ref = entries.add(req)
    obr = order.find("OBR")
    if obr is not None:
        code = entries.codeable(obr.first(4))
        if code:
            req["code"] = code
        reasons = [c for c in (entries.codeable(v) for v in obr.reps(31)) if c]
        if reasons:
            req["reasonCode"] = reasons
    priority = _priority(order)
    if priority:
        req["priority"] = priority
    _common(order, entries, req)
    specimens = [_specimen(spm, entries, ref) for spm in order.all("SPM")]
    if specimens:
        req["specimen"] = specimens


def _specimen(spm: Segment, entries: Entries, request: dict[str, str]) -> dict[str, str]:
    res: Resource = {"resourceType": "Specimen", "subject": entries.patient, "request": [request]}
    ref = entries.add(res)
    eip = spm.first(2)
    identifiers = []
    for n, code in ((1, "PLAC"), (2, "FILL")):
        value = eip.comp(n).strip()  # EIP: placer EI ^ filler EI, EI.1 as subcomponent 1
        if value:
            identifiers.append(
                {
                    "type": {"coding": [{"system": V2_0203, "code": code}]},
                    "system": entries.local_system("specimen"),
                    "value": value,
                }
            )
    if identifiers:
        res["identifier"] = identifiers
    kind = entries.codeable(spm.first(4))
    if kind:
        res["type"] = kind
    collection: Resource = {}
    collected = parse_ts(spm.get(17))
    if collected is not None:
        collection["collectedDateTime"] = collected.fhir()
    site = entries.codeable(spm.first(8))
    if site:
        collection["bodySite"] = site
    if collection:
        res["collection"] = collection
    received = parse_ts(spm.get(18))
    if received is not None:
        res["receivedTime"] = received.fhir()
    return ref
