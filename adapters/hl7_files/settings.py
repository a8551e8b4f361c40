"""Options of an ``hl7-files`` adapter: HL7 v2 messages dropped as files in a directory.

The same intake rules as MLLP (HL7-INTAKE.md) apply to each file's content; the keys
the mapping reads (national code location, pathology OBR-24) come from `Hl7Settings`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from adapters.hl7.settings import Hl7Settings
from agent.config import CodecName, Duration, field_problems

MiB = 1024 * 1024


class Hl7FilesSettings(Hl7Settings):
    """``kind = "hl7-files"``: polls a directory, moves each file to done/ or failed/."""

    kind: Literal["hl7-files"]
    directory: Path  # where the sender writes; the agent needs read and write access
    # Glob, matched case-insensitively against names in directory only (not below it).
    pattern: Annotated[str, Field(min_length=1)] = "*.hl7"
    poll_every: Duration = timedelta(seconds=10)
    # A file is taken once its size and time stamp have not changed for this long
    # (seen unchanged by two polls at least this far apart): it may still be written.
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

    @model_validator(mode="after")
    def _check_dirs(self) -> Hl7FilesSettings:
        # A done or failed directory equal to the watched one would be read again.
        same = [
            (key, f"must not be the watched directory itself ({self.directory})")
            for key, value in (("done_dir", self.done_dir), ("failed_dir", self.failed_dir))
            if value is not None and Path(value) == Path(self.directory)
        ]
        if same:
            raise field_problems(*same)
        return self

    @property
    def done_path(self) -> Path:
        return self.done_dir if self.done_dir is not None else self.directory / "done"

    @property
    def failed_path(self) -> Path:
        return self.failed_dir if self.failed_dir is not None else self.directory / "failed"

    def derived_values(self) -> Mapping[str, object]:
        return {"done_dir": self.done_path, "failed_dir": self.failed_path}
