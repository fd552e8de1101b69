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

The loop (``Server.run``) asks its wait strategy (runtime/serve/waits.py) for the sources that
may have input (runtime/serve/sources.py: the ROUTER, the SUB input, the XPUB's subscriptions,
the CURVE handshakes' ZAP requests) and serves each. ``_serve`` reads one message, counts it
(every message is counted once, where it is read) and classifies it once: a fast-path one-bin
decode is answered at once, or, when more are queued behind it, drained with them (up to
``MAX_BATCH`` while they are fast-path decodes) and served by the ``Coalescer`` (several streams'
bins in one engine call); other one-bin decodes are answered at once; a multi-bin DECODE (and
every later decode of its stream) joins the ``BulkLane``; anything else (controls, frames
refused with an error) waits in the ``ControlLane``, and a control flood beyond its notice is
dropped as it is read. Then, once per turn, a few control replies and one slice of bulk work
(runtime/serve/lanes.py, about 0.5 ms), so a one-bin request waits behind at most one slice.
The closed loop comes first. Every reply is computed by ``Replies`` (runtime/serve/replies.py);
pre-warming is runtime/serve/prewarm.py's planner; framing is runtime/wire.py; counters,
latencies and drops, runtime/serve/recorder.py.

Limits (runtime/serve/limits.py): a request frame is at most ``max_request_bytes`` (libzmq drops the
connection of a longer one); the queues of each peer hold at most a byte budget's worth of the
largest messages; an envelope is a few small frames; control requests are rate-limited per
peer; multi-bin work held here is bounded (OVERLOADED beyond). Security (runtime/security.py, runtime/serve/sources.py):
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
import sys
import threading
import time

import zmq

from swapvae.runtime import wire
from swapvae.runtime.history import StreamTable
from swapvae.runtime.security import CurveServer, check_endpoint, client_socket, is_local, secure_socket
from swapvae.runtime.serve.coalescing import MAX_BATCH, Coalescer
from swapvae.runtime.serve.lanes import SLICE_NS, BulkLane, ControlLane
from swapvae.runtime.serve.limits import (
    CONTROL_COST,
    CONTROL_RATE,
    HANDSHAKE_MS,
    HEARTBEAT_MS,
    HEARTBEAT_TIMEOUT_MS,
    ControlLimiter,
)
from swapvae.runtime.serve.recorder import Recorder
from swapvae.runtime.serve.replies import Replies
from swapvae.runtime.serve.serving import ServingBundle, prepare
from swapvae.runtime.serve.sources import STREAM_KEY, RouterSource, StreamSource, Subscriptions, ZapHandler
from swapvae.runtime.serve.waits import BlockingWait, SpinWait
from swapvae.schemas.protocol import MAX_BODY_BYTES, LslStats, MsgType, StatsReply

MAX_STREAMS = 1024  # streams whose history the server keeps (--max-streams)
HELD_RETRY_NS = 1_000_000  # how often held replies are offered again while no input wakes the loop
_DECODE = int(MsgType.DECODE)
_NOBLOCK, _EVENTS, _POLLIN = int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN)
_clock = time.perf_counter_ns


class Server:
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
                 slice_ns: int = SLICE_NS, loader=None, allow_channel_change: bool = False):
        if (sub is None) != (pub is None):
            raise ValueError("streaming needs both --sub (where bins come from) and --pub (where decodes go)")
        if bind is None and sub is None:
            raise ValueError("nothing to serve: give a ROUTER endpoint, or --sub and --pub")
        for endpoint, flag in ((bind, "--bind"), (sub, "--sub"), (pub, "--pub")):
            if endpoint is not None:
                check_endpoint(endpoint, flag)
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
        self.allow_channel_change = allow_channel_change
        self.recorder = Recorder(window)
        self.limiter = ControlLimiter(control_rate, max(1, int(control_rate)))  # bursts of a second's worth
        bundle = prepare(engine, MAX_BATCH, warmup, prewarm, self.streaming, max_body_bytes)
        self.streams = StreamTable(engine.history_bins, engine.latent_dim, max_streams)
        self._full_info = {True: True, False: True}  # by "is the stream the SUB input": INFO's training details
        self.replies = Replies(bundle, self.streams, self.recorder, self.limiter,
                               full_info=lambda key: self._full_info[key == STREAM_KEY], stats=self.stats)
        self._decode_one = self.replies.decode_one
        self.coalescer = Coalescer(self.replies, self.recorder)
        self.bulk = BulkLane(self.replies, self.recorder, slice_ns)
        self.controls = ControlLane(self.replies, self.recorder)
        self._install(bundle)
        self._stop = self._reloading = self._reload_asked = False
        self._reload_thread, self._reload_result, self._warms_before = None, None, 0
        self._switch = sys.getswitchinterval()
        self.lsl = None  # an LslBridge serving beside the sockets (runtime/lsl.py): its counters join STATS
        self._open(bind, sub, pub, context, sub_server_key)

    def _install(self, bundle: ServingBundle) -> None:
        """Take a prepared bundle into service: everything the hot path reads of it."""
        self.bundle = self.replies.bundle = bundle
        self.engine, self.n_channels, self.planner = bundle.engine, bundle.n_channels, bundle.planner
        self._match = bundle.one_bin.match

    def _open(self, bind, sub, pub, context, sub_server_key) -> None:
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.router = self.sub = self.pub = self.zap = self.peers = None
        self.endpoints: dict[str, str] = {}
        self.sources: list = []
        curve, lim = self.curve, self.bundle.limits
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
                self._full_info[False] = curve is not None or is_local(bind)
                self.peers = RouterSource(self.router, self.recorder)
                self.sources.append(self.peers)
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
                self._full_info[True] = curve is not None or is_local(pub)  # INFO is published to every subscriber
                self.sources.append(StreamSource(self.sub, self.pub, self.recorder))
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
        s.setsockopt(zmq.MAXMSGSIZE, self.bundle.limits.max_frame_bytes(self.curve is not None))  # longer: dropped
        if rcvhwm is not None:
            s.setsockopt(zmq.RCVHWM, rcvhwm)
        if sndhwm is not None:
            s.setsockopt(zmq.SNDHWM, sndhwm)

    def _denied(self) -> None:
        self.recorder.auth_denied += 1

    # -- one frame in, one frame out ------------------------------------------------------------
    def handle(self, frame, key: bytes = STREAM_KEY) -> bytes | bytearray | None:
        """The reply to one request frame of the stream ``key``, decoded at once whatever it is
        (in-process use and tests; the loop routes requests as the module doc says). Counted as
        a request received. Never raises. None: no reply (a control request beyond its peer's
        rate, after the second's notice)."""
        self.recorder.requests += 1
        return self.replies.answer(frame, key)

    def _denied(self) -> None:
        self.recorder.auth_denied += 1

    def stats(self, max_age_ns: int = 0) -> StatsReply:
        """Counters now; latency summaries at most ``max_age_ns`` old (STATS requests: 100 ms)."""
        t = self.streams
        limits = {**self.bundle.limits.as_dict(), "control_rate": int(self.limiter.rate * 1e9),
                  "max_streams": t.max_streams}
        s = self.recorder.stats(self._warms_before + self.planner.warms, self.busy_poll, self.provider,
                                streams=(len(t), t.evicted, t.max_streams), bulk=self.bulk.stats(), limits=limits,
                                max_age_ns=max_age_ns)
        if self.lsl is not None:
            s = s.model_copy(update={"lsl": LslStats(**self.lsl.stats())})
        return s

    # -- the loop ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask ``run`` to return (from a signal handler or another thread); it does within ~0.25 s."""
        self._stop = True

    def run(self) -> None:
        gc.collect()
        gc.freeze()  # objects from start-up never need scanning again: collections stay short
        wait, serve, bulk, controls = self._wait, self._serve, self.bulk, self.controls
        held = self.peers.held if self.peers is not None else {}
        while not self._stop:
            if self._reloading:
                self._reload_turn()
            planner = self.planner
            due = planner.due
            if held:  # replies wait for room in their peers' queues: look again soon
                self.peers.flush()
                if held:
                    due = min(due, _clock() + HELD_RETRY_NS) if due else _clock() + HELD_RETRY_NS
            spin = planner.spin_until
            ready = wait(due, bool(bulk.queues or controls.items), bool(spin) and _clock() < spin)
            for src in ready:
                if src.keyed is None:  # ZAP requests, subscriptions: served by the source itself
                    src.serve()
                else:
                    serve(src)
            if controls.items:  # a few control replies and errors per turn, after the decodes read
                controls.step()
            if bulk.queues:  # one slice of multi-bin work per turn
                bulk.step()
            elif not ready and planner.due and _clock() >= planner.due:  # nothing came before the planned warm-up
                planner.warm()

    def _serve(self, src) -> None:
        """Read the message queued on ``src`` and answer or route it; when more fast-path
        decodes are queued behind a fast-path decode, drain them into one batch."""
        try:
            frames = src.recv(_NOBLOCK)
        except zmq.Again:  # the wait woke for something else
            return
        t_read = _clock()
        planner = self.planner
        if planner.due:  # the request beat its warm-up
            planner.interrupted()
        key, frame, head = self._take(src, frames)
        if head is None:
            self._route(src, frames, frame, key, t_read)
        elif src.get(_EVENTS) & _POLLIN:
            self._drain(src, [(frames, t_read, key, frame, head)])
        else:
            src.answer(frames, self._decode_one(frame, head, key, t_read))
        planner.arrived(t_read)

    def _take(self, src, frames: list) -> tuple[bytes, object, tuple | None]:
        """Count a message read and find its stream key, its request frame (None: a refused
        envelope) and, for a fast-path decode (a float32 one-bin DECODE of the bundle's width,
        of a stream with no decodes waiting in the bulk lane), the fields the fast path needs."""
        self.recorder.requests += 1
        frame = src.request(frames)
        key = frames[0] if src.keyed else STREAM_KEY
        if frame is None:
            return key, None, None
        head = self._match(frame)
        if head is not None and self.bulk.queues and key in self.bulk.queues:
            head = None  # behind its stream's bulk work, in order
        return key, frame, head

    def _drain(self, src, batch: list) -> None:
        """Read the messages queued behind ``batch`` while they are fast-path decodes (up to
        MAX_BATCH in all) and serve them together (runtime/serve/coalescing.py); the first one
        that is not goes its own way after them."""
        recv, take = src.recv, self._take
        rest = None
        while len(batch) < MAX_BATCH:
            try:
                frames = recv(_NOBLOCK)
            except zmq.Again:
                break
            t = _clock()
            key, frame, head = take(src, frames)
            if head is None:
                rest = (src, frames, frame, key, t)
                break
            batch.append((frames, t, key, frame, head))
        self.coalescer.serve(src, batch)
        if rest is not None:
            self._route(*rest)

    def _route(self, src, frames: list, frame, key: bytes, t_read: int) -> None:
        """Where a message off the fast path goes: a one-bin DECODE is answered now; a
        multi-bin one (or any decode of a stream with decodes in the bulk lane) joins the bulk
        lane; a control request with a valid header beyond its peer's notice is dropped (one with
        a bad header gets its error, as section 6 orders them); anything else (controls, refused
        envelopes, frames too short for a header) waits in the control lane."""
        peeked = wire.peek(frame) if frame is not None else None
        if peeked is None:
            self.controls.add(src, frames, frame, key, t_read)
            return
        msg_type, n_bins = peeked
        if msg_type == _DECODE:
            queued = self.bulk.queues
            if n_bins == 1 and not (queued and key in queued):
                reply = self.replies.answer(frame, key, t_read)
            else:
                reply = self._to_bulk(src, frames, frame, key, t_read)
            if reply is not None:
                src.answer(frames, reply)
        elif (msg_type in CONTROL_COST and wire.valid_header(frame)
              and self.limiter.silenced(key, t_read, CONTROL_COST[msg_type])):
            self.recorder.drops.rate_limited += 1  # a valid control flood beyond its notice: dropped as it is read
        else:
            self.controls.add(src, frames, frame, key, t_read)

    def _to_bulk(self, src, frames: list, frame, key: bytes, t_read: int):
        """Queue a DECODE in the bulk lane; the reply now (an invalid request, or OVERLOADED when
        the lane is full), else None."""
        try:
            req = wire.parse_request(frame, self.n_channels, self.bundle.limits.max_bins)
        except Exception:  # noqa: BLE001 - the reply names the problem
            return self.replies.answer(frame, key, t_read)
        return self.bulk.submit(key, src, frames, req, len(frame), t_read)

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
            try:
                if isinstance(result, Exception):
                    raise result
                self.reload(result)
            except Exception as e:  # noqa: BLE001 - the old bundle keeps serving, whatever the reason
                self.recorder.reload_failures += 1
                self.recorder.reload_error = str(e)
                print(f"reload refused, still serving {self.bundle.name}: {e}", file=sys.stderr, flush=True)
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
        """Serve ``new`` (an engine, or a ``ServingBundle``) from now on; streams as the module doc says."""
        bundle = new if isinstance(new, ServingBundle) else prepare(new, MAX_BATCH, *self._options[:2], self.streaming,
                                                                   self._options[2])
        if bundle.n_channels != self.n_channels and not self.allow_channel_change:
            raise ValueError(f"the new bundle takes {bundle.n_channels} channels and this one {self.n_channels}: every "
                             f"client still sending {self.n_channels} would get BAD_SHAPE (serve with "
                             f"--allow-channel-change to switch anyway)")
        old, self._warms_before = self.bundle, self._warms_before + self.planner.warms
        self._install(bundle)
        kept = old.same_history(bundle)
        if not kept:  # the old latents mean nothing to the new model: all start afresh
            self.streams.restart(bundle.engine.history_bins, bundle.engine.latent_dim)
        if bundle.limits != old.limits:  # for connections made from now on
            lim = bundle.limits
            for s, rcv, snd in ((self.router, lim.router_rcvhwm, lim.router_sndhwm), (self.pub, None, lim.pub_sndhwm),
                                (self.sub, lim.sub_rcvhwm, None)):
                if s is not None:
                    self._limit(s, rcv, snd)
        self.recorder.reloads += 1
        self.recorder.reload_error = None
        print(f"reloaded: now serving {bundle.name} (streams {'kept' if kept else 'reset'})",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        for s in (self.router, self.sub, self.pub, self.zap):
            if s is not None:
                s.close(linger=0) if isinstance(s, zmq.Socket) else s.close()
        if self._own_context:
            self.context.term()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
