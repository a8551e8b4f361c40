"""Property test of the hl7-mllp listener over real TCP: random bytes and random
mutations of valid corpus messages, sent framed over one connection, never crash the
listener and never lose an acknowledged message.

Each example is sent on a fresh connection (as one or more frames, perhaps with garbage
between them and a half frame at the end), the write side is closed and every ACK read
back. The parent splits what it sent with the same decoder the listener uses, so the
n-th ACK belongs to the n-th frame: each frame answered AA must be in the buffer's raw
rows by its dedupe key (MSH-10 + MSH-7). After each example a valid message on another
fresh connection must still get AA. The listener runs its mapping worker, as in
production, so the mapper sees the mutants too.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.hl7 import ack, intake
from adapters.hl7_mllp.framing import Frame, MllpDecoder, frame
from adapters.hl7_mllp.listener import MllpListener
from adapters.hl7_mllp.settings import Hl7MllpSettings
from agent.adapter import AdapterContext
from agent.buffer import Buffer
from tests import hl7corpus as corpus

pytestmark = pytest.mark.timeout(180)

ADAPTER = "lis-fuzz"
WAIT_SECS = 30.0  # generous: the machine may be busy with other work
MAX_BYTES = 64 * 1024
SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"

VALID_MESSAGES = [c.message for c in corpus.VALID if c.message.startswith((b"MSH", b"\xef"))]


# ------------------------------------------------------------------ strategies ------


@st.composite
def mutant(draw: st.DrawFn) -> bytes:
    """A valid corpus message with a few random edits."""
    data = bytearray(draw(st.sampled_from(VALID_MESSAGES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "special", "cut", "repeat"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 40))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=30))
        elif op == "special":  # the bytes that mean something to MLLP and HL7
            data[at:at] = draw(
                st.sampled_from(
                    [SB, EB, CR, EB + CR, b"|", b"^", b"~", b"\\", b"&", b"\n", b"\xef\xbb\xbf"]
                )
            )
        elif op == "cut":
            del data[at:]
        elif op == "repeat" and at < len(data):
            data[at:at] = data[at : at + draw(st.integers(1, 200))] * draw(st.integers(1, 5))
    return bytes(data)


payloads = st.one_of(st.binary(max_size=2000), mutant(), mutant())


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """What goes over one connection: framed payloads, maybe garbage between them and
    a half frame at the end."""
    out = bytearray()
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            out += draw(st.binary(max_size=20))  # garbage between frames
        out += frame(draw(payloads))
    if draw(st.integers(0, 4)) == 0:
        out += SB + draw(payloads)  # a missing end block
    return bytes(out)


# ------------------------------------------------------------------ the listener ----


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    buf = Buffer.open(data_dir, data_key=None)
    ctx = AdapterContext(node_id="FAC-FUZZ", sink=buf, log_key=b"k" * 32)
    conf = Hl7MllpSettings(
        name=ADAPTER,
        kind="hl7-mllp",
        listen="127.0.0.1:0",
        max_message_bytes=MAX_BYTES,
        idle_timeout_secs=WAIT_SECS,
    )
    listener = MllpListener(conf, ctx)
    listener.start()
    try:
        yield listener.address[1], data_dir
    finally:
        listener.stop(timeout_secs=10)
        if SEEN.total() >= 100:  # a full run: some mutants must have got past intake
            assert SEEN["AA"] >= 1, dict(SEEN)
        buf.close()


def _exchange(port: int, data: bytes) -> list[bytes]:
    """Send ``data``, close the write side, return every ACK until the listener closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_SECS)
    decoder = MllpDecoder(1 << 20)
    acks: list[bytes] = []
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(65536):
            acks += [e.payload for e in decoder.feed(chunk) if isinstance(e, Frame)]
    except ConnectionResetError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sock.close()
    return acks


def _stored(data_dir: Path) -> set[str]:
    conn = sqlite3.connect(data_dir / "buffer.db")
    try:
        return {
            k
            for (k,) in conn.execute(
                "SELECT dedupe_key FROM raw_intake WHERE adapter = ?", (ADAPTER,)
            )
        }
    finally:
        conn.close()


_probe = iter(range(1_000_000))
#: ACK codes seen for the examples' frames, to show the mutants reach past intake.
SEEN: Counter[str] = Counter()


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=streams())
def test_random_input_never_crashes_the_listener_nor_loses_an_ack(
    data: bytes, running: tuple[int, Path]
) -> None:
    port, data_dir = running
    events: list[Any] = list(MllpDecoder(MAX_BYTES).feed(data))
    acks = _exchange(port, data)
    assert len(acks) == len(events), (len(acks), len(events))
    must_be_stored: list[str] = []
    for event, reply in zip(events, acks, strict=True):
        got = ack.parse_ack(reply)
        assert got["MSA-1"] in {"AA", "AE", "AR"}, got
        SEEN[got["MSA-1"]] += 1
        if got["MSA-1"] == "AA":
            assert isinstance(event, Frame), event
            must_be_stored.append(intake.check(event.payload).dedupe_key)
    # The listener is still up: a valid message on a fresh connection gets AA.
    control = f"PROBE-{next(_probe)}"
    probe = corpus.enc(corpus._lab(control, "2.5", *corpus.NAMES[0], corpus.NC[0]))
    (reply,) = _exchange(port, frame(probe))
    assert ack.parse_ack(reply)["MSA-1"] == "AA"
    must_be_stored.append(intake.check(probe).dedupe_key)
    missing = set(must_be_stored) - _stored(data_dir)
    assert not missing, missing
