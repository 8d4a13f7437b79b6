"""The retry budget (floor, ratio, sliding window) and which attempts may be retried."""

from __future__ import annotations

import pytest

from mesh.errors import ConfigError
from mesh.proxy.retry import IDEMPOTENT_METHODS, RetryBudget, is_retryable


class FakeClock:
    def __init__(self, t: float = 5000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def withdraw_all(budget: RetryBudget, limit: int = 10_000) -> int:
    taken = 0
    while taken < limit and budget.withdraw():
        taken += 1
    return taken


def test_floor_without_any_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=10, ttl=10.0, clock=FakeClock())
    assert budget.balance == 100
    assert withdraw_all(budget) == 100
    assert budget.balance == 0
    assert not budget.withdraw()


def test_ratio_of_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0, ttl=10.0, clock=FakeClock())
    assert not budget.withdraw()
    for _ in range(50):
        budget.deposit()
    assert budget.balance == 10
    assert withdraw_all(budget) == 10


def test_floor_and_ratio_add_up() -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=1, ttl=10.0, clock=FakeClock())
    for _ in range(20):
        budget.deposit()
    assert withdraw_all(budget) == 10 + 10


def test_fractional_ratio_is_not_lost_to_rounding() -> None:
    budget = RetryBudget(ratio=0.1, min_per_second=0, ttl=10.0, clock=FakeClock())
    for _ in range(3):
        budget.deposit()
    assert withdraw_all(budget) == 0  # 0.3 of a retry is no retry
    for _ in range(27):
        budget.deposit()
    assert withdraw_all(budget) == 3


def test_failed_withdrawal_takes_nothing() -> None:
    budget = RetryBudget(ratio=1.0, min_per_second=0, ttl=10.0, clock=FakeClock())
    assert not budget.withdraw()
    budget.deposit()
    assert budget.withdraw()


def test_deposits_and_withdrawals_leave_the_window() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(ratio=0.5, min_per_second=0, ttl=10.0, clock=clock)
    for _ in range(10):
        budget.deposit()
    assert withdraw_all(budget) == 5

    clock.t = 5.0
    for _ in range(4):
        budget.deposit()
    assert withdraw_all(budget) == 2  # 0.5 * 14 - 5

    clock.t = 9.99
    assert budget.balance == 0
    clock.t = 10.0  # the first slice (10 requests, 5 retries) has left the window
    assert budget.balance == 0  # 0.5 * 4 - 2
    for _ in range(6):
        budget.deposit()
    assert budget.balance == 3

    clock.t = 15.0  # everything from t=5 is gone too
    assert budget.balance == 3
    clock.t = 1000.0
    assert budget.balance == 0


def test_window_granularity_is_a_tenth_of_the_ttl() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(ratio=1.0, min_per_second=0, ttl=10.0, clock=clock)
    clock.t = 0.95  # last moment of the first slice
    budget.deposit()
    clock.t = 9.99
    assert budget.balance == 1
    clock.t = 10.0  # dropped with its slice, 0.9 * ttl after it was made
    assert budget.balance == 0


def test_the_floor_comes_back_as_retries_age_out() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(ratio=0.2, min_per_second=1, ttl=10.0, clock=clock)
    assert withdraw_all(budget) == 10
    clock.t = 5.0
    assert not budget.withdraw()
    clock.t = 10.0
    assert withdraw_all(budget) == 10


def test_a_clock_that_steps_back_does_not_break_accounting() -> None:
    clock = FakeClock(100.0)
    budget = RetryBudget(ratio=1.0, min_per_second=0, ttl=10.0, clock=clock)
    budget.deposit()
    clock.t = 50.0
    budget.deposit()
    assert budget.balance == 2
    assert withdraw_all(budget) == 2


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"ratio": -0.1}, "ratio"),
    ({"ratio": 2000.0}, "ratio"),
    ({"min_per_second": -1}, "min_per_second"),
    ({"ttl": 0.0}, "ttl"),
])
def test_nonsense_parameters_are_refused(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        RetryBudget(**kwargs)  # type: ignore[arg-type]


def test_repr_shows_the_balance() -> None:
    assert "balance=100" in repr(RetryBudget(clock=FakeClock()))


# --- which attempts may be retried ------------------------------------------------------


@pytest.mark.parametrize("method", sorted(IDEMPOTENT_METHODS))
def test_idempotent_methods_retry_on_connect_errors_and_gateway_statuses(method: str) -> None:
    assert is_retryable(method, body_consumed=False, status=None, error=True)
    for status in (502, 503, 504):
        assert is_retryable(method, body_consumed=False, status=status, error=False)


@pytest.mark.parametrize("method", ["POST", "PATCH", "CONNECT", "get", "BREW"])
def test_other_methods_are_never_retried(method: str) -> None:
    assert not is_retryable(method, body_consumed=False, status=None, error=True)
    assert not is_retryable(method, body_consumed=False, status=503, error=False)


@pytest.mark.parametrize("status", [200, 204, 301, 400, 404, 429, 500, 501, 505])
def test_other_statuses_are_answers_not_retry_signals(status: int) -> None:
    assert not is_retryable("GET", body_consumed=False, status=status, error=False)


def test_a_streamed_body_cannot_be_sent_again() -> None:
    assert not is_retryable("PUT", body_consumed=True, status=None, error=True)
    assert not is_retryable("PUT", body_consumed=True, status=503, error=False)


def test_no_error_and_no_status_is_nothing_to_retry() -> None:
    assert not is_retryable("GET", body_consumed=False, status=None, error=False)
