"""adapters.hl7.mapping: HL7 v2 messages -> Records with FHIR R4 Bundles.

Every patient here is synthetic: national codes are made with `make_valid` (or broken
on purpose), names come from the list in tests/factories.py.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import logging
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.fhir import (
    JALALI_BIRTH_DATE_EXT,
    MEDICAL_COUNCIL_SYSTEM,
    NATIONAL_ID_SYSTEM,
    NATIONAL_ID_VALID_EXT,
)
from adapters.hl7.fhir_map import UCUM, V3_INTERPRETATION
from adapters.hl7.mapping import SUPPORTED_TYPES, is_supported, map_message, required_segments
from adapters.hl7_files.settings import Hl7FilesSettings
from adapters.hl7_mllp.settings import Hl7MllpSettings
from agent.errors import InputRejectedError
from agent.nationalcode import make_valid
from agent.record import Record, Service, hl7_id

NODE = "FAC-TEST"
ADAPTER = "his"
CAPTURED = datetime(2025, 3, 21, 6, 0, 2, tzinfo=UTC)
TEHRAN = timezone(timedelta(hours=3, minutes=30))

CODE = make_valid("049937089")  # 0499370899, the hand-checked code of test_nationalcode
OTHER_CODE = make_valid("123456789")
THIRD_CODE = make_valid("987654320")
BAD_CHECK = CODE[:9] + str((int(CODE[9]) + 1) % 10)
PERSIAN_CODE = CODE.translate(str.maketrans("0123456789", "۰۱۲۳۴۵۶۷۸۹"))

SETTINGS = Hl7MllpSettings(name=ADAPTER, kind="hl7-mllp")

# Names as an Arabic-keyboard or cp1256 sender types them: Arabic yeh and kaf.
FAMILY_ARABIC_LETTERS = "كريمي"  # -> کریمی
GIVEN_WITH_ZWNJ = "علی\u200cرضا"

MSH_ADT = (
    "MSH|^~\\&|HIS|FAC|SEPAS|NODE|20250321093000||ADT^{trigger}|CTRL-{trigger}|P|2.5|||||||UTF-8"
)
PID = (
    f"PID|1||MRN-7781^^^FAC^MR~{CODE}^^^NOCR^NNIRN||{FAMILY_ARABIC_LETTERS}^{GIVEN_WITH_ZWNJ}"
    "||19800101|M"
)


def seg(name: str, fields: Mapping[int, str]) -> str:
    """A segment with the given fields (1-based) and the ones between left empty."""
    return "|".join([name] + [fields.get(n, "") for n in range(1, max(fields) + 1)])


def er7(*segments: str) -> bytes:
    return ("\r".join(segments) + "\r").encode("utf-8")


def run(raw: bytes, settings: object = SETTINGS, *, adapter: str = ADAPTER) -> Record:
    records = map_message(
        raw.decode("utf-8"),
        raw,
        node_id=NODE,
        adapter=adapter,
        kind="hl7-mllp",
        settings=settings,
        captured_at=CAPTURED,
    )
    assert len(records) == 1
    return records[0]


def resources(rec: Record, kind: str | None = None) -> list[dict[str, Any]]:
    out = [e["resource"] for e in rec.body["entry"]]
    return [r for r in out if kind is None or r["resourceType"] == kind]


def one(rec: Record, kind: str) -> dict[str, Any]:
    found = resources(rec, kind)
    assert len(found) == 1, [r["resourceType"] for r in resources(rec)]
    return found[0]


def national_identifier(pat: Mapping[str, Any]) -> dict[str, Any]:
    return next(i for i in pat.get("identifier", []) if i.get("system") == NATIONAL_ID_SYSTEM)


def resolve(rec: Record, ref: Mapping[str, str]) -> dict[str, Any]:
    return next(e["resource"] for e in rec.body["entry"] if e["fullUrl"] == ref["reference"])


# --- messages of every supported kind --------------------------------------------------


def adt(trigger: str, *extra: str, pv1: str | None = None) -> bytes:
    pv1 = pv1 or seg(
        "PV1",
        {
            1: "1",
            2: "I",
            3: "ICU^12^2^FAC",
            7: "1234^احمدی^محمد^^^دکتر^^^IRIMC",
            10: "MED",
            14: "7",
            19: "V-555",
            44: "20250321090000",
            45: "20250325120000",
        },
    )
    return er7(MSH_ADT.format(trigger=trigger), f"EVN|{trigger}|20250321093000", PID, pv1, *extra)


ORU_LAB = er7(
    "MSH|^~\\&|LIS|FAC|SEPAS|NODE|20250321093000||ORU^R01|LAB-1|P|2.5|||||||UTF-8",
    PID,
    seg(
        "ORC",
        {1: "RE", 2: "PL-1", 3: "FL-1", 5: "CM", 9: "20250321080000"}
        | {12: "1234^احمدی^محمد^^^^^^IRIMC"},
    ),
    seg(
        "OBR",
        {1: "1", 2: "PL-1", 3: "FL-1", 4: "GLU^Glucose^L", 7: "20250321081500"}
        | {22: "20250321093000", 25: "F"},
    ),
    "OBX|1|NM|2345-7^Glucose^LN||5.5|mmol/L|3.9-6.1|H|||F|||20250321082000",
    "NTE|1||ناشتا",
    "OBX|2|ST|NOTE^Comment^L||نتیجه: ۵٫۵ میلی‌مول||||||F",
)

PATHOLOGY = er7(
    "MSH|^~\\&|LIS|FAC|SEPAS|NODE|20250321093000||ORU^R01|PATH-1|P|2.5|||||||UTF-8",
    PID,
    seg(
        "OBR",
        {1: "1", 3: "S-25-001", 4: "88305^Surgical pathology^C4", 7: "20250320100000", 24: "SP"}
        | {25: "F"},
    ),
    "OBX|1|TX|22634-0^Pathology report.gross^LN||نمونه ۲ عدد\\.br\\اندازه ۳٫۵ سانتی‌متر||||||F",
    "OBX|2|FT|22637-3^Pathology report.diagnosis^LN||کارسینوم (درجه ۲)||||||F",
    "OBX|3|ED|PDF^Report^L||^AP^PDF^Base64^" + base64.b64encode(b"%PDF-1.4 x").decode() + "||||||F",
)

RDE = er7(
    "MSH|^~\\&|HIS|FAC|SEPAS|NODE|20250321093000||RDE^O11^RDE_O11|RX-1|P|2.5|||||||UTF-8",
    PID,
    "PV1|1|O",
    seg(
        "ORC",
        {1: "NW", 2: "ORD-1", 7: "^^^^^R", 9: "20250321091500"}
        | {12: "5555^صادقی^زهرا^^^^^^^^^^MD"},
    ),
    seg(
        "RXE",
        {1: "^BID", 2: "1001^Amoxicillin 500 mg cap^IRC", 3: "500", 5: "mg^mg^UCUM", 6: "CAP"}
        | {7: "^روزی ۲ بار، پس از غذا", 9: "N", 10: "20", 11: "CAP^capsule", 12: "2"}
        | {15: "RX-99887"},
    ),
    "RXR|PO^Oral",
    "NTE|1||حساسیت به پنی‌سیلین ندارد",
)

ORM_RX = er7(
    "MSH|^~\\&|HIS|FAC|SEPAS|NODE|20250321093000||ORM^O01|ORMRX-1|P|2.3",
    PID,
    seg("ORC", {1: "NW", 2: "ORD-2", 12: "5555^صادقی^زهرا"}),
    seg(
        "RXO", {1: "2002^Metformin 500 mg^L", 2: "500", 3: "1000", 4: "mg", 7: "^با غذا", 11: "60"}
    ),
)

OML = er7(
    "MSH|^~\\&|HIS|FAC|SEPAS|NODE|20250321093000||OML^O21^OML_O21|OML-1|P|2.5.1|||||||UTF-8",
    PID,
    seg("ORC", {1: "NW", 2: "ORD-3", 9: "20250321091000", 12: "5555^صادقی^زهرا^^^^^^^^^^MD"}),
    "TQ1|1||||||||S",
    "OBR|1|ORD-3||2345-7^Glucose^LN",
    "NTE|1||ناشتا باشد",
    seg(
        "SPM",
        {1: "1", 2: "SP-1&FAC^SP-1F", 4: "BLD^Whole blood^HL70487", 17: "20250321091500"}
        | {18: "20250321092000"},
    ),
)

ORM_GENERAL = er7(
    "MSH|^~\\&|HIS|FAC|SEPAS|NODE|20250321093000||ORM^O01|ORM-1|P|2.4",
    PID,
    seg("ORC", {1: "NW", 2: "ORD-4", 9: "20250321091000"}),
    "OBR|1|ORD-4||71045^Chest X-ray^C4|R",
)

A40 = er7(
    "MSH|^~\\&|HIS|FAC|SEPAS|NODE|20250321093000||ADT^A40^ADT_A39|MRG-1|P|2.5|||||||UTF-8",
    "EVN|A40|20250321093000",
    PID,
    f"MRG|MRN-0001^^^FAC^MR~{OTHER_CODE}^^^NOCR^NNIRN||||||کریمی^علی",
)

CASES = {
    "ADT^A01": (adt("A01"), Service.ADMISSION, ["Patient", "Encounter", "Practitioner"]),
    "ADT^A04": (adt("A04"), Service.ADMISSION, ["Patient", "Encounter", "Practitioner"]),
    "ADT^A03": (adt("A03"), Service.DISCHARGE, ["Patient", "Encounter", "Practitioner"]),
    "ADT^A08": (adt("A08"), Service.ENCOUNTER_UPDATE, ["Patient", "Encounter", "Practitioner"]),
    "ADT^A28": (adt("A28"), Service.PATIENT, ["Patient"]),
    "ADT^A31": (adt("A31"), Service.PATIENT, ["Patient"]),
    "ADT^A40": (A40, Service.PATIENT_MERGE, ["Patient", "Patient"]),
    "ORU^R01": (
        ORU_LAB,
        Service.LAB_RESULT,
        ["Patient", "DiagnosticReport", "Observation", "Observation"],
    ),
    "ORU^R01 pathology": (
        PATHOLOGY,
        Service.PATHOLOGY_REPORT,
        ["Patient", "DiagnosticReport", "Observation", "Observation"],
    ),
    "RDE^O11": (RDE, Service.E_PRESCRIPTION, ["Patient", "MedicationRequest", "Practitioner"]),
    "ORM^O01 RXO": (
        ORM_RX,
        Service.E_PRESCRIPTION,
        ["Patient", "MedicationRequest", "Practitioner"],
    ),
    "OML^O21": (OML, Service.ORDER, ["Patient", "ServiceRequest", "Practitioner", "Specimen"]),
    "ORM^O01": (ORM_GENERAL, Service.ORDER, ["Patient", "ServiceRequest"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_message_type_maps_to_its_service_and_resources(name):
    raw, service, kinds = CASES[name]
    rec = run(raw)
    assert rec.service is service
    assert [r["resourceType"] for r in resources(rec)] == kinds
    assert rec.patient is not None
    assert rec.patient.national_id == CODE
    assert rec.patient.national_id_valid is True
    assert rec.patient.local_id == "MRN-7781"
    assert rec.source.adapter == ADAPTER
    assert rec.source.kind == "hl7-mllp"


# --- the envelope -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_every_body_is_a_collection_bundle_with_the_patient_first(name):
    rec = run(CASES[name][0])
    body = rec.body
    assert body["resourceType"] == "Bundle"
    assert body["type"] == "collection"
    assert body["entry"][0]["resource"]["resourceType"] == "Patient"
    urls = [e["fullUrl"] for e in body["entry"]]
    assert len(set(urls)) == len(urls)
    assert all(u.startswith("urn:uuid:") for u in urls)
    for ref in _references(body):
        assert ref in urls, f"dangling reference {ref}"
    Record.from_json(rec.to_json())  # the envelope survives the wire format


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference":
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


def test_ids_are_deterministic_from_msh10_and_msh7_and_raw_is_kept_byte_exact():
    raw = ORU_LAB
    first, again = run(raw), run(raw)
    assert first.id == again.id == hl7_id(NODE, ADAPTER, "LAB-1", "20250321093000")
    assert first.to_json() == again.to_json()
    assert first.raw.data == raw
    assert first.raw.media_type == "application/hl7-v2"
    assert first.raw.sha256 == hashlib.sha256(raw).hexdigest()
    # The same event with another control id, or captured by another adapter, is another record.
    assert run(raw.replace(b"|LAB-1|", b"|LAB-2|")).id != first.id
    assert run(raw, adapter="lis2").id != first.id
    # LF segment ends: other bytes (kept as sent), the same id and the same body.
    lf = raw.replace(b"\r", b"\n")
    rec_lf = run(lf)
    assert rec_lf.id == first.id
    assert rec_lf.raw.data == lf
    assert rec_lf.body == first.body


def test_occurred_at_is_the_event_time_in_tehran_when_the_sender_gives_no_offset():
    rec = run(adt("A01"))
    assert rec.occurred_at == datetime(2025, 3, 21, 9, 30, tzinfo=TEHRAN)
    assert rec.occurred_at.utcoffset() == timedelta(hours=3, minutes=30)
    assert rec.captured_at == CAPTURED
    lab = run(ORU_LAB)  # OBR-7
    assert lab.occurred_at == datetime(2025, 3, 21, 8, 15, tzinfo=TEHRAN)
    rx = run(RDE)  # ORC-9
    assert rx.occurred_at == datetime(2025, 3, 21, 9, 15, tzinfo=TEHRAN)


def test_occurred_at_keeps_an_offset_the_sender_gave_and_falls_back_to_msh7():
    rec = run(adt("A01").replace(b"EVN|A01|20250321093000", b"EVN|A01|20250321060000+0000"))
    assert rec.occurred_at == datetime(2025, 3, 21, 6, 0, tzinfo=UTC)
    no_evn = run(adt("A01").replace(b"EVN|A01|20250321093000\r", b""))
    assert no_evn.occurred_at == datetime(2025, 3, 21, 9, 30, tzinfo=TEHRAN)


# --- national code (HL7-INTAKE.md rule 5) ----------------------------------------------


def _pid_message(pid: str, settings: object = SETTINGS) -> Record:
    return run(er7(MSH_ADT.format(trigger="A28"), "EVN|A28|20250321093000", pid), settings)


def test_national_code_nnirn_repetition_beats_pid19_beats_pid2():
    mrn, name = "MRN-1^^^FAC^MR", "کریمی^علی"
    nnirn = f"{mrn}~{CODE}^^^X^NNIRN"
    both = _pid_message(seg("PID", {1: "1", 2: THIRD_CODE, 3: nnirn, 5: name, 19: OTHER_CODE}))
    assert both.patient.national_id == CODE
    pid19 = _pid_message(seg("PID", {1: "1", 2: THIRD_CODE, 3: mrn, 5: name, 19: OTHER_CODE}))
    assert pid19.patient.national_id == OTHER_CODE
    pid2 = _pid_message(seg("PID", {1: "1", 2: THIRD_CODE, 3: mrn, 5: name}))
    assert pid2.patient.national_id == THIRD_CODE
    assert pid2.patient.local_id == "MRN-1"
    not_a_code = _pid_message(seg("PID", {1: "1", 2: "EXT-12^^^X", 3: mrn, 5: name}))
    assert not_a_code.patient.national_id is None
    assert not_a_code.patient.national_id_valid is False
    assert not_a_code.patient.local_id == "MRN-1"
    assert "identifier" in one(not_a_code, "Patient")  # the MRN is still there
    # A candidate without digits ("UNKNOWN") is no hit: the next one is used.
    placeholder = f"{mrn}~UNKNOWN^^^NOCR^NNIRN"
    fallthrough = seg("PID", {1: "1", 2: THIRD_CODE, 3: placeholder, 5: name, 19: "N/A"})
    assert _pid_message(fallthrough).patient.national_id == THIRD_CODE


def test_national_code_found_by_assigning_authority_and_by_configured_type():
    by_authority = _pid_message(f"PID|1||MRN-1^^^FAC^MR~{CODE}^^^NOCR||کریمی^علی")
    assert by_authority.patient.national_id == CODE
    custom = Hl7MllpSettings(
        name=ADAPTER, kind="hl7-mllp", national_id_type="NI", national_id_authority="SABT"
    )
    rec = _pid_message(f"PID|1||MRN-1^^^FAC^MR~{OTHER_CODE}^^^SABT~{CODE}^^^NOCR^NNIRN", custom)
    assert rec.patient.national_id == OTHER_CODE
    # The NNIRN repetition is then only a secondary identifier, not the local id.
    assert rec.patient.local_id == "MRN-1"


def test_persian_digits_in_the_national_code_are_normalised():
    rec = _pid_message(f"PID|1||MRN-1^^^FAC^MR~{PERSIAN_CODE}^^^NOCR^NNIRN||کریمی^علی")
    assert rec.patient.national_id == CODE
    assert rec.patient.national_id_valid is True
    assert national_identifier(one(rec, "Patient"))["value"] == CODE


def test_invalid_check_digit_is_flagged_not_dropped():
    rec = _pid_message(f"PID|1||MRN-1^^^FAC^MR~{BAD_CHECK}^^^NOCR^NNIRN||کریمی^علی")
    assert rec.patient.national_id == BAD_CHECK
    assert rec.patient.national_id_valid is False
    ident = national_identifier(one(rec, "Patient"))
    assert ident["value"] == BAD_CHECK
    assert ident["extension"] == [{"url": NATIONAL_ID_VALID_EXT, "valueBoolean": False}]


def test_nine_digit_code_is_flagged_invalid_and_kept_in_the_patient_only():
    nine = CODE[1:]  # a lost leading zero
    rec = _pid_message(f"PID|1||MRN-1^^^FAC^MR~{nine}^^^NOCR^NNIRN||کریمی^علی")
    # PROTOCOL.md: patient.national_id is 10 digits or null; the hub refuses others.
    assert rec.patient.national_id is None
    assert rec.patient.national_id_valid is False
    ident = national_identifier(one(rec, "Patient"))
    assert ident["value"] == nine
    assert ident["extension"][0]["valueBoolean"] is False


def test_settings_without_national_code_fields_use_the_rule_5_defaults():
    files = Hl7FilesSettings(name=ADAPTER, kind="hl7-files", directory="/tmp/in")
    rec = run(ORU_LAB, files)
    assert rec.patient.national_id == CODE
    rec = run(ORU_LAB, SimpleNamespace())
    assert rec.patient.national_id == CODE


# --- names and dates (rules 6 and 8) ----------------------------------------------------


def test_persian_name_is_decoded_folded_and_keeps_zwnj():
    rec = run(adt("A28"))
    name = one(rec, "Patient")["name"][0]
    assert name["family"] == "کریمی"
    assert "\u064a" not in name["family"]
    assert "\u0643" not in name["family"]
    assert name["given"] == [GIVEN_WITH_ZWNJ]
    assert "\u200c" in name["given"][0]


def test_cp1256_message_maps_like_utf8_once_decoded():
    # What a Windows-1256 sender can type: Arabic yeh and kaf, ZWNJ (0x9D); no Persian yeh.
    pid = f"PID|1||{CODE}^^^NOCR^NNIRN||{FAMILY_ARABIC_LETTERS}^علي\u200cرضا"
    raw = er7(MSH_ADT.format(trigger="A28").replace("UTF-8", ""), pid).decode("utf-8")
    rec = map_message(
        raw,
        raw.encode("cp1256"),
        node_id=NODE,
        adapter=ADAPTER,
        kind="hl7-mllp",
        settings=SETTINGS,
        captured_at=CAPTURED,
    )[0]
    name = one(rec, "Patient")["name"][0]
    assert name["family"] == "کریمی"
    assert name["given"] == [GIVEN_WITH_ZWNJ]
    assert rec.raw.data == raw.encode("cp1256")


def test_name_in_v28_family_name_subcomponents_takes_the_surname():
    pid = f"PID|1||MRN-1^^^FAC^MR~{CODE}^^^NOCR^NNIRN||کریمی&&کریمی^علی^محمد~Alias^X"
    rec = _pid_message(pid)
    name = one(rec, "Patient")["name"]
    assert len(name) == 1  # only the first repetition of PID-5
    assert name[0]["family"] == "کریمی"
    assert name[0]["given"] == ["علی", "محمد"]


def test_jalali_birth_date_is_converted_and_the_original_kept():
    rec = _pid_message(f"PID|1||{CODE}^^^NOCR^NNIRN||کریمی^علی||13620704|F")
    pat = one(rec, "Patient")
    assert pat["birthDate"] == "1983-09-26"
    assert pat["_birthDate"]["extension"] == [
        {"url": JALALI_BIRTH_DATE_EXT, "valueString": "13620704"}
    ]
    assert pat["gender"] == "female"


def test_jalali_birth_date_in_persian_digits_and_an_impossible_one():
    rec = _pid_message(f"PID|1||{CODE}^^^NOCR^NNIRN||کریمی^علی||۱۳۶۲۰۷۰۴")
    assert one(rec, "Patient")["birthDate"] == "1983-09-26"
    bad = one(_pid_message(f"PID|1||{CODE}^^^NOCR^NNIRN||کریمی^علی||13621340"), "Patient")
    assert "birthDate" not in bad  # never a made-up date, never year 1362 as Gregorian
    assert bad["_birthDate"]["extension"][0]["valueString"] == "13621340"


@pytest.mark.parametrize(
    ("pid7", "birth", "jalali"),
    [
        ("1362/07/04", "1983-09-26", "1362/07/04"),
        ("۱۳۶۲/۷/۴", "1983-09-26", "۱۳۶۲/۷/۴"),
        ("1362", None, "1362"),
        ("1983-09-26", "1983-09-26", None),
        ("19831326", None, None),
    ],
)
def test_birth_dates_with_separators_and_partial_jalali(pid7, birth, jalali):
    pat = one(_pid_message(f"PID|1||{CODE}^^^NOCR^NNIRN||کریمی^علی||{pid7}"), "Patient")
    assert pat.get("birthDate") == birth
    ext = pat.get("_birthDate", {}).get("extension", [{}])[0].get("valueString")
    assert ext == jalali


def test_gregorian_birth_dates_full_and_partial():
    full = one(_pid_message(f"PID|1||{CODE}^^^NOCR^NNIRN||کریمی^علی||19830926120000"), "Patient")
    assert full["birthDate"] == "1983-09-26"
    assert "_birthDate" not in full
    partial = one(_pid_message(f"PID|1||{CODE}^^^NOCR^NNIRN||کریمی^علی||198309"), "Patient")
    assert partial["birthDate"] == "1983-09"


# --- ADT -------------------------------------------------------------------------------


def test_admission_encounter_has_class_period_location_attending_and_visit_number():
    rec = run(adt("A01"))
    enc = one(rec, "Encounter")
    assert enc["status"] == "in-progress"
    assert enc["class"]["code"] == "IMP"
    assert enc["period"]["start"] == "2025-03-21T09:00:00+03:30"
    assert enc["location"][0]["location"]["display"] == "FAC / ICU / 12 / 2"
    assert enc["identifier"][0]["value"] == "V-555"
    assert resolve(rec, enc["subject"])["resourceType"] == "Patient"
    (attending,) = enc["participant"]
    assert attending["type"][0]["coding"][0]["code"] == "ATND"
    doctor = resolve(rec, attending["individual"])
    assert doctor["identifier"] == [{"system": MEDICAL_COUNCIL_SYSTEM, "value": "1234"}]
    assert doctor["name"][0]["family"] == "احمدی"
    assert doctor["name"][0]["prefix"] == ["دکتر"]


def test_admission_without_pv1_44_starts_at_evn2_and_unknown_class_is_null_flavor():
    pv1 = "PV1|1|Z|ICU"
    enc = one(run(adt("A01", pv1=pv1)), "Encounter")
    assert enc["period"]["start"] == "2025-03-21T09:30:00+03:30"
    assert enc["class"]["code"] == "UNK"


def test_discharge_encounter_is_finished_with_an_end():
    enc = one(run(adt("A03")), "Encounter")
    assert enc["status"] == "finished"
    assert enc["period"]["end"] == "2025-03-25T12:00:00+03:30"


def test_update_without_discharge_time_is_in_progress():
    pv1 = "PV1|1|E|ER^1^1"
    enc = one(run(adt("A08", pv1=pv1)), "Encounter")
    assert enc["status"] == "in-progress"
    assert enc["class"]["code"] == "EMER"
    assert "period" not in enc


def test_doctor_without_medical_council_marker_gets_a_local_staff_identifier():
    pv1 = "PV1|1|O|CLINIC||||777^نوری^سارا"
    rec = run(adt("A04", pv1=pv1))
    doctor = one(rec, "Practitioner")
    assert doctor["identifier"][0]["system"] == f"urn:sepas:{NODE}:{ADAPTER}:staff"


def test_merge_links_the_surviving_patient_to_the_prior_one():
    rec = run(A40)
    survivor, prior = resources(rec, "Patient")
    assert resources(rec)[0] == survivor  # the record's patient is the survivor
    assert rec.patient.national_id == CODE
    (link,) = survivor["link"]
    assert link["type"] == "replaces"
    assert resolve(rec, link["other"]) == prior
    assert prior["active"] is False
    assert prior["link"][0]["type"] == "replaced-by"
    assert resolve(rec, prior["link"][0]["other"]) == survivor
    assert national_identifier(prior)["value"] == OTHER_CODE
    assert {"use": "old", "value": "MRN-0001"}.items() <= prior["identifier"][1].items()
    assert prior["name"][0]["family"] == "کریمی"


def test_merge_without_a_prior_identifier_is_refused():
    raw = A40.replace(f"MRG|MRN-0001^^^FAC^MR~{OTHER_CODE}^^^NOCR^NNIRN".encode(), b"MRG|")
    with pytest.raises(InputRejectedError, match="MRG-1"):
        run(raw)


# --- ORU --------------------------------------------------------------------------------


def test_numeric_result_has_quantity_unit_range_and_flag():
    rec = run(ORU_LAB)
    report = one(rec, "DiagnosticReport")
    glucose, comment = resources(rec, "Observation")
    assert report["status"] == "final"
    assert report["code"]["coding"][0]["code"] == "GLU"
    assert report["effectiveDateTime"] == "2025-03-21T08:15:00+03:30"
    assert report["issued"] == "2025-03-21T09:30:00+03:30"
    assert [resolve(rec, r) for r in report["result"]] == [glucose, comment]
    assert glucose["status"] == "final"
    assert glucose["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "2345-7",
        "display": "Glucose",
    }
    assert glucose["valueQuantity"] == {
        "value": 5.5,
        "unit": "mmol/L",
        "system": UCUM,
        "code": "mmol/L",
    }
    (rng,) = glucose["referenceRange"]
    assert rng["low"]["value"] == 3.9
    assert rng["high"]["value"] == 6.1
    assert rng["low"]["code"] == "mmol/L"
    assert rng["text"] == "3.9-6.1"
    assert glucose["interpretation"][0]["coding"][0] == {"system": V3_INTERPRETATION, "code": "H"}
    assert glucose["effectiveDateTime"] == "2025-03-21T08:20:00+03:30"
    assert glucose["note"] == [{"text": "ناشتا"}]


def test_text_result_is_verbatim_with_persian_digits_decimal_separator_and_zwnj():
    rec = run(ORU_LAB)
    comment = resources(rec, "Observation")[1]
    assert comment["valueString"] == "نتیجه: ۵٫۵ میلی‌مول"  # ۵, U+066B, ZWNJ untouched


@pytest.mark.parametrize(
    ("value", "units", "expected"),
    [
        ("۵٫۵", "mg/dL", {"value": 5.5, "unit": "mg/dL", "system": UCUM, "code": "mg/dL"}),
        (
            "<5",
            "IU/L",
            {"value": 5, "unit": "IU/L", "system": UCUM, "code": "[IU]/L", "comparator": "<"},
        ),
        ("12", "cells^cells^L", {"value": 12, "unit": "cells"}),
        ("7.25", "", {"value": 7.25}),
    ],
)
def test_numeric_values_persian_digits_comparators_and_units(value, units, expected):
    raw = ORU_LAB.replace(b"|5.5|mmol/L|", f"|{value}|{units}|".encode())
    glucose = resources(run(raw), "Observation")[0]
    assert glucose["valueQuantity"] == expected


def test_numeric_value_that_is_not_a_number_is_kept_as_text():
    raw = ORU_LAB.replace(b"|5.5|mmol/L|", "|منفی|mmol/L|".encode())
    assert resources(run(raw), "Observation")[0]["valueString"] == "منفی"


@pytest.mark.parametrize(
    ("sn", "key", "expected"),
    [
        (
            "<^5",
            "valueQuantity",
            {"value": 5, "comparator": "<", "unit": "mmol/L", "system": UCUM, "code": "mmol/L"},
        ),
        (
            "^3^-^5",
            "valueRange",
            {
                "low": {"value": 3, "unit": "mmol/L", "system": UCUM, "code": "mmol/L"},
                "high": {"value": 5, "unit": "mmol/L", "system": UCUM, "code": "mmol/L"},
            },
        ),
        ("^1^:^128", "valueRatio", {"numerator": {"value": 1}, "denominator": {"value": 128}}),
        ("^2^+", "valueString", "^2^+"),
    ],
)
def test_structured_numeric_values(sn, key, expected):
    raw = ORU_LAB.replace(
        b"OBX|1|NM|2345-7^Glucose^LN||5.5|", f"OBX|1|SN|2345-7^Glucose^LN||{sn}|".encode()
    )
    glucose = resources(run(raw), "Observation")[0]
    assert glucose[key] == expected


def test_coded_value_becomes_a_codeable_concept():
    raw = ORU_LAB.replace(
        b"OBX|2|ST|NOTE^Comment^L||",
        "OBX|2|CWE|600-7^Culture^LN||260385009^Negative^SCT^NEG^منفی^L|".encode(),
    )
    value = resources(run(raw), "Observation")[1]["valueCodeableConcept"]
    assert value["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "260385009",
        "display": "Negative",
    }
    assert value["coding"][1]["system"] == f"urn:sepas:{NODE}:{ADAPTER}:cs:L"
    assert value["coding"][1]["display"] == "منفی"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<5", {"high": 5}),
        ("> 10", {"low": 10}),
        ("۳٫۹-۶٫۱", {"low": 3.9, "high": 6.1}),
        ("منفی", {}),
    ],
)
def test_reference_range_forms(text, expected):
    raw = ORU_LAB.replace(b"|mmol/L|3.9-6.1|", f"|mmol/L|{text}|".encode())
    (rng,) = resources(run(raw), "Observation")[0]["referenceRange"]
    assert rng["text"] == text
    assert {k: rng[k]["value"] for k in ("low", "high") if k in rng} == expected


@pytest.mark.parametrize(
    ("obx11", "status"),
    [("F", "final"), ("P", "preliminary"), ("C", "corrected"), ("X", "cancelled"), ("", "unknown")],
)
def test_observation_status_from_obx11(obx11, status):
    raw = ORU_LAB.replace(b"|3.9-6.1|H|||F|", f"|3.9-6.1|H|||{obx11}|".encode())
    assert resources(run(raw), "Observation")[0]["status"] == status


def test_report_status_follows_observations_when_obr25_is_empty():
    raw = ORU_LAB.replace(b"|20250321093000|||F\r", b"|20250321093000|||\r")
    assert one(run(raw), "DiagnosticReport")["status"] == "final"


def test_pathology_report_keeps_the_text_verbatim_in_conclusion_and_presented_form():
    rec = run(PATHOLOGY)
    report = one(rec, "DiagnosticReport")
    expected = "نمونه ۲ عدد\nاندازه ۳٫۵ سانتی‌متر\nکارسینوم (درجه ۲)"
    assert report["conclusion"] == expected
    text_form, pdf_form = report["presentedForm"]
    assert text_form["contentType"] == "text/plain; charset=utf-8"
    assert base64.b64decode(text_form["data"]).decode("utf-8") == expected
    assert pdf_form["contentType"] == "application/pdf"
    assert base64.b64decode(pdf_form["data"]) == b"%PDF-1.4 x"
    codes = {c["code"] for c in report["category"][0]["coding"]}
    assert codes == {"SP", "LP7839-6"}


def test_pathology_sections_are_configurable():
    settings = Hl7MllpSettings(name=ADAPTER, kind="hl7-mllp", pathology_obr24=("CP",))
    assert run(PATHOLOGY, settings).service is Service.LAB_RESULT
    raw = PATHOLOGY.replace(b"||||SP|F", b"||||CP|F")
    assert run(raw, settings).service is Service.PATHOLOGY_REPORT


# --- escapes, Z-segments, versions, repetitions ------------------------------------------


def test_escapes_are_decoded_and_never_split_fields_or_components():
    raw = ORU_LAB.replace(
        b"OBX|2|ST|NOTE^Comment^L||" + "نتیجه: ۵٫۵ میلی‌مول".encode(),
        b"OBX|2|TX|NOTE^Comment^L||a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\\X0D\\g\\.br\\h",
    )
    rec = run(raw)
    comment = resources(rec, "Observation")[1]
    assert comment["valueString"] == "a|b^c&d~e\\f\rg\nh"
    assert comment["status"] == "final"  # OBX-11 is still OBX-11


def test_escaped_delimiters_inside_identifiers_and_names_stay_in_their_component():
    pid = f"PID|1||MRN\\S\\7\\F\\1^^^FAC^MR~{CODE}^^^NOCR^NNIRN||کریمی\\T\\زاده^علی"
    rec = _pid_message(pid)
    assert rec.patient.local_id == "MRN^7|1"
    assert one(rec, "Patient")["name"][0]["family"] == "کریمی&زاده"


def test_an_escape_that_decodes_to_nul_is_refused():
    raw = ORU_LAB.replace(b"|NOTE^Comment^L||", b"|NOTE^Comment^L||a\\X00\\b")
    with pytest.raises(InputRejectedError, match="control character"):
        run(raw)


def test_z_segments_are_tolerated_and_kept_in_raw():
    raw = ORU_LAB.replace(b"\rORC|", "\rZPI|1|۱۴۰۳/۰۱/۰۱|x^y~z\rORC|".encode()) + b"ZZZ|end\r"
    rec = run(raw)
    assert rec.service is Service.LAB_RESULT
    assert len(resources(rec, "Observation")) == 2
    assert b"ZPI|1|" in rec.raw.data


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5.1", "2.6", "2.7", "2.7.1", "2.8"])
def test_versions_2_3_to_2_8_all_map(version):
    raw = ORU_LAB.replace(b"|P|2.5|", f"|P|{version}|".encode())
    rec = run(raw)
    assert rec.service is Service.LAB_RESULT
    assert resources(rec, "Observation")[0]["valueQuantity"]["value"] == 5.5


def test_v27_fifth_encoding_character_is_tolerated():
    raw = ORU_LAB.replace(b"MSH|^~\\&|", b"MSH|^~\\&#|").replace(b"|P|2.5|", b"|P|2.7|")
    raw = raw.replace("نتیجه: ۵٫۵".encode(), "نتیجه# \\P\\".encode())
    comment = resources(run(raw), "Observation")[1]
    assert comment["valueString"] == "نتیجه# # میلی‌مول"


def test_other_delimiters_from_msh1_and_msh2():
    raw = (
        ORU_LAB.replace(b"|", b"!")
        .replace(b"MSH!^~\\&!", b"MSH!$*/%!")
        .replace(b"^", b"$")
        .replace(b"~", b"*")
    )
    rec = run(raw)
    assert rec.patient.national_id == CODE
    assert resources(rec, "Observation")[0]["valueQuantity"]["value"] == 5.5


def test_repeated_fields_text_lines_flags_and_identifiers():
    raw = ORU_LAB.replace(
        b"OBX|2|ST|NOTE^Comment^L||" + "نتیجه: ۵٫۵ میلی‌مول".encode() + b"||||||F",
        "OBX|2|TX|NOTE^Comment^L||خط اول~خط دوم|||H~A|||F".encode(),
    ).replace(b"MRN-7781^^^FAC^MR~", b"INS-1^^^BIMEH^HC~MRN-7781^^^FAC^MR~")
    rec = run(raw)
    comment = resources(rec, "Observation")[1]
    assert comment["valueString"] == "خط اول\nخط دوم"
    assert [i["coding"][0]["code"] for i in comment["interpretation"]] == ["H", "A"]
    assert rec.patient.local_id == "MRN-7781"  # the MR repetition, not the first one
    secondary = [i for i in one(rec, "Patient")["identifier"] if i.get("use") == "secondary"]
    assert [i["value"] for i in secondary] == ["INS-1"]


def test_empty_trailing_fields_and_explicit_nulls():
    raw = ORU_LAB.replace(b"|5.5|mmol/L|3.9-6.1|H|||F|||20250321082000", b'|5.5|""|""||||F|||||||')
    glucose = resources(run(raw), "Observation")[0]
    assert glucose["valueQuantity"] == {"value": 5.5}
    assert "referenceRange" not in glucose


# --- orders ---------------------------------------------------------------------------


def test_prescription_maps_medication_dose_route_quantity_prescriber_and_verbatim_text():
    rec = run(RDE)
    req = one(rec, "MedicationRequest")
    assert req["status"] == "active"
    assert req["intent"] == "order"
    assert req["medicationCodeableConcept"]["coding"][0]["code"] == "1001"
    assert req["authoredOn"] == "2025-03-21T09:15:00+03:30"
    (dosage,) = req["dosageInstruction"]
    assert dosage["text"] == "روزی ۲ بار، پس از غذا"
    assert dosage["route"]["coding"][0]["code"] == "PO"
    assert dosage["route"]["coding"][0]["system"] == "http://terminology.hl7.org/CodeSystem/v2-0162"
    assert dosage["doseAndRate"][0]["doseQuantity"] == {
        "value": 500,
        "unit": "mg",
        "system": UCUM,
        "code": "mg",
    }
    assert dosage["timing"]["code"]["coding"][0]["code"] == "BID"
    assert req["dispenseRequest"]["quantity"]["value"] == 20
    assert req["dispenseRequest"]["numberOfRepeatsAllowed"] == 2
    assert req["substitution"] == {"allowedBoolean": False}
    assert req["note"] == [{"text": "حساسیت به پنی‌سیلین ندارد"}]
    assert {"value": "RX-99887"}.items() <= req["identifier"][-1].items()
    prescriber = resolve(rec, req["requester"])
    assert prescriber["identifier"] == [{"system": MEDICAL_COUNCIL_SYSTEM, "value": "5555"}]


def test_orm_with_rxo_is_a_prescription_with_a_dose_range():
    req = one(run(ORM_RX), "MedicationRequest")
    assert req["dosageInstruction"][0]["text"] == "با غذا"
    assert req["dosageInstruction"][0]["doseAndRate"][0]["doseRange"]["high"]["value"] == 1000
    assert req["dispenseRequest"]["quantity"] == {"value": 60}


@pytest.mark.parametrize(
    ("orc1", "status"), [("CA", "cancelled"), ("DC", "stopped"), ("HD", "on-hold")]
)
def test_prescription_status_from_order_control(orc1, status):
    raw = RDE.replace(b"ORC|NW|", f"ORC|{orc1}|".encode())
    assert one(run(raw), "MedicationRequest")["status"] == status


def test_lab_order_has_code_requester_priority_note_and_specimen():
    rec = run(OML)
    req = one(rec, "ServiceRequest")
    assert req["status"] == "active"
    assert req["intent"] == "order"
    assert req["code"]["coding"][0]["system"] == "http://loinc.org"
    assert req["priority"] == "stat"
    assert req["authoredOn"] == "2025-03-21T09:10:00+03:30"
    assert req["note"] == [{"text": "ناشتا باشد"}]
    assert resolve(rec, req["requester"])["resourceType"] == "Practitioner"
    (spec_ref,) = req["specimen"]
    spec = resolve(rec, spec_ref)
    assert spec["type"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0487",
        "code": "BLD",
        "display": "Whole blood",
    }
    assert spec["collection"]["collectedDateTime"] == "2025-03-21T09:15:00+03:30"
    assert [i["value"] for i in spec["identifier"]] == ["SP-1", "SP-1F"]
    assert resolve(rec, spec["request"][0]) == req


def test_cancelled_general_order_is_revoked():
    raw = ORM_GENERAL.replace(b"ORC|NW|", b"ORC|CA|")
    req = one(run(raw), "ServiceRequest")
    assert req["status"] == "revoked"
    assert req["priority"] == "routine"  # OBR-5


# --- refusals -------------------------------------------------------------------------


def test_unsupported_message_type_is_refused_without_patient_data():
    raw = er7(MSH_ADT.format(trigger="A99"), PID)
    with pytest.raises(InputRejectedError) as err:
        run(raw)
    assert str(err.value) == "unsupported message type ADT^A99"
    assert CODE not in str(err.value)


def test_msh9_that_is_not_a_code_is_not_echoed():
    raw = er7(MSH_ADT.format(trigger="A01").replace("ADT^A01", f"{CODE}^کریمی"), PID)
    with pytest.raises(InputRejectedError) as err:
        run(raw)
    assert CODE not in str(err.value)
    assert "کریمی" not in str(err.value)


@pytest.mark.parametrize("name", ["ADT^A01", "ORU^R01", "RDE^O11", "OML^O21"])
def test_message_type_requiring_pid_without_one_is_refused(name):
    raw = CASES[name][0]
    without = b"\r".join(s for s in raw.split(b"\r") if not s.startswith(b"PID|"))
    with pytest.raises(InputRejectedError, match="without a PID segment"):
        run(without)


def test_two_patients_in_one_message_are_refused():
    raw = ORU_LAB + PID.encode() + b"\r"
    with pytest.raises(InputRejectedError, match="PID segments") as err:
        run(raw)
    assert CODE not in str(err.value)


def test_supported_types_and_required_segments_for_the_intake():
    assert ("ADT", "A01") in SUPPORTED_TYPES
    assert is_supported("oru", "r01")
    assert not is_supported("ADT", "A99")
    assert not is_supported("ACK", "")
    assert required_segments("ADT", "A40") == ("PID", "MRG")
    assert required_segments("ADT", "A01") == ("PID",)
    assert required_segments("ADT", "A99") == ()
    assert all("PID" in required_segments(t, e) for t, e in SUPPORTED_TYPES)


def test_mapping_and_intake_accept_the_same_message_types():
    intake = pytest.importorskip("adapters.hl7.intake")
    accepted = {(t, e) for t, events in intake.MESSAGE_TYPES.items() for e in events}
    assert accepted == set(SUPPORTED_TYPES)


def test_logs_carry_no_patient_data(caplog):
    caplog.set_level(logging.DEBUG)
    run(_nine_digit_message())
    for name in CASES:
        run(CASES[name][0])
    text = "\n".join(
        f"{r.getMessage()} {getattr(r, 'event', '')} {getattr(r, 'warnings', '')}"
        for r in caplog.records
    )
    assert "hl7.national_code_flagged" in text
    assert not re.search(r"\d{9,10}", text)
    assert "کریمی" not in text
    assert "علی" not in text


def _nine_digit_message() -> bytes:
    return er7(MSH_ADT.format(trigger="A28"), f"PID|1||{CODE[1:]}^^^NOCR^NNIRN||کریمی^علی")


_NOISE = st.sampled_from(
    [
        *'|^~\\&#0123456789.-+<> ABCFSTREHNX\r\n"',
        *("۱", "٫", "ی", "\u200c", "\\X0D\\", "\\X00\\", "\\.br\\", "\\F\\", "\\XZZ\\"),
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(list(CASES)),
    edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 2), _NOISE), min_size=1, max_size=12),
)
def test_mutated_messages_map_to_valid_resources_or_are_refused(name, edits):
    """Hostile input: only InputRejectedError, and whatever maps is still valid FHIR."""
    text = list(CASES[name][0].decode("utf-8"))
    for where, op, noise in edits:
        i = min(int(where * len(text)), len(text) - 1)
        if op == 0:
            text.insert(i, noise)
        elif op == 1 and len(text) > 1:
            del text[i]
        else:
            text[i] = noise
    mutated = "".join(text)
    refusal = None
    try:
        records = map_message(
            mutated,
            mutated.encode("utf-8"),
            node_id=NODE,
            adapter=ADAPTER,
            kind="hl7-mllp",
            settings=SETTINGS,
            captured_at=CAPTURED,
        )
    except InputRejectedError as err:
        refusal, records = str(err), []
    assert refusal is None or CODE not in refusal
    for rec in records:
        Record.from_json(rec.to_json())
        for res in resources(rec):
            assert structural_problems(res) == []


# --- FHIR R4 validity ------------------------------------------------------------------

_DATE_TIME = re.compile(r"\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2}))?)?)?")
_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")

#: resourceType -> (required element, allowed values or a type)
_REQUIRED: dict[str, dict[str, Any]] = {
    "Patient": {},
    "Practitioner": {},
    "Specimen": {},
    "Encounter": {
        "status": {
            "planned",
            "arrived",
            "triaged",
            "in-progress",
            "onleave",
            "finished",
            "cancelled",
            "entered-in-error",
            "unknown",
        },
        "class": dict,
    },
    "Observation": {
        "status": {
            "registered",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "cancelled",
            "entered-in-error",
            "unknown",
        },
        "code": dict,
    },
    "DiagnosticReport": {
        "status": {
            "registered",
            "partial",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "appended",
            "cancelled",
            "entered-in-error",
            "unknown",
        },
        "code": dict,
    },
    "MedicationRequest": {
        "status": {
            "active",
            "on-hold",
            "cancelled",
            "completed",
            "entered-in-error",
            "stopped",
            "draft",
            "unknown",
        },
        "intent": {
            "proposal",
            "plan",
            "order",
            "original-order",
            "reflex-order",
            "filler-order",
            "instance-order",
            "option",
        },
        "subject": dict,
        "medicationCodeableConcept": dict,
    },
    "ServiceRequest": {
        "status": {
            "draft",
            "active",
            "on-hold",
            "revoked",
            "completed",
            "entered-in-error",
            "unknown",
        },
        "intent": {
            "proposal",
            "plan",
            "directive",
            "order",
            "original-order",
            "reflex-order",
            "filler-order",
            "instance-order",
            "option",
        },
        "subject": dict,
    },
}
_DATE_TIME_KEYS = {
    "effectiveDateTime",
    "authoredOn",
    "start",
    "end",
    "collectedDateTime",
    "receivedTime",
    "deceasedDateTime",
    "valueDateTime",
}


def structural_problems(res: Mapping[str, Any]) -> list[str]:
    """Required elements, codes and primitive formats of the resources we emit, plus
    FHIR JSON's rules: no nulls, no empty strings, arrays or objects."""
    kind = res.get("resourceType")
    if kind not in _REQUIRED:
        return [f"unexpected resourceType {kind!r}"]
    problems = []
    for key, rule in _REQUIRED[kind].items():
        if key not in res:
            problems.append(f"{kind}.{key} missing")
        elif isinstance(rule, set) and res[key] not in rule:
            problems.append(f"{kind}.{key} = {res[key]!r} not allowed")
        elif isinstance(rule, type) and not isinstance(res[key], rule):
            problems.append(f"{kind}.{key} is not {rule.__name__}")

    def walk(node: Any, path: str) -> None:
        if node is None or node in ("", [], {}):
            problems.append(f"{path} empty")
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}")
                if k in _DATE_TIME_KEYS and not _DATE_TIME.fullmatch(v):
                    problems.append(f"{path}.{k} not a dateTime: {v!r}")
                if k == "issued" and not _INSTANT.fullmatch(v):
                    problems.append(f"{path}.{k} not an instant: {v!r}")
                if (
                    k == "value"
                    and path.endswith(
                        ("Quantity", "low", "high", "quantity", "numerator", "denominator")
                    )
                    and not isinstance(v, int | float)
                ):
                    problems.append(f"{path}.value not a number")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]")

    walk(dict(res), kind)
    if kind == "Observation" and sum(k.startswith("value") for k in res) > 1:
        problems.append("Observation has more than one value[x]")
    for link in res.get("link", []):
        if "other" not in link or "type" not in link:
            problems.append("Patient.link needs other and type")
    return problems


@pytest.mark.parametrize("name", list(CASES))
def test_every_resource_has_fhir_r4_required_elements(name):
    rec = run(CASES[name][0])
    for res in resources(rec):
        assert structural_problems(res) == []


def test_structural_check_catches_what_it_should():
    assert structural_problems({"resourceType": "Observation", "code": {"text": "x"}}) == [
        "Observation.status missing"
    ]
    bad = {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "subject": {},
    }
    assert "MedicationRequest.medicationCodeableConcept missing" in structural_problems(bad)
    assert "MedicationRequest.subject empty" in structural_problems(bad)


def _fhir_r4b_bundle() -> Any:
    try:
        return importlib.import_module("fhir.resources.R4B.bundle").Bundle
    except ImportError:
        pytest.skip("fhir.resources (with R4B) is not installed")


@pytest.mark.parametrize("name", list(CASES))
def test_every_body_validates_with_fhir_resources(name):
    """fhir.resources' R4B models (R4B changed none of the resources emitted here)."""
    bundle_model = _fhir_r4b_bundle()
    bundle_model.model_validate(run(CASES[name][0]).body)


def test_fhir_resources_rejects_an_observation_without_status():
    bundle_model = _fhir_r4b_bundle()
    body = run(ORU_LAB).body
    broken = {**body, "entry": [dict(e) for e in body["entry"]]}
    obs = dict(broken["entry"][2]["resource"])
    del obs["status"]
    broken["entry"][2] = {**broken["entry"][2], "resource": obs}
    with pytest.raises(ValueError, match="status"):
        bundle_model.model_validate(broken)


# --- the shared corpus -------------------------------------------------------------------


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _corpus_valid() -> tuple[Any, ...]:
    corpus = pytest.importorskip("tests.hl7corpus")
    return tuple(corpus.VALID)


def test_every_valid_corpus_message_maps_as_the_corpus_expects():
    intake = importlib.import_module("adapters.hl7.intake")
    cases = _corpus_valid()
    assert len(cases) >= 30
    for case in cases:
        text = intake.decode(case.message, "cp1256")
        records = map_message(
            text,
            case.message,
            node_id=NODE,
            adapter=ADAPTER,
            kind="hl7-mllp",
            settings=SETTINGS,
            captured_at=CAPTURED,
        )
        assert len(records) == 1, case.name
        rec = records[0]
        assert rec.raw.data == case.message, case.name
        assert rec.source.ref == case.control_id, case.name
        for res in resources(rec):
            assert structural_problems(res) == [], case.name
        Record.from_json(rec.to_json())
        exp = case.expect
        pat = resources(rec)[0]
        if "service" in exp:
            assert rec.service.value == exp["service"], case.name
        if "national_id" in exp:
            assert rec.patient.national_id == exp["national_id"], case.name
        if "national_id_valid" in exp:
            assert rec.patient.national_id_valid is exp["national_id_valid"], case.name
        if "national_id_nine_digits" in exp:
            assert rec.patient.national_id is None, case.name
            assert rec.patient.national_id_valid is False, case.name
            assert national_identifier(pat)["value"] == exp["national_id_nine_digits"]
        if "family" in exp:
            assert pat["name"][0]["family"] == exp["family"], case.name
        if "given" in exp:
            assert pat["name"][0]["given"][0] == exp["given"], case.name
        if "birth_date" in exp:
            assert pat["birthDate"] == exp["birth_date"], case.name
        if "birth_date_jalali" in exp:
            ext = pat["_birthDate"]["extension"][0]
            assert ext["valueString"] == exp["birth_date_jalali"], case.name
        for key in ("text", "unescaped"):
            if key in exp:
                assert exp[key] in set(_strings(rec.body)), (case.name, key)


def test_corpus_messages_across_cases_get_distinct_ids():
    intake = importlib.import_module("adapters.hl7.intake")
    ids = set()
    cases = _corpus_valid()
    for case in cases:
        text = intake.decode(case.message, "cp1256")
        rec = map_message(
            text,
            case.message,
            node_id=NODE,
            adapter=ADAPTER,
            kind="hl7-mllp",
            settings=SETTINGS,
            captured_at=CAPTURED,
        )[0]
        ids.add(rec.id)
    # Same node, adapter and MSH-7 everywhere: one id per control id (MSH-10).
    assert len(ids) == len({c.control_id for c in cases})
