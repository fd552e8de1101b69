"""The reply to one request: the one place the service computes it.

``Replies`` holds what a reply depends on: the bundle in service (``ServingBundle``, swapped on
a reload), the streams' histories (``StreamTable``), the control-rate limiter and the
``Recorder`` that counts what was answered. The serving loop, the coalescing of queued decodes
and both lanes answer through it, so a rule about replies (an error's code, what a control
request costs, how a decode is timed) lives here once.

    decode_one(frame, head, key, ...)   the closed-loop fast path: a matched one-bin float32 DECODE
    answer(frame, key, ...)             any request frame, valid or not (the general path)
    error(...), engine_error(...)       ERROR replies, counted by code

It never raises and never counts a request as received: the loop counts each message once,
where it reads it (runtime/serve/server.py).
"""
from __future__ import annotations

import time

from swapvae.runtime import wire
from swapvae.runtime.history import StreamTable
from swapvae.runtime.serve.limits import CONTROL_COST, ControlLimiter
from swapvae.runtime.serve.recorder import Recorder
from swapvae.runtime.serve.serving import ServingBundle
from swapvae.runtime.serve.sources import STREAM_KEY
from swapvae.schemas.protocol import ErrorBody, ErrorCode, MsgType

STATS_MAX_AGE_NS = 100_000_000  # a STATS reuses latency summaries computed this recently (counters are current)
_RESET = wire.RESET
_DECODE, _PING, _INFO, _STATS = int(MsgType.DECODE), int(MsgType.PING), int(MsgType.INFO), int(MsgType.STATS)
_clock = time.perf_counter_ns


class Replies:
    """Replies to requests of any stream (see the module doc). ``full_info(key)``: whether the
    peer of stream ``key`` gets INFO with the training details (authenticated or local);
    ``stats()``: the STATS reply's contents, from the server that owns the counters."""

    def __init__(self, bundle: ServingBundle, streams: StreamTable, recorder: Recorder, limiter: ControlLimiter,
                 full_info=lambda key: True, stats=None):
        self.streams, self.recorder, self.limiter = streams, recorder, limiter
        self.full_info, self._stats = full_info, stats
        self._stream, self._decoded = streams.get, recorder.decoded  # the fast path's calls, bound once
        self.bundle = bundle
        self._rate_limited = ErrorBody(code=int(ErrorCode.RATE_LIMITED), error="RATE_LIMITED", message=(
            f"more than {limiter.rate * 1e9:g} control requests per second from this peer")).model_dump_json().encode()

    @property
    def bundle(self) -> ServingBundle:
        """The bundle in service (set by the server on a reload)."""
        return self._bundle

    @bundle.setter
    def bundle(self, b: ServingBundle) -> None:
        self._bundle = b
        self._engine_decode, self._counts = b.engine.decode_stream, b.one_bin.counts
        self._write_one = b.writer.write_one

    # -- decodes ------------------------------------------------------------------------------
    def decode_one(self, frame, head: tuple[int, int, int], key: bytes, t_read: int,
                   t_start: int = 0) -> bytes | bytearray:
        """The reply to a one-bin DECODE the fast path matched (``head``: its seq, t_client_ns
        and flags), read at ``t_read`` and taken up at ``t_start`` (0: at once)."""
        seq, t_client, reset = head  # reset: the flags byte, and RESET is the only bit it may hold here
        stream = self._stream(key)
        fresh = reset or not stream.n
        try:
            out = self._engine_decode(stream, self._counts(frame), reset)
        except Exception as e:  # noqa: BLE001 - the server outlives any engine failure
            return self.engine_error(e, seq, t_client)
        dt = _clock() - t_read
        queued = t_start - t_read if t_start else 0
        self._decoded(dt, queued)
        return self._write_one(seq, t_client, dt, queued, fresh, out)

    def answer(self, frame, key: bytes = STREAM_KEY, t_read: int = 0, t_start: int = 0) -> bytes | bytearray | None:
        """The reply to one request frame of the stream ``key`` (any request, decoded at once,
        multi-bin ones included). None: no reply (a control request beyond its peer's rate,
        after the second's notice)."""
        if not t_read:
            t_read = t_start or _clock()
        if not t_start:
            t_start = t_read
        head = self.bundle.one_bin.match(frame)
        if head is not None:
            return self.decode_one(frame, head, key, t_read, t_start)
        try:
            req = wire.parse_request(frame, self.bundle.n_channels, self.bundle.limits.max_bins)
        except wire.ProtocolError as e:
            return self.error(e.code, e.message, e.seq, e.t_client_ns)
        except Exception as e:  # noqa: BLE001 - e.g. a frame object without a buffer
            return self.error(ErrorCode.BAD_HEADER, f"unreadable frame: {e}")
        if req.msg_type == _DECODE:
            return self._decode(req, key, t_read, t_start)
        verdict = self.limiter.check(key, t_read, CONTROL_COST[req.msg_type])
        if verdict:  # beyond the peer's rate: a notice once a second, else nothing
            if verdict == ControlLimiter.DROP:
                self.recorder.drops.rate_limited += 1
                return None
            self.recorder.error("RATE_LIMITED")
            return wire.pack_reply(MsgType.ERROR, req.seq, req.t_client_ns, self._rate_limited, ErrorCode.RATE_LIMITED)
        self.recorder.control(MsgType(req.msg_type).name)
        if req.msg_type == _PING:
            reply = wire.pack_reply(MsgType.PONG, req.seq, req.t_client_ns)
        elif req.msg_type == _INFO:
            b = self.bundle
            reply = wire.pack_reply(MsgType.INFO_REPLY, req.seq, req.t_client_ns,
                                    b.info_full if self.full_info(key) else b.info_public)
        else:
            reply = wire.pack_json_reply(MsgType.STATS_REPLY, req.seq, req.t_client_ns, self._stats(STATS_MAX_AGE_NS))
        return wire.finish(reply, _clock() - t_read, t_start - t_read)

    def _decode(self, req: wire.Request, key: bytes, t_read: int, t_start: int) -> bytearray:
        """A DECODE off the fast path (another dtype, or several bins), decoded at once."""
        counts = req.counts
        stream = self.streams.get(key)
        reset = req.flags & _RESET
        fresh = bool(reset) or not stream.n
        b = self.bundle
        try:
            # The engine converts other dtypes itself (exact for every integer DType); a batch
            # is consecutive bins of the stream.
            out = b.engine.decode_stream(stream, counts[0] if len(counts) == 1 else counts, reset)
            reply = b.writer.write(req.seq, req.t_client_ns, out, fresh)
        except Exception as e:  # noqa: BLE001
            return self.engine_error(e, req.seq, req.t_client_ns)
        dt = _clock() - t_read
        if len(counts) == 1:
            self.recorder.decoded(dt, t_start - t_read)
        else:
            self.recorder.multi_bin(len(counts))
        return wire.finish(reply, dt, t_start - t_read)

    # -- errors -------------------------------------------------------------------------------
    def engine_error(self, e: Exception, seq: int, t_client: int, where: str = "") -> bytearray:
        if isinstance(e, ValueError):  # the engine's word for counts it refuses (NaN, negative, ...)
            return self.error(ErrorCode.BAD_VALUE, f"{e}{where}", seq, t_client)
        return self.error(ErrorCode.INTERNAL, f"engine failed: {type(e).__name__}: {e}{where}", seq, t_client)

    def error(self, code: ErrorCode, message: str, seq: int = 0, t_client: int = 0) -> bytearray:
        self.recorder.error(ErrorCode(code).name)
        return wire.pack_error(code, message, seq, t_client)
