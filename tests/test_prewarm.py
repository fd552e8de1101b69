"""The pre-warm planner on a fake clock: when it plans a warm-up, how its lead adapts, that a
request cancels it, and when the loop polls instead of sleeping. No sockets, no engine."""
from __future__ import annotations

import pytest

from swapvae.runtime.serve.prewarm import MIN_PERIOD_NS, PRESPIN_NS, SLACK_NS, SPIN_NS, TOO_SOON_NS, WarmPlanner

MS = 1_000_000


class Clock:
    def __init__(self, t: int = 10**12):
        self.t = t

    def __call__(self) -> int:
        return self.t


class Engine:
    """A warm() that takes ``cost`` ns of the fake clock."""

    def __init__(self, clock: Clock, cost: int = 40_000):
        self.clock, self.cost, self.calls = clock, cost, 0

    def warm(self) -> None:
        self.calls += 1
        self.clock.t += self.cost


def planner_at(period_ns: int, n: int = 5, cost: int = 40_000):
    """A planner fed ``n`` arrivals at ``period_ns``, the clock just after the last."""
    clock = Clock()
    eng = Engine(clock, cost)
    p = WarmPlanner(eng.warm, clock, calibrate=7)
    for _ in range(n):
        clock.t += period_ns
        p.arrived(clock.t)
    return p, clock, eng


def warm_up(p: WarmPlanner, clock: Clock) -> None:
    """Run the loop's side of a plan: at ``due`` polling starts, at ``warm_at`` the warm-up."""
    clock.t = p.due
    p.warm()
    assert p.due == p.warm_at and p.spin_until == p.warm_at + p.lead + SPIN_NS  # polling until the bin
    clock.t = p.due
    p.warm()


def test_lead_is_the_timed_warm_up_plus_slack():
    p, _, eng = planner_at(10 * MS, n=0, cost=33_000)
    assert eng.calls == 7 and p.warms == 0
    assert p.min_lead == p.lead == SLACK_NS + 33_000


def test_a_steady_slow_stream_gets_a_warm_up_just_before_its_next_bin():
    p, clock, _ = planner_at(10 * MS)
    assert p.warm_at == clock.t + 10 * MS - p.lead
    assert p.due == p.warm_at - PRESPIN_NS  # polling first: no sleep to wake from at the bin
    warm_up(p, clock)
    assert p.due == 0 and p.warms == 1


def test_polling_before_the_warm_up_is_at_most_a_quarter_period():
    p, clock, _ = planner_at(2 * MS)
    assert p.due == p.warm_at - 2 * MS // 4


@pytest.mark.parametrize("case", ["back to back", "faster than the threshold", "after a stall", "irregular"])
def test_no_warm_up_for_streams_it_cannot_help(case):
    if case == "back to back":
        p, clock, _ = planner_at(20_000)
    elif case == "faster than the threshold":
        p, clock, _ = planner_at(MIN_PERIOD_NS // 2, n=20)
    elif case == "after a stall":
        p, clock, _ = planner_at(10 * MS)
        clock.t += 3_000 * MS
        p.arrived(clock.t)
    else:  # one gap far off the smoothed period
        p, clock, _ = planner_at(10 * MS)
        clock.t += 30 * MS
        p.arrived(clock.t)
    assert p.due == 0


def test_a_plan_too_close_to_now_is_dropped():
    """If serving the request took most of the period, a warm-up would land on the next bin."""
    p, clock, _ = planner_at(2 * MS)
    t = clock.t + 2 * MS
    clock.t = t + 2 * MS - p.lead - TOO_SOON_NS // 2  # the reply went out late
    p.arrived(t)
    assert p.due == 0


def test_a_request_that_beats_its_warm_up_cancels_it_and_moves_the_lead_earlier():
    p, clock, eng = planner_at(10 * MS)
    lead, calls = p.lead, eng.calls
    p.interrupted()
    assert p.due == 0 and p.lead == int(1.5 * lead) and eng.calls == calls
    for _ in range(20):  # never more than half the period
        p.interrupted()
    assert p.lead == 5 * MS


def test_warm_ups_in_time_let_the_lead_shrink_back_to_its_least():
    p, clock, _ = planner_at(10 * MS)
    p.interrupted()
    p.interrupted()
    wide, t = p.lead, clock.t
    for _ in range(3):
        t += 10 * MS
        clock.t = t
        p.arrived(t)
        assert p.warm_at == t + 10 * MS - p.lead
        warm_up(p, clock)
    assert p.min_lead < p.lead == int(int(int(wide * 0.95) * 0.95) * 0.95) < wide
    for _ in range(200):
        p.warm()
    assert p.lead == p.min_lead and p.warms == 203


def test_without_a_warm_call_nothing_is_ever_planned():
    clock = Clock()
    p = WarmPlanner(None, clock)
    for _ in range(10):
        clock.t += 10 * MS
        p.arrived(clock.t)
    assert p.due == 0 and p.lead == 0


def test_the_period_is_smoothed_so_one_late_bin_moves_the_plan_a_little():
    p, clock, _ = planner_at(10 * MS)
    clock.t += 12 * MS  # late, but within a quarter of the period: still the same stream
    p.arrived(clock.t)
    assert p.warm_at == clock.t + int(0.75 * 10 * MS + 0.25 * 12 * MS) - p.lead


def test_after_a_warm_up_the_loop_polls_until_the_bin_at_most_spin_ns_past_its_time():
    p, clock, _ = planner_at(10 * MS)
    expected = clock.t + 10 * MS
    assert p.spin_until == 0  # a slow stream: sleep until polling starts
    warm_up(p, clock)
    assert p.spin_until == expected + SPIN_NS
    clock.t = expected + 3_000
    p.arrived(clock.t)  # the bin came: no more polling until the next warm-up
    assert p.spin_until == 0 and clock.t + 9 * MS < p.warm_at < clock.t + 10 * MS


def test_the_lead_follows_what_warm_ups_take_when_they_run():
    """Warm-ups after a pause run cold: several times their start-up cost. The lead grows to cover
    them, so the warm-up ends before the bin instead of delaying it."""
    p, clock, eng = planner_at(10 * MS, cost=40_000)
    assert p.min_lead == SLACK_NS + 40_000
    eng.cost = 300_000  # cold
    warm_up(p, clock)
    assert p.min_lead == SLACK_NS + 300_000 and p.lead == p.min_lead
    for _ in range(30):  # warm again: the lead comes back down, smoothed
        eng.cost = 60_000
        p.warm()
    assert SLACK_NS + 60_000 <= p.min_lead < SLACK_NS + 61_000


def test_a_fast_stream_is_polled_for_without_warm_ups_and_an_idle_server_never_spins():
    p, clock, eng = planner_at(200_000, n=10)  # back to back at 200 us
    assert p.due == 0 and p.spin_until == clock.t + MIN_PERIOD_NS
    calls = eng.calls
    clock.t += 5_000 * MS  # the client stopped: a new request after a pause plans nothing
    p.arrived(clock.t)
    assert p.due == 0 and p.spin_until == 0 and eng.calls == calls
