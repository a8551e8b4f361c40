"""Options of an ``hl7-mllp`` adapter: an HL7 v2 listener speaking MLLP.

HL7-INTAKE.md is the behaviour these options tune; the defaults follow its rules.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from adapters.hl7.settings import Hl7Settings
from agent.config import CodecName, ListenAddress, field_problems

MiB = 1024 * 1024


def _check_network(value: str) -> str:
    try:
        # strict: "10.0.0.1/8" is refused rather than silently widened to 10.0.0.0/8,
        # because it usually means the author meant a narrower network.
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as err:
        raise ValueError(
            f"expected an IP network such as '10.0.0.0/8' or '192.168.1.20', got {value!r} ({err})"
        ) from None


#: An IPv4 or IPv6 network in CIDR notation; a bare address means just that host.
Network = Annotated[str, AfterValidator(_check_network)]


class Hl7MllpSettings(Hl7Settings):
    """``kind = "hl7-mllp"``: accepts HL7 v2 messages over MLLP and ACKs after commit."""

    kind: Literal["hl7-mllp"]
    listen: ListenAddress = "0.0.0.0:2575"  # senders are on other hosts
    # Senders allowed to connect; anyone else is closed without a byte read.
    # Loopback only by default, so a fresh install is not open to the network.
    allow: Annotated[tuple[Network, ...], Field(min_length=1)] = ("127.0.0.1/32", "::1/128")
    # Decodes messages whose MSH-18 is empty and whose bytes are not UTF-8 (rule 3).
    encoding: CodecName = "cp1256"
    # Larger messages get AR without being read into memory (rule 12).
    max_message_bytes: Annotated[int, Field(ge=1024, le=256 * MiB)] = 4 * MiB
    # A connection silent this long is closed; an unterminated frame dies with it.
    idle_timeout_secs: Annotated[float, Field(gt=0)] = 60.0
    max_connections: Annotated[int, Field(ge=1, le=10_000)] = 64
    tls_cert: Path | None = None  # PEM certificate: MLLP over TLS when set
    tls_key: Path | None = None  # PEM private key for tls_cert
    # national_id_authority, national_id_type, pathology_obr24: see Hl7Settings.

    @model_validator(mode="after")
    def _check_tls_pair(self) -> Hl7MllpSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            other = "tls_cert" if missing == "tls_key" else "tls_key"
            raise field_problems((missing, f"must be set together with {other}"))
        return self
