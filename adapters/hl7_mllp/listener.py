"""The ``hl7-mllp`` listener: our own MLLP server, ACK only after commit.

Responsibility: accept HL7 v2 senders over TCP (optionally TLS), frame their bytes
(`framing`), decide AA or a refusal (`adapters.hl7.intake`), commit accepted messages
raw to the buffer and only then answer AA (`adapters.hl7.ack`), then wake the mapping
worker (`adapters.hl7.runner`) that turns them into Records behind the ACK.

Why threads, not asyncio: the buffer, the ssl module's blocking sockets and the
mapping (hl7apy) are all thread-based; a sender keeps one connection open and sends
one message at a time, so one thread per connection, bounded by ``max_connections``
(64 by default), costs little and keeps each conversation a plain loop. Why not
hl7apy's server: it handles one message per connection (STYLE.md 3.10) and ACKs
before anything is stored.

For each frame (HL7-INTAKE.md):
- over ``max_message_bytes``: AR, without reading the rest into memory (rule 12);
- refused by intake: the raw bytes are quarantined with the reason, then AE or AR
  (rules 2, 3, 10, 11);
- accepted: ``put_raw`` (committed and fsync'd, de-duplicated on MSH-10 + MSH-7, rule
  13), then AA; a full buffer or a storage error answers AR and stores nothing, so the
  sender keeps the message and retries (rule 11).

Never: send AA before the commit returned; log message content (payloads, patient
names, national codes): log lines carry the peer address, sizes, row ids and the
intake reason, which holds no patient data; die because of one connection (garbage,
resets, half frames, TLS garbage all end that connection only).

Invariants:
- A peer outside ``allow`` is closed at accept, before a byte is read.
- More than ``max_connections`` at once: the extra one is accepted and closed at once.
- After any refused input, the next valid message on the same or a new connection
  gets AA (each frame is judged on its own; a decoder outlives bad frames).
- `MllpListener.stop` stops accepting, lets the frame being committed finish and be
  answered, closes the connections and returns within its timeout.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from adapters.hl7 import ack, intake
from adapters.hl7.intake import MEDIA_TYPE, Hl7Refusal
from adapters.hl7.runner import MapFn, MappingRunner
from adapters.hl7_mllp.framing import Event, Frame, MllpDecoder, Oversize, frame
from adapters.hl7_mllp.settings import Hl7MllpSettings
from agent.adapter import AdapterContext, Check
from agent.config import AdapterSettings, split_host_port
from agent.errors import AdapterError, CapacityExceededError, StorageError

log = logging.getLogger(__name__)

KIND: Final = "hl7-mllp"
RECV_BYTES: Final = 65536
#: How often blocked threads look at the stop flag (and idle clocks).
POLL_SECS: Final = 0.2
#: At most one log line per (event, key) per this many seconds (STYLE.md 3.7).
LOG_EVERY_SECS: Final = 60.0

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def peer_allowed(host: str, networks: Iterable[IpNetwork]) -> bool:
    """Whether a peer address is inside one of ``networks`` (the ``allow`` list).

    IPv4-mapped IPv6 addresses (``::ffff:10.0.0.5``, what a dual-stack socket reports
    for an IPv4 peer) are judged as the IPv4 address; an IPv6 zone (``%eth0``) is
    ignored; anything that is not an IP address is not allowed.
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


class _Throttle:
    """One log line per key per interval; counts what it held back."""

    def __init__(self, every_secs: float) -> None:
        self._every = every_secs
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> int | None:
        """None: don't log now. Otherwise log, with this many suppressed since."""
        now = time.monotonic()
        with self._lock:
            last, held = self._last.get(key, (float("-inf"), 0))
            if now - last >= self._every:
                self._last[key] = (now, 0)
                return held
            self._last[key] = (last, held + 1)
            return None


@dataclass(slots=True)
class _Conn:
    sock: socket.socket
    peer: str
    thread: threading.Thread | None = None


class MllpListener:
    """An HL7 v2 MLLP server for one ``[[adapters]]`` entry of kind ``hl7-mllp``."""

    kind: str = KIND

    def __init__(
        self,
        settings: Hl7MllpSettings,
        ctx: AdapterContext,
        *,
        map_fn: MapFn | None = None,
        mapping: bool = True,
        poll_secs: float = POLL_SECS,
    ) -> None:
        """Args:
        map_fn: the mapper for the runner (default: ``adapters.hl7.mapping``).
        mapping: False runs intake only; committed rows wait for a runner (tests,
            or a second process that maps).
        """
        self.name: str = settings.name
        self.settings = settings
        self.ctx = ctx
        self._networks: list[IpNetwork] = [ipaddress.ip_network(n) for n in settings.allow]
        self._host, self._port = split_host_port(settings.listen)
        self._poll = poll_secs
        self._sock: socket.socket | None = None
        self._tls: ssl.SSLContext | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._conns: dict[int, _Conn] = {}
        self._next_conn = 0
        self._throttle = _Throttle(LOG_EVERY_SECS)
        self._wake = threading.Event()
        self._runner = (
            MappingRunner(
                ctx.sink,
                self.name,
                KIND,
                ctx.node_id,
                settings,
                map_fn,
                self._wake,
                default_encoding=settings.encoding,
                on_committed=ctx.on_committed,
            )
            if mapping
            else None
        )

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the real port when ``listen`` asked for port 0."""
        if self._sock is None:
            return self._host, self._port
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def start(self) -> None:
        """Bind, listen, and serve in background threads.

        Raises:
            AdapterError: the address cannot be bound, or the TLS files cannot be used.
        """
        if self._sock is not None:
            return
        if self.settings.tls_cert is not None and self.settings.tls_key is not None:
            try:
                self._tls = _tls_context(self.settings)
            except (OSError, ssl.SSLError) as e:
                raise AdapterError(
                    f"adapter {self.name}: cannot use tls_cert/tls_key: {_os_reason(e)}",
                    hint="Check that both files exist, are PEM, match, and are readable by "
                    "the agent's user.",
                ) from None
        try:
            self._sock = _bind(self._host, self._port)
        except OSError as e:
            raise AdapterError(
                f"adapter {self.name}: cannot listen on {self.settings.listen}: {_os_reason(e)}",
                hint="Another program may hold the port (ss -ltnp), or ports below 1024 "
                "need privileges; change `listen`.",
            ) from None
        self._sock.settimeout(self._poll)
        self._stopping.clear()
        if self._runner is not None:
            self._runner.start()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"mllp-accept-{self.name}", daemon=True
        )
        self._accept_thread.start()
        host, port = self.address
        log.info(
            "HL7 MLLP listener started.",
            extra={
                "event": "hl7.listener_started",
                "adapter": self.name,
                "listen": f"{host}:{port}",
                "tls": self._tls is not None,
            },
        )

    def stop(self, *, timeout_secs: float = 10.0) -> None:
        """Stop accepting, let frames being committed finish and be answered, close
        every connection, stop the mapping worker; return within ``timeout_secs``."""
        deadline = time.monotonic() + timeout_secs
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
            self._accept_thread = None
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        with self._lock:
            conns = list(self._conns.values())
        for conn in conns:
            if conn.thread is not None:
                conn.thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            stuck = len(self._conns)
        if self._runner is not None:
            self._runner.stop(timeout_secs=max(0.0, deadline - time.monotonic()))
        log.info(
            "HL7 MLLP listener stopped.",
            extra={"event": "hl7.listener_stopped", "adapter": self.name, "count": stuck},
        )

    def checks(self) -> Sequence[Check]:
        """`doctor`: can we listen (or are we listening), are the TLS files usable.
        Never raises."""
        out: list[Check] = []
        name = f"{self.name}: listen"
        allow = ", ".join(self.settings.allow)
        try:
            if self._sock is not None and not self._stopping.is_set():
                host, port = self.address
                out.append(Check(name, True, f"listening on {host}:{port}; allow {allow}"))
            else:
                probe = _bind(self._host, self._port)
                probe.close()
                out.append(Check(name, True, f"{self.settings.listen} can be bound; allow {allow}"))
        except Exception as e:  # noqa: BLE001 - checks never raise
            out.append(
                Check(
                    name,
                    False,
                    f"cannot listen on {self.settings.listen}: {_os_reason(e)}",
                    hint="Free the port or change `listen`; ports below 1024 need privileges.",
                )
            )
        if self.settings.tls_cert is not None:
            try:
                _tls_context(self.settings)
                out.append(Check(f"{self.name}: tls", True, f"{self.settings.tls_cert} loads"))
            except Exception as e:  # noqa: BLE001 - checks never raise
                out.append(
                    Check(
                        f"{self.name}: tls",
                        False,
                        f"tls_cert/tls_key cannot be used: {_os_reason(e)}",
                        hint="Both PEM files must exist, match, and be readable by the agent.",
                    )
                )
        return out

    # -- accepting ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        lsock = self._sock
        assert lsock is not None  # noqa: S101 - set by start() before this thread runs
        while not self._stopping.is_set():
            try:
                sock, addr = lsock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._stopping.is_set():
                    break
                self._warn(
                    "hl7.accept_failed",
                    "Accepting an MLLP connection failed.",
                    key=str(e.errno),
                    error=_os_reason(e),
                )
                self._stopping.wait(0.1)  # e.g. out of file descriptors: don't spin
                continue
            peer = str(addr[0])
            if not peer_allowed(peer, self._networks):
                _close(sock)
                self._warn(
                    "hl7.connection_not_allowed",
                    "Closed a connection from a host not in `allow`.",
                    key=peer,
                    peer=peer,
                )
                continue
            with self._lock:
                full = len(self._conns) >= self.settings.max_connections
                if not full:
                    conn_id = self._next_conn
                    self._next_conn += 1
                    conn = _Conn(sock, peer)
                    self._conns[conn_id] = conn
            if full:
                _close(sock)
                self._warn(
                    "hl7.connection_limit",
                    "Closed a connection: max_connections reached.",
                    key="limit",
                    peer=peer,
                    count=self.settings.max_connections,
                )
                continue
            conn.thread = threading.Thread(
                target=self._serve,
                args=(conn_id, conn),
                name=f"mllp-{self.name}-{conn_id}",
                daemon=True,
            )
            conn.thread.start()

    # -- one connection -------------------------------------------------------------------

    def _serve(self, conn_id: int, conn: _Conn) -> None:
        decoder = MllpDecoder(self.settings.max_message_bytes)
        sock = conn.sock
        try:
            sock.settimeout(self._poll)
            if self._tls is not None:
                tls_sock = self._handshake(conn)
                if tls_sock is None:
                    return
                sock = tls_sock
            log.debug(
                "MLLP connection opened.",
                extra={"event": "hl7.connection_opened", "adapter": self.name, "peer": conn.peer},
            )
            self._converse(sock, decoder)
        except OSError as e:  # resets, TLS errors (ssl.SSLError is an OSError)
            log.debug(
                "MLLP connection ended by an error.",
                extra={
                    "event": "hl7.connection_error",
                    "adapter": self.name,
                    "peer": conn.peer,
                    "error": _os_reason(e),
                },
            )
        except Exception as e:  # noqa: BLE001 - one connection never takes the listener down
            self._warn(
                "hl7.connection_failed",
                "An MLLP connection failed unexpectedly; the listener carries on.",
                key=type(e).__name__,
                peer=conn.peer,
                error_type=type(e).__name__,
            )
        finally:
            if decoder.in_frame:
                log.info(
                    "An MLLP connection closed in the middle of a message; that message "
                    "was not acknowledged and the sender keeps it.",
                    extra={"event": "hl7.partial_frame_dropped", "adapter": self.name},
                )
            if decoder.discarded:
                log.debug(
                    "Bytes outside MLLP frames were discarded.",
                    extra={
                        "event": "hl7.bytes_discarded",
                        "adapter": self.name,
                        "peer": conn.peer,
                        "count": decoder.discarded,
                    },
                )
            _close(conn.sock)
            with self._lock:
                self._conns.pop(conn_id, None)

    def _handshake(self, conn: _Conn) -> socket.socket | None:
        assert self._tls is not None  # noqa: S101 - only called with TLS on
        tls = self._tls.wrap_socket(conn.sock, server_side=True, do_handshake_on_connect=False)
        conn.sock = tls
        started = time.monotonic()
        while True:
            try:
                tls.do_handshake()
                return tls
            except TimeoutError:
                if (
                    self._stopping.is_set()
                    or time.monotonic() - started >= self.settings.idle_timeout_secs
                ):
                    return None
            except ssl.SSLError as e:
                self._warn(
                    "hl7.tls_handshake_failed",
                    "A TLS handshake on the MLLP port failed; the connection was closed.",
                    key=conn.peer,
                    peer=conn.peer,
                    error=str(e.reason or type(e).__name__),
                )
                return None

    def _converse(self, sock: socket.socket, decoder: MllpDecoder) -> None:
        idle = self.settings.idle_timeout_secs
        last = time.monotonic()
        while not self._stopping.is_set():
            try:
                data = sock.recv(RECV_BYTES)
            except TimeoutError:
                if time.monotonic() - last >= idle:
                    log.debug(
                        "Closed an idle MLLP connection.",
                        extra={"event": "hl7.connection_idle", "adapter": self.name},
                    )
                    return
                continue
            if not data:
                return
            for event in decoder.feed(data):
                reply, committed = self._answer(event)
                sock.settimeout(idle)
                sock.sendall(frame(reply))
                sock.settimeout(self._poll)
                if committed:
                    self._after_commit()
                if self._stopping.is_set():
                    return  # later frames of this read are not answered: the sender resends
            last = time.monotonic()

    # -- one frame ------------------------------------------------------------------------

    def _answer(self, event: Event) -> tuple[bytes, bool]:
        """The ACK for one frame, and whether a message was committed."""
        if isinstance(event, Oversize):
            self._warn(
                "hl7.message_oversize",
                "Refused an HL7 message over max_message_bytes (AR).",
                key="oversize",
                size=event.size,
                limit=self.settings.max_message_bytes,
            )
            reason = f"the message is larger than {self.settings.max_message_bytes} bytes"
            return ack.reject(intake.peek_msh(event.head), reason), False
        assert isinstance(event, Frame)  # noqa: S101 - Event is Frame | Oversize
        payload = event.payload
        try:
            checked = intake.check(payload, default_encoding=self.settings.encoding)
        except Hl7Refusal as refusal:
            return self._refused(payload, refusal), False
        except Exception as e:  # noqa: BLE001 - an intake bug: refuse this one, keep serving
            self._warn(
                "hl7.intake_failed",
                "The HL7 intake check failed unexpectedly; answered AR.",
                key=type(e).__name__,
                error_type=type(e).__name__,
            )
            return ack.reject(intake.peek_msh(payload[:4096]), "internal error at intake"), False
        for warning in checked.warnings:
            self._warn(
                "hl7.message_warning",
                "An accepted HL7 message needed a correction.",
                key=warning,
                warning=warning,
            )
        try:
            raw_id, new = self.ctx.sink.put_raw(
                payload, adapter=self.name, media_type=MEDIA_TYPE, dedupe_key=checked.dedupe_key
            )
        except CapacityExceededError:
            self._warn(
                "hl7.buffer_full",
                "The buffer is full: HL7 messages are answered AR until it drains.",
                key="full",
            )
            return ack.reject(
                checked.msh, "the buffer is full; send the message again later"
            ), False
        except StorageError as e:
            log.error(
                "An HL7 message could not be stored; answered AR, the sender keeps it.",
                extra={
                    "event": "hl7.store_failed",
                    "adapter": self.name,
                    "error_type": type(e).__name__,
                },
            )
            return ack.reject(checked.msh, "the message could not be stored; send it again"), False
        log.debug(
            "HL7 message committed.",
            extra={
                "event": "hl7.message_committed",
                "adapter": self.name,
                "raw_id": raw_id,
                "new": new,
                "size": len(payload),
            },
        )
        return ack.accept(checked), True

    def _refused(self, payload: bytes, refusal: Hl7Refusal) -> bytes:
        try:
            qid = self.ctx.sink.quarantine(
                payload,
                adapter=self.name,
                reason=f"{refusal.code}: {refusal.reason}",
                media_type=MEDIA_TYPE,
            )
        except StorageError as e:
            log.error(
                "A refused HL7 message could not be quarantined; answered AR, the sender keeps it.",
                extra={
                    "event": "hl7.quarantine_failed",
                    "adapter": self.name,
                    "error_type": type(e).__name__,
                },
            )
            return ack.reject(refusal.msh, "the message was refused and could not be kept")
        self._warn(
            "hl7.message_refused",
            "Refused an HL7 message; it is in quarantine.",
            key=refusal.reason,
            code=refusal.code,
            reason=refusal.reason,
            quarantine_id=qid,
        )
        return ack.refuse(refusal)

    def _after_commit(self) -> None:
        self._wake.set()
        try:
            self.ctx.on_committed()
        except Exception as e:  # noqa: BLE001 - an observer never breaks intake
            log.warning(
                "The on_committed hook failed.",
                extra={"event": "hl7.hook_failed", "error_type": type(e).__name__},
            )

    def _warn(self, event: str, message: str, *, key: str, **extra: object) -> None:
        held = self._throttle.allow(f"{event}:{key}")
        if held is None:
            return
        log.warning(
            message,
            extra={"event": event, "adapter": self.name, "suppressed": held, **extra},
        )


def build(settings: AdapterSettings, ctx: AdapterContext) -> MllpListener:
    """`adapters.BUILDERS` entry for ``hl7-mllp``."""
    if not isinstance(settings, Hl7MllpSettings):
        raise TypeError(f"expected Hl7MllpSettings, got {type(settings).__name__}")
    return MllpListener(settings, ctx)


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # Dual stack where the OS allows it; IPv4 peers then show as ::ffff:a.b.c.d.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _tls_context(settings: Hl7MllpSettings) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    assert settings.tls_cert is not None  # noqa: S101 - checked by the caller
    ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    return ctx


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


def _os_reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
