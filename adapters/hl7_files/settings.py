"""Options of an ``hl7-files`` adapter: HL7 v2 messages dropped as files in a directory.

The same intake rules as MLLP (HL7-INTAKE.md) apply to each file's content.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from agent.config import AdapterSettings, CodecName, Duration

MiB = 1024 * 1024


class Hl7FilesSettings(AdapterSettings):
    """``kind = "hl7-files"``: polls a directory, moves each file to done/ or failed/."""

    kind: Literal["hl7-files"]
    directory: Path  # where the sender writes; the agent needs read and write access
    pattern: Annotated[str, Field(min_length=1)] = "*.hl7"  # glob, matched in directory only
    poll_every: Duration = timedelta(seconds=10)
    # A file modified less than this long ago may still be being written: leave it.
    settle_secs: Annotated[float, Field(ge=0)] = 2.0
    encoding: CodecName = "cp1256"  # as hl7-mllp: when MSH-18 is empty and not UTF-8
    max_message_bytes: Annotated[int, Field(ge=1024, le=256 * MiB)] = 4 * MiB
    done_dir: Path | None = None  # committed files go here; default directory/done
    failed_dir: Path | None = None  # quarantined files go here; default directory/failed

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        if "/" in value or "\\" in value:
            raise ValueError(f"must be a file name pattern without a directory, got {value!r}")
        return value

    @property
    def done_path(self) -> Path:
        return self.done_dir if self.done_dir is not None else self.directory / "done"

    @property
    def failed_path(self) -> Path:
        return self.failed_dir if self.failed_dir is not None else self.directory / "failed"

    def derived_values(self) -> Mapping[str, object]:
        return {"done_dir": self.done_path, "failed_dir": self.failed_path}
