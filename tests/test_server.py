"""The serving loop on a fake engine over real sockets, in-process: batching of queued requests
(ROUTER and stream) that keeps each stream's bins in order, queue times, pre-warming driven by
the loop's waits, and stopping. Each test runs ``Server.run`` in a thread and bounds every wait."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq
from fakes import FakeEngine, expected

from swapvae.runtime import wire
from swapvae.runtime.serve.server import Server
from swapvae.schemas.protocol import MsgType


class CountingEngine(FakeEngine):
    """Records each engine call (kind, bins, the streams' ids), when it decoded, and when it warmed."""

    def __init__(self):
        super().__init__()
        self.calls, self.decoded, self.warmed = [], [], []

    def decode_stream(self, stream, counts, reset=False):
        self.calls.append(("stream", len(counts) if np.ndim(counts) == 2 else 1, [id(stream)]))
        self.decoded.append(time.perf_counter_ns())
        return super().decode_stream(stream, counts, reset)

    def decode_streams(self, streams, counts, resets=None):
        self.calls.append(("streams", len(streams), [id(s) for s in streams]))
        self.decoded.append(time.perf_counter_ns())
        return super().decode_streams(streams, counts, resets)

    @property
    def batch_calls(self) -> int:
        return sum(n > 1 for _, n, _ in self.calls)

    def warm(self):
        self.warmed.append(time.perf_counter_ns())


class Running:
    """``server.run`` in a thread; ``stop`` returns how long the loop took to return (s)."""

    def __init__(self, server: Server):
        self.server = server
        server._stop = False
        self.thread = threading.Thread(target=server.run, daemon=True)
        self.thread.start()

    def stop(self) -> float:
        t = time.monotonic()
        self.server.stop()
        self.thread.join(5)
        assert not self.thread.is_alive(), "the loop did not stop"
        return time.monotonic() - t


def _socket(kind: int, endpoint: str | None = None, bind: bool = False) -> zmq.Socket:
    s = zmq.Context.instance().socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    if kind == zmq.SUB:
        s.setsockopt(zmq.SUBSCRIBE, b"")
    if endpoint is not None:
        s.connect(endpoint)
    return s


def _check_decode(head, body, x, before=()) -> None:
    """The reply decodes ``x`` as the fake does on a stream that saw ``before`` since its start."""
    assert head.msg_type == MsgType.DECODE_REPLY and head.n_bins == len(np.atleast_2d(x)), (head, bytes(body))
    got, ref = wire.decode_arrays(head, body), expected(x, before)
    for k in got:
        np.testing.assert_array_equal(got[k], getattr(ref, k), err_msg=k)


def _replies(sock, n: int) -> list:
    out = []
    for _ in range(n):
        frames = sock.recv_multipart()
        assert len(frames) == 1 or frames[0] == b""  # a REQ-style delimiter comes back
        out.append(wire.parse_reply(frames[-1]))
    return out


@pytest.mark.parametrize("busy_poll", [False, True])
def test_a_steady_stream_is_prewarmed_just_before_each_bin(busy_poll):
    """The loop's wait wakes for the planned warm-up (sooner than its stop-flag timeout) and the
    warm-up lands shortly before the next bin, not just after the last."""
    eng = CountingEngine()
    s = Server(eng, bind="tcp://127.0.0.1:*", warmup=0, busy_poll=busy_poll)
    c = _socket(zmq.DEALER, s.endpoints["router"])
    period, n = 0.05, 12  # long enough that a loaded test machine's jitter stays well within a quarter of it
    try:
        loop = Running(s)
        start = time.perf_counter()
        for i in range(n):
            time.sleep(max(0.0, start + i * period - time.perf_counter()))
            c.send(wire.pack_request(MsgType.DECODE, i, 0, np.ones(6, np.float32)))
            c.recv()
        loop.stop()
    finally:
        c.close()
        s.close()
    assert s.planner.warms == len(eng.warmed) - 20 >= n // 4  # 20: timing the warm-up at start
    decoded = np.array(eng.decoded[1:])  # the probe at start excluded
    ahead = []
    for t in eng.warmed[20:]:
        later = decoded[decoded > t]
        if len(later):
            ahead.append(later[0] - t)
    assert ahead and np.median(ahead) < 0.25 * period * 1e9, ahead


def test_a_request_that_arrives_while_another_is_decoded_is_not_left_waiting():
    """A request queued during a decode must be seen although the reply's send may consume the
    socket's wake-up signal (the blocking wait reads EVENTS before it sleeps)."""

    class SlowEngine(FakeEngine):
        def decode(self, counts):
            time.sleep(0.003)  # sends then come more than libzmq's command-throttle apart
            return super().decode(counts)

    s = Server(SlowEngine(), bind="tcp://127.0.0.1:*", warmup=0, prewarm=False)
    c = _socket(zmq.DEALER, s.endpoints["router"])
    c.setsockopt(zmq.RCVTIMEO, 1000)
    try:
        loop = Running(s)
        for k in range(10):
            c.send(wire.pack_request(MsgType.DECODE, 2 * k, 0, np.ones(6, np.float32)))
            time.sleep(0.001)  # the second arrives while the first is decoded
            c.send(wire.pack_request(MsgType.DECODE, 2 * k + 1, 0, np.ones(6, np.float32)))
            assert sorted(wire.parse_reply(c.recv())[0].seq for _ in range(2)) == [2 * k, 2 * k + 1]
            time.sleep(0.005)
        loop.stop()
    finally:
        c.close()
        s.close()


