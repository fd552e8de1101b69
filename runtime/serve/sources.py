"""Where requests come from and where replies go: one class per way in, each knowing only its
envelope. The serving loop (runtime/server.py) reads a message with ``recv``, finds the request
frame with ``request``, and sends the reply with ``answer``; every drop is counted in the
``Recorder``'s ``drops``.

- ``RouterSource``: request/reply. [identity, (hops..., empty delimiter,) request] in, the same
  envelope and the reply out. An envelope beyond ``MAX_ENVELOPE_FRAMES`` frames, or with a frame
  over ``MAX_ENVELOPE_FRAME_BYTES`` before the request, is refused (BAD_ENVELOPE to the identity
  alone: nothing of it is echoed) and the rest of the message is read and freed frame by frame.
  The socket is ``ZMQ_ROUTER_MANDATORY``: a reply that finds the peer's queue full or the peer
  gone raises instead of vanishing. libzmq counts that queue in messages, sized for the largest
  reply, so a client with more small requests in flight than it holds can fill it while it
  reads: such replies are held here (``held``, at most ``HELD_PEER_BYTES`` a peer and
  ``HELD_BYTES`` in all), the peer's later replies queue behind them, and ``flush`` sends them
  in order as the peer reads. Beyond the budget (a client that does not read) a reply is
  dropped and counted; one to a peer that has gone, too.
- ``StreamSource``: each frame on SUB is a request of the one stream ``STREAM_KEY``; its reply
  is published on an XPUB socket with ``ZMQ_XPUB_NODROP``, so a subscriber whose queue has
  just filled makes the send fail: that is counted (``pub_full``) and the reply sent again in
  the default lossy way, which the other subscribers receive. libzmq then skips that
  subscriber without a word until its queue drains, so ``pub_full`` counts the times a
  subscriber fell behind, not the replies it lost (it sees those as gaps in ``seq``). Gaps in
  the ``seq`` of the DECODE frames that arrive count the bins the SUB side lost (its queue
  drops silently when full).
- ``Subscriptions``: the XPUB in manual mode: only subscriptions to ``""`` and ``SVAE`` (the
  protocol's) are applied, so no subscriber can grow the subscription table.
- ``ZapHandler``: libzmq's questions about CURVE handshakes (RFC 27), answered from the
  allow-list inside the serving loop (a source like the others: no thread), so a client whose
  key is not listed never completes its handshake and gets nothing, not even an error.
"""
from __future__ import annotations

from collections import deque

import zmq
from zmq.utils import z85

from swapvae.runtime.serve.limits import HELD_BYTES, HELD_PEER_BYTES, MAX_ENVELOPE_FRAME_BYTES, MAX_ENVELOPE_FRAMES
from swapvae.runtime.serve.recorder import Recorder
from swapvae.runtime.wire import whole_decode_seq
from swapvae.schemas.protocol import MAGIC

STREAM_KEY = b""  # the SUB input's stream (a ROUTER identity is 1 to 255 bytes, never empty)
TOPICS = (b"", MAGIC)  # the subscriptions the protocol defines
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq sends ZAP requests (RFC 27)
# Plain ints: arithmetic on zmq's IntFlag constants costs a microsecond or two per use
_SNDMORE, _RCVMORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.RCVMORE), int(zmq.NOBLOCK)
_EHOSTUNREACH = zmq.EHOSTUNREACH
MAX_SEQ_GAP = 1 << 20  # a bigger jump in a stream's seq is a restart of its publisher, not a loss


class Refused:
    """Stands in a message's place of its request when the envelope broke the limits."""

    def __init__(self, frames: int, reason: str):
        self.frames, self.reason = frames, reason


class RouterSource:
    """Request/reply on a ROUTER. The identity (``frames[0]``) is the stream's key."""
    keyed = True

    def __init__(self, sock: zmq.Socket, recorder: Recorder, held_peer_bytes: int = HELD_PEER_BYTES,
                 held_bytes: int = HELD_BYTES):
        self.sock, self.get, self.fd = sock, sock.getsockopt, sock.getsockopt(zmq.FD)
        self._recv, self._send, self._drops = sock.recv, sock.send, recorder.drops
        # identity -> [replies its full queue could not take yet, as (frames, reply), their bytes]
        self.held: dict[bytes, list] = {}
        self._held_total, self._held_peer_bytes, self._held_bytes = 0, held_peer_bytes, held_bytes

    def recv(self, flags: int = 0) -> list:
        # A ROUTER message always has an identity and a body, so RCVMORE is first asked after
        # the body (recv_multipart asks after every frame, and each ask costs on the hot path).
        # Copied into bytes: receiving without a copy (a zmq.Frame) saves a bulk request's copy
        # (~0.4 ms for 1 MB) but made the one-bin path 15 us slower in-server (latency_ab), and
        # a zmq.Frame as a memoryview slice assignment's source crashes pyzmq 27.
        recv = self._recv
        frames = [recv(flags), recv(flags)]  # the parts of a message arrive together
        if self.get(_RCVMORE):
            self._more(frames)
        return frames

    def _more(self, frames: list) -> None:
        """Read the rest of a longer message, keeping at most the envelope's limit of frames,
        every one but the last (the request) no bigger than a routing id."""
        recv, get, n, reason = self._recv, self.get, 2, None
        while get(_RCVMORE):
            n += 1
            if reason is not None:  # past the limits: read and free, keep nothing
                recv(copy=False)
                continue
            if len(frames[-1]) > MAX_ENVELOPE_FRAME_BYTES:
                reason = f"a routing frame of {len(frames[-1])} bytes (at most {MAX_ENVELOPE_FRAME_BYTES})"
            elif n > MAX_ENVELOPE_FRAMES + 1:
                reason = f"more than {MAX_ENVELOPE_FRAMES} routing frames"
            if reason is None:
                frames.append(recv())
            else:
                recv(copy=False)
                del frames[1:]
        if reason is not None:
            frames.append(Refused(n, reason))

    @staticmethod
    def _cut(frames: list) -> int:
        return frames.index(b"", 1) + 1 if b"" in frames[1:] else 1

    def request(self, frames: list):
        """The request frame of a message, or None when its envelope is wrong."""
        if len(frames) == 2:
            body = frames[1]
            return None if body.__class__ is Refused else body
        body = frames[self._cut(frames):]
        return body[0] if len(body) == 1 else None

    def envelope_error(self, frames: list) -> str:
        if frames[-1].__class__ is Refused:
            refused = frames[-1]
            return f"the routing envelope breaks the limits: {refused.reason}; a message of {refused.frames} frames"
        return f"a request is one frame after the envelope; got {len(frames) - self._cut(frames)} frames"

    def answer(self, frames: list, reply, copy: bool = True) -> None:
        if self.held and frames[0] in self.held:  # behind the peer's held replies: keep its order
            self._hold(frames, reply, copy)
            return
        try:
            self._deliver(frames, reply, copy)
        except zmq.Again:  # the peer's queue is full
            self._hold(frames, reply, copy)
        except zmq.ZMQError as e:
            if e.errno != _EHOSTUNREACH:
                raise
            self._drops.replies_unroutable += 1  # the peer has gone

    def _deliver(self, frames: list, reply, copy: bool) -> None:
        # Two plain sends for the usual [identity, reply]: send_multipart's per-call checks cost
        # a measurable share of a decode. A refused envelope is answered to its identity alone.
        # A big reply (copy=False) is handed to libzmq as it is: copying megabytes here would
        # hold up the loop. With ROUTER_MANDATORY a full queue raises at the identity frame,
        # before anything is sent.
        if len(frames) == 2:
            self._send(frames[0], _SNDMORE)
            if copy:
                self._send(reply)
            else:
                self._send(reply, copy=False)
        else:
            self.sock.send_multipart(frames[:self._cut(frames)] + [reply], copy=copy)

    def _hold(self, frames: list, reply, copy: bool) -> None:
        peer = self.held.get(frames[0])
        size = len(reply)
        if (peer[1] if peer else 0) + size > self._held_peer_bytes or self._held_total + size > self._held_bytes:
            self._drops.replies_full += 1  # a client that does not read: dropped, counted
            return
        if copy:  # the caller reuses its buffer (batched replies)
            reply = bytes(reply)
        if peer is None:
            peer = self.held[frames[0]] = [deque(), 0]
        peer[0].append((frames[:-1] + [None], reply))  # the envelope only: the request is not kept
        peer[1] += size
        self._held_total += size

    def flush(self) -> None:
        """Send held replies, each peer's in order, while their queues take them."""
        for key in list(self.held):
            queue, size = self.held[key]
            try:
                while queue:
                    frames, reply = queue[0]
                    self._deliver(frames, reply, False)
                    queue.popleft()
                    size -= len(reply)
                    self._held_total -= len(reply)
            except zmq.Again:  # still full: the peer has not read yet
                pass
            except zmq.ZMQError as e:
                if e.errno != _EHOSTUNREACH:
                    raise
                self._drops.replies_unroutable += len(queue)  # the peer has gone
                self._held_total -= size
                queue.clear()
            if queue:
                self.held[key][1] = size
            else:
                del self.held[key]


class StreamSource:
    """Streaming: each frame received on SUB is a request; its reply is published on the XPUB.
    All of them are one stream (``STREAM_KEY``)."""
    keyed = False

    def __init__(self, sub: zmq.Socket, pub: zmq.Socket, recorder: Recorder):
        self.sock, self.get, self.fd = sub, sub.getsockopt, sub.getsockopt(zmq.FD)
        self._recv, self.pub, self._publish, self._recorder = sub.recv, pub, pub.send, recorder
        self._drops = recorder.drops
        self._last_seq = None

    def recv(self, flags: int = 0) -> list:
        frames = [self._recv(flags)]
        if self.get(_RCVMORE):  # a multi-frame message: refused; read and free the rest
            n = 1
            while self.get(_RCVMORE):
                self._recv(copy=False)
                n += 1
            frames.append(Refused(n, "multi-frame"))
        else:
            self.track(frames[0])
        return frames

    def track(self, frame) -> None:
        """Count the bins lost before this one: a DECODE frame (whole: its length agrees with its
        header) whose seq skips values after the last one's. A lower seq is a restart of the
        publisher, not a loss; other frames say nothing about the stream. At arrival, so a bin
        refused later (OVERLOADED, BAD_VALUE) is not counted lost."""
        seq = whole_decode_seq(frame)
        if seq is None:
            return
        last, self._last_seq = self._last_seq, seq
        if last is not None and last < seq - 1 and seq - last <= MAX_SEQ_GAP:
            self._drops.stream_gaps += seq - last - 1

    @staticmethod
    def request(frames: list):
        return frames[0] if len(frames) == 1 else None

    @staticmethod
    def envelope_error(frames: list) -> str:
        return f"a streamed bin is one frame; got {frames[-1].frames} frames"

    def answer(self, frames: list, reply, copy: bool = True) -> None:
        try:
            self._publish(reply, copy=copy)
        except zmq.Again:  # a subscriber's queue is full: count it, and publish to the others
            self._drops.pub_full += 1
            self.pub.setsockopt(zmq.XPUB_NODROP, 0)
            try:
                self._publish(reply, copy=copy)
            finally:
                self.pub.setsockopt(zmq.XPUB_NODROP, 1)
        self._recorder.streamed += 1


class Subscriptions:
    """The XPUB's subscription messages (manual mode): apply those to the protocol's topics,
    ignore others, count the subscribers. A source of the serving loop."""
    keyed = None  # serves itself (``serve``): no requests, no stream

    def __init__(self, pub: zmq.Socket, recorder: Recorder):
        self.sock, self.get, self.fd = pub, pub.getsockopt, pub.getsockopt(zmq.FD)
        self._recorder = recorder

    def serve(self) -> None:
        sock = self.sock
        while True:
            try:
                msg = sock.recv(_NOBLOCK)
            except zmq.Again:
                return
            while sock.getsockopt(_RCVMORE):  # not a subscription message: drop it
                sock.recv(copy=False)
            if msg[:1] in (b"\x00", b"\x01") and msg[1:] in TOPICS:
                on = msg[0] == 1
                sock.setsockopt(zmq.SUBSCRIBE if on else zmq.UNSUBSCRIBE, msg[1:])
                self._recorder.subscribers += 1 if on else -1


class ZapHandler:
    """Answers libzmq's ZAP requests from the allow-list; one REP socket, read by the serving
    loop (``fd``, ``get`` and ``serve``, as a source). Calls ``on_deny`` for each refusal."""
    keyed = None  # serves itself (``serve``): no requests, no stream

    def __init__(self, context: zmq.Context, allowed: set[bytes], on_deny=None):
        self.allowed = {z85.decode(k) for k in allowed}  # ZAP carries the raw 32-byte key
        self.sock = context.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)  # before any CURVE socket binds: without a handler libzmq lets everyone in
        self.get, self.fd = self.sock.getsockopt, self.sock.getsockopt(zmq.FD)
        self._on_deny = on_deny

    def serve(self) -> None:
        while True:
            try:
                msg = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.sock.send_multipart(self.answer(msg))

    def answer(self, msg: list) -> list:
        """A ZAP reply: 200 for a CURVE handshake with an allowed key, 400 for anything else."""
        version, request_id = (msg + [b"", b""])[:2]
        ok = len(msg) == 7 and version == b"1.0" and msg[5] == b"CURVE" and msg[6] in self.allowed
        if not ok and self._on_deny is not None:
            self._on_deny()
        return [b"1.0", request_id, b"200" if ok else b"400", b"OK" if ok else b"not on the allow-list",
                z85.encode(msg[6]) if ok else b"", b""]

    def close(self) -> None:
        self.sock.close(linger=0)
