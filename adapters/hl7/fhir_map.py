"""HL7 v2 data types -> FHIR R4 data types, shared by the per-message mappings.

Responsibility: TS/DT -> dateTime/instant (Asia/Tehran when the sender gave no
offset), CE/CWE -> CodeableConcept, NM -> Quantity with UCUM when the unit is one,
XCN -> Practitioner (Medical Council number where the source says so), and the
`Entries` list that gives every resource of a record its stable ``urn:uuid``.

Never: change free text (HL7-INTAKE.md rule 7; digits are folded only in numbers,
dates and identifiers); invent a code system URI for a code system we do not know
(an unknown HL7 table 0396 name gets a node-local ``urn:sepas:`` system).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any, Final
from urllib.parse import quote

from adapters.fhir import MEDICAL_COUNCIL_SYSTEM, entry_uuid
from adapters.hl7.er7 import Value
from agent.dates import JALALI_BEFORE_YEAR, TEHRAN, jalali_to_gregorian
from agent.persian import ascii_digits, normalise_name

Resource = dict[str, Any]

UCUM: Final = "http://unitsofmeasure.org"
V3_INTERPRETATION: Final = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DATA_ABSENT_REASON: Final = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"

#: HL7 table 0396 coding-system names with a FHIR URI (FHIR R4 "Using Codes", v2 IG).
_CODE_SYSTEMS: Final = {
    "LN": "http://loinc.org",
    "LOINC": "http://loinc.org",
    "SCT": "http://snomed.info/sct",
    "SNOMEDCT": "http://snomed.info/sct",
    "SNOMED-CT": "http://snomed.info/sct",
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "ICD10": "http://hl7.org/fhir/sid/icd-10",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "UCUM": UCUM,
    "C4": "http://www.ama-assn.org/go/cpt",
    "CPT": "http://www.ama-assn.org/go/cpt",
    "ATC": "http://www.whocc.no/atc",
    "WC": "http://www.whocc.no/atc",
    "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "NDC": "http://hl7.org/fhir/sid/ndc",
    "CVX": "http://hl7.org/fhir/sid/cvx",
}
_HL7_TABLE: Final = re.compile(r"HL7(\d{4})", re.ASCII)

#: XCN.9 assigning authorities (HD.1) and XCN.13 identifier types that say "this id is
#: the Medical Council (نظام پزشکی) number". HL7 table 0203 "MD" is the medical
#: licence number, which in Iran is the Medical Council number.
MEDICAL_COUNCIL_AUTHORITIES: Final = frozenset({"IRIMC", "IMC", "MCI", "NEZAM", "NEZAM-PEZESHKI"})
MEDICAL_COUNCIL_ID_TYPES: Final = frozenset({"MD"})

#: Common laboratory units as written by senders -> their UCUM code. Only units in
#: this table (or units the sender marked as UCUM in CE.3) get the UCUM system: a
#: wrong UCUM code is worse than a unit without one.
_UCUM_UNITS: Final = {
    u.lower(): u
    for u in (
        "%",
        "g/dL",
        "g/L",
        "mg/dL",
        "mg/L",
        "ug/L",
        "ug/dL",
        "ug/mL",
        "ng/mL",
        "ng/dL",
        "ng/L",
        "pg/mL",
        "pg",
        "fL",
        "mol/L",
        "mmol/L",
        "umol/L",
        "nmol/L",
        "pmol/L",
        "meq/L",
        "U/L",
        "U/mL",
        "mU/L",
        "mU/mL",
        "[IU]/L",
        "[IU]/mL",
        "m[IU]/L",
        "m[IU]/mL",
        "u[IU]/mL",
        "10*3/uL",
        "10*6/uL",
        "10*9/L",
        "10*12/L",
        "/uL",
        "/[HPF]",
        "/[LPF]",
        "mm/h",
        "mm[Hg]",
        "s",
        "min",
        "h",
        "d",
        "kg",
        "g",
        "mg",
        "ug",
        "L",
        "dL",
        "mL",
        "uL",
        "mL/min",
        "mOsm/kg",
        "kg/m2",
        "Cel",
        "/min",
        "cm",
        "mm",
    )
}
_UCUM_ALIASES: Final = {
    "iu/l": "[IU]/L",
    "iu/ml": "[IU]/mL",
    "miu/l": "m[IU]/L",
    "miu/ml": "m[IU]/mL",
    "uiu/ml": "u[IU]/mL",
    "µiu/ml": "u[IU]/mL",
    "meq/l": "meq/L",
    "mmhg": "mm[Hg]",
    "mm/hr": "mm/h",
    "sec": "s",
    "µmol/l": "umol/L",
    "µg/l": "ug/L",
    "µg/dl": "ug/dL",
    "µl": "uL",
    "fl": "fL",
    "/hpf": "/[HPF]",
    "/lpf": "/[LPF]",
    "10^3/ul": "10*3/uL",
    "10^6/ul": "10*6/uL",
    "10^9/l": "10*9/L",
    "10^12/l": "10*12/L",
}


@dataclass(frozen=True, slots=True)
class Options:
    """What the mapping takes from an adapter's settings.

    `Hl7MllpSettings` has every field; settings without one (e.g. `Hl7FilesSettings`
    today) get HL7-INTAKE.md's defaults.
    """

    national_id_authority: str = "NOCR"
    national_id_type: str = "NNIRN"
    pathology_obr24: tuple[str, ...] = ("SP", "PAT")

    @classmethod
    def of(cls, settings: object) -> Options:
        d = cls()
        return cls(
            national_id_authority=str(
                getattr(settings, "national_id_authority", d.national_id_authority)
            ),
            national_id_type=str(getattr(settings, "national_id_type", d.national_id_type)),
            pathology_obr24=tuple(getattr(settings, "pathology_obr24", d.pathology_obr24)),
        )


@dataclass(slots=True)
class Entries:
    """The resources of one record, in Bundle order; `add` returns a Reference to one."""

    key: str  # the record id: entry_uuid(key, n) is entry n's fullUrl
    node_id: str
    adapter: str
    resources: list[Resource] = field(default_factory=list)
    _practitioners: dict[tuple[str, ...], dict[str, str]] = field(default_factory=dict)

    def add(self, resource: Resource) -> dict[str, str]:
        self.resources.append(resource)
        return {"reference": entry_uuid(self.key, len(self.resources) - 1)}

    @property
    def patient(self) -> dict[str, str]:
        """Reference to the record's Patient (always entry 0)."""
        return {"reference": entry_uuid(self.key, 0)}

    def local_system(self, *parts: str) -> str:
        """A node-local identifier or code system: ``urn:sepas:<node>:<adapter>:<parts>``.

        Parts from the message are percent-encoded, so they cannot add ``:`` levels.
        """
        tail = ":".join(quote(p, safe="-._~") for p in parts)
        return f"urn:sepas:{self.node_id}:{self.adapter}:{tail}"

    def practitioner(self, xcn: Value) -> dict[str, str] | None:
        """A Practitioner entry for an XCN (added once per message), or None if empty."""
        ident = xcn.comp(1).strip()
        family = xcn.comp(2)  # FN.1 in 2.4+, plain ST before: subcomponent 1 either way
        given = [g for g in (xcn.comp(3), xcn.comp(4)) if g.strip()]
        if not ident and not family.strip() and not given:
            return None
        authority = xcn.comp(9).strip()
        id_type = xcn.comp(13).strip()
        key = (ident, authority, id_type, family, *given)
        if key in self._practitioners:
            return self._practitioners[key]
        res: Resource = {"resourceType": "Practitioner"}
        if ident:
            if (
                authority.upper() in MEDICAL_COUNCIL_AUTHORITIES
                or id_type.upper() in MEDICAL_COUNCIL_ID_TYPES
            ):
                system = MEDICAL_COUNCIL_SYSTEM
            else:
                system = self.local_system(
                    *(("practitioner", authority) if authority else ("staff",))
                )
            res["identifier"] = [{"system": system, "value": ident}]
        name = human_name(family, given, prefix=xcn.comp(6))
        if name:
            res["name"] = [name]
        ref = self.add(res)
        self._practitioners[key] = ref
        return ref

    def coding_system(self, name: str) -> str | None:
        """HL7 table 0396 name -> FHIR system URI; unknown names -> a node-local URN."""
        name = name.strip()
        if not name:
            return None
        known = _CODE_SYSTEMS.get(name.upper())
        if known:
            return known
        table = _HL7_TABLE.fullmatch(name.upper())
        if table:
            return f"http://terminology.hl7.org/CodeSystem/v2-{table[1]}"
        return self.local_system("cs", name)

    def codeable(self, ce: Value) -> Resource | None:
        """CE/CWE/CNE -> CodeableConcept (primary and alternate codes); None if empty."""
        codings = []
        for code_i, text_i, sys_i in ((1, 2, 3), (4, 5, 6)):
            code = ce.comp(code_i).strip()
            if not code:
                continue
            coding: Resource = {}
            system = self.coding_system(ce.comp(sys_i))
            if system:
                coding["system"] = system
            coding["code"] = code
            display = ce.comp(text_i)
            if display.strip():
                coding["display"] = display
            codings.append(coding)
        text = ce.comp(9) or ce.comp(2) or ce.comp(5)  # CWE.9 original text first
        if not codings and not text.strip():
            return None
        out: Resource = {}
        if codings:
            out["coding"] = codings
        if text.strip():
            out["text"] = text
        return out

    def required_codeable(self, ce: Value) -> Resource:
        """As `codeable`, but never None: FHIR requires the element (Observation.code…)."""
        return self.codeable(ce) or absent_codeable()


def absent_codeable() -> Resource:
    """A CodeableConcept the source left empty: only the data-absent-reason extension."""
    return {"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "unknown"}]}


def human_name(family: str, given: Iterable[str], *, prefix: str = "") -> Resource | None:
    """A HumanName with Persian letters folded (ي -> ی, ك -> ک) and ZWNJ kept."""
    fam = normalise_name(family) if family.strip() else ""
    giv = [normalise_name(g) for g in given if g.strip()]
    if not fam and not giv:
        return None
    name: Resource = {}
    if fam:
        name["family"] = fam
    if giv:
        name["given"] = giv
    if prefix.strip():
        name["prefix"] = [normalise_name(prefix)]
    name["text"] = " ".join([*giv, fam]).strip()
    return name


# --- numbers and quantities -----------------------------------------------------------

_NUMBER: Final = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)", re.ASCII)


def parse_number(text: str) -> int | float | None:
    """An HL7 NM as a JSON number: Persian/Arabic-Indic digits and U+066B accepted.

    Integers stay ints (no precision lost); decimals become floats (FHIR decimals
    lose trailing zeros in JSON numbers; the raw message keeps them).
    """
    s = ascii_digits(text).strip().replace("\u066b", ".").replace("\u066c", "")
    if not _NUMBER.fullmatch(s):
        return None
    if "." not in s:
        return int(s)
    try:
        number = float(Decimal(s))
    except (InvalidOperation, ValueError):  # pragma: no cover - the regex rules these out
        return None
    return number if math.isfinite(number) else None


def unit_fields(units: Value) -> Resource:
    """OBX-6 / RXE-5 (CE) -> Quantity unit, system and code."""
    code, text, system = units.comp(1).strip(), units.comp(2).strip(), units.comp(3).strip()
    unit = code or text
    if not unit:
        return {}
    out: Resource = {"unit": text or code}
    if system.upper() == "UCUM" and code:
        out.update(system=UCUM, code=code)
        return out
    ucum = _UCUM_UNITS.get(unit.lower()) or _UCUM_ALIASES.get(unit.lower())
    if ucum:
        out.update(system=UCUM, code=ucum)
    return out


def quantity(value: int | float, units: Value | None = None) -> Resource:
    out: Resource = {"value": value}
    if units is not None:
        out.update(unit_fields(units))
    return out


# --- times --------------------------------------------------------------------------

_TS: Final = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?)?)?)?"
    r"\s*(?:([+-])(\d{2})(\d{2}))?",
    re.ASCII,
)


#: A Jalali year below this (Gregorian 1821) is not a date any record can carry.
_OLDEST_JALALI_YEAR: Final = 1200


@dataclass(frozen=True, slots=True)
class Hl7Time:
    """An HL7 TS/DTM/DT value, with the precision the sender gave."""

    at: datetime  # tz-aware: the sender's offset, else Asia/Tehran
    digits: int  # 4 (year) .. 14 (seconds)
    fraction: str = ""

    def fhir(self) -> str:
        """FHIR dateTime at the same precision (seconds added when only minutes were sent)."""
        if self.digits == 4:
            return f"{self.at.year:04d}"
        if self.digits == 6:
            return f"{self.at.year:04d}-{self.at.month:02d}"
        if self.digits == 8:
            return self.at.date().isoformat()
        return self.instant() or ""

    def instant(self) -> str | None:
        """FHIR instant (needs a time of day); None when the sender gave a date only."""
        if self.digits <= 8:
            return None
        text = self.at.isoformat(timespec="seconds")  # 2025-03-21T09:30:00+03:30
        return f"{text[:19]}.{self.fraction}{text[19:]}" if self.fraction else text

    @property
    def date(self) -> date:
        return self.at.date()


def parse_ts(text: str) -> Hl7Time | None:
    """Parse an HL7 TS/DTM/DT (first component; the v2.3 "^precision" is ignored).

    A year below 1700 is a Jalali date sent where a Gregorian one belongs
    (HL7-INTAKE.md rule 8): it is converted when month and day are present, and
    refused (None) otherwise, so that year 1403 never reaches FHIR as Gregorian.
    Returns None for anything that is not a real date; never raises.
    """
    s = ascii_digits(text).strip()
    m = _TS.fullmatch(s)
    if m is None:
        return None
    year = int(m[1])
    parts = [m[i] for i in range(2, 7)]
    digits = 4 + 2 * sum(1 for p in parts if p is not None)
    month, day, hour, minute, second = (
        int(p) if p is not None else d for p, d in zip(parts, (1, 1, 0, 0, 0), strict=True)
    )
    tz: tzinfo = TEHRAN
    if m[8]:
        minutes = int(m[9]) * 60 + int(m[10])
        if minutes >= 24 * 60:
            return None
        tz = timezone(timedelta(minutes=minutes if m[8] == "+" else -minutes))
    try:
        if year < JALALI_BEFORE_YEAR:
            if digits < 8 or year < _OLDEST_JALALI_YEAR:
                return None
            greg = jalali_to_gregorian(year, month, day)
            year, month, day = greg.year, greg.month, greg.day
        at = datetime(year, month, day, hour, minute, second, tzinfo=tz)
    except ValueError:
        return None
    offset = at.utcoffset()
    if offset is not None and offset.seconds % 60:
        # Tehran's local mean time (+03:25:44, before 1946): RFC 3339 and FHIR offsets
        # have minutes only.
        minutes = round(offset.total_seconds() / 60)
        at = at.replace(tzinfo=timezone(timedelta(minutes=minutes)))
    return Hl7Time(at, digits, (m[7] or "") if digits == 14 else "")


def first_time(*texts: str) -> Hl7Time | None:
    """The first of several candidate fields that parses."""
    for t in texts:
        ts = parse_ts(t) if t else None
        if ts is not None:
            return ts
    return None
