"""Logs, the PHI guard, the repeat limiter, metrics and the /healthz + /metrics listener
(agent/telemetry.py). Real sockets on 127.0.0.1 port 0; patients are synthetic."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from agent import telemetry
from agent.adapter import AdapterContext
from agent.buffer import BufferStats
from agent.config import TelemetrySettings
from agent.errors import ConfigError
from agent.testing import FakeClock
from tests.factories import make_record, national_code

KEY = b"k" * 32
CODE = national_code(7)  # ten ASCII digits, valid check digit
PERSIAN = CODE.translate(str.maketrans("0123456789", "۰۱۲۳۴۵۶۷۸۹"))
ARABIC_INDIC = CODE.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))
DASHED = f"{CODE[:3]}-{CODE[3:9]}-{CODE[9]}"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    telemetry.configure(TelemetrySettings(log_format="json"), stream=stream, hash_key=KEY)
    yield stream
    telemetry.unconfigure()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


# -- formats --------------------------------------------------------------------------


def test_json_log_lines_parse_with_ts_level_logger_event_msg_and_extras(
    logs: io.StringIO,
) -> None:
    logging.getLogger("agent.x").info(
        "Batch uploaded: %d accepted.", 5, extra={"event": "upload.batch_sent", "count": 5}
    )
    (doc,) = lines(logs)
    assert doc["level"] == "info"
    assert doc["logger"] == "agent.x"
    assert doc["event"] == "upload.batch_sent"
    assert doc["msg"] == "Batch uploaded: 5 accepted."
    assert doc["count"] == 5
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["ts"])


def test_auto_format_is_json_off_a_terminal_and_text_on_one() -> None:
    piped, tty = io.StringIO(), Tty()
    try:
        telemetry.configure(TelemetrySettings(log_format="auto"), stream=piped)
        logging.getLogger("agent.x").warning("Piped.", extra={"event": "t.piped"})
        telemetry.configure(TelemetrySettings(log_format="auto"), stream=tty)
        logging.getLogger("agent.x").warning("On a terminal.", extra={"event": "t.tty"})
    finally:
        telemetry.unconfigure()
    assert json.loads(piped.getvalue())["event"] == "t.piped"
    text = tty.getvalue()
    assert "On a terminal." in text
    assert "t.tty" in text
    assert not text.lstrip().startswith("{")


def test_log_level_comes_from_config() -> None:
    stream = io.StringIO()
    try:
        telemetry.configure(
            TelemetrySettings(log_format="json", log_level="warning"), stream=stream
        )
        logging.getLogger("agent.x").info("Not shown.")
        logging.getLogger("agent.x").warning("Shown.", extra={"event": "t.shown"})
    finally:
        telemetry.unconfigure()
    assert [d["msg"] for d in lines(stream)] == ["Shown."]


def test_third_party_loggers_are_tamed_and_pynetdicom_identifiers_are_off(
    logs: io.StringIO,
) -> None:
    import pynetdicom._config as pdc

    pdc.LOG_REQUEST_IDENTIFIERS = True
    pdc.LOG_RESPONSE_IDENTIFIERS = True
    telemetry.configure(TelemetrySettings(log_format="json"), stream=logs)
    assert not pdc.LOG_REQUEST_IDENTIFIERS
    assert not pdc.LOG_RESPONSE_IDENTIFIERS
    for name in ("pynetdicom", "httpx", "httpcore"):
        assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING
    logging.getLogger("httpx").info("HTTP Request: POST https://hub/v1/batches")
    assert lines(logs) == []


# -- the PHI guard --------------------------------------------------------------------


@pytest.mark.parametrize("written", [CODE, PERSIAN, ARABIC_INDIC, DASHED])
def test_phi_guard_hashes_a_national_code_that_slipped_into_a_message(
    logs: io.StringIO, written: str
) -> None:
    logging.getLogger("agent.x").warning(
        "Patient %s refused, also in PID-19 |%s|",
        written,
        written,
        extra={"event": "t.phi", "detail": f"nid={written}", "more": {"list": [written]}},
    )
    text = logs.getvalue()
    for form in (CODE, PERSIAN, ARABIC_INDIC, DASHED):
        assert form not in text
    hashed = "nc:" + AdapterContext("N", sink=None, log_key=KEY).patient_hash(CODE)  # type: ignore[arg-type]
    (doc,) = lines(logs)
    assert doc["msg"] == f"Patient {hashed} refused, also in PID-19 |{hashed}|"
    assert doc["detail"] == f"nid={hashed}"
    assert doc["more"] == {"list": [hashed]}


def test_phi_guard_hashes_national_codes_in_tracebacks(logs: io.StringIO) -> None:
    try:
        raise KeyError(CODE)
    except KeyError:
        logging.getLogger("agent.x").exception("Lookup failed.", extra={"event": "t.exc"})
    text = logs.getvalue()
    assert CODE not in text
    assert "KeyError" in lines(logs)[0]["exc"]


def test_phi_guard_leaves_ids_and_longer_numbers_alone() -> None:
    for text in (
        "record a1234567890b",  # a hex record id prefix
        "12345678901 bytes",  # eleven digits
        "batch 0190f3c2-7d1e-7c55-9a3b-1234567890ab",
        "took 123456789 us",
    ):
        assert telemetry.scrub(text) == text


# -- repetition -----------------------------------------------------------------------


def _record(event: str, error: str = "PeerUnavailableError") -> logging.LogRecord:
    rec = logging.LogRecord("agent.x", logging.WARNING, __file__, 1, "Failed.", None, None)
    rec.event = event
    rec.error = error
    return rec


def test_repeated_errors_are_logged_once_per_minute_with_a_count() -> None:
    clock = FakeClock(0.0)
    limiter = telemetry.RepeatLimiter(clock=clock)
    assert limiter.filter(_record("sql.poll_failed"))
    for _ in range(5):
        clock.advance(10)
        assert not limiter.filter(_record("sql.poll_failed"))
    assert limiter.filter(_record("sql.poll_failed", "SqlQueryError")), "other error type"
    assert limiter.filter(_record("hl7.refused")), "other event"
    clock.advance(11)
    rec = _record("sql.poll_failed")
    assert limiter.filter(rec)
    assert rec.suppressed == 5  # type: ignore[attr-defined]
    info = logging.LogRecord("agent.x", logging.INFO, __file__, 1, "Fine.", None, None)
    assert all(limiter.filter(info) for _ in range(3)), "INFO is never limited"


def test_a_recovery_is_logged_at_info_with_the_failure_count(logs: io.StringIO) -> None:
    failures = telemetry.FailureLog()
    logger = logging.getLogger("agent.x")
    for _ in range(3):
        failures.failed(
            logger,
            "his",
            "Poll failed.",
            event="adapter.poll_failed",
            error=ConnectionRefusedError(),
        )
    assert failures.succeeded(logger, "his", "Recovered after %d failures.", event="t.ok") == 3
    assert failures.succeeded(logger, "his", "Recovered after %d failures.", event="t.ok") == 0
    docs = lines(logs)
    assert [d["level"] for d in docs] == ["warning", "info"], "the repeats were limited"
    assert docs[1]["msg"] == "Recovered after 3 failures."
    assert docs[1]["failures"] == 3


# -- metrics --------------------------------------------------------------------------


def _names(exposition: str) -> set[str]:
    return {
        line.split("{")[0].split(" ")[0]
        for line in exposition.splitlines()
        if line and not line.startswith("#")
    }


def test_metric_names_start_with_sepas_and_labels_stay_bounded() -> None:
    m = telemetry.Metrics()
    for i in range(telemetry.MAX_LABEL_VALUES + 50):
        m.adapter_error(f"a{i}", ValueError())
    m.adapter_error("bad label{}", ValueError())
    text = m.render().decode()
    assert all(n.startswith("sepas_") for n in _names(text)), _names(text)
    adapters = set(re.findall(r'sepas_adapter_errors_total\{adapter="([^"]+)"', text))
    assert len(adapters) == telemetry.MAX_LABEL_VALUES + 1
    assert "other" in adapters


def test_records_are_counted_by_service_and_adapter_received_sent_rejected() -> None:
    m = telemetry.Metrics()
    recs = [make_record(i, adapter="lis") for i in range(3)]
    m.records_received(recs, 2)

    class Item:
        def __init__(self, i: int) -> None:
            rec = make_record(i, adapter="lis")
            self.id, self.service, self.envelope = rec.id, rec.service.value, rec.to_json()

    m.records_settled("accepted", [Item(0), Item(1)])
    m.records_settled("duplicate", [Item(2)])
    m.records_settled("rejected", [Item(3)])
    m.batch_answered(200, 0.2)
    m.batch_answered(None, 30.0)
    text = m.render().decode()
    labels = 'adapter="lis",service="lab-result"'
    assert f"sepas_records_received_total{{{labels}}} 2.0" in text.replace(
        'service="lab-result",adapter="lis"', labels
    )
    reg = m.registry
    sample = reg.get_sample_value
    ls = {"service": "lab-result", "adapter": "lis"}
    assert sample("sepas_records_received_total", ls) == 2
    assert sample("sepas_records_sent_total", ls) == 3
    assert sample("sepas_records_duplicate_total", ls) == 1
    assert sample("sepas_records_rejected_total", ls) == 1
    assert sample("sepas_upload_responses_total", {"status": "200"}) == 1
    assert sample("sepas_upload_responses_total", {"status": "none"}) == 1
    assert sample("sepas_upload_duration_seconds_count") == 1


def test_an_observer_error_is_logged_never_raised(logs: io.StringIO) -> None:
    m = telemetry.Metrics()
    m.records_settled("accepted", [object()])  # type: ignore[list-item]  # a caller bug
    m.records_received([object()], 1)  # type: ignore[list-item]
    assert any(d["event"] == "telemetry.observer_failed" for d in lines(logs))


def _stats(**kw: Any) -> BufferStats:
    base: dict[str, Any] = {
        "counts": {("lab-result", "pending"): 4, ("lab-result", "sent"): 9},
        "oldest_pending_at": None,
        "quarantined": 1,
        "unmapped_raw": 0,
        "used_bytes": 12345,
        "file_bytes": 20000,
        "blob_count": 0,
        "blob_bytes": 0,
        "cursors": {},
    }
    base.update(kw)
    return BufferStats(**base)


def test_buffer_numbers_are_read_at_scrape_time_and_cached() -> None:
    reads: list[int] = []
    clock = FakeClock(0.0)

    def read() -> BufferStats:
        reads.append(1)
        return _stats()

    m = telemetry.Metrics()
    m.watch_buffer(telemetry.CachedStats(read, ttl=5.0, clock=clock), max_bytes=10**6)
    assert reads == [], "registering does not read"
    m.render()
    m.render()
    assert len(reads) == 1
    clock.advance(5)
    m.render()
    assert len(reads) == 2
    s = m.registry.get_sample_value
    assert s("sepas_buffer_pending_records") == 4
    assert s("sepas_buffer_records", {"state": "sent"}) == 9
    assert s("sepas_buffer_used_bytes") == 12345
    assert s("sepas_buffer_capacity_bytes") == 10**6
    assert s("sepas_buffer_oldest_pending_age_seconds") == 0
    assert s("sepas_buffer_quarantined_records") == 1


# -- the listener ---------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[tuple[telemetry.TelemetryServer, list[telemetry.Health]]]:
    health = [telemetry.Health(True, {"reasons": []})]
    m = telemetry.Metrics()
    m.adapter_up("lis", True)
    srv = telemetry.TelemetryServer("127.0.0.1:0", metrics=m, health=lambda: health[0])
    srv.start()
    yield srv, health
    srv.stop()


def test_healthz_and_metrics_are_served_and_nothing_else(
    server: tuple[telemetry.TelemetryServer, list[telemetry.Health]],
) -> None:
    srv, health = server
    host, port = srv.address
    assert host == "127.0.0.1"
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=5) as c:
        r = c.get("/healthz")
        assert r.status_code == 200
        assert r.json()["status"] == "ok"
        health[0] = telemetry.Health(False, {"reasons": ["adapter his has failed for 400 s"]})
        r = c.get("/healthz")
        assert r.status_code == 503
        assert r.json() == {"status": "failing", "reasons": ["adapter his has failed for 400 s"]}
        r = c.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        assert 'sepas_adapter_up{adapter="lis"} 1.0' in r.text
        assert c.get("/").status_code == 404
        assert c.get("/metrics/../debug").status_code == 404
        assert c.post("/metrics").status_code == 501


def test_a_listen_address_in_use_is_a_config_error_naming_the_key() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = telemetry.TelemetryServer(
            f"127.0.0.1:{port}",
            metrics=telemetry.Metrics(),
            health=lambda: telemetry.Health(True, {}),
        )
        with pytest.raises(ConfigError) as info:
            srv.start()
    assert "telemetry.listen" in str(info.value)


def test_uncaught_thread_errors_are_logged_through_the_guard(logs: io.StringIO) -> None:
    def boom() -> None:
        raise RuntimeError(f"bad row for {CODE}")

    t = threading.Thread(target=boom, name="worker-x")
    t.start()
    t.join()
    text = logs.getvalue()
    assert "thread.crashed" in text
    assert CODE not in text
    assert "worker-x" in text
