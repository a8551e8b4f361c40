"""Association plumbing: the one module that drives pynetdicom's AE and associations.

Responsibility: make Application Entities with our timeouts and with TCP_NODELAY on
every socket they use (requestor and acceptor); open associations to the PACS; run
C-ECHO and C-FIND; and map every way an association can fail (connection refused or
timed out, A-ASSOCIATE-RJ, A-ABORT, A-P-ABORT, DIMSE timeout, no accepted
presentation context) to `PeerUnavailableError` or `PeerProtocolError`, naming the
peer as ``AE@host:port`` and the DICOM status or rejection reason (STYLE.md 3.5).

Nagle (issue 5): Debian's DCMTK and Orthanc leave Nagle's algorithm on and pynetdicom
never turns it off; either side alone costs about 40 ms per DIMSE round trip. We set
TCP_NODELAY from pynetdicom's public ``EVT_CONN_OPEN`` notification, which fires for
a requestor right after ``connect()`` and before the A-ASSOCIATE-RQ is sent, and for an
acceptor as soon as the connection is handed to its association. `NODELAY_HANDLERS`
is what the storage SCP (`adapters.dicom.retrieve`) passes to ``start_server``.

Never: log identifiers (patient names and IDs). Importing this module turns off
pynetdicom's identifier logging (``LOG_REQUEST_IDENTIFIERS`` /
``LOG_RESPONSE_IDENTIFIERS``, STYLE.md 3.7), which it has on by default.

Invariants: an error's message names the peer and never patient data; a missing
status is never success; every association opened here is released or aborted.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT

from adapters.dicom import status
from agent.errors import PeerProtocolError, PeerUnavailableError

log = logging.getLogger(__name__)

_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

VERIFICATION: Final = "1.2.840.10008.1.1"
STUDY_ROOT_FIND: Final = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE: Final = "1.2.840.10008.5.1.4.1.2.2.2"
#: Uncompressed transfer syntaxes every PACS accepts for Q/R and verification.
TRANSFER_SYNTAXES: Final = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

_REJECT_HINT: Final = (
    "The PACS refused the association: check that it knows our AE title (its list of "
    "DICOM modalities: AE title, host and port of this agent) and that the peer's AE "
    "title in the config is the one it answers to."
)
_CONNECT_HINT: Final = "Check that the PACS is up, and the peer's host and port (firewall?)."


def quiet_pynetdicom() -> None:
    """Identifier logging off; pynetdicom's logger at WARNING unless set otherwise."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    # pynetdicom's standard event handlers format a log line for every PDU and DIMSE
    # message even when nobody prints it (about 5% of a C-FIND's CPU); our own code
    # logs what an operator needs.
    _config.LOG_HANDLER_LEVEL = "none"
    logger = logging.getLogger("pynetdicom")
    if logger.level == logging.NOTSET or logger.level < logging.WARNING:
        logger.setLevel(logging.WARNING)


quiet_pynetdicom()


@dataclass(frozen=True, slots=True)
class Peer:
    """A remote AE: what every message about it names."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. ``connect``: TCP connect; ``acse``: association negotiation and
    release; ``dimse``: between two DIMSE messages of one operation; ``network``: idle
    association."""

    connect: float = 10.0
    acse: float = 30.0
    dimse: float = 60.0
    network: float = 60.0


DEFAULT_TIMEOUTS: Final = Timeouts()


def set_nodelay(sock: socket.socket | None) -> None:
    """TCP_NODELAY on a TCP socket (a no-op for anything else)."""
    if sock is None:
        return
    with contextlib.suppress(OSError):  # not a TCP socket, or closed: nothing to tune
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _on_conn_open(event: Any) -> None:
    # Notification handler: must never raise into pynetdicom.
    with contextlib.suppress(AttributeError):  # the socket is already gone
        set_nodelay(event.assoc.dul.socket.socket)


#: ``evt_handlers`` that turn Nagle off; for ``associate`` and ``start_server`` alike.
NODELAY_HANDLERS: Final = [(evt.EVT_CONN_OPEN, _on_conn_open)]


class _AE(AE):
    """pynetdicom's AE, closing the socket of a connection attempt that failed.

    pynetdicom 3.0.4 drops the reference to a socket whose ``connect()`` failed
    without closing it (``shutdown()`` raises ENOTCONN before ``close()`` runs), which
    leaks a descriptor per refused attempt until the garbage collector finds it. We
    keep the raw socket on the association so `associate` can close it.
    """

    def _create_socket(self, assoc: Association, address: Any, tls_args: Any) -> Any:
        sock = super()._create_socket(assoc, address, tls_args)
        assoc._sepas_raw_socket = sock.socket  # type: ignore[attr-defined]
        return sock


def make_ae(
    ae_title: str,
    *,
    requested: Iterable[str] = (VERIFICATION, STUDY_ROOT_FIND),
    timeouts: Timeouts | None = None,
) -> AE:
    """An AE that requests ``requested`` abstract syntaxes, with our timeouts."""
    timeouts = timeouts or DEFAULT_TIMEOUTS
    ae = _AE(ae_title=ae_title)
    ae.connection_timeout = timeouts.connect
    ae.acse_timeout = timeouts.acse
    ae.dimse_timeout = timeouts.dimse
    ae.network_timeout = timeouts.network
    for uid in requested:
        ae.add_requested_context(uid, list(TRANSFER_SYNTAXES))
    return ae


@dataclass(slots=True)
class _Watch:
    """What one association saw: connected, rejected (why), aborted (by whom)."""

    connected: bool = False
    rejection: str | None = None
    abort: str | None = None
    handlers: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.handlers = [
            *NODELAY_HANDLERS,
            (evt.EVT_CONN_OPEN, self._opened),
            (evt.EVT_ACSE_RECV, self._acse_recv),
        ]

    def _opened(self, event: Any) -> None:
        self.connected = True

    def _acse_recv(self, event: Any) -> None:
        try:
            p = event.primitive
            if isinstance(p, A_ASSOCIATE) and p.result in (0x01, 0x02):
                self.rejection = (
                    f"{p.result_str}, source: {p.source_str}, reason: {p.reason_str} "
                    f"(A-ASSOCIATE-RJ {p.result}/{p.result_source}/{p.diagnostic})"
                )
            elif isinstance(p, A_P_ABORT):
                self.abort = "A-P-ABORT: the connection was closed or the peer broke the protocol"
            elif isinstance(p, A_ABORT):
                source = {0: "service user", 2: "service provider"}.get(
                    p.abort_source if p.abort_source is not None else -1, "peer"
                )
                self.abort = f"A-ABORT from the peer's {source}"
        except Exception:  # a notification handler never breaks pynetdicom
            log.debug("Could not read an ACSE primitive.", exc_info=True)


class Session:
    """One established association to a peer; use through `associate`."""

    def __init__(self, assoc: Association, peer: Peer, timeouts: Timeouts, watch: _Watch):
        self.assoc = assoc
        self.peer = peer
        self.timeouts = timeouts
        self._watch = watch

    @property
    def aborted(self) -> str | None:
        """Why the association ended abnormally, or None while it is fine."""
        if self._watch.abort:
            return self._watch.abort
        if self.assoc.is_aborted:
            return "aborted"
        return None

    def lost(self, what: str, *, since: float) -> PeerProtocolError:
        """The error for "``what`` got no (complete) answer": abort or timeout."""
        waited = time.monotonic() - since
        timed_out = waited >= self.timeouts.dimse * 0.95
        if not timed_out and self.assoc.is_alive():
            # pynetdicom hands us the empty response as soon as the peer's A-ABORT (or a
            # closed connection) arrives, before its reactor has processed it; let the
            # reactor finish so the watch knows which it was.
            self.assoc.join(timeout=2.0)
        if self._watch.abort:
            why = self._watch.abort
        elif timed_out:
            why = f"no answer within {self.timeouts.dimse:g} s (DIMSE timeout)"
        elif not self.assoc.is_established:
            why = "the association ended"
        else:
            why = "an empty response"
        return PeerProtocolError(
            f"{what} to {self.peer}: {status.describe(None)}; {why}",
            hint="Check the PACS's logs; the agent retries on its next poll.",
        )

    def find(
        self, identifier: Dataset, *, model: str = STUDY_ROOT_FIND
    ) -> Iterator[tuple[int, Dataset | None]]:
        """C-FIND: yields (status code, identifier or None) per response, final last.

        Raises:
            PeerProtocolError: no status (aborted, DIMSE timeout), or the peer did not
                accept the query model.
        """
        try:
            responses = self.assoc.send_c_find(identifier, model)
        except (ValueError, RuntimeError) as e:
            raise PeerProtocolError(
                f"C-FIND to {self.peer}: cannot send ({e})",
                hint="The PACS did not accept Study Root Query/Retrieve - FIND; check its "
                "configuration.",
            ) from None
        since = time.monotonic()
        for rsp_status, ident in responses:
            code = getattr(rsp_status, "Status", None)
            if code is None:
                raise self.lost("C-FIND", since=since)
            yield int(code), ident
            since = time.monotonic()

    def echo(self) -> int:
        """C-ECHO; returns the status code.

        Raises:
            PeerProtocolError: no status (aborted, timed out).
        """
        since = time.monotonic()
        try:
            rsp = self.assoc.send_c_echo()
        except (ValueError, RuntimeError) as e:
            raise PeerProtocolError(f"C-ECHO to {self.peer}: cannot send ({e})") from None
        code = getattr(rsp, "Status", None)
        if code is None:
            raise self.lost("C-ECHO", since=since)
        return int(code)


def _not_established(
    assoc: Association, peer: Peer, watch: _Watch, started: float, t: Timeouts
) -> PeerUnavailableError | PeerProtocolError:
    waited = time.monotonic() - started
    if assoc.is_rejected or watch.rejection:
        return PeerUnavailableError(
            f"{peer} rejected the association: {watch.rejection or 'A-ASSOCIATE-RJ'}",
            hint=_REJECT_HINT,
        )
    if not watch.connected:
        if waited >= t.connect * 0.95:
            why = f"no TCP connection within {t.connect:g} s (timeout)"
        else:
            why = "connection refused or host unreachable"
        return PeerUnavailableError(f"cannot connect to {peer}: {why}", hint=_CONNECT_HINT)
    if watch.abort:
        return PeerProtocolError(
            f"{peer} aborted the association request: {watch.abort}",
            hint="The PACS accepted the connection but not the association; see its logs.",
        )
    if assoc.is_aborted and not assoc.accepted_contexts and assoc.rejected_contexts:
        return PeerProtocolError(
            f"{peer} accepted none of the requested presentation contexts "
            f"({', '.join(sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts}))})",
            hint="Enable Query/Retrieve (Study Root) for our AE title on the PACS.",
        )
    if waited >= t.acse * 0.95:
        return PeerUnavailableError(
            f"{peer} did not answer the association request within {t.acse:g} s",
            hint=_CONNECT_HINT,
        )
    return PeerProtocolError(f"association with {peer} failed during negotiation")


@contextmanager
def associate(ae: AE, peer: Peer, *, timeouts: Timeouts | None = None) -> Iterator[Session]:
    """Open an association to ``peer``; release it on exit (abort if that fails).

    Raises:
        PeerUnavailableError: refused, unreachable, timed out, or rejected (the
            message carries the A-ASSOCIATE-RJ result, source and reason).
        PeerProtocolError: aborted during negotiation, or no presentation context
            accepted.
    """
    timeouts = timeouts or DEFAULT_TIMEOUTS
    watch = _Watch()
    started = time.monotonic()
    try:
        assoc = ae.associate(
            peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=watch.handlers
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise PeerUnavailableError(f"cannot associate with {peer}: {e}", hint=_CONNECT_HINT) from e
    if not assoc.is_established:
        raw = getattr(assoc, "_sepas_raw_socket", None)
        if raw is not None:
            raw.close()
        raise _not_established(assoc, peer, watch, started, timeouts)
    session = Session(assoc, peer, timeouts, watch)
    try:
        yield session
    finally:
        if assoc.is_established:
            try:
                assoc.release()
            except Exception:  # never let cleanup mask the real outcome
                log.debug("Association release failed; aborting.", exc_info=True)
                assoc.abort()
            if assoc.is_established:  # release timed out
                assoc.abort()


def echo(
    ae_title: str,
    peer: Peer,
    *,
    timeouts: Timeouts | None = None,
    ae_factory: Callable[..., AE] | None = None,
) -> int:
    """C-ECHO ``peer`` on a fresh association; returns the status (0x0000: success).

    Raises:
        PeerUnavailableError, PeerProtocolError: as `associate` and `Session.echo`.
    """
    timeouts = timeouts or DEFAULT_TIMEOUTS
    ae = (ae_factory or make_ae)(ae_title, requested=(VERIFICATION,), timeouts=timeouts)
    with associate(ae, peer, timeouts=timeouts) as session:
        return session.echo()
