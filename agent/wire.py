"""PROTOCOL.md in code: Content-Digest (RFC 9530) and request signatures (RFC 9421).

Responsibility: the byte-exact parts of the node-hub contract that both ends must
compute identically, so that they have one implementation. The node signs with
`sign_request`; the hub checks with `verify_content_digest`, `parse_signature_headers`
and `verify_request`.

The hub imports this module, `agent.record` and `agent.errors` and nothing else of the
agent, so this module must never import other agent modules (or httpx, starlette...):
it works on plain strings, bytes and mappings of header fields.

What this module does not decide, and the hub must (PROTOCOL.md, "Signing every
request"): looking ``keyid`` up in the node registry and refusing an unknown or
revoked one; refusing a nonce already seen for that node inside the window; checking
that the body's ``node_id`` equals ``keyid``; comparing the body with
``Content-Digest`` (`verify_content_digest`) before decompressing anything.

Invariants:
- The signature base is built as RFC 9421 section 2.5 says: one line per covered
  component, ``"<name>": <value>``, then ``"@signature-params": <params>``, joined
  with LF and no trailing LF. Field names are lower-case; field values are the
  request's field lines with obs-fold replaced by a space, trimmed, and joined with
  ", " (RFC 9421 section 2.1).
- Structured fields (RFC 9651) are parsed and serialised with ``http_sf`` (by the
  RFC's author), never with regular expressions.
- The verifier refuses everything PROTOCOL.md does not describe, with a stable
  `SignatureProblem` slug that becomes the problem+json ``type`` (`problem_type`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, NoReturn

import http_sf
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from http_sf.types import ItemType, ParamsType

#: The only signature label PROTOCOL.md uses; other labels are ignored by the hub.
SIGNATURE_LABEL: Final = "sig1"
#: RFC 9421 ``alg`` value; the only one accepted.
ALGORITHM: Final = "ed25519"
#: RFC 9421 ``tag``: names the application, so a signature made for another protocol
#: with the same key cannot be replayed here.
TAG: Final = "sepas-v1"
#: How far ``created`` may be from the hub's clock, either way (configurable at the hub).
DEFAULT_MAX_SKEW_SECS: Final = 300.0
#: Random bytes in a nonce: PROTOCOL.md asks for at least 128 bits.
NONCE_BYTES: Final = 16

#: Prefix of every problem+json ``type`` this project sends.
PROBLEM_BASE: Final = "https://sepas.example/problems/"

#: Signature parameters, in the order PROTOCOL.md shows and `sign_request` writes them.
SIGNATURE_PARAMS: Final = ("created", "keyid", "alg", "nonce", "tag")

# Covered components (PROTOCOL.md "Signing every request"), in order.
_WITHOUT_CONTENT: Final = ("@method", "@path")
_WITH_CONTENT: Final = ("@method", "@path", "content-type", "content-digest")
_IDEMPOTENCY_KEY: Final = "idempotency-key"

# base64url without padding; 22 characters carry 128 bits. The upper bound keeps the
# hub's replay cache bounded.
_NONCE_RE: Final = re.compile(r"[A-Za-z0-9_-]{22,128}")
# RFC 9110 token, for the method.
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# What may appear in a signature base line after normalisation: visible ASCII, SP, HTAB.
_BASE_VALUE_RE: Final = re.compile(r"[\t\x20-\x7e]*")
# An absolute path as sent: "/" then visible ASCII (non-ASCII must be percent-encoded).
_PATH_RE: Final = re.compile(r"/[\x21-\x7e]*")
# obs-fold (RFC 9112 section 5.2), with the whitespace around it.
_OBS_FOLD_RE: Final = re.compile(r"[ \t]*\r\n[ \t]+")


# --- problems -----------------------------------------------------------------------------


class SignatureProblem(StrEnum):
    """Why the hub refuses a signature; the value is the problem ``type`` suffix.

    Stable: nodes and dashboards match on them. New ones may be added, never renamed.
    """

    MISSING = "signature-missing"  # Signature-Input or Signature absent
    MALFORMED = "signature-malformed"  # unparseable, or not what PROTOCOL.md describes
    UNSUPPORTED_ALGORITHM = "unsupported-algorithm"  # alg is not "ed25519"
    WRONG_TAG = "wrong-tag"  # tag is not "sepas-v1"
    COMPONENT_NOT_COVERED = "component-not-covered"  # a required component is missing
    CREATED_OUT_OF_WINDOW = "created-out-of-window"  # created too far from the hub's clock
    MISMATCH = "signature-mismatch"  # the signature does not verify with any active key


def problem_type(slug: str) -> str:
    """The problem+json ``type`` URI for ``slug`` (RFC 9457 section 3.1.1)."""
    return PROBLEM_BASE + slug


class SignatureInvalidError(ValueError):
    """The hub refuses a request's signature (401).

    Deliberately not a `agent.errors.SepasError`: that tree describes what went wrong
    for the operator of the process that raises it, with a hint for them. This is a
    verdict about someone else's request, which the hub turns into a problem+json
    body; the node sees it as `agent.errors.SignatureRefusedError` with the ``type``.

    Attributes:
        problem: why, as a stable slug.
        detail: one sentence for the problem's ``detail``; never contains header
            values other than the signature's own parameters.
    """

    def __init__(self, problem: SignatureProblem, detail: str) -> None:
        super().__init__(f"{problem.value}: {detail}")
        self.problem = problem
        self.detail = detail

    @property
    def type_uri(self) -> str:
        """The problem+json ``type`` for this refusal."""
        return problem_type(self.problem.value)


class SignatureFormatError(SignatureInvalidError):
    """The signature headers are absent or unparseable (``signature-missing`` or
    ``signature-malformed``). A subclass of `SignatureInvalidError`, so that the hub
    can catch one exception around `verify_request`."""


# --- Content-Digest (RFC 9530) ------------------------------------------------------------


def content_digest(body: bytes) -> str:
    """The ``Content-Digest`` value for ``body`` as sent on the wire: ``sha-256=:<b64>:``."""
    return http_sf.ser({"sha-256": hashlib.sha256(body).digest()})


_DIGESTS: Final = {"sha-256": hashlib.sha256, "sha-512": hashlib.sha512}


def verify_content_digest(header: str, body: bytes) -> bool:
    """Whether a ``Content-Digest`` value matches ``body``.

    The value is an RFC 9651 dictionary. It must hold a ``sha-256`` member (PROTOCOL.md);
    a ``sha-512`` member, if also present, must match too; other algorithms listed
    alongside are ignored. False when the value is unparseable, lists an algorithm
    twice, or holds something other than a byte sequence for a known algorithm.
    """
    try:
        parsed = http_sf.parse(
            header.encode("ascii"), tltype="dictionary", on_duplicate_key=_refuse_duplicate
        )
    except (UnicodeEncodeError, ValueError):  # StructuredFieldError is a ValueError
        return False
    if not isinstance(parsed, dict) or "sha-256" not in parsed:
        return False
    for alg, member in parsed.items():
        if alg not in _DIGESTS:
            continue
        value = member[0] if isinstance(member, tuple) else member
        if not isinstance(value, bytes):
            return False
        if not hmac.compare_digest(value, _DIGESTS[alg](body).digest()):
            return False
    return True


# --- signing (the node) -------------------------------------------------------------------


def new_nonce() -> str:
    """A fresh nonce: `NONCE_BYTES` random bytes, base64url without padding."""
    return base64.urlsafe_b64encode(secrets.token_bytes(NONCE_BYTES)).decode("ascii").rstrip("=")


def covered_components(headers: Mapping[str, str]) -> tuple[str, ...]:
    """The components a node covers for a request with these header fields.

    A request has content when it carries ``Content-Type`` or ``Content-Digest``; it
    must then carry both. ``Idempotency-Key`` is covered when present, and is only
    allowed on a request with content (PROTOCOL.md: batch uploads).

    Raises:
        ValueError: the headers do not describe a request PROTOCOL.md allows.
    """
    names = {name.lower() for name in headers}
    has_content = "content-type" in names or "content-digest" in names
    if not has_content:
        if _IDEMPOTENCY_KEY in names:
            raise ValueError("Idempotency-Key on a request without content")
        return _WITHOUT_CONTENT
    missing = [c for c in ("content-type", "content-digest") if c not in names]
    if missing:
        raise ValueError(f"a request with content must carry {', '.join(missing)}")
    return (*_WITH_CONTENT, _IDEMPOTENCY_KEY) if _IDEMPOTENCY_KEY in names else _WITH_CONTENT


def signature_params_value(components: Sequence[str], params: Mapping[str, int | str]) -> str:
    """Serialise the ``@signature-params`` value: ``("@method" ...);created=...;...``.

    Parameters are written in the order given.

    Raises:
        ValueError: a component or parameter cannot be serialised as a structured field.
    """
    return _sig_input_member(components, params)[len(SIGNATURE_LABEL) + 1 :]


def signature_base(
    *,
    method: str,
    path: str,
    headers: Mapping[str, str],
    components: Sequence[str],
    params: Mapping[str, int | str],
) -> str:
    """The RFC 9421 section 2.5 signature base for a request.

    Args:
        method: the request method, as sent (RFC 9421 section 2.2.1: not case-folded).
        path: the target URI's path as sent, percent-encoding intact. A query, if
            present, is not part of ``@path`` and is dropped; an empty path is "/".
        headers: the request's header fields; names in any case; a mapping whose
            ``items()`` yields repeated names (as Starlette's does) is combined.
        components: covered component names, in order: ``@method``, ``@path`` and
            lower-case field names.
        params: signature parameters, in order.

    Raises:
        ValueError: a component is unsupported or absent, or a value cannot appear in
            a signature base.
    """
    if len(set(components)) != len(components):
        raise ValueError("a component is covered twice")
    fields = _field_values(headers)
    lines = []
    for name in components:
        if name == "@method":
            value = _method_value(method)
        elif name == "@path":
            value = _path_value(path)
        elif name.startswith("@"):
            raise ValueError(f"derived component {name} is not used by PROTOCOL.md")
        elif name != name.lower():
            raise ValueError(f"component {name} is not lower-case")
        elif name not in fields:
            raise ValueError(f"covered field {name} is not in the request")
        else:
            value = _check_base_value(name, fields[name])
        lines.append(f"{http_sf.ser(name)}: {value}")
    lines.append(f'"@signature-params": {signature_params_value(components, params)}')
    return "\n".join(lines)


def sign_request(
    *,
    method: str,
    path: str,
    headers: Mapping[str, str],
    key: Ed25519PrivateKey,
    key_id: str,
    created: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Sign a request as PROTOCOL.md says; return the two header fields to add.

    Set ``Content-Type``, ``Content-Digest`` and ``Idempotency-Key`` on the request
    before signing: which of them are present decides what is covered
    (`covered_components`). A retry must be signed afresh (new ``created`` and nonce).

    Args:
        method: the request method, e.g. "POST".
        path: the target URI's path as sent, percent-encoding intact (a query is
            dropped: it is not part of ``@path``).
        headers: the request's header fields.
        key: the node's identity key.
        key_id: the node id, e.g. "FAC-0001".
        created: UNIX seconds; the current time when None.
        nonce: base64url, at least 128 bits; a fresh `new_nonce` when None.

    Returns:
        ``{"Signature-Input": ..., "Signature": ...}``.

    Raises:
        ValueError: the headers do not describe a request PROTOCOL.md allows, a value
            cannot be signed (see `signature_base`), or ``key_id`` or ``nonce`` would
            be refused by the hub.
    """
    if not key_id:
        raise ValueError("key_id is empty")
    if nonce is not None and not _NONCE_RE.fullmatch(nonce):
        raise ValueError("nonce must be base64url without padding, at least 128 bits")
    components = covered_components(headers)
    params: dict[str, int | str] = {
        "created": int(time.time()) if created is None else created,
        "keyid": key_id,
        "alg": ALGORITHM,
        "nonce": new_nonce() if nonce is None else nonce,
        "tag": TAG,
    }
    base = signature_base(
        method=method, path=path, headers=headers, components=components, params=params
    )
    signature = key.sign(base.encode("ascii"))
    return {
        "Signature-Input": _sig_input_member(components, params),
        "Signature": http_sf.ser({SIGNATURE_LABEL: signature}),
    }


# --- verification (the hub) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SignatureParams:
    """The ``sig1`` signature of a request, parsed; not yet verified."""

    label: str
    components: tuple[str, ...]
    created: int
    keyid: str
    alg: str
    nonce: str
    tag: str
    signature: bytes
    #: The parameters as received, in order; what ``@signature-params`` serialises.
    params: tuple[tuple[str, int | str], ...]

    @property
    def signature_params(self) -> str:
        """The ``@signature-params`` value, re-serialised from the parsed field."""
        return signature_params_value(self.components, dict(self.params))


def parse_signature_headers(headers: Mapping[str, str]) -> SignatureParams:
    """Parse the ``sig1`` member of ``Signature-Input`` and ``Signature``.

    Other labels are ignored (RFC 9421 allows a proxy to add its own). The parameters
    must be exactly ``created`` (integer), ``keyid``, ``alg``, ``nonce`` (base64url,
    at least 128 bits) and ``tag`` (strings), in any order; components plain
    lower-case names without parameters, none twice. Their values are checked by
    `verify_request`.

    Raises:
        SignatureFormatError: ``signature-missing`` when a header is absent,
            ``signature-malformed`` for anything else.
    """
    fields = _field_values(headers, names=("signature-input", "signature"))
    for name in ("signature-input", "signature"):
        if name not in fields:
            raise SignatureFormatError(SignatureProblem.MISSING, f"no {name.title()} header")
    sig_input = _parse_dictionary(fields["signature-input"], "Signature-Input")
    sig_value = _parse_dictionary(fields["signature"], "Signature")
    if SIGNATURE_LABEL not in sig_input or SIGNATURE_LABEL not in sig_value:
        _malformed(f"no {SIGNATURE_LABEL} member in Signature-Input and Signature")

    member = sig_input[SIGNATURE_LABEL]
    if not (isinstance(member, tuple) and isinstance(member[0], list)):
        _malformed(f"Signature-Input {SIGNATURE_LABEL} is not an inner list")
    items, raw_params = member
    components: list[str] = []
    for item in items:
        name, item_params = item if isinstance(item, tuple) else (item, {})
        if type(name) is not str or item_params:
            _malformed("a covered component is not a plain string")
        if name != name.lower():
            _malformed(f"covered component {name} is not lower-case")
        if name in components:
            _malformed(f"covered component {name} appears twice")
        components.append(name)

    params: dict[str, int | str] = {}  # in the order received: the base needs it
    for name, value in raw_params.items():
        if name not in SIGNATURE_PARAMS:
            _malformed(f"unexpected signature parameter {name}")
        if name == "created":
            if type(value) is not int or value < 0:
                _malformed("created is not a non-negative integer")
        elif type(value) is not str:
            _malformed(f"{name} is not a string")
        params[name] = value
    for name in SIGNATURE_PARAMS:
        if name not in params:
            _malformed(f"signature parameter {name} is missing")
    keyid, nonce = str(params["keyid"]), str(params["nonce"])
    if not keyid:
        _malformed("keyid is empty")
    if not _NONCE_RE.fullmatch(nonce):
        _malformed("nonce is not base64url of at least 128 bits")

    signature = sig_value[SIGNATURE_LABEL]
    signature = signature[0] if isinstance(signature, tuple) else signature
    if not isinstance(signature, bytes):
        _malformed(f"Signature {SIGNATURE_LABEL} is not a byte sequence")

    return SignatureParams(
        label=SIGNATURE_LABEL,
        components=tuple(components),
        created=int(params["created"]),
        keyid=keyid,
        alg=str(params["alg"]),
        nonce=nonce,
        tag=str(params["tag"]),
        signature=signature,
        params=tuple(params.items()),
    )


def required_components(*, headers: Mapping[str, str], has_content: bool) -> tuple[str, ...]:
    """What the hub requires a signature to cover (PROTOCOL.md "Signing every request").

    With content: ``@method @path content-type content-digest``, and
    ``idempotency-key`` when the request carries one. Without: ``@method @path``.
    """
    if not has_content:
        return _WITHOUT_CONTENT
    has_key = any(name.lower() == _IDEMPOTENCY_KEY for name in headers)
    return (*_WITH_CONTENT, _IDEMPOTENCY_KEY) if has_key else _WITH_CONTENT


def verify_request(
    *,
    method: str,
    path: str,
    headers: Mapping[str, str],
    public_keys: Sequence[Ed25519PublicKey],
    now: float,
    max_skew_secs: float = DEFAULT_MAX_SKEW_SECS,
    has_content: bool,
) -> SignatureParams:
    """Check a request's signature; return its parameters when it holds.

    The hub first calls `parse_signature_headers` to learn ``keyid``, refuses an
    unknown or revoked one, then passes that node's active keys (two during a key
    rotation) here. After this returns, the hub must still refuse a nonce it has seen
    for this node within the window, and check ``Content-Digest`` against the body.

    Covered components beyond the required ones are accepted when they are header
    fields present in the request (they only bind more); their order is the signer's.

    Args:
        method: the request method as received.
        path: the request target's path as received, percent-encoding intact (in
            ASGI, ``scope["raw_path"]`` decoded as ASCII, without the query).
        headers: the request's header fields.
        public_keys: the node's active keys; at least one.
        now: the hub's clock, UNIX seconds.
        max_skew_secs: how far ``created`` may be from ``now``, either way.
        has_content: whether the request has content (a body).

    Raises:
        SignatureInvalidError: with the `SignatureProblem` that names why.
        ValueError: ``public_keys`` is empty (a hub bug: look ``keyid`` up first).
    """
    if not public_keys:
        raise ValueError("no public keys to verify with: look keyid up first")
    sig = parse_signature_headers(headers)
    if sig.alg != ALGORITHM:
        raise SignatureInvalidError(
            SignatureProblem.UNSUPPORTED_ALGORITHM, f"alg must be {ALGORITHM!r}"
        )
    if sig.tag != TAG:
        raise SignatureInvalidError(SignatureProblem.WRONG_TAG, f"tag must be {TAG!r}")
    required = required_components(headers=headers, has_content=has_content)
    missing = [c for c in required if c not in sig.components]
    if missing:
        raise SignatureInvalidError(
            SignatureProblem.COMPONENT_NOT_COVERED,
            f"the signature must cover {', '.join(missing)}",
        )
    if abs(now - sig.created) > max_skew_secs:
        raise SignatureInvalidError(
            SignatureProblem.CREATED_OUT_OF_WINDOW,
            f"created is {sig.created - now:+.0f} s from the hub's clock; "
            f"at most {max_skew_secs:.0f} s is allowed (check the node's clock)",
        )
    try:
        base = signature_base(
            method=method,
            path=path,
            headers=headers,
            components=sig.components,
            params=dict(sig.params),
        )
    except ValueError as err:
        raise SignatureFormatError(SignatureProblem.MALFORMED, str(err)) from None
    data = base.encode("ascii")
    for public_key in public_keys:
        try:
            public_key.verify(sig.signature, data)
        except InvalidSignature:
            continue
        return sig
    raise SignatureInvalidError(
        SignatureProblem.MISMATCH, "the signature does not verify with the node's keys"
    )


# --- helpers ------------------------------------------------------------------------------


def _sig_input_member(components: Sequence[str], params: Mapping[str, int | str]) -> str:
    """``sig1=(...);...``: the Signature-Input field value with our one member."""
    items: list[ItemType] = [(name, {}) for name in components]
    item_params: ParamsType = dict(params)
    return http_sf.ser({SIGNATURE_LABEL: (items, item_params)})


def _field_values(headers: Mapping[str, str], names: Sequence[str] | None = None) -> dict[str, str]:
    """Header fields by lower-case name, each normalised as RFC 9421 section 2.1 says.

    Each field line: obs-fold replaced by one space, leading and trailing whitespace
    removed; several lines of one field joined with ", ". Only ``names``, if given.
    """
    out: dict[str, str] = {}
    for raw_name, raw_value in headers.items():
        name = raw_name.lower()
        if names is not None and name not in names:
            continue
        value = _OBS_FOLD_RE.sub(" ", raw_value).strip(" \t")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _method_value(method: str) -> str:
    if not _TOKEN_RE.fullmatch(method):
        raise ValueError("the method is not an HTTP token")
    return method


def _path_value(path: str) -> str:
    path = path.split("?", 1)[0]
    if not path:
        return "/"
    if not _PATH_RE.fullmatch(path):
        raise ValueError("the path is not an absolute, percent-encoded ASCII path")
    return path


def _check_base_value(name: str, value: str) -> str:
    if not _BASE_VALUE_RE.fullmatch(value):
        raise ValueError(f"field {name} holds characters a signature base cannot carry")
    return value


def _parse_dictionary(value: str, name: str) -> dict[str, object]:
    try:
        parsed = http_sf.parse(
            value.encode("ascii"), tltype="dictionary", on_duplicate_key=_refuse_duplicate
        )
    except _DuplicateKeyError as err:
        _malformed(f"{name} has {err}")
    except (UnicodeEncodeError, ValueError):
        _malformed(f"{name} is not a structured-field dictionary")
    if not isinstance(parsed, dict):  # pragma: no cover - tltype guarantees a dict
        _malformed(f"{name} is not a structured-field dictionary")
    return parsed  # type: ignore[return-value]


class _DuplicateKeyError(ValueError):
    pass


def _refuse_duplicate(key: str, context: str) -> None:
    # RFC 9651 lets a later member silently replace an earlier one; two
    # implementations could then disagree on which was signed. Refuse instead.
    raise _DuplicateKeyError(f"{key} twice (as a {context} key)")


def _malformed(detail: str) -> NoReturn:
    raise SignatureFormatError(SignatureProblem.MALFORMED, detail)


def day_digest(record_ids: Iterable[str]) -> str:
    """PROTOCOL.md's reconciliation digest: XOR of SHA-256(id as ASCII), as 64 hex.

    Order-free, so the order records arrived in does not matter. Node and hub both call
    this one function, so they cannot disagree on the recipe.
    """
    acc = 0
    for rid in record_ids:
        acc ^= int.from_bytes(hashlib.sha256(rid.encode("ascii")).digest(), "big")
    return f"{acc:064x}"
