"""The decoding service: ``swapvae serve BUNDLE``.

One thread, one engine, two ways in:
- request/reply on a ROUTER socket (``--bind``): any number of DEALER or REQ clients. A ROUTER
  never waits for a client, so a client that vanishes or stops reading cannot wedge the server
  or anyone else (once its queue is full its replies are held, within a byte budget, then
  dropped and counted: runtime/sources.py);
- streaming (``--sub`` and ``--pub``): bins arriving on a SUB socket are decoded and the reply
  frames published on an XPUB socket.

Every frame gets exactly one reply (a refused envelope too, to its identity alone), except
control requests beyond their peer's rate after that second's RATE_LIMITED notice, and those
dropped when 4096 non-decodes already wait; a bad request gets an ERROR reply naming the
problem and nothing a client sends can stop the loop.
The hot path (one float32 bin of the bundle's width, recognised by ``wire.OneBinRequests``) is
one look-up of the sender's stream, one engine call (which copies the stream's history in), one
join into the reply frame and one write into the ``Recorder``'s rings of times; everything else
(other dtypes, control requests, errors) takes the general path, which is still cheap.

The loop (``Server.run``) asks its wait strategy (runtime/waits.py) for the sources that may
have input (runtime/sources.py: the ROUTER, the SUB input, the XPUB's subscriptions, the CURVE
handshakes' ZAP requests) and serves each; ``_serve`` reads one message and, when more are
queued behind it, drains up to ``MAX_BATCH`` one-bin decodes (runtime/batching.py: they share
engine calls, each stream's bins in order). Then, once per turn, a few requests that are not
decodes (controls, errors: the later lane) and one slice of pending multi-bin work
(runtime/lanes.py): a multi-bin DECODE is never decoded where it is read but in slices of about
0.5 ms between turns, so a one-bin request waits behind at most one slice of bulk work. The
closed loop comes first. Pre-warming is runtime/prewarm.py's planner; framing is in
runtime/wire.py; counters, latencies and drops in runtime/recorder.py.

Limits (runtime/limits.py): a request frame is at most ``max_request_bytes`` (libzmq drops the
connection of a longer one); the queues of each peer hold at most a byte budget's worth of the
largest messages; an envelope is a few small frames; control requests are rate-limited per
peer; multi-bin work held here is bounded (OVERLOADED beyond). Security (runtime/security.py):
CURVE with an allow-list is required on any bind that is not loopback, unless ``insecure``;
INFO's training details go only to authenticated or local peers.

Streams (protocol v2): the readout sees a window of the last ``history_bins`` latents of the
sender's stream: one ROUTER peer (its routing identity) or the SUB input (``STREAM_KEY``),
kept in a ``StreamTable`` of at most ``--max-streams``, the least recently used evicted.

Time: ``server_ns`` runs from the moment the request was read off its socket to the reply being
ready; ``queue_ns`` is the part of it before the request's turn came (behind other requests,
or, for multi-bin work, all but its own slices). The time a message waited inside libzmq before
the server read it is not visible here.

Reload (SIGHUP, ``request_reload``): the loader (``BundleDecoder`` of the path given, re-resolved,
with the same trusted keys) runs on a thread while the old bundle keeps serving; the loop
switches between two requests, or keeps the old bundle if loading failed. Streams keep their
histories when the new bundle's window and latent sizes are the same, else all start afresh
(their next reply says RESET_APPLIED). Multi-bin work already begun finishes on the bundle it
began on.
"""
from __future__ import annotations

import gc
import struct
import sys
import threading
import time

import zmq

from swapvae.runtime import wire
from swapvae.runtime.batching import MAX_BATCH, Coalescing
from swapvae.runtime.history import StreamTable
from swapvae.runtime.lanes import SLICE_NS, BulkLane, LaterLane
from swapvae.runtime.limits import CONTROL_COST, CONTROL_RATE, HANDSHAKE_MS, HEARTBEAT_MS, HEARTBEAT_TIMEOUT_MS, ControlLimiter
from swapvae.runtime.loaded import Loaded, prepare
from swapvae.runtime.recorder import Recorder
from swapvae.runtime.security import CurveServer, ZapHandler, client_socket, is_local, secure_socket
from swapvae.runtime.sources import STREAM_KEY, RouterSource, StreamSource, Subscriptions
from swapvae.runtime.waits import BlockingWait, SpinWait
from swapvae.schemas.protocol import MAX_BODY_BYTES, ErrorBody, ErrorCode, MsgType, StatsReply

MAX_STREAMS = 1024  # streams whose history the server keeps (--max-streams)
STATS_MAX_AGE_NS = 100_000_000  # a STATS reuses latency summaries computed this recently (counters are current)
HELD_RETRY_NS = 1_000_000  # how often held replies are offered again while no input wakes the loop
_RESET = wire.RESET
_DECODE, _PING, _INFO, _STATS = int(MsgType.DECODE), int(MsgType.PING), int(MsgType.INFO), int(MsgType.STATS)
_NOBLOCK, _EVENTS, _POLLIN = int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN)
_TYPE_BINS = struct.Struct("<5xB22xI")  # a request's msg_type and n_bins
_clock = time.perf_counter_ns


class Server(Coalescing):
    """Serves one engine (anything with ``n_channels``, ``manifest``, ``history_bins``,
    ``latent_dim``, ``new_stream``, ``decode_stream`` and ``decode_streams``; see
    runtime/engine.py) on a ROUTER socket and optionally a SUB -> XPUB stream. ``curve``: the
    server's keys and the clients' allow-list; ``loader``: builds the engine anew (SIGHUP)."""

    def __init__(self, engine, bind: str | None = "tcp://127.0.0.1:5555", sub: str | None = None,
                 pub: str | None = None, busy_poll: bool = False, provider: str = "cpu",
                 window: int = 1 << 16, warmup: int = 200, prewarm: bool = True,
                 max_streams: int = MAX_STREAMS, context: zmq.Context | None = None,
                 curve: CurveServer | None = None, insecure: bool = False, sub_server_key: bytes | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, control_rate: float = CONTROL_RATE,
                 slice_ns: int = SLICE_NS, loader=None):
        if (sub is None) != (pub is None):
            raise ValueError("streaming needs both --sub (where bins come from) and --pub (where decodes go)")
        if bind is None and sub is None:
            raise ValueError("nothing to serve: give a ROUTER endpoint, or --sub and --pub")
        exposed = [ep for ep in (bind, pub) if ep is not None and not is_local(ep)]
        if exposed and curve is None and not insecure:
            raise ValueError(f"{', '.join(exposed)} can be reached from other machines: serve with CURVE "
                             f"(--curve-secret and --allow; swapvae keygen curve NAME), or say --insecure")
        if sub is not None and not is_local(sub) and sub_server_key is None and not insecure:
            raise ValueError(f"--sub {sub} is on another machine: give its publisher's CURVE key (--sub-server-key, "
                             f"with --curve-secret), or say --insecure")
        if sub_server_key is not None and curve is None:
            raise ValueError("a CURVE key for the --sub publisher needs this server's own keys (--curve-secret)")
        self.busy_poll, self.provider, self.streaming = busy_poll, provider, sub is not None
        self.curve, self._loader, self._options = curve, loader, (warmup, prewarm, max_body_bytes)
        self.recorder = Recorder(window)
        self.limiter = ControlLimiter(control_rate, max(1, int(control_rate)))  # bursts of a second's worth
        self._rate_limited = ErrorBody(code=int(ErrorCode.RATE_LIMITED), error="RATE_LIMITED", message=(
            f"more than {control_rate:g} control requests per second from this peer")).model_dump_json().encode()
        self._install(prepare(engine, MAX_BATCH, warmup, prewarm, self.streaming, max_body_bytes))
        self.streams = StreamTable(engine.history_bins, engine.latent_dim, max_streams)
        self.lane, self.later = BulkLane(self, slice_ns), LaterLane(self)
        self._stop = self._reloading = self._reload_asked = False
        self._reload_thread, self._reload_result, self._warms_before = None, None, 0
        self._switch = sys.getswitchinterval()
        self._open(bind, sub, pub, context, sub_server_key)

    def _install(self, loaded: Loaded) -> None:
        """Take a prepared bundle into service: everything the hot path reads of it."""
        self.model, self.engine, self.n_channels = loaded, loaded.engine, loaded.n_channels
        self.layout, self.writer, self._one_bin, self.planner = loaded.layout, loaded.writer, loaded.one_bin, loaded.planner

    def _open(self, bind, sub, pub, context, sub_server_key) -> None:
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.router = self.sub = self.pub = self.zap = self.replies = None
        self.endpoints: dict[str, str] = {}
        self.sources: list = []
        curve, lim = self.curve, self.model.limits
        try:
            if curve is not None:  # the handler first: libzmq lets every CURVE client in while none is bound
                self.zap = ZapHandler(self.context, curve.allowed, self._denied)
                self.sources.append(self.zap)
            if bind is not None:
                self.router = self._socket(zmq.ROUTER, rcvhwm=lim.router_rcvhwm, sndhwm=lim.router_sndhwm)
                # A reply to a peer whose queue is full, or gone, raises (held or counted) instead of vanishing.
                self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
                self.router.bind(bind)
                self.endpoints["router"] = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
                self.replies = RouterSource(self.router, self.recorder, curve is not None or is_local(bind))
                self.sources.append(self.replies)
            if sub is not None:
                self.pub = self._socket(zmq.XPUB, sndhwm=lim.pub_sndhwm)
                self.pub.setsockopt(zmq.XPUB_MANUAL, 1)  # subscriptions applied by Subscriptions only
                self.pub.setsockopt(zmq.XPUB_NODROP, 1)  # a full subscriber queue raises: counted
                self.pub.bind(pub)
                self.endpoints["pub"] = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
                self.sub = self._socket(zmq.SUB, rcvhwm=lim.sub_rcvhwm, server=False)
                if sub_server_key is not None:
                    client_socket(self.sub, sub_server_key, curve.public, curve.secret)
                self.sub.setsockopt(zmq.SUBSCRIBE, b"")
                self.sub.connect(sub)
                self.endpoints["sub"] = sub
                self.sources.append(StreamSource(self.sub, self.pub, self.recorder, curve is not None or is_local(pub)))
                self.sources.append(Subscriptions(self.pub, self.recorder))
        except zmq.ZMQError as e:
            self.close()
            raise RuntimeError(f"cannot open the service sockets: {e}") from None
        self._wait = (SpinWait if self.busy_poll else BlockingWait)(self.sources)

    def _socket(self, kind: int, rcvhwm: int | None = None, sndhwm: int | None = None, server: bool = True):
        s = self.context.socket(kind)
        self._limit(s, rcvhwm, sndhwm)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDTIMEO, 0)
        s.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)  # a connection that never finishes its handshake goes
        s.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)  # a peer that stops answering goes, with its queues
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        if server and self.curve is not None:
            secure_socket(s, self.curve.public, self.curve.secret)
        return s

    def _limit(self, s: zmq.Socket, rcvhwm: int | None, sndhwm: int | None) -> None:
        """Byte limits as socket options (they apply to connections made after they are set)."""
        s.setsockopt(zmq.MAXMSGSIZE, self.model.limits.max_frame_bytes(self.curve is not None))  # longer: dropped
        if rcvhwm is not None:
            s.setsockopt(zmq.RCVHWM, rcvhwm)
        if sndhwm is not None:
            s.setsockopt(zmq.SNDHWM, sndhwm)

    def _denied(self) -> None:
        self.recorder.auth_denied += 1

    # -- one frame in, one frame out ------------------------------------------------------------
    def handle(self, frame, key: bytes = STREAM_KEY, t_read: int = 0, t_start: int = 0) -> bytes | bytearray | None:
        """The reply to one request frame of the stream ``key``, read off its socket at
        ``t_read`` and taken up at ``t_start`` (``perf_counter_ns``; 0: now, and not queued).
        Decodes any request at once, multi-bin ones included. Never raises. None: no reply (a
        control request beyond its peer's rate, after the second's notice)."""
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
            return self.engine_error(e, seq, t_client)
        dt = _clock() - t_read
        queued = t_start - t_read if t_start else 0
        self.recorder.decoded(dt, queued)
        return self.writer.write_one(seq, t_client, dt, queued, fresh, out)

    def _handle_general(self, frame, key: bytes, t_read: int, t_start: int) -> bytes | bytearray:
        try:
            req = wire.parse_request(frame, self.n_channels, self.model.limits.max_bins)
        except wire.ProtocolError as e:
            return self.error_reply(e.code, e.message, e.seq, e.t_client_ns)
        except Exception as e:  # noqa: BLE001 - e.g. a frame object without a buffer
            return self.error_reply(ErrorCode.BAD_HEADER, f"unreadable frame: {e}")
        if req.msg_type != _DECODE:  # decodes are counted by the decode counters, see Recorder.stats
            verdict = self.limiter.check(key, t_read, CONTROL_COST[req.msg_type])
            if verdict:  # beyond the peer's rate: a notice once a second, else nothing
                if verdict == ControlLimiter.DROP:
                    self.recorder.drops.rate_limited += 1
                    return None
                self.recorder.error("RATE_LIMITED")
                return wire.pack_reply(MsgType.ERROR, req.seq, req.t_client_ns, self._rate_limited,
                                       ErrorCode.RATE_LIMITED)
            self.recorder.control(MsgType(req.msg_type).name)
        if req.msg_type == _PING:
            reply = wire.pack_reply(MsgType.PONG, req.seq, req.t_client_ns)
        elif req.msg_type == _INFO:
            reply = wire.pack_reply(MsgType.INFO_REPLY, req.seq, req.t_client_ns, self._info_for(key))
        elif req.msg_type == _STATS:
            reply = wire.pack_json_reply(MsgType.STATS_REPLY, req.seq, req.t_client_ns, self.stats(STATS_MAX_AGE_NS))
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
                return self.engine_error(e, req.seq, req.t_client_ns)
            dt = _clock() - t_read
            if len(counts) == 1:
                self.recorder.decoded(dt, t_start - t_read)
            else:
                self.recorder.multi_bin(len(counts))
            return wire.finish(reply, dt, t_start - t_read)
        return wire.finish(reply, _clock() - t_read, t_start - t_read)

    def _info_for(self, key: bytes) -> bytes:
        """INFO with the training details for peers that are authenticated or local, else without."""
        src = next((s for s in self.sources if isinstance(s, StreamSource if key == STREAM_KEY else RouterSource)),
                   None)
        return self.model.info_full if src is None or src.full_info else self.model.info_public

    def engine_error(self, e: Exception, seq: int, t_client: int, where: str = "") -> bytearray:
        if isinstance(e, ValueError):  # the engine's word for counts it refuses (NaN, negative, ...)
            return self.error_reply(ErrorCode.BAD_VALUE, f"{e}{where}", seq, t_client)
        return self.error_reply(ErrorCode.INTERNAL, f"engine failed: {type(e).__name__}: {e}{where}", seq, t_client)

    def error_reply(self, code: ErrorCode, message: str, seq: int = 0, t_client: int = 0) -> bytearray:
        self.recorder.error(ErrorCode(code).name)
        return wire.pack_error(code, message, seq, t_client)

    def stats(self, max_age_ns: int = 0) -> StatsReply:
        """Counters now; latency summaries at most ``max_age_ns`` old (STATS requests: 100 ms)."""
        t = self.streams
        limits = {**self.model.limits.as_dict(), "control_rate": int(self.limiter.rate * 1e9),
                  "max_streams": t.max_streams}
        return self.recorder.stats(self._warms_before + self.planner.warms, self.busy_poll, self.provider,
                                   streams=(len(t), t.evicted, t.max_streams), bulk=self.lane.stats(), limits=limits,
                                   max_age_ns=max_age_ns)

    # -- the loop ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask ``run`` to return (from a signal handler or another thread); it does within ~0.25 s."""
        self._stop = True

    def run(self) -> None:
        gc.collect()
        gc.freeze()  # objects from start-up never need scanning again: collections stay short
        wait, serve, lane, later = self._wait, self._serve, self.lane, self.later
        held = self.replies.held if self.replies is not None else {}
        while not self._stop:
            if self._reloading:
                self._reload_turn()
            planner = self.planner
            due = planner.due
            if held:  # replies wait for room in their peers' queues: look again soon
                self.replies.flush()
                if held:
                    due = min(due, _clock() + HELD_RETRY_NS) if due else _clock() + HELD_RETRY_NS
            ready = wait(due, bool(lane.queues or later.items))
            for src in ready:
                if src.keyed is None:  # ZAP requests, subscriptions: served by the source itself
                    src.serve()
                else:
                    serve(src)
            if later.items:  # a few control replies and errors per turn, after the decodes read
                later.step()
            if lane.queues:  # one slice of multi-bin work per turn
                lane.step()
            elif not ready and planner.due and _clock() >= planner.due:  # nothing came before the planned warm-up
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

    def _answer(self, src, frames: list, t_read: int, t_start: int = 0, route: bool = True) -> None:
        frame = src.request(frames)
        key = frames[0] if src.keyed else STREAM_KEY
        if route and (frame is None or len(frame) != self._one_bin.size or self.lane.queues and key in self.lane.queues) \
                and self._route(src, frames, frame, key, t_read):
            return
        if frame is None:
            self.recorder.requests += 1
            reply = self.error_reply(ErrorCode.BAD_ENVELOPE, src.envelope_error(frames))
        else:
            reply = self.handle(frame, key, t_read, t_start)
            if reply is None:
                return
        src.answer(frames, reply)

    def _route(self, src, frames: list, frame, key: bytes, t_read: int) -> bool:
        """Send a request to a lane (True), or leave it to be answered now: the one-bin fast
        path's size says so at once; a multi-bin DECODE (or any of a stream with decodes in the
        multi-bin lane) goes there; anything but a DECODE waits its turn in the later lane."""
        if frame is None or len(frame) < 32:
            self.later.add(src, frames, frame, key, t_read)
            return True
        msg_type, n_bins = _TYPE_BINS.unpack_from(frame)
        if msg_type == _DECODE:
            if n_bins == 1 and not (self.lane.queues and key in self.lane.queues):
                return False
            self._to_lane(src, frames, frame, key, t_read)
        elif msg_type in CONTROL_COST and self.limiter.silenced(key, t_read, CONTROL_COST[msg_type]):
            self.recorder.requests += 1  # a flood beyond its notice: dropped as it is read
            self.recorder.drops.rate_limited += 1
        else:
            self.later.add(src, frames, frame, key, t_read)
        return True

    def _to_lane(self, src, frames: list, frame, key: bytes, t_read: int) -> None:
        """A DECODE for the multi-bin lane (or of a stream with decodes waiting there): refused
        now if it is invalid or the lane is full, else queued. Other requests are answered now."""
        try:
            req = wire.parse_request(frame, self.n_channels, self.model.limits.max_bins)
        except Exception:  # noqa: BLE001 - handle() names the problem
            reply = self.handle(frame, key, t_read)
        else:
            self.recorder.requests += 1
            reply = self.lane.submit(key, src, frames, req, len(frame), t_read)
        if reply is not None:
            src.answer(frames, reply)

    # -- reloading (SIGHUP) ----------------------------------------------------------------------
    def request_reload(self) -> None:
        """Load the bundle again (from a signal handler): see the module doc."""
        self._reload_asked = self._reloading = True

    def _reload_turn(self) -> None:
        if self._reload_result is not None:  # loaded (or failed): switch, or keep serving the old one
            result, self._reload_result = self._reload_result, None
            self._reload_thread.join()
            self._reload_thread = None
            sys.setswitchinterval(self._switch)
            if isinstance(result, Exception):
                self.recorder.reload_failures += 1
                print(f"reload refused, still serving {self.model.name}: {result}", file=sys.stderr, flush=True)
            else:
                self.reload(result)
        if self._reload_asked and self._reload_thread is None:
            self._reload_asked = False
            if self._loader is None:
                print("reload asked, but this server has no loader", file=sys.stderr, flush=True)
            else:  # the load runs beside the loop: give the loop the interpreter back often meanwhile
                self._switch = sys.getswitchinterval()
                sys.setswitchinterval(min(self._switch, 0.0005))
                self._reload_thread = threading.Thread(target=self._load_new, name="reload", daemon=True)
                self._reload_thread.start()
        self._reloading = self._reload_asked or self._reload_thread is not None

    def _load_new(self) -> None:
        warmup, prewarm, max_body = self._options
        try:
            self._reload_result = prepare(self._loader(), MAX_BATCH, warmup, prewarm, self.streaming, max_body)
        except Exception as e:  # noqa: BLE001 - reported by the loop, which keeps the old bundle
            self._reload_result = e

    def reload(self, new) -> None:
        """Serve ``new`` (an engine, or a ``Loaded``) from now on; streams as the module doc says."""
        loaded = new if isinstance(new, Loaded) else prepare(new, MAX_BATCH, *self._options[:2], self.streaming,
                                                             self._options[2])
        old, self._warms_before = self.model, self._warms_before + self.planner.warms
        self._install(loaded)
        if not old.same_history(loaded):  # the old latents mean nothing to the new model: all start afresh
            table = StreamTable(loaded.engine.history_bins, loaded.engine.latent_dim, self.streams.max_streams)
            table.evicted = self.streams.evicted
            self.streams = table
        if loaded.limits != old.limits:  # for connections made from now on
            lim = loaded.limits
            for s, rcv, snd in ((self.router, lim.router_rcvhwm, lim.router_sndhwm), (self.pub, None, lim.pub_sndhwm),
                                (self.sub, lim.sub_rcvhwm, None)):
                if s is not None:
                    self._limit(s, rcv, snd)
        self.recorder.reloads += 1
        print(f"reloaded: now serving {loaded.name} (streams {'kept' if old.same_history(loaded) else 'reset'})",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        for s in (self.router, self.sub, self.pub, self.zap):
            if s is not None:
                s.close(linger=0) if isinstance(s, zmq.Socket) else s.close()
        if self._own_context:
            self.context.term()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
