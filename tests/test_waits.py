"""How the serving loop waits (runtime/serve/waits.py): a blocking wait never sleeps past its
stop-flag interval or a planned warm-up, and returns at once with sources ready or bulk work
pending. The system call is replaced by a recorder: what is checked is the timeout asked for,
not a wall clock."""
from __future__ import annotations

import time

import pytest
import zmq

from swapvae.runtime.serve import waits
from swapvae.runtime.serve.waits import POLL_S, BlockingWait, SpinWait


class Src:
    def __init__(self, fd: int, ready: bool = False):
        self.fd, self.ready = fd, ready

    def get(self, option: int) -> int:
        return int(zmq.POLLIN) if self.ready else 0


@pytest.fixture()
def selects(monkeypatch):
    asked = []

    def select(r, w, x, timeout):
        asked.append(timeout)
        return [], [], []
    monkeypatch.setattr(waits.select, "select", select)
    return asked


def test_an_idle_wait_sleeps_at_most_the_stop_flag_interval(selects):
    wait = BlockingWait([Src(3), Src(4)])
    assert wait(0) == [] and selects == [POLL_S]  # no warm-up planned: the stop flag's interval


def test_a_planned_warm_up_shortens_the_sleep_to_its_time(selects):
    wait = BlockingWait([Src(3)])
    wait(time.perf_counter_ns() + 10_000_000)  # due in 10 ms
    assert 0 < selects[0] <= 0.010
    wait(time.perf_counter_ns() - 1)  # overdue: no sleep at all
    assert selects[1] == 0


def test_ready_sources_or_pending_bulk_work_never_sleep(selects):
    a, b = Src(3, ready=True), Src(4)
    assert BlockingWait([a, b])(0) == [a]
    assert BlockingWait([Src(5)])(0, busy=True) == []
    assert selects == []


def test_the_spinning_wait_yields_the_core_when_idle(monkeypatch):
    yields = []
    monkeypatch.setattr(waits.os, "sched_yield", lambda: yields.append(1))
    a = Src(3)
    spin = SpinWait([a])
    assert spin(0) == [] and yields == [1]
    a.ready = True
    assert spin(0) == [a] and yields == [1]
