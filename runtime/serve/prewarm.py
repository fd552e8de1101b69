"""Pre-warming and polling: the engine warmed just before a steady stream's next bin, and the
loop polling instead of sleeping when a request is due.

While the server sleeps between bins, the model's weights, ORT's code and the Python code
around the call leave the caches, so a bin arriving after a pause of a millisecond or more
costs several back-to-back decodes (benchmarks/engine_latency.py; on a shared 2-core VM, 10 ms
of waiting, spinning or not, made the next decode 14x slower). When requests come at a steady
period that long, the planner schedules one ``engine.warm()`` (which leaves the last decode's
outputs alone) before the next is due. From ``PRESPIN_NS`` (at most a quarter period) before
the warm-up until the bin comes, at most ``SPIN_NS`` past when it was expected, the loop polls
without sleeping: on a VM, a bin that finds the core halted costs as much again (at 100 Hz,
polling from 1 ms before the bin brought the default server's round trip to busy-polling's).
A warm-up after a pause runs cold itself (several times its start-up cost), so the lead is
what warm-ups take when they run, measured on each, plus ``SLACK_NS``.
A request that arrives first cancels the warm-up. A stream faster than ``MIN_PERIOD_NS``
(back to back) gets no warm-up; the loop polls for up to ``MIN_PERIOD_NS`` after each of its
requests. With no stream there is no plan and no polling: an idle server sleeps.

The serving loop reads ``due`` (when to wake for a warm-up; 0: no plan) and ``spin_until``
(poll, do not sleep, until then; 0: no polling), calls ``warm()`` once ``due`` has come with
nothing received, and tells the planner about requests: ``interrupted()`` when one arrives
while a warm-up is planned, ``arrived(t)`` after serving it.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

MIN_PERIOD_NS = 500_000  # shorter gaps leave the caches warm enough for no warm-up; polled for instead
MAX_PERIOD_NS = 2_000_000_000  # a longer gap is a pause, not a stream
SLACK_NS = 150_000  # least time between warm-up and bin: the timed wait's wake-up jitter
TOO_SOON_NS = 50_000  # a warm-up due sooner than this after a reply is not worth waking for
SPIN_NS = 250_000  # after a warm-up, poll until the bin comes, at most this long past when it was expected
PRESPIN_NS = 1_000_000  # poll from this long (at most a quarter period) before the warm-up: no sleep to wake from


class WarmPlanner:
    """Plans engine warm-ups from request arrival times (see the module doc).

    ``warm`` is the engine's warm-up call (None: never plan one). Its cost, timed here over
    ``calibrate`` calls, plus ``SLACK_NS`` is the least lead a warm-up gets before the bin.
    ``clock`` is a nanosecond clock (``time.perf_counter_ns``; tests pass a fake one)."""

    def __init__(self, warm: Callable[[], None] | None, clock: Callable[[], int] = time.perf_counter_ns,
                 calibrate: int = 20):
        self._warm, self._clock = warm, clock
        self.due = 0  # clock time at which to warm if no request came first; 0: none planned
        self.spin_until = 0  # after a warm-up: poll without sleeping until then (or the request); 0: no spin
        self.warms = 0  # warm-ups run
        self._prev = 0  # arrival time of the previous request
        self._period = 0.0  # smoothed gap between requests
        self._planned_period = 0.0  # the period the current lead was planned for
        self._expected = 0  # when the planned-for request is expected
        self.warm_at = 0  # when its warm-up is due (``due`` is earlier while polling comes first)
        self._took = 0.0  # smoothed time a warm-up took when it ran (cold: more than at start-up)
        self.min_lead = self.lead = 0
        if warm is not None:
            took = []
            for _ in range(calibrate):
                t = clock()
                warm()
                took.append(clock() - t)
            self.min_lead = self.lead = SLACK_NS + int(statistics.median(took) if took else 0)

    def arrived(self, t: int) -> None:
        """A request that arrived at ``t`` was served: plan a warm-up before the next one if the
        stream is steady and slow enough, else none."""
        if self._warm is None:
            return
        self.spin_until = 0
        gap, self._prev = t - self._prev, t
        if not 0 < gap < MAX_PERIOD_NS:
            self._period, self.due = 0.0, 0
            return
        # Smoothed, so one late or early bin does not move the schedule much.
        period = self._period = gap if not self._period else 0.75 * self._period + 0.25 * gap
        if period < MIN_PERIOD_NS:  # the next request comes sooner than a wake-up pays: poll for it
            self.due, self.spin_until = 0, t + MIN_PERIOD_NS
            return
        if abs(gap - period) > 0.25 * period:
            self.due = 0
            return
        self._expected = t + int(period)
        self.warm_at = self._expected - self.lead
        self._planned_period = period
        now = self._clock() + TOO_SOON_NS
        polling = self.warm_at - min(PRESPIN_NS, int(period) // 4)
        self.due = polling if polling > now else self.warm_at if self.warm_at > now else 0

    def interrupted(self) -> None:
        """A request arrived before the planned warm-up: cancel it, and warm earlier from now on.

        A warm-up just before its bin helps most and one long before barely at all, so the lead
        stays tight and some bins of a jittery stream beat their warm-up."""
        self.due = 0
        self.lead = min(int(self._planned_period) // 2, int(1.5 * self.lead))

    def warm(self) -> None:
        """``due`` has come: start polling until the warm-up's time, or run the warm-up and
        poll until the request (see the module doc). Each warm-up in time lets the next come a
        little later, down to the least lead: ``SLACK_NS`` plus what warm-ups take when they run."""
        if self._clock() < self.warm_at:
            self.due, self.spin_until = self.warm_at, self._expected + SPIN_NS
            return
        self.due = 0
        t = self._clock()
        self._warm()
        done = self._clock()
        took = done - t
        self._took = took if not self._took else 0.75 * self._took + 0.25 * took
        self.min_lead = SLACK_NS + int(self._took)
        self.warms += 1
        self.lead = max(self.min_lead, int(self.lead * 0.95))
        self.spin_until = max(done, self._expected) + SPIN_NS
