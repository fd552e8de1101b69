"""The decoding service: ``swapvae serve BUNDLE``.

One thread, one engine, two ways in:
- request/reply on a ROUTER socket (``--bind``): any number of DEALER or REQ clients. A ROUTER
  never waits for a client, so a client that vanishes or drops a reply cannot wedge the server
  or anyone else (a REP socket would);
- streaming (``--sub`` and ``--pub``): bins arriving on a SUB socket are decoded and the reply
  frames published on a PUB socket.

Every frame gets exactly one reply; a bad request gets an ERROR reply naming the problem and
nothing a client sends can stop the loop. The hot path (one float32 bin of the bundle's
width, recognised by ``wire.OneBinRequests``) is one look-up of the sender's stream, one
engine call (which copies the stream's history in), one join into the reply frame and one
write into the ``Recorder``'s rings of times; everything else (other dtypes, batches, control
requests, errors) takes the general path, which is still cheap.

How the loop is organised (``Server.run``): one loop serves every mode. It asks its wait
strategy for the sources that may have input: ``BlockingWait`` (the default) sleeps in
select() on the sockets until one signals, a planned pre-warm is due or the stop flag wants a
look, so it costs nothing while idle; ``SpinWait`` (``--busy-poll``) polls the sockets and
yields the core between polls, which removes the scheduler wake-up from every request at the
price of one core. Each source (``RouterSource``, ``StreamSource``) knows only its envelope:
where the request frame is and how its reply goes back. ``_serve`` receives one message; when
more are queued behind it (many clients, a pipelining one, a burst on the stream) it takes up
to ``MAX_BATCH`` and the one-bin decodes among them share engine calls (see Streams below),
while a lone request never waits for company. Pre-warming is ``runtime/prewarm.py``'s planner, told of
every request served and asked when to wake; framing is all in ``runtime/wire.py``; counters
and latencies are in ``runtime/recorder.py``.

Streams (protocol v2): the readout sees a window of the last ``history_bins`` latents of the
sender's stream. A stream is one ROUTER peer (its routing identity, i.e. one client socket)
or the SUB input (one fixed key, ``STREAM_KEY``); the server keeps each stream's history in a
``StreamTable``, at most ``--max-streams`` of them, evicting the least recently used (counted
in STATS). A request's RESET flag drops its stream's history before its first bin. A drained
queue keeps each stream's bins in arrival order: each round decodes the head one-bin request
of every stream with one queued (one bin per stream per engine call, ``decode_streams``), or,
when a single stream has bins queued, its run of consecutive bins in one ``decode_stream``
call (the same windows as bin by bin); the other requests at the head of their stream follow,
one by one. A refused request (an ERROR reply) leaves its stream as it was.

Time: ``server_ns`` runs from the moment ``_serve`` has read the request off its socket to the
reply being ready; ``queue_ns`` is the part of it before the request's turn came (behind the
other requests of a drained queue; 0 for a request served alone). The time a message waited
inside libzmq before the server read it is not visible here.

Where coming work plugs in: a priority lane extends ``_serve_queue``, which already decodes
one-bin requests first in each round (bulk requests would be kept there and served a slice
per turn of the loop); byte limits and high-water marks are socket options in ``_socket``;
STATS could be kept incrementally in the ``Recorder``; a SIGHUP reload would set a flag like
``stop`` and call ``_load`` (and drop the streams, whose latents belong to the old model).
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
from runtime.history import StreamTable
from runtime.prewarm import WarmPlanner
from runtime.recorder import Recorder
from schemas.protocol import DType, ErrorCode, InfoReply, MsgType, StatsReply

SERVER_NAME = "swapvae-runtime/2"
MAX_BATCH = 32  # queued requests taken at once; their one-bin decodes share engine calls
MAX_STREAMS = 1024  # streams whose history the server keeps (--max-streams)
STREAM_KEY = b""  # the SUB input's stream (a ROUTER identity is 1 to 255 bytes, never empty)
POLL_S = 0.25  # how often an idle loop looks at the stop flag
_RESET = wire.RESET
_DECODE, _PING, _INFO, _STATS = int(MsgType.DECODE), int(MsgType.PING), int(MsgType.INFO), int(MsgType.STATS)
# Plain ints: arithmetic on zmq's IntFlag constants costs a microsecond or two per use
_SNDMORE, _NOBLOCK, _EVENTS, _POLLIN, _RCVMORE = (int(zmq.SNDMORE), int(zmq.NOBLOCK), int(zmq.EVENTS),
                                                  int(zmq.POLLIN), int(zmq.RCVMORE))
_clock = time.perf_counter_ns


# -- where requests come from and replies go -----------------------------------------------------

class RouterSource:
    """Request/reply: [identity, (frames up to an empty delimiter,) request] in; the same
    envelope and the reply out. A REQ client puts the empty delimiter there. The identity
    (``frames[0]``) is the stream's key."""
    keyed = True

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
    """Streaming: each frame received on SUB is a request; its reply is published on PUB. All
    of them are one stream (``STREAM_KEY``)."""
    keyed = False

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
    """Serves one engine (anything with ``n_channels``, ``manifest``, ``history_bins``,
    ``latent_dim``, ``new_stream``, ``decode_stream`` and ``decode_streams``; see
    runtime/engine.py) on a ROUTER socket and optionally a SUB -> PUB stream."""

    def __init__(self, engine, bind: str | None = "tcp://127.0.0.1:5555", sub: str | None = None,
                 pub: str | None = None, busy_poll: bool = False, provider: str = "cpu",
                 window: int = 1 << 16, warmup: int = 200, prewarm: bool = True,
                 max_streams: int = MAX_STREAMS, context: zmq.Context | None = None):
        if (sub is None) != (pub is None):
            raise ValueError("streaming needs both --sub (where bins come from) and --pub (where decodes go)")
        if bind is None and sub is None:
            raise ValueError("nothing to serve: give a ROUTER endpoint, or --sub and --pub")
        self.busy_poll, self.provider, self.streaming = busy_poll, provider, sub is not None
        self.recorder = Recorder(window)
        self._load(engine, warmup, prewarm, max_streams)
        self._stop = False
        self._open(bind, sub, pub, context)

    def _load(self, engine, warmup: int, prewarm: bool, max_streams: int) -> None:
        """Take ``engine`` into service: everything that depends on the bundle."""
        self.engine = engine
        n = self.n_channels = int(engine.n_channels)
        scratch = engine.new_stream()  # start-up decodes never touch a client's stream
        probe = engine.decode_stream(scratch, np.zeros(n, np.float32))
        readout = probe.angle is not None
        width = lambda a: 0 if a is None else a.shape[-1]  # noqa: E731
        self.layout = wire.DecodeLayout(width(probe.content), width(probe.style_mean), width(probe.proba),
                                        width(probe.velocity), int(engine.history_bins) if readout else 0,
                                        width(probe.rates), readout)
        self.writer = wire.DecodeReplyWriter(self.layout)
        # Engines whose one-bin outputs are not contiguous float32 take the general path only.
        self._one_bin = wire.OneBinRequests(n, MAX_BATCH, enabled=self.writer.check(probe))
        # Cold caches and a lazily grown memory arena make the first calls slow; pay that here.
        rng = np.random.default_rng(0)
        for i in range(warmup):
            engine.decode_stream(scratch, rng.poisson(2.0, n).astype(np.float32), i % 50 == 0)
        self.streams = StreamTable(engine.history_bins, engine.latent_dim, max_streams)
        # Needs an engine with warm(), which leaves the last decode's outputs alone.
        self.planner = WarmPlanner(getattr(engine, "warm", None) if prewarm else None)
        lay = self.layout
        self._info_body = InfoReply(
            server=SERVER_NAME, n_channels=n, content_dim=lay.content_dim, style_dim=lay.style_dim,
            n_classes=lay.n_classes, velocity_dim=lay.velocity_dim, history_bins=lay.history_bins,
            has_readout=lay.has_readout, n_rates=lay.n_rates, accepted_dtypes=[d.name.lower() for d in DType],
            streaming=self.streaming, manifest=json.loads(engine.manifest.model_dump_json()),
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
    def handle(self, frame, key: bytes = STREAM_KEY, t_read: int = 0, t_start: int = 0) -> bytes | bytearray:
        """The reply to one request frame of the stream ``key``, read off its socket at
        ``t_read`` and taken up at ``t_start`` (``perf_counter_ns``; 0: now, and not queued).
        Never raises."""
        if not t_read:
            t_read = _clock()
        self.recorder.requests += 1
        one_bin = self._one_bin
        head = one_bin.match(frame)
        if head is None:
            return self._handle_general(frame, key, t_read, t_start or t_read)
        seq, t_client, reset = head  # reset: the flags byte, and RESET is the only bit it may hold here
        stream = self.streams.get(key)
        fresh = reset or not stream.n
        try:
            out = self.engine.decode_stream(stream, one_bin.counts(frame), reset)
        except Exception as e:  # noqa: BLE001 - the server outlives any engine failure
            return self._engine_error(e, seq, t_client)
        dt = _clock() - t_read
        queued = t_start - t_read if t_start else 0
        self.recorder.decoded(dt, queued)
        return self.writer.write_one(seq, t_client, dt, queued, fresh, out)

    def _handle_general(self, frame, key: bytes, t_read: int, t_start: int) -> bytes | bytearray:
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
            stream = self.streams.get(key)
            reset = req.flags & _RESET
            fresh = bool(reset) or not stream.n
            try:
                # The engine converts other dtypes itself (exact for every integer DType); a
                # batch is consecutive bins of the stream.
                out = self.engine.decode_stream(stream, counts[0] if len(counts) == 1 else counts, reset)
                reply = self.writer.write(req.seq, req.t_client_ns, out, fresh)
            except Exception as e:  # noqa: BLE001
                return self._engine_error(e, req.seq, req.t_client_ns)
            dt = _clock() - t_read
            if len(counts) == 1:
                self.recorder.decoded(dt, t_start - t_read)
            else:
                self.recorder.multi_bin(len(counts))
            return wire.finish(reply, dt, t_start - t_read)
        return wire.finish(reply, _clock() - t_read, t_start - t_read)

    def _engine_error(self, e: Exception, seq: int, t_client: int) -> bytearray:
        if isinstance(e, ValueError):  # the engine's word for counts it refuses (NaN, negative, ...)
            return self._error(ErrorCode.BAD_VALUE, str(e), seq, t_client)
        return self._error(ErrorCode.INTERNAL, f"engine failed: {type(e).__name__}: {e}", seq, t_client)

    def _error(self, code: ErrorCode, message: str, seq: int = 0, t_client: int = 0) -> bytearray:
        self.recorder.error(ErrorCode(code).name)
        return wire.pack_error(code, message, seq, t_client)

    def stats(self) -> StatsReply:
        t = self.streams
        return self.recorder.stats(self.planner.warms, self.busy_poll, self.provider,
                                   streams=(len(t), t.evicted, t.max_streams))

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
        t_read = _clock()
        planner = self.planner
        if planner.due:  # the request beat its warm-up
            planner.interrupted()
        if src.get(_EVENTS) & _POLLIN:
            self._serve_queue(src, frames, t_read)
        else:
            self._answer(src, frames, t_read)
        planner.arrived(t_read)

    def _answer(self, src, frames: list, t_read: int, t_start: int = 0) -> None:
        frame = src.request(frames)
        if frame is None:
            self.recorder.requests += 1
            reply = self._error(ErrorCode.BAD_ENVELOPE, src.envelope_error(frames))
        else:
            reply = self.handle(frame, frames[0] if src.keyed else STREAM_KEY, t_read, t_start)
        src.answer(frames, reply)

    def _serve_queue(self, src, first: list, t_first: int) -> None:
        """Serve ``first`` and the requests queued behind it, up to MAX_BATCH, in rounds that
        keep each stream's requests in arrival order. Each round takes the request at the head
        of every stream: the one-bin decodes among them in one engine call, one bin per
        stream (far cheaper per bin than one call each, which is what lets one core keep up
        with a burst), or, when they come from one stream alone, that stream's run of queued
        one-bin decodes in one call; then the other heads one by one. Replies equal lone
        one-bin decodes up to float rounding."""
        recv, queued = src.recv, [(first, t_first)]
        while len(queued) < MAX_BATCH:
            try:
                queued.append((recv(_NOBLOCK), _clock()))
            except zmq.Again:
                break
        match, keyed = self._one_bin.match, src.keyed
        by_stream: dict[bytes, list] = {}  # key -> [(frames, t_read, frame, one-bin head or None)], in order
        for frames, t in queued:
            frame = src.request(frames)
            head = match(frame) if frame is not None else None
            by_stream.setdefault(frames[0] if keyed else STREAM_KEY, []).append((frames, t, frame, head))
        pending = [(key, q, 0) for key, q in by_stream.items()]  # (key, queue, index of its head)
        while pending:
            fast = [(key, q[i]) for key, q, i in pending if q[i][3] is not None]
            taken = {key: 1 for key, _ in fast}
            if len(fast) == 1 and len(pending) == 1:  # one stream alone: its run of one-bin decodes
                key, q, i = pending[0]
                run = 1
                while i + run < len(q) and q[i + run][3] is not None and not q[i + run][3][2] & _RESET:
                    run += 1
                self._decode_batch(src, [(key, m) for m in q[i:i + run]], run > 1)
                taken[key] = run
            elif fast:
                self._decode_batch(src, fast, False)
            for key, q, i in pending:
                if key not in taken:
                    frames, t_read = q[i][:2]
                    self._answer(src, frames, t_read, _clock())
            pending = [(key, q, i + taken.get(key, 1)) for key, q, i in pending if i + taken.get(key, 1) < len(q)]

    def _decode_batch(self, src, rows: list, run: bool) -> None:
        """One engine call for the one-bin requests ``rows`` ([(key, (frames, t_read, frame,
        head))]): one bin of each of several streams, or (``run``) consecutive bins of one
        stream. A single row is served alone."""
        if len(rows) == 1:
            frames, t_read = rows[0][1][:2]
            self._answer(src, frames, t_read, _clock())
            return
        one_bin = self._one_bin
        for _, (_, _, frame, _) in rows:
            one_bin.add(frame)
        counts, seqs, t_clients, flags = one_bin.batch()
        t_read = np.array([m[1] for _, m in rows], np.int64)
        try:
            if run:
                stream = self.streams.get(rows[0][0])
                reset = flags[0] & _RESET
                fresh = np.zeros(len(rows), bool)
                fresh[0] = reset or not stream.n
                t_start = _clock()
                out = self.engine.decode_stream(stream, counts, reset)
            else:
                streams = [self.streams.get(key) for key, _ in rows]
                resets = (flags & _RESET).astype(bool)
                fresh = resets | np.array([not s.n for s in streams])
                t_start = _clock()
                out = self.engine.decode_streams(streams, counts, resets)
        except Exception:  # noqa: BLE001 - e.g. one NaN bin: answer each alone, in order, so only it errs
            one_bin.clear()
            for _, (frames, t, _, _) in rows:
                self._answer(src, frames, t, _clock())
            return
        server_ns = _clock() - t_read
        queue_ns = t_start - t_read
        n = len(rows)
        self.recorder.requests += n
        self.recorder.decoded_together(server_ns, queue_ns)
        replies = self.writer.write_rows(seqs, t_clients, server_ns, queue_ns, fresh, out)
        one_bin.clear()
        size = self.writer.frame_bytes
        for i, (_, (frames, _, _, _)) in enumerate(rows):
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
                    provider=args.provider, prewarm=not args.no_prewarm,
                    max_streams=MAX_STREAMS if args.max_streams is None else args.max_streams)
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
