"""The wire protocol of the decoding service, version 2: numbers, byte layouts and the JSON bodies.

This module is the definition; ``runtime/wire.py`` implements it for the server and the Python
client, and ``schemas/PROTOCOL.md`` explains it for rig software written in C, C++ or MATLAB.
It depends on nothing but pydantic, so a rig PC can validate messages without the runtime.

Every message is one ZeroMQ frame: a fixed little-endian header, then a body. Requests have a
32-byte header, replies a 56-byte one. Decode bodies are raw little-endian arrays; control
bodies (info, stats, error) are UTF-8 JSON described by the pydantic models below.

Version 2 (issue 11) decodes streams: the readout sees a window of the last ``history_bins``
latents of the sender's stream (one ROUTER peer, or the SUB input), a request flag resets
that history at a trial start, and the reply carries the decoded velocity, the time the
request queued in the server and flags saying which sections are present and whether the
window started afresh.

``python -m schemas.protocol`` prints the JSON Schema of the headers and control messages
(committed as ``schemas/protocol.schema.json``; a test keeps the two equal).
"""
from __future__ import annotations

import json
import struct
from enum import IntEnum, IntFlag
from typing import Any, ClassVar, Literal, NamedTuple, Self

from pydantic import BaseModel, ConfigDict, Field

MAGIC = b"SVAE"
PROTOCOL_VERSION = 2

# (field, struct code) in wire order; "<" = little-endian, no padding. Offsets follow from the
# codes; the spec's tables are checked against these by tests/test_wire.py.
REQUEST_LAYOUT: tuple[tuple[str, str], ...] = (
    ("magic", "4s"),
    ("version", "B"),
    ("msg_type", "B"),
    ("dtype", "B"),  # decode: element type of the body (DType); 0 otherwise
    ("flags", "B"),  # RequestFlag bits; the others are reserved and must be 0
    ("seq", "Q"),  # chosen by the client, echoed in the reply
    ("t_client_ns", "Q"),  # opaque to the server, echoed (by convention the client's monotonic clock)
    ("n_channels", "I"),  # decode: values per bin; 0 otherwise
    ("n_bins", "I"),  # decode: rows in the body (1 in closed loop); 0 otherwise
)
REPLY_LAYOUT: tuple[tuple[str, str], ...] = (
    ("magic", "4s"),
    ("version", "B"),  # the server's protocol version
    ("msg_type", "B"),  # request type | 0x80, or ERROR (0xFF)
    ("status", "B"),  # 0 = OK, otherwise an ErrorCode
    ("flags", "B"),  # ReplyFlag bits (decode replies); 0 otherwise
    ("seq", "Q"),  # echoed; 0 when the request header could not be read
    ("t_client_ns", "Q"),  # echoed; 0 when the request header could not be read
    ("server_ns", "I"),  # request read off the socket -> reply ready, ns (saturates at 2**32 - 1)
    ("queue_ns", "I"),  # the part of server_ns spent waiting before this request's turn came
    ("n_bins", "I"),  # decode: rows in the body; 0 otherwise
    ("content_dim", "H"),  # decode: row widths of the sections (0 otherwise)
    ("style_dim", "H"),
    ("n_classes", "H"),  # 0 without HAS_READOUT
    ("velocity_dim", "H"),  # 0 without HAS_READOUT
    ("history_bins", "H"),  # decode: bins in the readout's window (k); 0 without HAS_READOUT
    ("reserved", "H"),
    ("n_rates", "I"),
    ("body_bytes", "I"),  # bytes after the header
)
REQUEST_FORMAT = "<" + "".join(code for _, code in REQUEST_LAYOUT)
REPLY_FORMAT = "<" + "".join(code for _, code in REPLY_LAYOUT)
REQUEST_HEADER_SIZE = struct.calcsize(REQUEST_FORMAT)  # 32
REPLY_HEADER_SIZE = struct.calcsize(REPLY_FORMAT)  # 56


class Section(NamedTuple):
    """One section of a decode reply body: ``n_bins`` rows of ``width`` elements of ``dtype``."""
    name: str
    dtype: str  # little-endian numpy dtype; every element is 4 bytes
    width: str | None  # the reply header field holding the row width; None: one element per row
    readout: bool  # present only in replies flagged HAS_READOUT (zero bytes otherwise)


# The body of a decode reply: these sections in this order, each n_bins rows, row-major, so every
# section starts 4-byte aligned. The one definition of the decode output's fields: the engine's
# DecodeOutput, the client's Decoded and the reply writer all follow it.
DECODE_SECTIONS: tuple[Section, ...] = (
    Section("content", "<f4", "content_dim", False),  # content latent
    Section("style_mean", "<f4", "style_dim", False),  # style latent mean
    Section("angle", "<f4", None, True),  # radians, atan2 of the probability-weighted class vectors
    Section("direction", "<i4", None, True),  # most probable direction class
    Section("proba", "<f4", "n_classes", True),  # class probabilities
    Section("velocity", "<f4", "velocity_dim", True),  # hand velocity, manifest.readout.velocity components
    Section("rates", "<f4", "n_rates", False),  # denoised rates of the kept neurons, in the model's input unit
)

MAX_BINS = 4096  # rows per decode request at most; a server may allow fewer (INFO max_bins), else BAD_SHAPE
MAX_BODY_BYTES = 2 << 20  # default cap on a request body: max_bins = min(MAX_BINS, MAX_BODY_BYTES // (8 * n_channels))


class MsgType(IntEnum):
    DECODE = 1
    INFO = 2
    STATS = 3
    PING = 4
    DECODE_REPLY = 0x81
    INFO_REPLY = 0x82
    STATS_REPLY = 0x83
    PONG = 0x84
    ERROR = 0xFF


REPLY_BIT = 0x80


class RequestFlag(IntFlag):
    """Bits of a request's ``flags`` byte. Any other bit set gets BAD_HEADER."""
    RESET = 0x01  # DECODE: the request's first bin starts a trial: the stream's history is dropped first


class ReplyFlag(IntFlag):
    """Bits of a reply's ``flags`` byte (decode replies; 0 on the others)."""
    HAS_READOUT = 0x01  # the angle, direction, proba and velocity sections are present
    RESET_APPLIED = 0x02  # the window of the request's first bin started afresh (RESET, new or evicted stream)


REQUEST_FLAGS = int(RequestFlag.RESET)  # every bit a request may set


class DType(IntEnum):
    """Element type of a decode request's body. Every one is converted to float32 counts."""
    FLOAT32 = 1
    FLOAT64 = 2  # MATLAB's default
    UINT8 = 3
    INT16 = 4  # the type of the recordings in shared/data
    UINT16 = 5
    INT32 = 6


DTYPE_NUMPY: dict[DType, str] = {
    DType.FLOAT32: "<f4",
    DType.FLOAT64: "<f8",
    DType.UINT8: "u1",
    DType.INT16: "<i2",
    DType.UINT16: "<u2",
    DType.INT32: "<i4",
}


class ErrorCode(IntEnum):
    OK = 0
    BAD_HEADER = 1  # frame shorter than the header, wrong magic, or reserved request flag bits set
    BAD_VERSION = 2  # protocol version this server does not speak
    UNKNOWN_TYPE = 3  # msg_type is not a request type
    BAD_DTYPE = 4  # dtype code not in DType
    BAD_SHAPE = 5  # n_channels differs from the bundle's, or n_bins outside 1..MAX_BINS
    BAD_LENGTH = 6  # body length != n_bins * n_channels * itemsize (truncated or padded frame)
    BAD_VALUE = 7  # NaN, inf or negative counts
    INTERNAL = 8  # the engine failed; the server keeps serving
    BAD_ENVELOPE = 9  # more than one frame after the routing envelope, or an envelope over its limits
    RATE_LIMITED = 10  # control requests (INFO, STATS, PING) beyond the peer's rate
    OVERLOADED = 11  # multi-bin decodes beyond what the server holds pending (per peer or in all)


# ----------------------------------------------------------------------------------------------
# Pydantic views of the headers (for validation, documentation and JSON Schema; the hot path
# uses struct directly) and the JSON bodies of control messages.

class _Header(BaseModel):
    """A fixed binary header: its fields, in wire order, are ``_layout`` packed with ``_format``."""
    model_config = ConfigDict(extra="forbid")
    _layout: ClassVar[tuple[tuple[str, str], ...]]
    _format: ClassVar[str]

    def pack(self) -> bytes:
        return struct.pack(self._format, *(getattr(self, k) for k, _ in self._layout))

    @classmethod
    def unpack(cls, frame: bytes) -> Self:
        return cls(**dict(zip((k for k, _ in cls._layout), struct.unpack_from(cls._format, frame))))


class _Body(BaseModel):
    # A client must read replies of a newer server of its version, which may add keys (PROTOCOL.md, 10).
    model_config = ConfigDict(extra="ignore")


class RequestHeader(_Header):
    """The 32-byte header of every request (little-endian, struct format ``<4sBBBBQQII``)."""
    magic: Literal[b"SVAE"] = MAGIC
    version: int = Field(PROTOCOL_VERSION, ge=0, le=0xFF)
    msg_type: MsgType
    dtype: int = Field(0, ge=0, le=0xFF, description="DType code for DECODE, else 0")
    flags: int = Field(0, ge=0, le=0xFF, description="RequestFlag bits (0x01 RESET); other bits must be 0")
    seq: int = Field(0, ge=0, le=0xFFFFFFFFFFFFFFFF)
    t_client_ns: int = Field(0, ge=0, le=0xFFFFFFFFFFFFFFFF)
    n_channels: int = Field(0, ge=0, le=0xFFFFFFFF)
    n_bins: int = Field(0, ge=0, le=0xFFFFFFFF)
    _layout, _format = REQUEST_LAYOUT, REQUEST_FORMAT


class ReplyHeader(_Header):
    """The 56-byte header of every reply (little-endian, struct format ``<4sBBBBQQIIIHHHHHHII``)."""
    magic: Literal[b"SVAE"] = MAGIC
    version: int = Field(PROTOCOL_VERSION, ge=0, le=0xFF)
    msg_type: MsgType
    status: ErrorCode = ErrorCode.OK
    flags: int = Field(0, ge=0, le=0xFF, description="ReplyFlag bits (0x01 HAS_READOUT, 0x02 RESET_APPLIED)")
    seq: int = Field(0, ge=0, le=0xFFFFFFFFFFFFFFFF)
    t_client_ns: int = Field(0, ge=0, le=0xFFFFFFFFFFFFFFFF)
    server_ns: int = Field(0, ge=0, le=0xFFFFFFFF, description="request read -> reply ready, ns")
    queue_ns: int = Field(0, ge=0, le=0xFFFFFFFF, description="the part of server_ns before the request's turn")
    n_bins: int = Field(0, ge=0, le=0xFFFFFFFF)
    content_dim: int = Field(0, ge=0, le=0xFFFF)
    style_dim: int = Field(0, ge=0, le=0xFFFF)
    n_classes: int = Field(0, ge=0, le=0xFFFF)
    velocity_dim: int = Field(0, ge=0, le=0xFFFF)
    history_bins: int = Field(0, ge=0, le=0xFFFF)
    reserved: int = Field(0, ge=0, le=0xFFFF)
    n_rates: int = Field(0, ge=0, le=0xFFFFFFFF)
    body_bytes: int = Field(0, ge=0, le=0xFFFFFFFF)
    _layout, _format = REPLY_LAYOUT, REPLY_FORMAT


class ErrorBody(_Body):
    """Body of an ERROR reply: the code again, its name, and a message that names the problem."""
    code: int
    error: str = Field(description="ErrorCode name, e.g. BAD_SHAPE")
    message: str


class InfoReply(_Body):
    """Body of an INFO_REPLY: what a client needs to talk to this server, and the bundle manifest."""
    protocol_version: int = PROTOCOL_VERSION
    server: str = Field(description="implementation and version, for logs")
    n_channels: int = Field(description="values per bin that DECODE requests must carry")
    content_dim: int
    style_dim: int
    n_classes: int = Field(description="0 without a readout")
    velocity_dim: int = Field(description="0 without a readout")
    history_bins: int = Field(description="bins in the readout's window (the stream's last history_bins - 1 "
                                          "and the current one); 0 without a readout")
    has_readout: bool = Field(description="decode replies carry angle, direction, proba and velocity")
    n_rates: int
    accepted_dtypes: list[str] = Field(description="DType names the server converts to float32")
    max_bins: int = Field(MAX_BINS, description="n_bins limit of a DECODE here (at most MAX_BINS)")
    max_request_bytes: int = Field(0, description="the largest request frame this server reads; a longer one "
                                                  "drops the connection")
    streaming: bool = Field(False, description="whether the SUB -> PUB stream is running")
    training_details: bool = Field(True, description="whether manifest holds the training section, library "
                                                     "versions and quantization errors (authenticated or "
                                                     "loopback peers only)")
    manifest: dict[str, Any] = Field(description="the bundle's manifest.json (schemas/manifest.py), without "
                                                 "training, versions and quantization unless training_details")


class LatencySummary(_Body):
    """A time over the most recent ``n`` one-bin DECODE requests, us: mean and max exact, percentiles
    from a log-scale histogram (32 buckets per octave: within 1.6% of the exact value)."""
    n: int
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    p999: float | None = None
    max: float | None = None


class Drops(_Body):
    """What was lost, counted where it happens."""
    stream_gaps: int = Field(0, description="bins missing from the SUB input: seq gaps of its DECODE requests")
    pub_full: int = Field(0, description="times a subscriber's queue was found full: it loses the replies "
                                         "from then until it drains (libzmq does not count them)")
    replies_full: int = Field(0, description="ROUTER replies dropped: the peer's queue was full (not reading)")
    replies_unroutable: int = Field(0, description="ROUTER replies dropped: the peer had gone")
    rate_limited: int = Field(0, description="control requests beyond their peer's rate left unanswered (the "
                                             "first in each second is answered RATE_LIMITED)")
    backlog: int = Field(0, description="requests other than decodes dropped unanswered: 4096 (or 16 MiB) of "
                                        "them were already waiting for their turn")


class Bulk(_Body):
    """Multi-bin decodes, served a slice (one engine call) at a time between one-bin ones."""
    pending: int = Field(0, description="decode requests waiting in the multi-bin lane now")
    pending_bytes: int = Field(0, description="their request bytes")
    slices: int = Field(0, description="engine calls made for them since start")
    slice_bins: int = Field(0, description="bins per slice now (sized to about slice_us)")
    slice_us: float = Field(0.0, description="the target time of one slice, us")
    slice_max_us: float = Field(0.0,
                                description="the longest slice (engine call and copy into the reply) since start, us")


class LslStats(_Body):
    """The Lab Streaming Layer bridge (``swapvae serve --lsl-in``; runtime/lsl.py)."""
    stream: str = Field(description="the input stream's name")
    kind: Literal["counts", "fine", "spikes"] = Field(description="what one input sample is")
    publish: Literal["newest", "all"] = Field(description="newest: of a backlog, only the newest decode is pushed")
    samples: int = Field(0, description="input samples taken")
    bins: int = Field(0, description="bins decoded")
    published: int = Field(0, description="decodes pushed to the outlet")
    stale_skipped: int = Field(0, description="decodes of a backlog held back, newer ones waiting (publish newest)")
    bad_samples: int = Field(0, description="samples or bins refused: NaN, infinite or negative counts, spike "
                                            "channels out of range")
    history_restarts: int = Field(0, description="bins after a gap of more than 1.5 bins: the history starts afresh")
    late_spikes: int = Field(0, description="spikes for a bin already closed, dropped")
    fine_dropped: int = Field(0, description="fine samples of partial bins dropped after lost samples")
    errors: int = Field(0, description="failed pulls (liblsl errors), retried after 0.5 s")
    last_error: str | None = Field(None, description="the last of them")


class StatsReply(_Body):
    """Body of a STATS_REPLY: counters since start and recent latency percentiles."""
    protocol_version: int = PROTOCOL_VERSION
    uptime_s: float
    requests: int = Field(description="frames received, valid or not, both sockets")
    decodes: int = Field(description="DECODE requests answered with a result")
    bins: int = Field(description="bins decoded")
    errors: dict[str, int] = Field(description="error replies by ErrorCode name")
    by_type: dict[str, int] = Field(description="valid requests by MsgType name")
    streamed: int = Field(0, description="decodes published on the stream")
    prewarms: int = Field(0, description="engine warm-ups run while idle, ahead of an expected bin")
    coalesced: int = Field(0, description="one-bin decodes that shared an engine call with other queued ones")
    streams: int = Field(0, description="streams whose history the server holds now")
    streams_evicted: int = Field(0, description="streams dropped (least recently used) to stay within max_streams")
    max_streams: int = Field(0, description="the most streams the server holds (--max-streams)")
    latency_us: LatencySummary = Field(description="server_ns: request read off the socket -> reply ready")
    queue_us: LatencySummary = Field(description="queue_ns: the part of server_ns spent waiting behind other requests")
    work_us: LatencySummary | None = Field(None, description="server_ns - queue_ns: the work on each request")
    window: int = Field(description="capacity of the latency ring buffer")
    dropped: Drops = Field(default_factory=Drops)
    bulk: Bulk = Field(default_factory=Bulk)
    subscribers: int = Field(0, description="stream subscribers now (subscriptions to '' or 'SVAE')")
    auth_denied: int = Field(0, description="CURVE handshakes refused (a key not on the allow-list)")
    reloads: int = Field(0, description="bundles taken into service on SIGHUP")
    reload_failures: int = Field(0, description="SIGHUP reloads refused (the old bundle kept serving)")
    reload_error: str | None = Field(None, description="why the last reload was refused; None after one that took")
    limits: dict[str, int] = Field(default_factory=dict, description="byte limits and queue depths in force")
    lsl: LslStats | None = Field(None, description="the LSL bridge; None without --lsl-in")
    busy_poll: bool
    provider: str


def json_schema() -> dict[str, Any]:
    """JSON Schema of the headers and control bodies, one document with named definitions."""
    models = (RequestHeader, ReplyHeader, ErrorBody, InfoReply, StatsReply)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"swapvae wire protocol v{PROTOCOL_VERSION}",
        "$defs": {m.__name__: m.model_json_schema(mode="serialization") for m in models},
    }


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))
