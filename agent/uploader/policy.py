"""PROTOCOL.md's "Errors and what a node does with them", as two pure functions.

- `action_for` answers *what to do* with the outcome of one batch upload (the table,
  row by row). It does no I/O, reads no clock and draws no random number.
- `delay_for` answers *how long to wait* before that action is tried again; `backoff`
  is its exponential part (full jitter). Randomness comes in as an argument.

Keeping the two apart (Vector's ``retries.rs``) lets each be tested exhaustively,
and keeps the uploader's loop free of status codes.

Rules this module encodes, and the uploader must never bend:
- Nothing is dropped for a transient error: network errors, timeouts, unknown
  statuses and 5xx retry forever, with capped backoff.
- Only the hub's word makes a record final: ``rejected`` in a 200, or a 400/413/415
  that still names a single-record batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from agent.errors import HubError
from agent.uploader.batching import BatchResult


class Verdict(StrEnum):
    """What the uploader does next with a batch."""

    SETTLE = "settle"  # 200: per record, accepted/duplicate -> sent, rejected -> dead
    SPLIT = "split"  # 400, 413, 415 with two or more records: send each half
    DEAD_LETTER = "dead-letter"  # 400, 413, 415 on a single record: final
    HOLD = "hold"  # 401, 403: keep the records, back off long, alarm in `status`
    RETRY_SAME = "retry-same"  # 409: the same batch, same key, a little later
    REKEY = "rekey"  # 422: a node bug; log it, the same records under a new key
    WAIT = "wait"  # 429, 503: wait Retry-After, then the same batch again
    BACKOFF = "backoff"  # other 5xx, network error, timeout: exponential, full jitter


# The table. A status not listed here is transient (BACKOFF): never dropped.
_BY_STATUS: Final[dict[int, Verdict]] = {
    400: Verdict.SPLIT,
    401: Verdict.HOLD,
    403: Verdict.HOLD,
    409: Verdict.RETRY_SAME,
    413: Verdict.SPLIT,
    415: Verdict.SPLIT,
    422: Verdict.REKEY,
    429: Verdict.WAIT,
    503: Verdict.WAIT,
}

#: 401/403 back off at least this long: a signature or registration problem is not
#: fixed in seconds, and hammering the hub with refused requests helps nobody.
HOLD_SECS: Final = 600.0
#: A Retry-After longer than this is clamped (a broken proxy must not park a node
#: for days); never shorter than the configured backoff cap.
RETRY_AFTER_MAX_SECS: Final = 3600.0
#: First step of the exponential backoff.
BACKOFF_BASE_SECS: Final = 1.0


@dataclass(frozen=True, slots=True)
class Action:
    """`action_for`'s answer: the verdict, and what the hub said that shapes the wait."""

    verdict: Verdict
    retry_after: float | None = None  # seconds, when the hub sent Retry-After
    alarm: bool = False  # someone must act (401/403); `status` shows it
    status: int | None = None
    problem_type: str | None = None

    @property
    def same_batch(self) -> bool:
        """Whether the retry resends these exact bytes under the same key."""
        return self.verdict in (Verdict.RETRY_SAME, Verdict.WAIT)

    @property
    def final(self) -> bool:
        """Whether the batch is done with (no retry of it, in any form)."""
        return self.verdict in (Verdict.SETTLE, Verdict.DEAD_LETTER)


def action_for(outcome: BatchResult | HubError, *, records: int) -> Action:
    """PROTOCOL.md's status table: what to do with the outcome of uploading a batch of
    ``records`` records (a 200 answer, or the `HubError` the client raised)."""
    if isinstance(outcome, BatchResult):
        return Action(Verdict.SETTLE, status=200)
    status = outcome.status
    verdict = _BY_STATUS.get(status, Verdict.BACKOFF) if status is not None else Verdict.BACKOFF
    if verdict is Verdict.SPLIT and records <= 1:
        verdict = Verdict.DEAD_LETTER
    return Action(
        verdict,
        retry_after=outcome.retry_after,
        alarm=verdict is Verdict.HOLD,
        status=status,
        problem_type=outcome.problem_type,
    )


def backoff(failures: int, *, cap: float, rand: Callable[[], float]) -> float:
    """Exponential backoff with full jitter (AWS Architecture Blog, 2015): a uniform
    draw in [0, min(cap, base * 2**failures)]. ``rand`` returns a float in [0, 1)."""
    ceiling = min(cap, BACKOFF_BASE_SECS * 2.0 ** min(max(failures, 0), 64))
    return ceiling * rand()


def delay_for(action: Action, *, failures: int, cap: float, rand: Callable[[], float]) -> float:
    """How long to wait before ``action``'s retry, in seconds.

    Args:
        action: from `action_for`.
        failures: consecutive transient failures before this one (0 for the first).
        cap: the backoff cap (``hub.backoff_max_secs``).
        rand: uniform [0, 1) source, injected so tests can pin it.
    """
    v = action.verdict
    if v is Verdict.WAIT:
        if action.retry_after is None:
            return backoff(failures, cap=cap, rand=rand)
        return min(max(action.retry_after, 0.0), max(cap, RETRY_AFTER_MAX_SECS))
    if v is Verdict.RETRY_SAME:
        if action.retry_after is not None:
            return min(max(action.retry_after, 0.0), max(cap, RETRY_AFTER_MAX_SECS))
        # The first request is still being processed: seconds, not minutes.
        return min(cap, 1.0 + backoff(failures, cap=cap, rand=rand))
    if v is Verdict.HOLD:
        longest = max(cap, HOLD_SECS)
        return longest * (0.5 + 0.5 * rand())
    if v is Verdict.BACKOFF:
        return backoff(failures, cap=cap, rand=rand)
    return 0.0
