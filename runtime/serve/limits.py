"""How much any peer can make the server hold, and how often it may ask for control replies.

libzmq bounds one frame (``ZMQ_MAXMSGSIZE``: a longer frame drops the connection before it is
allocated) and counts its queues in messages (``ZMQ_RCVHWM``, ``ZMQ_SNDHWM``, per peer), not
bytes. ``Limits`` turns byte budgets into those options for a bundle: the largest request
(``max_bins`` bins of the widest dtype, capped at ``max_body_bytes``) and the largest reply
fix how many messages each queue may hold for its budget. What libzmq cannot bound is one
multipart message: it assembles every frame of a message before the server sees any, with no
limit on the number of frames (schemas/PROTOCOL.md, section 1, says what that leaves).

``ControlLimiter``: a token bucket per peer for INFO, STATS and PING (a STATS costs five
tokens: it is the one that costs the loop a tenth of a millisecond); beyond it the server
answers RATE_LIMITED once a second and drops the rest (see the class).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

from swapvae.schemas.protocol import MAX_BINS, MAX_BODY_BYTES, REPLY_HEADER_SIZE, REQUEST_HEADER_SIZE, MsgType

MiB = 1 << 20
PEER_IN_BYTES = 32 * MiB  # requests queued from one ROUTER peer (libzmq's pipe), bytes at most
PEER_OUT_BYTES = 32 * MiB  # replies queued to one ROUTER peer or one subscriber
STREAM_IN_BYTES = 64 * MiB  # bins queued on the SUB input (SUB drops beyond: counted as stream_gaps)
# Queues count messages: a budget / the largest message, but never fewer than a burst of small
# ones needs (MIN_HWM; the stream, which drops beyond its queues, MIN_STREAM_HWM: its bins come
# from the rig, one-bin ones in practice, so its queues hold kilobytes). With the default 2 MiB
# request cap the budgets decide for the ROUTER; a higher --max-request-bytes makes floors do.
HELD_PEER_BYTES = 32 * MiB  # replies held for one ROUTER peer whose libzmq queue is full, sent as it reads
HELD_BYTES = 64 * MiB  # ... for all peers together
BULK_BYTES = 64 * MiB  # multi-bin decode requests held by the server, all peers together
BULK_PEER_BYTES = 32 * MiB  # ... from one peer
CURVE_OVERHEAD = 33  # a CURVE MESSAGE command adds 33 bytes to the frame libzmq's size check sees
MAX_ENVELOPE_FRAMES = 8  # routing frames before the request (identity, proxies' hops, delimiter)
MAX_ENVELOPE_FRAME_BYTES = 255  # a ZeroMQ routing id is 1 to 255 bytes
HANDSHAKE_MS = 2000  # a connection that has not finished its ZMTP (or CURVE) handshake by then is closed
HEARTBEAT_MS, HEARTBEAT_TIMEOUT_MS = 2000, 6000  # a peer silent for that long is dropped with its queues
CONTROL_RATE, CONTROL_BURST = 50.0, 50  # control requests per second per peer, and the bucket's depth
# tokens per control request: a STATS costs ~0.1 ms of the loop (10 a second), INFO and PING a few us
CONTROL_COST = {MsgType.INFO: 1.0, MsgType.STATS: 5.0, MsgType.PING: 1.0}
MIN_HWM, MIN_STREAM_HWM, MAX_HWM = 16, 64, 1000


def max_bins_for(n_channels: int, max_body_bytes: int = MAX_BODY_BYTES) -> int:
    """Bins a DECODE may carry here: MAX_BINS, fewer if 8-byte values would exceed the body cap."""
    return max(1, min(MAX_BINS, max_body_bytes // (8 * n_channels)))


def _hwm(budget: int, message_bytes: int, least: int = MIN_HWM) -> int:
    return max(least, min(MAX_HWM, budget // max(1, message_bytes)))


@dataclass(frozen=True)
class Limits:
    """The byte limits of one bundle's service and the queue depths that enforce them."""
    max_bins: int
    max_request_bytes: int  # the largest valid request frame
    max_reply_bytes: int  # the largest reply (a max_bins decode)
    router_rcvhwm: int
    router_sndhwm: int
    sub_rcvhwm: int
    pub_sndhwm: int
    bulk_bytes: int = BULK_BYTES
    bulk_peer_bytes: int = BULK_PEER_BYTES

    @classmethod
    def of(cls, n_channels: int, reply_bytes_per_bin: int, max_body_bytes: int = MAX_BODY_BYTES) -> Limits:
        bins = max_bins_for(n_channels, max_body_bytes)
        request = REQUEST_HEADER_SIZE + bins * 8 * n_channels
        reply = REPLY_HEADER_SIZE + bins * reply_bytes_per_bin
        return cls(bins, request, reply, _hwm(PEER_IN_BYTES, request), _hwm(PEER_OUT_BYTES, reply),
                   _hwm(STREAM_IN_BYTES, request, MIN_STREAM_HWM), _hwm(PEER_OUT_BYTES, reply, MIN_STREAM_HWM))

    def max_frame_bytes(self, curve: bool = False) -> int:
        """``ZMQ_MAXMSGSIZE``: the largest request, and with CURVE room for its framing (libzmq
        checks the size of the frame on the wire, which CURVE's MESSAGE command makes longer)."""
        return self.max_request_bytes + (CURVE_OVERHEAD if curve else 0)

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in asdict(self).items()}


class ControlLimiter:
    """Token buckets by peer key: ``rate`` requests per second, bursts of ``burst``. Beyond it,
    ``check`` says NOTICE for the first request in ``notice_ns`` (answered RATE_LIMITED, so the
    client learns why) and DROP for the others (no reply: a flooding client pays its own
    timeouts, and the server pays a read per request, not a reply). The table holds at most
    ``max_peers`` buckets (the least recently used goes: a peer that comes back starts with a
    full bucket, so the table bounds memory, not the rate of a peer that reconnects; that is
    what CURVE's allow-list is for)."""
    ALLOW, NOTICE, DROP = 0, 1, 2

    def __init__(self, rate: float = CONTROL_RATE, burst: int = CONTROL_BURST, max_peers: int = 4096,
                 notice_ns: int = 1_000_000_000):
        if rate <= 0 or burst < 1:
            raise ValueError(f"control rate must be > 0 and burst >= 1, got {rate}, {burst}")
        self.rate, self.burst, self.max_peers = rate / 1e9, float(burst), max_peers  # rate per ns
        self.notice_ns = notice_ns
        self._buckets: OrderedDict[bytes, list] = OrderedDict()  # key -> [tokens, last time, last notice]

    def silenced(self, key: bytes, now_ns: int, cost: float = 1.0) -> bool:
        """Whether ``check`` would say DROP now (nothing changes): lets a flood be dropped as it
        is read, before any other work."""
        b = self._buckets.get(key)
        return (b is not None and min(self.burst, b[0] + (now_ns - b[1]) * self.rate) < cost
                and now_ns - b[2] < self.notice_ns)

    def check(self, key: bytes, now_ns: int, cost: float = 1.0) -> int:
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self.max_peers:
                self._buckets.popitem(last=False)
            b = self._buckets[key] = [self.burst, now_ns, now_ns - self.notice_ns]
        else:
            self._buckets.move_to_end(key)
            b[0] = min(self.burst, b[0] + (now_ns - b[1]) * self.rate)
            b[1] = now_ns
        if b[0] >= cost:
            b[0] -= cost
            return self.ALLOW
        if now_ns - b[2] >= self.notice_ns:
            b[2] = now_ns
            return self.NOTICE
        return self.DROP
