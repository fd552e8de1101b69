"""The lanes behind the closed loop (runtime/serve/lanes.py), each tested alone: built on
``Replies`` and a recorder, with an in-memory source, no server and no sockets."""
from __future__ import annotations

import dataclasses
import re
import time

import numpy as np
import pytest
from fakes import FakeEngine, QueueSource, expected

from swapvae.runtime import wire
from swapvae.runtime.history import StreamTable
from swapvae.runtime.serve.lanes import MIN_SLICE_BINS, BulkLane, ControlLane
from swapvae.runtime.serve.limits import ControlLimiter
from swapvae.runtime.serve.recorder import Recorder
from swapvae.runtime.serve.replies import Replies
from swapvae.runtime.serve.serving import prepare
from swapvae.schemas.protocol import ErrorCode, MsgType


@pytest.fixture()
def replies():
    eng = FakeEngine()
    rec = Recorder(8)
    return Replies(prepare(eng, 4, warmup=0, prewarm=False), StreamTable(3, 5), rec, ControlLimiter(1000, 1000),
                   stats=lambda age: rec.stats(0, False, "cpu"))


def _submit(lane: BulkLane, src: QueueSource, key: bytes, seq: int, x: np.ndarray, reset: bool = False):
    frame = wire.pack_request(MsgType.DECODE, seq, 0, x, flags=int(reset))
    req = wire.parse_request(frame, 6)
    return lane.submit(key, src, [key, frame], req, len(frame), time.perf_counter_ns())


def test_control_lane_answers_a_few_per_turn_in_order_and_drops_beyond_its_bound(replies):
    lane, src = ControlLane(replies, replies.recorder), QueueSource()
    now = time.perf_counter_ns()
    for seq in range(20):
        lane.add(src, [b"a", None], wire.pack_request(MsgType.PING, seq, 0), b"a", now)
    lane.add(src, [b"a", None], None, b"a", now)  # an envelope refused as it was read
    lane.step()
    assert [wire.parse_reply(f)[0].seq for _, f in src.replies] == list(range(ControlLane.PER_TURN))
    while lane.items:
        lane.step()
    heads = [wire.parse_reply(f)[0] for _, f in src.replies]
    assert [h.seq for h in heads[:20]] == list(range(20)) and heads[20].status == ErrorCode.BAD_ENVELOPE
    lane.items.extend([None] * ControlLane.MAX_ITEMS)  # full
    lane.add(src, [b"a", None], wire.pack_request(MsgType.PING, 99, 0), b"a", now)
    assert replies.recorder.drops.backlog == 1 and len(lane.items) == ControlLane.MAX_ITEMS


def test_bulk_lane_serves_a_job_in_slices_and_streams_take_turns(replies):
    lane, src = BulkLane(replies, replies.recorder), QueueSource()
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 5, (3 * MIN_SLICE_BINS, 6)).astype(np.float32), rng.integers(0, 5, (9, 6)).astype(np.float32)
    assert _submit(lane, src, b"a", 1, a, True) is None and _submit(lane, src, b"b", 2, b, True) is None
    order = []
    while lane.queues:
        order.append(next(iter(lane.queues)))
        lane.step()
    assert order[:3] == [b"a", b"b", b"a"]  # one slice each, in turn
    got = {key: wire.parse_reply(f) for key, f in src.replies}
    for key, x in ((b"a", a), (b"b", b)):
        arrays = wire.decode_arrays(*got[key])
        for name, v in arrays.items():
            np.testing.assert_array_equal(v, getattr(expected(x), name), err_msg=name)
    assert lane.slices == len(order) and lane.bytes == 0 and replies.recorder.batches == 2


def test_bulk_lane_refuses_beyond_its_bytes_and_a_failed_job_leaves_its_stream_as_it_was(replies):
    lane, src = BulkLane(replies, replies.recorder), QueueSource()
    first = np.ones(6, np.float32)
    replies.answer(wire.pack_request(MsgType.DECODE, 1, 0, first, flags=1), b"a")
    bad = np.ones((3 * MIN_SLICE_BINS, 6), np.float32)
    bad[-1, 0] = np.nan  # after the first slice
    assert _submit(lane, src, b"a", 2, bad) is None
    while lane.queues:
        lane.step()
    head, body = wire.parse_reply(src.replies[0][1])
    assert head.status == ErrorCode.BAD_VALUE and lane.slices >= 1  # a slice done before the failed one
    start = int(re.search(r"bins counted from bin (\d+) of the request", bytes(body).decode())[1])
    assert 0 < start <= len(bad) - 1  # the failed slice's first bin: the NaN is in it
    head, body = wire.parse_reply(replies.answer(wire.pack_request(MsgType.DECODE, 3, 0, first), b"a"))
    np.testing.assert_array_equal(wire.decode_arrays(head, body)["velocity"], expected(first, [first]).velocity)
    replies.bundle.limits = dataclasses.replace(replies.bundle.limits, bulk_peer_bytes=100)
    reply = _submit(lane, src, b"a", 4, np.ones((4, 6), np.float32))
    assert wire.parse_reply(reply)[0].status == ErrorCode.OVERLOADED and not lane.queues
