"""The reply to one request (runtime/serve/replies.py), computed without sockets: every dtype
and batches, bad frames and values answered with errors while serving goes on, control
requests, and the streams' histories (kept per key, reset, refused requests leave them as they
were, evicted beyond the limit). ``Server.handle`` is ``Replies.answer`` plus the count; the
first test builds ``Replies`` with no server at all."""
from __future__ import annotations

import json

import numpy as np
import pytest
from fakes import FakeEngine, expected
from test_wire import BAD_FRAMES

from swapvae.runtime import wire
from swapvae.runtime.history import StreamTable
from swapvae.runtime.serve.limits import ControlLimiter
from swapvae.runtime.serve.recorder import Recorder
from swapvae.runtime.serve.replies import Replies
from swapvae.runtime.serve.server import Server
from swapvae.runtime.serve.serving import prepare
from swapvae.schemas import protocol as P
from swapvae.schemas.protocol import ErrorCode, MsgType


def test_replies_need_no_server():
    eng = FakeEngine()
    rec = Recorder(8)
    replies = Replies(prepare(eng, 4, warmup=0, prewarm=False), StreamTable(3, 5), rec, ControlLimiter(2, 2),
                      full_info=lambda key: key == b"local", stats=lambda age: rec.stats(0, False, "cpu"))
    x = np.ones(6, np.float32)
    head, body = wire.parse_reply(replies.answer(wire.pack_request(MsgType.DECODE, 1, 0, x, flags=1), b"a"))
    np.testing.assert_array_equal(wire.decode_arrays(head, body)["angle"], expected(x).angle)
    assert rec.one_bin_decodes == 1 and rec.requests == 0  # counting what was read is the loop's
    info = [P.InfoReply.model_validate_json(bytes(wire.parse_reply(replies.answer(
        wire.pack_request(MsgType.INFO, 2, 0), key))[1])) for key in (b"local", b"remote")]
    assert info[0].training_details and not info[1].training_details
    ping = [replies.answer(wire.pack_request(MsgType.PING, seq, 0), b"local") for seq in (3, 4, 5)]
    assert wire.parse_reply(ping[0])[0].msg_type == MsgType.PONG  # the peer's 2nd control request of 2 a second
    assert wire.parse_reply(ping[1])[0].status == ErrorCode.RATE_LIMITED  # the 3rd: the second's notice
    assert ping[2] is None  # beyond the notice: no reply
    assert rec.drops.rate_limited == 1 and rec.errors == {"RATE_LIMITED": 1}


# -- the server's handler, no sockets --------------------------------------------------------------

@pytest.fixture()
def server():
    s = Server(FakeEngine(), bind=None, sub="inproc://unused-sub", pub="inproc://unused-pub", warmup=2)
    yield s
    s.close()


def _reply(frame):
    head, body = wire.parse_reply(frame)
    return head, body


def test_handle_decodes_every_dtype_and_batches(server):
    x = np.array([3, 0, 1, 2, 5, 4])
    for dtype in (np.float32, np.float64, np.uint8, np.int16, np.uint16, np.int32):
        head, body = _reply(server.handle(wire.pack_request(MsgType.DECODE, 1, 2, x.astype(dtype))))
        assert head.msg_type == MsgType.DECODE_REPLY, bytes(body)
        np.testing.assert_array_equal(wire.decode_arrays(head, body)["angle"], expected(x).angle)
    xb = np.stack([x, x + 1]).astype(np.uint16)
    head, body = _reply(server.handle(wire.pack_request(MsgType.DECODE, 1, 2, xb)))
    assert head.n_bins == 2
    np.testing.assert_array_equal(wire.decode_arrays(head, body)["rates"], expected(xb).rates)


@pytest.mark.parametrize("name", BAD_FRAMES)
def test_handle_answers_bad_frames_with_errors_and_keeps_serving(server, name):
    frame, code, text = BAD_FRAMES[name]
    head, body = _reply(server.handle(frame))
    assert (head.msg_type, head.status) == (MsgType.ERROR, code)
    assert text in json.loads(bytes(body))["message"]
    head, _ = _reply(server.handle(wire.pack_request(MsgType.DECODE, 3, 0, np.ones(6, np.float32))))
    assert (head.msg_type, head.seq) == (MsgType.DECODE_REPLY, 3)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_handle_bad_values(server, bad):
    x = np.ones(6, np.float32)
    x[2] = bad
    for counts in (x, np.stack([x, x])):
        head, body = _reply(server.handle(wire.pack_request(MsgType.DECODE, 4, 0, counts)))
        assert (head.status, head.seq) == (ErrorCode.BAD_VALUE, 4)
    assert server.stats().errors == {"BAD_VALUE": 2}


def test_engine_failure_is_an_internal_error_not_a_crash():
    eng = FakeEngine()
    s = Server(eng, bind=None, sub="inproc://a", pub="inproc://b", warmup=0)
    try:
        eng.fail = RuntimeError("device lost")
        head, body = _reply(s.handle(wire.pack_request(MsgType.DECODE, 8, 0, np.ones(6, np.float32))))
        assert head.status == ErrorCode.INTERNAL and "device lost" in bytes(body).decode()
        eng.fail = None
        head, _ = _reply(s.handle(wire.pack_request(MsgType.DECODE, 9, 0, np.ones(6, np.float32))))
        assert head.status == 0
    finally:
        s.close()


def test_handle_control_messages(server):
    head, body = _reply(server.handle(wire.pack_request(MsgType.PING, 5, 6)))
    assert (head.msg_type, head.seq, head.t_client_ns, len(body)) == (MsgType.PONG, 5, 6, 0)
    head, body = _reply(server.handle(wire.pack_request(MsgType.INFO, 1, 0)))
    info = P.InfoReply.model_validate_json(bytes(body))
    assert (info.n_channels, info.content_dim, info.style_dim, info.n_classes, info.n_rates) == (6, 3, 2, 4, 5)
    assert (info.velocity_dim, info.history_bins, info.has_readout, info.protocol_version) == (2, 3, True, 2)
    assert info.manifest["files"] == {"decode.onnx": "0" * 64}
    for _ in range(5):
        server.handle(wire.pack_request(MsgType.DECODE, 1, 0, np.ones(6, np.float32)))
    server.handle(b"junk")
    head, body = _reply(server.handle(wire.pack_request(MsgType.STATS, 1, 0)))
    stats = P.StatsReply.model_validate_json(bytes(body))
    assert stats.decodes == 5 and stats.bins == 5 and stats.errors == {"BAD_HEADER": 1}
    assert stats.latency_us.n == 5 and 0 < stats.latency_us.p50 <= stats.latency_us.max
    assert stats.requests == 9 and stats.by_type == {"PING": 1, "INFO": 1, "STATS": 1, "DECODE": 5}
    assert (stats.streams, stats.streams_evicted, stats.max_streams) == (1, 0, 1024)
    assert stats.queue_us.n == 5 and stats.queue_us.max == 0  # each was served alone


# -- streams ---------------------------------------------------------------------------------------

def _decode(server, key: bytes, x, reset: bool = False, seq: int = 1):
    """(header, arrays) of a DECODE of ``x`` from the stream ``key``."""
    head, body = _reply(server.handle(wire.pack_request(MsgType.DECODE, seq, 0, x, flags=int(reset)), key))
    assert head.msg_type == MsgType.DECODE_REPLY, bytes(body)
    return head, wire.decode_arrays(head, body)


def _same(arrays, ref) -> None:
    for k, v in arrays.items():
        np.testing.assert_array_equal(v, getattr(ref, k), err_msg=k)


BINS = list(np.random.default_rng(3).integers(0, 6, (8, 6)).astype(np.float32))


def test_streams_are_kept_per_key_and_reset_starts_a_trial(server):
    assert len(server.streams) == 0  # start-up decodes used a scratch stream
    for i, x in enumerate(BINS[:4]):  # two streams interleaved: each sees its own bins only
        head, got = _decode(server, b"a", x)
        assert bool(head.flags & P.ReplyFlag.RESET_APPLIED) == (i == 0)  # a new stream starts afresh
        _same(got, expected(x, BINS[:i]))
        head, got = _decode(server, b"b", BINS[7 - i])
        _same(got, expected(BINS[7 - i], BINS[8 - i:][::-1]))
    # after RESET a stream decodes as a trial's first bin, whatever came before
    head, got = _decode(server, b"a", BINS[5], reset=True)
    assert head.flags & P.ReplyFlag.RESET_APPLIED
    _same(got, expected(BINS[5]))
    head, got = _decode(server, b"a", BINS[6])
    assert not head.flags & P.ReplyFlag.RESET_APPLIED
    _same(got, expected(BINS[6], BINS[5:6]))
    assert not np.array_equal(got["velocity"], expected(BINS[6]).velocity)  # the history matters
    # a multi-bin request is consecutive bins of the stream, RESET before its first
    head, got = _decode(server, b"a", np.stack(BINS[:3]).astype(np.int16), reset=True)
    assert head.n_bins == 3 and head.flags & P.ReplyFlag.RESET_APPLIED
    _same(got, expected(np.stack(BINS[:3])))
    _same(_decode(server, b"a", BINS[3])[1], expected(BINS[3], BINS[:3]))


def test_a_refused_request_leaves_its_stream_as_it_was(server):
    for x in BINS[:2]:
        _decode(server, b"a", x)
    bad = BINS[2].copy()
    bad[1] = np.nan
    for reset in (False, True):
        for counts in (bad, np.stack([BINS[3], bad])):
            frame = wire.pack_request(MsgType.DECODE, 3, 0, counts, flags=int(reset))
            assert _reply(server.handle(frame, b"a"))[0].status == ErrorCode.BAD_VALUE
        frame = wire.pack_request(MsgType.DECODE, 3, 0, BINS[2], flags=int(reset) | 0x10)
        assert _reply(server.handle(frame, b"a"))[0].status == ErrorCode.BAD_HEADER
    head, got = _decode(server, b"a", BINS[2])
    assert not head.flags & P.ReplyFlag.RESET_APPLIED
    _same(got, expected(BINS[2], BINS[:2]))


def test_streams_beyond_the_limit_evict_the_least_recent_and_stats_count_them():
    s = Server(FakeEngine(), bind=None, sub="inproc://e", pub="inproc://f", warmup=0, max_streams=2)
    try:
        for key in (b"a", b"b", b"a", b"c"):  # c evicts b, the least recently used
            _decode(s, key, BINS[0])
        st = s.stats()
        assert (st.streams, st.streams_evicted, st.max_streams) == (2, 1, 2)
        head, got = _decode(s, b"a", BINS[1])  # a kept its history
        assert not head.flags & P.ReplyFlag.RESET_APPLIED
        _same(got, expected(BINS[1], [BINS[0], BINS[0]]))
        head, got = _decode(s, b"b", BINS[1])  # b lost it (and evicts c)
        assert head.flags & P.ReplyFlag.RESET_APPLIED
        _same(got, expected(BINS[1]))
        assert s.stats().streams_evicted == 2
    finally:
        s.close()


def test_a_bundle_without_a_readout_serves_latents_and_rates():
    s = Server(FakeEngine(readout=False), bind=None, sub="inproc://g", pub="inproc://h", warmup=0)
    try:
        head, got = _decode(s, b"a", BINS[1])
        assert head.flags == P.ReplyFlag.RESET_APPLIED and (head.n_classes, head.velocity_dim, head.history_bins) == (
            0, 0, 0)
        assert got["angle"] is None and got["velocity"] is None
        _same(got, expected(BINS[1], readout=False))
        info = P.InfoReply.model_validate_json(bytes(_reply(s.handle(wire.pack_request(MsgType.INFO, 1, 0)))[1]))
        assert not info.has_readout and (info.n_classes, info.velocity_dim, info.history_bins) == (0, 0, 0)
    finally:
        s.close()


def test_latency_ring_wraps(server):
    s = Server(FakeEngine(), bind=None, sub="inproc://c", pub="inproc://d", warmup=0, window=8)
    try:
        for _ in range(20):
            s.handle(wire.pack_request(MsgType.DECODE, 1, 0, np.ones(6, np.float32)))
        st = s.stats()
        assert st.decodes == 20 and st.latency_us.n == 8 and st.window == 8
    finally:
        s.close()
