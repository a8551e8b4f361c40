"""The HL7 v2 intake corpus: every HL7-INTAKE.md rule, accepted and refused.

Synthetic data only: names from a short list of common Persian names, national codes
made up with `agent.nationalcode.make_valid`. Each `Case` says what the sender must
get back (MSA-1, MSA-2) and what the buffer must hold afterwards (raw rows stored,
quarantine rows added). Used by:

- tests/unit/test_hl7_intake.py: every message case through `adapters.hl7.intake`;
- tests/interop/test_mllp_listener.py: every case over real TCP to the listener;
- the mapping's tests, through ``Case.expect`` (what the Record should carry).

``expect`` keys (all optional): ``service`` (PROTOCOL.md service), ``national_id``
(normalised ASCII), ``national_id_valid``, ``family`` / ``given`` (after the name
folds of rule 6), ``birth_date`` (ISO), ``birth_date_jalali`` (as sent), ``text``
(free text that must survive verbatim, rule 7), ``unescaped`` (a value after rule 4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from adapters.hl7_mllp.framing import frame
from agent.nationalcode import make_valid

#: max_message_bytes the listener tests use, so that the oversize case stays small.
OVERSIZE_LIMIT: Final = 4096

ENC: Final = "^~\\&"
ZWNJ: Final = "\u200c"
PERSIAN_DIGITS: Final = str.maketrans("0123456789", "۰۱۲۳۴۵۶۷۸۹")
ARABIC_INDIC_DIGITS: Final = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")

# Synthetic national codes (valid check digits) and their deliberately broken forms.
NC: Final = tuple(
    make_valid(p)
    for p in (
        "001234567",
        "012345679",
        "002468135",
        "003692581",
        "004815162",
        "005173946",
        "006284517",
        "007395628",
        "008406739",
        "009517840",
        "010628951",
        "011739062",
        "012840173",
        "013951284",
        "014062395",
        "015173406",
        "016284517",
        "017395628",
        "018406739",
        "019517840",
    )
)
BAD_CHECK_DIGIT: Final = NC[2][:9] + str((int(NC[2][9]) + 1) % 10)
NINE_DIGITS: Final = NC[1][1:]  # the leading zero lost by a system storing a number

# Synthetic names, as the mapper must store them (rule 6 folds applied).
NAMES: Final = (
    ("کریمی", f"علی{ZWNJ}رضا"),
    ("احمدی", "زهرا"),
    ("رضایی", "محمد"),
    ("موسوی", "فاطمه"),
    ("حسینی", "حسین"),
    ("محمدی", "مریم"),
    ("جعفری", "رضا"),
    ("صادقی", "سارا"),
)


@dataclass(frozen=True, slots=True)
class Case:
    """One input and what must come of it."""

    name: str
    rules: tuple[int, ...]  # HL7-INTAKE.md rules it exercises
    message: bytes = b""  # one message, sent as one MLLP frame (b"" for wire cases)
    ack: str | None = "AA"  # MSA-1 for a message case
    control_id: str = ""  # MSA-2 expected ("" when no usable MSH-10)
    version: str = ""  # MSH-12 the ACK must echo ("" : no usable MSH, ACK says 2.5)
    stored: int = 0  # raw rows the case adds to the buffer
    quarantined: int = 0  # quarantine rows the case adds
    wire: bytes | None = None  # MLLP-level case: the exact bytes sent on one connection
    acks: tuple[tuple[str, str], ...] = ()  # wire case: (MSA-1, MSA-2) of each ACK, in order
    charset: str = ""  # codec intake must pick (accepted cases)
    text_contains: tuple[str, ...] = ()  # decoded text must contain these
    warnings: tuple[str, ...] = ()  # intake warnings expected
    expect: Mapping[str, object] = field(default_factory=dict)  # for the mapping's tests

    @property
    def is_wire(self) -> bool:
        return self.wire is not None


# ------------------------------------------------------------------ builders ---------


def msh(
    msg_type: str,
    control: str,
    version: str = "2.5",
    *,
    charset: str = "",
    enc: str = ENC,
    sep: str = "|",
    time: str = "20250321093000",
) -> str:
    fields = ["MSH", enc, "LIS", "HOSP", "SEPAS", "NODE", time, "", msg_type, control, "P"]
    fields.append(version)
    if charset:
        fields += ["", "", "", "", "", charset]
    return sep.join(fields)


def pid(
    family: str,
    given: str,
    *,
    nc: str | None = None,
    mrn: str = "MRN-1",
    pid2: str = "",
    pid19: str = "",
    dob: str = "19800101",
    sex: str = "M",
    address: str = "",
) -> str:
    pid3 = f"{mrn}^^^HOSP^MR" + (f"~{nc}^^^NOCR^NNIRN" if nc else "")
    f = ["PID", "1", pid2, pid3, "", f"{family}^{given}", "", dob, sex, "", "", address]
    f += ["", "", "", "", "", "", "", pid19]
    return "|".join(f).rstrip("|")


def obr(n: int, service: str = "GLU^Glucose^L", obr24: str = "") -> str:
    f = ["OBR", str(n), f"ORD{n}", f"FIL{n}", service, "", "", "20250321080000"]
    f += [""] * 16 + [obr24, "F"]
    return "|".join(f)


def obx(n: int, vtype: str, code: str, value: str, units: str = "") -> str:
    return f"OBX|{n}|{vtype}|{code}||{value}|{units}|||||F"


def join(*segments: str, term: str = "\r") -> str:
    return term.join(segments) + term


def enc(text: str, codec: str = "utf-8", *, bom: bool = False) -> bytes:
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode(codec)


def ok(name: str, rules: tuple[int, ...], message: bytes, control_id: str, **kw: object) -> Case:
    version = str(kw.pop("version", "2.5"))
    return Case(
        name,
        rules,
        message,
        "AA",
        control_id,
        version,
        stored=1,
        **kw,  # type: ignore[arg-type]
    )


def bad(
    name: str,
    rules: tuple[int, ...],
    message: bytes,
    code: str,
    control_id: str = "",
    version: str = "",
) -> Case:
    return Case(name, rules, message, code, control_id, version, quarantined=1)


def _lab(control: str, version: str, family: str, given: str, nc: str, **pid_kw: str) -> str:
    return join(
        msh("ORU^R01", control, version),
        pid(family, given, nc=nc, **pid_kw),
        obr(1),
        obx(1, "NM", "GLU^Glucose", "5.4", "mmol/L"),
    )


# ------------------------------------------------------------------ accepted --------

_F = NAMES
VALID: Final[tuple[Case, ...]] = (
    # Versions 2.3 to 2.8 and the message types we map (rule 10).
    ok(
        "adt_a01_v2_3",
        (10,),
        enc(
            join(
                msh("ADT^A01", "ADT-A01-23", "2.3", charset="UNICODE UTF-8"),
                "EVN|A01|20250321093000",
                pid(*_F[0], nc=NC[0]),
                "PV1|1|I|WARD1^101^1",
            )
        ),
        "ADT-A01-23",
        version="2.3",
        charset="utf-8",
        text_contains=(_F[0][1],),
        expect={
            "service": "admission",
            "national_id": NC[0],
            "national_id_valid": True,
            "family": _F[0][0],
            "given": _F[0][1],
        },
    ),
    ok(
        "adt_a03_v2_3_1",
        (10,),
        enc(
            join(
                msh("ADT^A03^ADT_A03", "ADT-A03-231", "2.3.1", charset="UNICODE UTF-8"),
                "EVN|A03|20250321093000",
                pid(*_F[1], nc=NC[1]),
                "PV1|1|I|WARD1^101^1",
            )
        ),
        "ADT-A03-231",
        version="2.3.1",
        expect={"service": "discharge", "national_id": NC[1], "national_id_valid": True},
    ),
    ok(
        "adt_a04_v2_4",
        (10,),
        enc(
            join(
                msh("ADT^A04^ADT_A01", "ADT-A04-24", "2.4", charset="UNICODE UTF-8"),
                "EVN|A04|20250321093000",
                pid(*_F[2], nc=NC[2]),
                "PV1|1|O|CLINIC",
            )
        ),
        "ADT-A04-24",
        version="2.4",
        expect={"service": "admission", "national_id": NC[2]},
    ),
    ok(
        "adt_a08_v2_5",
        (10,),
        enc(
            join(
                msh("ADT^A08^ADT_A01", "ADT-A08-25", "2.5", charset="UNICODE UTF-8"),
                "EVN|A08|20250321093000",
                pid(*_F[3], nc=NC[3]),
                "PV1|1|I|WARD2",
            )
        ),
        "ADT-A08-25",
        expect={"service": "encounter-update", "national_id": NC[3]},
    ),
    ok(
        "adt_a28_v2_5_1",
        (10,),
        enc(
            join(
                msh("ADT^A28^ADT_A05", "ADT-A28-251", "2.5.1", charset="UNICODE UTF-8"),
                "EVN|A28|20250321093000",
                pid(*_F[4], nc=NC[4]),
                "PV1|1|N",
            )
        ),
        "ADT-A28-251",
        version="2.5.1",
        expect={"service": "patient", "national_id": NC[4]},
    ),
    ok(
        "adt_a31_v2_6",
        (10,),
        enc(
            join(
                msh("ADT^A31^ADT_A05", "ADT-A31-26", "2.6", charset="UNICODE UTF-8"),
                "EVN|A31|20250321093000",
                pid(*_F[5], nc=NC[5]),
                "PV1|1|N",
            )
        ),
        "ADT-A31-26",
        version="2.6",
        expect={"service": "patient", "national_id": NC[5]},
    ),
    ok(
        "adt_a40_v2_7_five_encoding_chars",
        (2, 10),
        enc(
            join(
                msh("ADT^A40^ADT_A39", "ADT-A40-27", "2.7", enc="^~\\&#", charset="UNICODE UTF-8"),
                "EVN|A40|20250321093000",
                pid(*_F[6], nc=NC[6], mrn="MRN-7"),
                "MRG|MRN-OLD-7^^^HOSP^MR",
            )
        ),
        "ADT-A40-27",
        version="2.7",
        expect={"service": "patient-merge", "national_id": NC[6]},
    ),
    ok(
        "oru_r01_lab_v2_7_1",
        (10,),
        enc(_lab("ORU-271", "2.7.1", *_F[7], NC[7])),
        "ORU-271",
        version="2.7.1",
        expect={"service": "lab-result", "national_id": NC[7]},
    ),
    ok(
        "oru_r01_lab_v2_8",
        (10,),
        enc(_lab("ORU-28", "2.8", *_F[0], NC[8])),
        "ORU-28",
        version="2.8",
        expect={"service": "lab-result", "national_id": NC[8]},
    ),
    ok(
        "oru_r01_pathology_obr24_sp",
        (10,),
        enc(
            join(
                msh("ORU^R01^ORU_R01", "ORU-PATH-SP", "2.5.1", charset="UNICODE UTF-8"),
                pid(*_F[1], nc=NC[9]),
                obr(1, "88305^Surgical pathology^CPT", obr24="SP"),
                obx(1, "TX", "22634-0^Pathology report^LN", "نمونه بافت: بدون شواهد بدخیمی"),
            )
        ),
        "ORU-PATH-SP",
        version="2.5.1",
        expect={
            "service": "pathology-report",
            "national_id": NC[9],
            "text": "نمونه بافت: بدون شواهد بدخیمی",
        },
    ),
    ok(
        "oru_r01_pathology_obr24_pat",
        (10,),
        enc(
            join(
                msh("ORU^R01", "ORU-PATH-PAT", "2.4", charset="UNICODE UTF-8"),
                pid(*_F[2], nc=NC[10]),
                obr(1, "PATH^Pathology^L", obr24="PAT"),
                obx(1, "FT", "PATH^Report", "Biopsy: benign"),
            )
        ),
        "ORU-PATH-PAT",
        version="2.4",
        expect={"service": "pathology-report", "national_id": NC[10]},
    ),
    ok(
        "orm_o01_medication",
        (10,),
        enc(
            join(
                msh("ORM^O01", "ORM-MED", "2.3.1", charset="UNICODE UTF-8"),
                pid(*_F[3], nc=NC[11]),
                "ORC|NW|ORD-M1|||||||20250321080000",
                "RXO|AMOX500^Amoxicillin 500 mg^LOCAL|500||mg|CAP",
            )
        ),
        "ORM-MED",
        version="2.3.1",
        expect={"service": "e-prescription", "national_id": NC[11]},
    ),
    ok(
        "orm_o01_lab_order",
        (10,),
        enc(
            join(
                msh("ORM^O01", "ORM-LAB", "2.4", charset="UNICODE UTF-8"),
                pid(*_F[4], nc=NC[12]),
                "ORC|NW|ORD-L1|||||||20250321080000",
                obr(1, "CBC^Complete blood count^L"),
            )
        ),
        "ORM-LAB",
        version="2.4",
        expect={"service": "order", "national_id": NC[12]},
    ),
    ok(
        "oml_o21_lab_order",
        (10,),
        enc(
            join(
                msh("OML^O21^OML_O21", "OML-LAB", "2.5.1", charset="UNICODE UTF-8"),
                pid(*_F[5], nc=NC[13]),
                "ORC|NW|ORD-O1|||||||20250321080000",
                obr(1, "LIPID^Lipid panel^L"),
            )
        ),
        "OML-LAB",
        version="2.5.1",
        expect={"service": "order", "national_id": NC[13]},
    ),
    ok(
        "oml_o21_medication",
        (10,),
        enc(
            join(
                msh("OML^O21^OML_O21", "OML-MED", "2.5.1", charset="UNICODE UTF-8"),
                pid(*_F[6], nc=NC[14]),
                "ORC|NW|ORD-O2|||||||20250321080000",
                "RXO|MET500^Metformin 500 mg^LOCAL|500||mg|TAB",
            )
        ),
        "OML-MED",
        version="2.5.1",
        expect={"service": "e-prescription", "national_id": NC[14]},
    ),
    ok(
        "rde_o11_prescription_free_text",
        (7, 10),
        enc(
            join(
                msh("RDE^O11^RDE_O11", "RDE-11", "2.5", charset="UNICODE UTF-8"),
                pid(*_F[7], nc=NC[15]),
                "ORC|NW|RX-1|||||||20250321080000",
                "RXE|^^^20250321^^R|AMOX500^Amoxicillin 500 mg^LOCAL|500||mg|CAP|"
                "هر ۸ ساعت یک عدد، بعد از غذا",
                "RXR|PO",
            )
        ),
        "RDE-11",
        expect={
            "service": "e-prescription",
            "national_id": NC[15],
            "text": "هر ۸ ساعت یک عدد، بعد از غذا",
        },
    ),
    ok(
        "rde_o01_v2_3",
        (10,),
        enc(
            join(
                msh("RDE^O01", "RDE-01", "2.3", charset="UNICODE UTF-8"),
                pid(*_F[0], nc=NC[16]),
                "ORC|NW|RX-2|||||||20250321080000",
                "RXE|^^^20250321^^R|MET500^Metformin 500 mg^LOCAL|500||mg|TAB",
            )
        ),
        "RDE-01",
        version="2.3",
        expect={"service": "e-prescription", "national_id": NC[16]},
    ),
    # Z-segments kept, never refused; Jalali dates inside them kept raw (rules 8, 9).
    ok(
        "z_segments",
        (8, 9),
        enc(
            join(
                msh("ADT^A01", "Z-SEG", "2.5", charset="UNICODE UTF-8"),
                "EVN|A01|20250321093000",
                pid(*_F[1], nc=NC[17]),
                "PV1|1|I|WARD1",
                "ZPI|1|1402/05/12|بیمه سلامت",
                "ZV1|X|Y",
            )
        ),
        "Z-SEG",
        text_contains=("ZPI|1|1402/05/12|بیمه سلامت",),
        expect={"service": "admission", "national_id": NC[17]},
    ),
    # Segment terminators and BOM (rule 1).
    ok(
        "lf_terminators",
        (1,),
        enc(_lab("LF-ONLY", "2.5", *_F[2], NC[18]).replace("\r", "\n")),
        "LF-ONLY",
        expect={"service": "lab-result", "national_id": NC[18]},
    ),
    ok(
        "crlf_terminators",
        (1,),
        enc(_lab("CRLF", "2.5", *_F[3], NC[19]).replace("\r", "\r\n")),
        "CRLF",
        expect={"service": "lab-result", "national_id": NC[19]},
    ),
    ok(
        "utf8_bom",
        (1, 3),
        enc(_lab("BOM-1", "2.5", *_F[0], NC[0]), bom=True),
        "BOM-1",
        charset="utf-8",
        text_contains=(_F[0][1],),
        expect={"family": _F[0][0], "given": _F[0][1]},
    ),
    # Escapes (rule 4).
    ok(
        "escapes",
        (4,),
        enc(
            join(
                msh("ORU^R01", "ESC-1", "2.5", charset="UNICODE UTF-8"),
                pid(*_F[4], nc=NC[4]),
                obr(1),
                obx(
                    1,
                    "FT",
                    "NOTE^Note",
                    r"Line one\.br\Line two \F\ pipe \S\ caret \T\ amp \R\ tilde "
                    r"\E\ backslash\X0D\after CR",
                ),
            )
        ),
        "ESC-1",
        text_contains=(r"\.br\Line two \F\ pipe",),
        expect={
            "unescaped": "Line one\nLine two | pipe ^ caret & amp ~ tilde \\ backslash\rafter CR"
        },
    ),
    # Repeated fields, empty trailing fields.
    ok(
        "repeated_fields",
        (5, 6),
        enc(
            join(
                msh("ADT^A08", "REP-1", "2.5", charset="UNICODE UTF-8"),
                "EVN|A08|20250321093000",
                f"PID|1||MRN-9^^^HOSP^MR~{NC[5]}^^^NOCR^NNIRN~P123^^^PASS^PPN||"
                f"{_F[5][0]}^{_F[5][1]}~{_F[6][0]}^{_F[6][1]}||19800101|F",
                "PV1|1|I|WARD1",
            )
        ),
        "REP-1",
        expect={"national_id": NC[5], "family": _F[5][0], "given": _F[5][1]},
    ),
    ok(
        "empty_trailing_fields",
        (1,),
        enc(
            join(
                msh("ORU^R01", "TRAIL-1", "2.5") + "||||||",
                pid(*_F[7], nc=NC[6]) + "|||||",
                obr(1) + "|||",
                obx(1, "NM", "GLU^Glucose", "5.4", "mmol/L") + "||||",
            )
        ),
        "TRAIL-1",
        charset="utf-8",
    ),
    # Character sets (rule 3).
    ok(
        "msh18_unicode_utf8_zwnj_name",
        (3, 6),
        enc(
            _lab("CS-UTF8", "2.5", *_F[0], NC[7]).replace("|2.5\r", "|2.5||||||UNICODE UTF-8\r", 1)
        ),
        "CS-UTF8",
        charset="utf-8",
        text_contains=(f"کریمی^علی{ZWNJ}رضا",),
        expect={"family": "کریمی", "given": f"علی{ZWNJ}رضا"},
    ),
    ok(
        "msh18_label_utf8",
        (3,),
        enc(
            join(
                msh("ORU^R01", "CS-UTF8-LABEL", "2.5", charset="UTF-8"),
                pid(*_F[1], nc=NC[8]),
                obr(1),
                obx(1, "NM", "GLU^Glucose", "5.4"),
            )
        ),
        "CS-UTF8-LABEL",
        charset="utf-8",
        text_contains=(_F[1][0],),
    ),
    ok(
        "msh18_label_unicode",
        (3,),
        enc(
            join(
                msh("ORU^R01", "CS-UNICODE", "2.5", charset="UNICODE"),
                pid(*_F[2], nc=NC[9]),
                obr(1),
                obx(1, "NM", "GLU^Glucose", "5.4"),
            )
        ),
        "CS-UNICODE",
        charset="utf-8",
        text_contains=(_F[2][0],),
    ),
    ok(
        "msh18_8859_6_arabic_letters",
        (3, 6),
        enc(
            join(
                msh("ADT^A04", "CS-8859-6", "2.5", charset="8859/6"),
                "EVN|A04|20250321093000",
                pid("كريمي", "علي", nc=NC[10]),
                "PV1|1|O",
            ),
            "iso8859_6",
        ),
        "CS-8859-6",
        charset="iso8859-6",
        text_contains=("كريمي^علي",),
        expect={"family": "کریمی", "given": "علی"},
    ),
    ok(
        "msh18_8859_6_with_c1_bytes_is_cp1256",
        (3, 6),
        enc(
            join(
                msh("ADT^A04", "CS-8859-6-C1", "2.5", charset="8859/6"),
                "EVN|A04|20250321093000",
                pid("کريمي", f"علي{ZWNJ}رضا", nc=NC[11]),
                "PV1|1|O",
            ),
            "cp1256",
        ),
        "CS-8859-6-C1",
        charset="cp1256",
        text_contains=(f"کريمي^علي{ZWNJ}رضا",),
        warnings=("charset-8859-6-was-windows-1256",),
        expect={"family": "کریمی", "given": f"علی{ZWNJ}رضا"},
    ),
    ok(
        "msh18_8859_6_but_utf8_bytes",
        (3,),
        enc(
            join(
                msh("ADT^A04", "CS-8859-6-UTF8", "2.5", charset="8859/6"),
                "EVN|A04|20250321093000",
                pid(*_F[4], nc=NC[12]),
                "PV1|1|O",
            )
        ),
        "CS-8859-6-UTF8",
        charset="utf-8",
        text_contains=(f"{_F[4][0]}^{_F[4][1]}",),
        warnings=("charset-8859-6-was-utf-8",),
        expect={"family": _F[4][0], "given": _F[4][1]},
    ),
    ok(
        "msh18_empty_cp1256_bytes",
        (3, 6),
        enc(
            join(
                msh("ADT^A04", "CS-EMPTY-1256", "2.5"),
                "EVN|A04|20250321093000",
                pid("گلپايگاني", "پريسا", nc=NC[12]),
                "PV1|1|O",
            ),
            "cp1256",
        ),
        "CS-EMPTY-1256",
        charset="cp1256",
        text_contains=("گلپايگاني^پريسا",),
        warnings=("charset-undeclared-default-encoding-used",),
        expect={"family": "گلپایگانی", "given": "پریسا"},
    ),
    ok(
        "msh18_empty_utf8_bytes",
        (3,),
        enc(
            join(
                msh("ORU^R01", "CS-EMPTY-UTF8", "2.5"),
                pid(*_F[3], nc=NC[13]),
                obr(1),
                obx(1, "NM", "GLU^Glucose", "5.4"),
            )
        ),
        "CS-EMPTY-UTF8",
        charset="utf-8",
        text_contains=(_F[3][0],),
    ),
    ok(
        "msh18_empty_ascii",
        (3,),
        enc(
            join(
                msh("ORU^R01", "CS-EMPTY-ASCII", "2.5"),
                pid("Karimi", "Ali", nc=NC[14]),
                obr(1),
                obx(1, "NM", "GLU^Glucose", "5.4"),
            )
        ),
        "CS-EMPTY-ASCII",
        charset="ascii",
    ),
    ok(
        "arabic_yeh_kaf_in_utf8",
        (6,),
        enc(
            join(
                msh("ADT^A04", "YEH-KAF", "2.5", charset="UNICODE UTF-8"),
                "EVN|A04|20250321093000",
                pid("كريمي", "علي", nc=NC[15]),
                "PV1|1|O",
            )
        ),
        "YEH-KAF",
        charset="utf-8",
        expect={"family": "کریمی", "given": "علی"},
    ),
    # National codes (rule 5): digits, check digit, position; never a refusal.
    ok(
        "national_code_persian_digits",
        (5,),
        enc(_lab("NC-FA", "2.5", *_F[4], NC[16].translate(PERSIAN_DIGITS))),
        "NC-FA",
        expect={"national_id": NC[16], "national_id_valid": True},
    ),
    ok(
        "national_code_arabic_indic_digits",
        (5,),
        enc(_lab("NC-AR", "2.5", *_F[5], NC[17].translate(ARABIC_INDIC_DIGITS))),
        "NC-AR",
        expect={"national_id": NC[17], "national_id_valid": True},
    ),
    ok(
        "national_code_bad_check_digit",
        (5,),
        enc(_lab("NC-BAD", "2.5", *_F[6], BAD_CHECK_DIGIT)),
        "NC-BAD",
        expect={"national_id": BAD_CHECK_DIGIT, "national_id_valid": False},
    ),
    ok(
        "national_code_nine_digits",
        (5,),
        enc(_lab("NC-NINE", "2.5", *_F[7], NINE_DIGITS)),
        "NC-NINE",
        expect={"national_id_nine_digits": NINE_DIGITS},
    ),
    ok(
        "national_code_in_pid19",
        (5,),
        enc(
            join(
                msh("ORU^R01", "NC-PID19", "2.5", charset="UNICODE UTF-8"),
                pid(*_F[0], pid19=NC[18]),
                obr(1),
                obx(1, "NM", "GLU^Glucose", "5.4"),
            )
        ),
        "NC-PID19",
        expect={"national_id": NC[18], "national_id_valid": True},
    ),
    ok(
        "national_code_in_pid2_with_hyphens",
        (5,),
        enc(
            join(
                msh("ORU^R01", "NC-PID2", "2.5", charset="UNICODE UTF-8"),
                pid(*_F[1], pid2=f"{NC[19][:3]}-{NC[19][3:9]}-{NC[19][9]}"),
                obr(1),
                obx(1, "NM", "GLU^Glucose", "5.4"),
            )
        ),
        "NC-PID2",
        expect={"national_id": NC[19], "national_id_valid": True},
    ),
    # Dates (rule 8) and free text (rule 7).
    ok(
        "jalali_birth_date",
        (8,),
        enc(_lab("JALALI-1", "2.5", *_F[2], NC[0], dob="13620704")),
        "JALALI-1",
        expect={"birth_date": "1983-09-26", "birth_date_jalali": "13620704"},
    ),
    ok(
        "free_text_persian_digits_verbatim",
        (7,),
        enc(
            join(
                msh("ORU^R01", "TEXT-1", "2.5", charset="UNICODE UTF-8"),
                pid(*_F[3], nc=NC[1]),
                obr(1),
                obx(1, "TX", "COMMENT^Comment", f"قند خون ۵٫۴ میلی{ZWNJ}مول بر لیتر"),
                "NTE|1||نتیجه: طبیعی (۱۴۰۴/۰۱/۱۵)",
            )
        ),
        "TEXT-1",
        text_contains=(f"قند خون ۵٫۴ میلی{ZWNJ}مول بر لیتر",),
        expect={"text": f"قند خون ۵٫۴ میلی{ZWNJ}مول بر لیتر"},
    ),
    ok(
        "version_with_components",
        (10,),
        enc(_lab("VID-1", "2.5^IRN", *_F[4], NC[2])),
        "VID-1",
        version="2.5^IRN",
    ),
)


# ------------------------------------------------------------------ refused ---------

_GOOD_TAIL = join(pid(*_F[0], nc=NC[0]), obr(1), obx(1, "NM", "GLU^Glucose", "5.4"))

MALFORMED: Final[tuple[Case, ...]] = (
    bad("missing_msh", (10, 11), enc(_GOOD_TAIL), "AR"),
    bad(
        "lower_case_msh",
        (10, 11),
        enc(msh("ORU^R01", "LOWER-1").replace("MSH", "msh", 1) + "\r" + _GOOD_TAIL),
        "AR",
    ),
    bad("truncated_msh", (10,), b"MSH|^~\\&|LIS|HOSP|SEPAS\r", "AR"),
    bad("truncated_in_msh2", (2, 10), b"MSH|^~", "AR"),
    bad(
        "field_separator_equals_encoding_char",
        (2,),
        enc(msh("ORU^R01", "SEP-1", sep="^") + "\r" + _GOOD_TAIL),
        "AR",
    ),
    bad(
        "duplicate_encoding_chars",
        (2,),
        enc(msh("ORU^R01", "DUP-ENC", enc="^^\\&") + "\r" + _GOOD_TAIL),
        "AE",
        "DUP-ENC",
        "2.5",
    ),
    bad("msh9_missing", (10,), enc(msh("", "NO-TYPE") + "\r" + _GOOD_TAIL), "AE", "NO-TYPE", "2.5"),
    bad("msh10_missing", (10,), enc(msh("ORU^R01", "") + "\r" + _GOOD_TAIL), "AE", "", "2.5"),
    bad(
        "msh12_unsupported_3_0",
        (10,),
        enc(msh("ORU^R01", "V3", "3.0") + "\r" + _GOOD_TAIL),
        "AE",
        "V3",
        "3.0",
    ),
    bad(
        "msh12_missing",
        (10,),
        enc(msh("ORU^R01", "NO-VER", "") + "\r" + _GOOD_TAIL),
        "AE",
        "NO-VER",
        "",
    ),
    bad(
        "oru_without_pid",
        (10,),
        enc(join(msh("ORU^R01", "NO-PID"), obr(1), obx(1, "NM", "GLU^Glucose", "5.4"))),
        "AE",
        "NO-PID",
        "2.5",
    ),
    bad(
        "nul_byte_in_field",
        (11,),
        enc(
            join(
                msh("ORU^R01", "NUL-1"),
                pid(*_F[1], nc=NC[1]),
                obr(1),
                obx(1, "ST", "X^Y", "ab\x00cd"),
            )
        ),
        "AE",
        "NUL-1",
        "2.5",
    ),
    bad(
        "bell_control_char",
        (11,),
        enc(
            join(
                msh("ORU^R01", "BEL-1"),
                pid(*_F[2], nc=NC[2]),
                obr(1),
                obx(1, "ST", "X^Y", "ab\x07cd"),
            )
        ),
        "AE",
        "BEL-1",
        "2.5",
    ),
    bad(
        "utf8_declared_invalid_bytes",
        (3,),
        enc(
            join(
                msh("ADT^A04", "BADUTF8", charset="UNICODE UTF-8"),
                "EVN|A04|20250321093000",
                pid("کريمي", "علي", nc=NC[3]),
                "PV1|1|O",
            ),
            "cp1256",
        ),
        "AE",
        "BADUTF8",
        "2.5",
    ),
    bad("utf16_message", (3,), enc(_lab("UTF16-1", "2.5", *_F[3], NC[3]), "utf-16"), "AR"),
    bad(
        "utf16_declared",
        (3,),
        enc(join(msh("ORU^R01", "UTF16-DECL", charset="UNICODE UTF-16"), _GOOD_TAIL.rstrip())),
        "AE",
        "UTF16-DECL",
        "2.5",
    ),
    bad(
        "ascii_declared_non_ascii_bytes",
        (3,),
        enc(join(msh("ORU^R01", "ASCII-DECL", charset="ASCII"), _GOOD_TAIL.rstrip())),
        "AE",
        "ASCII-DECL",
        "2.5",
    ),
    bad(
        "unknown_charset_label",
        (3,),
        enc(join(msh("ORU^R01", "CS-UNKNOWN", charset="EBCDIC-X"), _GOOD_TAIL.rstrip())),
        "AE",
        "CS-UNKNOWN",
        "2.5",
    ),
    bad(
        "unknown_message_type",
        (10, 11, 15),
        enc(join(msh("XYZ^Q01", "XYZ-1"), _GOOD_TAIL.rstrip())),
        "AE",
        "XYZ-1",
        "2.5",
    ),
    bad(
        "unknown_trigger_event",
        (10, 11, 15),
        enc(join(msh("ADT^A99", "A99-1"), "EVN|A99", _GOOD_TAIL.rstrip())),
        "AE",
        "A99-1",
        "2.5",
    ),
    bad(
        "lower_case_segment_id",
        (15,),
        enc(join(msh("ORU^R01", "SEGID-1"), "pid|1||MRN-1^^^HOSP^MR", obr(1))),
        "AE",
        "SEGID-1",
        "2.5",
    ),
    bad(
        "two_messages_in_one_frame",
        (15,),
        enc(
            join(
                msh("ORU^R01", "TWO-1"),
                _GOOD_TAIL.rstrip(),
                msh("ORU^R01", "TWO-2"),
                _GOOD_TAIL.rstrip(),
            )
        ),
        "AE",
        "TWO-1",
        "2.5",
    ),
    bad(
        "replacement_character",
        (3,),
        enc(
            join(
                msh("ORU^R01", "FFFD-1", charset="UNICODE UTF-8"),
                pid("کریمی", "عل\ufffdی", nc=NC[4]),
                obr(1),
            )
        ),
        "AE",
        "FFFD-1",
        "2.5",
    ),
)


# ------------------------------------------------------------------ MLLP level ------


def _wire_msg(control: str, i: int) -> bytes:
    return enc(_lab(control, "2.5", *_F[i % len(_F)], NC[i % len(NC)]))


_OVERSIZE = enc(
    join(
        msh("ORU^R01", "BIG-1", charset="UNICODE UTF-8"),
        pid(*_F[5], nc=NC[5]),
        obr(1),
        obx(1, "TX", "NOTE^Note", "x" * (OVERSIZE_LIMIT * 2)),
    )
)
_CUT = _wire_msg("CUT-2", 2)

WIRE: Final[tuple[Case, ...]] = (
    Case(
        "oversize_message",
        (12,),
        wire=frame(_OVERSIZE),
        acks=(("AR", "BIG-1"),),
    ),
    Case(
        "garbage_between_frames",
        (1,),
        wire=b"hello\r\n"
        + frame(_wire_msg("GARB-1", 0))
        + b"\x00\xffjunk\x1c\r"
        + frame(_wire_msg("GARB-2", 1))
        + b"tail",
        acks=(("AA", "GARB-1"), ("AA", "GARB-2")),
        stored=2,
    ),
    Case(
        "missing_end_block",
        (1,),
        wire=b"\x0b" + _wire_msg("NOEND-1", 3),
        acks=(),
    ),
    Case(
        "second_frame_cut_off",
        (14,),
        wire=frame(_wire_msg("CUT-1", 4)) + b"\x0b" + _CUT[: len(_CUT) // 2],
        acks=(("AA", "CUT-1"),),
        stored=1,
    ),
    Case(
        "start_block_inside_frame_restarts",
        (1,),
        wire=b"\x0b" + _wire_msg("RESTART-1", 5)[:40] + frame(_wire_msg("RESTART-2", 6)),
        acks=(("AA", "RESTART-2"),),
        stored=1,
    ),
)

ALL: Final[tuple[Case, ...]] = VALID + MALFORMED + WIRE
MESSAGES: Final[tuple[Case, ...]] = VALID + MALFORMED


def patient_strings() -> list[str]:
    """Every name and national code in the corpus, in every form it appears in: what
    must never show up in a log line or an ACK."""
    out: set[str] = set()
    for family, given in NAMES:
        out.update({family, given, given.replace(ZWNJ, "")})
    out.update({"كريمي", "علي", "کريمي", "گلپايگاني", "پريسا", "Karimi"})
    for code in (*NC, BAD_CHECK_DIGIT, NINE_DIGITS):
        out.update({code, code.translate(PERSIAN_DIGITS), code.translate(ARABIC_INDIC_DIGITS)})
    return sorted(out)


def by_name(name: str) -> Case:
    for case in ALL:
        if case.name == name:
            return case
    raise KeyError(name)
