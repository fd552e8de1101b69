"""The wire format without sockets: layouts, round trips, every error code, and the server's
request handler (``Server.handle``) on a fake engine, so these run in milliseconds."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from fakes import FakeEngine, expected

from swapvae.runtime import wire
from swapvae.runtime.output import FIELDS, DecodeOutput
from swapvae.schemas import protocol as P
from swapvae.schemas.protocol import DType, ErrorCode, MsgType

SPEC = Path(__file__).resolve().parents[1] / "schemas" / "PROTOCOL.md"


# -- layouts -------------------------------------------------------------------------------------

def _offsets(layout):
    off, rows = 0, []
    for name, code in layout:
        size = struct.calcsize("<" + code)
        rows.append((off, size, name))
        off += size
    return rows


def _spec_table(title: str) -> list[tuple[int, int, str]]:
    text = SPEC.read_text()
    section = text[text.index(title):]
    section = section[:section.index("\n## ", 1)]
    rows = re.finditer(r"^\| (\d+) \| (\d+) \| [^|]+ \| (\w+) \|", section, re.M)
    return [(int(m[1]), int(m[2]), m[3]) for m in rows]


def test_header_sizes_and_spec_tables_agree_with_the_definition():
    assert P.PROTOCOL_VERSION == 2 and P.REQUEST_HEADER_SIZE == 32 and P.REPLY_HEADER_SIZE == 56
    assert _spec_table("## 3. Request header") == _offsets(P.REQUEST_LAYOUT)
    assert _spec_table("## 4. Reply header") == _offsets(P.REPLY_LAYOUT)
    spec = SPEC.read_text()
    assert f"`{P.REQUEST_FORMAT}`" in spec and f"`{P.REPLY_FORMAT}`" in spec
    assert spec.startswith(f"# Swap-VAE decoding service: wire protocol, version {P.PROTOCOL_VERSION}\n")
    for code in ErrorCode:
        if code:
            assert f"| {int(code)} | {code.name} |" in spec, code
    for d in DType:
        assert f"| {int(d)} | {d.name.lower()} |" in spec, d
    for flag in (*P.RequestFlag, *P.ReplyFlag):
        assert f"| {int(flag):#04x} | {flag.name} |" in spec, flag
    # every offset is a multiple of its size: the C structs of section 8 need no packing
    for layout in (P.REQUEST_LAYOUT, P.REPLY_LAYOUT):
        assert all(off % min(size, 8) == 0 for off, size, _ in _offsets(layout))


def test_decode_sections_are_one_definition():
    """The spec's table of the reply body, the engine's output type and the client's reply all
    follow DECODE_SECTIONS."""
    text = SPEC.read_text()
    section = text[text.index("### DECODE_REPLY body"):text.index("## 6. Errors")]
    rows = re.findall(r"^\| (\w+) \| (float32|int32) \| B( x (\w+))? \| (yes|no) \|", section, re.M)
    want = [(s.name, {"<f4": "float32", "<i4": "int32"}[s.dtype], s.width or "", "yes" if s.readout else "no")
            for s in P.DECODE_SECTIONS]
    assert [(r[0], r[1], r[3], r[4]) for r in rows] == want
    assert FIELDS == tuple(s.name for s in P.DECODE_SECTIONS)
    assert [f.name for f in __import__("dataclasses").fields(DecodeOutput)] == list(FIELDS)
    from swapvae.runtime.client import Decoded
    assert [f.name for f in __import__("dataclasses").fields(Decoded)][:len(FIELDS)] == list(FIELDS)
    assert issubclass(Decoded, DecodeOutput)
    assert all(s.width is None or s.width in dict(P.REPLY_LAYOUT) for s in P.DECODE_SECTIONS)


def test_spec_hex_examples_are_what_the_implementation_writes():
    spec = SPEC.read_text()
    hexes = [" ".join(block.split()) for block in re.findall(r"```\n([0-9a-f ][0-9a-f \n]+)```", spec)]
    ping = wire.pack_request(MsgType.PING, 7, 123)
    pong = wire.pack_reply(MsgType.PONG, 7, 123)
    decode = wire.pack_request(MsgType.DECODE, 1, 1000, np.array([0, 2, 1], np.float32), flags=P.RequestFlag.RESET)
    f32 = lambda *v: np.array([v], np.float32)  # noqa: E731
    out = DecodeOutput(content=f32(0.5), style_mean=f32(-1), angle=np.zeros(1, np.float32), direction=np.ones(1, int),
                       proba=f32(0.25, 0.75), velocity=f32(1.5, -2), rates=f32(3))
    reply = wire.DecodeReplyWriter(wire.DecodeLayout(1, 1, 2, 2, 3, 1, True)).write_one(1, 1000, 41000, 0, True, out)
    assert hexes == [ping.hex(" "), pong.hex(" "), decode.hex(" "), reply.hex(" ")]


def test_pydantic_headers_pack_the_same_bytes():
    x = np.arange(12, dtype=np.int16).reshape(2, 6)
    frame = wire.pack_request(MsgType.DECODE, 9, 42, x)
    head = P.RequestHeader.unpack(frame)
    assert head == P.RequestHeader(msg_type=MsgType.DECODE, dtype=DType.INT16, seq=9, t_client_ns=42, n_channels=6,
                                   n_bins=2)
    assert head.pack() == frame[:32]
    rep = wire.pack_error(ErrorCode.BAD_SHAPE, "x", 3, 4)
    assert P.ReplyHeader.unpack(rep).pack() == bytes(rep[:56])
    assert wire.ReplyFields._fields == tuple(P.ReplyHeader.model_fields)


def test_json_schema_covers_headers_and_control_bodies():
    schema = P.json_schema()
    assert set(schema["$defs"]) == {"RequestHeader", "ReplyHeader", "ErrorBody", "InfoReply", "StatsReply"}
    committed = json.loads((SPEC.parent / "protocol.schema.json").read_text())
    assert committed == json.loads(json.dumps(schema)), \
        "regenerate: python -m swapvae.schemas.protocol > schemas/protocol.schema.json"


# -- requests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8, np.int16, np.uint16, np.int32])
def test_request_round_trip_every_dtype_without_copy(dtype):
    x = (np.arange(18) % 7).astype(dtype).reshape(3, 6)
    frame = wire.pack_request(MsgType.DECODE, 5, 6, x)
    req = wire.parse_request(frame, 6)
    assert (req.msg_type, req.seq, req.t_client_ns) == (MsgType.DECODE, 5, 6)
    np.testing.assert_array_equal(req.counts, x)
    assert req.counts.dtype == np.dtype(dtype).newbyteorder("<")
    assert np.shares_memory(req.counts, np.frombuffer(frame, np.uint8))  # a view, not a copy


def test_request_buffer_is_one_preallocated_frame():
    buf = wire.RequestBuffer(6)
    buf.counts[:] = [1, 2, 3, 4, 5, 6]
    frame = buf.stamp(11, 12)
    assert bytes(frame) == wire.pack_request(MsgType.DECODE, 11, 12, np.arange(1, 7, dtype=np.float32))
    assert buf.stamp(13, 14, reset=True) is frame
    assert bytes(frame) == wire.pack_request(MsgType.DECODE, 13, 14, np.arange(1, 7, dtype=np.float32), flags=1)
    assert wire.parse_request(frame, 6).flags == P.RequestFlag.RESET
    assert buf.stamp(15, 16)[7] == 0  # the flag does not stick


def test_dtype_without_a_wire_code_is_refused_by_the_client_side():
    with pytest.raises(ValueError, match="no wire code"):
        wire.pack_request(MsgType.DECODE, 1, 0, np.zeros(6, np.complex64))


def _hdr(**kw) -> bytes:
    f = dict(magic=b"SVAE", version=2, msg_type=1, dtype=1, flags=0, seq=77, t=88, n_channels=6, n_bins=1)
    f.update(kw)
    return wire.REQ.pack(f["magic"], f["version"], f["msg_type"], f["dtype"], f["flags"], f["seq"], f["t"],
                         f["n_channels"], f["n_bins"])


BAD_FRAMES = {
    "empty": (b"", ErrorCode.BAD_HEADER, "shorter than the 32-byte"),
    "short": (b"SVAE\x01\x01", ErrorCode.BAD_HEADER, "6 bytes"),
    "magic": (_hdr(magic=b"HTTP") + bytes(24), ErrorCode.BAD_HEADER, "magic"),
    "version 1": (_hdr(version=1) + bytes(24), ErrorCode.BAD_VERSION, "version 1 is not supported; this server "
                                                                           "speaks version 2"),
    "version 3": (_hdr(version=3, flags=0x80) + bytes(24), ErrorCode.BAD_VERSION, "version 3"),
    "reserved flag": (_hdr(flags=0x04) + bytes(24), ErrorCode.BAD_HEADER, "reserved request flag bits 0x04"),
    "reserved flags and reset": (_hdr(flags=0x81) + bytes(24), ErrorCode.BAD_HEADER, "bits 0x80 are set (flags 0x81)"),
    "reserved flag on a ping": (_hdr(msg_type=4, flags=0x02), ErrorCode.BAD_HEADER, "bits 0x02"),
    "type": (_hdr(msg_type=0x81), ErrorCode.UNKNOWN_TYPE, "message type 129"),
    "dtype": (_hdr(dtype=9) + bytes(24), ErrorCode.BAD_DTYPE, "dtype code 9"),
    "channels": (_hdr(n_channels=5) + bytes(20), ErrorCode.BAD_SHAPE, "n_channels is 5, this bundle expects 6"),
    "zero bins": (_hdr(n_bins=0), ErrorCode.BAD_SHAPE, "n_bins is 0"),
    "huge batch": (_hdr(n_bins=10**6), ErrorCode.BAD_SHAPE, "n_bins is 1000000"),
    "truncated": (_hdr() + bytes(23), ErrorCode.BAD_LENGTH, "23 bytes, expected 24"),
    "padded": (_hdr() + bytes(25), ErrorCode.BAD_LENGTH, "25 bytes, expected 24"),
    "float64 sent as float32": (_hdr(dtype=1) + np.zeros(6).tobytes(), ErrorCode.BAD_LENGTH, "48 bytes"),
}


@pytest.mark.parametrize("name", BAD_FRAMES)
def test_parse_request_names_the_problem(name):
    frame, code, text = BAD_FRAMES[name]
    with pytest.raises(wire.ProtocolError, match=re.escape(text)) as e:
        wire.parse_request(frame, 6)
    assert e.value.code == code
    if code not in (ErrorCode.BAD_HEADER,) or "flag" in name:
        assert (e.value.seq, e.value.t_client_ns) == (77, 88)  # echoed so the client can match it


def test_reset_flag_is_read_and_other_types_accept_it():
    assert wire.parse_request(_hdr(flags=1) + bytes(24), 6).flags == 1
    assert wire.parse_request(_hdr(flags=0) + bytes(24), 6).flags == 0
    assert wire.parse_request(wire.pack_request(MsgType.PING, 1, 2, flags=1), 6).flags == 1  # no effect there


# -- the one-bin fast path ------------------------------------------------------------------------

ONE_BIN = wire.pack_request(MsgType.DECODE, 77, 88, np.arange(6, dtype=np.float32))


def test_one_bin_fast_path_takes_only_float32_one_bin_decodes_of_the_bundle_width():
    fast = wire.OneBinRequests(6)
    assert fast.size == len(ONE_BIN) == 32 + 24
    assert fast.match(ONE_BIN) == (77, 88, 0)
    assert fast.match(bytearray(ONE_BIN)) == (77, 88, 0)
    np.testing.assert_array_equal(fast.counts(ONE_BIN), np.arange(6))
    assert fast.match(ONE_BIN[:7] + b"\x01" + ONE_BIN[8:]) == (77, 88, 1)  # RESET
    body = ONE_BIN[32:]
    refused = {  # none is a float32 one-bin decode of 6 channels with only known flags
        "magic": _hdr(magic=b"SVAF") + body, "version": _hdr(version=1) + body,
        "reserved flag": _hdr(flags=0x05) + body, "high flag": _hdr(flags=0x80) + body,
        "type": _hdr(msg_type=int(MsgType.PING)) + body, "dtype": _hdr(dtype=int(DType.INT32)) + body,
        "channels": _hdr(n_channels=5) + body, "bins": _hdr(n_bins=2) + body,
        "channels 2**31 + 6": _hdr(n_channels=2**31 + 6) + body,
        "short": ONE_BIN[:-4], "long": ONE_BIN + bytes(4), "empty": b"",
        "two bins": wire.pack_request(MsgType.DECODE, 1, 2, np.zeros((2, 6), np.float32)),
        "int16 of the same length": wire.pack_request(MsgType.DECODE, 1, 2, np.zeros(12, np.int16)),
    }
    assert len(refused["int16 of the same length"]) == len(ONE_BIN)
    for name, frame in refused.items():
        assert fast.match(frame) is None, name
    assert wire.OneBinRequests(6, enabled=False).match(ONE_BIN) is None
    assert wire.OneBinRequests(7).match(ONE_BIN) is None


def test_one_bin_batch_keeps_whole_frames_and_views_their_fields():
    fast = wire.OneBinRequests(6, max_batch=3)
    frames = [wire.pack_request(MsgType.DECODE, 100 + i, 200 + i, np.full(6, i, np.float32), flags=i % 2)
              for i in range(4)]
    for f in frames[:3]:
        assert fast.add(f)
    assert not fast.add(frames[3])  # full
    counts, seqs, t_clients, flags = fast.batch()
    assert counts.shape == (3, 6) and counts.dtype == np.float32
    np.testing.assert_array_equal(counts, np.repeat(np.arange(3.0), 6).reshape(3, 6))
    assert list(seqs) == [100, 101, 102] and list(t_clients) == [200, 201, 202] and list(flags) == [0, 1, 0]
    fast.clear()
    fast.add(frames[3])
    counts, seqs, _, _ = fast.batch()
    assert counts.shape == (1, 6) and list(seqs) == [103] and (counts == 3).all()


def test_largest_request_is_max_bins_of_float64():
    assert wire.max_request_bytes(174) == 32 + P.MAX_BINS * 8 * 174


# -- replies -------------------------------------------------------------------------------------

LAYOUT = wire.DecodeLayout(content_dim=3, style_dim=2, n_classes=4, velocity_dim=2, history_bins=3, n_rates=5,
                           has_readout=True)
BARE = wire.DecodeLayout(3, 2, 0, 0, 0, 5, has_readout=False)  # a bundle trained without labels


@pytest.mark.parametrize("readout", [True, False])
def test_decode_reply_one_bin_and_batch_round_trip(readout):
    writer = wire.DecodeReplyWriter(LAYOUT if readout else BARE)
    eng = FakeEngine(readout=readout)
    x = np.array([1, 2, 3, 4, 5, 6], np.float32)
    one = eng.decode(x)
    assert writer.check(one)
    frame = writer.write_one(21, 22, 5000, 700, True, one)
    head, body = wire.parse_reply(frame)
    assert (head.msg_type, head.status, head.seq, head.t_client_ns, head.server_ns, head.queue_ns, head.n_bins) == (
        0x81, 0, 21, 22, 5000, 700, 1)
    assert head.flags == (P.ReplyFlag.HAS_READOUT if readout else 0) | P.ReplyFlag.RESET_APPLIED
    widths = 3 + 2 + (1 + 1 + 4 + 2 if readout else 0) + 5
    assert len(frame) == 56 + 4 * widths == 56 + head.body_bytes
    assert (head.n_classes, head.velocity_dim, head.history_bins) == ((4, 2, 3) if readout else (0, 0, 0))
    arrays = wire.decode_arrays(head, body)
    ref = expected(x, readout=readout)
    assert list(arrays) == list(FIELDS)
    for k, v in arrays.items():
        if v is None:
            assert getattr(ref, k) is None and not readout and k in ("angle", "direction", "proba", "velocity")
        else:
            np.testing.assert_array_equal(v, getattr(ref, k), err_msg=k)
    if readout:
        assert arrays["direction"].dtype == np.int32 and arrays["velocity"].shape == (1, 2)
    assert wire.parse_reply(writer.write_one(23, 24, 1, 0, False, one))[0].flags & P.ReplyFlag.RESET_APPLIED == 0

    xb = np.arange(18, dtype=np.float32).reshape(3, 6)
    frame = wire.finish(writer.write(31, 32, eng.decode(xb, reset=True), fresh=True), 2**40, 2**33)  # saturate
    head, body = wire.parse_reply(frame)
    assert (head.seq, head.n_bins, head.server_ns, head.queue_ns) == (31, 3, 2**32 - 1, 2**32 - 1)
    assert head.flags & P.ReplyFlag.RESET_APPLIED
    ref = expected(xb, readout=readout)
    for k, v in wire.decode_arrays(head, body).items():
        if v is not None:
            np.testing.assert_array_equal(v, getattr(ref, k), err_msg=k)


@pytest.mark.parametrize("readout", [True, False])
def test_batched_rows_are_the_one_bin_replies(readout):
    writer = wire.DecodeReplyWriter(LAYOUT if readout else BARE)
    eng = FakeEngine(readout=readout)
    size = writer.frame_bytes
    for n in (2, 5, 3):  # grows, then reuses the buffer
        xb = np.arange(6 * n, dtype=np.float32).reshape(n, 6) + n
        seqs, t_clients = [10 * n + i for i in range(n)], [7 + i for i in range(n)]
        server_ns = np.array([2**33 if n == 3 else 4000 + i for i in range(n)])
        queue_ns = np.arange(n) * 100
        fresh = np.arange(n) % 2 == 0
        streams = [eng.new_stream() for _ in range(n)]
        rows = writer.write_rows(seqs, t_clients, server_ns, queue_ns, fresh, eng.decode_streams(streams, xb))
        for i in range(n):
            one = writer.write_one(seqs[i], t_clients[i], int(server_ns[i]), int(queue_ns[i]), fresh[i],
                                   eng.decode_stream(eng.new_stream(), xb[i]))
            assert bytes(rows[i * size:(i + 1) * size]) == bytes(one), (n, i)
        head, _ = wire.parse_reply(bytes(rows[:size]))
        assert head.server_ns == (2**32 - 1 if n == 3 else 4000)


def test_writer_refuses_outputs_it_cannot_join():
    writer = wire.DecodeReplyWriter(LAYOUT)
    out = FakeEngine().decode(np.ones(6, np.float32))
    assert writer.check(out)
    swap = lambda **kw: DecodeOutput(**{**{k: getattr(out, k) for k in FIELDS}, **kw})  # noqa: E731
    assert not writer.check(swap(content=out.content.astype(np.float64)))
    assert not writer.check(swap(content=np.zeros((1, 6), np.float32)[:, ::2]))
    assert not writer.check(swap(velocity=None))  # a readout's section missing
    assert not writer.check(swap(velocity=np.zeros((1, 3), np.float32)))
    assert not wire.DecodeReplyWriter(BARE).check(out)  # sections a bare bundle has no room for
    with pytest.raises(ValueError, match="without a readout"):
        wire.DecodeLayout(3, 2, 4, 0, 0, 5, has_readout=False)


def test_error_reply_carries_code_and_json_message():
    frame = wire.pack_error(ErrorCode.BAD_VALUE, "counts contain NaN", 5, 6)
    head, body = wire.parse_reply(frame)
    assert (head.msg_type, head.status, head.seq, head.t_client_ns) == (0xFF, 7, 5, 6)
    assert json.loads(bytes(body)) == {"code": 7, "error": "BAD_VALUE", "message": "counts contain NaN"}


def test_parse_reply_rejects_garbage():
    with pytest.raises(ValueError, match="shorter"):
        wire.parse_reply(b"SVAE")
    frame = wire.pack_reply(MsgType.PONG, 1, 2)
    with pytest.raises(ValueError, match="body"):
        wire.parse_reply(bytes(frame) + b"x")
    v1_error = b"SVAE\x01\xff\x02\x00" + bytes(40)  # a version 1 server's BAD_VERSION
    with pytest.raises(ValueError, match="reply of protocol version 1; this client speaks version 2"):
        wire.parse_reply(v1_error)
