"""What a paced bin's wake-up costs, and where: the profile behind the server's warm-up and polling
(runtime/serve/prewarm.py).

    python benchmarks/wake_profile.py [--bundle DIR] [--out FILE]

Two parts, on CPU 1 (the client of part 2 on CPU 0), one model (``--bundle``, or a default-size
one trained for two epochs on a simulated session of 174 channels):

1. The engine in this process. The time of one ``decode_stream`` after a gap of 1 ms or 10 ms,
   by how the gap was spent: sleeping; spinning; sleeping, then a warm-up at a lead before the
   bin and spinning to it, with the warm-up the engine had before (one bound ORT run, which
   leaves the Python and numpy code around the call cold) and with today's (``warm()``: the
   whole ``decode_stream`` on scratch buffers). Also the time of the warm-up itself (cold).
2. The server (``Server`` in a child process, its decode path timed at three points: the
   request read off the socket, the reply code entered, the engine called, the engine done),
   back to back and paced at 1 kHz and 100 Hz, default and ``busy_poll``. The median of each
   part, and the round trip the client saw.

Prints the tables and writes JSON.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, build_bundle, cpu_name, write_result  # benchmarks/ is on sys.path when run as a script

_clock = time.perf_counter_ns
MODES = {"b2b": 0.0, "1kHz": 1000.0, "100Hz": 100.0}


def spin_until(t: int) -> None:
    while _clock() < t:
        pass


def sleep_until(t: int) -> None:
    d = t - _clock()
    if d > 0:
        time.sleep(d / 1e9)


def engine_part(bundle: Path, n: int) -> list[dict]:
    from swapvae.runtime.engine import BundleDecoder

    dec = BundleDecoder(bundle)
    s = dec.new_stream()
    x = np.random.default_rng(0).poisson(2.0, dec.n_channels).astype(np.float32)
    ort_only = lambda: dec._run(dec._bound, None)  # noqa: E731 - the warm-up before: the bound ORT run alone
    ways = {"sleeping": (sleep_until, None), "spinning": (spin_until, None),
            "warm-up before (ORT run), spin": (sleep_until, ort_only), "warm-up now (decode_stream), spin":
            (sleep_until, dec.warm)}
    for _ in range(500):
        dec.decode_stream(s, x)
    rows = []
    took = []
    for _ in range(n * 3):
        t = _clock()
        dec.decode_stream(s, x)
        took.append(_clock() - t)
    rows.append({"gap_us": 0, "way": "back to back", "decode_us": float(np.median(took)) / 1e3, "warm_us": 0.0})
    for gap in (1_000_000, 10_000_000):
        for way, (wait, warm) in ways.items():
            took, warm_took = [], []
            lead = 450_000 if gap > 2_000_000 else 200_000
            for _ in range(n):
                t_bin = _clock() + gap
                if warm is not None:
                    wait(t_bin - lead)
                    t = _clock()
                    warm()
                    warm_took.append(_clock() - t)
                    spin_until(t_bin)
                else:
                    wait(t_bin)
                t = _clock()
                dec.decode_stream(s, x)
                took.append(_clock() - t)
            rows.append({"gap_us": gap // 1000, "way": way, "decode_us": float(np.median(took)) / 1e3,
                         "decode_p90_us": float(np.percentile(took, 90)) / 1e3,
                         "warm_us": float(np.median(warm_took)) / 1e3 if warm_took else 0.0})
    return rows


def serve_timed(bundle: str, busy: bool) -> None:
    """The child: a Server whose one-bin decodes record (read, reply code, engine start, engine end)."""
    from swapvae.runtime.engine import BundleDecoder
    from swapvae.runtime.serve import replies
    from swapvae.runtime.serve.server import Server

    marks: list = []
    decode_one = replies.Replies.decode_one

    def timed_decode_one(self, frame, head, key, t_read, t_start=0):
        entered, engine = _clock(), self._engine_decode

        def timed(stream, counts, reset):
            t = _clock()
            out = engine(stream, counts, reset)
            marks.append((t_read, entered, t, _clock()))
            return out
        self._engine_decode = timed
        try:
            return decode_one(self, frame, head, key, t_read, t_start)
        finally:
            self._engine_decode = engine
    replies.Replies.decode_one = timed_decode_one
    server = Server(BundleDecoder(bundle), bind="tcp://127.0.0.1:*", busy_poll=busy)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    print(f"ready router={server.endpoints['router']} pid={os.getpid()}", flush=True)
    server.run()
    np.save(os.environ["WAKE_MARKS"], np.array(marks, np.int64))
    server.close()


def server_part(bundle: Path, n_b2b: int, seconds: float, workdir: Path) -> list[dict]:
    from latency import Probe, Proc

    x = np.random.default_rng(0).poisson(2.0, 174).astype(np.float32)
    rows = []
    for busy in (False, True):
        marks = workdir / f"marks-{busy}.npy"
        os.environ["WAKE_MARKS"] = str(marks)
        proc = Proc("timed", [sys.executable, __file__, "--_serve", str(bundle)] + (["--_busy"] if busy else []), 1)
        probe = Probe(proc.endpoint, x)
        counts, rtts = [], {}
        try:
            for mode, rate in MODES.items():
                probe.run(300, 0)
                ns, _, _ = probe.run(n_b2b if not rate else max(1, int(seconds * rate)), rate)
                rtts[mode] = ns
                counts.append((mode, 300, len(ns)))
        finally:
            probe.close()
            proc.stop()
        m = np.load(marks)
        i = 1  # the probe's first round trip, at its start
        for mode, warm, k in counts:
            part = m[i + warm:i + warm + k]
            i += warm + k
            rows.append({"server": "busy-poll" if busy else "default", "mode": mode, "n": int(len(part)),
                         "read_to_reply_code_us": float(np.median(part[:, 1] - part[:, 0])) / 1e3,
                         "reply_code_to_engine_us": float(np.median(part[:, 2] - part[:, 1])) / 1e3,
                         "engine_us": float(np.median(part[:, 3] - part[:, 2])) / 1e3,
                         "read_to_engine_done_us": float(np.median(part[:, 3] - part[:, 0])) / 1e3,
                         "round_trip_us": float(np.median(rtts[mode])) / 1e3})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="a bundle of 174 channels (default: train one)")
    p.add_argument("--n", type=int, default=300, help="bins per engine variant")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per paced mode of the server part")
    p.add_argument("--out", default=str(ROOT / "results/wake_profile.json"))
    p.add_argument("--_serve", help=argparse.SUPPRESS)
    p.add_argument("--_busy", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._serve:
        serve_timed(args._serve, args._busy)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle) if args.bundle else build_bundle(Path(tmp), 174)[1]
        os.sched_setaffinity(0, {1})
        engine = engine_part(bundle, args.n)
        print("1. the engine in-process, one decode_stream after a gap, us (p50; warm-up: its own time)")
        for r in engine:
            print(f"  gap {r['gap_us']:>6} us  {r['way']:<36} decode {r['decode_us']:7.1f}  "
                  f"warm-up {r['warm_us']:6.1f}")
        os.sched_setaffinity(0, {0})
        served = server_part(bundle, 3000, args.seconds, Path(tmp))
    print("2. the server's decode path (p50 us): read -> reply code -> engine call -> engine done; round trip")
    for r in served:
        print(f"  {r['server']:<9} {r['mode']:<6} read->code {r['read_to_reply_code_us']:6.1f}  "
              f"code->engine {r['reply_code_to_engine_us']:6.1f}  engine {r['engine_us']:7.1f}  "
              f"read->done {r['read_to_engine_done_us']:7.1f}  round trip {r['round_trip_us']:7.1f}")
    write_result(args.out, {"benchmark": "wake_profile", "cpu": cpu_name(), "engine": engine, "server": served,
                            "load_avg": os.getloadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
