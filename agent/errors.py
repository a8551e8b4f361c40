"""The one exception tree of the SEPAS agent and hub.

::

    SepasError
    ├── ConfigError                 file, key path, problem; exit code 2
    ├── KeyFileError                missing, readable by others, unparsable
    ├── AdapterError
    │   ├── PeerUnavailableError    transient: refused, timeout, association rejected
    │   ├── PeerProtocolError       transient: bad frame, abort, unexpected status
    │   ├── InputRejectedError      permanent: unparsable or unmappable -> quarantine
    │   └── BackfillUnsupportedError
    ├── StorageError                the buffer cannot do what was asked
    │   ├── CapacityExceededError   backpressure: MLLP answers AR, polls pause
    │   ├── StorageCorruptError     operator: not a buffer, or damaged
    │   └── SchemaVersionError      buffer written by a newer agent
    └── HubError                    carries status, problem type, retry_after
        ├── HubUnavailableError     network, timeout, other 5xx
        ├── HubThrottledError       429, 503
        ├── SignatureRefusedError   401, 403
        ├── BatchRejectedError      400, 415 -> split
        ├── BatchTooLargeError      413 -> split
        ├── BatchInFlightError      409
        └── IdempotencyConflictError  422 (a node bug)

Every class carries a class-level ``hint``: what the operator should do about it.
``transient`` says whether trying the same thing later may succeed. ``str(err)``
never contains patient data: callers pass identifiers as hashes or record ids.
"""

from __future__ import annotations

from dataclasses import dataclass


class SepasError(Exception):
    """Base of every error the agent raises on purpose."""

    hint: str = "See the log for details."
    transient: bool = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a config file: where, and what."""

    key: str  # dotted key path, e.g. "adapters[1].listen"; "" for the whole file
    problem: str

    def __str__(self) -> str:
        return f"{self.key}: {self.problem}" if self.key else self.problem


class ConfigError(SepasError):
    """The configuration cannot be used; lists every problem found, not only the first."""

    hint = "Fix the listed keys in the config file, then run `sepas-agent config check`."

    def __init__(self, path: str, problems: list[ConfigProblem], *, hint: str | None = None):
        self.path = path
        self.problems = list(problems)
        lines = "\n".join(f"  {path}: {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"{n} problem{'s' if n != 1 else ''} in config:\n{lines}", hint=hint)


class KeyFileError(SepasError):
    """A key file is missing, unreadable, has unsafe permissions, or cannot be parsed."""

    hint = "Create it with `sepas-agent keys init`, or fix its mode with `chmod 600 FILE`."


class AdapterError(SepasError):
    """A source adapter failed."""


class PeerUnavailableError(AdapterError):
    """The source system refused, timed out, or rejected the association."""

    transient = True
    hint = "Check that the peer is up and that host, port and AE title/credentials match."


class PeerProtocolError(AdapterError):
    """The source system answered something we did not expect (bad frame, abort)."""

    transient = True
    hint = "Check the peer's logs; the agent will retry."


class InputRejectedError(AdapterError):
    """Input that cannot be parsed or mapped; it goes to quarantine with the reason."""

    hint = "Inspect it with `sepas-agent dead-letter show`, fix the sender or the mapping, retry."


class BackfillUnsupportedError(AdapterError):
    """The adapter's source cannot be asked about the past (MLLP, files)."""

    hint = "Backfill works only for adapters that poll (dicom, sql); ask the sender to resend."


class StorageError(SepasError):
    """The local buffer cannot do what was asked."""

    hint = "Check the data directory: permissions, free space, and `sepas-agent doctor`."


class CapacityExceededError(StorageError):
    """Intake refused: the buffer is at `buffer.max_bytes`, or the disk is full.

    Nothing already accepted is dropped; intake resumes when uploads drain the buffer.
    """

    transient = True
    hint = (
        "Intake is paused until records drain to the hub. Check `sepas-agent status` for a "
        "sync problem, free disk space, or raise buffer.max_bytes."
    )


class StorageCorruptError(StorageError):
    """The buffer file is not a SEPAS buffer, or is damaged."""

    hint = (
        "Stop the agent, move the file aside (keep it for recovery), and start again; "
        "records not yet uploaded are in the moved file."
    )


class SchemaVersionError(StorageError):
    """The buffer was written by a newer agent than this one."""

    hint = "Upgrade sepas-agent to the version that wrote this buffer (never downgrade)."


class HubError(SepasError):
    """The hub refused or could not be reached. Carries what PROTOCOL.md's table needs."""

    transient = True
    hint = "See `sepas-agent status` for the last error; the agent keeps retrying."

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        problem_type: str | None = None,
        retry_after: float | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.problem_type = problem_type
        self.retry_after = retry_after


class HubUnavailableError(HubError):
    """Network error, timeout, or a 5xx other than 503."""

    hint = "Check the network path to hub.url (proxy, firewall, DNS); the agent keeps retrying."


class HubThrottledError(HubError):
    """429 or 503: the hub asked us to slow down."""

    hint = "Nothing to do: the agent waits as long as the hub asked."


class SignatureRefusedError(HubError):
    """401 or 403: the hub does not accept this node's signature or identity."""

    hint = (
        "Check the clock (`sepas-agent status` shows skew), that node.id matches the hub's "
        "registration, and that the public key from `sepas-agent keys show` is registered."
    )


class BatchRejectedError(HubError):
    """400 or 415: the batch is malformed; it is split to isolate the bad records."""

    transient = False


class BatchTooLargeError(HubError):
    """413: the batch is over the hub's limits; it is split."""

    transient = False
    hint = "Lower hub.batch_max_records or hub.batch_max_bytes to match the hub's limits."


class BatchInFlightError(HubError):
    """409: the hub is still processing a batch with this Idempotency-Key."""


class IdempotencyConflictError(HubError):
    """422: an Idempotency-Key was reused with other content, which is a node bug."""

    transient = False
    hint = "Report this as a bug; the records are re-sent under a new batch id."
