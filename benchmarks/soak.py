"""Soak and fault test of ``swapvae serve``: hours of a rig's life in minutes, with attacks.

    python benchmarks/soak.py                      # >= 100 000 messages, d = 174 (about 2 minutes)
    python benchmarks/soak.py --quick              # a few thousand (CI: tests/test_soak.py)
    python benchmarks/soak.py --bundle DIR --seconds 60 --out results/soak.json

One server (request/reply and a SUB -> XPUB stream, loopback) and, each in a process of its
own, for ``--seconds``:

- closed: the closed loop, one-bin DECODEs at a steady 1 kHz, trials of 50 bins (RESET at
  each first bin); every reply checked against the in-process engine (``wrong``: velocity or
  angle off by more than float rounding); a request unanswered within 1 s is ``lost``;
- bulk: a well-behaved client sending multi-bin DECODEs (256 bins, one at a time), checked
  the same way;
- stream: a rig publisher at 500 Hz on the SUB input (valid bins, and malformed frames
  between them) and a subscriber that checks every valid bin's reply; plus a subscriber
  that never reads;
- attack (niced, as an attacker on another machine would not share the server's cores):
  cycles through malformed requests (garbage, wrong magic, version, dtype, shape, length,
  NaN, reserved flags, unknown type, two frames), envelopes over the limits (long and many
  routing frames), multipart messages of 16 frames of 1 MiB, frames over the size limit,
  pipelined max-size bulk requests never read, PING/INFO bursts and idle TCP connections;
- flood (niced): STATS back to back, and bursts of 100 pipelined STATS;
- slow (niced): a client that sends one-bin requests and never reads its replies.

Reported: messages sent (by kind), server crashes (0 unless the process died), valid requests
lost or wrong (closed loop, bulk client, stream), the closed loop's round trip and its
server/queue times (p50, p99, max), the server's RSS (idle before the attacks, peak = VmHWM,
final), and the drops and errors the server counted (STATS). Writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq
from _common import ROOT, build_bundle, cpu_name, write_result  # benchmarks/ is on sys.path when run as a script

from swapvae.runtime import wire  # noqa: E402
from swapvae.runtime.client import Client, ServiceError, ServiceTimeout  # noqa: E402
from swapvae.schemas.protocol import MsgType  # noqa: E402

TRIAL = 50  # bins per trial of the closed loop and the stream (RESET at the first)
TOL = dict(rtol=1e-4, atol=1e-4)  # several bins in one engine call: equal up to float rounding


# -- the server ------------------------------------------------------------------------------------

class ServiceProc:
    """``swapvae serve`` in a subprocess; ``endpoints`` from its ready line; RSS from /proc."""

    def __init__(self, bundle: Path, *extra: str, tree: Path = ROOT, timeout: float = 120.0, prefix=()):
        cmd = [*prefix, sys.executable, "-m", "swapvae", "serve", str(bundle), "--bind", "tcp://127.0.0.1:*", *extra]
        self.p = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(tree)})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.p.stdout], [], [], 0.2)[0]:
                line = self.p.stdout.readline()
                if line.startswith("ready "):
                    self.endpoints = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
                    self.endpoint = self.endpoints.get("router")
                    return
            if self.p.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"the server did not start: {self.p.stderr.read()[-3000:]}")

    def memory(self) -> dict[str, float]:
        """VmRSS and VmHWM (peak) in MB, or {} once the process is gone."""
        try:
            text = Path(f"/proc/{self.p.pid}/status").read_text()
        except OSError:
            return {}
        return {k: int(line.split()[1]) / 1024 for line in text.splitlines() for k in ("VmRSS", "VmHWM")
                if line.startswith(k + ":")}

    def stop(self) -> int | None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)
        return self.p.returncode


class RssSampler(threading.Thread):
    def __init__(self, svc: ServiceProc, period: float = 0.02):
        super().__init__(daemon=True)
        self.svc, self.period, self.peak, self.done = svc, period, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.svc.memory().get("VmRSS", 0.0))
            time.sleep(self.period)


# -- roles (each a process: python soak.py --_role NAME ...) --------------------------------------------

def _engine(bundle: str):
    from swapvae.runtime.engine import BundleDecoder

    return BundleDecoder(bundle)


def _trials(n_channels: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).poisson(2.0, (n, TRIAL, n_channels)).astype(np.float32)


def _references(eng, trials: np.ndarray) -> list:
    """Per trial, the engine's one-bin decodes of its bins from a RESET (copies)."""
    out = []
    for t in trials:
        s = eng.new_stream()
        out.append([eng.decode_stream(s, x, i == 0).copy() for i, x in enumerate(t)])
    return out


def _close(got, ref) -> bool:
    return bool(np.allclose(got.velocity, ref.velocity, **TOL) and np.allclose(got.angle, ref.angle, **TOL))


def role_closed(args) -> dict:
    eng = _engine(args.bundle)
    trials = _trials(eng.n_channels, 8, 1)
    refs = _references(eng, trials)
    n = int(args.seconds * 1000)
    rtt, srv, que = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    lost = wrong = errors = done = 0
    c = Client(args.endpoint, timeout_ms=1000)
    start, t, k = time.perf_counter(), 0, 0  # trial t, bin k of it (0: sent with RESET)
    for i in range(n):
        wait = start + i / 1000.0 - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        try:
            out = c.decode(trials[t][k], reset=k == 0)
        except (ServiceTimeout, ServiceError) as e:
            lost += isinstance(e, ServiceTimeout)
            errors += isinstance(e, ServiceError)
            k = 0  # a timeout rebuilds the socket (a new stream): start the trial again
            continue
        wrong += not _close(out, refs[t][k])
        rtt[done], srv[done], que[done] = out.rtt_ns, out.server_ns, out.queue_ns
        done += 1
        k += 1
        if k == TRIAL:
            t, k = (t + 1) % len(trials), 0
    c.close()
    pct = lambda a: {"p50": float(np.percentile(a, 50)) / 1e3, "p99": float(np.percentile(a, 99)) / 1e3,  # noqa: E731
                     "max": float(a.max()) / 1e3} if len(a) else {}
    return {"sent": n, "answered": done, "lost": lost, "wrong": wrong, "errors": errors,
            "rtt_us": pct(rtt[:done]), "server_us": pct(srv[:done]), "queue_us": pct(que[:done])}


def role_bulk(args) -> dict:
    eng = _engine(args.bundle)
    rng = np.random.default_rng(2)
    sent = lost = wrong = overloaded = 0
    deadline = time.monotonic() + args.seconds
    with Client(args.endpoint, timeout_ms=5000) as c:
        while time.monotonic() < deadline:
            x = rng.poisson(2.0, (256, eng.n_channels)).astype(np.float32)
            sent += 1
            try:
                out = c.decode(x, reset=True)
            except ServiceTimeout:
                lost += 1
                continue
            except ServiceError as e:
                overloaded += e.name == "OVERLOADED"
                lost += e.name != "OVERLOADED"
                continue
            ref = eng.decode_stream(eng.new_stream(), x, True)
            wrong += not _close(out, ref)
            time.sleep(0.05)
    return {"sent": sent, "lost": lost, "wrong": wrong, "overloaded": overloaded}


def role_stream(args) -> dict:
    eng = _engine(args.bundle)
    trials = _trials(eng.n_channels, 4, 3)
    refs = _references(eng, trials)
    ctx = zmq.Context()
    rig = ctx.socket(zmq.PUB)
    rig.setsockopt(zmq.LINGER, 0)
    rig.bind(args.rig)
    sink = ctx.socket(zmq.SUB)
    sink.setsockopt(zmq.SUBSCRIBE, b"SVAE")
    sink.setsockopt(zmq.RCVHWM, 100_000)
    sink.connect(args.pub)
    idle = ctx.socket(zmq.SUB)  # a subscriber that never reads
    idle.setsockopt(zmq.SUBSCRIBE, b"")
    idle.setsockopt(zmq.RCVHWM, 1)
    idle.connect(args.pub)
    got: dict[int, tuple] = {}
    stop = threading.Event()

    def read():
        while not stop.is_set() or sink.poll(0):
            if sink.poll(100):
                head, body = wire.parse_reply(sink.recv())
                if head.msg_type == MsgType.DECODE_REPLY and head.seq >= 1000:
                    got[head.seq] = wire.decode_arrays(head, body)

    deadline = time.monotonic() + 20  # PUB/SUB join: publish probes until one comes back
    while not got and time.monotonic() < deadline:
        rig.send(wire.pack_request(MsgType.DECODE, 1000, 0, trials[0][0], flags=1))
        if sink.poll(100):
            head, body = wire.parse_reply(sink.recv())
            got[head.seq] = True
    while sink.poll(300):
        sink.recv()
    got.clear()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    n = int(args.seconds * 500)
    bad = [b"garbage", b"SVAE\x02\x01\x01\x00" + bytes(24) + b"x", [b"two", b"frames"]]
    start, seq, malformed = time.perf_counter(), 1000, 0
    for i in range(n):
        wait = start + i / 500.0 - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        seq += 1
        t, b = (i // TRIAL) % len(trials), i % TRIAL
        rig.send(wire.pack_request(MsgType.DECODE, seq, 0, trials[t][b], flags=int(b == 0)))
        if i % 10 == 5:  # a malformed frame between bins (seq as the last bin's: no false gap)
            f = bad[malformed % len(bad)]
            rig.send_multipart(f) if isinstance(f, list) else rig.send(f)
            malformed += 1
    time.sleep(1.0)
    stop.set()
    reader.join(5)
    lost = wrong = 0
    for i in range(n):
        t, b = (i // TRIAL) % len(trials), i % TRIAL
        a = got.get(1001 + i)
        if a is None:
            lost += 1
        elif not (np.allclose(a["velocity"], refs[t][b].velocity, **TOL)
                  and np.allclose(a["angle"], refs[t][b].angle, **TOL)):
            wrong += 1
    for s in (rig, sink, idle):
        s.close(linger=0)
    ctx.term()
    return {"sent": n + malformed, "valid": n, "malformed": malformed, "lost": lost, "wrong": wrong}


def role_attack(args) -> dict:
    os.nice(10)
    n_ch = args.channels
    info = json.loads(args.info)
    ctx = zmq.Context()
    host, port = args.endpoint.rsplit("//", 1)[1].rsplit(":", 1)
    rng = np.random.default_rng(4)
    counts = {k: 0 for k in ("malformed", "envelope", "multipart", "oversize", "bulk_flood", "control_burst",
                             "idle_connections", "answered")}

    def dealer(**opts):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 2000)
        for k, v in opts.items():
            s.setsockopt(getattr(zmq, k), v)
        s.connect(args.endpoint)
        return s

    good = wire.pack_request(MsgType.DECODE, 1, 0, np.ones(n_ch, np.float32))
    nan = np.ones(n_ch, np.float32)
    nan[3] = np.nan
    malformed = [
        lambda: [rng.bytes(int(rng.integers(0, 200)))],
        lambda: [b"GET / HTTP/1.1\r\n" + bytes(40)],
        lambda: [good[:4] + b"\x01" + good[5:]],
        lambda: [good[:6] + b"\x2a" + good[7:]],
        lambda: [wire.pack_request(MsgType.DECODE, 2, 0, np.ones(n_ch - 1, np.float32))],
        lambda: [good[:-3]],
        lambda: [wire.pack_request(MsgType.DECODE, 3, 0, nan)],
        lambda: [good[:7] + b"\x80" + good[8:]],
        lambda: [wire.pack_request(77, 4, 0)],
        lambda: [good[:32], good[32:]],
    ]
    envelopes = [lambda: [b"x" * 300, b"", good], lambda: [b"h"] * 12 + [b"", good],
                 lambda: [bytes(100_000)] * 20 + [b"", good]]
    s = dealer()
    deadline, cycle = time.monotonic() + args.seconds, 0
    while time.monotonic() < deadline:
        cycle += 1
        for make in malformed * 5:  # answered with ERROR replies
            s.send_multipart(make())
            counts["malformed"] += 1
        for make in envelopes:
            s.send_multipart(make())
            counts["envelope"] += 1
        while s.poll(200):
            s.recv_multipart()
            counts["answered"] += 1
        if cycle % 3 == 0:  # 16 frames of 1 MiB in one message: refused (the whole of it held by libzmq first)
            s.send_multipart([bytes(1 << 20)] * 16)
            counts["multipart"] += 1
        if cycle % 5 == 0:  # a frame over the size limit: the connection is dropped, no reply
            o = dealer()
            o.send(bytes(info["max_request_bytes"] + 1))
            counts["oversize"] += 1
            o.close()
        if cycle % 7 == 0:  # max-size bulk requests, pipelined, never read
            b = dealer()
            big = wire.pack_request(MsgType.DECODE, 5, 0, np.ones((info["max_bins"], n_ch), np.float64))
            for _ in range(40):
                try:
                    b.send(big, zmq.NOBLOCK)
                    counts["bulk_flood"] += 1
                except zmq.Again:
                    break
            time.sleep(0.5)
            b.close()
        if cycle % 4 == 0:  # a burst of control requests (RATE_LIMITED beyond the bucket)
            for i in range(200):
                s.send(wire.pack_request(MsgType.PING if i % 2 else MsgType.INFO, i, 0))
            counts["control_burst"] += 200
        if cycle % 11 == 0:  # idle TCP connections that never speak ZMTP (closed at the handshake limit)
            conns = [socket.create_connection((host, int(port))) for _ in range(50)]
            counts["idle_connections"] += 50
            time.sleep(0.2)
            for c in conns:
                c.close()
    while s.poll(500):
        s.recv_multipart()
        counts["answered"] += 1
    s.close()
    ctx.term()
    counts["sent"] = sum(v for k, v in counts.items() if k not in ("answered", "idle_connections"))
    return counts


def role_flood(args) -> dict:
    os.nice(10)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(args.endpoint)
    sent = answered = limited = 0
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        for i in range(100):  # back to back, each waited for (10 ms at most: beyond its rate, no reply)
            s.send(wire.pack_request(MsgType.STATS, i, 0))
            sent += 1
            if s.poll(10):
                head, _ = wire.parse_reply(s.recv())
                answered += 1
                limited += head.status != 0
        for i in range(100):  # a pipelined burst
            s.send(wire.pack_request(MsgType.STATS, i, 0))
        sent += 100
        while s.poll(20):
            head, _ = wire.parse_reply(s.recv())
            answered += 1
            limited += head.status != 0
    s.close(linger=0)
    ctx.term()
    return {"sent": sent, "answered": answered, "rate_limited": limited}


def role_slow(args) -> dict:
    os.nice(10)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.SNDTIMEO, 100)
    s.connect(args.endpoint)
    frame = wire.pack_request(MsgType.DECODE, 1, 0, np.ones(args.channels, np.float32))
    sent = 0
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:  # never reads
        try:
            s.send(frame)
            sent += 1
        except zmq.Again:
            pass
        time.sleep(0.002)
    s.close(linger=0)
    ctx.term()
    return {"sent": sent}


ROLES = {"closed": role_closed, "bulk": role_bulk, "stream": role_stream, "attack": role_attack,
         "flood": role_flood, "slow": role_slow}


def _spawn(role: str, args, **extra) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--_role", role, "--seconds", str(args.seconds)]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _result(p: subprocess.Popen, role: str, timeout: float) -> dict:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    if p.returncode != 0:
        return {"failed": True, "returncode": p.returncode, "stderr": err[-2000:]}
    return json.loads(out.strip().splitlines()[-1])


def soak(bundle: Path, seconds: float, roles=tuple(ROLES)) -> dict:
    probe = zmq.Context.instance().socket(zmq.PUB)  # a free port for the rig's publisher
    rig_port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(linger=0)
    rig = f"tcp://127.0.0.1:{rig_port}"
    svc = ServiceProc(bundle, "--sub", rig, "--pub", "tcp://127.0.0.1:*")
    sampler = RssSampler(svc)
    try:
        with Client(svc.endpoint, timeout_ms=5000) as c:  # warm, then the idle footprint
            info = c.info()
            x = np.ones(info.n_channels, np.float32)
            for i in range(300):
                c.decode(x, reset=i == 0)
            c.decode(np.ones((64, info.n_channels), np.float32))
        time.sleep(1.0)
        idle = svc.memory()["VmRSS"]
        sampler.start()
        args = argparse.Namespace(seconds=seconds)
        common = {"endpoint": svc.endpoint, "bundle": bundle}
        spawn = {"closed": lambda: _spawn("closed", args, **common), "bulk": lambda: _spawn("bulk", args, **common),
                 "stream": lambda: _spawn("stream", args, bundle=bundle, rig=rig, pub=svc.endpoints["pub"]),
                 "attack": lambda: _spawn("attack", args, endpoint=svc.endpoint, channels=info.n_channels,
                                          info=json.dumps({"max_bins": info.max_bins,
                                                           "max_request_bytes": info.max_request_bytes})),
                 "flood": lambda: _spawn("flood", args, endpoint=svc.endpoint),
                 "slow": lambda: _spawn("slow", args, endpoint=svc.endpoint, channels=info.n_channels)}
        procs = {role: spawn[role]() for role in roles}
        results = {role: _result(p, role, seconds + 120) for role, p in procs.items()}
        alive = svc.p.poll() is None
        time.sleep(2.0)  # the attackers gone: what the server keeps
        final = svc.memory().get("VmRSS", 0.0)
        stats = None
        if alive:
            with Client(svc.endpoint, timeout_ms=5000) as c:
                stats = json.loads(c.stats().model_dump_json())
        sampler.done.set()
        sampler.join(2)
        peak = max(sampler.peak, svc.memory().get("VmHWM", 0.0))
    finally:
        code = svc.stop()
    crashes = int(not alive) + int(code not in (0, None))
    valid = {k: results[k] for k in ("closed", "bulk", "stream") if k in results}
    lost = sum(r.get("lost", 0) + r.get("errors", 0) for r in valid.values())
    wrong = sum(r.get("wrong", 0) for r in valid.values())
    failed = [k for k, r in results.items() if r.get("failed")]
    sent = sum(r.get("sent", 0) for r in results.values())
    return {"messages_sent": sent, "seconds": seconds, "crashes": crashes, "roles_failed": failed,
            "valid_lost": lost, "valid_wrong": wrong, "closed_loop": results.get("closed", {}),
            "rss_mb": {"idle": idle, "peak": peak, "final": final, "peak_over_idle": peak / idle},
            "server_stats": stats, "roles": results, "server_exit": code}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few thousand messages (CI)")
    p.add_argument("--seconds", type=float, help="how long the clients and attackers run (default 75, --quick 6)")
    p.add_argument("--bundle", help="serve this bundle (default: build a d = --channels one in --workdir)")
    p.add_argument("--channels", type=int, default=174)
    p.add_argument("--workdir", help="where the built bundle is kept and reused")
    p.add_argument("--roles", default=",".join(ROLES), help="which clients and attackers run (diagnosis)")
    p.add_argument("--out", default=str(ROOT / "results/soak.json"))
    for hidden in ("_role", "endpoint", "rig", "pub", "info"):
        p.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._role:
        args.seconds = float(args.seconds)
        print(json.dumps(ROLES[args._role](args)))
        return 0
    seconds = args.seconds or (6.0 if args.quick else 75.0)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle) if args.bundle else build_bundle(Path(args.workdir or tmp), args.channels)[1]
        res = soak(bundle, seconds, args.roles.split(","))
    res["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "load_avg": os.getloadavg()}
    cl, rss, st = res["closed_loop"], res["rss_mb"], res["server_stats"] or {}
    print(f"soak: {res['messages_sent']} messages in {seconds:.0f} s; crashes {res['crashes']}; valid requests "
          f"lost {res['valid_lost']}, wrong {res['valid_wrong']}; roles failed {res['roles_failed'] or 'none'}")
    if cl.get("rtt_us"):
        print(f"closed loop (1 kHz): {cl['answered']} answered; round trip p50 {cl['rtt_us']['p50']:.0f} us, p99 "
              f"{cl['rtt_us']['p99']:.0f} us, max {cl['rtt_us']['max']:.0f} us; queue p50 {cl['queue_us']['p50']:.0f}"
              f" us, p99 {cl['queue_us']['p99']:.0f} us, max {cl['queue_us']['max']:.0f} us")
    print(f"server RSS: idle {rss['idle']:.0f} MB, peak {rss['peak']:.0f} MB (x{rss['peak_over_idle']:.2f}), "
          f"final {rss['final']:.0f} MB")
    if st:
        print(f"server counted: errors {st['errors']}; dropped {st['dropped']}; streams evicted "
              f"{st['streams_evicted']}; bulk slices {st['bulk']['slices']}")
    for role, r in res["roles"].items():
        print(f"  {role}: {r}")
    write_result(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
