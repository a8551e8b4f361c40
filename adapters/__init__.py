"""The adapter registry: config ``kind`` -> that kind's settings model.

`agent.runtime` and `agent.cli` pass `KINDS` to `agent.config.load_config`, which
builds the ``[[adapters]]`` discriminated union from it; the core itself never
imports this package. A new kind is a new package here (named after the kind,
``hl7-mllp`` -> ``hl7_mllp``) plus one line below. Adapter implementations will be
registered beside their settings as they arrive.
"""

from __future__ import annotations

import importlib
from typing import Final

from adapters.dicom.settings import DicomSettings
from adapters.hl7_files.settings import Hl7FilesSettings
from adapters.hl7_mllp.settings import Hl7MllpSettings
from adapters.sql.settings import SqlSettings
from agent.adapter import Adapter, AdapterContext
from agent.config import AdapterSettings

KINDS: Final[dict[str, type[AdapterSettings]]] = {
    "hl7-mllp": Hl7MllpSettings,
    "hl7-files": Hl7FilesSettings,
    "sql": SqlSettings,
    "dicom": DicomSettings,
}

#: kind -> "module:factory"; imported only when an adapter of that kind is built, so a
#: facility without a PACS never imports pynetdicom.
BUILDERS: Final[dict[str, str]] = {
    "hl7-mllp": "adapters.hl7_mllp.listener:build",
    "hl7-files": "adapters.hl7_files.watcher:build",
    "sql": "adapters.sql.poller:build",
    "dicom": "adapters.dicom.adapter:build",
}


def build(settings: AdapterSettings, ctx: AdapterContext) -> Adapter:
    """Make the adapter a ``[[adapters]]`` table describes."""
    module_name, _, factory = BUILDERS[settings.kind].partition(":")
    module = importlib.import_module(module_name)
    adapter: Adapter = getattr(module, factory)(settings, ctx)
    return adapter
