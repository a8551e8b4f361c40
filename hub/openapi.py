"""PROTOCOL.md as an OpenAPI 3.1 document, served at GET /v1/openapi.json.

Written by hand from PROTOCOL.md, so that it says what the contract says rather than
what a framework infers; tests/unit/test_hub_app.py checks that it lists every route
the app serves. PROTOCOL.md stays the authority: this is a map for integrators.
"""

from __future__ import annotations

from typing import Any, Final

from agent.record import Service

_HEX64: Final = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_TIME: Final = {"type": "string", "format": "date-time"}
_PROBLEM_REF: Final = {"$ref": "#/components/schemas/Problem"}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": _PROBLEM_REF}},
    }


_SIGNED_ERRORS: Final = {
    "401": _problem(
        "Signature refused: missing, malformed, unknown or revoked keyid, "
        "wrong alg or tag, component not covered, created out of window, "
        "does not verify, nonce replayed."
    ),
}
_CONTENT_ERRORS: Final = {
    "400": _problem("Content-Digest mismatch, or malformed content."),
    "413": _problem("Over the hub's size limits."),
    "415": _problem("Content-Type or Content-Encoding not accepted."),
}
_SIGNATURE_HEADERS: Final = [
    {
        "name": "Signature-Input",
        "in": "header",
        "required": True,
        "schema": {"type": "string"},
        "description": 'RFC 9421: sig1=(...);created=...;keyid="<node id>";alg="ed25519";'
        'nonce="...";tag="sepas-v1"',
    },
    {"name": "Signature", "in": "header", "required": True, "schema": {"type": "string"}},
]
_CONTENT_HEADERS: Final = [
    {
        "name": "Content-Digest",
        "in": "header",
        "required": True,
        "schema": {"type": "string"},
        "description": "RFC 9530 sha-256 over the content as sent (after Content-Encoding).",
    },
    {
        "name": "Content-Encoding",
        "in": "header",
        "required": False,
        "schema": {"enum": ["gzip", "identity"]},
    },
]


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of the hub's routes (PROTOCOL.md version 1)."""
    node_param = {"name": "node_id", "in": "path", "required": True, "schema": {"type": "string"}}
    hex_param = {"name": "hex", "in": "path", "required": True, "schema": _HEX64}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "SEPAS hub",
            "version": "1",
            "description": "The node-hub upload protocol, version 1 (PROTOCOL.md). Every "
            "request except GET /v1/health and this document is signed (RFC 9421, "
            "ed25519); every error is application/problem+json (RFC 9457); every "
            "response carries Date.",
        },
        "components": {
            "securitySchemes": {
                "httpMessageSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Signature",
                    "description": "RFC 9421 HTTP Message Signature with Signature-Input; "
                    "covered: @method @path, plus content-type content-digest "
                    "(and idempotency-key) for requests with content.",
                }
            },
            "schemas": _schemas(),
        },
        "security": [{"httpMessageSignature": []}],
        "paths": {
            "/v1/batches": {
                "post": {
                    "summary": "Upload a batch of records",
                    "parameters": [
                        *_SIGNATURE_HEADERS,
                        *_CONTENT_HEADERS,
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": True,
                            "schema": {"type": "string"},
                            "description": "The batch_id.",
                        },
                    ],
                    "requestBody": {"required": True, **_json(_ref("Batch"))},
                    "responses": {
                        "200": {
                            "description": "Processed; one result per record, in order. "
                            "A replay carries Idempotent-Replayed: true.",
                            **_json(_ref("BatchResponse")),
                        },
                        **_SIGNED_ERRORS,
                        **_CONTENT_ERRORS,
                        "409": _problem("The same Idempotency-Key is still in flight."),
                        "422": _problem("The Idempotency-Key was used with other content."),
                    },
                }
            },
            "/v1/blobs/sha256/{hex}": {
                "put": {
                    "summary": "Upload a blob under its SHA-256",
                    "parameters": [hex_param, *_SIGNATURE_HEADERS, *_CONTENT_HEADERS[:1]],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "*/*": {
                                "schema": {
                                    "type": "string",
                                    "contentMediaType": "application/octet-stream",
                                }
                            }
                        },
                    },
                    "responses": {
                        "201": {"description": "Stored."},
                        "200": {"description": "Already held."},
                        **_SIGNED_ERRORS,
                        **_CONTENT_ERRORS,
                    },
                },
                "head": {
                    "summary": "Whether the hub holds a blob",
                    "parameters": [hex_param, *_SIGNATURE_HEADERS],
                    "responses": {
                        "200": {"description": "Held."},
                        "404": {"description": "Not held."},
                        **_SIGNED_ERRORS,
                    },
                },
            },
            "/v1/nodes/{node_id}": {
                "get": {
                    "summary": "The signing node's view of what the hub holds",
                    "parameters": [node_param, *_SIGNATURE_HEADERS],
                    "responses": {
                        "200": {"description": "The view.", **_json(_ref("NodeView"))},
                        **_SIGNED_ERRORS,
                        "403": _problem("keyid is another node."),
                    },
                }
            },
            "/v1/reconcile": {
                "post": {
                    "summary": "Per-day record counts and digests, by received_at (UTC)",
                    "parameters": [*_SIGNATURE_HEADERS, *_CONTENT_HEADERS],
                    "requestBody": {"required": True, **_json(_ref("ReconcileRequest"))},
                    "responses": {
                        "200": {
                            "description": "One entry per day asked.",
                            **_json(_ref("ReconcileResponse")),
                        },
                        **_SIGNED_ERRORS,
                        **_CONTENT_ERRORS,
                        "403": _problem("node_id is another node."),
                    },
                }
            },
            "/v1/nodes/{node_id}/heartbeat": {
                "post": {
                    "summary": "The node's latest status",
                    "parameters": [node_param, *_SIGNATURE_HEADERS, *_CONTENT_HEADERS],
                    "requestBody": {"required": True, **_json(_ref("Heartbeat"))},
                    "responses": {
                        "204": {"description": "Stored."},
                        **_SIGNED_ERRORS,
                        **_CONTENT_ERRORS,
                        "403": _problem("keyid is another node."),
                    },
                }
            },
            "/v1/health": {
                "get": {
                    "summary": "Liveness (unsigned)",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Up.",
                            **_json({"type": "object", "properties": {"status": {"const": "ok"}}}),
                        }
                    },
                }
            },
            "/v1/openapi.json": {
                "get": {
                    "summary": "This document (unsigned)",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1 JSON."}},
                }
            },
        },
    }


def _schemas() -> dict[str, Any]:
    nullable_number = {"type": ["number", "null"]}
    return {
        "Problem": {
            "type": "object",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string", "format": "uri"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
            },
        },
        "Batch": {
            "type": "object",
            "required": ["sepas_batch", "batch_id", "node_id", "created_at", "records"],
            "properties": {
                "sepas_batch": {"const": 1},
                "batch_id": {"type": "string"},
                "node_id": {"type": "string"},
                "created_at": _TIME,
                "records": {"type": "array", "maxItems": 5000, "items": _ref("Record")},
            },
        },
        "Record": {
            "type": "object",
            "required": [
                "id",
                "service",
                "occurred_at",
                "captured_at",
                "source",
                "patient",
                "body",
                "raw",
            ],
            "properties": {
                "id": _HEX64,
                "service": {"enum": [s.value for s in Service]},
                "occurred_at": _TIME,
                "captured_at": _TIME,
                "source": {
                    "type": "object",
                    "required": ["adapter", "kind", "ref"],
                    "properties": {k: {"type": "string"} for k in ("adapter", "kind", "ref")},
                },
                "patient": {
                    "type": ["object", "null"],
                    "required": ["national_id", "national_id_valid"],
                    "properties": {
                        "national_id": {"type": ["string", "null"], "pattern": "^[0-9]{10}$"},
                        "national_id_valid": {"type": "boolean"},
                        "local_id": {"type": ["string", "null"]},
                    },
                },
                "body": {
                    "type": "object",
                    "description": 'FHIR R4 Bundle, type "collection", the Patient first.',
                    "required": ["resourceType", "type", "entry"],
                    "properties": {
                        "resourceType": {"const": "Bundle"},
                        "type": {"const": "collection"},
                        "entry": {"type": "array", "minItems": 1},
                    },
                },
                "raw": {
                    "type": "object",
                    "required": ["media_type", "sha256"],
                    "properties": {
                        "media_type": {"type": "string"},
                        "sha256": _HEX64,
                        "data": {"type": "string", "contentEncoding": "base64"},
                    },
                },
                "blobs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["sha256", "media_type", "size"],
                        "properties": {
                            "sha256": _HEX64,
                            "media_type": {"type": "string"},
                            "size": {"type": "integer", "minimum": 0},
                        },
                    },
                },
            },
        },
        "BatchResponse": {
            "type": "object",
            "required": ["batch_id", "received_at", "results"],
            "properties": {
                "batch_id": {"type": "string"},
                "received_at": _TIME,
                "results": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "status"],
                        "properties": {
                            "id": {"type": ["string", "null"]},
                            "status": {"enum": ["accepted", "duplicate", "rejected"]},
                            "error": {"type": "string"},
                        },
                    },
                },
            },
        },
        "NodeView": {
            "type": "object",
            "properties": {
                "node_id": {"type": "string"},
                "records": {"type": "integer"},
                "records_by_service": {
                    "type": "object",
                    "additionalProperties": {"type": "integer"},
                },
                "last_batch_at": {"type": ["string", "null"], "format": "date-time"},
            },
        },
        "ReconcileRequest": {
            "type": "object",
            "required": ["node_id", "days"],
            "properties": {
                "node_id": {"type": "string"},
                "days": {
                    "type": "array",
                    "maxItems": 62,
                    "items": {"type": "string", "format": "date"},
                },
            },
        },
        "ReconcileResponse": {
            "type": "object",
            "properties": {
                "days": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "day": {"type": "string", "format": "date"},
                            "count": {"type": "integer"},
                            "digest": _HEX64,
                        },
                    },
                }
            },
        },
        "Heartbeat": {
            "type": "object",
            "required": [
                "node_id",
                "version",
                "pending",
                "oldest_pending_age_s",
                "dead",
                "quarantined",
                "buffer_bytes",
                "clock_skew_s",
                "adapters",
            ],
            "properties": {
                "node_id": {"type": "string"},
                "version": {"type": "string"},
                "pending": {"type": "integer", "minimum": 0},
                "oldest_pending_age_s": nullable_number,
                "dead": {"type": "integer", "minimum": 0},
                "quarantined": {"type": "integer", "minimum": 0},
                "buffer_bytes": {"type": "integer", "minimum": 0},
                "clock_skew_s": nullable_number,
                "adapters": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "kind"],
                        "properties": {
                            "name": {"type": "string"},
                            "kind": {"type": "string"},
                            "last_ok": {"type": ["string", "null"], "format": "date-time"},
                            "last_error": {"type": ["string", "null"]},
                        },
                    },
                },
            },
        },
    }
