"""The wire format without sockets: layouts, round trips, every error code, and the server's
request handler (``Server.handle``) on a fake engine, so these run in milliseconds."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from fakes import FakeEngine, FakeOutput, expected
from runtime import wire
from schemas import protocol as P
from schemas.protocol import DType, ErrorCode, MsgType

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
    return [(int(m[1]), int(m[2]), m[3]) for m in re.finditer(r"^\| (\d+) \| (\d+) \| [^|]+ \| (\w+) \|", section, re.M)]


def test_header_sizes_and_spec_tables_agree_with_the_definition():
    assert P.REQUEST_HEADER_SIZE == 32 and P.REPLY_HEADER_SIZE == 48
    assert _spec_table("## 3. Request header") == _offsets(P.REQUEST_LAYOUT)
    assert _spec_table("## 4. Reply header") == _offsets(P.REPLY_LAYOUT)
    spec = SPEC.read_text()
    assert f"`{P.REQUEST_FORMAT}`" in spec and f"`{P.REPLY_FORMAT}`" in spec
    for code in ErrorCode:
        if code:
            assert f"| {int(code)} | {code.name} |" in spec, code
    for d in DType:
        assert f"| {int(d)} | {d.name.lower()} |" in spec, d


def test_spec_hex_examples_are_what_the_implementation_writes():
    spec = SPEC.read_text()
    hexes = [" ".join(block.split()) for block in re.findall(r"```\n([0-9a-f ][0-9a-f \n]+)```", spec)]
    ping = wire.pack_request(MsgType.PING, 7, 123)
    pong = wire.pack_reply(MsgType.PONG, 7, 123)
    decode = wire.pack_request(MsgType.DECODE, 1, 1000, np.array([0, 2, 1], np.float32))
    assert hexes == [ping.hex(" "), pong.hex(" "), decode.hex(" ")]


def test_pydantic_headers_pack_the_same_bytes():
    x = np.arange(12, dtype=np.int16).reshape(2, 6)
    frame = wire.pack_request(MsgType.DECODE, 9, 42, x)
    head = P.RequestHeader.unpack(frame)
    assert head == P.RequestHeader(msg_type=MsgType.DECODE, dtype=DType.INT16, seq=9, t_client_ns=42, n_channels=6, n_bins=2)
    assert head.pack() == frame[:32]
    rep = wire.pack_error(ErrorCode.BAD_SHAPE, "x", 3, 4)
    assert P.ReplyHeader.unpack(rep).pack() == bytes(rep[:48])


def test_json_schema_covers_headers_and_control_bodies():
    schema = P.json_schema()
    assert set(schema["$defs"]) == {"RequestHeader", "ReplyHeader", "ErrorBody", "InfoReply", "StatsReply"}
    committed = json.loads((SPEC.parent / "protocol.schema.json").read_text())
    assert committed == json.loads(json.dumps(schema)), "regenerate: python -m schemas.protocol > schemas/protocol.schema.json"


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
    assert buf.stamp(13, 14) is frame


def test_dtype_without_a_wire_code_is_refused_by_the_client_side():
    with pytest.raises(ValueError, match="no wire code"):
        wire.pack_request(MsgType.DECODE, 1, 0, np.zeros(6, np.complex64))


def _hdr(**kw) -> bytes:
    f = dict(magic=b"SVAE", version=1, msg_type=1, dtype=1, flags=0, seq=77, t=88, n_channels=6, n_bins=1)
    f.update(kw)
    return wire.REQ.pack(f["magic"], f["version"], f["msg_type"], f["dtype"], f["flags"], f["seq"], f["t"],
                         f["n_channels"], f["n_bins"])


BAD_FRAMES = {
    "empty": (b"", ErrorCode.BAD_HEADER, "shorter than the 32-byte"),
    "short": (b"SVAE\x01\x01", ErrorCode.BAD_HEADER, "6 bytes"),
    "magic": (_hdr(magic=b"HTTP") + bytes(24), ErrorCode.BAD_HEADER, "magic"),
    "version": (_hdr(version=2) + bytes(24), ErrorCode.BAD_VERSION, "version 2"),
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
    if code not in (ErrorCode.BAD_HEADER,):
        assert (e.value.seq, e.value.t_client_ns) == (77, 88)  # echoed so the client can match it


# -- the one-bin fast path ------------------------------------------------------------------------

ONE_BIN = wire.pack_request(MsgType.DECODE, 77, 88, np.arange(6, dtype=np.float32))


def test_one_bin_fast_path_takes_only_float32_one_bin_decodes_of_the_bundle_width():
    fast = wire.OneBinRequests(6)
    assert fast.size == len(ONE_BIN) == 32 + 24
    assert fast.match(ONE_BIN) == (77, 88)
    assert fast.match(bytearray(ONE_BIN)) == (77, 88)
    np.testing.assert_array_equal(fast.counts(ONE_BIN), np.arange(6))
    flagged = ONE_BIN[:7] + b"\x05" + ONE_BIN[8:]  # reserved flags: ignored, as v1 says
    assert fast.match(flagged) == (77, 88)
    body = ONE_BIN[32:]
    refused = {  # none is a float32 one-bin decode of 6 channels
        "magic": _hdr(magic=b"SVAF") + body, "version": _hdr(version=2) + body,
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
    frames = [wire.pack_request(MsgType.DECODE, 100 + i, 200 + i, np.full(6, i, np.float32)) for i in range(4)]
    for f in frames[:3]:
        assert fast.add(f)
    assert not fast.add(frames[3])  # full
    counts, seqs, t_clients = fast.batch()
    assert counts.shape == (3, 6) and counts.dtype == np.float32
    np.testing.assert_array_equal(counts, np.repeat(np.arange(3.0), 6).reshape(3, 6))
    assert list(seqs) == [100, 101, 102] and list(t_clients) == [200, 201, 202]
    fast.clear()
    fast.add(frames[3])
    counts, seqs, _ = fast.batch()
    assert counts.shape == (1, 6) and list(seqs) == [103] and (counts == 3).all()


def test_largest_request_is_max_bins_of_float64():
    assert wire.max_request_bytes(174) == 32 + P.MAX_BINS * 8 * 174


# -- replies -------------------------------------------------------------------------------------

def test_decode_reply_one_bin_and_batch_round_trip():
    writer = wire.DecodeReplyWriter(wire.DecodeLayout(3, 2, 4, 5))
    eng = FakeEngine()
    x = np.array([1, 2, 3, 4, 5, 6], np.float32)
    one = eng.decode(x)
    assert writer.check(one)
    frame = writer.write_one(21, 22, 5000, one)
    head, body = wire.parse_reply(frame)
    assert (head.msg_type, head.status, head.seq, head.t_client_ns, head.server_ns, head.n_bins) == (0x81, 0, 21, 22, 5000, 1)
    assert len(frame) == 48 + 4 * (3 + 2 + 1 + 1 + 4 + 5) == 48 + head.body_bytes
    arrays = wire.decode_arrays(head, body)
    ref = expected(x)
    for k, v in arrays.items():
        np.testing.assert_array_equal(v, getattr(ref, k), err_msg=k)
    assert arrays["direction"].dtype == np.int32

    xb = np.arange(18, dtype=np.float32).reshape(3, 6)
    frame = wire.finish(writer.write(31, 32, eng.decode(xb)), 2**40)  # saturates
    head, body = wire.parse_reply(frame)
    assert (head.seq, head.n_bins, head.server_ns) == (31, 3, 2**32 - 1)
    ref = expected(xb)
    for k, v in wire.decode_arrays(head, body).items():
        np.testing.assert_array_equal(v, getattr(ref, k), err_msg=k)


def test_batched_rows_are_the_one_bin_replies():
    writer = wire.DecodeReplyWriter(wire.DecodeLayout(3, 2, 4, 5))
    eng = FakeEngine()
    size = writer.frame_bytes
    for n in (2, 5, 3):  # grows, then reuses the buffer
        xb = np.arange(6 * n, dtype=np.float32).reshape(n, 6) + n
        seqs, t_clients = [10 * n + i for i in range(n)], [7 + i for i in range(n)]
        rows = writer.write_rows(seqs, t_clients, 2**33 if n == 3 else 4000, eng.decode(xb))
        for i in range(n):
            one = writer.write_one(seqs[i], t_clients[i], 2**33 if n == 3 else 4000, eng.decode(xb[i]))
            assert bytes(rows[i * size:(i + 1) * size]) == bytes(one), (n, i)
        head, _ = wire.parse_reply(bytes(rows[:size]))
        assert head.server_ns == (2**32 - 1 if n == 3 else 4000)


def test_writer_refuses_outputs_it_cannot_join():
    writer = wire.DecodeReplyWriter(wire.DecodeLayout(3, 2, 4, 5))
    out = FakeEngine().decode(np.ones(6, np.float32))
    bad = FakeOutput(out.content.astype(np.float64), out.style_mean, out.angle, out.direction, out.proba, out.rates)
    assert not writer.check(bad)
    wide = FakeOutput(np.zeros((1, 6), np.float32)[:, ::2], out.style_mean, out.angle, out.direction, out.proba, out.rates)
    assert not writer.check(wide)


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


# -- the server's handler, no sockets --------------------------------------------------------------

@pytest.fixture()
def server():
    from runtime.server import Server

    s = Server(FakeEngine(), bind=None, sub="inproc://unused-sub", pub="inproc://unused-pub", warmup=2)
    yield s
    s.close()


def _reply(frame):
    head, body = wire.parse_reply(frame)
    return head, body


def test_handle_decodes_every_dtype_and_batches(server):
    x = np.array([3, 0, 1, 2, 5, 4])
    for dtype in (np.float32, np.float64, np.uint8, np.int16, np.uint16, np.int32):
        head, body = _reply(server.handle(wire.pack_request(MsgType.DECODE, 1, 2, x.astype(dtype))))
        assert head.msg_type == MsgType.DECODE_REPLY, bytes(body)
        np.testing.assert_array_equal(wire.decode_arrays(head, body)["angle"], expected(x).angle)
    xb = np.stack([x, x + 1]).astype(np.uint16)
    head, body = _reply(server.handle(wire.pack_request(MsgType.DECODE, 1, 2, xb)))
    assert head.n_bins == 2
    np.testing.assert_array_equal(wire.decode_arrays(head, body)["rates"], expected(xb).rates)


@pytest.mark.parametrize("name", BAD_FRAMES)
def test_handle_answers_bad_frames_with_errors_and_keeps_serving(server, name):
    frame, code, text = BAD_FRAMES[name]
    head, body = _reply(server.handle(frame))
    assert (head.msg_type, head.status) == (MsgType.ERROR, code)
    assert text in json.loads(bytes(body))["message"]
    head, _ = _reply(server.handle(wire.pack_request(MsgType.DECODE, 3, 0, np.ones(6, np.float32))))
    assert (head.msg_type, head.seq) == (MsgType.DECODE_REPLY, 3)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_handle_bad_values(server, bad):
    x = np.ones(6, np.float32)
    x[2] = bad
    for counts in (x, np.stack([x, x])):
        head, body = _reply(server.handle(wire.pack_request(MsgType.DECODE, 4, 0, counts)))
        assert (head.status, head.seq) == (ErrorCode.BAD_VALUE, 4)
    assert server.stats().errors == {"BAD_VALUE": 2}


def test_engine_failure_is_an_internal_error_not_a_crash():
    from runtime.server import Server

    eng = FakeEngine()
    s = Server(eng, bind=None, sub="inproc://a", pub="inproc://b", warmup=0)
    try:
        eng.fail = RuntimeError("device lost")
        head, body = _reply(s.handle(wire.pack_request(MsgType.DECODE, 8, 0, np.ones(6, np.float32))))
        assert head.status == ErrorCode.INTERNAL and "device lost" in bytes(body).decode()
        eng.fail = None
        head, _ = _reply(s.handle(wire.pack_request(MsgType.DECODE, 9, 0, np.ones(6, np.float32))))
        assert head.status == 0
    finally:
        s.close()


def test_handle_control_messages(server):
    head, body = _reply(server.handle(wire.pack_request(MsgType.PING, 5, 6)))
    assert (head.msg_type, head.seq, head.t_client_ns, len(body)) == (MsgType.PONG, 5, 6, 0)
    head, body = _reply(server.handle(wire.pack_request(MsgType.INFO, 1, 0)))
    info = P.InfoReply.model_validate_json(bytes(body))
    assert (info.n_channels, info.content_dim, info.style_dim, info.n_classes, info.n_rates) == (6, 3, 2, 4, 5)
    assert info.manifest["files"] == {"decode.onnx": "0" * 64}
    for _ in range(5):
        server.handle(wire.pack_request(MsgType.DECODE, 1, 0, np.ones(6, np.float32)))
    server.handle(b"junk")
    head, body = _reply(server.handle(wire.pack_request(MsgType.STATS, 1, 0)))
    stats = P.StatsReply.model_validate_json(bytes(body))
    assert stats.decodes == 5 and stats.bins == 5 and stats.errors == {"BAD_HEADER": 1}
    assert stats.latency_us.n == 5 and 0 < stats.latency_us.p50 <= stats.latency_us.max
    assert stats.requests == 9 and stats.by_type == {"PING": 1, "INFO": 1, "STATS": 1, "DECODE": 5}


def test_latency_ring_wraps(server):
    from runtime.server import Server

    s = Server(FakeEngine(), bind=None, sub="inproc://c", pub="inproc://d", warmup=0, window=8)
    try:
        for _ in range(20):
            s.handle(wire.pack_request(MsgType.DECODE, 1, 0, np.ones(6, np.float32)))
        st = s.stats()
        assert st.decodes == 20 and st.latency_us.n == 8 and st.window == 8
    finally:
        s.close()
