"""The hl7-mllp listener over real TCP on 127.0.0.1, with a real Buffer in tmp_path.

Every corpus case (tests/hl7corpus.py) is sent as real MLLP and its ACK read back;
the buffer and the quarantine are checked after each. Then the promises: AA only
after the commit returned, duplicates stored once, AR when the buffer is full, many
messages per connection, concurrent connections, hostile connections, the allow
list, idle timeout, max_connections, TLS, an independent sender (python-hl7), a
clean stop, and no patient data in any log line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.hl7 import ack, intake
from adapters.hl7_mllp.framing import Frame, MllpDecoder, frame
from adapters.hl7_mllp.listener import MllpListener, build, peer_allowed
from adapters.hl7_mllp.settings import Hl7MllpSettings
from agent.adapter import AdapterContext, Listener
from agent.buffer import Buffer
from agent.errors import AdapterError
from agent.record import RawRef, Record, Service, SourceRef, hl7_id
from tests import hl7corpus as corpus
from tests.hubkit import require_peer

pytestmark = pytest.mark.timeout(60)

WAIT_SECS = 10.0


# ------------------------------------------------------------------ helpers ---------


def wait_for(pred: Callable[[], bool], timeout: float = WAIT_SECS) -> bool:
    """A bounded poll for state another thread changes (no event to wait on)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Client:
    """A minimal MLLP sender: frames out, ACK frames back."""

    def __init__(
        self, port: int, *, tls: ssl.SSLContext | None = None, timeout: float = WAIT_SECS
    ) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock: socket.socket = (
            tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls is not None else raw
        )
        self.decoder = MllpDecoder(1 << 20)
        self.pending: list[bytes] = []

    def send(self, payload: bytes) -> bytes:
        self.sock.sendall(frame(payload))
        got = self.read_ack()
        assert got is not None, "the connection closed without an ACK"
        return got

    def read_ack(self) -> bytes | None:
        while not self.pending:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.pending += [e.payload for e in self.decoder.feed(data) if isinstance(e, Frame)]
        return self.pending.pop(0)

    def read_until_closed(self) -> list[bytes]:
        out: list[bytes] = []
        while (got := self.read_ack()) is not None:
            out.append(got)
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def settings(**overrides: Any) -> Hl7MllpSettings:
    base: dict[str, Any] = {
        "name": "lis",
        "kind": "hl7-mllp",
        "listen": "127.0.0.1:0",
        "max_message_bytes": corpus.OVERSIZE_LIMIT,
        "idle_timeout_secs": 10.0,
    }
    base.update(overrides)
    return Hl7MllpSettings(**base)


def stub_map(
    text: str, raw: bytes, *, node_id: str, adapter: str, kind: str, captured_at: Any, **_: Any
) -> list[Record]:
    msh = text.split("\r")[0].split(text[3])
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


def msg(control: str, i: int = 0) -> bytes:
    names = corpus.NAMES[i % len(corpus.NAMES)]
    return corpus.enc(corpus._lab(control, "2.5", *names, corpus.NC[i % len(corpus.NC)]))


def fields(data: bytes) -> dict[str, str]:
    return ack.parse_ack(data)


Start = Callable[..., MllpListener]


@pytest.fixture
def buf(tmp_path: Path) -> Iterator[Buffer]:
    b = Buffer.open(tmp_path / "data", data_key=None)
    yield b
    b.close()


@pytest.fixture
def start(buf: Buffer) -> Iterator[Start]:
    """Start listeners (on a free port) over ``buf`` or a given sink; all stopped after."""
    running: list[MllpListener] = []

    def _start(
        sink: Any = None,
        *,
        on_committed: Callable[[], None] = lambda: None,
        map_fn: Any = None,
        mapping: bool = False,
        **overrides: Any,
    ) -> MllpListener:
        ctx = AdapterContext(
            node_id="FAC-TEST",
            sink=sink if sink is not None else buf,
            log_key=b"k" * 32,
            on_committed=on_committed,
        )
        listener = MllpListener(settings(**overrides), ctx, map_fn=map_fn, mapping=mapping)
        listener.start()
        running.append(listener)
        return listener

    yield _start
    for listener in running:
        began = time.monotonic()
        listener.stop(timeout_secs=5)
        assert time.monotonic() - began < 6, "stop() overran its timeout"


def port_of(listener: MllpListener) -> int:
    return listener.address[1]


# ------------------------------------------------------------------ the corpus ------


@pytest.fixture(scope="module")
def corpus_listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Buffer, int]]:
    b = Buffer.open(tmp_path_factory.mktemp("corpus") / "data", data_key=None)
    ctx = AdapterContext(node_id="FAC-TEST", sink=b, log_key=b"k" * 32)
    listener = MllpListener(settings(), ctx, mapping=False)
    listener.start()
    yield b, listener.address[1]
    listener.stop(timeout_secs=5)
    b.close()


def _counts(b: Buffer) -> tuple[int, int]:
    return len(b.unmapped_raw("lis", limit=100_000)), len(b.quarantined(limit=100_000))


@pytest.mark.parametrize("case", corpus.ALL, ids=lambda c: c.name)
def test_corpus_case_over_tcp(case: corpus.Case, corpus_listener: tuple[Buffer, int]) -> None:
    b, port = corpus_listener
    raw_before, q_before = _counts(b)
    with Client(port) as client:
        if case.is_wire:
            assert case.wire is not None
            client.sock.sendall(case.wire)
            client.sock.shutdown(socket.SHUT_WR)
            acks = client.read_until_closed()
            assert [(fields(a)["MSA-1"], fields(a)["MSA-2"]) for a in acks] == list(case.acks)
        else:
            got = fields(client.send(case.message))
            assert got["MSA-1"] == case.ack
            assert got["MSA-2"] == case.control_id
            assert got["MSH-12"] == (case.version or "2.5")
            assert got["field_sep"] == "|"
            if case.ack == "AA":
                assert got["encoding_chars"] == intake.check(case.message).msh.encoding_chars
                assert got["MSH-18"] == intake.check(case.message).msh.charset
    raw_after, q_after = _counts(b)
    assert raw_after - raw_before == case.stored
    assert q_after - q_before == case.quarantined
    if not case.is_wire and case.ack == "AA":
        assert b.unmapped_raw("lis", limit=100_000)[-1].data == case.message  # byte for byte
    if case.quarantined:
        newest = b.quarantined(limit=100_000)[-1]
        assert b.quarantined_data(newest.id) == case.message
        assert newest.reason.startswith(f"{case.ack}: ")


def test_after_every_refusal_the_next_valid_message_gets_aa(start: Start) -> None:
    listener = start()
    with Client(port_of(listener)) as client:
        for i, case in enumerate(corpus.MALFORMED):
            assert fields(client.send(case.message))["MSA-1"] == case.ack, case.name
            assert fields(client.send(msg(f"AFTER-{i}", i)))["MSA-1"] == "AA", case.name
        # An oversize frame too, on the same connection.
        assert fields(client.send(b"x" * (corpus.OVERSIZE_LIMIT + 1)))["MSA-1"] == "AR"
        assert fields(client.send(msg("AFTER-BIG")))["MSA-1"] == "AA"


# ------------------------------------------------------------------ the promises ----


class GatedSink:
    """The Buffer, with a put_raw that waits for the test's go before committing."""

    def __init__(self, buf: Buffer) -> None:
        self.buf = buf
        self.entered = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.buf, name)

    def put_raw(self, *args: Any, **kw: Any) -> tuple[int, bool]:
        self.entered.set()
        assert self.release.wait(WAIT_SECS)
        out = self.buf.put_raw(*args, **kw)
        self.returned.set()
        return out


def test_ack_is_sent_only_after_the_commit_returned(start: Start, buf: Buffer) -> None:
    sink = GatedSink(buf)
    committed: list[bool] = []
    listener = start(sink, on_committed=lambda: committed.append(sink.returned.is_set()))
    with Client(port_of(listener)) as client:
        client.sock.sendall(frame(msg("GATED-1")))
        assert sink.entered.wait(WAIT_SECS)
        client.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.sock.recv(1)  # the commit has not returned: no ACK may arrive
        client.sock.settimeout(WAIT_SECS)
        sink.release.set()
        got = client.read_ack()
        assert sink.returned.is_set()
    assert got is not None
    assert fields(got)["MSA-1"] == "AA"
    assert [e.data for e in buf.unmapped_raw("lis")] == [msg("GATED-1")]
    assert wait_for(lambda: committed == [True])


def test_duplicate_delivery_gets_aa_twice_and_is_stored_once(start: Start, buf: Buffer) -> None:
    listener = start()
    message = msg("DUP-1")
    with Client(port_of(listener)) as a:
        assert fields(a.send(message))["MSA-1"] == "AA"
    with Client(port_of(listener)) as b:
        assert fields(b.send(message))["MSA-1"] == "AA"
        assert fields(b.send(message))["MSA-1"] == "AA"
    assert len(buf.unmapped_raw("lis")) == 1


def test_full_buffer_answers_ar_and_stores_nothing(start: Start, tmp_path: Path) -> None:
    full = Buffer.open(tmp_path / "full", data_key=None, max_bytes=1)
    try:
        listener = start(full)
        with Client(port_of(listener)) as client:
            got = fields(client.send(msg("FULL-1")))
            assert (got["MSA-1"], got["MSA-2"]) == ("AR", "FULL-1")
            # A refused message cannot be quarantined either: AR, not AE.
            bad = corpus.by_name("unknown_message_type")
            got = fields(client.send(bad.message))
            assert (got["MSA-1"], got["MSA-2"]) == ("AR", bad.control_id)
        stats = full.stats()
        assert (stats.unmapped_raw, stats.quarantined) == (0, 0)
    finally:
        full.close()


def test_many_messages_on_one_persistent_connection(start: Start, buf: Buffer) -> None:
    listener = start()
    with Client(port_of(listener)) as client:
        for i in range(60):
            got = fields(client.send(msg(f"MANY-{i}", i)))
            assert (got["MSA-1"], got["MSA-2"]) == ("AA", f"MANY-{i}")
        # Pipelined: several frames in one write, ACKs in order.
        client.sock.sendall(b"".join(frame(msg(f"PIPE-{i}", i)) for i in range(5)))
        assert [fields(client.read_ack() or b"")["MSA-2"] for _ in range(5)] == [
            f"PIPE-{i}" for i in range(5)
        ]
    assert len(buf.unmapped_raw("lis", limit=1000)) == 65


def test_twenty_concurrent_connections(start: Start, buf: Buffer) -> None:
    listener = start()
    port = port_of(listener)
    errors: list[str] = []
    barrier = threading.Barrier(20)

    def sender(n: int) -> None:
        try:
            with Client(port) as client:
                barrier.wait(WAIT_SECS)
                for j in range(5):
                    got = fields(client.send(msg(f"C{n}-{j}", n + j)))
                    if (got["MSA-1"], got["MSA-2"]) != ("AA", f"C{n}-{j}"):
                        errors.append(f"{n}/{j}: {got['MSA-1']}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{n}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_SECS * 2)
    assert errors == []
    assert len(buf.unmapped_raw("lis", limit=1000)) == 100


def test_hostile_connections_never_take_the_listener_down(start: Start, buf: Buffer) -> None:
    listener = start()
    port = port_of(listener)
    with Client(port) as c:  # garbage only, then close
        c.sock.sendall(b"\x00\xff" * 5000 + b"GET / HTTP/1.1\r\n\r\n")
    with Client(port) as c:  # disconnect mid-frame
        c.sock.sendall(b"\x0b" + msg("HALF-1")[:50])
    with Client(port) as c:  # reset mid-frame (RST instead of FIN)
        c.sock.sendall(b"\x0b" + msg("RST-1")[:50])
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with Client(port) as c:  # two frames, the second cut off by a disconnect (rule 14)
        c.sock.sendall(frame(msg("TWO-1")) + b"\x0b" + msg("TWO-2")[:60])
        assert fields(c.read_ack() or b"")["MSA-1"] == "AA"
    with Client(port) as c:
        assert fields(c.send(msg("STILL-OK")))["MSA-1"] == "AA"
    assert [
        fields(intake.check(e.data).text.encode())["MSH-10"] for e in buf.unmapped_raw("lis")
    ] == ["TWO-1", "STILL-OK"]


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),  # IPv4 seen through a dual-stack socket
        ("192.168.1.20", True),
        ("192.168.1.21", False),
        ("11.0.0.1", False),
        ("fd00::1", True),
        ("fe80::1%eth0", False),
        ("127.0.0.1", False),
        ("not-an-ip", False),
        ("", False),
    ],
)
def test_peer_allowed(host: str, allowed: bool) -> None:
    nets = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "192.168.1.20/32", "fd00::/8")]
    assert peer_allowed(host, nets) is allowed


def test_host_not_in_allow_is_closed_without_a_byte_read(start: Start, buf: Buffer) -> None:
    listener = start(allow=("10.0.0.0/8",))
    with Client(port_of(listener)) as client:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            client.sock.sendall(frame(msg("DENIED-1")))
        assert client.read_until_closed() == []
    assert buf.stats().unmapped_raw == 0
    assert buf.quarantined() == []


def test_idle_connection_is_closed(start: Start) -> None:
    listener = start(idle_timeout_secs=0.4)
    with Client(port_of(listener)) as client:
        began = time.monotonic()
        client.sock.sendall(b"\x0b" + msg("IDLE-1")[:30])  # an unterminated frame dies too
        assert client.read_until_closed() == []
        assert time.monotonic() - began < 5
    assert wait_for(lambda: listener.active_connections == 0)


def test_max_connections(start: Start) -> None:
    listener = start(max_connections=2)
    port = port_of(listener)
    with Client(port) as a, Client(port) as b:
        assert fields(a.send(msg("MAX-A")))["MSA-1"] == "AA"
        assert fields(b.send(msg("MAX-B")))["MSA-1"] == "AA"
        with Client(port) as c:  # over the limit: accepted and closed at once
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                c.sock.sendall(frame(msg("MAX-C")))
            assert c.read_until_closed() == []
        a.close()
        assert wait_for(lambda: listener.active_connections == 1)
        with Client(port) as d:
            assert fields(d.send(msg("MAX-D")))["MSA-1"] == "AA"


# ------------------------------------------------------------------ TLS -------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sepas-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "mllp.crt", tmp_path / "mllp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls(start: Start, tmp_path: Path, buf: Buffer) -> None:
    cert, key = _self_signed(tmp_path)
    listener = start(tls_cert=cert, tls_key=key)
    port = port_of(listener)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    with Client(port, tls=client_ctx) as client:
        for i in range(3):
            assert fields(client.send(msg(f"TLS-{i}", i)))["MSA-1"] == "AA"
    with Client(port) as plain:  # plaintext MLLP at a TLS port: handshake garbage
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            plain.sock.sendall(frame(msg("PLAIN-1")))
        assert plain.read_until_closed() == []
    with Client(port, tls=client_ctx) as client:
        assert fields(client.send(msg("TLS-AFTER")))["MSA-1"] == "AA"
    assert len(buf.unmapped_raw("lis")) == 4
    assert all(c.ok for c in listener.checks())


def test_unusable_tls_files_fail_start_and_checks(tmp_path: Path, buf: Buffer) -> None:
    (tmp_path / "bad.crt").write_text("not a certificate")
    (tmp_path / "bad.key").write_text("not a key")
    ctx = AdapterContext(node_id="FAC-TEST", sink=buf, log_key=b"k" * 32)
    listener = MllpListener(
        settings(tls_cert=tmp_path / "bad.crt", tls_key=tmp_path / "bad.key"), ctx, mapping=False
    )
    checks = {c.name: c for c in listener.checks()}
    assert not checks["lis: tls"].ok
    with pytest.raises(AdapterError, match="tls_cert"):
        listener.start()


# ------------------------------------------------------------------ other senders ---


def test_python_hl7_mllp_client_as_an_independent_sender(start: Start, buf: Buffer) -> None:
    try:
        from hl7.client import MLLPClient
    except ImportError:
        require_peer("python-hl7", "pip install hl7 (an independent MLLP sender)")
    listener = start()
    client = MLLPClient("127.0.0.1", port_of(listener))
    try:
        for i in range(3):
            answer = client.send_message(msg(f"PYHL7-{i}", i))
            events = MllpDecoder(1 << 20).feed(answer)
            assert len(events) == 1
            assert isinstance(events[0], Frame)
            got = fields(events[0].payload)
            assert (got["MSA-1"], got["MSA-2"]) == ("AA", f"PYHL7-{i}")
    finally:
        client.close()
    assert len(buf.unmapped_raw("lis")) == 3


# ------------------------------------------------------------------ lifecycle --------


def test_build_makes_a_listener_through_the_registry(buf: Buffer) -> None:
    import adapters

    ctx = AdapterContext(node_id="FAC-TEST", sink=buf, log_key=b"k" * 32)
    listener = adapters.build(settings(), ctx)
    assert isinstance(listener, MllpListener)
    assert isinstance(listener, Listener)
    assert listener.name == "lis"
    assert listener.kind == "hl7-mllp"
    with pytest.raises(TypeError):
        build(adapters.KINDS["sql"].model_construct(name="x", kind="sql"), ctx)  # type: ignore[arg-type]


def test_checks_report_a_port_in_use(buf: Buffer) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        ctx = AdapterContext(node_id="FAC-TEST", sink=buf, log_key=b"k" * 32)
        listener = MllpListener(settings(listen=f"127.0.0.1:{port}"), ctx, mapping=False)
        (check,) = listener.checks()
        assert not check.ok
        with pytest.raises(AdapterError, match="cannot listen"):
            listener.start()


def test_checks_when_listening(start: Start) -> None:
    listener = start()
    (check,) = listener.checks()
    assert check.ok
    assert f":{port_of(listener)}" in check.detail


def test_stop_lets_the_commit_in_flight_finish_and_answer(start: Start, buf: Buffer) -> None:
    sink = GatedSink(buf)
    listener = start(sink)
    with Client(port_of(listener)) as client, Client(port_of(listener)) as idle:
        assert idle.sock  # an idle connection must not hold stop() up
        client.sock.sendall(frame(msg("INFLIGHT-1")))
        assert sink.entered.wait(WAIT_SECS)
        stopped = threading.Event()

        def stop() -> None:
            listener.stop(timeout_secs=5)
            stopped.set()

        stopper = threading.Thread(target=stop, daemon=True)
        stopper.start()
        assert not stopped.wait(0.3), "stop() returned while a commit was in flight"
        sink.release.set()
        got = client.read_ack()
        assert got is not None
        assert fields(got)["MSA-1"] == "AA"
        assert stopped.wait(WAIT_SECS)
        assert idle.read_until_closed() == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(listener.address, timeout=1).close()
    assert len(buf.unmapped_raw("lis")) == 1


def test_messages_are_mapped_behind_the_ack(start: Start, buf: Buffer) -> None:
    committed = threading.Event()
    listener = start(on_committed=committed.set, map_fn=stub_map, mapping=True)
    with Client(port_of(listener)) as client:
        for i in range(3):
            assert fields(client.send(msg(f"MAP-{i}", i)))["MSA-1"] == "AA"
    assert wait_for(lambda: buf.stats().total("pending") == 3)
    assert buf.unmapped_raw("lis") == []
    assert committed.is_set()


# ------------------------------------------------------------------ no PHI in logs ---


def test_no_patient_data_in_any_log_line(
    start: Start, buf: Buffer, caplog: pytest.LogCaptureFixture
) -> None:
    try:
        from adapters.hl7.mapping import map_message as real_map

        map_fn: Any = real_map
    except ImportError:
        map_fn = stub_map
    with caplog.at_level(logging.DEBUG):
        listener = start(map_fn=map_fn, mapping=True)
        port = port_of(listener)
        for case in corpus.ALL:
            with Client(port) as client:
                if case.is_wire:
                    assert case.wire is not None
                    client.sock.sendall(case.wire)
                    client.sock.shutdown(socket.SHUT_WR)
                    client.read_until_closed()
                else:
                    client.send(case.message)
        assert wait_for(lambda: buf.stats().unmapped_raw == 0), "mapping did not finish"
        listener.stop(timeout_secs=5)
    standard = set(vars(logging.makeLogRecord({})))
    secrets = corpus.patient_strings()
    assert caplog.records, "expected log lines to scan"
    for record in caplog.records:
        text = (
            record.getMessage()
            + " "
            + " ".join(str(v) for k, v in vars(record).items() if k not in standard)
        )
        leaked = [s for s in secrets if s in text]
        assert not leaked, f"{record.name}: {record.getMessage()!r} carries patient data"
