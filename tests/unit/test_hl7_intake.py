"""HL7 v2 intake, ACKs and the mapping runner, over the shared corpus (tests/hl7corpus.py).

Every corpus message goes through `adapters.hl7.intake.check`: accepted with the right
decoded text and character set, or refused with the right ACK code and MSA-2. ACKs
are checked field by field and read back by hl7apy (an independent parser). The
runner is driven against a real Buffer in tmp_path.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.hl7 import ack, intake
from adapters.hl7.intake import CheckedMessage, Hl7Refusal, Msh
from adapters.hl7.runner import MappingRunner
from agent.buffer import Buffer
from agent.errors import CapacityExceededError, InputRejectedError
from agent.record import RawRef, Record, Service, SourceRef, hl7_id
from tests import hl7corpus as corpus

TEHRAN_NOON = datetime(2025, 3, 21, 8, 30, tzinfo=UTC)  # 12:00 in Tehran


def _check(case: corpus.Case) -> CheckedMessage | Hl7Refusal:
    try:
        return intake.check(case.message)
    except Hl7Refusal as refusal:
        return refusal


# ------------------------------------------------------------------ the corpus ------


def test_corpus_covers_every_rule_and_has_enough_cases() -> None:
    assert len(corpus.VALID) >= 30
    assert len(corpus.MALFORMED) + len(corpus.WIRE) >= 15
    covered = {r for case in corpus.ALL for r in case.rules}
    assert covered >= set(range(1, 16)) - {13}  # 13 (duplicates) is a listener test
    names = [c.name for c in corpus.ALL]
    assert len(names) == len(set(names))
    controls = [c.control_id for c in corpus.VALID]
    assert len(controls) == len(set(controls)), "accepted cases must not de-duplicate"


@pytest.mark.parametrize("case", corpus.VALID, ids=lambda c: c.name)
def test_valid_message_is_accepted(case: corpus.Case) -> None:
    checked = intake.check(case.message)
    assert checked.raw == case.message
    assert checked.msh.control_id == case.control_id
    assert checked.msh.version == case.version
    assert checked.dedupe_key == f"{case.control_id}|20250321093000"
    if case.charset:
        assert checked.charset == case.charset
    assert checked.warnings == case.warnings
    for fragment in case.text_contains:
        assert fragment in checked.text
    assert "\ufffd" not in checked.text
    assert "\n" not in checked.text
    assert checked.text.endswith("\r")
    assert checked.segments[0].startswith("MSH")
    assert intake.decode(case.message) == checked.text


@pytest.mark.parametrize("case", corpus.MALFORMED, ids=lambda c: c.name)
def test_malformed_message_is_refused_with_its_code(case: corpus.Case) -> None:
    result = _check(case)
    assert isinstance(result, Hl7Refusal), "expected a refusal"
    assert isinstance(result, InputRejectedError)
    assert result.code == case.ack
    assert (result.msh.control_id if result.msh else "") == case.control_id
    if case.ack == "AR":
        assert result.msh is None, "AR at intake means no usable MSH (rule 10)"
    for secret in corpus.patient_strings():
        assert secret not in result.reason
        assert secret not in str(result)


def test_decode_refuses_what_check_refuses() -> None:
    with pytest.raises(Hl7Refusal):
        intake.decode(corpus.by_name("utf16_message").message)


# ------------------------------------------------------------------ character sets --


def test_utf8_zwnj_name_decodes_exactly() -> None:
    checked = intake.check(corpus.by_name("msh18_unicode_utf8_zwnj_name").message)
    pid = next(s for s in checked.segments if s.startswith("PID"))
    assert pid.split("|")[5] == "کریمی^علی\u200cرضا"


def test_8859_6_decodes_arabic_letters() -> None:
    checked = intake.check(corpus.by_name("msh18_8859_6_arabic_letters").message)
    assert checked.charset == "iso8859-6"
    assert "كريمي^علي" in checked.text  # Arabic kaf and yeh, folded later by the mapper


def test_8859_6_with_c1_bytes_is_decoded_as_cp1256_with_a_warning() -> None:
    case = corpus.by_name("msh18_8859_6_with_c1_bytes_is_cp1256")
    checked = intake.check(case.message)
    assert checked.charset == "cp1256"
    assert intake.WARN_8859_6_WAS_CP1256 in checked.warnings
    assert "کريمي^علي\u200cرضا" in checked.text
    # What ISO-8859-6 would have made of it: C1 controls, i.e. mojibake. Never stored.
    assert any("\x80" <= ch <= "\x9f" for ch in case.message.decode("iso8859_6"))


def test_empty_msh18_falls_back_ascii_then_utf8_then_the_adapter_default() -> None:
    assert intake.check(corpus.by_name("msh18_empty_ascii").message).charset == "ascii"
    assert intake.check(corpus.by_name("msh18_empty_utf8_bytes").message).charset == "utf-8"
    cp = intake.check(corpus.by_name("msh18_empty_cp1256_bytes").message)
    assert cp.charset == "cp1256"
    assert "گلپايگاني^پريسا" in cp.text


def test_empty_msh18_with_undecodable_default_is_refused() -> None:
    msg = corpus.enc(corpus.join(corpus.msh("ORU^R01", "X1"), "PID|1||M^^^H||\u06af"), "utf-8")
    msg = msg.replace("\u06af".encode(), b"\xff\xfe\xfd")  # neither UTF-8 nor ISO-8859-6
    with pytest.raises(Hl7Refusal) as err:
        intake.check(msg, default_encoding="iso8859_6")
    assert err.value.code == "AE"
    assert err.value.msh is not None
    assert err.value.msh.control_id == "X1"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_no_input_ever_yields_u_fffd_or_an_unexpected_error(noise: bytes) -> None:
    head = corpus.msh("ORU^R01", "FUZZ").encode() + b"\rPID|1||"
    for label in ("", "UNICODE UTF-8", "8859/6", "ASCII"):
        data = head.replace(b"|2.5", b"|2.5||||||" + label.encode()) if label else head
        try:
            checked = intake.check(data + noise)
        except Hl7Refusal:
            continue
        assert "\ufffd" not in checked.text


# ------------------------------------------------------------------ escapes ---------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (r"a\F\b", "a|b"),
        (r"a\S\b\T\c\R\d\E\e", "a^b&c~d\\e"),
        (r"one\.br\two", "one\ntwo"),
        (r"cr\X0D\lf\X0A\end", "cr\rlf\nend"),
        ("\\XD8A7\\", "\u0627"),  # UTF-8 bytes of ALEF
        (r"\H\bold\N\ plain", "bold plain"),
        (r"\.sp2\x", "\n\nx"),
        (r"\Zlocal\ kept", r"\Zlocal\ kept"),
        (r"unknown \Q\ kept", r"unknown \Q\ kept"),
        ("unterminated \\F", "unterminated \\F"),
        (r"bad hex \XZZ\ kept", r"bad hex \XZZ\ kept"),
        (r"\XFF\ not utf-8", r"\XFF\ not utf-8"),
        ("no escapes at all", "no escapes at all"),
    ],
)
def test_unescape(value: str, expected: str) -> None:
    assert intake.unescape(value) == expected


def test_unescape_uses_the_message_delimiters_and_codec() -> None:
    assert intake.unescape("a#F#b#S#c", "!~#&", field_sep="@") == "a@b!c"
    assert intake.unescape("\\XC7\\", codec="cp1256") == "\u0627"
    assert intake.unescape(r"x\P\y", "^~\\&#") == "x#y"


def test_escapes_never_create_fields_components_or_segments() -> None:
    checked = intake.check(corpus.by_name("escapes").message)
    obx = next(s for s in checked.segments if s.startswith("OBX"))
    fields = obx.split("|")
    assert len(fields) == 12
    value = intake.unescape(fields[5])
    assert value == corpus.by_name("escapes").expect["unescaped"]
    assert len(obx.split("|")) == len(fields)  # splitting happened before unescaping
    assert len(checked.segments) == 4  # \X0D\ is a CR inside a value, not a new segment


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab|^~\\&#\r\nسلام"), max_size=40))
def test_escape_then_unescape_round_trips_and_hides_every_delimiter(value: str) -> None:
    escaped = ack.escape(value.replace("\r", "").replace("\n", ""), "|", "^~\\&#")
    assert not set(escaped) & set("|^~&#\r\n")
    assert intake.unescape(escaped, "^~\\&#") == value.replace("\r", "").replace("\n", "")


# ------------------------------------------------------------------ files -----------


def test_split_messages_keeps_each_message_byte_for_byte() -> None:
    a = corpus.by_name("adt_a01_v2_3").message
    b = corpus.by_name("lf_terminators").message
    c = corpus.by_name("crlf_terminators").message
    data = b"\xef\xbb\xbf" + a + b + b"\r\n\r\n" + c
    assert intake.split_messages(data) == [a, b + b"\r\n\r\n", c]
    for piece in intake.split_messages(data):
        intake.check(piece)


def test_split_messages_drops_batch_envelope_and_returns_stray_text_for_quarantine() -> None:
    a = corpus.by_name("oru_r01_lab_v2_8").message
    b = corpus.by_name("orm_o01_lab_order").message
    data = b"FHS|^~\\&|LIS\rBHS|^~\\&|LIS\r" + a + b + b"BTS|2\rFTS|1\r"
    assert intake.split_messages(data) == [a, b]
    stray = b"not hl7 at all\r\n" + a
    pieces = intake.split_messages(stray)
    assert pieces == [b"not hl7 at all\r\n", a]
    with pytest.raises(Hl7Refusal):
        intake.check(pieces[0])


def test_split_messages_of_nothing_is_nothing() -> None:
    assert intake.split_messages(b"") == []
    assert intake.split_messages(b"\r\n\r\n") == []


def test_peek_msh_reads_the_head_of_an_oversize_message() -> None:
    head = corpus.by_name("oru_r01_lab_v2_8").message[:200]
    peeked = intake.peek_msh(head)
    assert peeked is not None
    assert peeked.control_id == "ORU-28"
    assert peeked.version == "2.8"
    assert intake.peek_msh(b"garbage") is None
    assert intake.peek_msh(b"MSH|^~") is None


# ------------------------------------------------------------------ ACKs ------------

NOW = datetime(2025, 3, 21, 8, 30, tzinfo=UTC)


@pytest.mark.parametrize("case", corpus.MESSAGES, ids=lambda c: c.name)
def test_ack_for_every_corpus_message(case: corpus.Case) -> None:
    result = _check(case)
    data = (
        ack.accept(result, now=NOW)
        if isinstance(result, CheckedMessage)
        else ack.refuse(result, now=NOW)
    )
    fields = ack.parse_ack(data)
    assert fields["MSA-1"] == case.ack
    assert fields["MSA-2"] == case.control_id
    assert fields["MSH-12"] == (case.version or "2.5")
    assert fields["MSH-7"] == "20250321120000+0330"
    assert data.endswith(b"\r")
    if isinstance(result, CheckedMessage):
        msh = result.msh
        assert fields["field_sep"] == msh.field_sep
        assert fields["encoding_chars"] == msh.encoding_chars
        assert (fields["MSH-3"], fields["MSH-4"]) == ("SEPAS", "NODE")
        assert (fields["MSH-5"], fields["MSH-6"]) == ("LIS", "HOSP")
        assert fields["MSH-18"] == msh.charset
        assert "ERR" not in fields
    else:
        assert "ERR" in fields
    text = data.decode("latin-1")
    for secret in corpus.patient_strings():
        assert secret not in text


def test_ack_msh9_per_version_and_err_shape() -> None:
    v23 = Msh(message_code="ADT", trigger_event="A01", control_id="C1", version="2.3")
    a = ack.parse_ack(ack.build_ack(v23, "AE", text="bad", error="101", location="MSH^1^9"))
    assert a["MSH-9"] == "ACK^A01"
    assert a["MSA-3"] == "bad"
    assert a["ERR"] == "ERR|MSH^1^9^101&Required field missing&HL70357"
    v27 = Msh(message_code="ORU", trigger_event="R01", control_id="C2", version="2.7")
    b = ack.parse_ack(ack.build_ack(v27, "AR", text="full", error="207"))
    assert b["MSH-9"] == "ACK^R01^ACK"
    assert b["MSA-3"] == ""  # MSA-3 is withdrawn as of v2.7: the text goes to ERR-8
    assert b["ERR"] == "ERR|||207^Application internal error^HL70357|E||||full"


def test_ack_without_a_usable_msh_has_defaults_and_empty_msa2() -> None:
    a = ack.parse_ack(ack.build_ack(None, "AR", text="no MSH"))
    assert (a["field_sep"], a["encoding_chars"], a["MSH-12"], a["MSH-11"]) == (
        "|",
        "^~\\&",
        "2.5",
        "P",
    )
    assert a["MSA-1"] == "AR"
    assert a["MSA-2"] == ""


def test_ack_echoes_delimiters_and_charset_bytes() -> None:
    msh = Msh(
        field_sep="!",
        encoding_chars="@~\\&",
        sending_application="LIS",
        sending_facility="بیمارستان",
        message_code="ORU",
        trigger_event="R01",
        control_id="Z9",
        processing_id="T",
        version="2.5",
        charset="UNICODE UTF-8",
        codec="utf-8",
    )
    data = ack.build_ack(msh, "AE", text="a!b@c", now=NOW, control_id="ACK1")
    assert data.startswith(
        "MSH!@~\\&!!!LIS!بیمارستان!20250321120000+0330!!ACK@R01@ACK!ACK1!T!2.5".encode()
    )
    assert b"MSA!AE!Z9!a\\F\\b\\S\\c" in data


def test_ack_control_ids_are_unique_and_fit_st20() -> None:
    ids = {ack.parse_ack(ack.build_ack(None, "AA"))["MSH-10"] for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) <= 20 for i in ids)


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8"])
@pytest.mark.parametrize("code", ["AA", "AE", "AR"])
def test_hl7apy_reads_our_acks(version: str, code: intake.AckCode) -> None:
    from hl7apy.parser import parse_message  # an independent parser

    msh = Msh(message_code="ORU", trigger_event="R01", control_id="CTRL-9", version=version)
    text = ack.build_ack(msh, code, text="reason", error="200", location="MSH^1^9").decode()
    msg = parse_message(text, find_groups=False)
    assert msg.msh.msh_12.value == version
    assert msg.msa.msa_1.value == code
    assert msg.msa.msa_2.value == "CTRL-9"
    assert msg.msh.msh_9.msh_9_1.value == "ACK"


# ------------------------------------------------------------------ the runner ------


def _stub_record(
    text: str, raw: bytes, *, node_id: str, adapter: str, kind: str, captured_at: datetime, **_: Any
) -> list[Record]:
    msh = text.split("\r")[0].split("|")
    if msh[9] == "FAIL":
        raise InputRejectedError("stub cannot map this type")
    if msh[9] == "CRASH":
        raise ZeroDivisionError("secret patient text that must not be logged")
    return [
        Record(
            id=hl7_id(node_id, adapter, msh[9], msh[6]),
            service=Service.LAB_RESULT,
            occurred_at=captured_at,
            captured_at=captured_at,
            source=SourceRef(adapter=adapter, kind=kind, ref=msh[9]),
            patient=None,
            body={"resourceType": "Bundle", "type": "collection", "entry": []},
            raw=RawRef.of(raw, intake.MEDIA_TYPE),
        )
    ]


def _raw(control: str) -> bytes:
    return corpus.enc(corpus._lab(control, "2.5", *corpus.NAMES[0], corpus.NC[0]))


@pytest.fixture
def buf(tmp_path: Path) -> Any:
    b = Buffer.open(tmp_path / "data", data_key=None)
    yield b
    b.close()


class _Settings:
    encoding = "cp1256"


def test_runner_maps_rows_and_marks_them_in_the_same_commit(buf: Buffer) -> None:
    ids = [
        buf.put_raw(_raw(f"R{i}"), adapter="lis", media_type=intake.MEDIA_TYPE)[0] for i in range(3)
    ]
    calls: list[int] = []
    runner = MappingRunner(
        buf,
        "lis",
        "hl7-mllp",
        "FAC-1",
        _Settings(),
        _stub_record,
        on_committed=lambda: calls.append(1),
    )
    report = runner.run_once()
    assert (report.mapped, report.quarantined, report.left) == (3, 0, 0)
    assert buf.unmapped_raw("lis") == []
    assert buf.stats().total("pending") == 3
    assert calls == [1]
    assert ids == sorted(ids)


def test_runner_quarantines_what_cannot_be_mapped_without_logging_content(
    buf: Buffer, caplog: pytest.LogCaptureFixture
) -> None:
    buf.put_raw(_raw("FAIL"), adapter="lis", media_type=intake.MEDIA_TYPE)
    buf.put_raw(_raw("CRASH"), adapter="lis", media_type=intake.MEDIA_TYPE)
    buf.put_raw(_raw("OK1"), adapter="lis", media_type=intake.MEDIA_TYPE)
    runner = MappingRunner(buf, "lis", "hl7-mllp", "FAC-1", _Settings(), _stub_record)
    with caplog.at_level(logging.DEBUG):
        report = runner.run_once()
    assert (report.mapped, report.quarantined) == (1, 2)
    reasons = sorted(q.reason for q in buf.quarantined())
    assert reasons == [
        "mapping failed: ZeroDivisionError",
        "mapping refused: stub cannot map this type",
    ]
    assert buf.unmapped_raw("lis") == []
    assert "secret patient text" not in caplog.text


class _FullSink:
    """A sink whose put fails as a full buffer does; everything else is the Buffer."""

    def __init__(self, buf: Buffer) -> None:
        self.buf = buf
        self.full = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.buf, name)

    def put(self, records: Any, **kw: Any) -> Any:
        if self.full:
            raise CapacityExceededError("full")
        return self.buf.put(records, **kw)


def test_runner_leaves_rows_when_the_buffer_is_full_and_maps_them_later(buf: Buffer) -> None:
    for i in range(2):
        buf.put_raw(_raw(f"L{i}"), adapter="lis", media_type=intake.MEDIA_TYPE)
    sink = _FullSink(buf)
    runner = MappingRunner(sink, "lis", "hl7-mllp", "FAC-1", _Settings(), _stub_record)
    report = runner.run_once()
    assert (report.mapped, report.quarantined, report.left) == (0, 0, 2)
    assert buf.quarantined() == []
    sink.full = False
    assert runner.run_once().mapped == 2


def test_runner_without_a_mapper_keeps_rows(buf: Buffer, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_mapping(name: str, *args: Any, **kw: Any) -> Any:
        if name == "adapters.hl7" and args[2] and "mapping" in args[2]:
            raise ImportError("no mapping yet")
        return real_import(name, *args, **kw)

    buf.put_raw(_raw("W1"), adapter="lis", media_type=intake.MEDIA_TYPE)
    monkeypatch.setattr(builtins, "__import__", no_mapping)
    runner = MappingRunner(buf, "lis", "hl7-mllp", "FAC-1", _Settings())
    assert runner.run_once().left == 1
    assert len(buf.unmapped_raw("lis")) == 1
    assert buf.quarantined() == []


def test_runner_thread_wakes_on_commit_sweeps_and_stops_in_time(buf: Buffer) -> None:
    wake = threading.Event()
    mapped = threading.Event()

    def map_fn(*args: Any, **kw: Any) -> list[Record]:
        out = _stub_record(*args, **kw)
        mapped.set()
        return out

    runner = MappingRunner(
        buf, "lis", "hl7-mllp", "FAC-1", _Settings(), map_fn, wake, sweep_secs=30.0
    )
    runner.start()
    try:
        buf.put_raw(_raw("T1"), adapter="lis", media_type=intake.MEDIA_TYPE)
        runner.wake()
        assert mapped.wait(5), "the runner did not wake"
    finally:
        runner.stop(timeout_secs=5)
    assert not runner.running
    assert buf.unmapped_raw("lis") == []


def test_runner_sweep_maps_rows_left_by_a_crash(tmp_path: Path) -> None:
    with Buffer.open(tmp_path / "d", data_key=None) as b:
        b.put_raw(_raw("CRASHED-1"), adapter="lis", media_type=intake.MEDIA_TYPE)
    with Buffer.open(tmp_path / "d", data_key=None) as b:
        done = threading.Event()

        def map_fn(*args: Any, **kw: Any) -> list[Record]:
            done.set()
            return _stub_record(*args, **kw)

        runner = MappingRunner(b, "lis", "hl7-mllp", "FAC-1", _Settings(), map_fn)
        runner.start()  # nobody wakes it: the first pass runs at start
        try:
            assert done.wait(5)
        finally:
            runner.stop(timeout_secs=5)
        assert b.unmapped_raw("lis") == []


def test_space_escape_cannot_blow_up_memory():
    # \.spN\ asks for N blank lines; 20 bytes must not become a billion newlines.
    from adapters.hl7.intake import MAX_SPACE_LINES, unescape

    out = unescape(r"a\.sp999999999\b", "^~\\&", field_sep="|", codec="utf-8")
    assert out == "a" + "\n" * MAX_SPACE_LINES + "b"
