"""The decoding service: ``swapvae serve BUNDLE``.

One thread, one engine, two ways in:
- request/reply on a ROUTER socket (``--bind``): any number of DEALER or REQ clients. A ROUTER
  never waits for a client, so a client that vanishes or drops a reply cannot wedge the server
  or anyone else (a REP socket would);
- streaming (``--sub`` and ``--pub``): bins arriving on a SUB socket are decoded and the reply
  frames published on a PUB socket.

Every frame gets exactly one reply; a bad request gets an ERROR reply naming the problem and
nothing a client sends can stop the loop. The hot path (one float32 bin of the bundle's
width) is: unpack the header, view the body, one engine call, one join into the reply frame,
one write into a preallocated ring of processing times. Everything else (validation details,
other dtypes, batches, control requests) takes the general path, which is still cheap.

By default the loop blocks in the receive call, so it costs nothing while idle on a shared CPU.
``--busy-poll`` spins on the sockets instead: on a dedicated core this removes the scheduler
wake-up from every request, at the price of one core at 100%.

When requests queue up (many clients, or a pipelining one), the one-bin decodes waiting are
served by one batched engine call (``_reply_queued``): that is what sustains throughput on one
core. A lone request never waits for company.

In both modes, when bins arrive at a steady period of 0.5 ms or more (a closed loop), the server
runs one engine warm-up shortly before the next bin is due (``_schedule_warm``): after a pause
the model's weights and ORT's code have left the caches, and a cold decode measured 2-4x a
warm one.
"""
from __future__ import annotations

import array
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
from schemas.protocol import (
    MAGIC,
    MAX_BINS,
    PROTOCOL_VERSION,
    REQUEST_HEADER_SIZE,
    DType,
    ErrorCode,
    InfoReply,
    LatencySummary,
    MsgType,
    StatsReply,
)

SERVER_NAME = "swapvae-runtime/1"
_DECODE, _F32, _PING, _INFO, _STATS = int(MsgType.DECODE), int(DType.FLOAT32), int(MsgType.PING), int(MsgType.INFO), int(MsgType.STATS)
_POLL_MS = 250  # how often an idle loop looks at the stop flag
# Pre-warming: only streams with gaps at least this long leave caches cold enough to matter
# (measured: a decode after a 1 ms pause costs ~2x a back-to-back one, after 10 ms ~4x).
_WARM_MIN_PERIOD_NS = 500_000
_WARM_SLACK_NS = 150_000  # least time between warm-up and bin: the timed wait's wake-up jitter
_WARM_MAX_PERIOD_NS = 2_000_000_000
_F32_DTYPE = np.dtype("<f4")
_MAX_BATCH = 32  # queued one-bin decodes served by one engine call
# Plain ints: arithmetic on zmq's IntFlag constants costs a microsecond or two per use
_SNDMORE, _NOBLOCK, _EVENTS, _POLLIN = int(zmq.SNDMORE), int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN)


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
        if window & (window - 1):
            raise ValueError(f"window must be a power of two, got {window}")
        self.engine = engine
        self.n_channels = int(engine.n_channels)
        self.busy_poll, self.provider = busy_poll, provider
        probe = engine.decode(np.zeros(self.n_channels, np.float32))
        self.layout = wire.DecodeLayout(probe.content.shape[-1], probe.style_mean.shape[-1],
                                        probe.proba.shape[-1], probe.rates.shape[-1])
        self.writer = wire.DecodeReplyWriter(self.layout)
        # Engines whose one-bin outputs are not contiguous float32 take the general writer.
        one_bin = REQUEST_HEADER_SIZE + 4 * self.n_channels  # a float32 one-bin DECODE request
        self._fast_size = one_bin if self.writer.check(probe) else -1
        # Cold caches and a lazily grown memory arena make the first calls slow; pay that here.
        rng = np.random.default_rng(0)
        for _ in range(warmup):
            engine.decode(rng.poisson(2.0, self.n_channels).astype(np.float32))

        # Pre-warming (see _schedule_warm): needs an engine with warm(), which leaves the last
        # decode's outputs alone. Its lead covers the warm call itself plus timer slack.
        self._warm = getattr(engine, "warm", None) if prewarm else None
        self._warm_lead_ns = self._warm_min_lead_ns = 0
        self._warm_period_ns = 0.0
        if self._warm is not None:
            took = []
            for _ in range(20):
                t = time.perf_counter_ns()
                self._warm()
                took.append(time.perf_counter_ns() - t)
            self._warm_min_lead_ns = _WARM_SLACK_NS + int(np.median(took))
            self._warm_lead_ns = self._warm_min_lead_ns
        self._t_arrival = 0  # receipt time of the latest request (set in handle)
        self._t_prev = 0
        self._period_ns = 0.0
        self._warm_at = 0  # perf_counter_ns at which to warm the engine if no request came; 0: none
        self.prewarms = 0

        self.started = time.monotonic()
        self.requests = 0
        self.decodes = 0  # also the write index of the latency ring
        self.bins_batched = 0  # bins decoded by multi-bin requests (the rest are one per decode)
        self.batches = 0
        self.streamed = 0
        self.coalesced = 0  # one-bin decodes served by a shared engine call (_reply_queued)
        # Queued one-bin requests are copied whole, header and all, into rows of this buffer (a
        # memoryview copy: 0.6 us against 1.9 for a numpy view and assignment); the engine reads
        # the bodies through a strided view.
        self._batch_frames = memoryview(bytearray(_MAX_BATCH * one_bin))
        self._batch_x = np.ndarray((_MAX_BATCH, self.n_channels), _F32_DTYPE, self._batch_frames,
                                   REQUEST_HEADER_SIZE, (one_bin, 4))
        self.errors: dict[str, int] = {}
        self.by_type: dict[str, int] = {}
        self._window = window
        self._ring = array.array("q", bytes(8 * window))
        self._stop = False
        self._info_body = InfoReply(
            server=SERVER_NAME, n_channels=self.n_channels, content_dim=self.layout.content_dim,
            style_dim=self.layout.style_dim, n_classes=self.layout.n_classes, n_rates=self.layout.n_rates,
            accepted_dtypes=[d.name.lower() for d in DType], streaming=sub is not None,
            manifest=json.loads(engine.manifest.model_dump_json()),
        ).model_dump_json().encode()

        self._own_context = context is None
        self.context = context or zmq.Context()
        self.router = self.sub = self.pub = None
        self.endpoints: dict[str, str] = {}
        try:
            if bind is not None:
                self.router = self._socket(zmq.ROUTER)
                # Replies to clients that are gone are dropped, never queued or raised.
                self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
                self.router.bind(bind)
                self.endpoints["router"] = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
            if sub is not None:
                self.pub = self._socket(zmq.PUB)
                self.pub.bind(pub)
                self.endpoints["pub"] = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
                self.sub = self._socket(zmq.SUB)
                self.sub.setsockopt(zmq.SUBSCRIBE, b"")
                self.sub.connect(sub)
                self.endpoints["sub"] = sub
        except zmq.ZMQError as e:
            self.close()
            raise RuntimeError(f"cannot open the service sockets: {e}") from None

    def _socket(self, kind: int) -> zmq.Socket:
        s = self.context.socket(kind)
        # The largest valid request is MAX_BINS bins of float64; libzmq drops the connection of
        # a peer sending more, so no one can make the server buffer gigabytes.
        s.setsockopt(zmq.MAXMSGSIZE, REQUEST_HEADER_SIZE + MAX_BINS * 8 * self.n_channels)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, _POLL_MS)
        s.setsockopt(zmq.SNDTIMEO, 0)
        return s

    # -- one frame in, one frame out ------------------------------------------------------------
    def handle(self, frame) -> bytes | bytearray:
        """The reply to one request frame. Never raises."""
        t0 = self._t_arrival = time.perf_counter_ns()
        self.requests += 1
        if len(frame) == self._fast_size:
            magic, version, msg_type, dtype, _, seq, t_client, n_ch, n_bins = wire.REQ.unpack_from(frame)
            if (msg_type == _DECODE and dtype == _F32 and n_bins == 1 and n_ch == self.n_channels
                    and version == PROTOCOL_VERSION and magic == MAGIC):
                try:
                    out = self.engine.decode(np.frombuffer(frame, _F32_DTYPE, n_ch, REQUEST_HEADER_SIZE))
                except ValueError as e:
                    return self._error(ErrorCode.BAD_VALUE, str(e), seq, t_client)
                except Exception as e:  # noqa: BLE001 - the server outlives any engine failure
                    return self._error(ErrorCode.INTERNAL, f"engine failed: {type(e).__name__}: {e}", seq, t_client)
                dt = time.perf_counter_ns() - t0
                i = self.decodes
                self._ring[i & (self._window - 1)] = dt
                self.decodes = i + 1
                return self.writer.write_one(seq, t_client, dt, out)
        return self._handle_general(frame, t0)

    def _handle_general(self, frame, t0: int) -> bytes | bytearray:
        try:
            req = wire.parse_request(frame, self.n_channels)
        except wire.ProtocolError as e:
            return self._error(e.code, e.message, e.seq, e.t_client_ns)
        except Exception as e:  # noqa: BLE001 - e.g. a frame object without a buffer
            return self._error(ErrorCode.BAD_HEADER, f"unreadable frame: {e}")
        if req.msg_type != _DECODE:  # decodes are counted by the decode counters, see stats()
            name = MsgType(req.msg_type).name
            self.by_type[name] = self.by_type.get(name, 0) + 1
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
            except ValueError as e:
                return self._error(ErrorCode.BAD_VALUE, str(e), req.seq, req.t_client_ns)
            except Exception as e:  # noqa: BLE001
                return self._error(ErrorCode.INTERNAL, f"engine failed: {type(e).__name__}: {e}",
                                   req.seq, req.t_client_ns)
            dt = time.perf_counter_ns() - t0
            if len(counts) == 1:
                i = self.decodes
                self._ring[i & (self._window - 1)] = dt
                self.decodes = i + 1
            else:
                self.batches += 1
                self.bins_batched += len(counts)
            return wire.finish(reply, dt)
        return wire.finish(reply, time.perf_counter_ns() - t0)

    def _error(self, code: ErrorCode, message: str, seq: int = 0, t_client: int = 0) -> bytearray:
        name = ErrorCode(code).name
        self.errors[name] = self.errors.get(name, 0) + 1
        return wire.pack_error(code, message, seq, t_client)

    def stats(self) -> StatsReply:
        n = min(self.decodes, self._window)
        ring = np.frombuffer(self._ring, np.int64)
        if self.decodes > self._window:  # the most recent window, whatever the write position
            lat = ring / 1e3
        else:
            lat = ring[:n] / 1e3
        if n:
            p50, p90, p99, p999 = np.percentile(lat, [50, 90, 99, 99.9])
            summary = LatencySummary(n=n, mean=float(lat.mean()), p50=p50, p90=p90, p99=p99, p999=p999, max=float(lat.max()))
        else:
            summary = LatencySummary(n=0)
        by_type = dict(self.by_type)
        by_type["DECODE"] = self.decodes + self.batches + sum(self.errors.get(k, 0) for k in ("BAD_VALUE", "INTERNAL"))
        return StatsReply(uptime_s=time.monotonic() - self.started, requests=self.requests,
                          decodes=self.decodes + self.batches, bins=self.decodes + self.bins_batched,
                          errors=dict(self.errors), by_type=by_type, streamed=self.streamed, prewarms=self.prewarms,
                          coalesced=self.coalesced,
                          latency_us=summary, window=self._window, busy_poll=self.busy_poll, provider=self.provider)

    # -- the loop ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask ``run`` to return (from a signal handler or another thread); it does within ~0.25 s."""
        self._stop = True

    def run(self) -> None:
        gc.collect()
        gc.freeze()  # objects from start-up never need scanning again: collections stay short
        if self.sub is None:
            (self._spin_router if self.busy_poll else self._block_router)()
        else:
            self._poll_both()

    def _reply(self, frames: list) -> None:
        """Answer a ROUTER message: [identity, (empty delimiter,) request] -> same envelope + reply."""
        if len(frames) == 2:
            frames[1] = self.handle(frames[1])
        else:
            frames = self._reply_envelope(frames)
        try:
            self._send(frames)
        except zmq.Again:  # the client's queue is full (not reading): drop, as ROUTER does
            pass

    def _send(self, frames: list) -> None:
        """send_multipart, without its per-call type checks and flag arithmetic for the usual
        [identity, reply]: +14-16% throughput at d = 174 (measured A/B, benchmarks/latency.py's probe)."""
        if len(frames) == 2:
            send = self.router.send
            send(frames[0], _SNDMORE)
            send(frames[1])
        else:
            self.router.send_multipart(frames)

    def _reply_envelope(self, frames: list) -> list:
        # A REQ client puts an empty delimiter before the request; echo everything up to it.
        if b"" in frames[1:]:
            cut = frames.index(b"", 1) + 1
        else:
            cut = 1
        body = frames[cut:]
        if len(body) == 1:
            return frames[:cut] + [self.handle(body[0])]
        self.requests += 1
        return frames[:cut] + [self._error(ErrorCode.BAD_ENVELOPE, f"a request is one frame after the envelope; "
                                                                     f"got {len(body)} frames")]

    def _reply_queued(self, first: list) -> None:
        """Serve ``first`` and the requests queued behind it, one-bin decodes in one engine call.

        Only when requests queue up (many clients, or one pipelining) is there anything to
        coalesce, so a lone request never waits. A batched engine call costs far less per bin
        than one call per bin (measured 3x at 32 bins, d = 174), which is what lets one core
        keep up with a burst. Results equal one-bin decodes up to float rounding."""
        recv, noblock = self.router.recv_multipart, _NOBLOCK
        queued = [first]
        while len(queued) < _MAX_BATCH:
            try:
                queued.append(recv(noblock))
            except zmq.Again:
                break
        t0 = self._t_arrival = time.perf_counter_ns()
        rows, buf, n, size = [], self._batch_frames, self.n_channels, self._fast_size
        for frames in queued:
            if len(frames) == 2 and len(frames[1]) == size:
                magic, version, msg_type, dtype, _, seq, t_client, n_ch, n_bins = wire.REQ.unpack_from(frames[1])
                if (msg_type == _DECODE and dtype == _F32 and n_bins == 1 and n_ch == n
                        and version == PROTOCOL_VERSION and magic == MAGIC):
                    at = len(rows) * size
                    buf[at:at + size] = frames[1]
                    rows.append((frames, seq, t_client))
                    continue
            self._reply(frames)  # anything else on its own
        if len(rows) < 2:
            for frames, _, _ in rows:
                self._reply(frames)
            return
        try:
            out = self.engine.decode(self._batch_x[:len(rows)])
        except Exception:  # noqa: BLE001 - e.g. one NaN bin: answer each alone, so only it errs
            for frames, _, _ in rows:
                self._reply(frames)
            return
        dt = time.perf_counter_ns() - t0
        self.requests += len(rows)
        self.coalesced += len(rows)
        replies = self.writer.write_rows([r[1] for r in rows], [r[2] for r in rows], dt, out)
        send, mask, size = self._send, self._window - 1, self.writer.frame_bytes
        for i, (frames, _, _) in enumerate(rows):
            frames[1] = replies[i * size:(i + 1) * size]  # sent with copy: the buffer is reused
            self._ring[self.decodes & mask] = dt
            self.decodes += 1
            try:
                send(frames)
            except zmq.Again:
                pass

    def _schedule_warm(self) -> None:
        """After a reply: if requests come at a steady period long enough for the caches to go
        cold in between, plan one engine warm-up shortly before the next is due.

        Under a shared CPU the model's weights and ORT's code leave the caches while the
        server sleeps, so a bin arriving after a pause costs several back-to-back decodes. One
        warm-up call just before the next bin brings them back; it costs one extra inference
        per bin and no spinning. A request that arrives before the warm-up cancels it, so
        back-to-back and irregular traffic pay nothing but this bookkeeping."""
        t, prev = self._t_arrival, self._t_prev
        self._t_prev = t
        gap = t - prev
        if self._warm is None or not 0 < gap < _WARM_MAX_PERIOD_NS:
            self._period_ns, self._warm_at = 0.0, 0
            return
        # Smoothed, so one late or early bin does not move the schedule much.
        period = self._period_ns = gap if not self._period_ns else 0.75 * self._period_ns + 0.25 * gap
        if period < _WARM_MIN_PERIOD_NS or abs(gap - period) > 0.25 * period:
            self._warm_at = 0
            return
        warm_at = t + int(period) - self._warm_lead_ns
        self._warm_period_ns = period
        self._warm_at = warm_at if warm_at > time.perf_counter_ns() + 50_000 else 0

    def _prewarm_or_request(self, sock: zmq.Socket, fd: int) -> None:
        """Wait until the planned warm-up time; warm unless a request arrived first."""
        warm_at, self._warm_at = self._warm_at, 0
        events, pollin = _EVENTS, _POLLIN
        while True:
            # ZMQ_FD only signals edges: read EVENTS before each wait (that also re-arms it).
            if sock.getsockopt(events) & pollin:
                self._warm_early()
                return
            if self._stop:
                return
            left = warm_at - time.perf_counter_ns()
            if left <= 0:
                break
            select.select([fd], [], [], left / 1e9)
        self._warm_now()

    def _warm_now(self) -> None:
        self._warm()
        self.prewarms += 1
        # Each warm-up in time lets the next one come a little later (warmer caches)...
        self._warm_lead_ns = max(self._warm_min_lead_ns, int(self._warm_lead_ns * 0.95))

    def _warm_early(self) -> None:
        # ... and a bin that beat its warm-up (a jittery stream) moves them earlier. With these
        # steps about one bin in ten arrives before its warm-up: measured, a warm-up 0.1 ms
        # before a bin halves its decode time, one 2 ms before barely helps, so a tight lead
        # that some bins beat is worth more than a safe one.
        self._warm_lead_ns = min(int(self._warm_period_ns) // 2, int(1.5 * self._warm_lead_ns))

    def _block_router(self) -> None:
        sock = self.router
        recv, fd = sock.recv_multipart, sock.getsockopt(zmq.FD)
        events, pollin = _EVENTS, _POLLIN
        while not self._stop:
            if self._warm_at:
                self._prewarm_or_request(sock, fd)
            try:
                frames = recv()
            except zmq.Again:
                continue
            if sock.getsockopt(events) & pollin:  # more are waiting: serve them together
                self._reply_queued(frames)
            else:
                self._reply(frames)
            self._schedule_warm()

    def _spin_router(self) -> None:
        sock, recv = self.router, self.router.recv_multipart
        events, pollin, noblock, now = _EVENTS, _POLLIN, _NOBLOCK, time.perf_counter_ns
        sched_yield = os.sched_yield
        while not self._stop:
            # Reading EVENTS also processes libzmq's pending commands, so a spin loop on it sees
            # a message as soon as the I/O thread has queued it.
            if sock.getsockopt(events) & pollin:
                if self._warm_at:
                    self._warm_at = 0
                    self._warm_early()
                frames = recv(noblock)
                if sock.getsockopt(events) & pollin:
                    self._reply_queued(frames)
                else:
                    self._reply(frames)
                self._schedule_warm()
            elif self._warm_at and now() >= self._warm_at:
                self._warm_at = 0
                self._warm_now()
            else:
                # Hands the core to libzmq's I/O thread when it has work: pinned to the same core,
                # it otherwise waits for the spinner's time slice (interleaved A/B, d = 174: b2b
                # p99.9 4.7-4.8 ms -> 0.65-0.86 ms, 100 Hz p99 3.6-3.9 ms -> 0.86-0.88 ms; p50s
                # within the runs' spread).
                sched_yield()

    def _poll_both(self) -> None:
        poller = zmq.Poller()
        if self.router is not None:
            poller.register(self.router, zmq.POLLIN)
        poller.register(self.sub, zmq.POLLIN)
        sub, pub = self.sub, self.pub
        while not self._stop:
            if self.busy_poll:
                timeout = 0
            elif self._warm_at:  # millisecond resolution here: fine for streams of <= 1 kHz
                timeout = max(0, (self._warm_at - time.perf_counter_ns()) // 1_000_000)
            else:
                timeout = _POLL_MS
            ready = dict(poller.poll(timeout))
            if not ready:
                if self._warm_at and time.perf_counter_ns() >= self._warm_at:
                    self._warm_at = 0
                    self._warm_now()
                elif self.busy_poll:
                    os.sched_yield()  # as in _spin_router: let a same-core I/O thread run
                continue
            if self._warm_at:
                self._warm_at = 0
                self._warm_early()
            if sub in ready:
                for _ in range(64):  # drain a burst, bounded so the router is never starved
                    try:
                        frames = sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    reply = self.handle(frames[-1]) if len(frames) == 1 else self._stream_envelope_error(frames)
                    try:
                        pub.send(reply)
                        self.streamed += 1
                    except zmq.Again:
                        pass
                    self._schedule_warm()
            if self.router is not None and self.router in ready:
                try:
                    self._reply(self.router.recv_multipart(zmq.NOBLOCK))
                    self._schedule_warm()
                except zmq.Again:
                    pass

    def _stream_envelope_error(self, frames: list) -> bytearray:
        self.requests += 1
        return self._error(ErrorCode.BAD_ENVELOPE, f"a streamed bin is one frame; got {len(frames)} frames")

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
    from runtime.engine import BundleDecoder

    engine = BundleDecoder(args.bundle, provider=args.provider, spin=args.busy_poll)
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
