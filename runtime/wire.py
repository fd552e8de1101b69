"""The one implementation of the wire protocol (schemas/protocol.py, schemas/PROTOCOL.md).

The server and the Python client both build and read frames here. Parsing a request is a
``struct.unpack_from`` of the fixed header and an ``np.frombuffer`` view of the body: no copy.
A one-bin decode reply is a preallocated header, stamped in place, joined with the engine's
output arrays in one copy. The decode reply's sections are those of
``schemas.protocol.DECODE_SECTIONS``, present or absent as the bundle has a readout.
"""
from __future__ import annotations

import struct
from collections import namedtuple
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from swapvae.schemas.protocol import (
    DECODE_SECTIONS,
    DTYPE_NUMPY,
    MAGIC,
    MAX_BINS,
    PROTOCOL_VERSION,
    REPLY_BIT,
    REPLY_FORMAT,
    REPLY_HEADER_SIZE,
    REPLY_LAYOUT,
    REQUEST_FLAGS,
    REQUEST_FORMAT,
    REQUEST_HEADER_SIZE,
    REQUEST_LAYOUT,
    DType,
    ErrorBody,
    ErrorCode,
    MsgType,
    ReplyFlag,
    RequestFlag,
)

REQ = struct.Struct(REQUEST_FORMAT)
REP = struct.Struct(REPLY_FORMAT)
_FLAGS_SEQ_T = struct.Struct("<BQQ")  # a request's flags, seq and t_client_ns, at offset 7
_STAMP = struct.Struct("<BQQII")  # a reply's flags, seq, t_client_ns, server_ns and queue_ns, at offset 7
_TIMES = struct.Struct("<II")  # server_ns, queue_ns
_I32 = struct.Struct("<i")


def _offsets(layout) -> dict[str, int]:
    return {name: struct.calcsize("<" + "".join(c for _, c in layout[:i])) for i, (name, _) in enumerate(layout)}


_OFFSETS = _offsets(REPLY_LAYOUT)
_REQ_AT = _offsets(REQUEST_LAYOUT)
# A request's msg_type and n_bins, read without the rest of its header (the serving loop's routing)
_PEEK = struct.Struct(f"<{_REQ_AT['msg_type']}xB{_REQ_AT['n_bins'] - _REQ_AT['msg_type'] - 1}xI")
SERVER_NS_OFFSET = _OFFSETS["server_ns"]  # queue_ns follows it
U32_MAX = 0xFFFFFFFF
RESET = int(RequestFlag.RESET)
HAS_READOUT, RESET_APPLIED = int(ReplyFlag.HAS_READOUT), int(ReplyFlag.RESET_APPLIED)
assert _OFFSETS["flags"] == 7 and _OFFSETS["queue_ns"] == SERVER_NS_OFFSET + 4 and REQ.size == 32

_NUMPY = {int(k): np.dtype(v) for k, v in DTYPE_NUMPY.items()}
_ITEMSIZE = {k: v.itemsize for k, v in _NUMPY.items()}
_REQUEST_TYPES = {int(MsgType.DECODE), int(MsgType.INFO), int(MsgType.STATS), int(MsgType.PING)}
DECODE = int(MsgType.DECODE)


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
    flags: int = 0  # RequestFlag bits


# Reply header fields by name, in wire order (from the one definition in schemas/protocol.py).
ReplyFields = namedtuple("ReplyFields", [name for name, _ in REPLY_LAYOUT])


def _sat(ns: int) -> int:
    return ns if ns < U32_MAX else U32_MAX


# -- requests -------------------------------------------------------------------------------------

def dtype_code(dtype) -> DType:
    """The DType of a numpy dtype (native or little-endian); ValueError if the protocol lacks it."""
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    for code, np_dt in _NUMPY.items():
        if np_dt == dt:
            return DType(code)
    raise ValueError(f"dtype {np.dtype(dtype)} has no wire code; use one of "
                     f"{[np.dtype(v).name for v in DTYPE_NUMPY.values()]}")


def pack_request(msg_type: int, seq: int = 0, t_client_ns: int = 0, counts: np.ndarray | None = None,
                 flags: int = 0) -> bytes:
    """A request frame. ``counts`` (DECODE): (n_channels,) or (n_bins, n_channels) of a DType;
    ``flags``: RequestFlag bits (RESET: the first bin starts a trial)."""
    if counts is None:
        return REQ.pack(MAGIC, PROTOCOL_VERSION, int(msg_type), 0, int(flags), seq, t_client_ns, 0, 0)
    counts = np.asarray(counts)
    if counts.ndim == 1:
        counts = counts[None, :]
    if counts.ndim != 2:
        raise ValueError(f"counts must be (n_channels,) or (n_bins, n_channels), got shape {counts.shape}")
    code = dtype_code(counts.dtype)
    body = np.ascontiguousarray(counts, dtype=_NUMPY[code]).tobytes()
    return REQ.pack(MAGIC, PROTOCOL_VERSION, int(msg_type), int(code), int(flags), seq, t_client_ns,
                    counts.shape[1], counts.shape[0]) + body


class RequestBuffer:
    """A preallocated DECODE frame for one bin: write ``counts``, ``stamp``, send ``frame``."""

    def __init__(self, n_channels: int, dtype=np.float32):
        code = dtype_code(dtype)
        self.frame = bytearray(REQUEST_HEADER_SIZE + n_channels * _NUMPY[code].itemsize)
        REQ.pack_into(self.frame, 0, MAGIC, PROTOCOL_VERSION, int(MsgType.DECODE), int(code), 0, 0, 0, n_channels, 1)
        self.counts = np.frombuffer(self.frame, _NUMPY[code], n_channels, REQUEST_HEADER_SIZE)

    def stamp(self, seq: int, t_client_ns: int, reset: bool = False) -> bytearray:
        """The frame with this seq and timestamp, and the RESET flag set when ``reset``."""
        _FLAGS_SEQ_T.pack_into(self.frame, 7, RESET if reset else 0, seq, t_client_ns)
        return self.frame


class OneBinRequests:
    """The closed-loop fast path: recognise a float32 one-bin DECODE request of the bundle's
    width, and gather several into one batch for a single engine call.

    ``match`` reads only the fields that decide it; anything it refuses (reserved flag bits
    included) goes through ``parse_request``, which names the problem. A batch keeps the
    matched frames whole, header and all, in rows of one reused buffer (a memoryview copy is
    cheaper than a numpy assignment); ``counts``, ``seqs``, ``t_clients`` and ``flags`` are
    strided views of those rows. ``enabled=False`` matches nothing (every request takes the
    general path)."""

    # magic, version, msg_type, dtype; flags; seq; t_client_ns; n_channels | n_bins << 32
    _HEAD = struct.Struct("<7sBQQQ")

    def __init__(self, n_channels: int, max_batch: int = 32, enabled: bool = True):
        self.n_channels = n_channels
        self.size = REQUEST_HEADER_SIZE + 4 * n_channels if enabled else -1  # bytes of one such frame
        self.max_batch = max_batch
        self._key = REQ.pack(MAGIC, PROTOCOL_VERSION, int(MsgType.DECODE), int(DType.FLOAT32), 0, 0, 0, 0, 0)[:7]
        self._shape = n_channels | 1 << 32
        self._reserved = 0xFF & ~REQUEST_FLAGS
        row = max(self.size, REQUEST_HEADER_SIZE + 4 * n_channels)
        self._rows = memoryview(bytearray(max_batch * row))
        self._x = np.ndarray((max_batch, n_channels), "<f4", self._rows, REQUEST_HEADER_SIZE, (row, 4))
        self._flags = np.ndarray((max_batch,), "u1", self._rows, 7, (row,))
        self._seq = np.ndarray((max_batch,), "<u8", self._rows, 8, (row,))
        self._t = np.ndarray((max_batch,), "<u8", self._rows, 16, (row,))
        self.n = 0  # frames in the batch

    def match(self, frame) -> tuple[int, int, int] | None:
        """``(seq, t_client_ns, flags)`` if ``frame`` is a float32 one-bin DECODE of
        ``n_channels`` with no reserved flag bit set, else None."""
        if len(frame) != self.size:
            return None
        head, flags, seq, t_client, shape = self._HEAD.unpack_from(frame)
        if head == self._key and shape == self._shape and not flags & self._reserved:
            return seq, t_client, flags
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

    def batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Views of the batch so far: counts (n, n_channels), seqs (n,), t_clients (n,) and
        flags (n,); valid until the next ``add`` after ``clear``."""
        n = self.n
        return self._x[:n], self._seq[:n], self._t[:n], self._flags[:n]

    def clear(self) -> None:
        self.n = 0


def peek(frame) -> tuple[int, int] | None:
    """``(msg_type, n_bins)`` of a request frame, read without checking the rest of its header
    (where the serving loop sends it; ``parse_request`` checks it there); None for a frame
    shorter than the header."""
    return _PEEK.unpack_from(frame) if len(frame) >= REQUEST_HEADER_SIZE else None


_HEAD_OK = struct.Struct("<4sB2xB")  # magic, version, flags: what precedes the rate in the order of errors


def valid_header(frame) -> bool:
    """Whether a request frame passes the header checks that come before a control request's
    rate (PROTOCOL.md section 6: length, magic, version, reserved flags): a constant-time look at
    its first 8 bytes, so refusing a flood still costs a read and this, nothing more."""
    if len(frame) < REQUEST_HEADER_SIZE:
        return False
    magic, version, flags = _HEAD_OK.unpack_from(frame)
    return magic == MAGIC and version == PROTOCOL_VERSION and not flags & ~REQUEST_FLAGS


def whole_decode_seq(frame) -> int | None:
    """The seq of a DECODE frame of this protocol version whose length agrees with its header
    (a whole bin or batch, whatever its values), else None."""
    if len(frame) < REQUEST_HEADER_SIZE:
        return None
    magic, version, msg_type, dtype, _, seq, _, n_ch, n_bins = REQ.unpack_from(frame)
    size = _ITEMSIZE.get(dtype)
    if (msg_type != DECODE or size is None or magic != MAGIC or version != PROTOCOL_VERSION or not n_bins
            or len(frame) != REQUEST_HEADER_SIZE + n_bins * n_ch * size):
        return None
    return seq


def max_request_bytes(n_channels: int, max_bins: int = MAX_BINS) -> int:
    """The largest valid request: ``max_bins`` bins of the widest dtype."""
    return REQUEST_HEADER_SIZE + max_bins * max(d.itemsize for d in _NUMPY.values()) * n_channels


def parse_request(frame, n_channels: int, max_bins: int = MAX_BINS) -> Request:
    """Validate a request frame against this protocol and a bundle of ``n_channels`` inputs
    (a server may allow fewer than MAX_BINS bins). Raises ProtocolError naming the first
    problem; the counts are a view of ``frame``."""
    size = len(frame)
    if size < REQUEST_HEADER_SIZE:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"frame of {size} bytes is shorter than the "
                            f"{REQUEST_HEADER_SIZE}-byte request header")
    magic, version, msg_type, dtype, flags, seq, t_client, n_ch, n_bins = REQ.unpack_from(frame)
    if magic != MAGIC:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.BAD_VERSION, f"protocol version {version} is not supported; "
                            f"this server speaks version {PROTOCOL_VERSION}", seq, t_client)
    if flags & ~REQUEST_FLAGS:  # after the version: what the bits mean depends on it
        raise ProtocolError(ErrorCode.BAD_HEADER, f"reserved request flag bits {flags & ~REQUEST_FLAGS:#04x} are set "
                            f"(flags {flags:#04x}); only {REQUEST_FLAGS:#04x} (RESET) is defined", seq, t_client)
    if msg_type != MsgType.DECODE:
        if msg_type not in _REQUEST_TYPES:
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {msg_type}; requests are "
                                f"{ {m.name: int(m) for m in MsgType if m < REPLY_BIT} }", seq, t_client)
        return Request(msg_type, seq, t_client, None, flags)
    np_dtype = _NUMPY.get(dtype)
    if np_dtype is None:
        raise ProtocolError(ErrorCode.BAD_DTYPE, f"unknown dtype code {dtype}; supported: "
                            f"{ {d.name.lower(): int(d) for d in DType} }", seq, t_client)
    if n_ch != n_channels:
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"n_channels is {n_ch}, this bundle expects {n_channels}",
                            seq, t_client)
    if not 1 <= n_bins <= max_bins:
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"n_bins is {n_bins}, must be 1..{max_bins}", seq, t_client)
    expected = n_bins * n_ch * np_dtype.itemsize
    if size - REQUEST_HEADER_SIZE != expected:
        raise ProtocolError(ErrorCode.BAD_LENGTH, f"body has {size - REQUEST_HEADER_SIZE} bytes, expected "
                            f"{expected} = {n_bins} bins x {n_ch} channels x {np_dtype.itemsize} bytes "
                            f"({np_dtype.name})", seq, t_client)
    counts = np.frombuffer(frame, np_dtype, n_bins * n_ch, REQUEST_HEADER_SIZE).reshape(n_bins, n_ch)
    return Request(msg_type, seq, t_client, counts, flags)


# -- replies --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeLayout:
    """The shape of a bundle's decode replies: row widths, the readout's window, and whether the
    readout sections are present (``has_readout``; without it n_classes = velocity_dim =
    history_bins = 0 and angle, direction, proba and velocity take no bytes)."""
    content_dim: int
    style_dim: int
    n_classes: int
    velocity_dim: int
    history_bins: int
    n_rates: int
    has_readout: bool

    def __post_init__(self):
        if not self.has_readout and (self.n_classes or self.velocity_dim or self.history_bins):
            raise ValueError(f"a layout without a readout has no classes, velocity or history: {self}")

    @classmethod
    def of(cls, head) -> DecodeLayout:
        """The layout a reply header describes."""
        return cls(head.content_dim, head.style_dim, head.n_classes, head.velocity_dim, head.history_bins,
                   head.n_rates, bool(head.flags & HAS_READOUT))

    @property
    def flags(self) -> int:
        return HAS_READOUT if self.has_readout else 0

    def present(self) -> list:
        """The sections these replies carry, in wire order."""
        return [s for s in DECODE_SECTIONS if self.has_readout or not s.readout]

    def widths(self) -> list[int]:
        """Elements per row of every section of DECODE_SECTIONS (0 for an absent one)."""
        return [0 if s.readout and not self.has_readout else getattr(self, s.width) if s.width else 1
                for s in DECODE_SECTIONS]

    def body_bytes(self, n_bins: int) -> int:
        return 4 * n_bins * sum(self.widths())

    def sections(self, buf, n_bins: int, offset: int = REPLY_HEADER_SIZE) -> dict[str, np.ndarray | None]:
        """Views of the body sections in ``buf`` (writable if ``buf`` is), each (n_bins, width) or
        (n_bins,); None for an absent one."""
        out = {}
        for sec, width in zip(DECODE_SECTIONS, self.widths()):
            if sec.readout and not self.has_readout:
                out[sec.name] = None
                continue
            a = np.frombuffer(buf, np.dtype(sec.dtype), n_bins * width, offset)
            out[sec.name] = a.reshape(n_bins, width) if sec.width else a
            offset += 4 * n_bins * width
        return out


def _one_bin_writer(sections: list, header: bytearray, flags: tuple[int, int]):
    """``write_one`` for these sections: the header stamped in place (flags, seq, t_client_ns,
    server_ns, queue_ns) and joined with the output's arrays in wire order, int32 sections
    (direction) packed from the engine's integer. Generated from the sections (as dataclasses
    generate their methods), because a generic loop over them costs half as much again as the
    join itself on the hot path."""
    parts = ", ".join(f"_i32(out.{s.name}.item())" if s.dtype == "<i4" else f"out.{s.name}" for s in sections)
    src = (f"def write_one(seq, t_client, server_ns, queue_ns, fresh, out):\n"
           f"    _stamp(_head, 7, _fresh if fresh else _kept, seq, t_client, server_ns if server_ns < _max else _max,\n"
           f"           queue_ns if queue_ns < _max else _max)\n"
           f"    return _join((_head, {parts}))\n")
    scope = {"_stamp": _STAMP.pack_into, "_head": header, "_kept": flags[0], "_fresh": flags[1], "_max": U32_MAX,
             "_i32": _I32.pack, "_join": b"".join}
    exec(src, scope)  # noqa: S102 - the source is built from DECODE_SECTIONS' names only
    return scope["write_one"]


class DecodeReplyWriter:
    """Builds DECODE_REPLY frames for a bundle's layout.

    One bin (the closed-loop case) is the hot path: a preallocated header is stamped in place
    and joined with the engine's output arrays in one copy, which is cheaper than a numpy
    assignment per section into a preallocated frame. Every reply carries ``server_ns`` and
    ``queue_ns`` (saturating u32) and the flags: HAS_READOUT from the layout, RESET_APPLIED
    when ``fresh``.

    ``write_one(seq, t_client, server_ns, queue_ns, fresh, out)``: the reply for a one-bin
    DecodeOutput whose float arrays are C-contiguous float32 (and whose direction is any
    integer, narrowed here); ``check`` says whether an engine's outputs qualify. The returned
    bytes are the caller's; the header buffer is reused."""

    def __init__(self, layout: DecodeLayout):
        self.layout = layout
        self.header = bytearray(REPLY_HEADER_SIZE)
        self._pack_header(self.header, 1, 0, 0)
        self.frame_bytes = REPLY_HEADER_SIZE + layout.body_bytes(1)  # one one-bin reply
        self._flags = (layout.flags, layout.flags | RESET_APPLIED)  # by fresh
        self.write_one = _one_bin_writer(layout.present(), self.header, self._flags)
        self._allocate_rows(0)

    def _pack_header(self, buf, n_bins: int, seq: int, t_client: int, flags: int | None = None) -> None:
        lay = self.layout
        REP.pack_into(buf, 0, MAGIC, PROTOCOL_VERSION, int(MsgType.DECODE_REPLY), 0,
                      lay.flags if flags is None else flags, seq, t_client, 0, 0, n_bins, lay.content_dim,
                      lay.style_dim, lay.n_classes, lay.velocity_dim, lay.history_bins, 0, lay.n_rates,
                      lay.body_bytes(n_bins))

    def write_rows(self, seqs, t_clients, server_ns, queue_ns, fresh, out) -> memoryview:
        """The one-bin replies for every row of a batched DecodeOutput (``seqs``, ``t_clients``,
        ``server_ns``, ``queue_ns`` and ``fresh``: one per row, lists or arrays), back to back in
        one reused buffer: reply i is ``[i * frame_bytes:(i + 1) * frame_bytes]`` of the
        returned view, valid until the next call. One numpy copy per field for the whole batch,
        because joining each row's slices costs a sizeable share of a batched bin's time."""
        n = len(seqs)
        if n > len(self._rows):
            self._allocate_rows(n)
        rows = self._rows
        rows["flags"][:n] = np.where(np.asarray(fresh, bool), self._flags[1], self._flags[0])
        rows["seq"][:n] = seqs
        rows["t_client_ns"][:n] = t_clients
        rows["server_ns"][:n] = np.minimum(server_ns, U32_MAX)
        rows["queue_ns"][:n] = np.minimum(queue_ns, U32_MAX)
        for sec in self.layout.present():
            rows[sec.name][:n] = getattr(out, sec.name)
        return self._rows_view

    def _allocate_rows(self, n: int) -> None:
        """A buffer of ``n`` one-bin reply frames, headers filled in, and a structured view of it."""
        fields = [("head", "V7"), ("flags", "u1"), ("seq", "<u8"), ("t_client_ns", "<u8"), ("server_ns", "<u4"),
                  ("queue_ns", "<u4"), ("rest", f"V{REPLY_HEADER_SIZE - SERVER_NS_OFFSET - 8}")]
        fields += [(s.name, s.dtype, (w,)) if s.width else (s.name, s.dtype)
                   for s, w in zip(DECODE_SECTIONS, self.layout.widths()) if self.layout.has_readout or not s.readout]
        row = np.dtype(fields)  # packed: offsets follow the wire layout, no padding
        if row.itemsize != self.frame_bytes or row.fields["seq"][1] != _OFFSETS["seq"]:
            raise RuntimeError(f"reply row layout ({row.itemsize} B) disagrees with the wire format "
                               f"({self.frame_bytes} B)")
        self._rows = np.zeros(n, row)
        self._rows.view(np.uint8).reshape(n, row.itemsize)[:, :REPLY_HEADER_SIZE] = np.frombuffer(self.header, np.uint8)
        self._rows_view = memoryview(self._rows.view(np.uint8))

    def check(self, out) -> bool:
        """Whether ``write_one`` can take this engine output as it is (else use ``write``)."""
        for sec, width in zip(DECODE_SECTIONS, self.layout.widths()):
            a = getattr(out, sec.name)
            if sec.readout and not self.layout.has_readout:
                if a is not None:
                    return False
            elif a is None or a.size != width:
                return False
            elif sec.dtype == "<i4":
                if a.dtype.kind not in "iu":
                    return False
            elif a.dtype != np.float32 or not a.flags.c_contiguous:
                return False
        return True

    def frame_for(self, n_bins: int, seq: int, t_client: int, fresh: bool = False) -> bytearray:
        """A reply frame of ``n_bins`` rows, header filled in, body zero (``layout.sections`` views it)."""
        frame = bytearray(REPLY_HEADER_SIZE + self.layout.body_bytes(n_bins))
        self._pack_header(frame, n_bins, seq, t_client, self._flags[bool(fresh)])
        return frame

    def write(self, seq: int, t_client: int, out, fresh: bool = False) -> bytearray:
        """Any batch size and output dtypes; server_ns and queue_ns are set by ``finish``."""
        n_bins = out.content.shape[0]
        frame = self.frame_for(n_bins, seq, t_client, fresh)
        for name, view in self.layout.sections(frame, n_bins).items():
            if view is not None:
                view[...] = np.reshape(getattr(out, name), view.shape)
        return frame


def finish(frame: bytearray, server_ns: int, queue_ns: int = 0) -> bytearray:
    """Stamp the server's times (saturating u32 ns) into a reply frame."""
    _TIMES.pack_into(frame, SERVER_NS_OFFSET, _sat(server_ns), _sat(queue_ns))
    return frame


def pack_reply(msg_type: int, seq: int = 0, t_client_ns: int = 0, body: bytes = b"", status: int = 0) -> bytearray:
    """A reply frame without decode arrays (PONG, INFO_REPLY, STATS_REPLY, ERROR)."""
    frame = bytearray(REPLY_HEADER_SIZE + len(body))
    REP.pack_into(frame, 0, MAGIC, PROTOCOL_VERSION, int(msg_type), int(status), 0, seq, t_client_ns, 0, 0, 0,
                  0, 0, 0, 0, 0, 0, 0, len(body))
    frame[REPLY_HEADER_SIZE:] = body
    return frame


def pack_json_reply(msg_type: int, seq: int, t_client_ns: int, model) -> bytearray:
    return pack_reply(msg_type, seq, t_client_ns, model.model_dump_json().encode())


def pack_error(code: ErrorCode, message: str, seq: int = 0, t_client_ns: int = 0) -> bytearray:
    code = ErrorCode(code)
    body = ErrorBody(code=int(code), error=code.name, message=message).model_dump_json().encode()
    return pack_reply(MsgType.ERROR, seq, t_client_ns, body, status=code)


# -- reading replies (clients) ---------------------------------------------------------------------

def parse_reply(frame) -> tuple[ReplyFields, memoryview]:
    """Header and body of a reply frame; ValueError if it is not one of this protocol version."""
    if len(frame) >= 5 and bytes(frame[:4]) == MAGIC and frame[4] != PROTOCOL_VERSION:
        raise ValueError(f"reply of protocol version {frame[4]}; this client speaks version {PROTOCOL_VERSION}")
    if len(frame) < REPLY_HEADER_SIZE:
        raise ValueError(f"reply of {len(frame)} bytes is shorter than the {REPLY_HEADER_SIZE}-byte header")
    head = ReplyFields._make(REP.unpack_from(frame))
    if head.magic != MAGIC:
        raise ValueError(f"reply has bad magic {bytes(head.magic)!r}")
    body = memoryview(frame)[REPLY_HEADER_SIZE:]
    if len(body) != head.body_bytes:
        raise ValueError(f"reply body has {len(body)} bytes, header says {head.body_bytes}")
    return head, body


def decode_arrays(head: ReplyFields, body) -> dict[str, np.ndarray | None]:
    """The sections of a DECODE_REPLY body as read-only views (no copy); None for absent ones."""
    layout = DecodeLayout.of(head)
    if len(body) != layout.body_bytes(head.n_bins):
        raise ValueError(f"decode reply body has {len(body)} bytes, its dims need {layout.body_bytes(head.n_bins)}")
    return layout.sections(body, head.n_bins, 0)
