"""`sepas-agent demo`: the whole flow on one machine, in well under a minute.

What it does, with nothing but this package and 127.0.0.1:

1. makes a work directory (a temporary one unless given) holding a reference hub
   (``hub.toml``, a SQLite store, a blob directory) served by uvicorn on a free port
   in a background thread; the node's keys, registered at that hub; a HIS stand-in (a
   SQLite file with a view of referrals); and an agent config ``agent.toml`` (node
   DEMO-0001, an ``hl7-mllp`` listener, an ``sql`` poller) that the user can read;
2. starts the real agent (`agent.runtime.Runtime`) in this process; its log goes to
   ``agent.log`` in the work directory;
3. acts as a LIS: sends synthetic HL7 v2 messages over real MLLP (admissions with
   Persian names in UTF-8 and in windows-1256 with an empty MSH-18, lab results, a
   pathology report, prescriptions, national codes in Persian digits and with a
   wrong check digit, and one malformed message), counting the ACKs;
4. waits (bounded) until the hub holds every accepted record and the buffer shows them
   sent, then prints what happened;
5. stops the agent and the hub and removes the temporary directory.

Every patient is synthetic (national codes from `agent.nationalcode.make_valid`).
Never: print or log patient data (the summary shows counts, services and the
quarantine's reason codes only); reach anything but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, TextIO
from zoneinfo import ZoneInfo

import httpx
import tomli_w
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

import adapters
from adapters.hl7.ack import parse_ack
from adapters.hl7_mllp.framing import frame
from agent import telemetry
from agent.buffer import BufferStats, State, open_stats
from agent.config import DATA_DIR_ENV, AgentConfig, load_config
from agent.keys import fingerprint, init_key, public_pem
from agent.nationalcode import make_valid
from agent.runtime import Runtime, Timing
from hub.app import create_app
from hub.settings import load_settings
from hub.store_sqlite import SqliteStore

__all__ = ["NODE_ID", "DemoResult", "run_demo"]

NODE_ID: Final = "DEMO-0001"
#: How long the demo waits for every accepted record to reach the hub.
WAIT_SECS: Final = 30.0
READY_SECS: Final = 10.0
ACK_TIMEOUT_SECS: Final = 10.0
HIS_ROWS: Final = 3
TEHRAN: Final = ZoneInfo("Asia/Tehran")

PERSIAN_DIGITS: Final = str.maketrans("0123456789", "۰۱۲۳۴۵۶۷۸۹")
ZWNJ: Final = "\u200c"
# Synthetic names only (common Persian names, never a real patient's record).
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
# As a windows-1256 system stores them: Arabic yeh and kaf (the intake folds them).
NAMES_1256: Final = (("گلپايگاني", "پريسا"), ("کريمي", "علي"), ("رحيمي", "مهدي"))


# ------------------------------------------------------------------ messages ---------


@dataclass(frozen=True, slots=True)
class Message:
    kind: str  # what the summary calls it
    control_id: str
    data: bytes
    expect: str  # MSA-1 the agent should answer


def _national_code(i: int) -> str:
    """A synthetic valid national code, different for each ``i``."""
    prefix = f"{(123_457 * (i + 11)) % 1_000_000_000:09d}"
    if len(set(prefix)) == 1:
        prefix = "0" + prefix[1:-1] + "1"
    return make_valid(prefix)


def _bad_check_digit(code: str) -> str:
    return code[:9] + str((int(code[9]) + 1) % 10)


def _msh(msg_type: str, control: str, when: str, *, charset: str = "UNICODE UTF-8") -> str:
    fields = ["MSH", "^~\\&", "LIS", "DEMO-LAB", "SEPAS", NODE_ID, when, "", msg_type, control]
    fields += ["P", "2.5"]
    if charset:
        fields += ["", "", "", "", "", charset]
    return "|".join(fields)


def _pid(family: str, given: str, nc: str, mrn: str) -> str:
    return f"PID|1||{mrn}^^^DEMO^MR~{nc}^^^NOCR^NNIRN||{family}^{given}||19800321|F"


def _obr(n: int, service: str, when: str, obr24: str = "") -> str:
    f = ["OBR", str(n), f"ORD{n}", f"FIL{n}", service, "", "", when]
    return "|".join([*f, *([""] * 16), obr24, "F"])


def _join(*segments: str) -> str:
    return "\r".join(segments) + "\r"


KINDS: Final = (
    "ADT^A01 admission, Persian name (UTF-8)",
    "ADT^A04 registration, windows-1256, empty MSH-18",
    "ORU^R01 lab result",
    "ORU^R01 pathology report (OBR-24 SP)",
    "RDE^O11 prescription",
    "ORU^R01 national code in Persian digits",
    "ORU^R01 national code with a wrong check digit",
)
MALFORMED_KIND: Final = "ORU^R01 without a PID segment (malformed)"


def build_messages(count: int, *, prefix: str, now: datetime | None = None) -> list[Message]:
    """``count`` synthetic messages cycling through `KINDS`, with exactly one malformed
    message (ORU without PID: the agent must answer AE and quarantine it) in the
    middle. Control ids are ``<prefix>-<n>``."""
    if count < 2:
        raise ValueError("the demo sends at least 2 messages")
    base = (now or datetime.now(TEHRAN)).astimezone(TEHRAN) - timedelta(hours=1)
    bad_at = count // 2
    out: list[Message] = []
    good = 0
    for n in range(count):
        control = f"{prefix}-{n + 1:04d}"
        when = (base + timedelta(seconds=n)).strftime("%Y%m%d%H%M%S")
        mrn = f"DEMO-{n + 1:05d}"
        if n == bad_at:
            text = _join(
                _msh("ORU^R01", control, when),
                _obr(1, "GLU^Glucose^L", when),
                "OBX|1|NM|GLU^Glucose||5.4|mmol/L|||||F",
            )
            out.append(Message(MALFORMED_KIND, control, text.encode("utf-8"), "AE"))
            continue
        k = good % len(KINDS)
        family, given = NAMES[good % len(NAMES)]
        nc = _national_code(n)
        good += 1
        codec = "utf-8"
        if k == 0:
            text = _join(
                _msh("ADT^A01", control, when),
                f"EVN|A01|{when}",
                _pid(family, given, nc, mrn),
                "PV1|1|I|WARD1^101^1",
            )
        elif k == 1:
            family, given = NAMES_1256[n % len(NAMES_1256)]
            codec = "cp1256"
            text = _join(
                _msh("ADT^A04", control, when, charset=""),
                f"EVN|A04|{when}",
                _pid(family, given, nc, mrn),
                "PV1|1|O|CLINIC",
            )
        elif k == 3:
            text = _join(
                _msh("ORU^R01", control, when),
                _pid(family, given, nc, mrn),
                _obr(1, "88305^Surgical pathology^CPT", when, obr24="SP"),
                "OBX|1|TX|22634-0^Pathology report^LN||نمونه بافت: بدون شواهد بدخیمی||||||F",
            )
        elif k == 4:
            text = _join(
                _msh("RDE^O11^RDE_O11", control, when),
                _pid(family, given, nc, mrn),
                f"ORC|NW|RX-{n + 1}|||||||{when}",
                "RXE|^^^20250321^^R|AMOX500^Amoxicillin 500 mg^LOCAL|500||mg|CAP|"
                "هر ۸ ساعت یک عدد، بعد از غذا",
                "RXR|PO",
            )
        else:  # 2, 5, 6: lab results
            if k == 5:
                nc = nc.translate(PERSIAN_DIGITS)
            elif k == 6:
                nc = _bad_check_digit(nc)
            text = _join(
                _msh("ORU^R01", control, when),
                _pid(family, given, nc, mrn),
                _obr(1, "GLU^Glucose^L", when),
                "OBX|1|NM|GLU^Glucose||5.4|mmol/L|||||F",
            )
        out.append(Message(KINDS[k], control, text.encode(codec), "AA"))
    return out


# ------------------------------------------------------------------ the LIS ----------


class MllpSender:
    """A LIS: one MLLP connection, one message at a time, each waiting for its ACK."""

    def __init__(self, host: str, port: int) -> None:
        self._sock = socket.create_connection((host, port), timeout=ACK_TIMEOUT_SECS)
        self._buf = b""

    def send(self, payload: bytes) -> dict[str, str]:
        """Send one message; its ACK's fields (`parse_ack`).

        Raises:
            OSError: the connection failed or no ACK came within the timeout.
        """
        self._sock.sendall(frame(payload))
        while b"\x1c\r" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("the agent closed the connection before answering")
            self._buf += chunk
        block, _, self._buf = self._buf.partition(b"\x1c\r")
        return parse_ack(block[block.find(b"\x0b") + 1 :])

    def close(self) -> None:
        self._sock.close()


# ------------------------------------------------------------------ the hub ----------


class _Hub:
    """The reference hub under uvicorn on 127.0.0.1, in a background thread."""

    def __init__(self, settings_path: Path) -> None:
        import uvicorn  # the hub's server; only the demo and `sepas-hub` need it

        settings = load_settings(settings_path)
        self.store = SqliteStore(settings.store.url.removeprefix("sqlite://"))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port: int = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        config = uvicorn.Config(
            create_app(settings, self.store),
            log_config=None,  # uvicorn's loggers go where the agent's go (agent.log)
            log_level="warning",
            lifespan="on",
            ws="none",
            proxy_headers=False,
            server_header=False,
            date_header=False,  # the app sends Date itself
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._sock = sock
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [sock]},
            name="demo-hub",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + READY_SECS
        with httpx.Client(trust_env=False, timeout=1.0) as client:
            while True:
                if not self._thread.is_alive():
                    raise RuntimeError("the hub's server thread exited before it was ready")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(self.url + "v1/health").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the hub did not answer within {READY_SECS:.0f} s")
                time.sleep(0.02)  # between polls of a bounded loop

    def count(self) -> dict[str, int]:
        return self.store.counts_by_service(NODE_ID)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._sock.close()
        self.store.close()


# ------------------------------------------------------------------ setup ------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_his(path: Path, *, rows: int, now: datetime) -> None:
    """The HIS stand-in: referrals in table ``referral`` behind view ``v_referral``."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(
            """
            CREATE TABLE referral (id INTEGER PRIMARY KEY, nid TEXT, mrn TEXT,
                                   family TEXT, given TEXT, referred_at TEXT,
                                   changed_at TEXT, reason TEXT);
            CREATE VIEW v_referral AS SELECT * FROM referral;
            """
        )
        for i in range(1, rows + 1):
            family, given = NAMES[(i + 3) % len(NAMES)]
            at = (now - timedelta(minutes=30 - i)).strftime("%Y-%m-%d %H:%M:%S")
            db.execute(
                "INSERT INTO referral VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (i, _national_code(1000 + i), f"HIS-{i:05d}", family, given, at, at, "cardio"),
            )


def _agent_toml(
    workdir: Path, *, hub_url: str, mllp_port: int, telemetry_port: int, his: Path
) -> dict[str, Any]:
    return {
        "node": {"id": NODE_ID, "data_dir": str(workdir / "data")},
        "hub": {"url": hub_url},
        "buffer": {"max_bytes": 1_000_000_000},
        "telemetry": {
            "listen": f"127.0.0.1:{telemetry_port}",
            "log_format": "json",
            "log_level": "info",
        },
        "adapters": [
            {
                "name": "lis",
                "kind": "hl7-mllp",
                "listen": f"127.0.0.1:{mllp_port}",
                "allow": ["127.0.0.1/32"],
                "encoding": "cp1256",
            },
            {
                "name": "his-db",
                "kind": "sql",
                "url": f"sqlite:///{his}",
                "query": "SELECT * FROM v_referral WHERE changed_at > :cursor ORDER BY changed_at",
                "cursor_column": "changed_at",
                "initial_cursor": "2000-01-01",
                "key_columns": ["id"],
                "service": "referral",
                "poll_every": "1s",
                "fields": {
                    "occurred_at": "referred_at",
                    "national_id": "nid",
                    "local_id": "mrn",
                    "family": "family",
                    "given": "given",
                },
            },
        ],
    }


@contextlib.contextmanager
def _without_env(name: str) -> Iterator[None]:
    """The demo's data directory is its own, whatever ``$SEPAS_AGENT_DATA_DIR`` says."""
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


# ------------------------------------------------------------------ running ----------


@dataclass
class DemoResult:
    """What the demo measured; `run_demo` prints it."""

    sent: int = 0
    acks: Counter[str] = field(default_factory=Counter)
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)  # control ids with the wrong ACK
    expected_at_hub: int = 0
    hub: dict[str, int] = field(default_factory=dict)
    stats: BufferStats | None = None
    quarantine_reasons: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    secs: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def _send_all(
    messages: list[Message], host: str, port: int, console: Console, result: DemoResult
) -> None:
    sender = MllpSender(host, port)
    try:
        if console.is_terminal:
            columns = (
                TextColumn("LIS → agent (MLLP)"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
            )
            with Progress(*columns, console=console, transient=False) as progress:
                task = progress.add_task("", total=len(messages))
                for msg in messages:
                    _send_one(sender, msg, result)
                    progress.update(task, advance=1, description=_ack_text(result.acks))
        else:
            step = max(1, len(messages) // 4)
            for i, msg in enumerate(messages, 1):
                _send_one(sender, msg, result)
                if i % step == 0 or i == len(messages):
                    console.print(f"  sent {i}/{len(messages)}: {_ack_text(result.acks)}")
    finally:
        sender.close()


def _send_one(sender: MllpSender, msg: Message, result: DemoResult) -> None:
    ack = sender.send(msg.data)
    code = ack.get("MSA-1", "?")
    result.sent += 1
    result.acks[code] += 1
    result.by_kind.setdefault(msg.kind, Counter())[code] += 1
    if code != msg.expect or ack.get("MSA-2") != msg.control_id:
        result.unexpected.append(f"{msg.control_id} ({msg.kind}): {code}, expected {msg.expect}")


def _ack_text(acks: Counter[str]) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted(acks.items())) or "-"


def _settled(stats: BufferStats | None, expected: int, quarantined: int) -> bool:
    return (
        stats is not None
        and stats.total(State.SENT) >= expected
        and stats.total(State.PENDING) + stats.total(State.INFLIGHT) == 0
        and stats.unmapped_raw == 0
        and stats.quarantined >= quarantined
    )


def _wait_for_hub(
    hub: _Hub, cfg: AgentConfig, result: DemoResult, *, quarantined: int, console: Console
) -> None:
    deadline = time.monotonic() + WAIT_SECS
    with console.status("waiting for the agent to upload everything to the hub…"):
        while True:
            result.hub = hub.count()
            result.stats = open_stats(cfg.node.data_dir)
            if sum(result.hub.values()) >= result.expected_at_hub and _settled(
                result.stats, result.expected_at_hub, quarantined
            ):
                return
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)  # between polls of a bounded loop


def _check(result: DemoResult, *, malformed: int) -> None:
    p = result.problems
    if result.unexpected:
        p.append(f"{len(result.unexpected)} messages got an unexpected ACK:")
        p.extend(f"  {u}" for u in result.unexpected[:10])
    at_hub = sum(result.hub.values())
    if at_hub != result.expected_at_hub:
        p.append(f"the hub holds {at_hub} records of this node, expected {result.expected_at_hub}")
    st = result.stats
    if st is None:
        p.append("the agent's buffer was never created")
        return
    if st.total(State.SENT) != result.expected_at_hub:
        p.append(f"the buffer shows {st.total(State.SENT)} sent, expected {result.expected_at_hub}")
    for state in (State.PENDING, State.INFLIGHT, State.DEAD):
        if st.total(state):
            p.append(f"{st.total(state)} records still {state.value} in the buffer")
    if st.unmapped_raw:
        p.append(f"{st.unmapped_raw} accepted messages were never mapped to records")
    last = (st.sync or {}).get("last_error") or (st.sync or {}).get("alarm")
    if p and isinstance(last, dict):
        p.append(f"the last upload failed: {last.get('status')} {last.get('message')}"[:300])
    if st.quarantined != malformed:
        p.append(f"{st.quarantined} messages quarantined, expected {malformed}")


def _report(result: DemoResult, cfg: AgentConfig, console: Console, his_rows: int) -> None:
    console.print()
    t = Table(title="1. the LIS sent HL7 v2 over MLLP; the agent answered", title_justify="left")
    t.add_column("message")
    t.add_column("sent", justify="right")
    t.add_column("ACK")
    for kind in (*KINDS, MALFORMED_KIND):
        codes = result.by_kind.get(kind)
        if codes:
            t.add_row(kind, str(sum(codes.values())), _ack_text(codes))
    t.add_row("[bold]total[/]", f"[bold]{result.sent}[/]", f"[bold]{_ack_text(result.acks)}[/]")
    console.print(t)
    console.print("   Bad or Persian-digit national codes: accepted and flagged, never dropped.")
    console.print(
        f"2. the agent also polled a HIS database (a SQLite view): {his_rows} referral rows."
    )
    st = result.stats
    sent = {}
    if st is not None:
        for (service, state), n in st.counts.items():
            if state == State.SENT:
                sent[service] = sent.get(service, 0) + n
    t = Table(title="3. records at the hub, by service", title_justify="left")
    t.add_column("service")
    t.add_column("at the hub", justify="right")
    t.add_column("sent by the agent", justify="right")
    for service in sorted(set(result.hub) | set(sent)):
        t.add_row(service, str(result.hub.get(service, 0)), str(sent.get(service, 0)))
    t.add_row(
        "[bold]total[/]",
        f"[bold]{sum(result.hub.values())}[/]",
        f"[bold]{sum(sent.values())}[/]",
    )
    console.print(t)
    if st is not None:
        totals = ", ".join(f"{s.value} {st.total(s)}" for s in State)
        console.print(f"4. the agent's buffer (data/buffer.db): {totals}")
        console.print(
            f"   quarantined: {st.quarantined} (kept in the buffer, never uploaded, "
            "for the HL7 team)"
        )
        for reason, n in sorted(result.quarantine_reasons.items()):
            console.print(f"     {n} × {reason}", markup=False)
        skew = (st.sync or {}).get("clock_skew_s")
        if isinstance(skew, int | float):
            console.print(f"   clock skew vs the hub: {skew:+.1f} s")
    console.print(f"time taken: {result.secs:.1f} s")


def run_demo(
    workdir: Path | None = None,
    *,
    records: int = 40,
    console: Console | None = None,
    keep: bool = False,
) -> int:
    """Run the whole flow on this machine (see the module doc). Returns 0 when every
    accepted message and every HIS row reached the hub exactly once and the malformed
    message was answered AE and quarantined; 1 otherwise (the output says what is
    missing).

    Args:
        workdir: where everything goes; it must be empty or not exist. Default: a new
            temporary directory.
        records: HL7 messages the LIS sends (one of them malformed); at least 2.
        console: where the output goes (default: stdout).
        keep: leave the work directory in place (always kept when ``workdir`` is
            given).
    """
    console = console if console is not None else Console(highlight=False)
    if records < 2:
        console.print("[red]the demo needs records >= 2[/]")
        return 1
    t0 = time.monotonic()
    temporary = workdir is None
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="sepas-demo-"))
    else:
        workdir = workdir.absolute()
        if workdir.exists() and any(workdir.iterdir()):
            console.print(f"[red]{workdir} is not empty[/]; give a new or empty directory.")
            return 1
        workdir.mkdir(parents=True, exist_ok=True)
    console.print("[bold]SEPAS demo[/]: the whole flow on this machine")
    console.print(f"  work dir  {workdir}", markup=False, soft_wrap=True)
    log_file: TextIO | None = None
    hub: _Hub | None = None
    runtime: Runtime | None = None
    result = DemoResult()
    try:
        now = datetime.now(TEHRAN)
        # -- the hub
        hub_dir = workdir / "hub"
        hub_dir.mkdir(mode=0o700)
        hub_toml = hub_dir / "hub.toml"
        hub_toml.write_text(
            tomli_w.dumps(
                {
                    "server": {"listen": "127.0.0.1:0"},
                    "store": {"url": f"sqlite://{hub_dir / 'hub.db'}", "blob_dir": "blobs"},
                }
            ),
            encoding="utf-8",
        )
        hub = _Hub(hub_toml)
        hub.start()
        # -- the node's keys, registered at the hub
        data_dir = workdir / "data"
        data_dir.mkdir(mode=0o700)
        key = init_key(data_dir / "node.key")
        hub.store.add_node_key(NODE_ID, public_pem(key).encode("ascii"), fingerprint(key))
        # -- the HIS stand-in and the agent's config
        his = workdir / "his.db"
        _write_his(his, rows=HIS_ROWS, now=now)
        mllp_port = _free_port()
        agent_toml = workdir / "agent.toml"
        agent_toml.write_text(
            "# Written by `sepas-agent demo`; config/agent.example.toml shows every option.\n"
            + tomli_w.dumps(
                _agent_toml(
                    workdir,
                    hub_url=hub.url,
                    mllp_port=mllp_port,
                    telemetry_port=_free_port(),
                    his=his,
                )
            ),
            encoding="utf-8",
        )
        with _without_env(DATA_DIR_ENV):
            cfg = load_config(agent_toml, adapters.KINDS)
        console.print(
            f"  hub       {hub.url}  (store hub/hub.db, node {NODE_ID})",
            markup=False,
        )
        console.print(
            f"  agent     agent.toml: HL7 MLLP on 127.0.0.1:{mllp_port}, SQL poll of his.db",
            markup=False,
        )
        console.print("            log in agent.log, buffer in data/", markup=False)
        # -- the agent
        log_file = (workdir / "agent.log").open("a", encoding="utf-8")
        runtime = Runtime(
            cfg,
            hub_transport=httpx.HTTPTransport(),  # 127.0.0.1 only: no proxy from the env
            timing=Timing(state_every_secs=2.0),
            log_stream=log_file,
        )
        runtime.start()
        # -- the LIS
        messages = build_messages(records, prefix=f"D{int(time.time()) % 100000:05d}")
        malformed = sum(m.expect == "AE" for m in messages)
        _send_all(messages, "127.0.0.1", mllp_port, console, result)
        result.expected_at_hub = result.acks.get("AA", 0) + HIS_ROWS
        # -- the hub, until everything is there
        _wait_for_hub(hub, cfg, result, quarantined=malformed, console=console)
        if runtime.buffer is not None:
            result.quarantine_reasons = Counter(q.reason for q in runtime.buffer.quarantined())
        result.secs = time.monotonic() - t0
        _check(result, malformed=malformed)
        _report(result, cfg, console, HIS_ROWS)
    except Exception as e:  # noqa: BLE001 - the demo reports, never shows a traceback
        result.problems.append(f"{type(e).__name__}: {telemetry.scrub(str(e))[:300]}")
    finally:
        if runtime is not None:
            runtime.stop()
            telemetry.unconfigure()
        if hub is not None:
            hub.stop()
        if log_file is not None:
            log_file.close()
    console.print()
    if result.ok:
        console.print(
            f"[bold green]OK[/]: {result.acks.get('AA', 0)} messages and {HIS_ROWS} HIS rows "
            f"reached the hub exactly once;\n"
            "    the malformed message was answered AE and quarantined."
        )
    else:
        console.print("[bold red]FAILED[/]:")
        for line in result.problems:
            console.print(f"  {line}", markup=False)
        console.print(f"  the agent's log: {workdir / 'agent.log'}", markup=False, soft_wrap=True)
    if keep or not temporary or not result.ok:
        toml = agent_toml_path(workdir)
        console.print(
            f"Look at {toml} (the config) and {workdir / 'agent.log'};",
            markup=False,
            soft_wrap=True,
        )
        console.print(f"then run:  sepas-agent status -c {toml}", markup=False, soft_wrap=True)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
        console.print("(work directory removed; give a work directory to keep it)")
    return 0 if result.ok else 1


def agent_toml_path(workdir: Path) -> Path:
    """Where `run_demo` writes the agent's config."""
    return workdir / "agent.toml"
