"""agent.wire: Content-Digest (RFC 9530) and request signatures (RFC 9421) per PROTOCOL.md.

Our signatures are checked against ``http_message_signatures``, an independent RFC 9421
implementation, in both directions, so that we do not only agree with ourselves.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Mapping
from datetime import UTC, datetime

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from http_message_signatures import (
    HTTPMessageSigner,
    HTTPMessageVerifier,
    InvalidSignature,
    MappingKeyResolver,
    algorithms,
)
from starlette.datastructures import Headers as StarletteHeaders

from agent import wire
from agent.wire import SignatureFormatError, SignatureInvalidError, SignatureProblem

# RFC 8032 section 7.1, TEST 1: a fixed key makes every signature below reproducible
# (Ed25519 is deterministic).
KEY = Ed25519PrivateKey.from_private_bytes(
    bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
)
OTHER_KEY = Ed25519PrivateKey.generate()
NODE = "FAC-0001"
NOW = 1_732_536_000
NONCE = "bm9uY2Utbm9uY2Utbm9uY2U"  # base64url("nonce-nonce-nonce"), 136 bits, unpadded
BODY = b'{"hello": "world"}'
BATCH_ID = "0193a2b4-5c6d-7e8f-9a0b-1c2d3e4f5a6b"
HUB = "https://hub.example"

# RFC 9530 section 2 gives this digest for BODY.
BODY_DIGEST = "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"

BATCH_COMPONENTS = ("@method", "@path", "content-type", "content-digest", "idempotency-key")


def _batch_headers(body: bytes = BODY) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "Content-Encoding": "identity",
        "Content-Digest": wire.content_digest(body),
        "Idempotency-Key": BATCH_ID,
    }


def _params(**overrides: int | str) -> dict[str, int | str]:
    params: dict[str, int | str] = {
        "created": NOW,
        "keyid": NODE,
        "alg": "ed25519",
        "nonce": NONCE,
        "tag": "sepas-v1",
    }
    params.update(overrides)
    return params


def _signed_batch(body: bytes = BODY, *, created: int = NOW) -> dict[str, str]:
    headers = _batch_headers(body)
    headers |= wire.sign_request(
        method="POST",
        path="/v1/batches",
        headers=headers,
        key=KEY,
        key_id=NODE,
        created=created,
        nonce=NONCE,
    )
    return headers


def _forge(
    headers: Mapping[str, str],
    *,
    components: tuple[str, ...] = BATCH_COMPONENTS,
    params: Mapping[str, int | str] | None = None,
    method: str = "POST",
    path: str = "/v1/batches",
    key: Ed25519PrivateKey = KEY,
) -> dict[str, str]:
    """A correctly signed request whose Signature-Input says what the test wants, so
    that only the check under test can refuse it."""
    params = _params() if params is None else params
    base = wire.signature_base(
        method=method, path=path, headers=headers, components=components, params=params
    )
    signature = base64.b64encode(key.sign(base.encode())).decode()
    return {
        **headers,
        "Signature-Input": "sig1=" + wire.signature_params_value(components, params),
        "Signature": f"sig1=:{signature}:",
    }


def _verify(
    headers: Mapping[str, str],
    *,
    method: str = "POST",
    path: str = "/v1/batches",
    now: float = NOW,
    has_content: bool = True,
    key: Ed25519PrivateKey = KEY,
    max_skew_secs: float = wire.DEFAULT_MAX_SKEW_SECS,
) -> wire.SignatureParams:
    return wire.verify_request(
        method=method,
        path=path,
        headers=headers,
        public_keys=[key.public_key()],
        now=now,
        max_skew_secs=max_skew_secs,
        has_content=has_content,
    )


# --- Content-Digest ---------------------------------------------------------------------


def test_content_digest_matches_the_rfc_9530_example() -> None:
    assert wire.content_digest(BODY) == BODY_DIGEST


def test_verify_content_digest_accepts_the_body_it_was_made_from() -> None:
    assert wire.verify_content_digest(BODY_DIGEST, BODY)


def test_verify_content_digest_refuses_a_mismatched_body() -> None:
    assert not wire.verify_content_digest(BODY_DIGEST, BODY + b" ")
    assert not wire.verify_content_digest(BODY_DIGEST, b"")


def test_verify_content_digest_accepts_other_algorithms_listed_alongside_sha_256() -> None:
    sha512 = base64.b64encode(hashlib.sha512(BODY).digest()).decode()
    header = f"sha-512=:{sha512}:, {BODY_DIGEST}, unixsum=30"
    assert wire.verify_content_digest(header, BODY)


def test_verify_content_digest_refuses_a_wrong_sha_512_listed_alongside() -> None:
    wrong = base64.b64encode(bytes(64)).decode()
    assert not wire.verify_content_digest(f"{BODY_DIGEST}, sha-512=:{wrong}:", BODY)


@pytest.mark.parametrize(
    "header",
    [
        "sha-512=:" + base64.b64encode(bytes(64)).decode() + ":",  # no sha-256 member
        f"{BODY_DIGEST}, {BODY_DIGEST}",  # sha-256 twice: which one counts?
        '"sha-256"=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:',  # not a dictionary
        'sha-256="X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE="',  # a string, not bytes
        "sha-256=X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=",  # no colons
        "",
        "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:, ü",
    ],
    ids=["no-sha-256", "duplicate", "garbage", "string", "bare", "empty", "non-ascii"],
)
def test_verify_content_digest_refuses_a_malformed_header(header: str) -> None:
    assert not wire.verify_content_digest(header, BODY)


# --- the signature base and the signing side --------------------------------------------


def test_signature_base_of_a_batch_upload_matches_the_hand_written_rfc_9421_text() -> None:
    expected = (
        '"@method": POST\n'
        '"@path": /v1/batches\n'
        '"content-type": application/json\n'
        '"content-digest": sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:\n'
        '"idempotency-key": 0193a2b4-5c6d-7e8f-9a0b-1c2d3e4f5a6b\n'
        '"@signature-params": ("@method" "@path" "content-type" "content-digest" '
        '"idempotency-key");created=1732536000;keyid="FAC-0001";alg="ed25519";'
        'nonce="bm9uY2Utbm9uY2Utbm9uY2U";tag="sepas-v1"'
    )
    base = wire.signature_base(
        method="POST",
        path="/v1/batches",
        headers=_batch_headers(),
        components=wire.covered_components(_batch_headers()),
        params=_params(),
    )
    assert base == expected


def test_sign_request_writes_protocol_md_headers_and_signs_exactly_that_base() -> None:
    headers = _signed_batch()
    assert headers["Signature-Input"] == (
        'sig1=("@method" "@path" "content-type" "content-digest" "idempotency-key")'
        ';created=1732536000;keyid="FAC-0001";alg="ed25519"'
        ';nonce="bm9uY2Utbm9uY2Utbm9uY2U";tag="sepas-v1"'
    )
    base = wire.signature_base(
        method="POST",
        path="/v1/batches",
        headers=_batch_headers(),
        components=BATCH_COMPONENTS,
        params=_params(),
    )
    expected = base64.b64encode(KEY.sign(base.encode())).decode()
    assert headers["Signature"] == f"sig1=:{expected}:"


def test_a_request_without_content_covers_only_method_and_path_without_the_query() -> None:
    signed = wire.sign_request(
        method="HEAD",
        path="/v1/blobs/sha256/ab12?probe=1",
        headers={"Accept": "*/*"},
        key=KEY,
        key_id=NODE,
        created=NOW,
        nonce=NONCE,
    )
    assert signed["Signature-Input"].startswith('sig1=("@method" "@path");created=')
    base = wire.signature_base(
        method="HEAD",
        path="/v1/blobs/sha256/ab12?probe=1",
        headers={},
        components=("@method", "@path"),
        params=_params(),
    )
    assert base.splitlines()[:2] == ['"@method": HEAD', '"@path": /v1/blobs/sha256/ab12']


def test_idempotency_key_is_covered_only_when_the_request_has_one() -> None:
    reconcile = {"Content-Type": "application/json", "Content-Digest": BODY_DIGEST}
    assert wire.covered_components(reconcile) == (
        "@method",
        "@path",
        "content-type",
        "content-digest",
    )
    assert wire.covered_components(_batch_headers()) == BATCH_COMPONENTS


def test_field_names_are_lower_cased_and_values_trimmed_and_unfolded() -> None:
    messy = {
        "CONTENT-TYPE": " \tapplication/json \t",
        "content-DIGEST": BODY_DIGEST,
        "Idempotency-Key": "abc\r\n \tdef",  # obs-fold becomes one space
    }
    base = wire.signature_base(
        method="POST",
        path="/v1/batches",
        headers=messy,
        components=BATCH_COMPONENTS,
        params=_params(),
    )
    assert base.splitlines()[2:5] == [
        '"content-type": application/json',
        f'"content-digest": {BODY_DIGEST}',
        '"idempotency-key": abc def',
    ]


def test_repeated_field_lines_are_joined_with_comma_space() -> None:
    headers = StarletteHeaders(raw=[(b"x-multi", b"a "), (b"x-multi", b" b")])
    base = wire.signature_base(
        method="GET", path="/", headers=headers, components=("x-multi",), params=_params()
    )
    assert base.splitlines()[0] == '"x-multi": a, b'


def test_sign_request_uses_the_clock_and_a_fresh_128_bit_nonce_by_default() -> None:
    first = wire.parse_signature_headers(
        wire.sign_request(method="GET", path="/v1/nodes/FAC-0001", headers={}, key=KEY, key_id=NODE)
    )
    second = wire.parse_signature_headers(
        wire.sign_request(method="GET", path="/v1/nodes/FAC-0001", headers={}, key=KEY, key_id=NODE)
    )
    assert abs(first.created - time.time()) < 5
    assert first.nonce != second.nonce
    assert len(base64.urlsafe_b64decode(first.nonce + "==")) >= 16
    assert "=" not in first.nonce


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({"Content-Type": "application/json"}, "content-digest"),
        ({"Content-Digest": BODY_DIGEST}, "content-type"),
        ({"Idempotency-Key": BATCH_ID}, "Idempotency-Key on a request without content"),
    ],
    ids=["no-digest", "no-type", "key-without-content"],
)
def test_sign_request_refuses_headers_protocol_md_does_not_allow(
    headers: dict[str, str], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        wire.sign_request(method="POST", path="/v1/batches", headers=headers, key=KEY, key_id=NODE)


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", "/v1/batches", {**_batch_headers(), "Idempotency-Key": "a\nb"}),
        ("POST", "/v1/batches", {**_batch_headers(), "Idempotency-Key": "r\u00e9sum\u00e9"}),
        ("POST", "/v1/b\u00e4tches", _batch_headers()),
        ("POST", "v1/batches", _batch_headers()),
        ("PO ST", "/v1/batches", _batch_headers()),
    ],
    ids=["newline-in-value", "non-ascii-value", "non-ascii-path", "relative-path", "bad-method"],
)
def test_sign_request_refuses_values_a_signature_base_cannot_carry(
    method: str, path: str, headers: dict[str, str]
) -> None:
    with pytest.raises(ValueError, match=r"signature base|path|method"):
        wire.sign_request(method=method, path=path, headers=headers, key=KEY, key_id=NODE)


@pytest.mark.parametrize(
    ("key_id", "nonce", "problem"),
    [
        ("", NONCE, "key_id is empty"),
        (NODE, "c2hvcnQ", "nonce must be base64url"),  # 40 bits
        (NODE, NONCE + "=", "nonce must be base64url"),  # padded
        (NODE, "bm9uY2Utbm9uY2Utbm9uY2U+", "nonce must be base64url"),  # standard alphabet
    ],
    ids=["empty-key-id", "short-nonce", "padded-nonce", "non-url-safe-nonce"],
)
def test_sign_request_refuses_a_key_id_or_nonce_the_hub_would_refuse(
    key_id: str, nonce: str, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        wire.sign_request(
            method="GET", path="/v1/nodes/x", headers={}, key=KEY, key_id=key_id, nonce=nonce
        )


# --- interoperability with an independent RFC 9421 implementation -----------------------


def _their_verifier() -> HTTPMessageVerifier:
    return HTTPMessageVerifier(
        signature_algorithm=algorithms.ED25519,
        key_resolver=MappingKeyResolver(public_keys={NODE: KEY.public_key()}, private_keys={}),
    )


def _their_signer() -> HTTPMessageSigner:
    return HTTPMessageSigner(
        signature_algorithm=algorithms.ED25519,
        key_resolver=MappingKeyResolver(public_keys={}, private_keys={NODE: KEY}),
    )


def test_the_independent_library_verifies_our_batch_signature_and_digest() -> None:
    request = httpx.Request("POST", f"{HUB}/v1/batches", headers=_batch_headers(), content=BODY)
    request.headers.update(
        wire.sign_request(
            method=request.method,
            path=request.url.raw_path.decode("ascii"),
            headers=request.headers,
            key=KEY,
            key_id=NODE,
        )
    )
    results = _their_verifier().verify(
        request, expect_tag="sepas-v1", require_components=BATCH_COMPONENTS, body=BODY
    )
    assert [r.parameters["keyid"] for r in results] == [NODE]
    assert results[0].body == BODY  # it checked Content-Digest against the body too


def test_the_independent_library_verifies_our_signature_on_a_request_without_content() -> None:
    request = httpx.Request("GET", f"{HUB}/v1/nodes/{NODE}?verbose=1")
    request.headers.update(
        wire.sign_request(
            method="GET",
            path=request.url.raw_path.decode(),
            headers=request.headers,
            key=KEY,
            key_id=NODE,
        )
    )
    results = _their_verifier().verify(
        request, expect_tag="sepas-v1", require_components=("@method", "@path")
    )
    assert results[0].covered_components['"@path"'] == f"/v1/nodes/{NODE}"


def test_the_independent_library_rejects_our_signature_when_the_body_changes() -> None:
    request = httpx.Request("POST", f"{HUB}/v1/batches", headers=_batch_headers(), content=BODY)
    request.headers.update(
        wire.sign_request(
            method="POST", path="/v1/batches", headers=request.headers, key=KEY, key_id=NODE
        )
    )
    with pytest.raises(InvalidSignature):
        _their_verifier().verify(request, expect_tag="sepas-v1", body=BODY + b"!")


def test_the_independent_library_signs_the_same_bytes_we_do() -> None:
    request = httpx.Request("POST", f"{HUB}/v1/batches", headers=_batch_headers(), content=BODY)
    _their_signer().sign(
        request,
        key_id=NODE,
        created=datetime.fromtimestamp(NOW, tz=UTC),
        nonce=NONCE,
        label="sig1",
        tag="sepas-v1",
        covered_component_ids=BATCH_COMPONENTS,
        use_existing_digest=True,
    )
    ours = _signed_batch()
    assert request.headers["Signature-Input"] == ours["Signature-Input"]
    assert request.headers["Signature"] == ours["Signature"]


def test_our_verifier_accepts_a_signature_made_by_the_independent_library() -> None:
    request = httpx.Request("POST", f"{HUB}/v1/batches", headers=_batch_headers(), content=BODY)
    _their_signer().sign(
        request,
        key_id=NODE,
        nonce=wire.new_nonce(),
        label="sig1",
        tag="sepas-v1",
        covered_component_ids=BATCH_COMPONENTS,
        body=BODY,
        use_existing_digest=True,
    )
    sig = wire.verify_request(
        method="POST",
        path="/v1/batches",
        headers=request.headers,
        public_keys=[KEY.public_key()],
        now=time.time(),
        has_content=True,
    )
    assert sig.keyid == NODE
    assert wire.verify_content_digest(request.headers["Content-Digest"], BODY)


# --- verification: what is accepted -----------------------------------------------------


def test_verify_request_accepts_our_signature_and_returns_its_parameters() -> None:
    sig = _verify(_signed_batch())
    assert (sig.label, sig.keyid, sig.created, sig.nonce) == ("sig1", NODE, NOW, NONCE)
    assert (sig.alg, sig.tag, sig.components) == ("ed25519", "sepas-v1", BATCH_COMPONENTS)
    assert len(sig.signature) == 64


def test_verify_request_accepts_headers_as_the_hub_receives_them() -> None:
    raw = [(k.lower().encode(), v.encode()) for k, v in _signed_batch().items()]
    assert _verify(StarletteHeaders(raw=raw)).keyid == NODE


def test_verify_request_accepts_either_of_two_active_keys_during_rotation() -> None:
    sig = wire.verify_request(
        method="POST",
        path="/v1/batches",
        headers=_signed_batch(),
        public_keys=[OTHER_KEY.public_key(), KEY.public_key()],
        now=NOW,
        has_content=True,
    )
    assert sig.keyid == NODE


@pytest.mark.parametrize("skew", [-300, 0, 300])
def test_verify_request_accepts_created_within_300_s_either_way(skew: int) -> None:
    assert _verify(_signed_batch(created=NOW + skew)).created == NOW + skew


def test_verify_request_accepts_parameters_in_another_order() -> None:
    reordered = dict(reversed(list(_params().items())))
    assert _verify(_forge(_batch_headers(), params=reordered)).nonce == NONCE


def test_verify_request_accepts_extra_covered_header_fields() -> None:
    headers = {**_batch_headers(), "Content-Encoding": "gzip"}
    sig = _verify(_forge(headers, components=(*BATCH_COMPONENTS, "content-encoding")))
    assert "content-encoding" in sig.components


def test_verify_request_ignores_another_label_a_proxy_may_add() -> None:
    headers = _signed_batch()
    headers["Signature-Input"] += ', proxy=("@method");created=1;keyid="p"'
    headers["Signature"] += ", proxy=:AAAA:"
    assert _verify(headers).keyid == NODE


def test_verify_request_accepts_a_request_without_content() -> None:
    signed = wire.sign_request(
        method="GET", path="/v1/nodes/FAC-0001", headers={}, key=KEY, key_id=NODE, created=NOW
    )
    sig = _verify(signed, method="GET", path="/v1/nodes/FAC-0001", has_content=False)
    assert sig.components == ("@method", "@path")


def test_verify_request_needs_at_least_one_key_to_verify_with() -> None:
    with pytest.raises(ValueError, match="look keyid up first"):
        wire.verify_request(
            method="POST",
            path="/v1/batches",
            headers=_signed_batch(),
            public_keys=[],
            now=NOW,
            has_content=True,
        )


# --- verification: every refusal, by slug -----------------------------------------------


def test_problem_slugs_are_the_stable_protocol_vocabulary() -> None:
    assert {p.value for p in SignatureProblem} == {
        "signature-missing",
        "signature-malformed",
        "unsupported-algorithm",
        "wrong-tag",
        "component-not-covered",
        "created-out-of-window",
        "signature-mismatch",
    }
    assert wire.problem_type("wrong-tag") == "https://sepas.example/problems/wrong-tag"
    err = SignatureInvalidError(SignatureProblem.WRONG_TAG, "x")
    assert err.type_uri == wire.PROBLEM_BASE + "wrong-tag"


@pytest.mark.parametrize(
    "drop", [("Signature-Input", "Signature"), ("Signature",), ("Signature-Input",)]
)
def test_a_missing_signature_header_is_refused_as_signature_missing(
    drop: tuple[str, ...],
) -> None:
    headers = {k: v for k, v in _signed_batch().items() if k not in drop}
    with pytest.raises(SignatureFormatError) as info:
        _verify(headers)
    assert info.value.problem is SignatureProblem.MISSING
    assert isinstance(info.value, SignatureInvalidError)
    assert isinstance(info.value, ValueError)


_GOOD_INPUT = _signed_batch()["Signature-Input"]
_GOOD_SIG = _signed_batch()["Signature"]


@pytest.mark.parametrize(
    ("sig_input", "signature"),
    [
        ("sig1=(", _GOOD_SIG),
        (_GOOD_INPUT, "sig1=:not base64 at all"),
        (_GOOD_INPUT.replace("sig1=", "sig2="), _GOOD_SIG),
        (_GOOD_INPUT, _GOOD_SIG.replace("sig1=", "sig2=")),
        ('sig1="@method"', _GOOD_SIG),
        (_GOOD_INPUT, 'sig1="c2lnbmF0dXJl"'),
        (_GOOD_INPUT + ", " + _GOOD_INPUT, _GOOD_SIG),
        (_GOOD_INPUT.replace("created=1732536000", 'created="1732536000"'), _GOOD_SIG),
        (_GOOD_INPUT.replace("created=1732536000", "created=-1"), _GOOD_SIG),
        (_GOOD_INPUT.replace("created=1732536000", "created=1732536000.5"), _GOOD_SIG),
        (_GOOD_INPUT.replace(';nonce="bm9uY2Utbm9uY2Utbm9uY2U"', ""), _GOOD_SIG),
        (_GOOD_INPUT.replace(NONCE, "c2hvcnQ"), _GOOD_SIG),
        (_GOOD_INPUT.replace(NONCE, NONCE + "=="), _GOOD_SIG),
        (_GOOD_INPUT.replace('keyid="FAC-0001"', 'keyid=""'), _GOOD_SIG),
        (_GOOD_INPUT.replace('keyid="FAC-0001"', "keyid=FAC-0001"), _GOOD_SIG),
        (_GOOD_INPUT.replace(';alg="ed25519"', ""), _GOOD_SIG),
        (_GOOD_INPUT.replace(';tag="sepas-v1"', ""), _GOOD_SIG),
        (_GOOD_INPUT + ";expires=1732539600", _GOOD_SIG),
        (_GOOD_INPUT + ";created=1", _GOOD_SIG),
        (_GOOD_INPUT.replace('"content-digest"', '"content-digest";sf'), _GOOD_SIG),
        (_GOOD_INPUT.replace('"content-type"', '"Content-Type"'), _GOOD_SIG),
        (_GOOD_INPUT.replace('"content-type"', '"@method"'), _GOOD_SIG),
        (_GOOD_INPUT.replace('"content-type"', "content-type"), _GOOD_SIG),
        (_GOOD_INPUT.replace('"idempotency-key")', '"idempotency-key" "@authority")'), _GOOD_SIG),
        (_GOOD_INPUT.replace('"idempotency-key")', '"idempotency-key" "x-absent")'), _GOOD_SIG),
        ('sig1=("@method");created=1;ke\u00efd="x"', _GOOD_SIG),
    ],
    ids=[
        "unparseable-input",
        "unparseable-signature",
        "input-without-sig1",
        "signature-without-sig1",
        "input-not-inner-list",
        "signature-not-bytes",
        "sig1-twice",
        "created-string",
        "created-negative",
        "created-decimal",
        "nonce-missing",
        "nonce-under-128-bits",
        "nonce-padded",
        "keyid-empty",
        "keyid-token",
        "alg-missing",
        "tag-missing",
        "unknown-parameter",
        "parameter-twice",
        "component-with-parameter",
        "component-upper-case",
        "component-twice",
        "component-token",
        "unsupported-derived-component",
        "covered-field-absent",
        "non-ascii",
    ],
)
def test_an_unparseable_or_unexpected_signature_is_refused_as_malformed(
    sig_input: str, signature: str
) -> None:
    headers = {**_batch_headers(), "Signature-Input": sig_input, "Signature": signature}
    with pytest.raises(SignatureFormatError) as info:
        _verify(headers)
    assert info.value.problem is SignatureProblem.MALFORMED


def test_parse_signature_headers_refuses_garbage_with_a_problem_slug() -> None:
    with pytest.raises(SignatureFormatError) as info:
        wire.parse_signature_headers({"Signature-Input": "(((", "Signature": "sig1=:AA==:"})
    assert info.value.problem is SignatureProblem.MALFORMED
    assert info.value.type_uri.endswith("/signature-malformed")


def test_parse_signature_headers_reads_keyid_before_any_key_is_known() -> None:
    sig = wire.parse_signature_headers(_signed_batch())
    assert sig.keyid == NODE
    assert sig.signature_params == _GOOD_INPUT.removeprefix("sig1=")


@pytest.mark.parametrize("alg", ["rsa-pss-sha512", "ED25519", "hmac-sha256", ""])
def test_an_algorithm_other_than_ed25519_is_refused_as_unsupported(alg: str) -> None:
    with pytest.raises(SignatureInvalidError) as info:
        _verify(_forge(_batch_headers(), params=_params(alg=alg)))
    assert info.value.problem is SignatureProblem.UNSUPPORTED_ALGORITHM


@pytest.mark.parametrize("tag", ["sepas-v2", "SEPAS-V1", ""])
def test_a_tag_other_than_sepas_v1_is_refused_as_wrong_tag(tag: str) -> None:
    with pytest.raises(SignatureInvalidError) as info:
        _verify(_forge(_batch_headers(), params=_params(tag=tag)))
    assert info.value.problem is SignatureProblem.WRONG_TAG


@pytest.mark.parametrize(
    "components",
    [
        ("@method", "@path"),
        ("@method", "@path", "content-type", "content-digest"),  # has an Idempotency-Key
        ("@method", "@path", "content-digest", "idempotency-key"),
        ("@method", "content-type", "content-digest", "idempotency-key"),
        ("@path", "content-type", "content-digest", "idempotency-key"),
    ],
    ids=["bodiless-set", "no-idempotency-key", "no-content-type", "no-path", "no-method"],
)
def test_a_signature_that_leaves_a_required_component_uncovered_is_refused(
    components: tuple[str, ...],
) -> None:
    with pytest.raises(SignatureInvalidError) as info:
        _verify(_forge(_batch_headers(), components=components))
    assert info.value.problem is SignatureProblem.COMPONENT_NOT_COVERED


def test_a_content_request_signed_as_if_it_had_no_content_is_refused() -> None:
    headers = {**_batch_headers()}
    headers.pop("Idempotency-Key")
    signed = _forge(headers, components=("@method", "@path"))
    with pytest.raises(SignatureInvalidError) as info:
        _verify(signed, has_content=True)
    assert info.value.problem is SignatureProblem.COMPONENT_NOT_COVERED


@pytest.mark.parametrize("skew", [-301, 301, -86_400, 86_400])
def test_created_more_than_300_s_from_the_hub_clock_is_refused(skew: int) -> None:
    with pytest.raises(SignatureInvalidError) as info:
        _verify(_signed_batch(created=NOW + skew))
    assert info.value.problem is SignatureProblem.CREATED_OUT_OF_WINDOW


def test_the_created_window_is_configurable() -> None:
    headers = _signed_batch(created=NOW - 61)
    with pytest.raises(SignatureInvalidError) as info:
        _verify(headers, max_skew_secs=60)
    assert info.value.problem is SignatureProblem.CREATED_OUT_OF_WINDOW
    assert _verify(headers, max_skew_secs=61).created == NOW - 61


_ZERO_SIG = "sig1=:" + base64.b64encode(bytes(64)).decode() + ":"
_SHORT_SIG = "sig1=:" + base64.b64encode(b"short").decode() + ":"


@pytest.mark.parametrize(
    ("changes", "method", "path"),
    [
        ({}, "PUT", "/v1/batches"),
        ({}, "POST", "/v1/reconcile"),
        ({}, "POST", "/v1/batches/"),
        ({"Content-Type": "application/x-ndjson"}, "POST", "/v1/batches"),
        ({"Content-Digest": wire.content_digest(b"other body")}, "POST", "/v1/batches"),
        ({"Idempotency-Key": "0193a2b4-0000-0000-0000-000000000000"}, "POST", "/v1/batches"),
        ({"Signature-Input": _GOOD_INPUT.replace(NODE, "FAC-0002")}, "POST", "/v1/batches"),
        ({"Signature-Input": _GOOD_INPUT.replace(NONCE, NONCE[::-1])}, "POST", "/v1/batches"),
        ({"Signature-Input": _GOOD_INPUT.replace(str(NOW), str(NOW + 1))}, "POST", "/v1/batches"),
        ({"Signature": _ZERO_SIG}, "POST", "/v1/batches"),
        ({"Signature": _SHORT_SIG}, "POST", "/v1/batches"),
    ],
    ids=[
        "method",
        "path",
        "path-trailing-slash",
        "content-type",
        "content-digest",
        "idempotency-key",
        "keyid",
        "nonce",
        "created",
        "signature-zeroes",
        "signature-short",
    ],
)
def test_tampering_with_any_covered_component_is_refused_as_mismatch(
    changes: dict[str, str], method: str, path: str
) -> None:
    headers = _signed_batch() | changes
    with pytest.raises(SignatureInvalidError) as info:
        _verify(headers, method=method, path=path)
    assert info.value.problem is SignatureProblem.MISMATCH


def test_a_signature_by_another_key_is_refused_as_mismatch() -> None:
    with pytest.raises(SignatureInvalidError) as info:
        _verify(_signed_batch(), key=OTHER_KEY)
    assert info.value.problem is SignatureProblem.MISMATCH


def test_a_changed_body_passes_the_signature_but_fails_the_content_digest() -> None:
    # The signature binds the Content-Digest header; only the digest binds the body,
    # which is why the hub must call verify_content_digest as well.
    headers = _signed_batch()
    assert _verify(headers).keyid == NODE
    assert not wire.verify_content_digest(headers["Content-Digest"], BODY + b" ")


def test_refusal_details_never_echo_covered_header_values() -> None:
    national_code = "0012345679"  # patient data must never reach a problem body
    headers = _forge({**_batch_headers(), "Idempotency-Key": national_code})
    headers["Idempotency-Key"] = national_code + "0"
    with pytest.raises(SignatureInvalidError) as info:
        _verify(headers)
    assert national_code not in str(info.value)
