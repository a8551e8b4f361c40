"""One study (C-FIND identifiers) -> one ``imaging-study`` Record (FHIR R4 ImagingStudy).

Responsibility: the record of a study version: its id (`agent.record.dicom_id`: node,
StudyInstanceUID, and the fingerprint of its (series, instance) UID pairs), its time,
its patient, and its body: a ``collection`` Bundle with the Patient first and one
ImagingStudy (status ``available``; identifier ``urn:oid:<StudyInstanceUID>`` and the
accession number; started; counts; series with uid, number, modality in the DICOM
DCM code system, description, bodySite, counts; instances with uid, sopClass,
number). ``raw`` is the study-level C-FIND identifier as DICOM JSON (PS3.18 F.2),
canonical bytes.

Patient (mirrors HL7-INTAKE.md rule 5 for DICOM), national code, first hit wins: an
OtherPatientIDsSequence item whose IssuerOfPatientID is the national authority
(``NOCR``, the National Organization for Civil Registration); else PatientID when its
IssuerOfPatientID is that authority; else PatientID when it cleans to 10 digits.
Persian and Arabic-Indic digits are normalised; an invalid code is kept and flagged,
never dropped. Names are decoded by pydicom from the identifier's
SpecificCharacterSet (ISO_IR 192, ISO_IR 127, ...) and folded to Persian letters
(`agent.persian.normalise_name`).

Dates: DA values whose year is below 1700 are Jalali (DESIGN.md; HL7-INTAKE.md rule
8): converted to Gregorian for ``occurred_at``/``started``/``birthDate`` and kept as
sent in an extension; a Jalali date that does not exist is never stored as a date.
Times are Asia/Tehran.

Never: raise for bad content from a PACS (a study with odd values still maps; only a
missing StudyInstanceUID is refused, by `InputRejectedError`); log names or IDs.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Any, Final

from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from adapters.dicom.query import StudyDetail, count, instance_order, series_order
from adapters.fhir import (
    JALALI_BIRTH_DATE_EXT,
    bundle,
    entry_uuid,
    local_id_system,
    patient,
)
from agent.dates import JALALI_BEFORE_YEAR, TEHRAN, jalali_to_gregorian
from agent.errors import InputRejectedError
from agent.nationalcode import NationalCode, clean, normalise
from agent.persian import ascii_digits, normalise_name
from agent.record import (
    BlobRef,
    PatientRef,
    RawRef,
    Record,
    Service,
    SourceRef,
    canonical_json,
    dicom_id,
)

KIND: Final = "dicom"
RAW_MEDIA_TYPE: Final = "application/dicom+json"
BLOB_MEDIA_TYPE: Final = "application/dicom"
#: FHIR R4 ImagingStudy: modality codes are DICOM CID 29 in the DCM code system.
DCM_SYSTEM: Final = "http://dicom.nema.org/resources/ontology/DCM"
#: FHIR R4: ImagingStudy.identifier for the Study Instance UID.
DICOM_UID_SYSTEM: Final = "urn:dicom:uid"
#: instance.sopClass: FHIR R4 binds it to the SOP class UIDs as URIs (urn:oid:...).
SOP_CLASS_SYSTEM: Final = "urn:ietf:rfc:3986"
ACCESSION_TYPE: Final = {
    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]
}
SNOMED: Final = "http://snomed.info/sct"
#: BodyPartExamined -> SNOMED CT (PS3.16 annex L, the common ones); others keep the
#: DICOM term as display text only.
BODY_PARTS: Final = {
    "ABDOMEN": ("113345001", "Abdominal structure"),
    "BRAIN": ("12738006", "Brain structure"),
    "BREAST": ("76752008", "Breast structure"),
    "CHEST": ("51185008", "Thoracic structure"),
    "FOOT": ("56459004", "Foot structure"),
    "HAND": ("85562004", "Hand structure"),
    "HEAD": ("69536005", "Head structure"),
    "HEART": ("80891009", "Heart structure"),
    "KNEE": ("72696002", "Knee region structure"),
    "NECK": ("45048000", "Neck structure"),
    "PELVIS": ("12921003", "Pelvic structure"),
    "SKULL": ("89546000", "Bone structure of cranium"),
}
#: IssuerOfPatientID values that mean "this is the national code".
NATIONAL_ISSUERS: Final = frozenset({"NOCR", "IR-NOCR", "NATIONALCODE", "NATIONAL-CODE", "NNIRN"})
JALALI_STARTED_EXT: Final = JALALI_BIRTH_DATE_EXT  # same meaning: the Jalali date as sent

_DIGITS: Final = re.compile(r"\d+", re.ASCII)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip()


def _int(value: object) -> int | None:
    try:
        n = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return n if n >= 0 else None


# -- dates and times ------------------------------------------------------------------


def parse_da(value: str) -> tuple[dt.date | None, str | None]:
    """DA -> (Gregorian date, the Jalali string as sent if it was Jalali).

    ``YYYYMMDD``; ``YYYY.MM.DD`` (ACR-NEMA) and ``YYYY-MM-DD``/``YYYY/MM/DD`` are read
    too. A year below 1700 is Jalali: converted if it exists, else no date.
    """
    sent = value.strip()
    digits = "".join(_DIGITS.findall(ascii_digits(sent)))
    if len(digits) != 8:
        return None, None
    year, month, day = int(digits[:4]), int(digits[4:6]), int(digits[6:])
    if year < JALALI_BEFORE_YEAR:
        try:
            return jalali_to_gregorian(year, month, day), sent
        except ValueError:
            return None, sent
    try:
        return dt.date(year, month, day), None
    except ValueError:
        return None, None


def parse_tm(value: str) -> dt.time | None:
    """TM -> time: ``HH[MM[SS[.FFFFFF]]]``, and the old ``HH:MM:SS``."""
    text = ascii_digits(value.strip()).replace(":", "")
    m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?", text, re.ASCII)
    if m is None:
        return None
    hh, mm, ss = int(m[1]), int(m[2] or 0), int(m[3] or 0)
    us = int((m[4] or "0").ljust(6, "0"))
    if hh > 23 or mm > 59 or ss > 60:
        return None
    return dt.time(hh, mm, min(ss, 59), us)


def study_time(ds: Dataset) -> tuple[dt.datetime | None, str | None]:
    """StudyDate + StudyTime in Asia/Tehran, and the Jalali StudyDate if it was one."""
    day, jalali = parse_da(_text(ds, "StudyDate"))
    if day is None:
        return None, jalali
    t = parse_tm(_text(ds, "StudyTime")) or dt.time()
    return dt.datetime.combine(day, t, TEHRAN), jalali


def _fhir_datetime(t: dt.datetime) -> str:
    return t.isoformat(timespec="microseconds" if t.microsecond else "seconds")


# -- patient --------------------------------------------------------------------------


def national_code(ds: Dataset) -> NationalCode:
    """The patient's national code from a study-level identifier (rule in the header)."""
    candidates: list[str] = []
    for item in ds.get("OtherPatientIDsSequence") or ():
        if _text(item, "IssuerOfPatientID").upper() in NATIONAL_ISSUERS:
            candidates.append(_text(item, "PatientID"))
    pid = _text(ds, "PatientID")
    if _text(ds, "IssuerOfPatientID").upper() in NATIONAL_ISSUERS:
        candidates.append(pid)
    cleaned = clean(pid)
    if len(cleaned) == 10 and cleaned.isascii() and cleaned.isdigit():
        candidates.append(cleaned)
    for candidate in candidates:
        code = normalise(candidate)
        if code.value is not None:
            return code
    return NationalCode(None, False)


def _name_parts(value: object) -> tuple[str, list[str]]:
    if not value:
        return "", []
    pn = value if isinstance(value, PersonName) else PersonName(str(value))
    # The alphabetic group; a PACS that filled only the ideographic one still names
    # the patient.
    group = pn.alphabetic or pn.ideographic or pn.phonetic
    parts = (str(group).split("^") + [""] * 5)[:5]
    family, given, middle, _prefix, _suffix = (p.strip() for p in parts)
    return family, [g for g in (given, middle) if g]


def _person_display(value: object) -> str:
    family, given = _name_parts(value)
    return normalise_name(" ".join([*given, family])) if family or given else ""


def patient_resource(
    ds: Dataset, national: NationalCode, *, node_id: str, adapter: str
) -> dict[str, Any]:
    family, given = _name_parts(ds.get("PatientName"))
    birth, birth_jalali = parse_da(_text(ds, "PatientBirthDate"))
    local = ascii_digits(_text(ds, "PatientID")) or None
    return patient(
        national=national,
        local_id=local,
        local_system=local_id_system(node_id, adapter),
        family=family,
        given=given,
        birth_date=birth,
        birth_date_jalali=birth_jalali,
        sex=_text(ds, "PatientSex") or None,
    )


# -- the ImagingStudy -----------------------------------------------------------------


def _body_site(term: str) -> dict[str, Any] | None:
    term = term.strip().upper()
    if not term:
        return None
    known = BODY_PARTS.get(term)
    if known is None:
        return {"display": term}
    return {"system": SNOMED, "code": known[0], "display": known[1]}


def _series(s: Any) -> dict[str, Any]:
    ident = s.identifier
    out: dict[str, Any] = {"uid": s.uid}
    number = _int(ident.get("SeriesNumber"))
    if number is not None:
        out["number"] = number
    # R4: series.modality is 1..1. A series the PACS gave no modality is "OT" (Other).
    out["modality"] = {"system": DCM_SYSTEM, "code": _text(ident, "Modality") or "OT"}
    description = _text(ident, "SeriesDescription")
    if description:
        out["description"] = description
    out["numberOfInstances"] = len(s.instances)
    site = _body_site(_text(ident, "BodyPartExamined"))
    if site is not None:
        out["bodySite"] = site
    instances = []
    for inst in sorted(s.instances, key=instance_order):
        uid = _text(inst, "SOPInstanceUID")
        sop_class = _text(inst, "SOPClassUID")
        if not uid or not sop_class:
            # R4: instance.sopClass is 1..1. dcmqrscp returns no SOPClassUID at IMAGE
            # level: the instance is counted (and in the record id) but not listed.
            continue
        entry: dict[str, Any] = {
            "uid": uid,
            "sopClass": {"system": SOP_CLASS_SYSTEM, "code": f"urn:oid:{sop_class}"},
        }
        n = _int(inst.get("InstanceNumber"))
        if n is not None:
            entry["number"] = n
        instances.append(entry)
    if instances:
        out["instance"] = instances
    return out


def imaging_study(
    detail: StudyDetail, *, subject: str, started: dt.datetime | None, jalali: str | None
) -> dict[str, Any]:
    ds = detail.identifier
    res: dict[str, Any] = {"resourceType": "ImagingStudy"}
    identifiers: list[dict[str, Any]] = [
        {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{detail.uid}"}
    ]
    accession = _text(ds, "AccessionNumber")
    if accession:
        identifiers.append({"type": ACCESSION_TYPE, "value": accession})
    res["identifier"] = identifiers
    res["status"] = "available"
    modalities = sorted(detail.modalities or modalities_in_study(ds))
    if modalities:
        res["modality"] = [{"system": DCM_SYSTEM, "code": m} for m in modalities]
    res["subject"] = {"reference": subject}
    if started is not None:
        res["started"] = _fhir_datetime(started)
    if jalali:
        res["_started"] = {"extension": [{"url": JALALI_STARTED_EXT, "valueString": jalali}]}
    referrer = _person_display(ds.get("ReferringPhysicianName"))
    if referrer:
        res["referrer"] = {"display": referrer}
    res["numberOfSeries"] = len(detail.series)
    res["numberOfInstances"] = sum(len(s.instances) for s in detail.series)
    description = _text(ds, "StudyDescription")
    if description:
        res["description"] = description
    if detail.series:
        # Sorted, so that the same study content always gives the same body.
        ordered = sorted(detail.series, key=lambda s: series_order(s.identifier))
        res["series"] = [_series(s) for s in ordered]
    return res


def modalities_in_study(ds: Dataset) -> set[str]:
    """ModalitiesInStudy (CS, multi-valued) as a set; empty if the PACS sent none."""
    value = ds.get("ModalitiesInStudy")
    if value is None or value == "":
        return set()
    values = [value] if isinstance(value, str) else list(value)
    return {str(v).strip() for v in values} - {""}


def raw_json(ds: Dataset) -> bytes:
    """The identifier as DICOM JSON (PS3.18 F.2), canonical bytes.

    An element whose value cannot be expressed (a malformed IS/DS from a PACS) is left
    out rather than failing the study: the mapped body does not depend on it.
    """
    return canonical_json(ds.to_json_dict(suppress_invalid_tags=True))


def study_record(
    detail: StudyDetail,
    *,
    node_id: str,
    adapter: str,
    captured_at: dt.datetime,
    blobs: Sequence[BlobRef] = (),
) -> Record:
    """The Record of one study version.

    Raises:
        InputRejectedError: the identifier has no StudyInstanceUID.
    """
    if not detail.uid:
        raise InputRejectedError("a C-FIND match without StudyInstanceUID")
    ds = detail.identifier
    rid = dicom_id(node_id, detail.uid, detail.instance_uids())
    national = national_code(ds)
    started, jalali = study_time(ds)
    pat = patient_resource(ds, national, node_id=node_id, adapter=adapter)
    study = imaging_study(detail, subject=entry_uuid(rid, 0), started=started, jalali=jalali)
    local = ascii_digits(_text(ds, "PatientID")) or None
    return Record(
        id=rid,
        service=Service.IMAGING_STUDY,
        occurred_at=started if started is not None else captured_at.astimezone(TEHRAN),
        captured_at=captured_at,
        source=SourceRef(adapter=adapter, kind=KIND, ref=detail.uid),
        patient=PatientRef(
            national_id=national.value, national_id_valid=national.valid, local_id=local
        ),
        body=bundle(rid, [pat, study]),
        raw=RawRef.of(raw_json(ds), RAW_MEDIA_TYPE),
        blobs=tuple(blobs),
    )


def declared_counts(ds: Dataset) -> tuple[int | None, int | None]:
    """(NumberOfStudyRelatedSeries, NumberOfStudyRelatedInstances) if the PACS sent them."""
    return count(ds, "NumberOfStudyRelatedSeries"), count(ds, "NumberOfStudyRelatedInstances")
