"""The one implementation of the wire protocol (schemas/protocol.py, schemas/PROTOCOL.md).

The server and the Python client both build and read frames here. Parsing a request is a
``struct.unpack_from`` of the fixed header and an ``np.frombuffer`` view of the body: no copy.
A one-bin decode reply is a preallocated header, stamped in place, joined with the engine's
output arrays in one copy.
"""
from __future__ import annotations

import struct
from collections import namedtuple
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from schemas.protocol import (
    DECODE_SECTIONS,
    DTYPE_NUMPY,
    MAGIC,
    MAX_BINS,
    PROTOCOL_VERSION,
    REPLY_BIT,
    REPLY_FORMAT,
    REPLY_HEADER_SIZE,
    REPLY_LAYOUT,
    REQUEST_FORMAT,
    REQUEST_HEADER_SIZE,
    DType,
    ErrorBody,
    ErrorCode,
    MsgType,
)

REQ = struct.Struct(REQUEST_FORMAT)
REP = struct.Struct(REPLY_FORMAT)
_SERVER_NS = struct.Struct("<I")
_SEQ_T = struct.Struct("<QQ")  # seq and t_client_ns, at offset 8 of both headers
_SEQ_T_NS = struct.Struct("<QQI")  # ... and the reply's server_ns after them
_I32 = struct.Struct("<i")
SERVER_NS_OFFSET = struct.calcsize("<" + "".join(c for k, c in REPLY_LAYOUT[:REPLY_LAYOUT.index(("server_ns", "I"))]))
U32_MAX = 0xFFFFFFFF

_NUMPY = {int(k): np.dtype(v) for k, v in DTYPE_NUMPY.items()}
_REQUEST_TYPES = {int(MsgType.DECODE), int(MsgType.INFO), int(MsgType.STATS), int(MsgType.PING)}


class ProtocolError(ValueError):
    """A request the server answers with an error reply; carries what the reply echoes."""

    def __init__(self, code: ErrorCode, message: str, seq: int = 0, t_client_ns: int = 0):
        super().__init__(message)
        self.code, self.message, self.seq, self.t_client_ns = ErrorCode(code), message, seq, t_client_ns


class Request(NamedTuple):
    msg_type: int
    seq: int
    t_client_ns: int
    counts: np.ndarray | None  # DECODE: (n_bins, n_channels) view of the frame, its wire dtype


# Reply header fields by name, in wire order (from the one definition in schemas/protocol.py).
ReplyHeader = namedtuple("ReplyHeader", [name for name, _ in REPLY_LAYOUT])


# -- requests -------------------------------------------------------------------------------------

def dtype_code(dtype) -> DType:
    """The DType of a numpy dtype (native or little-endian); ValueError if the protocol lacks it."""
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    for code, np_dt in _NUMPY.items():
        if np_dt == dt:
            return DType(code)
    raise ValueError(f"dtype {np.dtype(dtype)} has no wire code; use one of "
                     f"{[np.dtype(v).name for v in DTYPE_NUMPY.values()]}")


def pack_request(msg_type: int, seq: int = 0, t_client_ns: int = 0, counts: np.ndarray | None = None) -> bytes:
    """A request frame. ``counts`` (DECODE): (n_channels,) or (n_bins, n_channels) of a DType."""
    if counts is None:
        return REQ.pack(MAGIC, PROTOCOL_VERSION, int(msg_type), 0, 0, seq, t_client_ns, 0, 0)
    counts = np.asarray(counts)
    if counts.ndim == 1:
        counts = counts[None, :]
    if counts.ndim != 2:
        raise ValueError(f"counts must be (n_channels,) or (n_bins, n_channels), got shape {counts.shape}")
    code = dtype_code(counts.dtype)
    body = np.ascontiguousarray(counts, dtype=_NUMPY[code]).tobytes()
    return REQ.pack(MAGIC, PROTOCOL_VERSION, int(msg_type), int(code), 0, seq, t_client_ns,
                    counts.shape[1], counts.shape[0]) + body


class RequestBuffer:
    """A preallocated DECODE frame for one bin: write ``counts``, ``stamp``, send ``frame``."""

    def __init__(self, n_channels: int, dtype=np.float32):
        code = dtype_code(dtype)
        self.frame = bytearray(REQUEST_HEADER_SIZE + n_channels * _NUMPY[code].itemsize)
        REQ.pack_into(self.frame, 0, MAGIC, PROTOCOL_VERSION, int(MsgType.DECODE), int(code), 0, 0, 0, n_channels, 1)
        self.counts = np.frombuffer(self.frame, _NUMPY[code], n_channels, REQUEST_HEADER_SIZE)

    def stamp(self, seq: int, t_client_ns: int) -> bytearray:
        _SEQ_T.pack_into(self.frame, 8, seq, t_client_ns)
        return self.frame



class OneBinRequests:
    """The closed-loop fast path: recognise a float32 one-bin DECODE request of the bundle's
    width, and gather several into one batch for a single engine call.

    ``match`` reads only the fields that decide it (the flags byte is ignored, as v1 says);
    anything it refuses goes through ``parse_request``, which names the problem. A batch keeps
    the matched frames whole, header and all, in rows of one reused buffer (a memoryview copy
    is cheaper than a numpy assignment); ``counts``, ``seqs`` and ``t_clients`` are strided
    views of those rows. ``enabled=False`` matches nothing (every request takes the general path)."""

    _HEAD = struct.Struct("<7sxQQQ")  # magic, version, msg_type, dtype; seq; t_client_ns; n_channels | n_bins << 32

    def __init__(self, n_channels: int, max_batch: int = 32, enabled: bool = True):
        self.n_channels = n_channels
        self.size = REQUEST_HEADER_SIZE + 4 * n_channels if enabled else -1  # bytes of one such frame
        self.max_batch = max_batch
        self._key = REQ.pack(MAGIC, PROTOCOL_VERSION, int(MsgType.DECODE), int(DType.FLOAT32), 0, 0, 0, 0, 0)[:7]
        self._shape = n_channels | 1 << 32
        row = max(self.size, REQUEST_HEADER_SIZE + 4 * n_channels)
        self._rows = memoryview(bytearray(max_batch * row))
        self._x = np.ndarray((max_batch, n_channels), "<f4", self._rows, REQUEST_HEADER_SIZE, (row, 4))
        self._seq = np.ndarray((max_batch,), "<u8", self._rows, 8, (row,))
        self._t = np.ndarray((max_batch,), "<u8", self._rows, 16, (row,))
        self.n = 0  # frames in the batch

    def match(self, frame) -> tuple[int, int] | None:
        """``(seq, t_client_ns)`` if ``frame`` is a float32 one-bin DECODE of ``n_channels``, else None."""
        if len(frame) != self.size:
            return None
        head, seq, t_client, shape = self._HEAD.unpack_from(frame)
        if head == self._key and shape == self._shape:
            return seq, t_client
        return None

    def counts(self, frame) -> np.ndarray:
        """The counts of a matched frame: a (n_channels,) float32 view, no copy."""
        return np.frombuffer(frame, "<f4", self.n_channels, REQUEST_HEADER_SIZE)

    def add(self, frame) -> bool:
        """Copy a matched frame into the batch; False (and nothing copied) when it is full."""
        n, size = self.n, self.size
        if n == self.max_batch:
            return False
        self._rows[n * size:(n + 1) * size] = frame
        self.n = n + 1
        return True

    def batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views of the batch so far: counts (n, n_channels), seqs (n,), t_clients (n,); valid
        until the next ``add`` after ``clear``."""
        n = self.n
        return self._x[:n], self._seq[:n], self._t[:n]

    def clear(self) -> None:
        self.n = 0


def max_request_bytes(n_channels: int) -> int:
    """The largest valid request: MAX_BINS bins of the widest dtype."""
    return REQUEST_HEADER_SIZE + MAX_BINS * max(d.itemsize for d in _NUMPY.values()) * n_channels


def parse_request(frame, n_channels: int) -> Request:
    """Validate a request frame against this protocol and a bundle of ``n_channels`` inputs.

    Raises ProtocolError naming the first problem; the counts are a view of ``frame``."""
    size = len(frame)
    if size < REQUEST_HEADER_SIZE:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"frame of {size} bytes is shorter than the "
                            f"{REQUEST_HEADER_SIZE}-byte request header")
    magic, version, msg_type, dtype, _flags, seq, t_client, n_ch, n_bins = REQ.unpack_from(frame)
    if magic != MAGIC:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"protocol version {version} is not supported; "
                            f"this server speaks version {PROTOCOL_VERSION}", seq, t_client)
    if msg_type != MsgType.DECODE:
        if msg_type not in _REQUEST_TYPES:
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {msg_type}; requests are "
                                f"{ {m.name: int(m) for m in MsgType if m < REPLY_BIT} }", seq, t_client)
        return Request(msg_type, seq, t_client, None)
    np_dtype = _NUMPY.get(dtype)
    if np_dtype is None:
        raise ProtocolError(ErrorCode.BAD_DTYPE, f"unknown dtype code {dtype}; supported: "
                            f"{ {d.name.lower(): int(d) for d in DType} }", seq, t_client)
    if n_ch != n_channels:
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"n_channels is {n_ch}, this bundle expects {n_channels}",
                            seq, t_client)
    if not 1 <= n_bins <= MAX_BINS:
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"n_bins is {n_bins}, must be 1..{MAX_BINS}", seq, t_client)
    expected = n_bins * n_ch * np_dtype.itemsize
    if size - REQUEST_HEADER_SIZE != expected:
        raise ProtocolError(ErrorCode.BAD_LENGTH, f"body has {size - REQUEST_HEADER_SIZE} bytes, expected "
                            f"{expected} = {n_bins} bins x {n_ch} channels x {np_dtype.itemsize} bytes "
                            f"({np_dtype.name})", seq, t_client)
    counts = np.frombuffer(frame, np_dtype, n_bins * n_ch, REQUEST_HEADER_SIZE).reshape(n_bins, n_ch)
    return Request(msg_type, seq, t_client, counts)


# -- replies --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeLayout:
    """Row widths of a decode reply body, fixed by the bundle."""
    content_dim: int
    style_dim: int
    n_classes: int
    n_rates: int

    def widths(self) -> list[int]:
        return [getattr(self, w) if w else 1 for _, _, w in DECODE_SECTIONS]

    def body_bytes(self, n_bins: int) -> int:
        return 4 * n_bins * sum(self.widths())

    def sections(self, buf, n_bins: int, offset: int = REPLY_HEADER_SIZE) -> dict[str, np.ndarray]:
        """Views of the body sections in ``buf`` (writable if ``buf`` is), each (n_bins, width) or (n_bins,)."""
        out = {}
        for (name, dt, wfield), width in zip(DECODE_SECTIONS, self.widths()):
            a = np.frombuffer(buf, np.dtype(dt), n_bins * width, offset)
            out[name] = a.reshape(n_bins, width) if wfield else a
            offset += 4 * n_bins * width
        return out


class DecodeReplyWriter:
    """Builds DECODE_REPLY frames for a bundle's layout.

    One bin (the closed-loop case) is the hot path: a preallocated header is stamped in place
    and joined with the engine's output arrays in one copy, which is cheaper than six numpy
    assignments into a preallocated frame."""

    def __init__(self, layout: DecodeLayout):
        self.layout = layout
        self.header = bytearray(REPLY_HEADER_SIZE)
        self._pack_header(self.header, 1, 0, 0)
        self.frame_bytes = REPLY_HEADER_SIZE + layout.body_bytes(1)  # one one-bin reply
        self._allocate_rows(0)

    def _pack_header(self, buf, n_bins: int, seq: int, t_client: int) -> None:
        lay = self.layout
        REP.pack_into(buf, 0, MAGIC, PROTOCOL_VERSION, int(MsgType.DECODE_REPLY), 0, 0, seq, t_client, 0, n_bins,
                      lay.content_dim, lay.style_dim, lay.n_classes, 0, lay.n_rates, lay.body_bytes(n_bins))

    def write_one(self, seq: int, t_client: int, server_ns: int, out) -> bytes:
        """The reply for a one-bin DecodeOutput whose arrays are C-contiguous float32 (direction
        int64, narrowed here); ``check`` says whether an engine's outputs qualify."""
        head = self.header
        _SEQ_T_NS.pack_into(head, 8, seq, t_client, server_ns if server_ns < U32_MAX else U32_MAX)
        return b"".join((head, out.content, out.style_mean, out.angle, _I32.pack(out.direction.item()),
                         out.proba, out.rates))

    def write_rows(self, seqs, t_clients, server_ns: int, out) -> memoryview:
        """The one-bin replies for every row of a batched DecodeOutput (``seqs`` and
        ``t_clients``: one per row, lists or arrays), back to back in one reused buffer: reply
        i is ``[i * frame_bytes:(i + 1) * frame_bytes]`` of the returned view, valid until the
        next call. One numpy copy per field for the whole batch, because joining each row's
        slices costs a sizeable share of a batched bin's time."""
        n = len(seqs)
        if n > len(self._rows):
            self._allocate_rows(n)
        rows = self._rows
        rows["seq"][:n] = seqs
        rows["t_client_ns"][:n] = t_clients
        rows["server_ns"][:n] = server_ns if server_ns < U32_MAX else U32_MAX
        for name, _, _ in DECODE_SECTIONS:
            rows[name][:n] = getattr(out, name)
        return self._rows_view

    def _allocate_rows(self, n: int) -> None:
        """A buffer of ``n`` one-bin reply frames, headers filled in, and a structured view of it."""
        fields = [("head", "V8"), ("seq", "<u8"), ("t_client_ns", "<u8"), ("server_ns", "<u4"),
                  ("rest", f"V{REPLY_HEADER_SIZE - SERVER_NS_OFFSET - 4}")]
        fields += [(name, dt, (width,)) if wfield else (name, dt)
                   for (name, dt, wfield), width in zip(DECODE_SECTIONS, self.layout.widths())]
        row = np.dtype(fields)  # packed: offsets follow the wire layout, no padding
        if row.itemsize != self.frame_bytes or row.fields["seq"][1] != 8:
            raise RuntimeError(f"reply row layout ({row.itemsize} B) disagrees with the wire format "
                               f"({self.frame_bytes} B)")
        self._rows = np.zeros(n, row)
        self._rows.view(np.uint8).reshape(n, row.itemsize)[:, :REPLY_HEADER_SIZE] = np.frombuffer(self.header, np.uint8)
        self._rows_view = memoryview(self._rows.view(np.uint8))

    def check(self, out) -> bool:
        """Whether ``write_one`` can take this engine output as it is (else use ``write``)."""
        f32 = [out.content, out.style_mean, out.angle, out.proba, out.rates]
        widths = self.layout.widths()
        return (all(a.dtype == np.float32 and a.flags.c_contiguous for a in f32) and out.direction.size == 1
                and [a.size for a in (out.content, out.style_mean, out.angle)] == widths[:3]
                and [out.proba.size, out.rates.size] == widths[4:])

    def write(self, seq: int, t_client: int, out) -> bytearray:
        """Any batch size and output dtypes; server_ns is set by ``finish``."""
        n_bins = out.angle.shape[0]
        frame = bytearray(REPLY_HEADER_SIZE + self.layout.body_bytes(n_bins))
        self._pack_header(frame, n_bins, seq, t_client)
        for name, view in self.layout.sections(frame, n_bins).items():
            view[...] = np.reshape(getattr(out, name), view.shape)
        return frame


def finish(frame: bytearray, server_ns: int) -> bytearray:
    """Stamp the server processing time (saturating u32 ns) into a reply frame."""
    _SERVER_NS.pack_into(frame, SERVER_NS_OFFSET, server_ns if server_ns < U32_MAX else U32_MAX)
    return frame


def pack_reply(msg_type: int, seq: int = 0, t_client_ns: int = 0, body: bytes = b"", status: int = 0) -> bytearray:
    """A reply frame without decode arrays (PONG, INFO_REPLY, STATS_REPLY, ERROR)."""
    frame = bytearray(REPLY_HEADER_SIZE + len(body))
    REP.pack_into(frame, 0, MAGIC, PROTOCOL_VERSION, int(msg_type), int(status), 0, seq, t_client_ns, 0, 0,
                  0, 0, 0, 0, 0, len(body))
    frame[REPLY_HEADER_SIZE:] = body
    return frame


def pack_json_reply(msg_type: int, seq: int, t_client_ns: int, model) -> bytearray:
    return pack_reply(msg_type, seq, t_client_ns, model.model_dump_json().encode())


def pack_error(code: ErrorCode, message: str, seq: int = 0, t_client_ns: int = 0) -> bytearray:
    code = ErrorCode(code)
    body = ErrorBody(code=int(code), error=code.name, message=message).model_dump_json().encode()
    return pack_reply(MsgType.ERROR, seq, t_client_ns, body, status=code)


# -- reading replies (clients) ---------------------------------------------------------------------

def parse_reply(frame) -> tuple[ReplyHeader, memoryview]:
    """Header and body of a reply frame; ValueError if it is not one."""
    if len(frame) < REPLY_HEADER_SIZE:
        raise ValueError(f"reply of {len(frame)} bytes is shorter than the {REPLY_HEADER_SIZE}-byte header")
    head = ReplyHeader._make(REP.unpack_from(frame))
    if head.magic != MAGIC:
        raise ValueError(f"reply has bad magic {bytes(head.magic)!r}")
    body = memoryview(frame)[REPLY_HEADER_SIZE:]
    if len(body) != head.body_bytes:
        raise ValueError(f"reply body has {len(body)} bytes, header says {head.body_bytes}")
    return head, body


def decode_arrays(head: ReplyHeader, body) -> dict[str, np.ndarray]:
    """The sections of a DECODE_REPLY body as read-only views (no copy)."""
    layout = DecodeLayout(head.content_dim, head.style_dim, head.n_classes, head.n_rates)
    if len(body) != layout.body_bytes(head.n_bins):
        raise ValueError(f"decode reply body has {len(body)} bytes, its dims need {layout.body_bytes(head.n_bins)}")
    return layout.sections(body, head.n_bins, 0)
