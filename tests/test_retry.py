"""RetryPolicy: full-jitter bounds, cap, determinism, give-up rule, validation."""

from __future__ import annotations

import dataclasses
import doctest
import math
import random
import statistics
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import sfbatch.retry
from sfbatch.errors import ConfigError
from sfbatch.retry import RetryPolicy


def exact_bound(policy: RetryPolicy, retry: int) -> float:
    """min(cap, base * 2**(retry-1)), computed without float overflow."""
    if retry - 1 >= math.log2(policy.cap_s / policy.base_s) + 1:
        return policy.cap_s
    return min(policy.cap_s, policy.base_s * float(2 ** (retry - 1)))


policies = st.builds(
    lambda base, factor, retries: RetryPolicy(
        max_retries=retries, base_s=base, cap_s=base * factor
    ),
    base=st.floats(min_value=1e-3, max_value=100.0),
    factor=st.floats(min_value=1.0, max_value=1e4),
    retries=st.integers(min_value=0, max_value=50),
)


@given(policy=policies, retry=st.integers(min_value=1, max_value=5000), seed=st.integers())
def test_delay_is_within_full_jitter_bounds(policy: RetryPolicy, retry: int, seed: int) -> None:
    delay = policy.delay_s(retry, random.Random(seed))
    bound = exact_bound(policy, retry)
    assert policy.max_delay_s(retry) == pytest.approx(bound)
    assert 0.0 <= delay <= policy.max_delay_s(retry)
    assert delay <= policy.cap_s


@given(policy=policies, retry=st.integers(min_value=1, max_value=60))
def test_bound_doubles_until_the_cap(policy: RetryPolicy, retry: int) -> None:
    here, after = policy.max_delay_s(retry), policy.max_delay_s(retry + 1)
    assert after == pytest.approx(min(policy.cap_s, 2 * here))


def test_cap_is_respected_for_huge_retry_numbers() -> None:
    policy = RetryPolicy(base_s=1.0, cap_s=60.0)
    assert [policy.max_delay_s(n) for n in (1, 2, 6, 7, 8, 1023, 1024, 10**6)] == [
        1.0,
        2.0,
        32.0,
        60.0,
        60.0,
        60.0,
        60.0,
        60.0,
    ]
    rng = random.Random(1)
    assert max(policy.delay_s(10**6, rng) for _ in range(1000)) <= 60.0


def test_same_seed_same_delays() -> None:
    policy = RetryPolicy()

    def delays(seed: int) -> list[float]:
        rng = random.Random(seed)
        return [policy.delay_s(n, rng) for n in range(1, 11)]

    assert delays(7) == delays(7)
    assert delays(7) != delays(8)


def test_jitter_is_spread_over_the_whole_range() -> None:
    policy = RetryPolicy(base_s=1.0, cap_s=8.0)
    rng = random.Random(2024)
    samples = [policy.delay_s(4, rng) for _ in range(4000)]
    assert min(samples) < 0.1
    assert max(samples) > 7.9
    assert statistics.fmean(samples) == pytest.approx(4.0, abs=0.2)


def test_delay_uses_only_the_given_rng() -> None:
    policy = RetryPolicy()
    random.seed(1)
    first = policy.delay_s(3, random.Random(5))
    random.seed(2)
    assert policy.delay_s(3, random.Random(5)) == first


@pytest.mark.parametrize("retry", [0, -1])
def test_retry_counts_from_one(retry: int) -> None:
    with pytest.raises(ValueError, match="from 1"):
        RetryPolicy().delay_s(retry, random.Random(0))


def test_gives_up_after_max_retries() -> None:
    policy = RetryPolicy(max_retries=5)
    assert [policy.gives_up(n) for n in range(8)] == [False] * 6 + [True] * 2
    never_retry = RetryPolicy(max_retries=0)
    assert not never_retry.gives_up(0)
    assert never_retry.gives_up(1)
    with pytest.raises(ValueError):
        policy.gives_up(-1)


@given(max_retries=st.integers(min_value=0, max_value=100), attempts=st.integers(0, 200))
def test_gives_up_iff_attempts_exceed_retries(max_retries: int, attempts: int) -> None:
    policy = RetryPolicy(max_retries=max_retries)
    assert policy.gives_up(attempts) is (attempts > max_retries)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_retries": -1},
        {"max_retries": 1.5},
        {"max_retries": True},
        {"max_retries": "3"},
        {"base_s": 0},
        {"base_s": -1.0},
        {"base_s": math.nan},
        {"base_s": math.inf},
        {"base_s": "1"},
        {"cap_s": 0.0},
        {"cap_s": math.inf},
        {"base_s": 10.0, "cap_s": 5.0},
    ],
)
def test_invalid_policy_is_a_config_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        RetryPolicy(**kwargs)


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(max_retries=-1)


def test_frozen_and_keyword_only() -> None:
    policy = RetryPolicy()
    assert (policy.max_retries, policy.base_s, policy.cap_s) == (5, 1.0, 60.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_retries = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        RetryPolicy(3)  # type: ignore[call-arg]


def test_docstring_examples() -> None:
    assert doctest.testmod(sfbatch.retry).failed == 0
