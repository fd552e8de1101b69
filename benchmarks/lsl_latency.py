"""LSL in -> decode -> LSL out, from the input sample's push to the decode's arrival in an inlet.

    python benchmarks/lsl_latency.py [--bundle B] [--channels 174] [--n 1000] [--rates 100 1000]
                                     [--rounds 2] [--out results/lsl_latency.json]

Two processes in the middle, each a separate process as on a rig, taking the same inlet
(``runtime.lsl.open_inlet``) from an outlet of this process:

    echo    a bare LSL echo: pull (the bridge's own pull) -> push the sample back, no decode: the floor
    decode  ``swapvae serve BUNDLE --lsl-in IN --lsl-out OUT`` (its ZeroMQ socket bound too)

This process pushes one bin of counts at a time, paced at each rate, stamped with
``local_clock()``, and waits for the answer carrying that timestamp in an inlet on the
middle's outlet; the latency is ``local_clock()`` at its arrival minus the stamp. Rounds
interleave the two middles. The engine's own decode (``BundleDecoder.decode``, one bin, back
to back, in this process) is timed in the same run: the target is decode p50 <= echo p50 +
engine p50 + 50 us at each rate.

liblsl discovers streams by multicast and broadcast, so the whole benchmark runs in a network
namespace of its own that holds only loopback (it re-executes itself under ``unshare -n``; root
needed, as in CI), with an LSL configuration that keeps discovery on this machine; without one
it says so and measures nothing.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import build_bundle, cpu_name, write_result  # benchmarks/ is on sys.path when run as a script

LSL_CONFIG = ("[ports]\nIPv6 = disable\n[multicast]\nResolveScope = machine\nKnownPeers = {127.0.0.1}\n"
              "[log]\nlevel = -3\n")
IN_NS = "SWAPVAE_LOOPBACK_NS"


def echo(inp: str, out: str) -> int:
    """The floor: the bridge's pull, and each sample pushed straight back."""
    import pylsl

    from swapvae.runtime.lsl import CHUNK, open_inlet, resolve

    info = resolve(inp, 30)
    outlet = pylsl.StreamOutlet(pylsl.StreamInfo(out, "Echo", info.channel_count(), 0, pylsl.cf_float32, out))
    inlet = open_inlet(info, 30)
    buf = np.zeros((CHUNK, info.channel_count()), np.float32)
    print("ready", flush=True)
    while True:
        _, ts = inlet.pull_chunk(timeout=0.1, max_samples=CHUNK, dest_obj=buf, min_samples=1)
        for i, t in enumerate(ts):
            outlet.push_chunk(buf[i], t)  # as the bridge pushes


def start_middle(kind: str, bundle: Path, inp: str, out: str) -> subprocess.Popen:
    if kind == "echo":
        argv = [sys.executable, os.path.abspath(__file__), "--echo", inp, out]
    else:
        argv = [str(Path(sys.executable).parent / "swapvae"), "serve", str(bundle), "--bind", "tcp://127.0.0.1:5621",
                "--lsl-in", inp, "--lsl-out", out]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def measure(outlet, inlet, x: np.ndarray, rate: float, n: int, warm: int = 50) -> np.ndarray:
    """Push ``n`` bins paced at ``rate`` (after ``warm`` unrecorded ones); each one's latency, us."""
    import pylsl

    period, lat = 1.0 / rate, np.empty(n)
    start = time.perf_counter()
    for i in range(-warm, n):
        wait = start + (i + warm) * period - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        t = pylsl.local_clock()
        outlet.push_chunk(x, t)
        while True:
            _, ts = inlet.pull_sample(timeout=2.0)
            if ts is None:
                raise RuntimeError(f"no answer within 2 s at {rate:g} Hz, bin {i}")
            if abs(ts - t) < 1e-3:  # this bin's (the inlet's clock correction: microseconds here)
                break
        if i >= 0:
            lat[i] = (pylsl.local_clock() - t) * 1e6
    return lat


def engine_p50(bundle: Path, x: np.ndarray, n: int = 3000) -> float:
    from swapvae.runtime.engine import BundleDecoder

    dec = BundleDecoder(bundle)
    ns = np.empty(n, np.int64)
    for i in range(n):
        t = time.perf_counter_ns()
        dec.decode(x)
        ns[i] = time.perf_counter_ns() - t
    return float(np.median(ns) / 1e3)


def run(args) -> int:
    import pylsl

    from swapvae.runtime.bundle import read_manifest
    from swapvae.runtime.client import Client
    from swapvae.runtime.replay import percentiles_us

    bundle = Path(args.bundle) if args.bundle else build_bundle(Path(tempfile.gettempdir()) / "swapvae-bench",
                                                              args.channels)[1]
    n_ch = read_manifest(bundle).n_channels
    x = np.random.default_rng(0).poisson(1.0, n_ch).astype(np.float32)
    eng = engine_p50(bundle, x)
    lat: dict[str, dict[float, list]] = {"echo": {r: [] for r in args.rates}, "decode": {r: [] for r in args.rates}}
    lsl_stats = None
    for rnd in range(args.rounds):
        for kind in ("echo", "decode"):
            inp, out = f"bench-in-{kind}-{rnd}", f"bench-out-{kind}-{rnd}"
            outlet = pylsl.StreamOutlet(pylsl.StreamInfo(inp, "SpikeCounts", n_ch, 0, pylsl.cf_float32, inp),
                                        chunk_size=1)
            mid = start_middle(kind, bundle, inp, out)
            try:
                info = pylsl.resolve_byprop("name", out, 1, 60)
                if not info:
                    raise RuntimeError(f"the {kind} middle never made its outlet {out!r}")
                inlet = pylsl.StreamInlet(info[0], max_chunklen=1, processing_flags=pylsl.proc_clocksync)
                inlet.open_stream(30)
                if not outlet.wait_for_consumers(60):
                    raise RuntimeError(f"the {kind} middle never connected to {inp!r}")
                for rate in args.rates:
                    lat[kind][rate].append(measure(outlet, inlet, x, rate, args.n))
                    print(f"round {rnd + 1} {kind:<6} {rate:>6g} Hz  p50 {np.median(lat[kind][rate][-1]):7.1f} us",
                          flush=True)
                if kind == "decode":
                    with Client("tcp://127.0.0.1:5621", timeout_ms=2000) as c:
                        lsl_stats = c.stats().lsl.model_dump()
            finally:
                mid.terminate()
                mid.wait(30)
                del outlet
    rows = []
    print(f"\nLSL in -> out, us ({cpu_name()}; {n_ch} channels; engine decode p50 {eng:.1f} us, in-process)")
    print(f"{'rate':>7} {'middle':<7} {'p50':>8} {'p99':>8} {'p99.9':>8} {'max':>8}")
    for rate in args.rates:
        e, d = (percentiles_us(np.concatenate(lat[k][rate]) * 1e3) for k in ("echo", "decode"))  # takes ns
        budget = e["p50"] + eng + 50.0
        for name, p in (("echo", e), ("decode", d)):
            print(f"{rate:>5g}Hz {name:<7} {p['p50']:8.1f} {p['p99']:8.1f} {p['p999']:8.1f} {p['max']:8.1f}")
        print(f"{'':>7} decode p50 - echo p50 = {d['p50'] - e['p50']:.1f} us; target p50 <= {budget:.1f} "
              f"(echo + engine + 50): {'met' if d['p50'] <= budget else 'MISSED'}")
        rows.append({"rate_hz": rate, "echo_us": e, "decode_us": d, "engine_p50_us": eng, "target_p50_us": budget,
                     "met": bool(d["p50"] <= budget),
                     "per_round_p50_us": {k: [float(np.median(a)) for a in lat[k][rate]] for k in lat}})
    write_result(args.out, {"benchmark": "lsl_latency", "cpu": cpu_name(), "bundle": str(bundle), "channels": n_ch,
                            "n_per_round": args.n, "rounds": args.rounds, "rows": rows, "lsl_stats": lsl_stats})
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="bundle to serve (default: train and export one, benchmarks/_common.py)")
    p.add_argument("--channels", type=int, default=174, help="model size to build: 174 is Chewie-1, others simulated")
    p.add_argument("--n", type=int, default=1000, help="bins per rate per round")
    p.add_argument("--rates", type=float, nargs="+", default=[100.0, 1000.0], help="paced rates, Hz")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="results/lsl_latency.json")
    p.add_argument("--echo", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)  # the echo middle itself
    args = p.parse_args(argv)
    if args.echo:
        return echo(*args.echo)
    if os.environ.get(IN_NS) != "1":
        why = ("needs root and unshare (a loopback-only network namespace)" if os.geteuid() != 0
               or not shutil.which("unshare") else None)
        if why is None:
            probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
            why = f"no network namespace here: {probe.stderr.strip()}" if probe.returncode else None
        if why:
            print(f"lsl_latency: not run: {why}; LSL's discovery must not leave this machine", file=sys.stderr)
            return 2
        cfg = Path(tempfile.mkdtemp()) / "lsl_api.cfg"
        cfg.write_text(LSL_CONFIG)
        inner = shlex.join(["env", f"{IN_NS}=1", f"LSLAPICFG={cfg}", sys.executable, os.path.abspath(__file__), *argv])
        return subprocess.call(["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {inner}"])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
