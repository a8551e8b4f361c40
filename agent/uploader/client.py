"""HubClient: the only code in the agent that sends HTTP (PROTOCOL.md's endpoints).

Responsibility: one httpx.Client (HTTP/1.1, connection reuse, timeouts, TLS always
verified, proxies from the environment), one method per PROTOCOL.md endpoint, and
the mapping of everything httpx can raise and every status the hub can answer to
`agent.errors.HubError` subclasses, carrying status, problem ``type`` and
``Retry-After``. What to *do* about an error is `agent.uploader.policy`'s business.

Must never:
- send plain http:// to a host that is not loopback unless ``hub.allow_insecure``;
- turn TLS verification off (a private CA goes in ``hub.ca_bundle``);
- follow redirects (a signed request is bound to its path; a redirect means hub.url
  is wrong, and the operator must hear about it);
- log a request or response body, or any URL query (patient data lives in bodies).

Clock skew: every response's ``Date`` is compared with the local clock at the middle
of the exchange; `HubClient.last_skew` is the node's clock minus the hub's, in
seconds (positive: the node is ahead). Past `SKEW_WARN_SECS` a warning is logged,
because past the hub's window (300 s by default) every signature is refused.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import hashlib
import ipaddress
import json
import logging
import os
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlsplit

import httpx

from agent import __version__, wire
from agent.config import HubSettings
from agent.errors import (
    BatchInFlightError,
    BatchRejectedError,
    BatchTooLargeError,
    ConfigError,
    ConfigProblem,
    HubError,
    HubThrottledError,
    HubUnavailableError,
    IdempotencyConflictError,
    SignatureRefusedError,
    StorageError,
)
from agent.uploader.batching import Batch, BatchResult, parse_batch_result

log = logging.getLogger(__name__)

#: Warn when the node's clock is this far from the hub's (the hub refuses at 300 s).
SKEW_WARN_SECS: Final = 120.0
#: Chunk size of a streamed blob upload.
BLOB_CHUNK: Final = 64 * 1024
#: Longest problem ``detail`` kept in an error message (and thus in `status`).
_MAX_DETAIL: Final = 300

_ERRORS_BY_STATUS: Final[dict[int, type[HubError]]] = {
    400: BatchRejectedError,
    401: SignatureRefusedError,
    403: SignatureRefusedError,
    409: BatchInFlightError,
    413: BatchTooLargeError,
    415: BatchRejectedError,
    422: IdempotencyConflictError,
    429: HubThrottledError,
    503: HubThrottledError,
}


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 and ``localhost``."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_hub_url(url: str, *, allow_insecure: bool) -> None:
    """Refuse what must never be used as hub.url.

    Raises:
        ConfigError: not http(s), no host, or plain http to a non-loopback host
            without ``allow_insecure``.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            "[hub]", [ConfigProblem("hub.url", "expected an http:// or https:// URL")]
        )
    if parts.scheme == "http" and not allow_insecure and not is_loopback_host(parts.hostname):
        raise ConfigError(
            "[hub]",
            [
                ConfigProblem(
                    "hub.url",
                    f"plain http to {parts.hostname} is refused: records would cross the "
                    "network unencrypted",
                )
            ],
            hint="Use https:// (with hub.ca_bundle for a private CA), or, only on a network "
            "you trust, set hub.allow_insecure = true.",
        )


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """``Retry-After`` (RFC 9110 section 10.2.3) as seconds from ``now``: delay-seconds
    or an HTTP-date; a date in the past is 0. None when absent or unparseable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.utcoffset() is None:  # "-0000": UTC per RFC 5322
        return None
    return max(0.0, when.timestamp() - now)


def _ssl_context(settings: HubSettings) -> ssl.SSLContext:
    """Verification always on. ``ca_bundle`` replaces the trust store; without it the
    system's store is used (what `update-ca-certificates` manages), or certifi's when
    the system has none. A client certificate is loaded for mTLS."""
    problems: list[ConfigProblem] = []
    try:
        if settings.ca_bundle is not None:
            ctx = ssl.create_default_context(cafile=str(settings.ca_bundle))
        else:
            ctx = ssl.create_default_context()
            if not ctx.cert_store_stats().get("x509_ca"):
                import certifi  # httpx's own dependency

                ctx.load_verify_locations(cafile=certifi.where())
    except (OSError, ssl.SSLError) as e:
        problems.append(ConfigProblem("hub.ca_bundle", f"cannot be loaded: {_why(e)}"))
        ctx = ssl.create_default_context()
    if settings.client_cert is not None:
        try:
            ctx.load_cert_chain(
                str(settings.client_cert),
                str(settings.client_key) if settings.client_key is not None else None,
            )
        except (OSError, ssl.SSLError) as e:
            problems.append(ConfigProblem("hub.client_cert", f"cannot be loaded: {_why(e)}"))
    if problems:
        raise ConfigError(
            "[hub]",
            problems,
            hint="Check the PEM files named in [hub] and that the agent's user can read them.",
        )
    return ctx


def _why(e: BaseException) -> str:
    return getattr(e, "strerror", None) or getattr(e, "reason", None) or type(e).__name__


@dataclass(frozen=True, slots=True)
class DayDigest:
    """One day of a ``POST /v1/reconcile`` answer."""

    day: str
    count: int
    digest: str


class TokenBucket:
    """At most ``rate`` bytes per second on average, bursts up to one second's worth."""

    def __init__(
        self, rate: float, *, clock: Callable[[], float], sleep: Callable[[float], None]
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.rate
        self._last = clock()

    def take(self, n: int) -> None:
        now = self._clock()
        self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            self._sleep(-self._tokens / self.rate)


class HubClient:
    """PROTOCOL.md's endpoints over one httpx.Client. Use as a context manager, or
    call `close`. Not thread-safe: one uploader uses one client."""

    def __init__(
        self,
        settings: HubSettings,
        auth: httpx.Auth,
        *,
        node_id: str,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Build the client; nothing is sent yet.

        Args:
            settings: ``[hub]``.
            auth: signs each request (`agent.uploader.signing.SigningAuth`).
            node_id: this node's id, for the paths that name it.
            transport: a test seam (``httpx.MockTransport``); None in production, so
                that proxies from the environment apply.
            clock: Unix time, for skew, Retry-After dates and the blob rate limit.
            sleep: used only by the blob rate limit.

        Raises:
            ConfigError: hub.url refused (see `check_hub_url`), or a CA bundle or
                client certificate that cannot be loaded.
        """
        check_hub_url(settings.url, allow_insecure=settings.allow_insecure)
        self.settings = settings
        self.node_id = node_id
        self._auth = auth
        self._clock = clock
        self._sleep = sleep
        self.last_skew: float | None = None
        self._skew_warned = False
        self._http = httpx.Client(
            base_url=settings.url,
            timeout=httpx.Timeout(settings.timeout_secs),
            verify=_ssl_context(settings),
            http1=True,
            http2=False,
            trust_env=True,
            follow_redirects=False,
            transport=transport,
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=2),
            headers={"User-Agent": f"sepas-agent/{__version__}"},
        )

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- endpoints -------------------------------------------------------------------------

    def post_batch(self, batch: Batch) -> BatchResult:
        """``POST /v1/batches``: the batch's gzip bytes, signed, keyed by its id.

        Raises:
            HubError: the subclass PROTOCOL.md's status names; HubUnavailableError for
                network errors, timeouts, other statuses, or a 200 whose body does not
                answer this batch.
        """
        headers = {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "Content-Digest": wire.content_digest(batch.content),
            "Idempotency-Key": batch.batch_id,
        }
        response = self._send(
            lambda: self._http.build_request(
                "POST", "/v1/batches", content=batch.content, headers=headers
            ),
            ok=(200,),
        )
        try:
            return parse_batch_result(
                response.json(),
                batch,
                replayed=response.headers.get("idempotent-replayed", "").lower() == "true",
            )
        except ValueError as e:
            raise HubUnavailableError(
                f"the hub's answer to batch {batch.batch_id} does not follow PROTOCOL.md: {e}",
                status=200,
                hint="The hub does not speak protocol version 1 as this node does; the "
                "records stay pending. Report it to the hub's operator.",
            ) from None

    def has_blob(self, sha256: str) -> bool:
        """``HEAD /v1/blobs/sha256/{hex}`` (signed): whether the hub holds the blob.

        Raises:
            HubError: any answer but 200 or 404.
        """
        response = self._send(
            lambda: self._http.build_request("HEAD", _blob_path(sha256)), ok=(200, 404)
        )
        return response.status_code == 200

    def put_blob(self, sha256: str, path: Path, media_type: str) -> bool:
        """``PUT /v1/blobs/sha256/{hex}``, streamed from ``path`` (at most
        ``hub.blob_rate_limit`` bytes/s). True when the hub stored it (201), False when
        it already had it (200).

        Content-Digest is known before a byte is read: the blob's name is the SHA-256
        of its content. The content is hashed again while it streams, and a mismatch
        (the local file changed) is logged; the hub then refuses it with 400.

        Raises:
            HubError: as for batches (400: the content is not ``sha256``).
            FileNotFoundError: the blob file is missing.
            StorageError: the blob file cannot be read.
        """
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise
        except OSError as e:
            raise StorageError(f"cannot read blob file {path}: {e.strerror}") from None
        headers = {
            "Content-Type": media_type,
            "Content-Length": str(size),
            "Content-Digest": digest_of_sha256(sha256),
        }
        hashers: list[Any] = []

        def build() -> httpx.Request:
            hasher = hashlib.sha256()
            hashers.append(hasher)
            return self._http.build_request(
                "PUT",
                _blob_path(sha256),
                content=self._file_chunks(path, hasher),
                headers=headers,
            )

        response = self._send(build, ok=(200, 201))
        if hashers and hashers[-1].hexdigest() != sha256:
            log.error(
                "A blob file does not match its name; the hub will refuse it.",
                extra={"event": "upload.blob_corrupt", "blob": sha256[:12]},
            )
        return response.status_code == 201

    def reconcile(self, days: Sequence[str]) -> list[DayDigest]:
        """``POST /v1/reconcile``: the hub's count and digest for each of ``days``.

        Raises:
            HubError: as for batches; HubUnavailableError for an answer that is not
                PROTOCOL.md's shape.
        """
        response = self._send_json(
            "/v1/reconcile", {"node_id": self.node_id, "days": list(days)}, ok=(200,)
        )
        try:
            data = response.json()
            out = [
                DayDigest(day=str(d["day"]), count=int(d["count"]), digest=str(d["digest"]))
                for d in data["days"]
            ]
        except (ValueError, KeyError, TypeError) as e:
            raise HubUnavailableError(
                f"the hub's reconcile answer does not follow PROTOCOL.md ({type(e).__name__})",
                status=response.status_code,
            ) from None
        return out

    def heartbeat(self, body: Mapping[str, Any]) -> None:
        """``POST /v1/nodes/{node_id}/heartbeat``; the hub answers 204.

        Raises:
            HubError: as for batches.
        """
        self._send_json(
            f"/v1/nodes/{quote(self.node_id, safe='')}/heartbeat", body, ok=(200, 202, 204)
        )

    def node_view(self) -> dict[str, Any]:
        """``GET /v1/nodes/{node_id}``: what the hub holds from this node.

        Raises:
            HubError: as for batches.
        """
        response = self._send(
            lambda: self._http.build_request("GET", f"/v1/nodes/{quote(self.node_id, safe='')}"),
            ok=(200,),
        )
        try:
            data = response.json()
        except ValueError:
            raise HubUnavailableError("the hub's node view is not JSON", status=200) from None
        if not isinstance(data, dict):
            raise HubUnavailableError("the hub's node view is not a JSON object", status=200)
        return data

    def health(self) -> bool:
        """``GET /v1/health`` (unsigned): True when the hub answers ``{"status": "ok"}``.
        Never raises."""
        try:
            t0 = self._clock()
            response = self._http.get("/v1/health")
            self._observe(response, t0, self._clock())
            return response.status_code == 200 and response.json().get("status") == "ok"
        except (httpx.HTTPError, ValueError, AttributeError):
            return False

    # -- plumbing --------------------------------------------------------------------------

    def _send_json(
        self, path: str, body: Mapping[str, Any], *, ok: tuple[int, ...]
    ) -> httpx.Response:
        content = json.dumps(dict(body), ensure_ascii=False, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "Content-Digest": wire.content_digest(content),
        }
        return self._send(
            lambda: self._http.build_request("POST", path, content=content, headers=headers),
            ok=ok,
        )

    def _send(self, build: Callable[[], httpx.Request], *, ok: tuple[int, ...]) -> httpx.Response:
        """Send (signed afresh each time), map every failure to a HubError.

        A connection the hub closed without answering (a keep-alive connection that
        went stale) is retried once at once on a new one: every request here is safe
        to repeat (batches are keyed, blobs content-addressed, the rest read-only or
        last-writer-wins).
        """
        for attempt in (0, 1):
            request = build()
            t0 = self._clock()
            try:
                response = self._http.send(request, auth=self._auth)
            except httpx.RemoteProtocolError as e:
                if attempt == 0:
                    log.debug(
                        "The hub closed the connection without answering; retrying once.",
                        extra={"event": "upload.connection_retried"},
                    )
                    continue
                raise _network_error(e) from None
            except httpx.HTTPError as e:
                raise _network_error(e) from None
            self._observe(response, t0, self._clock())
            if response.status_code in ok:
                return response
            raise self._error_for(response)
        raise AssertionError("unreachable")  # pragma: no cover

    def _file_chunks(self, path: Path, hasher: Any) -> Iterator[bytes]:
        rate = self.settings.blob_rate_limit
        bucket = TokenBucket(rate, clock=self._clock, sleep=self._sleep) if rate else None
        chunk_size = min(BLOB_CHUNK, rate) if rate else BLOB_CHUNK
        try:
            with open(path, "rb") as f:
                while chunk := f.read(chunk_size):
                    hasher.update(chunk)
                    if bucket is not None:
                        bucket.take(len(chunk))
                    yield chunk
        except OSError as e:
            raise StorageError(f"cannot read blob file {path}: {e.strerror}") from None

    def _observe(self, response: httpx.Response, t0: float, t1: float) -> None:
        date = response.headers.get("date")
        if not date:
            return
        with contextlib.suppress(TypeError, ValueError, IndexError):
            hub = email.utils.parsedate_to_datetime(date).timestamp()
            # Date has whole seconds: the hub's clock was somewhere in [hub, hub + 1).
            skew = (t0 + t1) / 2 - (hub + 0.5)
            self.last_skew = round(skew, 1)
            if abs(skew) > SKEW_WARN_SECS and not self._skew_warned:
                self._skew_warned = True
                log.warning(
                    "This node's clock is %+.0f s from the hub's; past 300 s the hub refuses "
                    "every upload. Fix the time sync (chrony/systemd-timesyncd).",
                    skew,
                    extra={"event": "upload.clock_skewed", "skew_s": round(skew, 1)},
                )
            elif abs(skew) <= SKEW_WARN_SECS and self._skew_warned:
                self._skew_warned = False
                log.info(
                    "Clock skew vs the hub is back within %.0f s.",
                    SKEW_WARN_SECS,
                    extra={"event": "upload.clock_recovered", "skew_s": round(skew, 1)},
                )

    def _error_for(self, response: httpx.Response) -> HubError:
        status = response.status_code
        ptype, title, detail = _problem(response)
        retry_after = parse_retry_after(response.headers.get("retry-after"), now=self._clock())
        text = f"hub answered {status}"
        if title:
            text += f" {title}"
        if detail:
            text += f": {detail}"
        if ptype:
            text += f" [{ptype}]"
        cls = _ERRORS_BY_STATUS.get(status, HubUnavailableError)
        hint: str | None = None
        if 300 <= status < 400:
            hint = (
                f"The hub redirects to {response.headers.get('location', '?')}; "
                "set hub.url to the final address."
            )
        elif status in (404, 405):
            hint = "Check hub.url: it must be the hub's base URL (the agent adds /v1/...)."
        return cls(text, status=status, problem_type=ptype, retry_after=retry_after, hint=hint)


def digest_of_sha256(sha256: str) -> str:
    """The Content-Digest of content whose SHA-256 is ``sha256`` (hex): RFC 9530's
    ``sha-256=:<base64 of the 32 bytes>:``. A blob's name is that digest, so no pass
    over the file is needed before sending it."""
    return "sha-256=:" + base64.b64encode(bytes.fromhex(sha256)).decode("ascii") + ":"


def _blob_path(sha256: str) -> str:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError("a blob name must be 64 lower-case hex digits")
    return f"/v1/blobs/sha256/{sha256}"


def _network_error(e: httpx.HTTPError) -> HubUnavailableError:
    if isinstance(e, httpx.TimeoutException):
        what = f"timed out ({type(e).__name__})"
    elif isinstance(e, httpx.ConnectError):
        what = "cannot connect"
    elif isinstance(e, httpx.ProxyError):
        what = "the proxy refused"
    else:
        what = f"connection failed ({type(e).__name__})"
    # str(e) of httpx errors names the host and the OS error, never a body.
    reason = str(e).splitlines()[0][:200] if str(e) else ""
    return HubUnavailableError(f"hub {what}" + (f": {reason}" if reason else ""))


def _problem(response: httpx.Response) -> tuple[str | None, str | None, str | None]:
    """(type, title, detail) of a problem+json body (RFC 9457); Nones otherwise."""
    ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("application/problem+json", "application/json"):
        return None, None, None
    try:
        data = response.json()
    except ValueError:
        return None, None, None
    if not isinstance(data, dict):
        return None, None, None

    def text(name: str, limit: int) -> str | None:
        value = data.get(name)
        if not isinstance(value, str) or not value:
            return None
        clean = "".join(c if c.isprintable() else " " for c in value)
        return clean[:limit]

    return text("type", 200), text("title", 100), text("detail", _MAX_DETAIL)
