"""What a hostile or careless peer can make the server hold, and what is counted (issue 12), on
the fake engine, in-process: envelope limits, replies dropped to a full or vanished peer, the
stream's drops, control request rates, the multi-bin lane (the closed loop first, a stream's
bins in order, OVERLOADED), INFO's training details, and the recorder's incremental STATS."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import zmq

from fakes import FakeEngine, expected
from swapvae.runtime import wire
from swapvae.runtime.serve.limits import ControlLimiter, Limits, max_bins_for
from swapvae.runtime.serve.recorder import Recorder
from swapvae.runtime.serve.server import Server
from swapvae.runtime.serve.sources import RouterSource, StreamSource, Subscriptions
from swapvae.schemas.protocol import MAX_BINS, ErrorCode, InfoReply, MsgType
from test_server import Running


def _dealer(endpoint: str, **opts) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    for k, v in opts.items():
        s.setsockopt(getattr(zmq, k), v)
    s.connect(endpoint)
    return s


def _reply(frame):
    return wire.parse_reply(frame)


# -- sizes -------------------------------------------------------------------------------------------

def test_limits_follow_from_byte_budgets():
    assert max_bins_for(6) == MAX_BINS and max_bins_for(174) == (2 << 20) // (8 * 174) == 1506
    assert max_bins_for(1024) == 256 and max_bins_for(10**7) == 1
    lim = Limits.of(174, 1236)
    assert lim.max_request_bytes == 32 + 1506 * 8 * 174 == wire.max_request_bytes(174, 1506) <= (2 << 20) + 32
    assert lim.max_reply_bytes == 56 + 1506 * 1236
    # 32 MiB / ~2 MB per ROUTER peer either way; 64 MiB of bins on the SUB input (its floor)
    assert (lim.router_rcvhwm, lim.router_sndhwm, lim.sub_rcvhwm, lim.pub_sndhwm) == (16, 18, 64, 64)
    assert lim.max_frame_bytes() == lim.max_request_bytes and lim.max_frame_bytes(curve=True) == lim.max_request_bytes + 33
    small = Limits.of(6, 68)
    assert small.router_rcvhwm == (32 << 20) // small.max_request_bytes and small.max_bins == MAX_BINS
    assert Limits.of(174, 1236, max_body_bytes=64 << 20).router_rcvhwm == 16  # the floor, for bursts
    assert Limits.of(174, 1236, max_body_bytes=1 << 20).router_rcvhwm == 32


def test_envelopes_over_the_limits_are_refused_and_never_echoed():
    s = Server(FakeEngine(), bind="tcp://127.0.0.1:*", warmup=0, prewarm=False)
    c = _dealer(s.endpoints["router"])
    good = wire.pack_request(MsgType.DECODE, 7, 0, np.ones(6, np.float32))
    loop = Running(s)
    try:
        c.send_multipart([b"hop", b"", good])  # a proxy's hop and a delimiter: echoed
        got = c.recv_multipart()
        assert got[:2] == [b"hop", b""] and _reply(got[2])[0].seq == 7
        for frames, why in (([b"x" * 300, b"", good], "a routing frame of 300 bytes"),
                            ([b"h"] * 9 + [b"", good], "more than 8 routing frames"),
                            ([bytes(100_000)] * 20 + [b"", good], "a routing frame of 100000 bytes")):
            c.send_multipart(frames)
            got = c.recv_multipart()
            assert len(got) == 1, "the envelope was echoed"
            head, body = _reply(got[0])
            assert head.status == ErrorCode.BAD_ENVELOPE and why in bytes(body).decode()
        c.send(good)
        assert _reply(c.recv())[0].seq == 7  # still serving
        assert s.stats().errors == {"BAD_ENVELOPE": 3}
    finally:
        loop.stop()
        c.close()
        s.close()


def test_replies_to_a_full_or_vanished_peer_are_dropped_and_counted():
    ctx = zmq.Context.instance()
    rec = Recorder(8)
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.SNDHWM, 1)
    router.setsockopt(zmq.SNDTIMEO, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind("inproc://full-peer")
    peer = _dealer("inproc://full-peer", RCVHWM=1, ROUTING_ID=b"peer")
    src = RouterSource(router, rec, held_peer_bytes=0)  # nothing held beyond libzmq's queue
    try:
        peer.send(b"hello")
        frames = src.recv()
        for _ in range(10):  # the peer never reads: inproc queues hold 2, the rest is dropped
            src.answer(frames, b"reply")
        assert rec.drops.replies_full >= 7
        src.answer([b"nobody", b"x"], b"reply")
        assert rec.drops.replies_unroutable == 1
    finally:
        peer.close()
        router.close(linger=0)


def _read_flushing(peer: zmq.Socket, src: RouterSource, n: int) -> list[bytes]:
    """``n`` messages read by ``peer`` while ``src`` offers its held replies again, as the
    server's loop does every millisecond."""
    got, deadline = [], time.monotonic() + 5
    while len(got) < n and time.monotonic() < deadline:
        src.flush()
        if peer.poll(10):
            got.append(peer.recv())
    return got


def test_replies_beyond_a_full_queue_are_held_and_sent_in_order_as_the_peer_reads():
    """libzmq counts the peer's queue in messages: a client with more requests in flight than it
    holds loses nothing while it reads; held replies are bounded by bytes, beyond that dropped."""
    ctx = zmq.Context.instance()
    rec = Recorder(8)
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.SNDHWM, 1)
    router.setsockopt(zmq.SNDTIMEO, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind("inproc://held-peer")
    peer = _dealer("inproc://held-peer", RCVHWM=1, ROUTING_ID=b"peer")
    src = RouterSource(router, rec, held_peer_bytes=8 * 6)
    try:
        peer.send(b"hello")
        frames = src.recv()
        buf = bytearray(b"reply00")
        for i in range(12):
            buf[5:] = b"%02d" % i  # the caller's buffer is reused: held replies are copies
            src.answer(frames, buf)
        assert rec.drops.replies_full == 12 - 2 - 6 and len(src.held[b"peer"][0]) == 6  # queue 2, held 6 x 7 bytes
        assert all(envelope == [b"peer", None] for envelope, _ in src.held[b"peer"][0])  # the request is not kept
        got = _read_flushing(peer, src, 8)
        assert got == [b"reply%02d" % i for i in range(8)] and not src.held and rec.drops.replies_full == 4
        src.answer(frames, b"later")
        assert _read_flushing(peer, src, 1) == [b"later"] and not src.held
        for _ in range(4):
            src.answer(frames, b"x")
        peer.close()  # the peer goes with replies held for it: they are dropped, counted
        deadline = time.monotonic() + 5
        while src.held and time.monotonic() < deadline:
            src.flush()
            time.sleep(0.01)
        assert not src.held and rec.drops.replies_unroutable >= 1
    finally:
        peer.close()
        router.close(linger=0)


def test_the_stream_counts_what_sub_and_a_slow_subscriber_lose():
    ctx = zmq.Context.instance()
    rec = Recorder(8)
    pub = ctx.socket(zmq.XPUB)
    for opt, v in ((zmq.XPUB_MANUAL, 1), (zmq.XPUB_NODROP, 1), (zmq.SNDHWM, 2), (zmq.SNDTIMEO, 0), (zmq.LINGER, 0)):
        pub.setsockopt(opt, v)
    pub.bind("inproc://stream-out")
    subs = Subscriptions(pub, rec)
    sinks = []
    for topic, hwm in ((b"", 1000), (b"SVAE", 2), (b"other", 2)):  # inproc: a pipe holds both sides' HWMs
        sink = ctx.socket(zmq.SUB)
        sink.setsockopt(zmq.RCVHWM, hwm)
        sink.setsockopt(zmq.SUBSCRIBE, topic)
        sink.setsockopt(zmq.LINGER, 0)
        sink.connect("inproc://stream-out")
        sinks.append(sink)
    inp = ctx.socket(zmq.SUB)  # the input side is only read through _track here
    src = StreamSource(inp, pub, rec)
    try:
        deadline = time.monotonic() + 5
        while rec.subscribers < 2 and time.monotonic() < deadline:
            subs.serve()
            time.sleep(0.01)
        assert rec.subscribers == 2  # "" and "SVAE"; "other" is not the protocol's and is ignored
        got = 0
        for i in range(20):  # sinks[1] never reads; sinks[0] reads everything
            src.answer([b""], b"SVAE reply %d" % i)
            while sinks[0].poll(0):
                sinks[0].recv()
                got += 1
        while sinks[0].poll(100):
            sinks[0].recv()
            got += 1
        assert got == 20 and rec.drops.pub_full >= 1 and rec.streamed == 20
        assert not sinks[2].poll(50)  # an ignored subscription receives nothing
        for seq in (1, 2, 5, 6, 7, 20, 1, 2):  # 3 and 4 lost, then 8..19; a restart at 1 is no loss
            src.track(wire.pack_request(MsgType.DECODE, seq, 0, np.ones(6, np.float32)))
        src.track(wire.pack_request(MsgType.PING, 100, 0))  # not a bin
        src.track(wire.pack_request(MsgType.DECODE, 200, 0, np.ones(6, np.float32))[:-1])  # not whole
        src.track(wire.pack_request(MsgType.DECODE, 4, 0, np.ones((3, 6), np.int16)))  # 3 lost
        assert rec.drops.stream_gaps == 2 + 12 + 1
    finally:
        for s in (*sinks, inp):
            s.close(linger=0)
        pub.close(linger=0)


# -- control requests ---------------------------------------------------------------------------------

def test_control_requests_are_rate_limited_per_peer():
    lim = ControlLimiter(rate=10, burst=3, max_peers=2)
    ok, notice, drop = ControlLimiter.ALLOW, ControlLimiter.NOTICE, ControlLimiter.DROP
    t = 1_000_000_000
    assert [lim.check(b"a", t) for _ in range(5)] == [ok, ok, ok, notice, drop]  # one notice, then silence
    assert lim.check(b"b", t) == ok and lim.check(b"a", t + 50_000_000) == drop  # half a token back
    assert lim.check(b"a", t + 100_000_000) == ok  # one token per 100 ms
    assert lim.check(b"a", t + 100_000_000) == drop and lim.check(b"a", t + 1_000_000_001) == ok
    later = [lim.check(b"a", t + 1_000_000_001) for _ in range(6)]
    assert later == [ok, ok, notice, drop, drop, drop]  # a second after the last notice: another
    lim.check(b"c", t)  # a third peer: the least recent (b) leaves the table
    assert set(lim._buckets) == {b"a", b"c"}

    s = Server(FakeEngine(), bind=None, sub="inproc://rl-sub", pub="inproc://rl-pub", warmup=0, control_rate=5)
    try:
        replies = [s.handle(wire.pack_request(MsgType.PING, i, 0), b"a") for i in range(8)]
        assert [_reply(r)[0].status for r in replies[:6]] == [0] * 5 + [ErrorCode.RATE_LIMITED]
        assert _reply(replies[5])[0].seq == 5 and replies[6:] == [None, None]  # beyond the notice: no reply
        stats = [s.handle(wire.pack_request(MsgType.STATS, 9, 0), b"b") for _ in range(2)]  # another peer
        assert _reply(stats[0])[0].status == 0 and _reply(stats[1])[0].status == ErrorCode.RATE_LIMITED  # 5 tokens
        head, _ = _reply(s.handle(wire.pack_request(MsgType.DECODE, 1, 0, np.ones(6, np.float32)), b"a"))
        assert head.status == 0  # decodes are never rate-limited
        st = s.stats()
        assert st.errors == {"RATE_LIMITED": 2} and st.dropped.rate_limited == 2
    finally:
        s.close()


def test_info_has_the_training_details_only_for_local_or_authenticated_peers():
    with pytest.raises(ValueError, match="can be reached from other machines"):
        Server(FakeEngine(), bind="tcp://0.0.0.0:*", warmup=0)
    with pytest.raises(ValueError, match="is on another machine"):
        Server(FakeEngine(), bind=None, sub="tcp://10.0.0.1:6000", pub="tcp://127.0.0.1:*", warmup=0)
    for bind, full in (("tcp://127.0.0.1:*", True), ("tcp://0.0.0.0:*", False)):
        s = Server(FakeEngine(), bind=bind, warmup=0, insecure=not full)
        c = _dealer(s.endpoints["router"].replace("0.0.0.0", "127.0.0.1"))
        loop = Running(s)
        try:
            c.send(wire.pack_request(MsgType.INFO, 1, 0))
            info = InfoReply.model_validate_json(bytes(_reply(c.recv())[1]))
        finally:
            loop.stop()
            c.close()
            s.close()
        assert info.training_details is full and info.max_bins == MAX_BINS and info.max_request_bytes > 0
        assert info.manifest["files"] == {"decode.onnx": "0" * 64}


# -- the multi-bin lane ---------------------------------------------------------------------------------

class SlowEngine(FakeEngine):
    """The fake, with 50 us per bin and a record of every call's bins."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def decode_stream(self, stream, counts, reset=False):
        bins = len(counts) if np.ndim(counts) == 2 else 1
        self.calls.append(bins)
        time.sleep(50e-6 * bins)
        return super().decode_stream(stream, counts, reset)


def test_one_bin_requests_never_wait_behind_bulk_work_and_streams_stay_in_order():
    eng = SlowEngine()
    s = Server(eng, bind="tcp://127.0.0.1:*", warmup=0, prewarm=False, slice_ns=2_000_000)
    bulk, closed = _dealer(s.endpoints["router"]), _dealer(s.endpoints["router"])
    rng = np.random.default_rng(1)
    big = [rng.integers(0, 5, (400, 6)).astype(np.float32) for _ in range(3)]
    after = rng.integers(0, 5, (6,)).astype(np.float32)
    x = np.ones(6, np.float32)
    loop = Running(s)
    try:
        for i, b in enumerate(big):  # 3 x 400 bins x 50 us: 60 ms of bulk work
            bulk.send(wire.pack_request(MsgType.DECODE, i, 0, b, flags=int(i == 0)))
        bulk.send(wire.pack_request(MsgType.DECODE, 3, 0, after))  # the bulk stream's next bin waits for its turn
        time.sleep(0.005)
        waited = []
        for k in range(5):  # the closed loop, meanwhile
            t = time.perf_counter()
            closed.send(wire.pack_request(MsgType.DECODE, 100 + k, 0, x))
            head, body = _reply(closed.recv())
            waited.append(time.perf_counter() - t)
            assert head.seq == 100 + k and head.status == 0
        replies = [_reply(bulk.recv()) for _ in range(4)]
    finally:
        loop.stop()
        bulk.close()
        closed.close()
        s.close()
    assert max(waited) < 0.03, waited  # one slice (~2 ms) at most, and scheduling; not the 60 ms of bulk
    assert [h.seq for h, _ in replies] == [0, 1, 2, 3]
    for i, (head, body) in enumerate(replies[:3]):
        got, ref = wire.decode_arrays(head, body), expected(big[i], np.concatenate(big[:i]) if i else ())
        for k in got:
            np.testing.assert_array_equal(got[k], getattr(ref, k), err_msg=k)
        assert head.queue_ns <= head.server_ns
    _, body = replies[3]
    np.testing.assert_array_equal(wire.decode_arrays(replies[3][0], body)["velocity"],
                                  expected(after, np.concatenate(big)).velocity)
    assert max(eng.calls) <= 60 and s.stats().bulk.slices >= 3 * 400 // 60


def test_a_bulk_request_that_fails_midway_leaves_its_stream_as_it_was_and_the_lane_is_bounded():
    s = Server(SlowEngine(), bind="tcp://127.0.0.1:*", warmup=0, prewarm=False, slice_ns=500_000)
    c = _dealer(s.endpoints["router"])
    rng = np.random.default_rng(2)
    first, big = rng.integers(0, 5, (6,)).astype(np.float32), rng.integers(0, 5, (100, 6)).astype(np.float32)
    big[70, 2] = np.nan  # in a later slice than the first
    nxt = rng.integers(0, 5, (6,)).astype(np.float32)
    loop = Running(s)
    try:
        c.send(wire.pack_request(MsgType.DECODE, 1, 0, first, flags=1))
        assert _reply(c.recv())[0].status == 0
        c.send(wire.pack_request(MsgType.DECODE, 2, 0, big))
        head, body = _reply(c.recv())
        assert head.status == ErrorCode.BAD_VALUE and "bins counted from bin" in bytes(body).decode()
        c.send(wire.pack_request(MsgType.DECODE, 3, 0, nxt))
        head, body = _reply(c.recv())
        np.testing.assert_array_equal(wire.decode_arrays(head, body)["velocity"], expected(nxt, [first]).velocity)
        # a lane that holds its limit: the next multi-bin request is OVERLOADED, nothing decoded
        s.bundle.limits = dataclasses.replace(s.bundle.limits, bulk_peer_bytes=len(wire.pack_request(
            MsgType.DECODE, 0, 0, big[:50])) + 10)
        ok = np.nan_to_num(big)
        for seq in (4, 5):
            c.send(wire.pack_request(MsgType.DECODE, seq, 0, ok[:50]))
        heads = sorted((_reply(c.recv())[0] for _ in range(2)), key=lambda h: h.seq)
        assert heads[0].status == 0 and heads[1].status == ErrorCode.OVERLOADED
        assert s.stats().errors == {"BAD_VALUE": 1, "OVERLOADED": 1} and s.stats().bulk.pending == 0
    finally:
        loop.stop()
        c.close()
        s.close()


# -- STATS ---------------------------------------------------------------------------------------------

def test_stats_histograms_follow_the_ring_through_wraps():
    """Folded a little at a time or not at all between wraps, the summaries equal those of the
    window's exact values, up to a bucket (1/64) for the percentiles."""
    rng = np.random.default_rng(5)
    r = Recorder(64)
    srv, que = [], []
    for step in range(60):
        n = int(rng.choice([1, 3, 40, 150]))
        s_ns = rng.lognormal(11, 1, n).astype(np.int64)
        q_ns = (s_ns * rng.uniform(0, 1, n)).astype(np.int64)
        if step % 3:
            for a, b in zip(s_ns, q_ns):
                r.decoded(int(a), int(b))
        else:
            r.decoded_together(s_ns, q_ns)
        srv += s_ns.tolist()
        que += q_ns.tolist()
        if step % 4 == 0:
            continue  # no STATS this time: the next fold covers more (or rebuilds)
        lat, queue = r.latency(), r.latency(queue=True)
        w, wq = np.array(srv[-64:]), np.array(que[-64:])
        assert lat.n == len(w) and lat.max == w.max() / 1e3 and lat.mean == pytest.approx(w.mean() / 1e3)
        assert queue.max == wq.max() / 1e3 and r._summaries()[2].max == (w - wq).max() / 1e3
        for p, got in ((50, lat.p50), (99, lat.p99)):
            exact = np.sort(w)[max(0, int(np.ceil(p / 100 * len(w))) - 1)] / 1e3
            assert got == pytest.approx(exact, rel=1 / 64), p
