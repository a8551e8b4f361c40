"""FHIR R4 building blocks every adapter shares: the Bundle and its Patient.

PROTOCOL.md: a record's body is a FHIR R4 Bundle of type ``collection`` whose first
entry is the Patient (identifiers, name as decoded Unicode, birth date, gender),
followed by the service's resources, so that every record stands on its own at the
hub. Resources are plain JSON-ready dicts; entries carry ``fullUrl`` as ``urn:uuid:``
derived from the record so that references inside one Bundle resolve and the same
source event always yields the same bytes.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any, Final

from agent.nationalcode import NationalCode
from agent.persian import normalise_name

#: Identifier systems. The Ministry has not published URIs; these are ours, stable
#: within protocol version 1, and the hub maps them.
NATIONAL_ID_SYSTEM: Final = "https://sepas.behdasht.gov.ir/fhir/sid/national-code"
MEDICAL_COUNCIL_SYSTEM: Final = "https://sepas.behdasht.gov.ir/fhir/sid/irimc"
JALALI_BIRTH_DATE_EXT: Final = "https://sepas.behdasht.gov.ir/fhir/StructureDefinition/jalali-date"
NATIONAL_ID_VALID_EXT: Final = (
    "https://sepas.behdasht.gov.ir/fhir/StructureDefinition/national-code-valid"
)

_GENDERS: Final = {"M": "male", "F": "female", "O": "other", "U": "unknown", "A": "other"}


def local_id_system(node_id: str, adapter: str) -> str:
    """The identifier system of a facility's own MRNs: per node and source."""
    return f"urn:sepas:{node_id}:{adapter}:mrn"


def entry_uuid(record_key: str, n: int) -> str:
    """A stable ``urn:uuid:`` for the n-th resource of the record with this key."""
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'sepas:{record_key}:{n}')}"


def gender(code: str | None) -> str | None:
    """HL7 v2 table 0001 / DICOM PatientSex -> FHIR administrative-gender."""
    if not code:
        return None
    return _GENDERS.get(code.strip().upper()[:1], "unknown")


def patient(
    *,
    national: NationalCode | None,
    local_id: str | None = None,
    local_system: str | None = None,
    family: str | None = None,
    given: Sequence[str] = (),
    birth_date: date | None = None,
    birth_date_jalali: str | None = None,
    sex: str | None = None,
) -> dict[str, Any]:
    """A FHIR Patient. Names are folded to Persian letters (ي -> ی, ك -> ک), ZWNJ kept.

    An invalid national code is kept (flagged by an extension), never dropped.
    """
    res: dict[str, Any] = {"resourceType": "Patient"}
    identifiers: list[dict[str, Any]] = []
    if national is not None and national.value:
        identifiers.append(
            {
                "use": "official",
                "system": NATIONAL_ID_SYSTEM,
                "value": national.value,
                "extension": [{"url": NATIONAL_ID_VALID_EXT, "valueBoolean": national.valid}],
            }
        )
    if local_id:
        ident: dict[str, Any] = {"use": "usual", "value": local_id}
        if local_system:
            ident["system"] = local_system
        identifiers.append(ident)
    if identifiers:
        res["identifier"] = identifiers
    fam = normalise_name(family) if family else ""
    giv = [normalise_name(g) for g in given if g and g.strip()]
    if fam or giv:
        name: dict[str, Any] = {"use": "official"}
        if fam:
            name["family"] = fam
        if giv:
            name["given"] = giv
        name["text"] = " ".join([*giv, fam]).strip()
        res["name"] = [name]
    g = gender(sex)
    if g:
        res["gender"] = g
    if birth_date is not None:
        res["birthDate"] = birth_date.isoformat()
    if birth_date_jalali:
        res.setdefault("_birthDate", {})["extension"] = [
            {"url": JALALI_BIRTH_DATE_EXT, "valueString": birth_date_jalali}
        ]
    return res


def bundle(record_key: str, resources: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A ``collection`` Bundle, Patient first. Each resource gets a stable fullUrl; a
    resource may refer to another by ``{"reference": entry_uuid(record_key, n)}``."""
    if not resources or resources[0].get("resourceType") != "Patient":
        raise ValueError("a record's Bundle must start with its Patient")
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": entry_uuid(record_key, n), "resource": dict(res)}
            for n, res in enumerate(resources)
        ],
    }
