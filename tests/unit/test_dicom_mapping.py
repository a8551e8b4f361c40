"""One study -> one imaging-study Record: names, national codes, dates, ids, FHIR R4.

Identifiers are built with pydicom and round-tripped through bytes (as a C-FIND
answer arrives), so the character-set tests decode what was really encoded in UTF-8
(ISO_IR 192) or ISO-8859-6 (ISO_IR 127).
"""

from __future__ import annotations

import datetime as dt
import importlib
import io
import json
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from adapters.dicom import mapping
from adapters.dicom.query import SeriesDetail, StudyDetail
from adapters.fhir import JALALI_BIRTH_DATE_EXT, NATIONAL_ID_SYSTEM, NATIONAL_ID_VALID_EXT
from agent.dates import TEHRAN
from agent.record import BlobRef, Record, Service, dicom_id
from tests.interop.pacs_peers import ARABIC_NAME, PERSIAN_DIGIT_ID, PERSIAN_NAME, make_study

NODE = "FAC-0001"
CAPTURED = dt.datetime(2025, 3, 22, 6, 0, tzinfo=dt.UTC)


def wire(ds: Dataset) -> Dataset:
    """``ds`` encoded to bytes and decoded again, as pynetdicom does with answers."""
    ds = ds.copy()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return dcmread(io.BytesIO(buf.getvalue()), force=True)


def detail_of(datasets: list[Dataset], *, study_keys: dict[str, Any] | None = None) -> StudyDetail:
    """A StudyDetail from make_study datasets: study, series and image identifiers."""
    first = datasets[0]
    study = Dataset()
    for kw in (
        "SpecificCharacterSet", "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
        "StudyDescription", "ReferringPhysicianName", "PatientName", "PatientID",
        "IssuerOfPatientID", "OtherPatientIDsSequence", "PatientBirthDate", "PatientSex",
    ):  # fmt: skip
        if kw in first:
            study[kw] = first[kw]
    for kw, value in (study_keys or {}).items():
        setattr(study, kw, value)
    series: dict[str, tuple[Dataset, list[Dataset]]] = {}
    for ds in datasets:
        s = Dataset()
        for kw in ("SeriesInstanceUID", "SeriesNumber", "Modality", "SeriesDescription",
                   "BodyPartExamined"):  # fmt: skip
            s[kw] = ds[kw]
        i = Dataset()
        for kw in ("SOPInstanceUID", "SOPClassUID", "InstanceNumber"):
            i[kw] = ds[kw]
        series.setdefault(str(ds.SeriesInstanceUID), (s, []))[1].append(i)
    return StudyDetail(
        wire(study), tuple(SeriesDetail(s, tuple(insts)) for s, insts in series.values())
    )


def record(datasets: list[Dataset], **kw: Any) -> Record:
    return mapping.study_record(
        detail_of(datasets, **kw), node_id=NODE, adapter="pacs", captured_at=CAPTURED
    )


def resources(rec: Record) -> tuple[dict[str, Any], dict[str, Any]]:
    entries = rec.body["entry"]
    return entries[0]["resource"], entries[1]["resource"]


# -- names and character sets ---------------------------------------------------------


def test_an_iso_ir_192_name_decodes_to_persian():
    rec = record(make_study(patient_name=PERSIAN_NAME, charset="ISO_IR 192"))
    pat, _ = resources(rec)
    assert pat["name"][0]["family"] == "کریمی"
    assert pat["name"][0]["given"] == ["زهرا"]
    assert pat["name"][0]["text"] == "زهرا کریمی"


def test_an_iso_ir_127_name_decodes_from_iso_8859_6_and_folds_to_persian_letters():
    datasets = make_study(patient_name=ARABIC_NAME, charset="ISO_IR 127")
    study = detail_of(datasets).identifier
    raw = study["PatientName"].value.original_string
    assert raw == ARABIC_NAME.encode("iso8859_6")  # really single-byte Arabic on the wire
    pat, _ = resources(record(datasets))
    assert pat["name"][0]["family"] == "کریمی"  # ك -> ک, ي -> ی
    assert pat["name"][0]["given"] == ["علی"]


def test_the_raw_is_the_study_identifier_as_dicom_json():
    rec = record(make_study())
    assert rec.raw.media_type == "application/dicom+json"
    assert rec.raw.data is not None
    doc = json.loads(rec.raw.data)
    assert doc["0020000D"]["vr"] == "UI"
    assert doc["00100010"]["Value"][0]["Alphabetic"] == PERSIAN_NAME


# -- national codes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "national", "valid"),
    [
        ({"patient_id": PERSIAN_DIGIT_ID}, "0012345679", True),
        ({"patient_id": "٠٠١٢٣٤٥٦٧٩"}, "0012345679", True),  # Arabic-Indic digits
        ({"patient_id": "001-234567-9"}, "0012345679", True),
        ({"patient_id": "0012345678"}, "0012345678", False),  # bad check digit: flagged, kept
        ({"patient_id": "MRN-7781"}, None, False),
        (
            {"patient_id": "MRN-7781", "other_patient_ids": [("۰۰۱۲۳۴۵۶۷۹", "NOCR")]},
            "0012345679",
            True,
        ),
        ({"patient_id": "12345679", "issuer_of_patient_id": "NOCR"}, "12345679", False),
    ],
)
def test_national_codes_are_found_normalised_and_validated(kw, national, valid):
    rec = record(make_study(**kw))
    assert rec.patient is not None
    assert rec.patient.national_id == national
    assert rec.patient.national_id_valid is valid
    pat, _ = resources(rec)
    ids = [i for i in pat.get("identifier", []) if i["system"] == NATIONAL_ID_SYSTEM]
    if national is None:
        assert not ids
    else:
        assert ids[0]["value"] == national
        assert ids[0]["extension"] == [{"url": NATIONAL_ID_VALID_EXT, "valueBoolean": valid}]


def test_the_local_id_keeps_the_patient_id_with_ascii_digits():
    rec = record(make_study(patient_id="MRN-۷۷۸۱"))
    assert rec.patient is not None
    assert rec.patient.local_id == "MRN-7781"


# -- dates ----------------------------------------------------------------------------


def test_occurred_at_is_study_date_and_time_in_tehran():
    rec = record(make_study(study_date="20250321", study_time="093015.25"))
    assert rec.occurred_at == dt.datetime(2025, 3, 21, 9, 30, 15, 250000, tzinfo=TEHRAN)
    _, study = resources(rec)
    assert study["started"] == "2025-03-21T09:30:15.250000+03:30"


def test_a_jalali_study_date_is_converted_and_kept_never_stored_as_gregorian():
    rec = record(make_study(study_date="14040101", study_time="1000"))
    assert rec.occurred_at == dt.datetime(2025, 3, 21, 10, 0, tzinfo=TEHRAN)
    _, study = resources(rec)
    assert study["started"].startswith("2025-03-21")
    assert study["_started"]["extension"][0]["valueString"] == "14040101"


def test_a_jalali_date_that_does_not_exist_gives_no_started_date():
    rec = record(make_study(study_date="14041230"))  # 1404 is not a leap year
    _, study = resources(rec)
    assert "started" not in study
    assert study["_started"]["extension"][0]["valueString"] == "14041230"
    assert rec.occurred_at == CAPTURED.astimezone(TEHRAN)


def test_a_jalali_birth_date_is_converted_and_kept():
    pat, _ = resources(record(make_study(birth_date="13620704")))
    assert pat["birthDate"] == "1983-09-26"
    assert pat["_birthDate"]["extension"] == [
        {"url": JALALI_BIRTH_DATE_EXT, "valueString": "13620704"}
    ]


@pytest.mark.parametrize(
    ("tm", "expected"),
    [("09", dt.time(9)), ("0930", dt.time(9, 30)), ("09:30:15", dt.time(9, 30, 15)),
     ("093015.5", dt.time(9, 30, 15, 500000)), ("2561", None), ("", None)],
)  # fmt: skip
def test_dicom_times_are_parsed_in_every_form_the_standard_allows(tm, expected):
    assert mapping.parse_tm(tm) == expected


# -- the ImagingStudy -----------------------------------------------------------------


def test_the_body_is_a_bundle_with_the_patient_first_and_the_imaging_study():
    datasets = make_study(series=2, instances=3, accession="ACC-9", body_part="CHEST")
    rec = record(datasets)
    assert rec.service is Service.IMAGING_STUDY
    assert rec.source.ref == str(datasets[0].StudyInstanceUID)
    assert rec.source.kind == "dicom"
    pat, study = resources(rec)
    assert pat["resourceType"] == "Patient"
    assert study["resourceType"] == "ImagingStudy"
    # Required by R4: status, subject; series.uid + modality; instance uid + sopClass.
    assert study["status"] == "available"
    assert study["subject"] == {"reference": rec.body["entry"][0]["fullUrl"]}
    assert study["identifier"][0] == {
        "system": "urn:dicom:uid",
        "value": f"urn:oid:{datasets[0].StudyInstanceUID}",
    }
    assert study["identifier"][1]["value"] == "ACC-9"
    assert study["numberOfSeries"] == 2
    assert study["numberOfInstances"] == 6
    assert study["referrer"] == {"display": "Ali Rahimi"}
    assert study["modality"] == [{"system": mapping.DCM_SYSTEM, "code": "CT"}]
    for n, series in enumerate(study["series"], start=1):
        assert series["uid"]
        assert series["number"] == n
        assert series["modality"] == {"system": mapping.DCM_SYSTEM, "code": "CT"}
        assert series["numberOfInstances"] == 3
        assert series["description"]
        assert series["bodySite"]["code"] == "51185008"
        for i, inst in enumerate(series["instance"], start=1):
            assert inst["uid"]
            assert inst["number"] == i
            assert inst["sopClass"]["code"] == "urn:oid:1.2.840.10008.5.1.4.1.1.2"


def test_a_series_without_modality_is_other_and_an_unknown_body_part_is_text():
    datasets = make_study(body_part="WHOLEBODY")
    for ds in datasets:
        ds.Modality = ""
    _, study = resources(record(datasets))
    assert study["series"][0]["modality"]["code"] == "OT"
    assert study["series"][0]["bodySite"] == {"display": "WHOLEBODY"}


def _fhir_bundle_model() -> Any:
    try:
        return importlib.import_module("fhir.resources.R4B.bundle").Bundle
    except ImportError:
        pytest.skip("fhir.resources (with R4B) is not installed")


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"charset": "ISO_IR 127", "patient_name": ARABIC_NAME},
        {"study_date": "14040101", "birth_date": "13620704"},
        {"series": 3, "instances": 2, "modality": "MR", "body_part": "HEAD"},
        {"patient_id": "bad-id", "sex": "O", "accession": ""},
    ],
)
def test_bodies_validate_as_fhir_r4_imaging_studies(kw):
    """fhir.resources' R4B models; R4B changed nothing in Patient or ImagingStudy."""
    _fhir_bundle_model().model_validate(record(make_study(**kw)).body)


def test_fhir_resources_rejects_an_imaging_study_without_status_or_series_modality():
    model = _fhir_bundle_model()
    body = json.loads(json.dumps(record(make_study()).body))
    del body["entry"][1]["resource"]["series"][0]["modality"]
    with pytest.raises(ValueError, match="modality"):
        model.model_validate(body)
    body = json.loads(json.dumps(record(make_study()).body))
    del body["entry"][1]["resource"]["status"]
    with pytest.raises(ValueError, match="status"):
        model.model_validate(body)


# -- ids ------------------------------------------------------------------------------


def test_ids_are_stable_and_change_when_an_instance_is_added():
    datasets = make_study(series=2, instances=2)
    a = record(datasets)
    b = record(list(reversed(datasets)))  # same content in another order
    assert a.id == b.id
    assert a.to_json() == b.to_json()
    extra = make_study(study_uid=str(datasets[0].StudyInstanceUID), series_offset=2, instances=1)
    c = record(datasets + extra)
    assert c.id != a.id
    pairs = [(str(d.SeriesInstanceUID), str(d.SOPInstanceUID)) for d in datasets + extra]
    assert c.id == dicom_id(NODE, str(datasets[0].StudyInstanceUID), pairs)


def test_blobs_are_listed_on_the_record():
    blob = BlobRef(sha256="a" * 64, media_type="application/dicom", size=10)
    rec = mapping.study_record(
        detail_of(make_study()), node_id=NODE, adapter="pacs", captured_at=CAPTURED, blobs=[blob]
    )
    assert rec.to_wire()["blobs"] == [{"sha256": "a" * 64, "media_type": "application/dicom",
                                       "size": 10}]  # fmt: skip


def test_a_match_without_study_instance_uid_is_rejected_for_quarantine():
    from agent.errors import InputRejectedError

    detail = StudyDetail(Dataset(), ())
    with pytest.raises(InputRejectedError):
        mapping.study_record(detail, node_id=NODE, adapter="pacs", captured_at=CAPTURED)
