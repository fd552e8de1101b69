"""Queued one-bin decodes sharing engine calls (runtime/serve/coalescing.py), through the
server's read path (``Server._serve``) fed from memory: which requests share a call is then
exact, with no socket and no sleep. The same over real sockets checks what does not depend on
timing: every reply right, each stream's in order, one bin per stream in a call."""
from __future__ import annotations

import numpy as np
import pytest
import zmq
from fakes import FakeEngine, QueueSource, expected
from test_server import CountingEngine, Running, _check_decode, _replies, _socket

from swapvae.runtime import wire
from swapvae.runtime.serve.server import Server
from swapvae.schemas.protocol import ErrorCode, MsgType, ReplyFlag


@pytest.fixture()
def server():
    eng = CountingEngine()
    s = Server(eng, bind=None, sub="inproc://coalesce-sub", pub="inproc://coalesce-pub", warmup=0, prewarm=False)
    yield s
    s.close()


def _decode(seq: int, x, reset: bool = False) -> bytes:
    return wire.pack_request(MsgType.DECODE, seq, 0, x, flags=int(reset))


def _by_key(src: QueueSource) -> dict[bytes, list]:
    out: dict[bytes, list] = {}
    for key, frame in src.replies:
        out.setdefault(key, []).append(wire.parse_reply(frame))
    return out


def test_queued_heads_of_several_streams_share_a_call_and_a_lone_stream_its_run(server):
    """Queued as a ROUTER fair-queues three peers: a0 b0 c0 a1 b1, then c's PING (not a decode:
    it ends the drain), then a2 a3 a4. Rounds take every stream's head: [a0 b0 c0], [a1 b1];
    after the PING, stream a alone has its run of three bins in one call."""
    eng = server.engine
    rng = np.random.default_rng(0)
    xs = {k: rng.integers(0, 5, (n, 6)).astype(np.float32) for k, n in ((b"a", 5), (b"b", 2), (b"c", 1))}
    src = QueueSource()
    order = [(b"a", 0), (b"b", 0), (b"c", 0), (b"a", 1), (b"b", 1), (b"c", None), (b"a", 2), (b"a", 3), (b"a", 4)]
    for key, i in order:
        seq = 10 * (key[0] - ord("a"))
        src.put(wire.pack_request(MsgType.PING, 100, 0) if i is None else _decode(seq + i, xs[key][i], i == 0), key)
    start = len(eng.calls)
    src.serve_all(server)
    calls = eng.calls[start:]
    assert [c[:2] for c in calls] == [("streams", 3), ("streams", 2), ("stream", 3)], calls
    assert all(len(set(ids)) == len(ids) for _, _, ids in calls)  # one bin per stream per call
    got = _by_key(src)
    for key, x in xs.items():
        decodes = [(h, b) for h, b in got[key] if h.msg_type == MsgType.DECODE_REPLY]
        seq0 = 10 * (key[0] - ord("a"))
        assert [h.seq for h, _ in decodes] == [seq0 + i for i in range(len(x))]  # in order
        for i, (h, b) in enumerate(decodes):
            _check_decode(h, b, x[i], x[:i])
            assert bool(h.flags & ReplyFlag.RESET_APPLIED) == (i == 0)
            assert 0 < h.queue_ns <= h.server_ns, h  # each waited for its shared call
    assert got[b"c"][-1][0].msg_type == MsgType.PONG
    st = server.stats()
    assert st.coalesced == 8 and st.latency_us.n == 8 and st.queue_us.n == 8 and st.requests == 9


def test_a_bulk_request_ends_the_drain_and_its_streams_later_bins_follow_it(server):
    """Stream a: a one-bin decode, a two-bin one (to the bulk lane), then two one-bin ones (behind
    it, in order); stream b: a NaN bin and a good one, drained with a's first: the NaN spoils the
    shared call, so each is answered alone and only the NaN errs, its stream left as it was."""
    rng = np.random.default_rng(1)
    first, bulk, more = (rng.integers(0, 5, s).astype(np.float32) for s in ((6,), (2, 6), (3, 6)))
    nan = np.full(6, np.nan, np.float32)
    src = QueueSource()
    src.put(_decode(1, first, True), b"a")
    src.put(_decode(10, nan), b"b")
    src.put(_decode(11, more[2]), b"b")
    src.put(_decode(2, bulk), b"a")
    src.put(_decode(3, more[0]), b"a")
    src.put(_decode(4, more[1]), b"a")
    src.serve_all(server)
    got = _by_key(src)
    assert [h.seq for h, _ in got[b"a"]] == [1, 2, 3, 4]
    _check_decode(*got[b"a"][1], bulk, [first])
    _check_decode(*got[b"a"][2], more[0], [first, *bulk])
    _check_decode(*got[b"a"][3], more[1], [first, *bulk, more[0]])
    assert got[b"b"][0][0].status == ErrorCode.BAD_VALUE and got[b"b"][0][0].seq == 10
    _check_decode(*got[b"b"][1], more[2])


def test_the_sub_inputs_queued_bins_are_one_streams_run_in_one_call(server):
    eng = server.engine
    src = QueueSource(keyed=False)
    xs = [np.full(6, i, np.float32) for i in range(1, 11)]
    for i, x in enumerate(xs, start=1):
        src.put(_decode(i, x, i == 1))
    start = len(eng.calls)
    src.serve_all(server)
    assert [c[:2] for c in eng.calls[start:]] == [("stream", len(xs))] and server.recorder.coalesced == len(xs)
    for (_, frame), i in zip(src.replies, range(1, 11), strict=True):
        _check_decode(*wire.parse_reply(frame), xs[i - 1], xs[:i - 1])


def test_a_reset_inside_a_queued_run_starts_a_new_call():
    eng = CountingEngine()
    s = Server(eng, bind=None, sub="inproc://reset-sub", pub="inproc://reset-pub", warmup=0, prewarm=False)
    try:
        src = QueueSource()
        xs = np.arange(30, dtype=np.float32).reshape(5, 6)
        for i, x in enumerate(xs):
            src.put(_decode(i, x, i in (0, 3)))
        start = len(eng.calls)
        src.serve_all(s)
        assert [c[:2] for c in eng.calls[start:]] == [("stream", 3), ("stream", 2)]
        heads = [wire.parse_reply(f)[0] for _, f in src.replies]
        assert [bool(h.flags & ReplyFlag.RESET_APPLIED) for h in heads] == [True, False, False, True, False]
        _check_decode(*wire.parse_reply(src.replies[4][1]), xs[4], xs[3:4])
    finally:
        s.close()


@pytest.mark.parametrize("busy_poll", [False, True])
def test_over_real_sockets_every_reply_is_right_and_in_order(busy_poll):
    """Three peers send before the loop starts: however the requests are found queued, every
    reply equals its stream's bin-by-bin decode, in order, and no call holds two bins of one
    stream unless they are a run of that stream alone."""
    eng = CountingEngine()
    s = Server(eng, bind="tcp://127.0.0.1:*", warmup=0, prewarm=False, busy_poll=busy_poll)
    socks = [_socket(zmq.DEALER, s.endpoints["router"]) for _ in range(3)]
    rng = np.random.default_rng(0)
    sent = {k: rng.integers(0, 5, (n, 6)).astype(np.float32) for k, n in ((0, 5), (1, 2), (2, 1))}
    try:
        for k, xs in sent.items():
            for i, x in enumerate(xs):
                socks[k].send_multipart([b"", _decode(10 * k + i, x, i == 0)] if k == 1 and i else
                                        [_decode(10 * k + i, x, i == 0)])  # a REQ-style envelope too
        loop = Running(s)
        got = {k: _replies(socks[k], len(xs)) for k, xs in sent.items()}
        loop.stop()
    finally:
        for c in socks:
            c.close()
        s.close()
    for k, xs in sent.items():
        assert [h.seq for h, _ in got[k]] == [10 * k + i for i in range(len(xs))]
        for i, (h, b) in enumerate(got[k]):
            _check_decode(h, b, xs[i], xs[:i])
    assert all(kind == "stream" or len(set(ids)) == len(ids) for kind, _, ids in eng.calls)
    assert sum(n for _, n, _ in eng.calls[1:]) == 8  # every bin decoded once (after the start-up probe)


def test_fake_source_and_engine_agree_with_the_reference():
    """The fakes themselves: a lone request through the in-memory source decodes as expected."""
    s = Server(FakeEngine(), bind=None, sub="inproc://fk-sub", pub="inproc://fk-pub", warmup=0, prewarm=False)
    try:
        src = QueueSource()
        src.put(_decode(7, np.ones(6, np.float32), True))
        src.serve_all(s)
        (key, frame), = src.replies
        head, body = wire.parse_reply(frame)
        assert key == b"a" and head.seq == 7 and head.queue_ns == 0
        np.testing.assert_array_equal(wire.decode_arrays(head, body)["angle"], expected(np.ones(6)).angle)
    finally:
        s.close()
