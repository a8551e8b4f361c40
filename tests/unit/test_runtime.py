"""The runtime (agent/runtime.py, agent/scheduler.py) with fake adapters and a FakeHub.

Fake adapters are registered through the runtime's injectable builder; the hub is
`agent.testing.FakeHub` behind ``httpx.MockTransport``, watched so that tests wait on
a condition instead of sleeping. One test runs the real ``sepas-agent run`` in a
subprocess to check what SIGTERM does. Patients are synthetic (tests.factories).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

import adapters
from agent import telemetry
from agent.adapter import Adapter, AdapterContext, Check, PollReport
from agent.buffer import Buffer, State, open_stats
from agent.config import (
    AdapterSettings,
    AgentConfig,
    BufferSettings,
    Duration,
    HubSettings,
    NodeSettings,
    TelemetrySettings,
    load_config,
)
from agent.errors import BackfillUnsupportedError, KeyFileError, PeerUnavailableError
from agent.keys import init_key
from agent.record import Record
from agent.runtime import Runtime, Timing, open_buffer, read_service_state
from agent.scheduler import backoff_delay
from agent.testing import FakeHub
from tests.factories import make_record, national_code, patient_name

NODE = "FAC-RT"
EXE = Path(sys.executable).parent / "sepas-agent"
#: Intervals for tests: the periodic sync is far away, so only a wake can be quick.
FAST = Timing(
    sync_every_secs=60.0,
    state_every_secs=0.5,
    retry_base_secs=0.1,
    retry_max_secs=1.0,
    prune_first_secs=3600.0,
    reconcile_first_secs=3600.0,
    stop_budget_secs=3.0,
    listener_stop_secs=1.0,
)
WAIT = 10.0


# -- fakes --------------------------------------------------------------------------


class FakePollerSettings(AdapterSettings):
    poll_every: Duration = timedelta(seconds=60)


class FakeListener:
    """Pushes records when the test calls `feed`, like an MLLP listener."""

    kind = "fake-listener"

    def __init__(self, settings: AdapterSettings, ctx: AdapterContext) -> None:
        self.name = settings.name
        self.ctx = ctx
        self.fail_starts = 0
        self.starts = 0
        self.stopped = False

    def checks(self) -> Sequence[Check]:
        return []

    def start(self) -> None:
        self.starts += 1
        if self.fail_starts > 0:
            self.fail_starts -= 1
            raise PeerUnavailableError("the port is not free yet")

    def stop(self, *, timeout_secs: float = 10.0) -> None:
        self.stopped = True

    def feed(self, records: Sequence[Record]) -> None:
        self.ctx.sink.put(records)
        self.ctx.on_committed()


class FakePoller:
    """Fails its first ``fail_polls`` polls, then commits ``per_poll`` new records."""

    kind = "fake-poller"

    def __init__(self, settings: AdapterSettings, ctx: AdapterContext) -> None:
        self.name = settings.name
        self.ctx = ctx
        self.fail_polls = 0
        self.per_poll = 2
        self.calls: list[float] = []
        self._next = 1000

    def checks(self) -> Sequence[Check]:
        return []

    def poll(self) -> PollReport:
        self.calls.append(time.monotonic())
        if self.fail_polls > 0:
            self.fail_polls -= 1
            raise PeerUnavailableError(f"HIS unreachable (patient {national_code(1)})")
        records = [make_record(self._next + i, adapter=self.name) for i in range(self.per_poll)]
        self._next += self.per_poll
        put = self.ctx.sink.put(records)
        self.ctx.on_committed()
        return PollReport(found=len(records), new=put.inserted, duplicates=put.duplicates)

    def backfill(self, since: date, until: date, **_: Any) -> PollReport:
        raise BackfillUnsupportedError("fake")


class WatchedHub:
    """A FakeHub whose requests a test can wait for."""

    def __init__(self, hub: FakeHub) -> None:
        self.hub = hub
        self.cond = threading.Condition()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.cond:
            response = self.hub(request)
            self.cond.notify_all()
            return response

    def wait(self, what: str, cond: Callable[[FakeHub], bool], timeout: float = WAIT) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: cond(self.hub), timeout):
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_for(what: str, cond: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)  # between polls of a bounded loop


# -- fixtures -----------------------------------------------------------------------


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.data_dir = tmp_path / "data"
        key = init_key(self.data_dir / "node.key")
        self.hub = WatchedHub(FakeHub(NODE, key.public_key()))
        self.logs = io.StringIO()
        self.runtimes: list[Runtime] = []
        self.fail_listener_starts = 0
        self.fail_polls = 0

    def build(self, settings: AdapterSettings, ctx: AdapterContext) -> Adapter:
        if settings.kind == "fake-listener":
            lst = FakeListener(settings, ctx)
            lst.fail_starts = self.fail_listener_starts
            return lst
        if settings.kind == "fake-poller":
            p = FakePoller(settings, ctx)
            p.fail_polls = self.fail_polls
            return p
        raise ModuleNotFoundError(f"no adapter module for kind {settings.kind!r}")

    def config(self, *adapter_settings: AdapterSettings) -> AgentConfig:
        return AgentConfig(
            node=NodeSettings(id=NODE, data_dir=self.data_dir),
            hub=HubSettings(url="http://127.0.0.1:9/"),
            buffer=BufferSettings(),
            telemetry=TelemetrySettings(listen="127.0.0.1:0", log_format="json"),
            adapters=adapter_settings,
        )

    def start(self, *adapter_settings: AdapterSettings, timing: Timing = FAST) -> Runtime:
        rt = Runtime(
            self.config(*adapter_settings),
            build_adapter=self.build,
            hub_transport=httpx.MockTransport(self.hub),
            timing=timing,
            log_stream=self.logs,
            rand=lambda: 1.0,
        )
        rt.start()
        self.runtimes.append(rt)
        return rt

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.logs.getvalue().splitlines() if line]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    for rt in e.runtimes:
        rt.stop()
    telemetry.unconfigure()


LIS = AdapterSettings(name="lis", kind="fake-listener")
HIS = FakePollerSettings(name="his", kind="fake-poller")


def phi_of(indices: range) -> list[str]:
    out: list[str] = []
    for i in indices:
        out += [national_code(i), patient_name(i)]
    return out


def metrics_text(rt: Runtime) -> str:
    host, port = rt.telemetry_address
    return httpx.get(f"http://{host}:{port}/metrics", timeout=5).text


# -- latency ------------------------------------------------------------------------


def test_records_reach_the_hub_within_seconds_because_a_commit_wakes_the_sync(
    env: Env,
) -> None:
    rt = env.start(LIS)
    env.hub.wait("the first sync's heartbeat", lambda h: len(h.heartbeats) >= 1)
    lst = rt.adapter("lis")
    assert isinstance(lst, FakeListener)
    t0 = time.monotonic()
    lst.feed([make_record(i) for i in range(5)])
    env.hub.wait("5 records at the hub", lambda h: len(h.records) == 5)
    latency = time.monotonic() - t0
    assert latency < 3.0, f"{latency:.2f} s: the commit did not wake the sync"
    assert latency < FAST.sync_every_secs / 10
    t1 = time.monotonic()
    lst.feed([make_record(i) for i in range(5, 8)])
    env.hub.wait("8 records at the hub", lambda h: len(h.records) == 8)
    assert time.monotonic() - t1 < 3.0, "a second commit wakes it too"


def test_log_lines_parse_as_json_and_carry_no_patient_data(env: Env) -> None:
    rt = env.start(LIS, HIS)
    lst = rt.adapter("lis")
    assert isinstance(lst, FakeListener)
    lst.feed([make_record(i) for i in range(4)])
    env.hub.wait("the records", lambda h: len(h.records) >= 4)
    rt.stop()
    docs = env.log_lines()
    assert {"runtime.starting", "runtime.started", "upload.batch_sent", "runtime.stopped"} <= {
        d["event"] for d in docs
    }
    text = env.logs.getvalue()
    for phi in phi_of(range(4)):
        assert phi not in text


# -- supervision --------------------------------------------------------------------


def test_a_failing_adapter_is_retried_with_backoff_and_does_not_stop_the_others(
    env: Env,
) -> None:
    env.fail_polls = 4
    env.fail_listener_starts = 2
    rt = env.start(LIS, HIS)
    his = rt.adapter("his")
    lis = rt.adapter("lis")
    assert isinstance(his, FakePoller)
    assert isinstance(lis, FakeListener)
    wait_for("the listener's third start", lambda: lis.starts == 3)
    lis.feed([make_record(i) for i in range(3)])
    env.hub.wait("the listener's records", lambda h: len(h.records) >= 3)
    wait_for("the fifth poll (the first to succeed)", lambda: len(his.calls) >= 5)
    env.hub.wait("the poller's records", lambda h: len(h.records) >= 5)
    gaps = [b - a for a, b in zip(his.calls, his.calls[1:5], strict=False)]
    expected = [backoff_delay(n, base=0.1, cap=1.0, rand=lambda: 1.0) for n in (1, 2, 3, 4)]
    assert expected == pytest.approx([0.1, 0.2, 0.4, 0.8])
    for gap, want in zip(gaps, expected, strict=True):
        assert gap >= want * 0.9, (gaps, expected)
    assert gaps == sorted(gaps), "the waits grow"
    m = rt.metrics.registry.get_sample_value
    assert m("sepas_adapter_errors_total", {"adapter": "his", "error": "PeerUnavailableError"}) == 4
    assert m("sepas_adapter_errors_total", {"adapter": "lis", "error": "PeerUnavailableError"}) == 2
    assert m("sepas_adapter_up", {"adapter": "his"}) == 1
    docs = env.log_lines()
    failed = [d for d in docs if d["event"] == "adapter.poll_failed"]
    assert len(failed) == 1, "repeats of one failure are logged once a minute"
    recovered = [d for d in docs if d["event"] == "adapter.recovered"]
    assert {d["adapter"] for d in recovered} == {"his", "lis"}
    assert national_code(1) not in env.logs.getvalue(), "the PHI guard hashed the message"


def test_an_adapter_that_cannot_be_built_is_reported_and_the_rest_runs(env: Env) -> None:
    broken = AdapterSettings(name="pacs", kind="not-written-yet")
    rt = env.start(broken, LIS)
    lis = rt.adapter("lis")
    assert isinstance(lis, FakeListener)
    lis.feed([make_record(1)])
    env.hub.wait("the listener's record", lambda h: len(h.records) == 1)
    state = read_service_state(env.data_dir)
    assert state is not None
    assert state["adapters"]["pacs"]["state"] == "failing"
    assert state["adapters"]["pacs"]["last_error"]["error"] == "ModuleNotFoundError"
    assert state["adapters"]["lis"]["state"] == "running"


def test_healthz_answers_503_naming_an_adapter_that_has_failed_for_long(env: Env) -> None:
    env.fail_polls = 10**6
    timing = Timing(**{**_fields(FAST), "unhealthy_after_secs": 0.3})
    rt = env.start(HIS, LIS, timing=timing)
    host, port = rt.telemetry_address
    url = f"http://{host}:{port}/healthz"
    wait_for("/healthz to fail", lambda: httpx.get(url, timeout=5).status_code == 503)
    body = httpx.get(url, timeout=5).json()
    assert body["status"] == "failing"
    assert any("adapter his has failed" in r for r in body["reasons"]), body
    assert body["adapters"] == {"his": "failing", "lis": "running"}


def _fields(t: Timing) -> dict[str, Any]:
    return {name: getattr(t, name) for name in t.__dataclass_fields__}


# -- telemetry ----------------------------------------------------------------------


def test_healthz_and_metrics_are_served_on_loopback_with_sepas_names_and_few_labels(
    env: Env,
) -> None:
    rt = env.start(LIS)
    host, port = rt.telemetry_address
    assert host == "127.0.0.1"
    assert port > 0
    lst = rt.adapter("lis")
    assert isinstance(lst, FakeListener)
    lst.feed([make_record(i) for i in range(3)])
    env.hub.wait("3 records", lambda h: len(h.records) == 3)
    health = httpx.get(f"http://{host}:{port}/healthz", timeout=5)
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    wait_for(
        "the sync's numbers",
        lambda: (
            'sepas_records_sent_total{adapter="lis",service="lab-result"} 3.0'
            in metrics_text(rt).replace(
                'service="lab-result",adapter="lis"', 'adapter="lis",service="lab-result"'
            )
        ),
    )
    text = metrics_text(rt)
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    names = {s.split("{")[0].split(" ")[0] for s in samples}
    assert all(n.startswith("sepas_") for n in names), names
    for wanted in (
        "sepas_records_received_total",
        "sepas_records_sent_total",
        "sepas_buffer_used_bytes",
        "sepas_buffer_pending_records",
        "sepas_buffer_oldest_pending_age_seconds",
        "sepas_upload_duration_seconds_bucket",
        "sepas_upload_responses_total",
        "sepas_hub_clock_skew_seconds",
        "sepas_sync_last_success_timestamp_seconds",
    ):
        assert wanted in names, wanted
    assert len(samples) < 120, "no label explosion"
    assert 'sepas_upload_responses_total{status="200"}' in text
    for phi in phi_of(range(3)):
        assert phi not in text


def test_the_state_file_tells_a_running_service_from_a_stopped_one(env: Env) -> None:
    rt = env.start(LIS, HIS)
    wait_for(
        "a poll in the state file",
        lambda: (
            ((read_service_state(env.data_dir) or {}).get("adapters") or {})
            .get("his", {})
            .get("last_poll")
            is not None
        ),
    )
    state = read_service_state(env.data_dir)
    assert state is not None
    assert state["service_running"] is True
    assert state["pid"] == os.getpid()
    assert state["adapters"]["his"]["role"] == "poller"
    assert state["adapters"]["lis"]["role"] == "listener"
    assert state["adapters"]["his"]["last_poll"]["new"] == 2
    assert state["jobs"]["sync"]["runs"] >= 1
    assert state["health"]["ok"] is True
    assert (env.data_dir / "agent.state.json").stat().st_mode & 0o077 == 0
    rt.stop()
    after = read_service_state(env.data_dir)
    assert after is not None
    assert after["running"] is False
    assert after["service_running"] is False
    assert read_service_state(env.data_dir, now=time.time() + 3600) is not None


def test_stop_stops_listeners_and_leaves_nothing_inflight(env: Env) -> None:
    rt = env.start(LIS)
    lst = rt.adapter("lis")
    assert isinstance(lst, FakeListener)
    lst.feed([make_record(i) for i in range(20)])
    t0 = time.monotonic()
    rt.stop()
    assert time.monotonic() - t0 < FAST.stop_budget_secs + 1
    assert lst.stopped
    stats = open_stats(env.data_dir)
    assert stats is not None
    assert stats.total(State.INFLIGHT) == 0
    assert stats.total(State.PENDING) + stats.total(State.SENT) == 20


def test_a_node_key_readable_by_others_refuses_to_start(env: Env) -> None:
    (env.data_dir / "node.key").chmod(0o644)
    rt = Runtime(
        env.config(LIS),
        build_adapter=env.build,
        hub_transport=httpx.MockTransport(env.hub),
        timing=FAST,
        log_stream=env.logs,
    )
    assert rt.run_forever(install_signals=False) == 1
    (failed,) = [d for d in env.log_lines() if d["event"] == "runtime.start_failed"]
    assert failed["error"] == KeyFileError.__name__
    assert failed["level"] == "error"
    assert not (env.data_dir / "agent.state.json").exists()


# -- the real process: SIGTERM ------------------------------------------------------


def _run_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SEPAS_AGENT_")}


def test_sigterm_exits_0_within_10_s_and_releases_the_leases_of_a_stuck_upload(
    tmp_path: Path,
) -> None:
    # A hub that accepts connections and never answers: the upload hangs in its
    # request (hub.timeout_secs = 30 s) when SIGTERM comes.
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(16)
        port = blackhole.getsockname()[1]
        cfg_path = tmp_path / "agent.toml"
        cfg_path.write_text(
            textwrap.dedent(
                f"""\
                [node]
                id = "{NODE}"
                data_dir = "{tmp_path / "data"}"
                [hub]
                url = "http://127.0.0.1:{port}/"
                [telemetry]
                listen = "127.0.0.1:0"
                """
            ),
            encoding="utf-8",
        )
        cfg = load_config(cfg_path, adapters.KINDS)
        init_key(cfg.node.key_path)
        buffer: Buffer = open_buffer(cfg)
        try:
            buffer.put([make_record(i) for i in range(30)])
        finally:
            buffer.close()
        proc = subprocess.Popen(
            [str(EXE), "run", "-c", str(cfg_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_run_env(),
        )
        try:

            def leased() -> bool:
                stats = open_stats(cfg.node.data_dir)
                return stats is not None and stats.total(State.INFLIGHT) > 0

            wait_for("the upload to lease records", leased, timeout=20)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=15)
            elapsed = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    assert elapsed < 10.0, f"stopped after {elapsed:.1f} s"
    stats = open_stats(cfg.node.data_dir)
    assert stats is not None
    assert stats.total(State.INFLIGHT) == 0
    assert stats.total(State.PENDING) == 30
    docs = [json.loads(line) for line in out.splitlines() if line.strip()]
    events = [d["event"] for d in docs]
    assert "runtime.signal" in events
    assert "runtime.upload_abandoned" in events
    assert events[-1] == "runtime.stopped"
    for phi in phi_of(range(30)):
        assert phi not in out + err
    state = read_service_state(cfg.node.data_dir)
    assert state is not None
    assert state["service_running"] is False
