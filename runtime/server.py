"""The decoding service: ``swapvae serve BUNDLE``.

One thread, one engine, two ways in:
- request/reply on a ROUTER socket (``--bind``): any number of DEALER or REQ clients. A ROUTER
  never waits for a client, so a client that vanishes or drops a reply cannot wedge the server
  or anyone else (a REP socket would);
- streaming (``--sub`` and ``--pub``): bins arriving on a SUB socket are decoded and the reply
  frames published on a PUB socket.

Every frame gets exactly one reply; a bad request gets an ERROR reply naming the problem and
nothing a client sends can stop the loop. The hot path (one float32 bin of the bundle's
width, recognised by ``wire.OneBinRequests``) is one engine call, one join into the reply
frame and one write into the ``Recorder``'s ring of processing times; everything else (other
dtypes, batches, control requests, errors) takes the general path, which is still cheap.

How the loop is organised (``Server.run``): one loop serves every mode. It asks its wait
strategy for the sources that may have input: ``BlockingWait`` (the default) sleeps in
select() on the sockets until one signals, a planned pre-warm is due or the stop flag wants a
look, so it costs nothing while idle; ``SpinWait`` (``--busy-poll``) polls the sockets and
yields the core between polls, which removes the scheduler wake-up from every request at the
price of one core. Each source (``RouterSource``, ``StreamSource``) knows only its envelope:
where the request frame is and how its reply goes back. ``_serve`` receives one message; when
more are queued behind it (many clients, a pipelining one, a burst on the stream) it takes up
to ``MAX_BATCH`` and the one-bin decodes among them share one engine call, while a lone
request never waits for company. Pre-warming is ``runtime/prewarm.py``'s planner, told of
every request served and asked when to wake; framing is all in ``runtime/wire.py``; counters
and latencies are in ``runtime/recorder.py``.

Where coming work plugs in: per-client decoding state would be looked up by the ROUTER
identity (``frames[0]``) where ``_serve`` has the message and its source; a priority lane extends
``_serve_queue``, which already splits one-bin requests from the rest and decodes them first
(bulk requests would be kept there and served a slice per turn of the loop); byte limits and
high-water marks are socket options in ``_socket``; queue wait and processing time would be
timed where ``_serve`` receives and passed to the ``Recorder``, which is also where STATS could
be kept incrementally; a SIGHUP reload would set a flag like ``stop`` and call ``_load``.
"""
from __future__ import annotations

import gc
import json
import os
import select
import signal
import sys
import time

import numpy as np
import zmq

from runtime import wire
from runtime.prewarm import WarmPlanner
from runtime.recorder import Recorder
from schemas.protocol import DType, ErrorCode, InfoReply, MsgType, StatsReply

SERVER_NAME = "swapvae-runtime/1"
MAX_BATCH = 32  # queued one-bin decodes served by one engine call
POLL_S = 0.25  # how often an idle loop looks at the stop flag
_DECODE, _PING, _INFO, _STATS = int(MsgType.DECODE), int(MsgType.PING), int(MsgType.INFO), int(MsgType.STATS)
# Plain ints: arithmetic on zmq's IntFlag constants costs a microsecond or two per use
_SNDMORE, _NOBLOCK, _EVENTS, _POLLIN, _RCVMORE = (int(zmq.SNDMORE), int(zmq.NOBLOCK), int(zmq.EVENTS),
                                                  int(zmq.POLLIN), int(zmq.RCVMORE))
_clock = time.perf_counter_ns


# -- where requests come from and replies go -----------------------------------------------------

class RouterSource:
    """Request/reply: [identity, (frames up to an empty delimiter,) request] in; the same
    envelope and the reply out. A REQ client puts the empty delimiter there."""

    def __init__(self, sock: zmq.Socket):
        self.sock, self.get, self.fd = sock, sock.getsockopt, sock.getsockopt(zmq.FD)
        self._recv, self._send = sock.recv, sock.send

    def recv(self, flags: int = 0) -> list:
        # A ROUTER message always has an identity and a body, so RCVMORE is first asked after
        # the body (recv_multipart asks after every frame, and each ask costs on the hot path).
        recv = self._recv
        frames = [recv(flags), recv(flags)]  # the parts of a message arrive together
        while self.get(_RCVMORE):
            frames.append(recv(flags))
        return frames

    @staticmethod
    def _cut(frames: list) -> int:
        return frames.index(b"", 1) + 1 if b"" in frames[1:] else 1

    def request(self, frames: list):
        """The request frame of a message, or None when its envelope is wrong."""
        if len(frames) == 2:
            return frames[1]
        body = frames[self._cut(frames):]
        return body[0] if len(body) == 1 else None

    def envelope_error(self, frames: list) -> str:
        return f"a request is one frame after the envelope; got {len(frames) - self._cut(frames)} frames"

    def answer(self, frames: list, reply) -> None:
        # Two plain sends for the usual [identity, reply]: send_multipart's per-call checks cost
        # a measurable share of a decode.
        try:
            if len(frames) == 2:
                self._send(frames[0], _SNDMORE)
                self._send(reply)
            else:
                self.sock.send_multipart(frames[:self._cut(frames)] + [reply])
        except zmq.Again:  # the client's queue is full (not reading): drop, as ROUTER does
            pass


class StreamSource:
    """Streaming: each frame received on SUB is a request; its reply is published on PUB."""

    def __init__(self, sub: zmq.Socket, pub: zmq.Socket, recorder: Recorder):
        self.sock, self.recv, self.get, self.fd = sub, sub.recv_multipart, sub.getsockopt, sub.getsockopt(zmq.FD)
        self._publish, self._recorder = pub.send, recorder

    @staticmethod
    def request(frames: list):
        return frames[0] if len(frames) == 1 else None

    @staticmethod
    def envelope_error(frames: list) -> str:
        return f"a streamed bin is one frame; got {len(frames)} frames"

    def answer(self, frames: list, reply) -> None:
        try:
            self._publish(reply)
            self._recorder.streamed += 1
        except zmq.Again:
            pass


# -- how the loop waits ------------------------------------------------------------------------------
# Both return the sources that may have a message queued, or an empty list when the loop should
# look at its stop flag and planned warm-up. Reading EVENTS also lets libzmq process the
# commands its I/O thread has queued for the socket, so a message is seen as soon as it is there.

class BlockingWait:
    """Sleep in select() on the sources' ZMQ_FDs until one signals, the planned warm-up is due,
    or POLL_S has passed. ZMQ_FD signals only what changed since EVENTS was last read (any send
    or receive may consume its signal), so EVENTS is read first."""

    def __init__(self, sources: list):
        self._sources = sources
        self._by_fd = {src.fd: src for src in sources}
        self._fds = list(self._by_fd)

    def __call__(self, due: int) -> list:
        ready = [src for src in self._sources if src.get(_EVENTS) & _POLLIN]
        if ready:
            return ready
        timeout = POLL_S if not due else min(POLL_S, max(0, due - _clock()) / 1e9)
        readable = select.select(self._fds, (), (), timeout)[0]
        if len(self._fds) == 1:
            return self._sources if readable else readable
        return [self._by_fd[fd] for fd in readable]


class SpinWait:
    """Poll the sources; with none ready, yield the core, so that a ZeroMQ I/O thread pinned
    to the same core does not wait for the spinner's time slice."""

    def __init__(self, sources: list):
        self._sources = sources

    def __call__(self, due: int) -> list:
        ready = [src for src in self._sources if src.get(_EVENTS) & _POLLIN]
        if not ready:
            os.sched_yield()
        return ready


class Server:
    """Serves one engine (anything with ``n_channels``, ``manifest`` and ``decode``; see
    runtime/engine.py) on a ROUTER socket and optionally a SUB -> PUB stream."""

    def __init__(self, engine, bind: str | None = "tcp://127.0.0.1:5555", sub: str | None = None,
                 pub: str | None = None, busy_poll: bool = False, provider: str = "cpu",
                 window: int = 1 << 16, warmup: int = 200, prewarm: bool = True,
                 context: zmq.Context | None = None):
        if (sub is None) != (pub is None):
            raise ValueError("streaming needs both --sub (where bins come from) and --pub (where decodes go)")
        if bind is None and sub is None:
            raise ValueError("nothing to serve: give a ROUTER endpoint, or --sub and --pub")
        self.busy_poll, self.provider, self.streaming = busy_poll, provider, sub is not None
        self.recorder = Recorder(window)
        self._load(engine, warmup, prewarm)
        self._t_arrival = 0  # receipt time of the latest request served
        self._stop = False
        self._open(bind, sub, pub, context)

    def _load(self, engine, warmup: int, prewarm: bool) -> None:
        """Take ``engine`` into service: everything that depends on the bundle."""
        self.engine = engine
        n = self.n_channels = int(engine.n_channels)
        probe = engine.decode(np.zeros(n, np.float32))
        self.layout = wire.DecodeLayout(probe.content.shape[-1], probe.style_mean.shape[-1],
                                        probe.proba.shape[-1], probe.rates.shape[-1])
        self.writer = wire.DecodeReplyWriter(self.layout)
        # Engines whose one-bin outputs are not contiguous float32 take the general path only.
        self._one_bin = wire.OneBinRequests(n, MAX_BATCH, enabled=self.writer.check(probe))
        # Cold caches and a lazily grown memory arena make the first calls slow; pay that here.
        rng = np.random.default_rng(0)
        for _ in range(warmup):
            engine.decode(rng.poisson(2.0, n).astype(np.float32))
        # Needs an engine with warm(), which leaves the last decode's outputs alone.
        self.planner = WarmPlanner(getattr(engine, "warm", None) if prewarm else None)
        self._info_body = InfoReply(
            server=SERVER_NAME, n_channels=n, content_dim=self.layout.content_dim,
            style_dim=self.layout.style_dim, n_classes=self.layout.n_classes, n_rates=self.layout.n_rates,
            accepted_dtypes=[d.name.lower() for d in DType], streaming=self.streaming,
            manifest=json.loads(engine.manifest.model_dump_json()),
        ).model_dump_json().encode()

    def _open(self, bind: str | None, sub: str | None, pub: str | None, context: zmq.Context | None) -> None:
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.router = self.sub = self.pub = None
        self.endpoints: dict[str, str] = {}
        self.sources: list = []
        try:
            if bind is not None:
                self.router = self._socket(zmq.ROUTER)
                # Replies to clients that are gone are dropped, never queued or raised.
                self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
                self.router.bind(bind)
                self.endpoints["router"] = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
                self.sources.append(RouterSource(self.router))
            if sub is not None:
                self.pub = self._socket(zmq.PUB)
                self.pub.bind(pub)
                self.endpoints["pub"] = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
                self.sub = self._socket(zmq.SUB)
                self.sub.setsockopt(zmq.SUBSCRIBE, b"")
                self.sub.connect(sub)
                self.endpoints["sub"] = sub
                self.sources.append(StreamSource(self.sub, self.pub, self.recorder))
        except zmq.ZMQError as e:
            self.close()
            raise RuntimeError(f"cannot open the service sockets: {e}") from None
        self._wait = (SpinWait if self.busy_poll else BlockingWait)(self.sources)

    def _socket(self, kind: int) -> zmq.Socket:
        s = self.context.socket(kind)
        # libzmq drops the connection of a peer sending more than the largest valid request, so
        # no one can make the server buffer gigabytes.
        s.setsockopt(zmq.MAXMSGSIZE, wire.max_request_bytes(self.n_channels))
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDTIMEO, 0)
        return s

    # -- one frame in, one frame out ------------------------------------------------------------
    def handle(self, frame) -> bytes | bytearray:
        """The reply to one request frame. Never raises."""
        t0 = self._t_arrival = _clock()
        self.recorder.requests += 1
        one_bin = self._one_bin
        head = one_bin.match(frame)
        if head is None:
            return self._handle_general(frame, t0)
        try:
            out = self.engine.decode(one_bin.counts(frame))
        except Exception as e:  # noqa: BLE001 - the server outlives any engine failure
            return self._engine_error(e, *head)
        dt = _clock() - t0
        self.recorder.decoded(dt)
        return self.writer.write_one(head[0], head[1], dt, out)

    def _handle_general(self, frame, t0: int) -> bytes | bytearray:
        try:
            req = wire.parse_request(frame, self.n_channels)
        except wire.ProtocolError as e:
            return self._error(e.code, e.message, e.seq, e.t_client_ns)
        except Exception as e:  # noqa: BLE001 - e.g. a frame object without a buffer
            return self._error(ErrorCode.BAD_HEADER, f"unreadable frame: {e}")
        if req.msg_type != _DECODE:  # decodes are counted by the decode counters, see Recorder.stats
            self.recorder.control(MsgType(req.msg_type).name)
        if req.msg_type == _PING:
            reply = wire.pack_reply(MsgType.PONG, req.seq, req.t_client_ns)
        elif req.msg_type == _INFO:
            reply = wire.pack_reply(MsgType.INFO_REPLY, req.seq, req.t_client_ns, self._info_body)
        elif req.msg_type == _STATS:
            reply = wire.pack_json_reply(MsgType.STATS_REPLY, req.seq, req.t_client_ns, self.stats())
        else:
            counts = req.counts
            try:
                # The engine converts other dtypes itself (exact for every integer DType).
                out = self.engine.decode(counts[0] if len(counts) == 1 else counts)
                reply = self.writer.write(req.seq, req.t_client_ns, out)
            except Exception as e:  # noqa: BLE001
                return self._engine_error(e, req.seq, req.t_client_ns)
            dt = _clock() - t0
            if len(counts) == 1:
                self.recorder.decoded(dt)
            else:
                self.recorder.multi_bin(len(counts))
            return wire.finish(reply, dt)
        return wire.finish(reply, _clock() - t0)

    def _engine_error(self, e: Exception, seq: int, t_client: int) -> bytearray:
        if isinstance(e, ValueError):  # the engine's word for counts it refuses (NaN, negative, ...)
            return self._error(ErrorCode.BAD_VALUE, str(e), seq, t_client)
        return self._error(ErrorCode.INTERNAL, f"engine failed: {type(e).__name__}: {e}", seq, t_client)

    def _error(self, code: ErrorCode, message: str, seq: int = 0, t_client: int = 0) -> bytearray:
        self.recorder.error(ErrorCode(code).name)
        return wire.pack_error(code, message, seq, t_client)

    def stats(self) -> StatsReply:
        return self.recorder.stats(self.planner.warms, self.busy_poll, self.provider)

    # -- the loop ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask ``run`` to return (from a signal handler or another thread); it does within ~0.25 s."""
        self._stop = True

    def run(self) -> None:
        gc.collect()
        gc.freeze()  # objects from start-up never need scanning again: collections stay short
        planner, wait, serve = self.planner, self._wait, self._serve
        while not self._stop:
            ready = wait(planner.due)
            if ready:
                for src in ready:
                    serve(src)
            elif planner.due and _clock() >= planner.due:  # nothing came before the planned warm-up
                planner.warm()

    def _serve(self, src) -> None:
        """Answer the message queued on ``src`` and, when more are queued behind it, those too
        (``_serve_queue``)."""
        try:
            frames = src.recv(_NOBLOCK)
        except zmq.Again:  # the wait woke for something else
            return
        planner = self.planner
        if planner.due:  # the request beat its warm-up
            planner.interrupted()
        if src.get(_EVENTS) & _POLLIN:
            self._serve_queue(src, frames)
        else:
            self._answer(src, frames)
        planner.arrived(self._t_arrival)

    def _answer(self, src, frames: list) -> None:
        frame = src.request(frames)
        if frame is None:
            self.recorder.requests += 1
            reply = self._error(ErrorCode.BAD_ENVELOPE, src.envelope_error(frames))
        else:
            reply = self.handle(frame)
        src.answer(frames, reply)

    def _serve_queue(self, src, first: list) -> None:
        """Serve ``first`` and the requests queued behind it, up to MAX_BATCH: the one-bin
        decodes first, in one engine call (far cheaper per bin than one call each, which is
        what lets one core keep up with a burst), then the rest one by one. Replies equal
        one-bin decodes up to float rounding."""
        recv, queued = src.recv, [first]
        while len(queued) < MAX_BATCH:
            try:
                queued.append(recv(_NOBLOCK))
            except zmq.Again:
                break
        t0 = self._t_arrival = _clock()
        one_bin, rows, rest = self._one_bin, [], []
        for frames in queued:
            frame = src.request(frames)
            if frame is not None and one_bin.match(frame) is not None:
                one_bin.add(frame)
                rows.append(frames)
            else:
                rest.append(frames)
        if len(rows) > 1:
            self._decode_rows(src, rows, t0)
        else:
            rest = rows + rest
        one_bin.clear()
        for frames in rest:
            self._answer(src, frames)

    def _decode_rows(self, src, rows: list, t0: int) -> None:
        counts, seqs, t_clients = self._one_bin.batch()
        try:
            out = self.engine.decode(counts)
        except Exception:  # noqa: BLE001 - e.g. one NaN bin: answer each alone, so only it errs
            for frames in rows:
                self._answer(src, frames)
            return
        dt = _clock() - t0
        n = len(rows)
        self.recorder.requests += n
        self.recorder.decoded(dt, n)
        replies, size = self.writer.write_rows(seqs, t_clients, dt, out), self.writer.frame_bytes
        for i, frames in enumerate(rows):
            src.answer(frames, replies[i * size:(i + 1) * size])  # sent with copy: the buffer is reused

    def close(self) -> None:
        for s in (self.router, self.sub, self.pub):
            if s is not None:
                s.close(linger=0)
        if self._own_context:
            self.context.term()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve_command(args) -> int:
    from runtime.bundle import load_public_key
    from runtime.engine import BundleDecoder

    trusted = [load_public_key(p) for p in args.trust] if args.trust else None
    engine = BundleDecoder(args.bundle, provider=args.provider, spin=args.busy_poll, trusted=trusted)
    server = Server(engine, bind=args.bind, sub=args.sub, pub=args.pub, busy_poll=args.busy_poll,
                    provider=args.provider, prewarm=not args.no_prewarm)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    where = " ".join(f"{k}={v}" for k, v in server.endpoints.items())
    # One parseable line: tests and scripts wait for it to learn the bound ports.
    print(f"ready {where} channels={server.n_channels} pid={os.getpid()}"
          f"{' busy-poll' if args.busy_poll else ''}", flush=True)
    try:
        server.run()
    finally:
        server.close()
    s = server.stats()
    print(f"stopped after {s.requests} requests ({s.bins} bins decoded, "
          f"{sum(s.errors.values())} errors)", file=sys.stderr, flush=True)
    return 0
