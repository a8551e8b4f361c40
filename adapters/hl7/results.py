"""ORU^R01 -> FHIR R4 DiagnosticReport(s) and Observations (lab-result, pathology-report).

Responsibility: each OBR becomes a DiagnosticReport (code OBR-4, status OBR-25,
effective OBR-7, issued OBR-22) whose ``result`` lists one Observation per OBX after
it (code OBX-3, value by OBX-2, unit OBX-6, reference range OBX-7, interpretation
OBX-8, status OBX-11); NTE after an OBX becomes that Observation's note. When every
OBR-24 is one of the adapter's ``pathology_obr24`` values the record is a
pathology-report: its reports carry the pathology category and the report text,
verbatim, in ``conclusion`` and as a text/plain ``presentedForm``.

Never: change ST/TX/FT text beyond unescaping (HL7-INTAKE.md rule 7: Persian digits,
U+066B, ZWNJ and punctuation stay exactly as sent); refuse a message because a value
does not parse (it is kept as text instead).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Final

from adapters.hl7.er7 import Message, Segment, Value
from adapters.hl7.fhir_map import (
    V3_INTERPRETATION,
    Entries,
    Hl7Time,
    Options,
    Resource,
    first_time,
    parse_number,
    parse_ts,
    quantity,
    unit_fields,
)
from agent.persian import ascii_digits
from agent.record import Service

V2_0074: Final = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0203: Final = "http://terminology.hl7.org/CodeSystem/v2-0203"
OBSERVATION_CATEGORY: Final = "http://terminology.hl7.org/CodeSystem/observation-category"
#: R5's DiagnosticReport.note, used in R4 through the standard cross-version extension.
REPORT_NOTE_EXT: Final = (
    "http://hl7.org/fhir/5.0/StructureDefinition/extension-DiagnosticReport.note"
)
PATHOLOGY_LOINC: Final = {"system": "http://loinc.org", "code": "LP7839-6", "display": "Pathology"}

#: HL7 table 0085 (OBX-11) -> Observation.status.
_OBX_STATUS: Final = {
    "F": "final",
    "U": "final",  # status changed to final without retransmitting results
    "C": "corrected",
    "A": "amended",
    "P": "preliminary",
    "R": "preliminary",  # entered, not verified
    "S": "preliminary",  # partial
    "I": "registered",  # specimen in lab, results pending
    "O": "registered",  # order detail only
    "D": "entered-in-error",  # deletes the prior result
    "W": "entered-in-error",  # posted to the wrong patient
    "X": "cancelled",  # results cannot be obtained
    "N": "cancelled",  # not asked
}
#: HL7 table 0123 (OBR-25) -> DiagnosticReport.status.
_OBR_STATUS: Final = {
    "O": "registered",
    "I": "registered",
    "S": "partial",
    "A": "partial",
    "P": "preliminary",
    "R": "preliminary",
    "C": "corrected",
    "M": "corrected",
    "F": "final",
    "X": "cancelled",
}
#: v3 ObservationInterpretation codes that HL7 table 0078 shares (OBX-8).
_INTERPRETATIONS: Final = frozenset(
    {"L", "H", "LL", "HH", "<", ">", "N", "A", "AA", "U", "D", "B", "W", "S", "R", "I"}
    | {"MS", "VS", "NEG", "POS", "IND", "DET", "ND", "E", "EX", "HX", "LX", "HU", "LU"}
    | {"NCL", "NS", "QCF", "RR", "SDD", "SYN-R", "SYN-S", "TOX", "CAR", "EXP", "IE"}
)
_COMPARATORS: Final = frozenset({"<", "<=", ">", ">="})
_NUM: Final = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_RANGE: Final = re.compile(rf"\s*({_NUM})\s*[-\u2013\u2014]\s*({_NUM})\s*", re.ASCII)
_BOUND: Final = re.compile(rf"\s*(<=|>=|<|>|\u2264|\u2265)\s*({_NUM})\s*", re.ASCII)
_TEXT_TYPES: Final = frozenset({"ST", "TX", "FT"})
_CODED_TYPES: Final = frozenset({"CE", "CWE", "CNE", "CF"})
_MEDIA: Final = {
    "PDF": "application/pdf",
    "JPEG": "image/jpeg",
    "JPG": "image/jpeg",
    "PNG": "image/png",
    "TIFF": "image/tiff",
    "GIF": "image/gif",
    "RTF": "application/rtf",
    "HTML": "text/html",
    "XML": "application/xml",
    "PLAIN": "text/plain",
    "TEXT": "text/plain",
}


def map_oru(msg: Message, entries: Entries, opts: Options) -> tuple[Service, Hl7Time | None]:
    """Add the DiagnosticReports and Observations of an ORU^R01; return (service, OBR-7)."""
    pathology_codes = {p.strip().upper() for p in opts.pathology_obr24}
    obrs = msg.all("OBR")
    pathology = bool(obrs) and all(o.get(24).strip().upper() in pathology_codes for o in obrs)
    service = Service.PATHOLOGY_REPORT if pathology else Service.LAB_RESULT

    report: _Report | None = None
    reports: list[_Report] = []
    last_obs: Resource | None = None
    for seg in msg:
        if seg.name == "OBR":
            report = _Report(seg, entries, seg.get(24).strip().upper() in pathology_codes)
            reports.append(report)
            last_obs = None
        elif seg.name == "OBX":
            last_obs = _observation(seg, report, entries)
        elif seg.name == "NTE":
            note = _note(seg)
            if note is None:
                continue
            if last_obs is not None:
                last_obs.setdefault("note", []).append(note)
            elif report is not None:
                report.dr.setdefault("extension", []).append(
                    {"url": REPORT_NOTE_EXT, "valueAnnotation": note}
                )
    for rep in reports:
        rep.finish()
    return service, first_time(*(o.get(7) for o in obrs))


def _note(nte: Segment) -> Resource | None:
    text = "\n".join(v.text() for v in nte.reps(3))
    return {"text": text} if text.strip() else None


class _Report:
    """One OBR's DiagnosticReport while its OBX are read."""

    def __init__(self, obr: Segment, entries: Entries, pathology: bool) -> None:
        self.obr = obr
        self.pathology = pathology
        self.observations: list[Resource] = []
        self.texts: list[str] = []
        self.attachments: list[Resource] = []
        section = obr.get(24).strip()
        category = [{"coding": [{"system": V2_0074, "code": section or "LAB"}]}]
        if pathology:
            category[0]["coding"].append(dict(PATHOLOGY_LOINC))
        self.dr: Resource = {
            "resourceType": "DiagnosticReport",
            "status": "unknown",  # set by finish()
            "category": category,
            "code": entries.required_codeable(obr.first(4)),
            "subject": entries.patient,
        }
        identifiers = []
        for field_no, code in ((2, "PLAC"), (3, "FILL")):
            ei = obr.first(field_no)
            if ei.comp(1).strip():
                identifiers.append(
                    {
                        "type": {"coding": [{"system": V2_0203, "code": code}]},
                        "system": entries.local_system("placer" if code == "PLAC" else "filler"),
                        "value": ei.comp(1).strip(),
                    }
                )
        if identifiers:
            self.dr["identifier"] = identifiers
        self.effective = parse_ts(obr.get(7))
        if self.effective is not None:
            self.dr["effectiveDateTime"] = self.effective.fhir()
        issued = parse_ts(obr.get(22))
        if issued is not None and issued.instant():
            self.dr["issued"] = issued.instant()
        entries.add(self.dr)  # before its Observations, so the Bundle reads in order

    def finish(self) -> None:
        status = _OBR_STATUS.get(self.obr.get(25).strip().upper())
        if status is None:
            statuses = {o["status"] for o in self.observations}
            status = statuses.pop() if len(statuses) == 1 else "unknown"
            if status not in ("final", "preliminary", "corrected", "amended", "cancelled"):
                status = "unknown"
        self.dr["status"] = status
        forms = list(self.attachments)
        if self.pathology and self.texts:
            report_text = "\n".join(self.texts)
            self.dr["conclusion"] = report_text
            forms.insert(
                0,
                {
                    "contentType": "text/plain; charset=utf-8",
                    "data": base64.b64encode(report_text.encode("utf-8")).decode("ascii"),
                },
            )
        if forms:
            self.dr["presentedForm"] = forms


def _observation(obx: Segment, report: _Report | None, entries: Entries) -> Resource | None:
    value_type = obx.get(2).strip().upper()
    if value_type == "ED" and report is not None:
        for ed in obx.reps(5):
            attachment = _attachment(ed)
            if attachment is not None:
                report.attachments.append(attachment)
        return None  # R4 Observation has no attachment value; the report presents it
    obs: Resource = {
        "resourceType": "Observation",
        "status": _OBX_STATUS.get(obx.get(11).strip().upper(), "unknown"),
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "laboratory"}]}],
        "code": entries.required_codeable(obx.first(3)),
        "subject": entries.patient,
    }
    effective = parse_ts(obx.get(14)) or (report.effective if report is not None else None)
    if effective is not None:
        obs["effectiveDateTime"] = effective.fhir()
    value = _value(obx, value_type, entries)
    if value:
        obs.update(value)
    ranges = _reference_range(obx)
    if ranges:
        obs["referenceRange"] = ranges
    interpretation = [c for c in (_interpretation(v) for v in obx.reps(8)) if c]
    if interpretation:
        obs["interpretation"] = interpretation
    ref = entries.add(obs)
    if report is not None:
        report.dr.setdefault("result", []).append(ref)
        report.observations.append(obs)
        if "valueString" in obs and value_type in _TEXT_TYPES | {""}:
            report.texts.append(obs["valueString"])
    return obs


def _value(obx: Segment, value_type: str, entries: Entries) -> Resource:
    reps = obx.reps(5)
    if not reps:
        return {}
    first = reps[0]
    units = obx.first(6)
    if value_type in _TEXT_TYPES or not value_type:
        return _string(reps)
    if value_type == "NM":
        return _numeric(first.text(), units) or _string(reps)
    if value_type == "SN":
        return _structured_numeric(first, units) or _string(reps)
    if value_type in _CODED_TYPES:
        concept = entries.codeable(first)
        return {"valueCodeableConcept": concept} if concept else {}
    if value_type in ("DT", "TS", "DTM"):
        ts = parse_ts(first.comp(1))
        return {"valueDateTime": ts.fhir()} if ts is not None else _string(reps)
    if value_type == "TM":
        m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?", ascii_digits(first.comp(1)).strip())
        if m and int(m[1]) < 24 and int(m[2] or 0) < 60 and int(m[3] or 0) < 60:
            return {"valueTime": f"{m[1]}:{m[2] or '00'}:{m[3] or '00'}"}
        return _string(reps)
    return _string(reps)


def _string(reps: list[Value]) -> Resource:
    """Free text, verbatim after unescaping; repetitions are lines (rule 7)."""
    text = "\n".join(v.text() for v in reps)
    return {"valueString": text} if text.strip() else {}


def _numeric(text: str, units: Value) -> Resource | None:
    s = text.strip()
    comparator = next((c for c in ("<=", ">=", "<", ">") if s.startswith(c)), "")
    number = parse_number(s[len(comparator) :])
    if number is None:
        return None
    q = quantity(number, units)
    if comparator:
        q["comparator"] = comparator
    return {"valueQuantity": q}


def _structured_numeric(sn: Value, units: Value) -> Resource | None:
    """SN: comparator ^ num1 ^ separator/suffix ^ num2 (HL7 v2 2.A.74)."""
    comparator, sep = sn.comp(1).strip(), sn.comp(3).strip()
    num1, num2 = parse_number(sn.comp(2)), parse_number(sn.comp(4))
    if num1 is None:
        return None
    if not sep and num2 is None:
        if comparator in ("", "="):
            return {"valueQuantity": quantity(num1, units)}
        if comparator in _COMPARATORS:
            return {"valueQuantity": {**quantity(num1, units), "comparator": comparator}}
        return None
    if sep == "-" and num2 is not None and not comparator:
        return {"valueRange": {"low": quantity(num1, units), "high": quantity(num2, units)}}
    if sep in (":", "/") and num2 is not None and not comparator:
        return {"valueRatio": {"numerator": {"value": num1}, "denominator": {"value": num2}}}
    return None


def _reference_range(obx: Segment) -> list[Resource]:
    text = obx.text(7)
    if not text.strip():
        return []
    units = unit_fields(obx.first(6))
    rng: Resource = {}
    s = ascii_digits(text).replace("\u066b", ".")
    m = _RANGE.fullmatch(s)
    b = _BOUND.fullmatch(s) if m is None else None
    if m is not None:
        low, high = parse_number(m[1]), parse_number(m[2])
        if low is not None and high is not None:
            rng = {"low": {"value": low, **units}, "high": {"value": high, **units}}
    elif b is not None:
        number = parse_number(b[2])
        if number is not None:
            rng = {("high" if b[1] in ("<", "<=", "\u2264") else "low"): {"value": number, **units}}
    rng["text"] = text  # always the range as sent
    return [rng]


def _interpretation(flag: Value) -> Resource | None:
    code = flag.comp(1).strip()
    if not code:
        return None
    if code.upper() in _INTERPRETATIONS:
        return {"coding": [{"system": V3_INTERPRETATION, "code": code.upper()}], "text": code}
    return {"text": code}


def _attachment(ed: Value) -> Resource | None:
    """ED (source ^ type ^ subtype ^ encoding ^ data) -> Attachment, or None if unreadable."""
    subtype, encoding = ed.comp(3).strip().upper(), ed.comp(4).strip().upper()
    data = "".join(ed.comp(5).split())
    try:
        if encoding in ("BASE64", "B64"):
            raw = base64.b64decode(data, validate=True)
        elif encoding == "HEX":
            raw = bytes.fromhex(data)
        elif encoding in ("A", "ASCII", ""):
            raw = ed.comp(5).encode("utf-8")
        else:
            return None
    except (binascii.Error, ValueError):
        return None
    if not raw:
        return None
    media = _MEDIA.get(subtype) or _MEDIA.get(ed.comp(2).strip().upper())
    media = media or "application/octet-stream"
    return {"contentType": media, "data": base64.b64encode(raw).decode("ascii")}
