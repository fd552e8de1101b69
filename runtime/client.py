"""A Python client for the decoding service, with timeouts: it never hangs when the server is gone.

    with Client("tcp://127.0.0.1:5555", timeout_ms=100) as c:
        out = c.decode(counts, reset=True)   # a trial's first bin: counts (n_channels,) of any wire dtype
        out = c.decode(counts)               # the next bins of the trial
        out.angle[0], out.direction[0], out.velocity[0], out.queue_ns

The client's socket is one stream for the server: the readout's window holds the latents of
the last ``history_bins - 1`` bins this client sent (INFO's ``history_bins``), so send a
trial's bins in order and ``reset=True`` at its first bin. A client that never resets gets windows of its own
preceding bins; after a reconnect (a timeout rebuilds the socket) it is a new stream.

A server with CURVE (schemas/PROTOCOL.md, section 1.2) needs its public key and a key pair of
this client's whose public half is on its allow-list:

    Client("tcp://rig:5555", server_key="server.key", client_secret="me.key_secret")

(files from ``swapvae keygen curve NAME``; a 40-character Z85 key works for ``server_key``).
A client whose key is not on the list gets no reply at all: ``ServiceTimeout``.

Bounded memory: a reply frame longer than ``max_reply_bytes`` (default 64 MiB) drops the
connection (libzmq's ``ZMQ_MAXMSGSIZE``: a timeout here), and libzmq queues at most a few
replies for this socket (``ZMQ_RCVHWM``, sized to 256 MiB of the largest), so a misbehaving
server cannot make the client buffer more.

It uses a DEALER socket, so a lost reply does not lock the socket (as it would a REQ socket).
Each reply is matched to its request by sequence number; replies to earlier requests that
timed out are discarded. After a timeout the socket is rebuilt, so requests queued for a dead
server are not delivered to the next one (the "lazy pirate" pattern). Like the ZeroMQ socket it
wraps, a Client belongs to one thread: give each thread its own.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import zmq

from swapvae.runtime import wire
from swapvae.runtime.output import DecodeOutput
from swapvae.schemas.protocol import DTYPE_NUMPY, ErrorBody, ErrorCode, InfoReply, MsgType, ReplyFlag, StatsReply

_WIRE_DTYPES = {np.dtype(v).str.lstrip("<=|") for v in DTYPE_NUMPY.values()}


class ServiceError(RuntimeError):
    """The server answered with an ERROR reply."""

    def __init__(self, code: int, name: str, message: str, seq: int):
        super().__init__(f"{name}: {message}")
        self.code, self.name, self.message, self.seq = code, name, message, seq


class ServiceTimeout(TimeoutError):
    """No reply within the timeout (server gone, overloaded or unreachable)."""


@dataclass
class Decoded(DecodeOutput):
    """One decode reply: the decode's sections (``DecodeOutput``: read-only views of the reply
    frame, shaped (n_bins, ...); direction int32; angle, direction, proba and velocity None
    without a readout) and what the header says about it."""
    seq: int
    flags: int  # ReplyFlag bits
    server_ns: int  # request read by the server -> reply ready
    queue_ns: int  # the part of server_ns the request waited for its turn
    rtt_ns: int  # round trip measured here, send to receipt

    @property
    def has_readout(self) -> bool:
        return bool(self.flags & ReplyFlag.HAS_READOUT)

    @property
    def reset_applied(self) -> bool:
        """The window of the first bin started afresh (a RESET, a new stream, or an evicted one)."""
        return bool(self.flags & ReplyFlag.RESET_APPLIED)


MAX_REPLY_BYTES = 64 << 20  # the largest reply frame accepted (a 4096-bin decode of ~4000 kept neurons)
RECEIVE_BUDGET = 256 << 20  # replies libzmq may queue for one client, bytes at most


class Client:
    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", timeout_ms: int = 1000,
                 context: zmq.Context | None = None, server_key=None, client_secret=None,
                 max_reply_bytes: int = MAX_REPLY_BYTES):
        if timeout_ms <= 0:
            raise ValueError("timeout_ms must be positive: a client without a timeout can hang forever")
        from swapvae.runtime.security import check_endpoint

        check_endpoint(endpoint, "the endpoint")
        if (server_key is None) != (client_secret is None):
            raise ValueError("CURVE needs both server_key (the server's public key) and client_secret "
                             "(this client's key pair, NAME.key_secret)")
        self.endpoint, self.timeout_ms, self.max_reply_bytes = endpoint, int(timeout_ms), int(max_reply_bytes)
        self._curve = None
        if server_key is not None:
            from swapvae.runtime.security import key_or_file, load_secret

            public, secret = client_secret if isinstance(client_secret, tuple) else load_secret(client_secret)
            self._curve = (key_or_file(server_key), public, secret)
        self.context = context or zmq.Context.instance()
        self._seq = itertools.count(1)
        self._bufs: dict[tuple[int, str], wire.RequestBuffer] = {}
        self._sock: zmq.Socket | None = None
        self._connect()

    def _connect(self) -> None:
        s = self.context.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)  # close() never waits for a dead server
        s.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        s.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        s.setsockopt(zmq.MAXMSGSIZE, self.max_reply_bytes)
        s.setsockopt(zmq.RCVHWM, max(2, min(1000, RECEIVE_BUDGET // self.max_reply_bytes)))
        s.setsockopt(zmq.SNDHWM, 16)  # one request in flight: a deeper queue only holds stale ones
        if self._curve is not None:
            from swapvae.runtime.security import client_socket

            client_socket(s, *self._curve)
        s.connect(self.endpoint)
        self._sock = s

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- raw exchange ------------------------------------------------------------------------------
    def request(self, frame, seq: int) -> tuple[wire.ReplyFields, memoryview, bytes, int]:
        """Send one request frame and wait for the reply with sequence number ``seq``.

        Returns (header, body, frame, rtt_ns). Raises ServiceTimeout, or ServiceError for an
        ERROR reply."""
        if self._sock is None:
            raise RuntimeError("client is closed")
        sock = self._sock
        t0 = time.perf_counter_ns()
        deadline = t0 + self.timeout_ms * 1_000_000
        shortened = False
        try:
            sock.send(frame, copy=True)
            while True:
                reply = sock.recv()
                t1 = time.perf_counter_ns()
                head, body = wire.parse_reply(reply)
                if head.seq == seq:
                    break
                # A late reply to a request that timed out earlier: skip it, within the same deadline.
                left = (deadline - t1) // 1_000_000
                if left <= 0:
                    raise zmq.Again()
                sock.setsockopt(zmq.RCVTIMEO, int(left))
                shortened = True
        except zmq.Again:
            self._reset()
            raise ServiceTimeout(f"no reply from {self.endpoint} within {self.timeout_ms} ms") from None
        if shortened:
            sock.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        if head.status != ErrorCode.OK:
            raise _service_error(head, body)
        return head, body, reply, t1 - t0

    def _reset(self) -> None:
        self.close()
        self._connect()

    # -- requests ----------------------------------------------------------------------------------
    def decode(self, counts: np.ndarray, reset: bool = False) -> Decoded:
        """Decode one bin (n_channels,) or consecutive bins (n_bins, n_channels) of this client's
        stream; ``reset``: the first of them starts a trial (the server forgets the stream's history)."""
        seq = next(self._seq)
        counts = np.asarray(counts)
        if counts.dtype.str.lstrip("<=|") not in _WIRE_DTYPES:  # e.g. int64 from np.array([...])
            counts = counts.astype(np.float32)
        if counts.ndim == 1:
            key = (counts.shape[0], counts.dtype.str)
            buf = self._bufs.get(key)
            if buf is None:
                buf = self._bufs[key] = wire.RequestBuffer(counts.shape[0], counts.dtype)
            buf.counts[:] = counts
            frame = buf.stamp(seq, time.monotonic_ns(), reset)
        else:
            frame = wire.pack_request(MsgType.DECODE, seq, time.monotonic_ns(), counts,
                                      int(wire.RESET if reset else 0))
        head, body, _, rtt = self.request(frame, seq)
        if head.msg_type != MsgType.DECODE_REPLY:
            raise ServiceError(-1, "UNEXPECTED", f"expected a decode reply, got message type {head.msg_type}", seq)
        return Decoded(**wire.decode_arrays(head, body), seq=seq, flags=head.flags, server_ns=head.server_ns,
                       queue_ns=head.queue_ns, rtt_ns=rtt)

    def _control(self, msg_type: MsgType) -> tuple[wire.ReplyFields, memoryview, int]:
        seq = next(self._seq)
        head, body, _, rtt = self.request(wire.pack_request(msg_type, seq, time.monotonic_ns()), seq)
        return head, body, rtt

    def ping(self) -> int:
        """Round trip of a PING, ns."""
        return self._control(MsgType.PING)[2]

    def info(self) -> InfoReply:
        return InfoReply.model_validate_json(bytes(self._control(MsgType.INFO)[1]))

    def stats(self) -> StatsReply:
        return StatsReply.model_validate_json(bytes(self._control(MsgType.STATS)[1]))


def _service_error(head: wire.ReplyFields, body) -> ServiceError:
    try:
        err = ErrorBody.model_validate_json(bytes(body))
        return ServiceError(err.code, err.error, err.message, head.seq)
    except ValueError:  # not the JSON the spec promises: show what came
        name = ErrorCode(head.status).name if head.status in set(ErrorCode) else f"status {head.status}"
        return ServiceError(head.status, name, bytes(body).decode(errors="replace"), head.seq)

