"""The attacks of issue 12, one at a time, each measured against a fresh ``swapvae serve``.

    python benchmarks/attacks.py                          # every scenario, d = 174
    python benchmarks/attacks.py hol stats_flood --runs 5
    python benchmarks/attacks.py multipart --tree /tmp/base   # another checkout's server (before/after)

Scenarios:
- ``hol``: head of line. A client queues 31 DECODEs of 1024 bins, another then sends one
  one-bin DECODE: the place of its reply among the 32 (by arrival at the clients) and its
  round trip, per run.
- ``bulk_load``: the closed loop (one-bin DECODEs at 1 kHz) alone, then while a bulk client
  keeps two max-size DECODEs in flight, in alternating phases: round trip and queue time
  p50/p99/max of each, and the longest bulk engine call (STATS ``bulk``).
- ``stats_flood``: the closed loop alone, then beside a STATS flood (one client back to back,
  one pipelining bursts), in alternating phases: p50/p99/max of each.
- ``multipart``: one message of 1 000 frames of 1 MB; ``envelope``: 999 frames of 1 MB, an
  empty frame and a valid request (the issue's). Server RSS (idle, peak, 1 s and 5 s after),
  and how long another client's requests stalled meanwhile.
- ``slow_reader``: a client sending max-size DECODEs for 10 s without reading its replies;
  ``slow_subscriber``: a subscriber that never reads while the stream runs at 1 kHz. RSS, and
  what the server counted (STATS ``dropped``).
- ``idle_conns``: the server under a descriptor limit of 256 (``prlimit``), 300 idle TCP
  connections, then a client's first reply: how long it took.

Load generators (bulk, STATS flood) run as niced processes of their own (an attacker on
another machine does not share the server's cores, nor the measuring client's interpreter).
``--rt`` runs the server and the closed loop real-time (SCHED_FIFO), as a rig would, so that
other tenants of a shared machine cannot preempt them for milliseconds.

Prints a line per scenario and writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq
from _common import ROOT, build_bundle, cpu_name, write_result  # benchmarks/ is on sys.path when run as a script
from soak import RssSampler, ServiceProc  # noqa: E402

from swapvae.runtime import wire  # noqa: E402
from swapvae.runtime.client import Client  # noqa: E402
from swapvae.runtime.wire import SERVER_NS_OFFSET, RequestBuffer  # noqa: E402
from swapvae.schemas.protocol import MsgType  # noqa: E402

SCENARIOS = ("hol", "bulk_load", "stats_flood", "multipart", "envelope", "slow_reader", "slow_subscriber",
             "idle_conns")


def _dealer(endpoint: str, **opts):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 10_000)
    for k, v in opts.items():
        s.setsockopt(getattr(zmq, k), v)
    s.connect(endpoint)
    return s


def _pct(a) -> dict:
    a = np.asarray(a, float)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": float(a.max()),
            "n": int(a.size)} if a.size else {}


class ClosedLoop(threading.Thread):
    """One-bin DECODEs at ``rate`` Hz from one DEALER, each round trip (us) tagged with the phase."""

    def __init__(self, endpoint: str, n_channels: int, rate: float = 1000.0):
        super().__init__(daemon=True)
        self.sock, self.buf, self.rate = _dealer(endpoint), RequestBuffer(n_channels), rate
        self.buf.counts[:] = np.random.default_rng(0).poisson(2.0, n_channels)
        self.phase, self.samples, self.stop_at, self.lost = "warmup", [], None, 0

    rt = False  # run the loop SCHED_FIFO (as a rig's real-time loop would)

    def run(self) -> None:
        if self.rt:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))  # this thread only

        seq, period, t0 = 0, 1.0 / self.rate, time.perf_counter()
        while self.stop_at is None or time.perf_counter() < self.stop_at:
            seq += 1
            wait = t0 + seq * period - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            start = time.perf_counter_ns()
            self.sock.send(self.buf.stamp(seq, 0, reset=seq == 1), copy=True)
            try:
                reply = self.sock.recv()
            except Exception:  # noqa: BLE001 - a lost request: counted
                self.lost += 1
                continue
            rtt = time.perf_counter_ns() - start
            srv, que = struct.unpack_from("<II", reply, SERVER_NS_OFFSET)
            self.samples.append((self.phase, rtt / 1e3, srv / 1e3, que / 1e3))
        self.sock.close()

    def summary(self, phase: str) -> dict:
        rows = [s for s in self.samples if s[0] == phase]
        return {"rtt_us": _pct([r[1] for r in rows]), "server_us": _pct([r[2] for r in rows]),
                "queue_us": _pct([r[3] for r in rows])}


def _phases(loop: ClosedLoop, attack_on, attack_off, seconds: float, rounds: int) -> dict:
    """Alternate quiet and attacked phases of ``seconds`` each, ``rounds`` times."""
    for _ in range(rounds):
        for phase, switch in (("quiet", attack_off), ("attacked", attack_on)):
            switch()
            time.sleep(0.2)  # let the switch take effect before sampling
            loop.phase = phase
            time.sleep(seconds)
            loop.phase = "between"
    attack_off()
    return {"quiet": loop.summary("quiet"), "attacked": loop.summary("attacked"), "lost": loop.lost}


def _stats(endpoint: str) -> dict:
    with Client(endpoint, timeout_ms=5000) as c:
        return json.loads(c.stats().model_dump_json())


# -- scenarios -------------------------------------------------------------------------------------

def hol(svc: ServiceProc, info, args) -> dict:
    rng = np.random.default_rng(0)
    big = wire.pack_request(MsgType.DECODE, 0, 0, rng.poisson(2.0, (1024, info["n_channels"])).astype(np.float32))
    one = wire.pack_request(MsgType.DECODE, 99, 0, np.ones(info["n_channels"], np.float32))
    runs = []
    for _ in range(args.runs):
        bulk, closed = _dealer(svc.endpoint), _dealer(svc.endpoint)
        closed.send(wire.pack_request(MsgType.PING, 0, 0))  # connected before the burst
        closed.recv()
        poller = zmq.Poller()
        poller.register(bulk, zmq.POLLIN)
        poller.register(closed, zmq.POLLIN)
        for _ in range(31):
            bulk.send(big)
        time.sleep(0.001)
        t_send = time.perf_counter_ns()
        closed.send(one)
        order, t_one, statuses = [], None, []
        while len(order) < 32:
            ready = dict(poller.poll(30_000))
            if not ready:
                break
            for sock, tag in ((closed, "one"), (bulk, "bulk")):
                if sock in ready:
                    head, _ = wire.parse_reply(sock.recv())
                    order.append(tag)
                    statuses.append(int(head.status))
                    if tag == "one":
                        t_one = time.perf_counter_ns()
        runs.append({"place": order.index("one") + 1 if "one" in order else None, "replies": len(order),
                     "rtt_ms": (t_one - t_send) / 1e6 if t_one else None,
                     "all_done_ms": (time.perf_counter_ns() - t_send) / 1e6, "errors": sum(x != 0 for x in statuses)})
        bulk.close()
        closed.close()
        time.sleep(0.5)
    return {"runs": runs, "places": [r["place"] for r in runs]}


class Load:
    """A load generator in a process of its own (niced, as another machine would not share the
    server's cores; and no GIL shared with the closed loop), switched on and off by signals."""

    def __init__(self, kind: str, endpoint: str, info: dict):
        self.p = subprocess.Popen(["nice", "-n", "10", sys.executable, __file__, "--_load", kind, "--_endpoint",
                                   endpoint, "--_info", json.dumps(info)], stdout=subprocess.PIPE, text=True,
                                  cwd=ROOT)
        assert self.p.stdout.readline().startswith("ready")

    def on(self) -> None:
        os.kill(self.p.pid, signal.SIGUSR1)

    def off(self) -> None:
        os.kill(self.p.pid, signal.SIGUSR2)

    def stop(self) -> dict:
        self.p.send_signal(signal.SIGTERM)
        out = self.p.stdout.read()
        self.p.wait(10)
        return json.loads(out.strip().splitlines()[-1]) if out.strip() else {}


def _run_load(kind: str, endpoint: str, info: dict) -> None:
    state = {"on": False, "quit": False}
    signal.signal(signal.SIGUSR1, lambda *_: state.update(on=True))
    signal.signal(signal.SIGUSR2, lambda *_: state.update(on=False))
    signal.signal(signal.SIGTERM, lambda *_: state.update(quit=True))
    counts = {"sent": 0, "answered": 0, "errors": 0}
    socks = [_dealer(endpoint) for _ in range(2 if kind == "flood" else 1)]
    if kind == "bulk":
        frame = wire.pack_request(MsgType.DECODE, 0, 0, np.random.default_rng(1).poisson(
            2.0, (info["max_bins"], info["n_channels"])).astype(np.float32))
    print("ready", flush=True)
    inflight = 0
    while not state["quit"]:
        if kind == "bulk":  # two max-size DECODEs in flight
            while state["on"] and inflight < 2:
                socks[0].send(frame)
                counts["sent"] += 1
                inflight += 1
            if inflight and socks[0].poll(10):
                head, _ = wire.parse_reply(socks[0].recv())
                counts["answered"] += 1
                counts["errors"] += head.status != 0
                inflight -= 1
            elif not inflight:
                time.sleep(0.01)
        elif not state["on"]:
            time.sleep(0.01)
        else:  # STATS as fast as it goes: one socket waits up to 10 ms for each reply, one sends bursts of 100
            socks[0].send(wire.pack_request(MsgType.STATS, 0, 0))
            counts["sent"] += 1
            if counts["sent"] % 10 == 0:
                for i in range(100):
                    try:
                        socks[1].send(wire.pack_request(MsgType.STATS, i, 0), zmq.NOBLOCK)
                        counts["sent"] += 1
                    except zmq.Again:
                        break
            for s, wait in ((socks[0], 10), (socks[1], 0)):
                while s.poll(wait):
                    head, _ = wire.parse_reply(s.recv())
                    counts["answered"] += 1
                    counts["errors"] += head.status != 0
                    if s is socks[0]:
                        break
    for s in socks:
        s.close()
    print(json.dumps(counts), flush=True)


def _with_load(svc: ServiceProc, info, args, kind: str) -> dict:
    load = Load(kind, svc.endpoint, info)
    loop = ClosedLoop(svc.endpoint, info["n_channels"])
    loop.start()
    time.sleep(1.0)
    try:
        res = _phases(loop, load.on, load.off, args.phase_seconds, args.rounds)
    finally:
        loop.stop_at = time.perf_counter()
        loop.join(5)
        res_load = load.stop()
    res["load"] = res_load
    q, a = res["quiet"]["rtt_us"], res["attacked"]["rtt_us"]
    res["p99_ratio"] = a["p99"] / q["p99"] if q and a else None
    return res


def bulk_load(svc: ServiceProc, info, args) -> dict:
    res = _with_load(svc, info, args, "bulk")
    res["bulk"] = _stats(svc.endpoint).get("bulk")
    return res


def stats_flood(svc: ServiceProc, info, args) -> dict:
    return _with_load(svc, info, args, "flood")


def _memory_attack(svc: ServiceProc, info, frames: list) -> dict:
    idle = svc.memory()["VmRSS"]
    sampler = RssSampler(svc, 0.005)
    sampler.start()
    loop = ClosedLoop(svc.endpoint, info["n_channels"], rate=200.0)  # another client, meanwhile
    loop.phase = "during"
    loop.start()
    time.sleep(0.5)
    s = _dealer(svc.endpoint, SNDHWM=0)
    t0 = time.monotonic()
    s.send_multipart(frames, copy=False)
    answered = s.poll(60_000)
    took = time.monotonic() - t0
    reply = wire.parse_reply(s.recv_multipart()[-1])[0] if answered else None
    time.sleep(1.0)
    after_1s = svc.memory()["VmRSS"]
    time.sleep(4.0)
    after_5s = svc.memory()["VmRSS"]
    loop.stop_at = time.perf_counter()
    loop.join(5)
    sampler.done.set()
    sampler.join(2)
    s.close()
    return {"idle_mb": idle, "peak_mb": max(sampler.peak, svc.memory()["VmHWM"]), "after_1s_mb": after_1s,
            "after_5s_mb": after_5s, "answered_s": took if answered else None,
            "reply": None if reply is None else {"status": reply.status, "msg_type": reply.msg_type},
            "other_client": loop.summary("during"), "other_client_lost": loop.lost}


def multipart(svc, info, args) -> dict:
    return _memory_attack(svc, info, [bytes(1_000_000)] * 1000)


def envelope(svc, info, args) -> dict:
    good = wire.pack_request(MsgType.DECODE, 1, 0, np.ones(info["n_channels"], np.float32))
    return _memory_attack(svc, info, [bytes(1_000_000)] * 999 + [b"", good])


def slow_reader(svc, info, args) -> dict:
    idle = svc.memory()["VmRSS"]
    sampler = RssSampler(svc)
    sampler.start()
    big = wire.pack_request(MsgType.DECODE, 0, 0, np.ones((info["max_bins"], info["n_channels"]), np.float64))
    s = _dealer(svc.endpoint, RCVHWM=1, SNDTIMEO=100)
    sent, t_end = 0, time.monotonic() + 10
    while time.monotonic() < t_end:
        try:
            s.send(big)
            sent += 1
        except zmq.Again:
            time.sleep(0.01)
    held = svc.memory()["VmRSS"]
    st = _stats(svc.endpoint)
    s.close()
    time.sleep(2.0)
    sampler.done.set()
    sampler.join(2)
    return {"sent": sent, "idle_mb": idle, "peak_mb": sampler.peak, "while_connected_mb": held,
            "after_close_mb": svc.memory()["VmRSS"], "dropped": st["dropped"], "errors": st["errors"]}


def slow_subscriber(svc, info, args) -> dict:
    ctx = zmq.Context.instance()
    idle = svc.memory()["VmRSS"]
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 1)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(svc.endpoints["pub"])
    rig = svc.rig
    sampler = RssSampler(svc)
    sampler.start()
    big = wire.pack_request(MsgType.DECODE, 0, 0, np.ones((64, info["n_channels"]), np.float32))
    t_end, seq = time.monotonic() + 10, 0
    while time.monotonic() < t_end:
        seq += 1
        wire_frame = bytearray(big)
        wire_frame[8:16] = seq.to_bytes(8, "little")
        rig.send(bytes(wire_frame))
        time.sleep(0.001)
    time.sleep(1.0)
    st = _stats(svc.endpoint)
    sampler.done.set()
    sampler.join(2)
    sub.close()
    return {"published": seq, "idle_mb": idle, "peak_mb": sampler.peak, "final_mb": svc.memory()["VmRSS"],
            "dropped": st["dropped"], "streamed": st["streamed"], "subscribers": st["subscribers"]}


def idle_conns(svc, info, args) -> dict:
    host, port = svc.endpoint.rsplit("//", 1)[1].rsplit(":", 1)
    conns = []
    for _ in range(300):
        try:
            conns.append(socket.create_connection((host, int(port)), timeout=2))
        except OSError:
            break
    time.sleep(0.2)
    t0 = time.monotonic()
    waited, ok = None, False
    with Client(svc.endpoint, timeout_ms=60_000) as c:
        try:
            c.ping()
            ok = True
        except Exception:  # noqa: BLE001
            pass
        waited = time.monotonic() - t0
    for s in conns:
        s.close()
    return {"idle_connections": len(conns), "first_reply_s": waited, "answered": ok}


# -- running them ------------------------------------------------------------------------------------

def run_scenario(name: str, bundle: Path, tree: Path, args) -> dict:
    extra, rig = [], None
    if name == "slow_subscriber":
        rig = zmq.Context.instance().socket(zmq.PUB)
        rig.setsockopt(zmq.LINGER, 0)
        port = rig.bind_to_random_port("tcp://127.0.0.1")
        extra = ["--sub", f"tcp://127.0.0.1:{port}", "--pub", "tcp://127.0.0.1:*"]
    extra += args.serve_args.split() if args.serve_args else []
    prefix = ["chrt", "-f", "20"] if args.rt else []
    if name == "idle_conns" and shutil.which("prlimit"):
        prefix += ["prlimit", "--nofile=256:256"]
    svc = ServiceProc(bundle, *extra, tree=tree, prefix=prefix)
    svc.rig = rig
    try:
        with Client(svc.endpoint, timeout_ms=10_000) as c:
            raw = c._control(2)[1]  # INFO without validating: an older server's reply lacks new keys
            info = json.loads(bytes(raw))
            info.setdefault("max_bins", 4096)
            x = np.ones(info["n_channels"], np.float32)
            for i in range(200):
                c.decode(x, reset=i == 0)
        time.sleep(0.5)
        res = globals()[name](svc, info, args)
        res["server_alive"] = svc.p.poll() is None
    finally:
        svc.stop()
        if rig is not None:
            rig.close(linger=0)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenarios", nargs="*", choices=[[], *SCENARIOS], help="default: all")
    p.add_argument("--bundle")
    p.add_argument("--channels", type=int, default=174)
    p.add_argument("--workdir")
    p.add_argument("--tree", help="run another checkout's server (e.g. the base of a change)")
    p.add_argument("--runs", type=int, default=5, help="hol: repetitions")
    p.add_argument("--phase-seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--serve-args", help="more options for swapvae serve, e.g. '--slice-us 250'")
    p.add_argument("--rt", action="store_true",
                   help="the server (chrt -f 20) and the closed loop (SCHED_FIFO 10) real-time, as on a rig; the "
                        "load generators stay niced normal processes")
    p.add_argument("--out", default=str(ROOT / "results/attacks.json"))
    for hidden in ("--_load", "--_endpoint", "--_info"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    ClosedLoop.rt = args.rt
    if args._load:
        _run_load(args._load, args._endpoint, json.loads(args._info))
        return 0
    tree = Path(args.tree).resolve() if args.tree else ROOT
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle) if args.bundle else build_bundle(Path(args.workdir or tmp), args.channels)[1]
        for name in args.scenarios or SCENARIOS:
            results[name] = run_scenario(name, bundle, tree, args)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    write_result(args.out, {"tree": str(tree), "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                                                           "load_avg": os.getloadavg()}, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
