"""Pre-warming: one engine warm-up shortly before the next bin of a steady stream is due.

While the server sleeps between bins, the model's weights and ORT's code leave the caches, so
a bin arriving after a pause of a millisecond or more costs several back-to-back decodes
(benchmarks/engine_latency.py). When requests come at a steady period that long, the planner
schedules one ``engine.warm()`` (which leaves the last decode's outputs alone) just before the
next is due: one extra inference per bin and no spinning. A request that arrives first cancels
it, so back-to-back and irregular traffic pay only the bookkeeping.

The serving loop reads ``due`` (when to wake for a warm-up; 0: no plan), calls ``warm()`` once
that time has come with nothing received, and tells the planner about requests:
``interrupted()`` when one arrives while a warm-up is planned, ``arrived(t)`` after serving it.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

MIN_PERIOD_NS = 500_000  # shorter gaps leave the caches warm enough: nothing to gain
MAX_PERIOD_NS = 2_000_000_000  # a longer gap is a pause, not a stream
SLACK_NS = 150_000  # least time between warm-up and bin: the timed wait's wake-up jitter
TOO_SOON_NS = 50_000  # a warm-up due sooner than this after a reply is not worth waking for


class WarmPlanner:
    """Plans engine warm-ups from request arrival times (see the module doc).

    ``warm`` is the engine's warm-up call (None: never plan one). Its cost, timed here over
    ``calibrate`` calls, plus ``SLACK_NS`` is the least lead a warm-up gets before the bin.
    ``clock`` is a nanosecond clock (``time.perf_counter_ns``; tests pass a fake one)."""

    def __init__(self, warm: Callable[[], None] | None, clock: Callable[[], int] = time.perf_counter_ns,
                 calibrate: int = 20):
        self._warm, self._clock = warm, clock
        self.due = 0  # clock time at which to warm if no request came first; 0: none planned
        self.warms = 0  # warm-ups run
        self._prev = 0  # arrival time of the previous request
        self._period = 0.0  # smoothed gap between requests
        self._planned_period = 0.0  # the period the current lead was planned for
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
        gap, self._prev = t - self._prev, t
        if not 0 < gap < MAX_PERIOD_NS:
            self._period, self.due = 0.0, 0
            return
        # Smoothed, so one late or early bin does not move the schedule much.
        period = self._period = gap if not self._period else 0.75 * self._period + 0.25 * gap
        if period < MIN_PERIOD_NS or abs(gap - period) > 0.25 * period:
            self.due = 0
            return
        due = t + int(period) - self.lead
        self._planned_period = period
        self.due = due if due > self._clock() + TOO_SOON_NS else 0

    def interrupted(self) -> None:
        """A request arrived before the planned warm-up: cancel it, and warm earlier from now on.

        A warm-up just before its bin helps most and one long before barely at all, so the lead
        stays tight and some bins of a jittery stream beat their warm-up."""
        self.due = 0
        self.lead = min(int(self._planned_period) // 2, int(1.5 * self.lead))

    def warm(self) -> None:
        """Run the planned warm-up (``due`` has come): each one in time lets the next come a
        little later, down to the least lead."""
        self.due = 0
        self._warm()
        self.warms += 1
        self.lead = max(self.min_lead, int(self.lead * 0.95))
