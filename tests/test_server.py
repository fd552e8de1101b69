"""The serving loop on a fake engine over real sockets, in-process: batching of queued requests
(ROUTER and stream), pre-warming driven by the loop's waits, and stopping. Each test runs
``Server.run`` in a thread and bounds every wait."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from fakes import FakeEngine, expected
from runtime import wire
from runtime.server import Server
from schemas.protocol import ErrorCode, MsgType


class CountingEngine(FakeEngine):
    """Counts batched engine calls, and records when it decoded and when it warmed."""

    def __init__(self):
        super().__init__()
        self.batch_calls, self.decoded, self.warmed = 0, [], []

    def decode(self, counts):
        if np.ndim(counts) == 2:
            self.batch_calls += 1
        self.decoded.append(time.perf_counter_ns())
        return super().decode(counts)

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


def _check_decode(head, body, x) -> None:
    assert head.msg_type == MsgType.DECODE_REPLY and head.n_bins == len(np.atleast_2d(x)), (head, bytes(body))
    got, ref = wire.decode_arrays(head, body), expected(x)
    for k in got:
        np.testing.assert_allclose(got[k], getattr(ref, k), rtol=1e-6, err_msg=k)


@pytest.mark.parametrize("busy_poll", [False, True])
def test_queued_requests_share_one_engine_call_and_each_gets_its_reply(busy_poll):
    eng = CountingEngine()
    s = Server(eng, bind="tcp://127.0.0.1:*", warmup=0, prewarm=False, busy_poll=busy_poll)
    c = _socket(zmq.DEALER, s.endpoints["router"])
    xs = [np.full(6, i, np.float32) for i in range(12)]
    xs[5] = np.full(6, np.nan, np.float32)  # spoils the batch call: must fall back to one by one
    replies = {}
    try:
        for i, x in enumerate(xs):  # all queued before the loop starts
            c.send(wire.pack_request(MsgType.DECODE, i, 0, x))
        c.send(wire.pack_request(MsgType.PING, 100, 0))
        time.sleep(0.3)
        loop = Running(s)
        for _ in range(len(xs) + 1):
            head, body = wire.parse_reply(c.recv())
            replies[head.seq] = (head, body)
        loop.stop()
        assert eng.batch_calls == 1 and s.recorder.coalesced == 0  # the failed batch call

        # A second queue, all valid: a multi-bin request first, then one-bin ones, some with a
        # REQ-style empty delimiter. The one-bin ones go first, in one engine call.
        bulk = np.arange(18, dtype=np.float32).reshape(3, 6)
        c.send(wire.pack_request(MsgType.DECODE, 50, 0, bulk))
        for i in range(12, 20):
            xs.append(np.full(6, i, np.float32))
            frame = wire.pack_request(MsgType.DECODE, i, 0, xs[i])
            c.send_multipart([b"", frame] if i % 3 == 0 else [frame])
        time.sleep(0.3)
        loop = Running(s)
        order = []
        for _ in range(9):
            frames = c.recv_multipart()
            assert len(frames) == 1 or frames[0] == b""  # the delimiter comes back
            head, body = wire.parse_reply(frames[-1])
            replies[head.seq] = (head, body)
            order.append(head.seq)
        loop.stop()
    finally:
        c.close()
        s.close()
    assert replies[100][0].msg_type == MsgType.PONG
    assert replies[5][0].status == ErrorCode.BAD_VALUE
    for i, x in enumerate(xs):
        if i != 5:
            _check_decode(*replies[i], x)
    _check_decode(*replies[50], bulk)
    assert order == list(range(12, 20)) + [50]
    assert eng.batch_calls == 3 and s.recorder.coalesced == 8  # + the one-bin batch and the bulk request
    st = s.stats()
    assert st.decodes == 11 + 8 + 1 and st.bins == 11 + 8 + 3 and st.latency_us.n == 11 + 8


def test_queued_stream_bins_share_one_engine_call():
    eng = CountingEngine()
    source = _socket(zmq.PUB)
    port = source.bind_to_random_port("tcp://127.0.0.1")
    s = Server(eng, bind=None, sub=f"tcp://127.0.0.1:{port}", pub="tcp://127.0.0.1:*", warmup=0, prewarm=False)
    sink = _socket(zmq.SUB, s.endpoints["pub"])
    try:
        loop = Running(s)
        deadline, joined = time.monotonic() + 10, False  # PUB/SUB joins asynchronously
        while not joined and time.monotonic() < deadline:
            source.send(wire.pack_request(MsgType.DECODE, 999, 0, np.zeros(6, np.float32)))
            joined = sink.poll(100) != 0
        assert joined
        loop.stop()
        while sink.poll(200):
            sink.recv()
        calls = eng.batch_calls
        xs = [np.full(6, i, np.float32) for i in range(1, 11)]
        for i, x in enumerate(xs, start=1):
            source.send(wire.pack_request(MsgType.DECODE, i, 0, x))
        source.send_multipart([b"a", b"b"])
        time.sleep(0.3)
        loop = Running(s)
        got = {}
        while len(got) < len(xs) + 1:
            head, body = wire.parse_reply(sink.recv())
            if head.seq != 999:  # a late copy of the join probe
                got[head.seq] = (head, body)
        loop.stop()
    finally:
        sink.close()
        source.close()
        s.close()
    for i, x in enumerate(xs, start=1):
        _check_decode(*got[i], x)
    assert got[0][0].status == ErrorCode.BAD_ENVELOPE
    assert eng.batch_calls == calls + 1 and s.recorder.coalesced == len(xs)


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


@pytest.mark.parametrize("busy_poll", [False, True])
def test_the_loop_stops_promptly(busy_poll):
    s = Server(FakeEngine(), bind="tcp://127.0.0.1:*", warmup=0, busy_poll=busy_poll)
    try:
        loop = Running(s)
        time.sleep(0.05)
        assert loop.stop() < 0.5
    finally:
        s.close()


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


def test_recorder_rings_every_coalesced_decode_and_counts_what_stats_reports():
    from runtime.recorder import Recorder

    with pytest.raises(ValueError, match="power of two"):
        Recorder(6)
    r = Recorder(8)
    r.decoded(1_000)
    r.decoded(5_000, n=3)  # one engine call for three queued requests
    assert r.latency().n == 4 and r.latency().max == 5.0 and r.latency().p50 == 5.0 and r.coalesced == 3
    for _ in range(10):
        r.decoded(2_000)
    r.multi_bin(7)
    r.error("BAD_SHAPE")
    r.control("PING")
    st = r.stats(prewarms=2, busy_poll=False, provider="cpu")
    assert st.latency_us.n == 8 and st.latency_us.max == 2.0  # the window holds the latest 8
    assert (st.decodes, st.bins, st.coalesced, st.prewarms) == (14 + 1, 14 + 7, 3, 2)
    assert st.by_type == {"PING": 1, "DECODE": 15} and st.errors == {"BAD_SHAPE": 1}
