"""agent.record: the RECORD envelope of PROTOCOL.md, canonical JSON and the id recipes."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone, tzinfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import record
from agent.record import (
    BlobRef,
    PatientRef,
    RawRef,
    Record,
    Service,
    SourceRef,
    canonical_json,
    dicom_id,
    hl7_id,
    sql_id,
)

TEHRAN_OFFSET = timezone(timedelta(hours=3, minutes=30))
HL7 = b"MSH|^~\\&|HIS|FAC|SEPAS|NODE|20250321093000||ADT^A04|MSG00001|P|2.5\r"


def make_record(**overrides) -> Record:
    fields = {
        "id": hl7_id("FAC-0001", "lis", "MSG00001", "20250321093000"),
        "service": Service.LAB_RESULT,
        "occurred_at": datetime(2025, 3, 21, 9, 30, tzinfo=TEHRAN_OFFSET),
        "captured_at": datetime(2025, 3, 21, 6, 0, 2, tzinfo=UTC),
        "source": SourceRef(adapter="lis", kind="hl7-mllp", ref="MSG00001"),
        "patient": PatientRef(national_id="0499370899", national_id_valid=True, local_id="MRN-1"),
        "body": {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": {"resourceType": "Patient", "name": [{"family": "کریمی"}]}}],
        },
        "raw": RawRef.of(HL7, "application/hl7-v2"),
    }
    fields.update(overrides)
    return Record(**fields)


# --- canonical JSON ------------------------------------------------------------------


def test_canonical_json_sorts_keys_has_no_whitespace_and_keeps_persian_as_utf8():
    out = canonical_json({"b": "علی\u200cرضا", "a": [1, {"d": None, "c": True}]})
    assert out == '{"a":[1,{"c":true,"d":null}],"b":"علی\u200cرضا"}'.encode()
    assert b"\\u" not in out


def test_canonical_json_does_not_depend_on_key_order():
    body1 = {"x": 1, "y": {"p": "۱", "q": "ک"}}
    body2 = {"y": {"q": "ک", "p": "۱"}, "x": 1}
    assert make_record(body=body1).to_json() == make_record(body=body2).to_json()


def test_canonical_json_never_emits_nan_or_infinity_tokens():
    # NaN/Infinity are not JSON; a hub parser would refuse the whole batch. Mappers
    # must not produce them (they parse numbers strictly); if one slips through it
    # becomes null, which is still valid JSON.
    out = canonical_json({"v": float("nan"), "w": float("inf")})
    assert json.loads(out) == {"v": None, "w": None}


def test_canonical_json_matches_the_standard_library_byte_for_byte():
    wire = make_record(body={"b": [1, 2.5, "ی\u200c", None, True], "a": {"z": 0, "y": "x"}})
    expected = json.dumps(
        wire.to_wire(), ensure_ascii=False, sort_keys=True, separators=(",", ":")
    ).encode()
    assert canonical_json(wire.to_wire()) == expected


def test_record_json_is_the_same_bytes_every_time_and_carries_persian_unescaped():
    rec = make_record()
    assert rec.to_json() == make_record().to_json()
    assert "کریمی".encode() in rec.to_json()
    assert json.loads(rec.to_json()) == rec.to_wire()


# --- wire round trip -----------------------------------------------------------------

persian_text = st.text(
    alphabet=st.one_of(
        st.characters(min_codepoint=0x0600, max_codepoint=0x06FF),
        st.sampled_from(["\u200c", " ", "ی", "ک", "۰", "٩"]),
        st.characters(codec="utf-8"),
    )
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | persian_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(persian_text, children, max_size=4)
    ),
    max_leaves=12,
)
offsets = st.integers(-12 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
aware = st.builds(
    lambda d, tz: d.replace(tzinfo=tz),
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)),  # noqa: DTZ001
    offsets,
)
hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


@given(
    rec_id=hex64,
    service=st.sampled_from(Service),
    occurred_at=aware,
    captured_at=aware,
    adapter=persian_text,
    ref=persian_text,
    national_id=st.none() | st.text(alphabet="0123456789", min_size=1, max_size=20),
    valid=st.booleans(),
    local_id=st.none() | persian_text,
    with_patient=st.booleans(),
    body=st.dictionaries(persian_text, json_values, max_size=5),
    raw=st.binary(max_size=64),
    include_raw=st.booleans(),
    blobs=st.lists(
        st.builds(BlobRef, sha256=hex64, media_type=persian_text, size=st.integers(0, 2**40)),
        max_size=3,
    ).map(tuple),
)
def test_to_wire_from_wire_round_trips(
    rec_id,
    service,
    occurred_at,
    captured_at,
    adapter,
    ref,
    national_id,
    valid,
    local_id,
    with_patient,
    body,
    raw,
    include_raw,
    blobs,
):
    rec = Record(
        id=rec_id,
        service=service,
        occurred_at=occurred_at,
        captured_at=captured_at,
        source=SourceRef(adapter=adapter, kind="hl7-mllp", ref=ref),
        patient=PatientRef(national_id=national_id, national_id_valid=valid, local_id=local_id)
        if with_patient
        else None,
        body=body,
        raw=RawRef.of(raw, "application/hl7-v2", include=include_raw),
        blobs=blobs,
    )
    again = Record.from_json(rec.to_json())
    assert again == rec
    assert again.to_json() == rec.to_json()
    assert Record.from_wire(rec.to_wire()) == rec
    assert again.occurred_at.utcoffset() == occurred_at.utcoffset()


def test_captured_at_is_sent_in_utc_with_z_and_occurred_at_keeps_its_offset():
    wire = make_record(
        captured_at=datetime(2025, 3, 21, 9, 30, 2, tzinfo=TEHRAN_OFFSET),
    ).to_wire()
    assert wire["occurred_at"] == "2025-03-21T09:30:00+03:30"
    assert wire["captured_at"] == "2025-03-21T06:00:02Z"


def test_occurred_at_from_a_tehran_zone_keeps_plus_0330():
    from agent.dates import TEHRAN

    wire = make_record(occurred_at=datetime(2023, 7, 1, 12, tzinfo=TEHRAN)).to_wire()
    assert wire["occurred_at"] == "2023-07-01T12:00:00+03:30"


def test_wire_omits_raw_data_when_not_included_and_blobs_when_empty():
    wire = make_record(raw=RawRef.of(HL7, "application/hl7-v2", include=False)).to_wire()
    assert "data" not in wire["raw"]
    assert wire["raw"]["sha256"] == hashlib.sha256(HL7).hexdigest()
    assert "blobs" not in wire


def test_service_given_as_string_becomes_the_enum():
    assert make_record(service="imaging-study").service is Service.IMAGING_STUDY


def test_only_imaging_goes_in_the_slow_lane():
    assert {s for s in Service if s.lane == 1} == {Service.IMAGING_STUDY}


# --- validation ----------------------------------------------------------------------


@pytest.mark.parametrize("field", ["occurred_at", "captured_at"])
def test_record_rejects_naive_datetimes(field):
    naive = datetime(2025, 3, 21, 9, 30)  # noqa: DTZ001 - naive on purpose
    with pytest.raises(ValueError, match="timezone-aware"):
        make_record(**{field: naive})


@pytest.mark.parametrize(
    "bad_id",
    ["", "a" * 63, "a" * 65, "A" * 64, "g" * 64, " " + "a" * 63, "٠" * 64],
)
def test_record_rejects_ids_that_are_not_64_lowercase_hex(bad_id):
    with pytest.raises(ValueError, match="64 lower-case hex"):
        make_record(id=bad_id)


def test_unknown_service_is_refused():
    with pytest.raises(ValueError, match="not-a-service"):
        make_record(service="not-a-service")


def test_from_wire_refuses_a_time_without_offset():
    wire = make_record().to_wire()
    wire["occurred_at"] = "2025-03-21T09:30:00"
    with pytest.raises(ValueError, match="offset"):
        Record.from_wire(wire)


class _NoOffset(tzinfo):
    def utcoffset(self, dt):
        return None

    def dst(self, dt):
        return None

    def tzname(self, dt):
        return None


def test_record_rejects_a_tzinfo_that_has_no_offset():
    with pytest.raises(ValueError, match="timezone-aware"):
        make_record(occurred_at=datetime(2025, 3, 21, 9, 30, tzinfo=_NoOffset()))


def test_from_wire_refuses_a_national_id_valid_that_is_not_a_boolean():
    wire = make_record().to_wire()
    wire["patient"]["national_id_valid"] = "false"
    with pytest.raises((TypeError, ValueError)):
        Record.from_wire(wire)


# --- ids -----------------------------------------------------------------------------


def test_hl7_id_is_pinned_to_the_v1_recipe():
    # If this fails, every id changed and the hub's de-duplication breaks (PROTOCOL.md).
    expected = hashlib.sha256(
        b'["sepas-record-id-v1","hl7","FAC-0001","lis","MSG00001","20250321093000"]'
    ).hexdigest()
    assert expected == "9b0212bd11b4caa903fea4b1d8dbbd86fa89c1913306e5f834834578912c35a4"
    assert hl7_id("FAC-0001", "lis", "MSG00001", "20250321093000") == expected


def test_ids_are_deterministic():
    assert hl7_id("N", "lis", "1", "2") == hl7_id("N", "lis", "1", "2")
    assert sql_id("N", "his", "42", "7") == sql_id("N", "his", "42", "7")
    pairs = [("1.2.1", "1.2.1.1"), ("1.2.1", "1.2.1.2")]
    assert dicom_id("N", "1.2", pairs) == dicom_id("N", "1.2", list(pairs))


def test_the_same_parts_give_different_ids_under_different_recipes():
    assert hl7_id("N", "a", "k", "v") != sql_id("N", "a", "k", "v")


four_parts = st.lists(persian_text, min_size=4, max_size=4)


@given(four_parts, four_parts)
def test_ids_are_equal_exactly_when_their_parts_are(a, b):
    assert (hl7_id(*a) == hl7_id(*b)) == (a == b)
    assert (sql_id(*a) == sql_id(*b)) == (a == b)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("a|b", "c", "m", "t"), ("a", "b|c", "m", "t")),
        (("ab", "c", "m", "t"), ("a", "bc", "m", "t")),
        (('a","b', "c", "m", "t"), ("a", 'b","c', "m", "t")),
        (("a", "", "m", "t"), ("", "a", "m", "t")),
    ],
)
def test_part_boundaries_cannot_be_shifted(first, second):
    assert hl7_id(*first) != hl7_id(*second)
    assert sql_id(*first) != sql_id(*second)


def test_ids_are_64_lowercase_hex_and_accepted_by_record():
    for rec_id in (hl7_id("N", "a", "b", "c"), sql_id("N", "a", "b", "c"), dicom_id("N", "1", [])):
        assert len(rec_id) == 64
        make_record(id=rec_id)


def test_ids_depend_on_the_node():
    assert hl7_id("FAC-0001", "lis", "1", "2") != hl7_id("FAC-0002", "lis", "1", "2")
    assert dicom_id("FAC-0001", "1.2", []) != dicom_id("FAC-0002", "1.2", [])


study_pairs = st.lists(
    st.tuples(st.sampled_from(["1.2.3.1", "1.2.3.2"]), st.text("0123456789.", min_size=1)),
    min_size=1,
    max_size=8,
    unique=True,
)


@given(study_pairs, st.randoms(use_true_random=False))
def test_dicom_id_does_not_depend_on_instance_order(pairs, rnd):
    shuffled = list(pairs)
    rnd.shuffle(shuffled)
    assert dicom_id("N", "1.2.3", pairs) == dicom_id("N", "1.2.3", iter(shuffled))


@given(study_pairs, st.text("0123456789.", min_size=1))
def test_dicom_id_changes_when_an_instance_is_added(pairs, sop):
    new = ("1.2.3.9", sop)
    assert dicom_id("N", "1.2.3", pairs) != dicom_id("N", "1.2.3", [*pairs, new])


def test_dicom_id_changes_when_an_instance_moves_to_another_series():
    assert dicom_id("N", "1.2", [("s1", "i1"), ("s2", "i2")]) != dicom_id(
        "N", "1.2", [("s1", "i1"), ("s1", "i2")]
    )


def test_id_recipe_version_is_v1():
    assert record.ID_RECIPE_VERSION == "sepas-record-id-v1"
