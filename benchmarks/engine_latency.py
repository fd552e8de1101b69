"""Batch-1 decode latency of the runtime engine against ONNX Runtime's defaults and torch eager.

    python benchmarks/engine_latency.py                      # a default-size model on Chewie-1
    python benchmarks/engine_latency.py --bundle bundles/demo

Without ``--bundle`` it trains the default config for two epochs (latency does not depend
on how well the model is trained) and exports it. Every variant maps the same raw count
vector of one bin to the same outputs:

    engine            runtime.engine.BundleDecoder.decode (what the service calls)
    engine ORT call   its bound ORT call alone: what decode() adds on top is the rest
    engine after warm()  decode() right after an untimed warm() (differs only with gaps)
    ORT defaults      decode.onnx, default SessionOptions, session.run(None, feed)
    ORT 3 graphs      encoder.onnx -> decoder.onnx + readout.onnx (on the window), defaults: unfused
    torch eager       the torch model (BatchNorm unfolded) + the numpy readout (_common.TorchEngine)

Each is timed in a tight loop and with a gap between calls (a server waiting for the next
bin: caches go cold, idle threads sleep), in interleaved rounds so drift on a shared machine
hits all variants alike. Prints medians (us) and writes JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from _common import TorchEngine, build_bundle, cpu_name, write_result  # benchmarks/ is on sys.path when run as a script


def variants(bundle: Path, run: Path | None, x: np.ndarray) -> dict:
    import onnxruntime as ort

    from swapvae.runtime.engine import BundleDecoder

    dec = BundleDecoder(bundle)
    out = {"engine": lambda: dec.decode(x), "engine ORT call": lambda: dec._run(dec._bound, None),
           "engine after warm()": (lambda: dec.decode(x), dec.warm)}
    x2 = x[None]
    k, d = dec.history_bins, dec.latent_dim
    feed = {"counts": x2}
    if k > 1:  # the stream's history, as the engine passes it
        feed.update(history=np.zeros((1, (k - 1) * d), np.float32), first=np.zeros((1, 1), bool))
    default = ort.InferenceSession(str(bundle / "decode.onnx"), providers=["CPUExecutionProvider"])
    out["ORT defaults"] = lambda: default.run(None, feed)
    enc, de, ro = (ort.InferenceSession(str(bundle / f"{n}.onnx"), providers=["CPUExecutionProvider"])
                   for n in ("encoder", "decoder", "readout"))
    past = np.zeros((1, (k - 1) * d), np.float32)

    def three():
        c, mu, _ = enc.run(None, {"counts": x2})
        z = np.concatenate([c, mu], axis=1)
        return de.run(None, {"latent": z}), ro.run(None, {"window": np.concatenate([z, past], axis=1)})
    out["ORT 3 graphs"] = three
    if run is not None:
        out["torch eager"] = partial(TorchEngine(run).decode, x2)
    return out


def measure(fns: dict, n: int, rounds: int, gap_s: float) -> dict[str, np.ndarray]:
    """Per-call times (us); a variant given as (f, before) runs ``before`` untimed after each gap."""
    pc = time.perf_counter_ns
    samples: dict[str, list] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            f, before = f if isinstance(f, tuple) else (f, None)
            for _ in range(50):  # re-warm after the other variants ran
                f()
            ts = np.empty(n)
            for i in range(n):
                if gap_s:
                    time.sleep(gap_s)
                    if before is not None:
                        before()
                t = pc()
                f()
                ts[i] = pc() - t
            samples[name].append(ts / 1e3)
    return {k: np.concatenate(v) for k, v in samples.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="bundle to time (default: train and export one)")
    p.add_argument("--run", help="the bundle's run directory, for the torch eager variant")
    p.add_argument("--channels", type=int, default=174, help="model size to build: 174 is Chewie-1, others simulated")
    p.add_argument("--n", type=int, default=2000, help="calls per variant per round, tight loop")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--gap-ms", type=float, default=2.0, help="pause before each call in the gap runs")
    p.add_argument("--gap-n", type=int, default=300, help="calls per variant per round, with gaps")
    p.add_argument("--out", default="results/engine_latency.json")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle:
            bundle, run = Path(args.bundle), Path(args.run) if args.run else None
        else:
            run, bundle = build_bundle(Path(tmp), args.channels)
        manifest = json.loads((bundle / "manifest.json").read_text())
        rng = np.random.default_rng(0)
        x = rng.poisson(2.0, manifest["n_channels"]).astype(np.float32)
        fns = variants(bundle, run, x)
        tight = measure(fns, args.n, args.rounds, 0.0)
        gap = measure(fns, args.gap_n, args.rounds, args.gap_ms / 1e3)

    rows = {k: {"tight_p50_us": float(np.median(tight[k])), "tight_p90_us": float(np.percentile(tight[k], 90)),
                "gap_p50_us": float(np.median(gap[k])), "gap_p90_us": float(np.percentile(gap[k], 90))}
            for k in fns}
    w = max(map(len, rows))
    print(f"{'variant':<{w}}  {'p50':>7}  {'p90':>7}  {'gap p50':>8}  {'gap p90':>8}   (us, batch 1)")
    for k, r in rows.items():
        print(f"{k:<{w}}  {r['tight_p50_us']:7.1f}  {r['tight_p90_us']:7.1f}  {r['gap_p50_us']:8.1f}  "
              f"{r['gap_p90_us']:8.1f}")
    import onnxruntime

    result = {
        "what": "batch-1 decode latency, medians in microseconds (raw counts of one bin -> all outputs)",
        "model": {k: manifest[k] for k in ("n_channels", "content_dim", "style_dim")} | {
            "n_neurons": len(manifest["neurons"]), "hidden": manifest["training"]["config"]["model"]["hidden"],
            "data": manifest["training"].get("data")},
        "settings": {"n": args.n, "rounds": args.rounds, "gap_ms": args.gap_ms, "gap_n": args.gap_n},
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_avg": os.getloadavg(),
                    "python": platform.python_version(),
                    "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
        "results": rows,
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
