"""An httpx.Auth that signs every request the way PROTOCOL.md says, with agent.wire.

httpx runs an auth flow for each ``Client.send``, so every send, including every
retry of the same batch, is signed afresh: a new ``created`` and a new nonce, while
the body and ``Idempotency-Key`` stay those of the batch (PROTOCOL.md, "Signing every
request"). That is why signing is per request here, never per batch.

Covered components are decided by `agent.wire.covered_components` from the headers
present: ``"@method" "@path" "content-type" "content-digest" "idempotency-key"`` for
a batch; without ``idempotency-key`` for blobs, reconcile and heartbeat;
``"@method" "@path"`` for requests without content. ``Content-Digest`` is over the
content exactly as sent (after gzip): the client sets it, or, for a body held in
memory, this auth computes it from those very bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import wire


class SigningAuth(httpx.Auth):
    """Sign each request with the node's Ed25519 key; ``key_id`` is the node id."""

    # Never make httpx read a streamed body (a blob) into memory: the client sets
    # Content-Digest for those before sending.
    requires_request_body = False
    requires_response_body = False

    def __init__(
        self,
        key: Ed25519PrivateKey,
        key_id: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key
        self._key_id = key_id
        self._clock = clock

    @property
    def key_id(self) -> str:
        return self._key_id

    def sign(self, request: httpx.Request) -> None:
        """Add ``Signature-Input`` and ``Signature`` to ``request`` (and
        ``Content-Digest`` when it has in-memory content and none yet).

        Raises:
            ValueError: the request is not one PROTOCOL.md allows (see
                `agent.wire.sign_request`), or it streams content without a
                Content-Digest.
        """
        for name in ("signature-input", "signature"):
            request.headers.pop(name, None)
        if "content-type" in request.headers and "content-digest" not in request.headers:
            try:
                content = request.content
            except httpx.RequestNotRead:
                raise ValueError("a streamed request must carry Content-Digest") from None
            request.headers["Content-Digest"] = wire.content_digest(content)
        request.headers.update(
            wire.sign_request(
                method=request.method,
                path=request.url.raw_path.decode("ascii"),
                headers=request.headers,
                key=self._key,
                key_id=self._key_id,
                created=int(self._clock()),
            )
        )

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self.sign(request)
        yield request
