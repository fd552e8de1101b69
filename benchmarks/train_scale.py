"""How training's cost grows with a recording's size: steps/s, bins/s and peak memory per (bins,
neurons), where a step's time goes, and whether the fast path still learns.

    python benchmarks/train_scale.py [--sizes 200000x1024 ...] [--steps N] [--device cpu|cuda]
                                     [--placement device host] [--out FILE] [--accuracy 50000x512]
                                     [--accuracy-epochs 5]

Each size runs in a process of its own (its peak memory is its own: VmHWM on the CPU,
``torch.cuda.max_memory_allocated`` on CUDA) on a simulated session of that size (the built-in
simulator, ``training.simulate.simulate_reaching``), with the default config. The training step
is the estimator's own (``SwapVAE._step``: pairs drawn on the device from the pair index, one
gather for both views, neuron dropout, the loss, backward, fused Adam), timed over ``--steps``
steps after a warm-up; then the same steps again with a clock around each part (on CUDA, with a
synchronisation around each part, which the plain run does not have):

    sample     pair indices and the gather of both views, neuron dropout
    forward    SwapVAENet.loss
    backward   loss.backward()
    optimizer  zero_grad and Adam's step
    logging    the epoch sums of the loss terms (kept on the device)

``--placement host`` runs each size again with the bins in host memory (``data.placement``
"host", training.stream): sample is then taking the step's rows from the chunk a worker thread
gathered and copied over, and neuron dropout; peak memory on CUDA is what the device then holds.

``overhead_share`` is the share of a step outside the model's forward and backward (the parts
above but those two). bins/s is steps/s x batch_size (an epoch is N // batch_size steps: one
pass over N bins); the epoch time's growth is fitted as ``t ~ bins^a x neurons^b`` over the
sizes run (least squares on logs; the default sizes include two off the bins-with-neurons
diagonal, without which the two exponents cannot be told apart). ``--accuracy SIZE`` trains a
simulated session of that size for ``--accuracy-epochs`` epochs through ``swapvae train``, in
float32 and in bf16 (``--precision``), and prints its test scores beside raw rates (the readouts
with one window of 3 bins and 3 values of C: their full cross-validation outlasts the training
at that size).

Writes ``{"rows": [{"bins", "neurons", "device", "bins_per_s", "peak_mem_mb", "overhead_share",
...}], "growth": {...}, "accuracy": [{...}, ...]}``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, cpu_name, write_result  # benchmarks/ is on sys.path when run as a script

# The three sizes grow bins and neurons together; two more apart from that line let the fit
# tell the two exponents apart.
DEFAULT_SIZES = ("1640x174", "50000x512", "200000x1024", "50000x174", "1640x1024")
PARTS = ("sample", "forward", "backward", "optimizer", "logging")


def size(text: str) -> tuple[int, int]:
    try:
        bins, neurons = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is BINSxNEURONS, e.g. 200000x1024; got {text!r}") from None
    if bins < 100 or neurons < 8:
        raise argparse.ArgumentTypeError(f"{text}: at least 100 bins and 8 neurons")
    return bins, neurons


def simulated(bins: int, neurons: int, seed: int = 0):
    """The built-in simulator's session, cut to ``bins`` bins of whole trials (about 12 bins a trial)."""
    from swapvae.training.simulate import simulate_reaching

    s = simulate_reaching(n_neurons=neurons, n_trials=bins // 12 + 2, seed=seed)
    return s.select_bins(s.trial <= s.trial[min(bins, len(s.trial)) - 1])


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_one(bins: int, neurons: int, device: str, steps: int, threads: int, placement: str = "device") -> dict:
    """One size, in this process: the plain step's rate, then the per-part clock."""
    import torch

    from swapvae.schemas.config import SwapVAEConfig
    from swapvae.training.data import jitter_pairs
    from swapvae.training.estimator import SwapVAE, build_model
    from swapvae.training.stream import HostBatches

    torch.set_num_threads(threads)
    dev = torch.device(device)
    s = simulated(bins, neurons)
    counts, trial, bin_in_trial = s.counts, s.trial, s.bin_in_trial
    est = SwapVAE(config=SwapVAEConfig.model_validate({"device": device}))
    cfg = est.get_config()
    counts = est._counts(counts, reset=True)
    trial, bin_in_trial, keep = est._checked(counts, trial, bin_in_trial, None, cfg)
    est.config_, est.bin_size_s_, est.neurons_, est.channel_mean_ = cfg, 0.1, keep, counts.mean(axis=0)
    torch.manual_seed(0)
    est.model_ = build_model(cfg, len(keep)).to(dev)
    pairs = jitter_pairs(trial, bin_in_trial, cfg.data.jitter)
    opt, gen = est._adam(est.model_), torch.Generator(device=dev).manual_seed(0)
    b = cfg.optim.batch_size
    if placement == "device":
        x, pairs = est._model_input(counts, dev), torch.as_tensor(pairs, device=dev)

        def views():
            return est._views(x, pairs, gen, b)
    else:  # the bins in host memory, each step's rows shipped over by training.stream
        x = est._model_input(counts, torch.device("cpu"))
        stream = HostBatches(x, pairs, b, dev, 0, cfg.data.stream_chunk_steps)

        def views():
            return est._dropout(*stream.next(), gen)
    del counts, s
    est.model_.train()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    terms = ("loss", "rec", "kl", "align")
    sums = torch.zeros(len(terms), device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def plain(n: int) -> float:
        sync()
        t = time.perf_counter()
        for _ in range(n):
            out = est._learn(est.model_, opt, *views())
            sums.add_(torch.stack([out[k].detach() for k in terms]))
        sync()
        return time.perf_counter() - t

    plain(max(3, steps // 10))  # warm-up: allocations, kernels chosen
    seconds = plain(steps)
    part = dict.fromkeys(PARTS, 0.0)
    for _ in range(steps):
        t0 = time.perf_counter()
        x1, x2 = views()
        sync()
        t1 = time.perf_counter()
        out = est.model_.loss(x1, x2, cfg.loss.swap, cfg.loss.kl_weight, cfg.loss.align_weight, cfg.loss.eps)
        sync()
        t2 = time.perf_counter()
        out["loss"].backward()
        sync()
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t4 = time.perf_counter()
        sums.add_(torch.stack([out[k].detach() for k in terms]))
        sync()
        t5 = time.perf_counter()
        for k, dt in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            part[k] += dt
    total = sum(part.values())
    step_s = seconds / steps
    n = len(x)
    if placement == "host":
        stream.close()
    return {"bins": n, "neurons": len(keep), "device": device, "placement": placement, "threads": threads,
            "steps": steps,
            "steps_per_s": 1 / step_s, "bins_per_s": b / step_s, "epoch_s": (n // b) * step_s,
            "peak_mem_mb": (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else peak_rss_mb()),
            "overhead_share": 1 - (part["forward"] + part["backward"]) / total,
            "share": {k: v / total for k, v in part.items()}, "pairs": len(pairs),
            "data_mb": x.element_size() * x.nelement() / 2**20}


def report(r: dict) -> None:
    parts = ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["share"].items())
    print(f"{r['bins']:>8} x {r['neurons']:<5} {r['device']:<4} {r['placement']:<6} {r['steps_per_s']:8.1f} steps/s "
          f"{r['bins_per_s']:10.0f} bins/s  epoch {r['epoch_s']:8.2f} s  peak {r['peak_mem_mb']:8.0f} MB  "
          f"outside fwd+bwd {100 * r['overhead_share']:5.1f}% ({parts})", flush=True)


def growth(rows: list[dict]) -> dict:
    """log(epoch_s) = c + a log(bins) + b log(neurons), least squares over the sizes run."""
    if len({(r["bins"], r["neurons"]) for r in rows}) < 3:
        return {"note": "needs three sizes or more"}
    A = np.array([[1.0, np.log(r["bins"]), np.log(r["neurons"])] for r in rows])
    y = np.log([r["epoch_s"] for r in rows])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - A @ coef
    return {"bins_exponent": float(coef[1]), "neurons_exponent": float(coef[2]),
            "rms_log_residual": float(np.sqrt(np.mean(resid ** 2))), "sizes": len(rows)}


def accuracy(bins: int, neurons: int, epochs: int, device: str, precision: str = "fp32") -> dict:
    """A simulated session of that size trained through ``swapvae train``: test acc beside raw rates."""
    from swapvae.schemas.session import write_npz

    with tempfile.TemporaryDirectory() as tmp:
        cut = simulated(bins, neurons, seed=1)
        data = write_npz(cut, Path(tmp) / "sim.npz")
        # the readouts' cross-validation over 5 windows x 11 C on 10^4-10^5 bins outlasts the training
        # (the raw rates' ridge path: an SVD of bins x neurons*k per fold): one window of 3, fewer C
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps({"device": device, "optim": {"epochs": epochs, "precision": precision},
                                      "readout": {"history_grid": [3], "C_grid": [0.01, 0.1, 1.0], "cv_folds": 3}}))
        t = time.perf_counter()
        res = subprocess.run([str(Path(sys.executable).parent / "swapvae"), "train", "--data", str(data),
                              "--out", str(Path(tmp) / "run"), "--config", str(config), "--quiet"],
                             capture_output=True, text=True)
        if res.returncode:
            return {"error": res.stderr.strip()[-500:]}
        m = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    keys = ("reach_acc", "reach_delta_acc", "velocity_r2", "raw_reach_acc", "raw_reach_delta_acc", "raw_velocity_r2")
    return {"bins": cut.n_bins, "neurons": neurons, "epochs": epochs, "precision": precision,
            "seconds": time.perf_counter() - t,
            **{k: m.get(k) for k in keys}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=size, nargs="+", default=[size(s) for s in DEFAULT_SIZES], metavar="BINSxNEURONS")
    p.add_argument("--steps", type=int, default=30, help="timed steps per size (and as many again, part by part)")
    p.add_argument("--device", choices=["cpu", "cuda"], nargs="+", default=None,
                   help="default: the CPU, and CUDA when there is one")
    p.add_argument("--placement", nargs="+", choices=["device", "host"], default=["device"],
                   help="data.placement: the bins on the training device, or streamed from host memory")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch's CPU threads")
    p.add_argument("--accuracy", type=size, metavar="BINSxNEURONS", help="train a simulated session of that size")
    p.add_argument("--accuracy-epochs", type=int, default=5)
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                   help="optim.precision of the accuracy runs (the same seed each)")
    p.add_argument("--out", default=str(ROOT / "results/train_scale.json"))
    p.add_argument("--_one", help=argparse.SUPPRESS)  # BINSxNEURONSxDEVICE: measure in this process
    args = p.parse_args(argv)
    if args._one:
        b, n, dev, placement = args._one.split("x")
        print(json.dumps(measure_one(int(b), int(n), dev, args.steps, args.threads, placement)))
        return 0
    devices = args.device
    if devices is None:
        import torch

        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for dev in devices:
        for bins, neurons in args.sizes:
            for placement in args.placement:
                res = subprocess.run([sys.executable, __file__, "--_one", f"{bins}x{neurons}x{dev}x{placement}",
                                      "--steps", str(args.steps), "--threads", str(args.threads)],
                                     capture_output=True, text=True)
                if res.returncode:
                    print(f"{bins}x{neurons} on {dev} ({placement}) failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                    return 1
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
                report(rows[-1])
    grow = {dev: growth([r for r in rows if r["device"] == dev and r["placement"] == args.placement[0]])
            for dev in devices}
    for dev, g in grow.items():
        if "bins_exponent" in g:
            print(f"{dev}: epoch time ~ bins^{g['bins_exponent']:.2f} x neurons^{g['neurons_exponent']:.2f} "
                  f"(rms log residual {g['rms_log_residual']:.3f} over {g['sizes']} sizes)")
    acc = []
    for precision in args.precision if args.accuracy else ():
        acc.append(accuracy(*args.accuracy, args.accuracy_epochs, devices[-1], precision))
        a = acc[-1]
        print(f"simulated {args.accuracy[0]}x{args.accuracy[1]}, {args.accuracy_epochs} epochs, {precision}: "
              + (f"acc {a['reach_acc']:.3f} delta-acc {a['reach_delta_acc']:.3f} vel R^2 {a['velocity_r2']:.3f} | "
                 f"raw {a['raw_reach_acc']:.3f} {a['raw_reach_delta_acc']:.3f} {a['raw_velocity_r2']:.3f} "
                 f"({a['seconds']:.0f} s)" if "error" not in a else a["error"]))
    write_result(args.out, {"benchmark": "train_scale", "cpu": cpu_name(), "steps": args.steps, "rows": rows,
                            "growth": grow, "accuracy": acc})
    return 0


if __name__ == "__main__":
    sys.exit(main())
