"""Round-trip latency and throughput of the decoding service over loopback TCP, batch 1.

    python benchmarks/latency.py                     # d = 174 (Chewie-1) and d = 1024
    python benchmarks/latency.py --quick             # fewer samples, for a smoke run
    python benchmarks/latency.py --pin               # server on CPU 1, client on CPU 0

For each channel count d it builds a default-size model (two training epochs: latency does
not depend on how well it is trained), exports it, and measures, from one Python client
with the same request loop for every server:

    echo         the floor: a bare ROUTER that answers each request with a preallocated
                 frame of the service's reply size (same bytes both ways, no work)
    torch eager  the same service (runtime.server.Server) calling the torch model eager
                 (one intra-op thread, BatchNorm unfolded) and the numpy readout
    ours         ``swapvae serve`` (ONNX Runtime engine), default: blocks while idle, and
                 pre-warms the engine shortly before the next bin of a periodic stream
    ours no-prewarm  (``--no-prewarm``, diagnostic) the same without pre-warming
    ours busy    ``swapvae serve --busy-poll``: spins on the socket (dedicated core)
    ours fp32    where ``ours`` serves an int8 bundle (d >= --int8-from): the same model
                 exported with fp32 weights, back to back

each back to back, and paced at 100 Hz and 1 kHz (a pause before each request: the server
goes idle, as in a closed loop; paced requests expose wake-up latency). Each reply carries
the server's own processing time (``server_ns``): its median is reported beside the round
trip, so a gap to the echo floor splits into work in the server and transport/wake-ups. The
probe is one client socket, so one stream to the server (never reset: its windows are its own
preceding bins, as for any client).
Sustained throughput is measured with a window of requests in flight (the server's
capacity, one core). Each server's CPU use (user + system time of all its threads, from /proc)
is reported while each mode ran and while idle (``--idle-seconds`` with nothing sent). Where a
C compiler and libzmq's headers are found, the C client (runtime/clients/c/svae_bench.c) runs
the same modes against ``ours`` and ``ours busy``: the round trip a C/C++ rig sees.

Polite servers run side by side and are measured in interleaved rounds, so drift on a shared
machine hits them alike; the busy-poll server runs alone (it occupies a core). Prints a table
and the targets (as ratios to the echo floor of the same run) and writes JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import (  # benchmarks/ is on sys.path when run as a script
    ROOT,
    TorchEngine,
    build_bundle,
    cpu_name,
    write_result,
)

from swapvae.runtime.wire import SERVER_NS_OFFSET  # noqa: E402

_SERVER_NS = struct.Struct("<I")
MODES = ("b2b", "100Hz", "1kHz")
RATES = {"b2b": 0.0, "100Hz": 100.0, "1kHz": 1000.0}


def serve_echo(bind: str, reply_bytes: int) -> None:
    """The floor: receive, answer with a preallocated frame of the service's reply size."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(bind)
    reply = bytearray(reply_bytes)
    print(f"ready router={sock.getsockopt_string(zmq.LAST_ENDPOINT)} pid={os.getpid()}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Sent as the service sends (plain sends, int flags, no send_multipart): the lowest floor
    recv, send, more = sock.recv_multipart, sock.send, int(zmq.SNDMORE)
    while True:
        frames = recv()
        for f in frames[:-1]:
            send(f, more)
        send(reply)


def serve_engine(bind: str, engine, prewarm: bool = True) -> None:
    from swapvae.runtime.serve.server import Server

    server = Server(engine, bind=bind, prewarm=prewarm)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    print(f"ready router={server.endpoints['router']} pid={os.getpid()}", flush=True)
    server.run()
    server.close()


# -- servers as subprocesses -----------------------------------------------------------------------

class Proc:
    def __init__(self, name: str, cmd: list[str], cpu: int | None):
        if cpu is not None:
            cmd = ["taskset", "-c", str(cpu), *cmd]
        self.name = name
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.endpoint = self._wait_ready(120.0)

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.p.stdout], [], [], 0.5)
            if r:
                line = self.p.stdout.readline()
                if line.startswith("ready "):
                    return dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)["router"]
            if self.p.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"{self.name} server did not start: {self.p.stderr.read()[-2000:]}")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) process ``pid`` has used, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name: state is field 3
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


def cpu_share(procs: dict, seconds: float) -> dict[str, float]:
    """Each server's CPU use while none is sent anything, in % of one core."""
    before = {k: cpu_seconds(p.p.pid) for k, p in procs.items()}
    time.sleep(seconds)
    return {k: round(100 * (cpu_seconds(p.p.pid) - before[k]) / seconds, 2) for k, p in procs.items()}


# -- the client --------------------------------------------------------------------------------------

class Probe:
    """One DEALER and one preallocated request; the same loop for every server."""

    def __init__(self, endpoint: str, x: np.ndarray):
        import zmq

        from swapvae.runtime.wire import RequestBuffer

        self.zmq = zmq
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 5000)
        self.sock.connect(endpoint)
        self.buf = RequestBuffer(len(x))
        self.buf.counts[:] = x
        self.seq = 0
        self.reply_bytes = len(self.roundtrip_frame())

    def roundtrip_frame(self) -> bytes:
        self.seq += 1
        self.sock.send(self.buf.stamp(self.seq, 0), copy=True)
        return self.sock.recv()

    def run(self, n: int, rate: float) -> tuple[np.ndarray, float, np.ndarray]:
        """n round trips (ns), back to back or with a pause before each; the elapsed seconds; and
        the server's own processing time of each (ns, from the reply; 0 from the echo)."""
        pc, sleep, send, recv = time.perf_counter_ns, time.sleep, self.sock.send, self.sock.recv
        stamp, server_ns = self.buf.stamp, _SERVER_NS.unpack_from
        out = np.empty(n, np.int64)
        srv = np.empty(n, np.int64)
        period = 1.0 / rate if rate else 0.0
        start = time.perf_counter()
        for i in range(n):
            if period:
                # Pace on a fixed schedule; a late reply shortens the next pause, never drifts.
                wait = start + (i + 1) * period - time.perf_counter()
                if wait > 0:
                    sleep(wait)
            self.seq += 1
            t0 = pc()
            send(stamp(self.seq, 0), copy=True)
            reply = recv()
            out[i] = pc() - t0
            srv[i] = server_ns(reply, SERVER_NS_OFFSET)[0]
        return out, time.perf_counter() - start, srv

    def throughput(self, n: int, seconds: float, window: int = 32) -> float:
        """Requests per second with ``window`` in flight (the server's capacity), over ``n``
        requests or about ``seconds``, whichever ends first."""
        send, recv, stamp, pc = self.sock.send, self.sock.recv, self.buf.stamp, time.perf_counter
        for i in range(window):
            send(stamp(i, 0), copy=True)
        t = pc()
        stop_at = t + seconds
        done = 0
        for i in range(window, n + window):
            recv()
            done += 1
            if i >= n or (not i & 63 and pc() >= stop_at):
                break
            send(stamp(i, 0), copy=True)
        rate = done / (pc() - t)
        for _ in range(window - 1):  # drain what is still in flight
            recv()
        return rate

    def close(self) -> None:
        self.sock.close(linger=0)


# -- the measurement ---------------------------------------------------------------------------------

def summarize(runs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Round-trip percentiles (us) of ``(round trips, server times)`` runs (ns), and the median
    of the server's own share of them."""
    us = np.concatenate([ns for ns, _ in runs]) / 1e3
    p50, p99, p999 = np.percentile(us, [50, 99, 99.9])
    return {"p50": round(float(p50), 1), "p99": round(float(p99), 1), "p999": round(float(p999), 1),
            "n": int(us.size), "server_p50": round(float(np.median(np.concatenate([srv for _, srv in runs]))) / 1e3, 1)}


def build_c_client(workdir: Path) -> tuple[Path | None, str]:
    """runtime/clients/c/svae_bench built with the C compiler and libzmq here, or None and why not."""
    import shutil

    cc = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    if cc is None:
        return None, "no C compiler"
    src = ROOT / "runtime" / "clients" / "c"
    exe = workdir / "svae_bench"
    done = subprocess.run([cc, "-O2", "-std=c99", "-D_POSIX_C_SOURCE=200809L", "-o", str(exe),
                           str(src / "svae_bench.c"), "-lzmq"], capture_output=True, text=True)
    if done.returncode:
        return None, f"cannot build svae_bench (libzmq's headers? apt-get install libzmq3-dev): {done.stderr[-200:]}"
    return exe, ""


def requests_in(mode: str, args) -> int:
    """How many round trips one run of ``mode`` makes: --n back to back, --paced-seconds' worth paced."""
    return args.n if mode == "b2b" else max(1, int(args.paced_seconds * RATES[mode]))


def c_client_modes(exe: Path, endpoint: str, d: int, args) -> dict:
    """The C client's percentiles in every mode against one server (client on CPU 0 with --pin)."""
    return {m: c_round_trips(exe, endpoint, d, requests_in(m, args), RATES[m], 0 if args.pin else None)
            for m in MODES}


def c_round_trips(exe: Path, endpoint: str, d: int, n: int, rate: float, cpu: int | None) -> dict:
    """svae_bench's percentiles (us): the C client, one stream, back to back or paced."""
    cmd = [str(exe), endpoint, str(d), str(n), str(rate)]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120 + 2 * n / max(rate, 1000))
    if done.returncode:
        raise RuntimeError(f"svae_bench failed: {done.stderr.strip()[-300:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    return {"p50": r["p50_us"], "p99": r["p99_us"], "p999": r["p999_us"], "n": r["n"], "server_p50": r["server_p50_us"]}


def busy_share(runs: list[tuple[float, float]]) -> float:
    """CPU seconds over wall seconds of ``(cpu, wall)`` runs, in % of one core."""
    return round(100 * sum(c for c, _ in runs) / max(1e-9, sum(w for _, w in runs)), 1)


def measure_channels(d: int, workdir: Path, args) -> dict:
    weights = "int8" if d >= args.int8_from else "fp32"
    run, bundle = build_bundle(workdir, d, weights)
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, d).astype(np.float32)
    server_cpu = 1 if args.pin else None
    py = sys.executable
    me = str(Path(__file__).resolve())
    ours_cmd = [py, "-m", "swapvae", "serve", str(bundle), "--bind", "tcp://127.0.0.1:*"]

    # The echo floor must answer with exactly the service's reply size: ask the service.
    procs: dict[str, Proc] = {}
    results: dict[str, dict] = {}
    c_exe, c_why = build_c_client(workdir)
    c_results: dict[str, dict] = {}
    try:
        procs["ours"] = Proc("ours", ours_cmd, server_cpu)
        probe = Probe(procs["ours"].endpoint, x)
        reply_bytes = probe.reply_bytes
        probe.close()
        procs["echo"] = Proc("echo", [py, me, "--_serve", "echo", "--_reply-bytes", str(reply_bytes)], server_cpu)
        procs["torch eager"] = Proc("torch eager", [py, me, "--_serve", "torch", "--_run", str(run)], server_cpu)
        if weights != "fp32":  # the same model with fp32 weights: what the int8 bundle gains
            _, fp32_bundle = build_bundle(workdir, d, "fp32")
            procs["ours fp32"] = Proc("ours fp32", [*ours_cmd[:4], str(fp32_bundle), *ours_cmd[5:]], server_cpu)
        if args.no_prewarm:
            procs["ours no-prewarm"] = Proc("ours no-prewarm", [py, me, "--_serve", "no-prewarm", "--_bundle",
                                                                str(bundle)],
                                            server_cpu)
        probes = {k: Probe(p.endpoint, x) for k, p in procs.items()}
        samples: dict[str, dict[str, list]] = {k: {m: [] for m in MODES} for k in probes}  # (ns, server ns)
        elapsed: dict[str, float] = {k: 0.0 for k in probes}
        cpu: dict[str, dict[str, list]] = {k: {m: [] for m in MODES} for k in probes}  # (cpu s, wall s)
        for r in range(args.rounds):
            for name, probe in probes.items():
                for mode in MODES:
                    if name in ("torch eager", "ours fp32") and mode != "b2b" and not args.torch_paced:
                        continue
                    probe.run(args.warmup, 0)  # re-warm after the other servers ran
                    c0 = cpu_seconds(procs[name].p.pid)
                    ns, el, srv = probe.run(requests_in(mode, args), RATES[mode])
                    cpu[name][mode].append((cpu_seconds(procs[name].p.pid) - c0, el))
                    samples[name][mode].append((ns, srv))
                    if mode == "b2b":
                        elapsed[name] += el
            print(f"  d={d} round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        idle = cpu_share(procs, args.idle_seconds)
        if c_exe is not None:  # the C client against the default server, after the Python rounds
            c_results["ours"] = c_client_modes(c_exe, procs["ours"].endpoint, d, args)
        for name, probe in probes.items():
            results[name] = {m: {**summarize(v), "cpu_pct": busy_share(cpu[name][m])}
                             for m, v in samples[name].items() if v}
            results[name]["idle_cpu_pct"] = idle[name]
            results[name]["sequential_per_s"] = round(sum(len(ns) for ns, _ in samples[name]["b2b"]) / elapsed[name])
            results[name]["throughput_per_s"] = round(probe.throughput(args.throughput_n, args.throughput_seconds))
            probe.close()
    finally:
        for p in procs.values():
            p.stop()

    # Busy-poll occupies a core: measure it alone, after the others are gone.
    busy = Proc("ours busy", [*ours_cmd, "--busy-poll"], server_cpu)
    try:
        probe = Probe(busy.endpoint, x)
        s = {m: [] for m in MODES}
        c = {m: [] for m in MODES}
        el_total = 0.0
        for _ in range(args.rounds):
            for mode in MODES:
                probe.run(args.warmup, 0)
                c0 = cpu_seconds(busy.p.pid)
                ns, el, srv = probe.run(requests_in(mode, args), RATES[mode])
                c[mode].append((cpu_seconds(busy.p.pid) - c0, el))
                s[mode].append((ns, srv))
                if mode == "b2b":
                    el_total += el
        results["ours busy"] = {m: {**summarize(v), "cpu_pct": busy_share(c[m])} for m, v in s.items()}
        results["ours busy"]["idle_cpu_pct"] = cpu_share({"ours busy": busy}, args.idle_seconds)["ours busy"]
        if c_exe is not None:
            c_results["ours busy"] = c_client_modes(c_exe, busy.endpoint, d, args)
        results["ours busy"]["sequential_per_s"] = round(sum(len(ns) for ns, _ in s["b2b"]) / el_total)
        results["ours busy"]["throughput_per_s"] = round(probe.throughput(args.throughput_n, args.throughput_seconds))
        probe.close()
    finally:
        busy.stop()
    return {"d": d, "weights": weights, "reply_bytes": reply_bytes, "request_bytes": 32 + 4 * d, "bundle": str(bundle),
            "servers": results, "targets": targets(results, d), "c_client": c_results or {"skipped": c_why}}


def targets(r: dict, d: int) -> dict:
    echo, ours, busy, torch = r["echo"], r["ours"], r["ours busy"], r["torch eager"]
    t = {  # issue 22's goals: the default server against busy-polling, the echo floor and itself
        "100Hz p50 <= 1.15x busy-poll's": [ours["100Hz"]["p50"], 1.15 * busy["100Hz"]["p50"]],
        "1kHz p50 <= 1.15x busy-poll's": [ours["1kHz"]["p50"], 1.15 * busy["1kHz"]["p50"]],
        "in-server p50 100Hz <= 1.3x b2b's": [ours["100Hz"]["server_p50"], 1.3 * ours["b2b"]["server_p50"]],
        "in-server p50 1kHz <= 1.3x b2b's": [ours["1kHz"]["server_p50"], 1.3 * ours["b2b"]["server_p50"]],
        "idle CPU < 5% of a core": [ours["idle_cpu_pct"], 5.0],
        "b2b p50 <= 1.3x echo's": [ours["b2b"]["p50"], 1.3 * echo["b2b"]["p50"]],
        "b2b p99 <= 2x echo p99": [ours["b2b"]["p99"], 2 * echo["b2b"]["p99"]],
        "1kHz p99.9 <= 1 ms": [ours["1kHz"]["p999"], 1000.0],
        "p50 x4 below torch eager": [ours["b2b"]["p50"], torch["b2b"]["p50"] / 4],
        "throughput >= 25000 bins/s": [-ours["throughput_per_s"], -25000],
    }
    if d >= 1024:
        t["p99 < 1 ms"] = [ours["b2b"]["p99"], 1000.0]
    return {k: {"value": abs(v), "limit": abs(lim), "ok": bool(v <= lim)} for k, (v, lim) in t.items()}


def print_table(res: dict) -> None:
    print(f"\nd = {res['d']} channels, ours with {res['weights']} weights (request {res['request_bytes']} B, "
          f"reply {res['reply_bytes']} B), round trip in us, loopback tcp, batch 1")
    head = f"{'server':<15} " + " ".join(f"{m + ' ' + q:>11}" for m in MODES for q in ("p50", "p99", "p99.9"))
    print(head + f" {'seq/s':>7} {'thru/s':>7}")
    for name, r in res["servers"].items():
        cells = []
        for m in MODES:
            for q in ("p50", "p99", "p999"):
                cells.append(f"{r[m][q]:11.1f}" if m in r else f"{'-':>11}")
        print(f"{name:<15} " + " ".join(cells) + f" {r['sequential_per_s']:7d} {r['throughput_per_s']:7d}")
    print("in-server time, p50 us (the reply's server_ns: request read off the socket -> reply ready; the rest is "
          "transport, wake-ups and time queued in libzmq):")
    for name, r in res["servers"].items():
        if name != "echo":
            print(f"  {name:<15} " + "  ".join(f"{m} {r[m]['server_p50']:.1f}" for m in MODES if m in r))
    print("CPU use, % of one core (the server process, all threads: idle, and while each mode ran):")
    for name, r in res["servers"].items():
        print(f"  {name:<15} idle {r['idle_cpu_pct']:5.1f}  " + "  ".join(f"{m} {r[m]['cpu_pct']:5.1f}"
                                                                        for m in MODES if m in r))
    c = res["c_client"]
    if "skipped" in c:
        print(f"C client: skipped ({c['skipped']})")
    else:
        print("C client (runtime/clients/c/svae_bench.c), round trip p50 / p99 / p99.9 us "
              "(the Python client's p50 beside):")
        for name, r in c.items():
            print(f"  {name:<15} " + "  ".join(f"{m} {r[m]['p50']:.1f} / {r[m]['p99']:.1f} / {r[m]['p999']:.1f} "
                                               f"(py {res['servers'][name][m]['p50']:.1f})" for m in MODES))
    for k, v in res["targets"].items():
        print(f"  [{'ok' if v['ok'] else 'MISS'}] {k}: {v['value']:.1f} vs {v['limit']:.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, nargs="+", default=[174, 1024])
    p.add_argument("--n", type=int, default=3000, help="back-to-back round trips per server per round")
    p.add_argument("--paced-seconds", type=float, default=3.0, help="seconds per paced run per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--throughput-n", type=int, default=20000)
    p.add_argument("--throughput-seconds", type=float, default=3.0)
    p.add_argument("--torch-paced", action="store_true", help="also pace the torch and fp32 servers (slower run)")
    p.add_argument("--int8-from", type=int, default=512,
                   help="serve int8 bundles (swapvae export --weights int8) from this many channels up; "
                        "'ours fp32' is then measured beside them")
    p.add_argument("--no-prewarm", action="store_true", help="also measure ours without pre-warming (diagnostic)")
    p.add_argument("--idle-seconds", type=float, default=3.0, help="how long each server's idle CPU use is measured")
    p.add_argument("--pin", action="store_true", help="server on CPU 1, client on CPU 0")
    p.add_argument("--quick", action="store_true", help="a smoke run: few samples")
    p.add_argument("--workdir", help="keep (and reuse) the trained bundles here")
    p.add_argument("--out", default=str(ROOT / "results/latency.json"))
    p.add_argument("--_serve", choices=["echo", "torch", "no-prewarm"], help=argparse.SUPPRESS)
    p.add_argument("--_bundle", help=argparse.SUPPRESS)
    p.add_argument("--_reply-bytes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_run", help=argparse.SUPPRESS)
    p.add_argument("--_bind", default="tcp://127.0.0.1:*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._serve == "echo":
        serve_echo(args._bind, args._reply_bytes)
        return 0
    if args._serve == "torch":
        serve_engine(args._bind, TorchEngine(args._run))
        return 0
    if args._serve == "no-prewarm":
        from swapvae.runtime.engine import BundleDecoder

        serve_engine(args._bind, BundleDecoder(args._bundle), prewarm=False)
        return 0
    if args.quick:
        args.n, args.paced_seconds, args.rounds, args.warmup, args.throughput_n = 500, 0.5, 1, 50, 3000
    if args.pin:
        os.sched_setaffinity(0, {0})

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        runs = [measure_channels(d, workdir, args) for d in args.channels]
    for res in runs:
        print_table(res)
    import onnxruntime
    import zmq

    result = {
        "what": "round trip (us) of one bin over loopback tcp from one Python DEALER client; "
                "throughput with 32 requests in flight",
        "settings": {k: getattr(args, k) for k in ("n", "paced_seconds", "rounds", "warmup", "throughput_n",
                                                   "throughput_seconds", "pin")},
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_avg_before": load_before,
                    "load_avg_after": os.getloadavg(), "python": platform.python_version(),
                    "onnxruntime": onnxruntime.__version__, "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()},
        "results": runs,
    }
    print(f"\nload average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
