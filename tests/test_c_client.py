"""The C client's reply parser against fuzzed, crafted and real replies (issue 12).

``runtime/clients/c/fuzz_reply.c`` feeds ``svae_parse_reply`` (``svae_protocol.h``, no libzmq
needed) 100 000 valid, mutated, size-wrapping and random replies and checks every result; here it
is built with AddressSanitizer and UBSan (``-fno-sanitize-recover=all``) when the compiler can
build and run such a program, else as a plain -O2 build (a warning says so). It runs twice: with
the parser's default range limits, and with the limits lifted and the portable overflow checks,
so that the checked arithmetic alone is what keeps it in bounds. Skips without a C compiler.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from swapvae.runtime import wire
from swapvae.runtime.output import DecodeOutput
from swapvae.schemas.protocol import MAGIC, PROTOCOL_VERSION, ErrorCode, MsgType, ReplyFlag

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "runtime" / "clients" / "c"
N_INPUTS = 100_000
CFLAGS = ["-O2", "-g", "-Wall", "-Wextra", "-Werror", "-std=c99"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
CONFIGS = {
    "limits": [],
    "no_limits": ["-DSVAE_REPLY_MAX_BINS=0xFFFFFFFFu", "-DSVAE_REPLY_MAX_WIDTH=0xFFFFFFFFu",
                  "-DSVAE_NO_BUILTIN_OVERFLOW"],
}
SAN_OPTIONS = {"ASAN_OPTIONS": "halt_on_error=1:detect_leaks=1:abort_on_error=0",
               "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
SAN_REPORTS = ("runtime error:", "AddressSanitizer", "LeakSanitizer", "UndefinedBehaviorSanitizer")


@pytest.fixture(scope="module")
def cc() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(name) if name else None
        if path:
            return path
    pytest.skip("no C compiler (cc, gcc or clang) on PATH")


@pytest.fixture(scope="module")
def sanitize(cc, tmp_path_factory) -> tuple[list[str], dict[str, str]]:
    """(SANITIZE, the environment to run with) if a program built with SANITIZE compiles and runs
    here (without LeakSanitizer if only that fails, as under ptrace-restricted containers), else
    ([], the plain environment) and a warning."""
    d = tmp_path_factory.mktemp("sanitizer_probe")
    (d / "probe.c").write_text("#include <stdlib.h>\nint main(void) { free(malloc(1)); return 0; }\n")
    try:
        built = subprocess.run([cc, *SANITIZE, "-o", str(d / "probe"), str(d / "probe.c")],
                               capture_output=True, text=True, timeout=120)
        if built.returncode == 0:
            for leaks in ("1", "0"):
                env = {**os.environ, **SAN_OPTIONS}
                env["ASAN_OPTIONS"] = env["ASAN_OPTIONS"].replace("detect_leaks=1", f"detect_leaks={leaks}")
                if subprocess.run([str(d / "probe")], capture_output=True, env=env, timeout=60).returncode == 0:
                    return SANITIZE, env
    except (OSError, subprocess.TimeoutExpired):
        pass
    warnings.warn(f"{cc} cannot build and run -fsanitize=address,undefined programs here: the C reply "
                  "parser is fuzzed in a plain -O2 build, without sanitizer checks", stacklevel=2)
    return [], dict(os.environ)


@pytest.fixture(scope="module")
def fuzz_reply(cc, sanitize, tmp_path_factory):
    """run(config, *args, stdin=None): fuzz_reply.c built for config (once) and run with args."""
    out, built = tmp_path_factory.mktemp("fuzz_reply"), {}

    def build(config: str) -> Path:
        if config not in built:
            exe = out / f"fuzz_reply_{config}"
            cmd = [cc, *CFLAGS, *sanitize[0], *CONFIGS[config], "-o", str(exe), str(SRC / "fuzz_reply.c")]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                pytest.fail(f"fuzz_reply.c does not compile ({config}):\n{res.stderr}")
            built[config] = exe
        return built[config]

    def run(config: str, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(build(config)), *args], input=stdin, capture_output=True, env=sanitize[1],
                              timeout=600)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIGS))
def test_reply_parser_survives_fuzzing(fuzz_reply, sanitize, config):
    res = fuzz_reply(config, str(N_INPUTS))
    stdout, stderr = res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")
    print(f"[{' '.join(sanitize[0]) or 'no sanitizers'}, {sanitize[1].get('ASAN_OPTIONS', '')}] {stdout}")
    report = [line for line in stderr.splitlines() if any(s in line for s in SAN_REPORTS)]
    assert not report, f"sanitizer report:\n{stderr[-6000:]}"
    assert res.returncode == 0, f"exit {res.returncode}\n{stdout}\n{stderr[-6000:]}"
    assert f"{N_INPUTS} inputs" in stdout and "OK: 0 failures" in stdout


def _parse(fuzz_reply, config: str, frame: bytes) -> tuple[str, dict[str, str], list[dict[str, str]]]:
    """fuzz_reply --parse on one frame: (result line, header fields, decode sections)."""
    res = fuzz_reply(config, "--parse", "-", stdin=bytes(frame))
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    lines = res.stdout.decode().splitlines()
    head = dict(kv.split("=", 1) for kv in lines[1].split()) if len(lines) > 1 and "=" in lines[1] else {}
    sections = [dict(kv.split("=", 1) for kv in ln.split()[2:]) for ln in lines if ln.startswith("section ")]
    return lines[0], head, sections


def _issue12_reply(seq: int = 1, t: int = 0) -> bytes:
    """The reply of issue 12: a DECODE_REPLY header with n_bins = 2^31, n_rates = 2^31 - 2, no body
    (with HAS_READOUT, so that 4 * n_bins * (2 + n_rates) wraps to 0 as it did in v1)."""
    head = wire.ReplyFields(magic=MAGIC, version=PROTOCOL_VERSION, msg_type=int(MsgType.DECODE_REPLY), status=0,
                            flags=int(ReplyFlag.HAS_READOUT), seq=seq, t_client_ns=t, server_ns=0, queue_ns=0,
                            n_bins=2**31, content_dim=0, style_dim=0, n_classes=0, velocity_dim=0, history_bins=0,
                            reserved=0, n_rates=2**31 - 2, body_bytes=0)
    return wire.REP.pack(*head)


@pytest.mark.parametrize(("config", "code"), [("limits", "SVAE_E_DIMS"), ("no_limits", "SVAE_E_OVERFLOW")])
def test_issue12_reply_is_rejected(fuzz_reply, config, code):
    result, _, _ = _parse(fuzz_reply, config, _issue12_reply())
    assert result.split()[1] == code, result


def _output(rng, n_bins: int, readout: bool, n_rates: int = 174) -> DecodeOutput:
    r = readout
    return DecodeOutput(content=rng.normal(size=(n_bins, 8)).astype(np.float32),
                        style_mean=rng.normal(size=(n_bins, 5)).astype(np.float32),
                        angle=rng.uniform(-3, 3, n_bins).astype(np.float32) if r else None,
                        direction=np.array([7, 0, 3][:n_bins], np.int64) if r else None,
                        proba=rng.dirichlet(np.ones(8), n_bins).astype(np.float32) if r else None,
                        velocity=rng.normal(size=(n_bins, 2)).astype(np.float32) if r else None,
                        rates=rng.uniform(0, 50, (n_bins, n_rates)).astype(np.float32))


@pytest.mark.parametrize("readout", [True, False])
def test_parser_reads_the_python_servers_frames(fuzz_reply, readout):
    """Frames built by runtime/wire.py (the server's code) parse, with the same fields and offsets."""
    layout = wire.DecodeLayout(content_dim=8, style_dim=5, n_classes=8 if readout else 0,
                               velocity_dim=2 if readout else 0, history_bins=3 if readout else 0, n_rates=174,
                               has_readout=readout)
    rng = np.random.default_rng(0)
    n_bins = 3
    frame = wire.finish(wire.DecodeReplyWriter(layout).write(42, 123, _output(rng, n_bins, readout), fresh=True),
                        777, 55)
    result, head, sections = _parse(fuzz_reply, "limits", frame)
    assert result.startswith("rc=0 "), result
    assert head["msg_type"] == "129" and head["seq"] == "42" and head["t_client_ns"] == "123"
    assert head["server_ns"] == "777" and head["queue_ns"] == "55" and head["n_bins"] == str(n_bins)
    assert head["n_rates"] == "174" and head["flags"] == str(layout.flags | int(ReplyFlag.RESET_APPLIED))
    assert (head["velocity_dim"], head["history_bins"]) == (("2", "3") if readout else ("0", "0"))
    views = layout.sections(frame, n_bins)
    assert len(sections) == len(views) == 7
    offset = wire.REPLY_HEADER_SIZE
    for sec, (name, view) in zip(sections, views.items()):
        if view is None:
            assert sec == {"absent": "1"}, name
            continue
        assert int(sec["offset"]) == offset and int(sec["rows"]) == n_bins, name
        assert np.float32(float(sec["first"])) == view.reshape(n_bins, -1)[0, 0], name
        offset += view.nbytes
    assert offset == len(frame)

    for frame, msg_type in [(wire.pack_reply(MsgType.PONG, 5, 6), 0x84),
                            (wire.pack_reply(MsgType.INFO_REPLY, 5, 6, b'{"n_channels": 174}'), 0x82),
                            (wire.pack_error(ErrorCode.BAD_SHAPE, "n_channels is 10", 5, 6), 0xFF)]:
        result, head, _ = _parse(fuzz_reply, "limits", frame)
        assert result.startswith("rc=0 ") and head["msg_type"] == str(msg_type) and head["seq"] == "5", result
    # ... and a frame one byte short of its header's body_bytes is refused, not read past.
    result, _, _ = _parse(fuzz_reply, "limits", bytes(frame)[:-1])
    assert result.split()[1] == "SVAE_E_LENGTH", result


def test_parser_refuses_readout_widths_without_the_readout_flag_and_v1_replies(fuzz_reply):
    layout = wire.DecodeLayout(8, 5, 8, 2, 3, 174, True)
    frame = bytearray(wire.DecodeReplyWriter(layout).write(1, 2, _output(np.random.default_rng(1), 1, True)))
    frame[7] = 0  # HAS_READOUT cleared: n_classes, velocity_dim and history_bins must then be 0
    assert _parse(fuzz_reply, "limits", frame)[0].split()[1] == "SVAE_E_DIMS"
    v1_error = b"SVAE\x01\xff\x02\x00" + bytes(40)  # what a version 1 server answers a v2 request
    assert _parse(fuzz_reply, "limits", v1_error)[0].split()[1] == "SVAE_E_VERSION"


# -- the whole client against an impostor -------------------------------------------------------------

def _issue12_decode(seq, t):
    return [[_issue12_reply(seq, t)]]


def _two_bin_decode(seq, t):
    """A valid DECODE_REPLY of two bins (the demo asked for one)."""
    layout = wire.DecodeLayout(content_dim=2, style_dim=2, n_classes=2, velocity_dim=2, history_bins=3, n_rates=3,
                               has_readout=True)
    out = SimpleNamespace(content=np.zeros((2, 2), np.float32), style_mean=np.zeros((2, 2), np.float32),
                          angle=np.zeros(2, np.float32), direction=np.zeros(2, np.int64),
                          proba=np.zeros((2, 2), np.float32), velocity=np.zeros((2, 2), np.float32),
                          rates=np.zeros((2, 3), np.float32))
    return [[bytes(wire.DecodeReplyWriter(layout).write(seq, t, out))]]


# what the impostor answers the demo's first DECODE with -> what the demo must report on stderr
IMPOSTORS = {
    "issue12_reply": (_issue12_decode, "reply dimensions out of range"),
    "pong_for_decode": (lambda seq, t: [[wire.pack_reply(MsgType.PONG, seq, t)]], "reply does not answer the request"),
    "two_bins_for_one": (_two_bin_decode, "reply does not answer the request"),
    "multipart": (lambda seq, t: [[wire.pack_reply(MsgType.PONG, seq, t), b"more"]], "reply of more than one frame"),
    "garbage": (lambda seq, t: [[b"SVAE\x02" + bytes(range(200))]], "reply body_bytes disagrees"),
    "v1_server": (lambda seq, t: [[b"SVAE\x01\xff\x02\x00" + bytes(40)]], "reply of an unknown protocol version"),
    "late_reply_flood": ("flood", "no reply in time"),
    "oversize": (lambda seq, t: [[b"SVAE" + bytes(17 << 20)]], "no reply in time"),  # over SVAE_MAX_REPLY_BYTES
}


def _zmq_header() -> bool:
    import sysconfig
    return any(p.exists() for p in (Path("/usr/include/zmq.h"), Path("/usr/local/include/zmq.h"),
                                    Path(sysconfig.get_paths()["include"]) / "zmq.h"))


@pytest.fixture(scope="module")
def demo(cc, sanitize, tmp_path_factory) -> Path:
    if not _zmq_header():
        pytest.skip("no libzmq headers (apt-get install libzmq3-dev)")
    exe = tmp_path_factory.mktemp("svae_demo") / "svae_demo"
    res = subprocess.run([cc, *CFLAGS, "-D_POSIX_C_SOURCE=200809L", *sanitize[0], "-o", str(exe),
                          str(SRC / "svae_demo.c"), "-lzmq"], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        pytest.fail(f"svae_demo.c does not compile:\n{res.stderr}")
    return exe


@pytest.mark.parametrize("name", list(IMPOSTORS))
def test_c_client_survives_an_impostor(demo, sanitize, name):
    """svae_demo, built with the sanitizers, against a ROUTER that answers PING and INFO properly and
    the first DECODE with a malicious or broken reply: the demo reports it and exits 1, nothing worse."""
    answer, expected = IMPOSTORS[name]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    done = threading.Event()

    def impostor():
        flooding, seq0, ident = False, 0, b""
        while not done.is_set():
            if flooding:  # valid replies to requests never sent, faster than the client's timeout
                seq0 += 1
                sock.send_multipart([ident, wire.pack_reply(MsgType.PONG, 10_000 + seq0, 0)])
            if not sock.poll(10):
                continue
            ident, *_, frame = sock.recv_multipart()
            _, _, msg_type, _, _, seq, t, _, _ = wire.REQ.unpack_from(frame)
            if msg_type == MsgType.PING:
                sock.send_multipart([ident, wire.pack_reply(MsgType.PONG, seq, t)])
            elif msg_type == MsgType.INFO:
                sock.send_multipart([ident, wire.pack_reply(MsgType.INFO_REPLY, seq, t, b'{"n_channels": 3}')])
            elif answer == "flood":
                flooding = True
            else:
                for parts in answer(seq, t):
                    sock.send_multipart([ident, *parts])

    th = threading.Thread(target=impostor, daemon=True)
    th.start()
    t0 = time.monotonic()
    try:
        res = subprocess.run([str(demo), f"tcp://127.0.0.1:{port}", "300"], input=b"1 2 3\n", capture_output=True,
                             env=sanitize[1], timeout=20)
    finally:
        done.set()
        th.join(5)
        sock.close()
        ctx.term()
    elapsed = time.monotonic() - t0
    stdout, stderr = res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")
    print(f"{elapsed:.2f} s: {stderr.strip()}")
    assert not [line for line in stderr.splitlines() if any(s in line for s in SAN_REPORTS)], stderr[-6000:]
    assert res.returncode == 1, f"exit {res.returncode}\n{stdout}\n{stderr}"
    assert "info n_channels=3" in stdout and "decode seq=3 failed" in stderr and expected in stderr, stderr
    if answer == "flood":  # the deadline counts from the send: a flood of late replies cannot hold it
        assert elapsed < 5, f"the client waited {elapsed:.1f} s under a flood of late replies (timeout 0.3 s)"
