"""Limits per caller and at once: a caller's burst and rate, the wait it is told, callers apart,
the memory a limiter keeps, slots; and the settings that configure them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from opscore import config
from opscore.domain.clock import VirtualClock
from opscore.domain.quotas import Rate, RateLimiter, Slots

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


def limiter(
    per_second: float, burst: int, max_callers: int = 10_000
) -> tuple[RateLimiter, VirtualClock]:
    clock = VirtualClock(T0)
    return RateLimiter(Rate(per_second, burst), clock, max_callers=max_callers), clock


def test_a_new_caller_may_make_its_burst_then_one_call_a_token_later() -> None:
    limits, clock = limiter(per_second=10, burst=3)
    assert [limits.take("a") for _ in range(3)] == [None, None, None]
    assert limits.take("a") == timedelta(milliseconds=100)
    clock.advance(timedelta(milliseconds=40))
    assert limits.take("a") == timedelta(milliseconds=60)  # a refused call takes nothing
    clock.advance(timedelta(milliseconds=60))
    assert limits.take("a") is None
    assert limits.take("a") == timedelta(milliseconds=100)


def test_an_idle_caller_gets_its_whole_burst_back_and_no_more() -> None:
    limits, clock = limiter(per_second=2, burst=4)
    for _ in range(4):
        assert limits.take("a") is None
    clock.advance(timedelta(hours=1))
    assert [limits.take("a") for _ in range(5)] == [None] * 4 + [timedelta(milliseconds=500)]


def test_a_wait_is_rounded_up_to_the_microsecond() -> None:
    limits, clock = limiter(per_second=3, burst=1)
    assert limits.take("a") is None
    wait = limits.take("a")
    assert wait == timedelta(microseconds=333_334)  # a third of a second, never less
    clock.advance(wait - MICROSECOND)
    assert limits.take("a") == MICROSECOND
    clock.advance(MICROSECOND)
    assert limits.take("a") is None


def test_callers_have_buckets_of_their_own() -> None:
    limits, _ = limiter(per_second=1, burst=1)
    assert limits.take("a") is None
    assert limits.take("a") == timedelta(seconds=1)
    assert limits.take("b") is None
    assert len(limits) == 2


def test_an_unlimited_rate_admits_everything_and_keeps_nothing() -> None:
    limits, _ = limiter(per_second=0, burst=1)
    assert all(limits.take(f"caller-{i % 7}") is None for i in range(10_000))
    assert len(limits) == 0


def test_full_buckets_are_dropped_before_busy_ones() -> None:
    limits, clock = limiter(per_second=1, burst=2, max_callers=3)
    assert (limits.take("a"), limits.take("a")) == (None, None)  # full again in 2 s
    assert limits.take("b") is None  # full again in 1 s
    assert limits.take("c") is None
    clock.advance(timedelta(seconds=1))
    # a is the least recently used, but b and c are full: one of them makes room.
    assert limits.take("new") is None
    assert len(limits) == 3
    # a still owes what it took: one token is back, not two.
    assert limits.take("a") is None
    assert limits.take("a") == timedelta(seconds=1)


def test_when_every_bucket_is_busy_the_least_recently_used_is_dropped() -> None:
    limits, _ = limiter(per_second=1, burst=1, max_callers=2)
    assert limits.take("a") is None
    assert limits.take("b") is None
    assert limits.take("a") == timedelta(seconds=1)  # refused, yet a use: b is now the oldest
    assert limits.take("c") is None
    assert len(limits) == 2
    assert limits.take("a") == timedelta(seconds=1)  # kept
    assert limits.take("b") is None  # dropped, so it starts full again


def test_a_limiter_keeps_at_least_one_caller() -> None:
    with pytest.raises(ValueError, match="at least one caller"):
        limiter(per_second=1, burst=1, max_callers=0)


@pytest.mark.parametrize(
    ("per_second", "burst"), [(-1.0, 1), (float("inf"), 1), (float("nan"), 1), (1.0, 0)]
)
def test_a_rate_is_finite_and_not_negative_and_a_burst_admits_one_call(
    per_second: float, burst: int
) -> None:
    with pytest.raises(ValueError, match=r"rate|burst"):
        Rate(per_second, burst)


RATES = st.floats(min_value=0.01, max_value=1e6, allow_nan=False, allow_infinity=False)
STEPS = st.lists(
    st.tuples(st.integers(0, 2_000_000), st.integers(0, 2)),  # microseconds to wait, caller
    max_size=120,
)


def _replay(
    rate: Rate, steps: list[tuple[int, int]], max_callers: int = 10_000
) -> list[tuple[int, int, timedelta | None]]:
    """(microseconds since the start, caller, what take answered) for each step."""
    clock = VirtualClock(T0)
    limits = RateLimiter(rate, clock, max_callers=max_callers)
    answers = []
    for wait, caller in steps:
        clock.advance(timedelta(microseconds=wait))
        now = round(clock.monotonic() * 1_000_000)
        answers.append((now, caller, limits.take(f"caller-{caller}")))
    return answers


@settings(max_examples=300, deadline=None)
@given(RATES, st.integers(1, 20), STEPS)
# A token's time of 1000.5 ns: were it rounded down, two calls would pass within a microsecond.
@example(1e9 / 1000.5, 1, [(0, 0), (1, 0)])
def test_no_caller_is_admitted_more_than_its_burst_and_rate_allow_in_any_window(
    per_second: float, burst: int, steps: list[tuple[int, int]]
) -> None:
    admitted: dict[int, list[int]] = {}
    for now, caller, answer in _replay(Rate(per_second, burst), steps):
        if answer is None:
            admitted.setdefault(caller, []).append(now)
    for times in admitted.values():
        for first in range(len(times)):
            for last in range(first, len(times)):
                window = (times[last] - times[first]) / 1_000_000
                assert last - first + 1 <= burst + per_second * window + 1e-9


@settings(max_examples=200, deadline=None)
@given(RATES, st.integers(1, 20), STEPS)
def test_callers_are_answered_as_if_each_were_alone(
    per_second: float, burst: int, steps: list[tuple[int, int]]
) -> None:
    rate = Rate(per_second, burst)
    together = _replay(rate, steps)
    for caller in {caller for _, caller, _ in together}:
        # The same caller's calls at the same times, nobody else's.
        alone_steps, previous = [], 0
        for now, other, _ in together:
            if other == caller:
                alone_steps.append((now - previous, caller))
                previous = now
        alone = _replay(rate, alone_steps)
        assert [answer for _, _, answer in alone] == [
            answer for _, other, answer in together if other == caller
        ]


@settings(max_examples=300, deadline=None)
@given(RATES, st.integers(1, 20), STEPS)
def test_a_refused_caller_is_admitted_exactly_when_told_and_not_a_microsecond_sooner(
    per_second: float, burst: int, steps: list[tuple[int, int]]
) -> None:
    clock = VirtualClock(T0)
    limits = RateLimiter(Rate(per_second, burst), clock)
    for wait, caller in steps:
        clock.advance(timedelta(microseconds=wait))
        told = limits.take(f"caller-{caller}")
        if told is None:
            continue
        assert told > timedelta(0)
        clock.advance(told - MICROSECOND)
        assert limits.take(f"caller-{caller}") == MICROSECOND
        clock.advance(MICROSECOND)
        assert limits.take(f"caller-{caller}") is None


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 5),
    st.lists(st.tuples(st.integers(0, 300_000), st.integers(0, 40)), max_size=200),
)
def test_a_limiter_keeps_at_most_its_callers_however_many_come(
    max_callers: int, steps: list[tuple[int, int]]
) -> None:
    clock = VirtualClock(T0)
    limits = RateLimiter(Rate(10, 3), clock, max_callers=max_callers)
    for wait, caller in steps:
        clock.advance(timedelta(microseconds=wait))
        limits.take(f"caller-{caller}")
        assert len(limits) <= max_callers
        # Its index of when buckets fill is the rest of its memory.
        assert len(limits._filling) <= 2 * max_callers


@given(STEPS)
def test_an_unlimited_rate_admits_every_call(steps: list[tuple[int, int]]) -> None:
    assert all(answer is None for _, _, answer in _replay(Rate(0, 1), steps))


def test_slots_admit_up_to_their_limit_and_again_once_released() -> None:
    slots = Slots(2)
    assert (slots.try_acquire(), slots.try_acquire(), slots.try_acquire()) == (True, True, False)
    assert slots.in_use == 2
    slots.release()
    assert slots.in_use == 1
    assert slots.try_acquire()
    assert not slots.try_acquire()


def test_slots_without_a_limit_admit_everything_and_count_it() -> None:
    slots = Slots(0)
    assert all(slots.try_acquire() for _ in range(10_000))
    assert slots.in_use == 10_000


def test_slots_refuse_a_release_without_an_acquire_and_a_negative_limit() -> None:
    slots = Slots(1)
    with pytest.raises(ValueError, match="not acquired"):
        slots.release()
    assert slots.try_acquire()
    slots.release()
    assert slots.in_use == 0
    with pytest.raises(ValueError, match=">= 0"):
        Slots(-1)


def test_the_limits_come_from_the_environment() -> None:
    loaded = config.load(
        {
            "OPSCORE_TRIGGER_RATE": "0",
            "OPSCORE_REGISTER_RATE": "2.5",
            "OPSCORE_REGISTER_BURST": "7",
            "OPSCORE_MAX_STREAMS": "0",
            "OPSCORE_MAX_CONCURRENT_CALLS": "12",
            "OPSCORE_MAX_STREAMS_PER_CONNECTION": "3",
            "OPSCORE_MIN_PING_INTERVAL": "0.5",
            "OPSCORE_MAX_PING_STRIKES": "0",
        }
    )
    defaults = config.Settings()
    assert loaded.trigger_rate == Rate(0, defaults.trigger_rate.burst)
    assert loaded.trigger_rate.unlimited
    assert loaded.register_rate == Rate(2.5, 7)
    assert (loaded.max_streams, loaded.max_concurrent_calls) == (0, 12)
    assert loaded.max_streams_per_connection == 3
    assert (loaded.min_ping_interval, loaded.max_ping_strikes) == (0.5, 0)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OPSCORE_TRIGGER_RATE", "-1"),
        ("OPSCORE_TRIGGER_RATE", "inf"),
        ("OPSCORE_TRIGGER_BURST", "0"),
        ("OPSCORE_REGISTER_BURST", "1.5"),
        ("OPSCORE_MAX_STREAMS", "-1"),
        ("OPSCORE_MAX_CONCURRENT_CALLS", "many"),
        ("OPSCORE_MAX_STREAMS_PER_CONNECTION", "0"),
        ("OPSCORE_MIN_PING_INTERVAL", "0"),
        ("OPSCORE_MAX_PING_STRIKES", "-1"),
    ],
)
def test_bad_limits_are_refused_by_name(variable: str, value: str) -> None:
    with pytest.raises(ValueError, match=variable):
        config.load({variable: value})
