"""The ``dicom`` adapter: studies from a PACS via C-FIND, instances via C-MOVE.

Modules, named after the standard's concepts:

- `settings`: the ``[[adapters]]`` options (``kind = "dicom"``).
- `net`: association plumbing, the one place that drives pynetdicom's AE: TCP_NODELAY
  on every socket, timeouts, C-ECHO, C-FIND, and association failures mapped to
  PeerUnavailableError / PeerProtocolError naming ``AE@host:port`` and the status.
- `status`: DICOM status codes as categories (pynetdicom's tables).
- `query`: Study Root C-FIND at STUDY, SERIES and IMAGE level; date/time windows and
  the splitting of capped windows.
- `mapping`: one study version -> one ``imaging-study`` Record (FHIR R4 ImagingStudy).
- `retrieve`: C-MOVE to our own AE and the storage SCP that writes instances into the
  buffer's blob store (only with ``retrieve = "instances"``).
- `adapter`: `build(settings, ctx)` -> `DicomAdapter`: poll, backfill, checks, start/stop.

Importing `net` (which `adapter` does) turns off pynetdicom's logging of C-FIND
identifiers: they carry patient names and IDs (STYLE.md 3.7).
"""
