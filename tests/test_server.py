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
from swapvae.schemas.protocol import ErrorCode, MsgType, ReplyFlag


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
def test_queued_requests_share_engine_calls_one_bin_per_stream_in_order(busy_poll):
    """Three clients' requests queue up before the loop runs: each round decodes the head bin of
    every stream in one call, a stream's second bin waits for the next round, and a stream
    left alone has its run of bins decoded in one call. Every reply equals the stream's
    bin-by-bin decode; the replies that waited report it in queue_ns."""
    eng = CountingEngine()
    s = Server(eng, bind="tcp://127.0.0.1:*", warmup=0, prewarm=False, busy_poll=busy_poll)
    socks = [_socket(zmq.DEALER, s.endpoints["router"]) for _ in range(3)]
    rng = np.random.default_rng(0)
    sent = {0: rng.integers(0, 5, (5, 6)).astype(np.float32), 1: rng.integers(0, 5, (2, 6)).astype(np.float32),
            2: rng.integers(0, 5, (1, 6)).astype(np.float32)}
    try:
        for k, xs in sent.items():  # all queued before the loop starts
            for i, x in enumerate(xs):
                socks[k].send(wire.pack_request(MsgType.DECODE, 10 * k + i, 0, x, flags=int(i == 0)))
        socks[2].send(wire.pack_request(MsgType.PING, 100, 0))
        time.sleep(0.3)
        start = len(eng.calls)
        loop = Running(s)
        got = {k: _replies(socks[k], len(xs) + (k == 2)) for k, xs in sent.items()}
        loop.stop()
        calls = eng.calls[start:]
        assert [c[:2] for c in calls] == [("streams", 3), ("streams", 2), ("stream", 3)], calls
        assert all(len(set(ids)) == len(ids) for _, _, ids in calls)  # one bin per stream per call
        for k, xs in sent.items():
            decodes = [(h, b) for h, b in got[k] if h.msg_type == MsgType.DECODE_REPLY]
            assert [h.seq for h, _ in decodes] == [10 * k + i for i in range(len(xs))]  # in order
            for i, (h, b) in enumerate(decodes):
                _check_decode(h, b, xs[i], xs[:i])
                assert bool(h.flags & ReplyFlag.RESET_APPLIED) == (i == 0)
                assert 0 < h.queue_ns <= h.server_ns, h  # each waited for its shared call
        assert got[2][1][0].msg_type == MsgType.PONG
        st = s.stats()
        assert st.coalesced == 8 and st.latency_us.n == 8 and st.queue_us.n == 8 and st.queue_us.max > 0
        assert st.queue_us.p50 <= st.latency_us.p50

        # A second queue: client 0 sends a two-bin request, then two one-bin ones (one REQ
        # style); client 1 two one-bin ones, the first with NaN, which spoils the shared call
        # (each is then decoded alone, so only it errs and its stream is left as it was).
        bulk = rng.integers(0, 5, (2, 6)).astype(np.float32)
        more = rng.integers(0, 5, (4, 6)).astype(np.float32)
        nan = np.full(6, np.nan, np.float32)
        socks[0].send(wire.pack_request(MsgType.DECODE, 50, 0, bulk))
        socks[0].send_multipart([b"", wire.pack_request(MsgType.DECODE, 51, 0, more[0])])
        socks[0].send(wire.pack_request(MsgType.DECODE, 52, 0, more[1]))
        socks[1].send(wire.pack_request(MsgType.DECODE, 60, 0, nan))
        socks[1].send(wire.pack_request(MsgType.DECODE, 61, 0, more[2]))
        time.sleep(0.3)
        loop = Running(s)
        r0, r1 = _replies(socks[0], 3), _replies(socks[1], 2)
        loop.stop()
    finally:
        for c in socks:
            c.close()
        s.close()
    assert [h.seq for h, _ in r0] == [50, 51, 52]  # a stream's requests in arrival order
    _check_decode(*r0[0], bulk, sent[0])
    _check_decode(*r0[1], more[0], [*sent[0], *bulk])
    _check_decode(*r0[2], more[1], [*sent[0], *bulk, more[0]])
    assert r1[0][0].status == ErrorCode.BAD_VALUE and r1[0][0].seq == 60
    _check_decode(*r1[1], more[2], sent[1])


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
        calls = len(eng.calls)
        xs = [np.full(6, i, np.float32) for i in range(1, 11)]
        for i, x in enumerate(xs, start=1):  # a trial after the join probes
            source.send(wire.pack_request(MsgType.DECODE, i, 0, x, flags=int(i == 1)))
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
    for i, x in enumerate(xs, start=1):  # the SUB input is one stream: its queued bins in one call
        _check_decode(*got[i], x, xs[:i - 1])
    assert got[0][0].status == ErrorCode.BAD_ENVELOPE
    assert [c[:2] for c in eng.calls[calls:]] == [("stream", len(xs))] and s.recorder.coalesced == len(xs)


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
    from swapvae.runtime.serve.recorder import Recorder

    with pytest.raises(ValueError, match="power of two"):
        Recorder(6)
    r = Recorder(8)
    r.decoded(1_000)
    r.decoded_together(np.array([5_000, 6_000, 7_000]), np.array([1_000, 2_000, 3_000]))  # one call, three requests
    lat, queue = r.latency(), r.latency(queue=True)
    # max and mean exact; percentiles the nearest rank's histogram bucket (within 1/64)
    assert lat.n == 4 and lat.max == 7.0 and lat.mean == 4.75 and lat.p50 == pytest.approx(5.0, rel=1 / 64)
    assert r.coalesced == 3 and lat.p99 == pytest.approx(7.0, rel=1 / 64) and lat.p99 <= lat.max
    assert queue.n == 4 and queue.max == 3.0 and queue.p50 == pytest.approx(1.0, rel=1 / 64)
    for _ in range(10):
        r.decoded(2_000, 500)
    r.multi_bin(7)
    r.error("BAD_SHAPE")
    r.control("PING")
    st = r.stats(prewarms=2, busy_poll=False, provider="cpu", streams=(3, 4, 5))
    assert st.latency_us.n == 8 and st.latency_us.max == 2.0  # the window holds the latest 8
    assert st.queue_us.n == 8 and st.queue_us.max == 0.5 and st.work_us.max == st.work_us.mean == 1.5
    assert (st.decodes, st.bins, st.coalesced, st.prewarms) == (14 + 1, 14 + 7, 3, 2)
    assert (st.streams, st.streams_evicted, st.max_streams) == (3, 4, 5)
    assert st.by_type == {"PING": 1, "DECODE": 15} and st.errors == {"BAD_SHAPE": 1}
