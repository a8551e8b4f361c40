"""agent.uploader.policy: PROTOCOL.md's status table, row by row, and the backoff.

Pure functions: no buffer, no HTTP, no clock. Each table row is its own case so that a
changed row fails with its status in the test id.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import (
    BatchInFlightError,
    BatchRejectedError,
    BatchTooLargeError,
    HubError,
    HubThrottledError,
    HubUnavailableError,
    IdempotencyConflictError,
    SignatureRefusedError,
)
from agent.uploader.batching import BatchResult, RecordResult
from agent.uploader.policy import (
    HOLD_SECS,
    RETRY_AFTER_MAX_SECS,
    Action,
    Verdict,
    action_for,
    backoff,
    delay_for,
)

RESULT = BatchResult(
    batch_id="b",
    received_at=datetime(2026, 11, 25, 12, tzinfo=UTC),
    results=(RecordResult("a" * 64, "accepted"),),
)


def err(cls: type[HubError], status: int | None, **kw: object) -> HubError:
    return cls(f"hub answered {status}", status=status, **kw)  # type: ignore[arg-type]


# --- the table ---------------------------------------------------------------------------


def test_row_200_settles_per_record() -> None:
    action = action_for(RESULT, records=1)
    assert action.verdict is Verdict.SETTLE
    assert action.final
    assert not action.alarm


@pytest.mark.parametrize("status", [400, 415])
def test_row_400_and_415_split_a_batch_in_halves(status: int) -> None:
    action = action_for(err(BatchRejectedError, status), records=10)
    assert action.verdict is Verdict.SPLIT
    assert not action.final


@pytest.mark.parametrize("status", [400, 415])
def test_row_400_and_415_on_a_single_record_dead_letter_it(status: int) -> None:
    action = action_for(err(BatchRejectedError, status), records=1)
    assert action.verdict is Verdict.DEAD_LETTER
    assert action.final


@pytest.mark.parametrize("status", [401, 403])
def test_row_401_and_403_hold_the_records_and_raise_an_alarm_with_the_problem_type(
    status: int,
) -> None:
    ptype = "https://sepas.example/problems/signature-mismatch"
    action = action_for(err(SignatureRefusedError, status, problem_type=ptype), records=5)
    assert action.verdict is Verdict.HOLD
    assert action.alarm
    assert action.problem_type == ptype
    assert action.status == status
    assert not action.final
    assert not action.same_batch


def test_row_409_retries_the_same_batch() -> None:
    action = action_for(err(BatchInFlightError, 409), records=5)
    assert action.verdict is Verdict.RETRY_SAME
    assert action.same_batch


def test_row_413_splits_the_batch() -> None:
    assert action_for(err(BatchTooLargeError, 413), records=2).verdict is Verdict.SPLIT


def test_row_413_on_a_single_record_dead_letters_it() -> None:
    assert action_for(err(BatchTooLargeError, 413), records=1).verdict is Verdict.DEAD_LETTER


def test_row_422_reforms_the_batch_under_a_new_key() -> None:
    action = action_for(err(IdempotencyConflictError, 422), records=5)
    assert action.verdict is Verdict.REKEY
    assert not action.same_batch  # a new key, not the same bytes


@pytest.mark.parametrize("status", [429, 503])
def test_row_429_and_503_wait_retry_after_then_retry_the_same_batch(status: int) -> None:
    action = action_for(err(HubThrottledError, status, retry_after=42.0), records=5)
    assert action.verdict is Verdict.WAIT
    assert action.retry_after == 42.0
    assert action.same_batch


@pytest.mark.parametrize("status", [500, 502, 504, 599])
def test_row_other_5xx_back_off(status: int) -> None:
    assert action_for(err(HubUnavailableError, status), records=5).verdict is Verdict.BACKOFF


def test_row_network_error_and_timeout_back_off() -> None:
    assert action_for(err(HubUnavailableError, None), records=5).verdict is Verdict.BACKOFF


@pytest.mark.parametrize("status", [302, 404, 405, 408, 418, 451])
def test_a_status_the_table_does_not_name_is_transient_never_final(status: int) -> None:
    action = action_for(err(HubUnavailableError, status), records=1)
    assert action.verdict is Verdict.BACKOFF
    assert not action.final


def test_the_status_decides_not_the_exception_class() -> None:
    # A client mapping bug must not make a 503 final or a 400 transient.
    assert action_for(err(HubUnavailableError, 503), records=3).verdict is Verdict.WAIT
    assert action_for(err(HubUnavailableError, 400), records=3).verdict is Verdict.SPLIT


# --- how long to wait --------------------------------------------------------------------


def half() -> float:
    return 0.5


def test_wait_uses_retry_after_exactly() -> None:
    action = Action(Verdict.WAIT, retry_after=7.0)
    assert delay_for(action, failures=9, cap=300, rand=half) == 7.0


def test_wait_clamps_an_absurd_retry_after() -> None:
    action = Action(Verdict.WAIT, retry_after=10 * 86400.0)
    assert delay_for(action, failures=0, cap=300, rand=half) == RETRY_AFTER_MAX_SECS


def test_wait_without_retry_after_backs_off() -> None:
    action = Action(Verdict.WAIT)
    assert delay_for(action, failures=3, cap=300, rand=half) == backoff(3, cap=300, rand=half)


def test_hold_backs_off_for_minutes() -> None:
    action = Action(Verdict.HOLD, alarm=True)
    low = delay_for(action, failures=0, cap=30, rand=lambda: 0.0)
    high = delay_for(action, failures=0, cap=30, rand=lambda: 0.999)
    assert 60 <= HOLD_SECS / 2 <= low <= high <= HOLD_SECS


def test_retry_same_is_seconds_not_minutes() -> None:
    d = delay_for(Action(Verdict.RETRY_SAME), failures=0, cap=300, rand=lambda: 0.999)
    assert 1.0 <= d < 3.0


@pytest.mark.parametrize("verdict", [Verdict.SETTLE, Verdict.SPLIT, Verdict.DEAD_LETTER])
def test_final_or_immediate_actions_wait_nothing(verdict: Verdict) -> None:
    assert delay_for(Action(verdict), failures=5, cap=300, rand=half) == 0.0


@given(
    failures=st.integers(min_value=0, max_value=10_000),
    cap=st.floats(min_value=0.001, max_value=86400, allow_nan=False),
    r=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_backoff_is_full_jitter_within_zero_and_the_capped_exponential(
    failures: int, cap: float, r: float
) -> None:
    d = backoff(failures, cap=cap, rand=lambda: r)
    ceiling = min(cap, 2.0 ** min(failures, 64))
    assert 0.0 <= d <= ceiling <= cap
    assert d == pytest.approx(ceiling * r)


@given(failures=st.integers(min_value=0, max_value=10_000))
def test_backoff_never_exceeds_the_cap_even_after_endless_failures(failures: int) -> None:
    assert backoff(failures, cap=300.0, rand=lambda: 0.9999999) < 300.0


def test_backoff_ceiling_doubles_until_the_cap() -> None:
    top = [backoff(n, cap=300, rand=lambda: 1.0) for n in range(12)]
    assert top[:9] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert top[9:] == [300, 300, 300]


def test_backoff_draws_anywhere_in_the_range_not_only_near_the_ceiling() -> None:
    # "Full" jitter: a draw of 0 waits 0 (equal jitter would wait half the ceiling).
    assert backoff(8, cap=300, rand=lambda: 0.0) == 0.0
