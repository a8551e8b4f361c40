"""Synthetic Records for tests. No real patient ever: names come from a short list of
common Persian names and national codes are made up (with a valid check digit)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from agent.record import PatientRef, RawRef, Record, Service, SourceRef, hl7_id

NODE_ID = "FAC-TEST"
TEHRAN = timezone(timedelta(hours=3, minutes=30))

_GIVEN = ("علی", "زهرا", "محمد", "فاطمه", "حسین", "مریم", "رضا", "سارا")
_FAMILY = ("کریمی", "احمدی", "رضایی", "موسوی", "حسینی", "محمدی", "جعفری", "صادقی")


def national_code(i: int) -> str:
    """A made-up 10-digit national code with a valid check digit, distinct per ``i``."""
    head = f"{(i * 7919 + 1234567) % 1_000_000_000:09d}"
    s = sum(int(d) * (10 - k) for k, d in enumerate(head))
    r = s % 11
    return head + str(r if r < 2 else 11 - r)


def patient_name(i: int) -> str:
    return f"{_GIVEN[i % len(_GIVEN)]} {_FAMILY[(i // len(_GIVEN)) % len(_FAMILY)]}"


def hl7_message(i: int, *, adapter: str = "lis", body_size: int = 0) -> bytes:
    """A small ORU^R01 for patient ``i``; ``body_size`` pads an OBX to grow the message."""
    control = f"MSG{i:08d}"
    segs = [
        f"MSH|^~\\&|LIS|FAC|SEPAS|NODE|20250321093000||ORU^R01|{control}|P|2.5|||||||UTF-8",
        f"PID|1||MRN-{i}^^^FAC||{patient_name(i).replace(' ', '^')}||19800101|M|||||||||||"
        f"{national_code(i)}",
        "OBX|1|NM|GLU^Glucose||5.4|mmol/L|3.9-6.1|N|||F",
    ]
    if body_size:
        segs.append("NTE|1||" + "x" * body_size)
    return ("\r".join(segs) + "\r").encode()


def record_id(i: int, *, adapter: str = "lis") -> str:
    return hl7_id(NODE_ID, adapter, f"MSG{i:08d}", "20250321093000")


def make_record(
    i: int,
    *,
    service: Service | str = Service.LAB_RESULT,
    adapter: str = "lis",
    body_size: int = 0,
    include_raw: bool = True,
) -> Record:
    """Record number ``i``: the same ``i`` and ``adapter`` always give the same id (and
    the same bytes), so a second put of it is a duplicate. ``body_size`` adds that many
    bytes of filler to the body (and to the raw message when included)."""
    raw = hl7_message(i, adapter=adapter, body_size=body_size)
    body: dict[str, object] = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {
                "resource": {
                    "resourceType": "Patient",
                    "name": [{"text": patient_name(i)}],
                    "identifier": [{"value": national_code(i)}],
                }
            }
        ],
    }
    if body_size:
        body["note"] = "y" * body_size
    return Record(
        id=record_id(i, adapter=adapter),
        service=Service(service),
        occurred_at=datetime(2025, 3, 21, 9, 30, tzinfo=TEHRAN) + timedelta(seconds=i),
        captured_at=datetime(2025, 3, 21, 6, 0, 2, tzinfo=UTC),
        source=SourceRef(adapter=adapter, kind="hl7-mllp", ref=f"MSG{i:08d}"),
        patient=PatientRef(
            national_id=national_code(i), national_id_valid=True, local_id=f"MRN-{i}"
        ),
        body=body,
        raw=RawRef.of(raw, "application/hl7-v2", include=include_raw),
    )


def make_records(
    start: int, n: int, *, service: Service | str = Service.LAB_RESULT, **kw: object
) -> list[Record]:
    return [make_record(i, service=service, **kw) for i in range(start, start + n)]  # type: ignore[arg-type]


class FakeClock:
    """A clock tests move by hand: pass ``clock=fake`` to Buffer.open."""

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, secs: float) -> None:
        self.now += secs
