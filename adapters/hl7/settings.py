"""Options every HL7 v2 adapter kind shares (``hl7-mllp``, ``hl7-files``).

They are what the mapping reads from an adapter's settings
(`adapters.hl7.fhir_map.Options.of`); their defaults are HL7-INTAKE.md's. Each kind's
model (``adapters/<kind>/settings.py``) inherits `Hl7Settings` and adds its own keys.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from agent.config import AdapterSettings


class Hl7Settings(AdapterSettings):
    """Base of the HL7 v2 kinds' settings: the keys the mapping needs (rule 5, OBR-24)."""

    # PID-3 repetitions carrying the national code (rule 5): CX.4 assigning
    # authority, CX.5 identifier type.
    national_id_authority: Annotated[str, Field(min_length=1)] = "NOCR"
    national_id_type: Annotated[str, Field(min_length=1)] = "NNIRN"
    # OBR-24 (diagnostic service section id) values that make a result a
    # pathology-report rather than a lab-result.
    pathology_obr24: tuple[Annotated[str, Field(min_length=1)], ...] = ("SP", "PAT")
