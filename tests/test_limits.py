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
from test_server import Running

from swapvae.runtime import wire
from swapvae.runtime.serve.limits import ControlLimiter, Limits, max_bins_for
from swapvae.runtime.serve.server import Server
from swapvae.schemas.protocol import MAX_BINS, ErrorCode, InfoReply, MsgType


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
    assert lim.max_frame_bytes() == lim.max_request_bytes
    assert lim.max_frame_bytes(curve=True) == lim.max_request_bytes + 33
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
        self.calls, self.streams = [], []

    def decode_stream(self, stream, counts, reset=False):
        bins = len(counts) if np.ndim(counts) == 2 else 1
        self.calls.append(bins)
        self.streams.append(id(stream))
        time.sleep(50e-6 * bins)
        return super().decode_stream(stream, counts, reset)


def test_one_bin_requests_never_wait_behind_bulk_work_and_streams_stay_in_order():
    eng = SlowEngine()
    s = Server(eng, bind="tcp://127.0.0.1:*", warmup=0, prewarm=False, slice_ns=2_000_000)
    bulk, closed = _dealer(s.endpoints["router"]), _dealer(s.endpoints["router"])
    rng = np.random.default_rng(1)
    big = [rng.integers(0, 5, (1000, 6)).astype(np.float32) for _ in range(3)]
    after = rng.integers(0, 5, (6,)).astype(np.float32)
    x = np.ones(6, np.float32)
    loop = Running(s)
    try:
        for i, b in enumerate(big):  # 3 x 1000 bins x 50 us: 150 ms of bulk work
            bulk.send(wire.pack_request(MsgType.DECODE, i, 0, b, flags=int(i == 0)))
        bulk.send(wire.pack_request(MsgType.DECODE, 3, 0, after))  # the bulk stream's next bin waits for its turn
        while not eng.calls or max(eng.calls) == 1:  # until the bulk work has begun
            time.sleep(0.001)
        for k in range(5):  # the closed loop, meanwhile
            closed.send(wire.pack_request(MsgType.DECODE, 100 + k, 0, x))
            head, body = _reply(closed.recv())
            assert head.seq == 100 + k and head.status == 0
        replies = [_reply(bulk.recv()) for _ in range(4)]
    finally:
        loop.stop()
        bulk.close()
        closed.close()
        s.close()
    # the closed loop's bins were decoded between slices of the bulk work, not after all of it
    bulk_stream = eng.streams[eng.calls.index(max(eng.calls))]
    last_slice = max(i for i, s in enumerate(eng.streams) if s == bulk_stream and eng.calls[i] > 1)
    closed_decodes = [i for i, s in enumerate(eng.streams) if s not in (bulk_stream, eng.streams[0])]
    assert len(closed_decodes) == 5 and max(closed_decodes) < last_slice, (closed_decodes, last_slice)
    assert [h.seq for h, _ in replies] == [0, 1, 2, 3]
    for i, (head, body) in enumerate(replies[:3]):
        got, ref = wire.decode_arrays(head, body), expected(big[i], np.concatenate(big[:i]) if i else ())
        for k in got:
            np.testing.assert_array_equal(got[k], getattr(ref, k), err_msg=k)
        assert head.queue_ns <= head.server_ns
    _, body = replies[3]
    np.testing.assert_array_equal(wire.decode_arrays(replies[3][0], body)["velocity"],
                                  expected(after, np.concatenate(big)).velocity)
    assert max(eng.calls) <= 60 and s.stats().bulk.slices >= 3 * 1000 // 60


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
