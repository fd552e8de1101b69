"""Before/after latency of ``swapvae serve``: this tree's service against another checkout's, on
the same model, measured in interleaved rounds beside an echo floor for each.

    git worktree add --detach /tmp/base BASE_COMMIT
    python benchmarks/latency_ab.py --base /tmp/base                # d = 174, simulated data
    python benchmarks/latency_ab.py --base /tmp/base --pin          # servers on CPU 1, client on CPU 0

Both services run side by side from their own source trees (``python -m swapvae serve``, with
the tree first on ``sys.path``) on one run trained here (``_common.build_bundle``), which each
tree exports with its own code (a manifest field retired since cannot be read back); each gets
an echo server (``latency.py``'s floor) answering with its reply size. Every round measures
each of the four, in a rotating order, with ``latency.py``'s request loop: back to back, and
optionally paced (``--paced-seconds`` at each of ``--rates``, default 1 kHz). All servers are
started afresh ``--restarts`` times: two identical echo servers' floors differ by up to 8%
within one start (where a process lands), which the restarts average out. The protocol
version of each service is asked first (a PING; a server of another version answers
BAD_VERSION in its own), so an old service is probed in its own version; ``server_ns`` sits
at offset 24 in versions 1 and 2.

Reported: round-trip p50/p99 and the reply's in-server p50 of each, their ratios to the echo
floor of the same run (all echoes pooled, per round their mean: one floor for both services),
and the after/before ratios (over all samples, and the median of the per-round ratios, which
drift on a shared machine cannot skew); the two echoes' ratio says how far apart two
measurements of one thing land. The bar of issue 11: the
back-to-back p50 round trip and the in-server p50 within 10% of before.
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, build_bundle, cpu_name, write_result  # benchmarks/ is on sys.path when run as a script
from latency import Proc  # noqa: E402

_REQ = struct.Struct("<4sBBBBQQII")
_SERVER_NS = struct.Struct("<I")
SERVER_NS_OFFSET = 24  # versions 1 and 2


class VersionedProbe:
    """One DEALER and one preallocated one-bin float32 DECODE of the server's protocol version."""

    def __init__(self, endpoint: str, x: np.ndarray):
        import zmq

        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 5000)
        self.sock.connect(endpoint)
        self.sock.send(_REQ.pack(b"SVAE", 2, 4, 0, 0, 1, 0, 0, 0))  # PING; any server answers in its version
        reply = self.sock.recv()
        self.version = reply[4] if reply[:4] == b"SVAE" else 2  # the echo floor answers zeros: any version
        self.frame = bytearray(_REQ.pack(b"SVAE", self.version, 1, 1, 0, 0, 0, len(x), 1) + x.astype("<f4").tobytes())
        self.seq = 0
        self.reply_bytes = len(self.roundtrip())

    def roundtrip(self) -> bytes:
        self.seq += 1
        struct.pack_into("<Q", self.frame, 8, self.seq)
        self.sock.send(self.frame, copy=True)
        return self.sock.recv()

    def run(self, n: int, rate: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """n round trips (ns) and the server_ns of each, back to back or paced at ``rate`` Hz."""
        pc, send, recv, frame, pack = time.perf_counter_ns, self.sock.send, self.sock.recv, self.frame, struct.pack_into
        rtt, srv = np.empty(n, np.int64), np.empty(n, np.int64)
        period, start = (1.0 / rate if rate else 0.0), time.perf_counter()
        for i in range(n):
            if period:
                wait = start + (i + 1) * period - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            self.seq += 1
            pack("<Q", frame, 8, self.seq)
            t0 = pc()
            send(frame, copy=True)
            reply = recv()
            rtt[i] = pc() - t0
            srv[i] = _SERVER_NS.unpack_from(reply, SERVER_NS_OFFSET)[0]
        return rtt, srv

    def close(self) -> None:
        self.sock.close(linger=0)


def serve_cmd(tree: Path, bundle: Path) -> tuple[list[str], dict]:
    return ([sys.executable, "-m", "swapvae", "serve", str(bundle), "--bind", "tcp://127.0.0.1:*"],
            {**os.environ, "PYTHONPATH": str(tree)})


def tree_bundle(name: str, tree: Path, run: Path, workdir: Path, shared: Path) -> Path:
    """The run exported by ``tree``'s own code (a tree may not read a later export's manifest),
    or the shared bundle where that tree cannot export it."""
    import subprocess

    out = workdir / f"bundle-{name}"
    if not (out / "manifest.json").exists():
        done = subprocess.run([sys.executable, "-m", "swapvae", "export", str(run), "--out", str(out)], cwd=tree,
                              env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
        if done.returncode:
            print(f"  {name}: its export of {run} failed, serving the shared bundle: {done.stderr.strip()[-300:]}",
                  file=sys.stderr)
            return shared
    return out


class TreeProc(Proc):
    """``latency.Proc`` for a service run from another source tree."""

    def __init__(self, name: str, tree: Path, bundle: Path, cpu: int | None):
        import subprocess

        cmd, env = serve_cmd(tree, bundle)
        if cpu is not None:
            cmd = ["taskset", "-c", str(cpu), *cmd]
        self.name = name
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tree, env=env)
        self.endpoint = self._wait_ready(120.0)


def measure(trees: list, bundles: dict, x: np.ndarray, cpu: int | None, args, samples: dict, restart: int) -> dict:
    """Start each tree's service and an echo floor beside it, measure them in ``args.rounds``
    interleaved rounds (appended to ``samples``), stop them; the probes (closed) by name."""
    procs, probes = {}, {}
    me = str(Path(__file__).resolve().parent / "latency.py")
    try:
        for name, tree in trees:
            procs[name] = TreeProc(name, tree, bundles[name], cpu)
            probes[name] = VersionedProbe(procs[name].endpoint, x)
            echo = f"echo {name}"
            procs[echo] = Proc(echo, [sys.executable, me, "--_serve", "echo", "--_reply-bytes",
                                      str(probes[name].reply_bytes)], cpu)
            probes[echo] = VersionedProbe(procs[echo].endpoint, x)
        names = list(probes)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                probe = probes[name]
                probe.run(args.warmup)  # re-warm after the others ran
                got = samples.setdefault(name, {mode: [] for mode in modes(args)})
                got["b2b"].append(probe.run(args.n))
                for rate in args.rates if args.paced_seconds else ():
                    got[rate_name(rate)].append(probe.run(max(1, int(args.paced_seconds * rate)), rate))
            print(f"  start {restart + 1}/{args.restarts}, round {r + 1}/{args.rounds} done", file=sys.stderr,
                  flush=True)
    finally:
        for probe in probes.values():
            probe.close()
        for proc in procs.values():
            proc.stop()
    return probes


def rate_name(rate: float) -> str:
    return f"{rate / 1000:g}kHz" if rate >= 1000 else f"{rate:g}Hz"


def modes(args) -> list[str]:
    return ["b2b", *(rate_name(r) for r in args.rates)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="source tree of the service before the change")
    p.add_argument("--also", action="append", default=[], metavar="NAME=TREE",
                   help="another source tree measured in the same rounds (e.g. a variant), compared with before")
    p.add_argument("--channels", type=int, default=174)
    p.add_argument("--bundle", help="serve this bundle (default: build one, kept in --workdir)")
    p.add_argument("--workdir", help="where the built bundle is kept and reused")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--n", type=int, default=3000, help="back-to-back round trips per server per round")
    p.add_argument("--paced-seconds", type=float, default=0.0,
                   help="also this long paced at each of --rates per server per round")
    p.add_argument("--rates", type=float, nargs="+", default=[1000.0], help="paced request rates, Hz")
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--restarts", type=int, default=3,
                   help="start every server afresh this many times, --rounds rounds each (pooled)")
    p.add_argument("--pin", action="store_true", help="servers on CPU 1, client on CPU 0")
    p.add_argument("--out", default=str(ROOT / "results/latency_ab.json"))
    args = p.parse_args(argv)
    base = Path(args.base).resolve()
    cpu = 1 if args.pin else None
    if args.pin:
        os.sched_setaffinity(0, {0})
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        also = [(n, Path(t).resolve()) for n, t in (a.split("=", 1) for a in args.also)]
        trees = [("before", base), *also, ("after", ROOT)]
        if args.bundle:
            bundle = Path(args.bundle)
            bundles = {name: bundle for name, _ in trees}
        else:  # one run, exported by each tree's own code
            run, bundle = build_bundle(workdir, args.channels)
            bundles = {name: bundle if tree == ROOT else tree_bundle(name, tree, run, workdir, bundle)
                       for name, tree in trees}
        x = np.random.default_rng(0).poisson(2.0, args.channels).astype(np.float32)
        samples: dict = {}
        for restart in range(args.restarts):  # fresh processes: where they land matters by several %
            probes = measure(trees, bundles, x, cpu, args, samples, restart)
    names = list(samples)
    versions = {k: probes[k].version for k in names if not k.startswith("echo ")}
    result = {"d": args.channels, "bundle": str(bundle), "versions": versions,
              "reply_bytes": {k: probes[k].reply_bytes for k in names}, "modes": {}}
    for mode in modes(args):
        if not samples["after"][mode]:
            continue
        res = {}
        for name in names:
            rtt = np.concatenate([a for a, _ in samples[name][mode]]) / 1e3
            srv = np.concatenate([b for _, b in samples[name][mode]]) / 1e3
            res[name] = {"p50": float(np.median(rtt)), "p99": float(np.percentile(rtt, 99)),
                         "server_p50": float(np.median(srv)), "n": int(rtt.size),
                         "round_p50": [float(np.median(a)) / 1e3 for a, _ in samples[name][mode]],
                         "round_server_p50": [float(np.median(b)) / 1e3 for _, b in samples[name][mode]]}
        # One floor per run, for every service: the echo servers all measure the same thing (their
        # reply sizes differ by bytes), and two of them land up to 8% apart, so each service's own
        # echo as its floor would add that noise to the comparison. Per round, the mean of the echoes.
        services = [n for n in names if not n.startswith("echo ")]
        echoes = [n for n in names if n.startswith("echo ")]
        floor = float(np.median(np.concatenate([a for e in echoes for a, _ in samples[e][mode]]))) / 1e3
        round_floor = np.mean([res[e]["round_p50"] for e in echoes], axis=0)
        res["echo floor"] = {"p50": floor, "round_p50": round_floor.tolist()}
        for k in services:
            res[k]["p50_over_echo"] = res[k]["p50"] / floor
            res[k]["server_p50_over_echo"] = res[k]["server_p50"] / floor
            res[k]["round_p50_over_echo"] = (np.array(res[k]["round_p50"]) / round_floor).tolist()
            res[k]["round_server_over_echo"] = (np.array(res[k]["round_server_p50"]) / round_floor).tolist()
        per_round = lambda x, y: float(np.median(np.divide(x, y)))  # noqa: E731
        b, eb = res["before"], res["echo before"]
        for k in services[1:]:
            a, ea = res[k], res[f"echo {k}"]
            res[f"{k}/before"] = {
                "p50_over_echo": a["p50_over_echo"] / b["p50_over_echo"],
                "server_p50_over_echo": a["server_p50_over_echo"] / b["server_p50_over_echo"],
                "p50_over_echo_median_of_rounds": per_round(a["round_p50_over_echo"], b["round_p50_over_echo"]),
                "server_over_echo_median_of_rounds": per_round(a["round_server_over_echo"],
                                                               b["round_server_over_echo"]),
                # the two echo floors against each other: how far apart two measurements of the
                # same thing land (pooled, and the median of the rounds)
                "echo_p50": ea["p50"] / eb["p50"],
                "echo_p50_median_of_rounds": per_round(ea["round_p50"], eb["round_p50"]),
            }
        result["modes"][mode] = res
        print(f"\n{mode}, d = {args.channels}, round trip and in-server time in us (p50 over "
              f"{res['after']['n']} samples each: {args.restarts} starts x {args.rounds} interleaved rounds; "
              f"protocol versions {versions})")
        print(f"{'server':<14} {'rtt p50':>8} {'rtt p99':>8} {'server p50':>10} {'p50/echo':>9} {'server/echo':>11}")
        for name in names:
            r = res[name]
            ratios = (f"{r['p50_over_echo']:9.3f} {r['server_p50_over_echo']:11.3f}" if "p50_over_echo" in r
                      else f"{'-':>9} {'-':>11}")
            srv = f"{r['server_p50']:10.1f}" if not name.startswith("echo") else f"{'-':>10}"
            print(f"{name:<14} {r['p50']:8.1f} {r['p99']:8.1f} {srv} {ratios}")
        print(f"{'echo floor':<14} {floor:8.1f}   (all echoes pooled: the floor of both ratios)")
        for k in services[1:]:
            ab = res[f"{k}/before"]
            print(f"{k}/before: round trip p50/echo x{ab['p50_over_echo']:.3f} (median of rounds "
                  f"x{ab['p50_over_echo_median_of_rounds']:.3f}); in-server p50/echo "
                  f"x{ab['server_p50_over_echo']:.3f} (median of rounds "
                  f"x{ab['server_over_echo_median_of_rounds']:.3f})")
            print(f"  its echo against before's echo (the noise of a floor): x{ab['echo_p50']:.3f} pooled, "
                  f"x{ab['echo_p50_median_of_rounds']:.3f} median of rounds")
    result["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "load_avg": os.getloadavg(), "pin": args.pin}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
