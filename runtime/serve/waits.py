"""How the serving loop waits for input. Both strategies return the sources that may have a
message queued, or an empty list when the loop should look at its stop flag, its planned
warm-up and its pending multi-bin work. Reading EVENTS also lets libzmq process the commands
its I/O thread has queued for the socket, so a message is seen as soon as it is there.
``busy`` (multi-bin work is pending): look, never sleep. ``spin`` (a steady stream's next bin
is due: runtime/serve/prewarm.py): look, and yield the core instead of sleeping.
"""
from __future__ import annotations

import os
import select
import time

import zmq

POLL_S = 0.25  # how often an idle loop looks at the stop flag
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_clock = time.perf_counter_ns


class BlockingWait:
    """Sleep in select() on the sources' ZMQ_FDs until one signals, the planned warm-up is due,
    or POLL_S has passed. ZMQ_FD signals only what changed since EVENTS was last read (any send
    or receive may consume its signal), so EVENTS is read first."""

    def __init__(self, sources: list):
        self._sources = sources
        self._by_fd = {src.fd: src for src in sources}
        self._fds = list(self._by_fd)

    def __call__(self, due: int, busy: bool = False, spin: bool = False) -> list:
        ready = [src for src in self._sources if src.get(_EVENTS) & _POLLIN]
        if ready or busy:
            return ready
        if spin:
            os.sched_yield()
            return ready
        timeout = POLL_S if not due else min(POLL_S, max(0, due - _clock()) / 1e9)
        readable = select.select(self._fds, (), (), timeout)[0]
        if len(self._fds) == 1:
            return self._sources if readable else readable
        return [self._by_fd[fd] for fd in readable]


class SpinWait:
    """Poll the sources; with none ready, yield the core, so that a ZeroMQ I/O thread pinned
    to the same core does not wait for the spinner's time slice."""

    def __init__(self, sources: list):
        self._sources = sources

    def __call__(self, due: int, busy: bool = False, spin: bool = False) -> list:
        ready = [src for src in self._sources if src.get(_EVENTS) & _POLLIN]
        if not ready and not busy:
            os.sched_yield()
        return ready
