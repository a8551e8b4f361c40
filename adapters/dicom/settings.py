"""Options of a ``dicom`` adapter: queries a PACS (C-FIND) and optionally retrieves
instances (C-MOVE to our own storage SCP).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from agent.config import AdapterSettings, ConfigModel, Duration, ListenAddress


def _check_ae_title(value: str) -> str:
    # PS3.5 6.2 (AE VR): up to 16 characters of the default repertoire, no backslash
    # or control characters; leading and trailing spaces are not significant.
    title = value.strip(" ")
    if not 1 <= len(title) <= 16:
        raise ValueError(f"an AE title has 1 to 16 characters, got {value!r}")
    if any(not (" " <= c <= "~") or c == "\\" for c in title):
        raise ValueError(f"an AE title is printable ASCII without '\\', got {value!r}")
    return title


#: A DICOM Application Entity title.
AETitle = Annotated[str, AfterValidator(_check_ae_title)]


def _check_modality(value: str) -> str:
    # Modality (0008,0060) is a CS value: upper case, digits, space, underscore.
    if not 1 <= len(value) <= 16 or any(
        not (c.isascii() and (c.isupper() or c.isdigit() or c in " _")) for c in value
    ):
        raise ValueError(f"expected a DICOM modality code such as 'CT' or 'MR', got {value!r}")
    return value


class DicomPeer(ConfigModel):
    """The PACS we query and retrieve from."""

    ae_title: AETitle
    host: Annotated[str, Field(min_length=1)]
    port: Annotated[int, Field(ge=1, le=65535)] = 104


class DicomSettings(AdapterSettings):
    """``kind = "dicom"``: one ImagingStudy record per study version found on the peer."""

    kind: Literal["dicom"]
    ae_title: AETitle = "SEPASAGENT"  # our AE title; the PACS must know it for C-MOVE
    # Our storage SCP, the C-MOVE destination; only used with retrieve = "instances".
    listen: ListenAddress = "0.0.0.0:11113"  # the PACS connects to us
    peer: DicomPeer
    poll_every: Duration = timedelta(minutes=5)
    # "metadata": C-FIND results only; "instances": also C-MOVE each study's
    # instances here and upload them as blobs.
    retrieve: Literal["metadata", "instances"] = "metadata"
    modalities: tuple[Annotated[str, AfterValidator(_check_modality)], ...] = ()  # empty: all
    # Each poll asks about studies from this far back, so late-arriving studies are
    # found; record ids de-duplicate what was already seen.
    lookback: Duration = timedelta(days=2)
    max_results_per_query: Annotated[int, Field(ge=1)] | None = None  # None: the PACS's limit
