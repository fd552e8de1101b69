"""Where requests come from and replies go (runtime/serve/sources.py): replies to a full or
vanished peer, replies held while a pipelining peer reads, and what the stream's SUB input and
a slow subscriber lose, each counted."""
from __future__ import annotations

import time

import numpy as np
import zmq
from test_limits import _dealer

from swapvae.runtime import wire
from swapvae.runtime.serve.recorder import Recorder
from swapvae.runtime.serve.sources import RouterSource, StreamSource, Subscriptions
from swapvae.schemas.protocol import MsgType


def _read_flushing(peer: zmq.Socket, src: RouterSource, n: int) -> list[bytes]:
    """``n`` messages read by ``peer`` while ``src`` offers its held replies again, as the
    server's loop does every millisecond."""
    got, deadline = [], time.monotonic() + 5
    while len(got) < n and time.monotonic() < deadline:
        src.flush()
        if peer.poll(10):
            got.append(peer.recv())
    return got


def _router(endpoint: str):
    """A service's ROUTER with a one-message queue per peer, never blocking, refusing unknown peers."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.SNDHWM, 1)
    router.setsockopt(zmq.SNDTIMEO, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind(endpoint)
    return router


def test_replies_to_a_full_or_vanished_peer_are_dropped_and_counted():
    rec = Recorder(8)
    router = _router("inproc://full-peer")
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


def test_replies_beyond_a_full_queue_are_held_and_sent_in_order_as_the_peer_reads():
    """libzmq counts the peer's queue in messages: a client with more requests in flight than it
    holds loses nothing while it reads; held replies are bounded by bytes, beyond that dropped."""
    rec = Recorder(8)
    router = _router("inproc://held-peer")
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
