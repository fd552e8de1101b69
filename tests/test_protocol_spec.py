"""PROTOCOL.md predicts every reply (issue 23): its tables of message shapes (section 1.3) and of
a peer over its control rate (section 6) are read from the spec's text and each row is sent to
a live server; the value rules of sections 3 and 6 likewise. A client written from the spec
alone would expect exactly these replies."""
from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import zmq
from fakes import FakeEngine
from test_server import Running

from swapvae.runtime import wire
from swapvae.runtime.serve.server import Server
from swapvae.schemas.protocol import ErrorCode, MsgType

SPEC = (Path(__file__).resolve().parents[1] / "schemas" / "PROTOCOL.md").read_text()
PING = wire.pack_request(MsgType.PING, 5, 0)


def _section(title: str) -> str:
    start = SPEC.index(title)
    return SPEC[start:SPEC.index("\n#", start + 1)]


def _rows(text: str, columns: int) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("| ---")]
    return [r for r in rows[1:] if len(r) == columns]


SHAPES = _rows(_section("### 1.3 Every message shape"), 4)
RATE = _rows(_section("A peer over its control rate"), 2)


def _frames(spec: str) -> list[bytes]:
    """A cell such as `h×6, "", R` as frames."""
    tokens = {"R": PING, "R300": bytes(300), "X": b"x", "h": b"h", '""': b""}
    out = []
    for token in spec.strip("`").split(", "):
        name, _, times = token.partition("×")
        out += [tokens[name]] * int(times or 1)
    return out


@pytest.fixture(scope="module")
def served():
    s = Server(FakeEngine(), bind="tcp://127.0.0.1:*", warmup=0, prewarm=False, control_rate=1000)
    loop = Running(s)
    yield s
    loop.stop()
    s.close()


def _dealer(s: Server) -> zmq.Socket:
    c = zmq.Context.instance().socket(zmq.DEALER)
    c.setsockopt(zmq.LINGER, 0)
    c.setsockopt(zmq.RCVTIMEO, 2000)
    c.connect(s.endpoints["router"])
    return c


def test_the_spec_has_its_tables():
    assert len(SHAPES) == 9 and len(RATE) == 6


@pytest.mark.parametrize("row", SHAPES, ids=[r[0] for r in SHAPES])
def test_each_message_shape_gets_the_reply_the_spec_says(served, row):
    sent, _, back, code = row
    c = _dealer(served)
    try:
        c.send_multipart(_frames(sent))
        got = c.recv_multipart()
    finally:
        c.close()
    want = back.strip("`").split(", ")
    echoed = _frames(", ".join(want[:-1])) if len(want) > 1 else []
    assert want[-1] == "reply" and got[:-1] == echoed, (got, want)  # the envelope echoed as said, or nothing
    head, _ = wire.parse_reply(got[-1])
    assert head.status == (0 if code == "OK" else ErrorCode[code]), (row, head)


def _ping(seq: int, magic=b"SVAE", version=2, flags=0, length=32) -> bytes:
    return struct.pack("<4sBBBBQQII", magic, version, int(MsgType.PING), 0, flags, seq, 0, 0, 0)[:length]


def test_a_peer_over_its_control_rate_gets_what_the_spec_says():
    s = Server(FakeEngine(), bind="tcp://127.0.0.1:*", warmup=0, prewarm=False, control_rate=2)
    loop = Running(s)
    c = _dealer(s)
    frames = {"PING, valid header": _ping(101), "PING, version 1": _ping(102, version=1),
              "PING, flags 0x80": _ping(103, flags=0x80), "PING, magic `SVAe`": _ping(0, magic=b"SVAe"),
              "PING of 20 bytes": _ping(0, length=20),
              "DECODE of one valid bin": wire.pack_request(MsgType.DECODE, 106, 0, np.ones(6, np.float32))}
    try:
        for seq in (1, 2, 3):  # two within the bucket, the third the second's notice
            c.send(_ping(seq))
            head, _ = wire.parse_reply(c.recv())
            assert head.status == (ErrorCode.RATE_LIMITED if seq == 3 else 0)
        for request, _ in RATE:
            c.send(frames[request])
        got = []
        c.setsockopt(zmq.RCVTIMEO, 1000)
        while True:
            try:
                got.append(wire.parse_reply(c.recv())[0])
            except zmq.Again:
                break
    finally:
        loop.stop()
        c.close()
        s.close()
    answered = sorted((h.seq, h.msg_type, h.status) for h in got)
    want = []
    for request, reply in RATE:
        seq = struct.unpack_from("<Q", frames[request], 8)[0] if len(frames[request]) >= 16 else 0
        if "magic" in request or "20 bytes" in request:
            seq = 0  # an unreadable header: seq echoed as 0
        if reply == "DECODE_REPLY":
            want.append((seq, MsgType.DECODE_REPLY, 0))
        elif reply != "none":
            want.append((seq, MsgType.ERROR, ErrorCode[reply]))
    assert answered == sorted(want), (answered, want)
    assert s.recorder.drops.rate_limited == 1  # the valid PING alone went unanswered


@pytest.fixture(scope="module")
def engine_served(tiny_bundle):
    from swapvae.runtime.engine import BundleDecoder

    s = Server(BundleDecoder(tiny_bundle), bind="tcp://127.0.0.1:*", warmup=0, prewarm=False)
    loop = Running(s)
    yield s
    loop.stop()
    s.close()


@pytest.mark.parametrize("value, at, dtype", [(1e37, slice(None), np.float32),  # each finite, their sum is not
                                              (1e39, 0, np.float64), (np.inf, 0, np.float32), (-1.0, 0, np.float32),
                                              (np.nan, 3, np.float64)])
def test_values_beyond_float32_or_below_zero_are_bad_values(engine_served, value, at, dtype):
    counts = np.ones(engine_served.n_channels, dtype)
    counts[at] = value
    c = _dealer(engine_served)
    try:
        c.send(wire.pack_request(MsgType.DECODE, 9, 0, counts))
        head, _ = wire.parse_reply(c.recv())
        c.send(wire.pack_request(MsgType.DECODE, 10, 0, np.ones(engine_served.n_channels, np.float32)))
        assert wire.parse_reply(c.recv())[0].status == 0  # still serving
    finally:
        c.close()
    assert head.status == ErrorCode.BAD_VALUE and head.seq == 9
    assert "float32" in _section("## 3. Request header") and re.search(r"BAD_VALUE \| .*float32", SPEC)


def test_invalid_headers_do_not_use_up_the_allowance():
    s = Server(FakeEngine(), bind="tcp://127.0.0.1:*", warmup=0, prewarm=False, control_rate=2)
    loop = Running(s)
    c = _dealer(s)
    try:
        for _ in range(5):
            c.send(_ping(7, version=1))
            assert wire.parse_reply(c.recv())[0].status == ErrorCode.BAD_VERSION
        for seq in (1, 2):  # the bucket is still full
            c.send(_ping(seq))
            assert wire.parse_reply(c.recv())[0].msg_type == MsgType.PONG
    finally:
        loop.stop()
        c.close()
        s.close()
