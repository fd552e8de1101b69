"""Chewie-1 decoding over seeds, every peer in the same run and under the same readout rules.

    python benchmarks/reach_accuracy.py                  # the bar: 5 seeds, test trials
    python benchmarks/reach_accuracy.py --cebra          # + CEBRA-Time (pip install 'swapvae-bci[bench]')
    python benchmarks/reach_accuracy.py --validation --set '{"data": {"dropout_max": 0.3}}'

Rows: Swap-VAE with the product readout (a causal window of the last k latents, k and the
penalties by CV grouped by training trial, the direction head also trained on silenced
copies of the training bins) and with the paper's per-bin protocol (k = 1); the same model
trained without neuron dropout and with the paper's "Drop" (p ~ U(0, 0.6) per sample, as the
released code draws it; the default is U(0, 0.3)); raw rates of the kept neurons under the
same rules (their velocity head with history is the classic Wiener filter); and, with
``--cebra``, CEBRA-Time (the
``cebra`` package: an MLP encoder of about Swap-VAE's size, time-contrastive, fitted on the
training bins' counts, its 128-d embedding read out by the same rules; settings chosen on
the validation split, in CEBRA_SETTINGS and the JSON).
Direction: acc / delta-acc on the moving test bins; velocity: R^2 (mean of vx, vy) on all
test bins. Lost channels: the fitted decoders on test bins with 10, 20 and 40% of the kept
channels silenced, ``--draws`` random draws each, the same draws for every model.

``--validation`` scores on the last 20% of the *training* trials (the model and readout see
only the first 80% of them): that is where recipe choices are made; the test trials are
scored only for a recipe fixed that way. Prints tables and writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from _common import CHEWIE, cpu_name, write_result  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from swapvae.schemas import SwapVAEConfig
from swapvae.schemas.session import split_session
from swapvae.training.data import load_session
from swapvae.training.estimator import SwapVAE
from swapvae.training.evaluate import representation_metrics
from swapvae.training.robustness import FRACTIONS, lost_channel_scores

KEYS = ("reach_acc", "reach_delta_acc", "velocity_r2", "reach_acc_per_bin", "reach_delta_acc_per_bin",
        "velocity_r2_per_bin", "history_bins")
VARIANTS = {"Swap-VAE, no dropout": {"data": {"dropout_max": 0.0}},
            "Swap-VAE, dropout 0.6 (paper)": {"data": {"dropout_max": 0.6}}}
# CEBRA-Time on the spike counts of the kept neurons. Chosen on the validation split (2 seeds,
# acc / delta-acc / velocity R^2): time offset 1 bin with a learned temperature 0.607 / 0.721 /
# 0.491; offset 2 0.574 / 0.647 / 0.393; offset 5 0.426 / 0.537 / 0.305; rates in Hz, offset 10,
# temperature 1 (the first guess) 0.254 / 0.331 / 0.067.
CEBRA_SETTINGS = {"model_architecture": "offset1-model", "conditional": "time", "time_offsets": 1,
                  "output_dimension": 128, "num_hidden_units": 128, "batch_size": 256, "learning_rate": 3e-4,
                  "temperature_mode": "auto", "temperature": 1.0, "distance": "cosine"}


def merge(raw: dict, over: dict) -> dict:
    return {**raw, **{k: {**raw.get(k, {}), **v} if isinstance(v, dict) else v for k, v in over.items()}}


def fit_swap(config: SwapVAEConfig, split, bin_size_s: float, seed: int) -> SwapVAE:
    return SwapVAE(config=config, seed=seed).fit(split.train.counts, trial=split.train.trial,
                                                 bin_in_trial=split.train.bin_in_trial, neurons=split.neurons,
                                                 bin_size_s=bin_size_s)


def fit_cebra(split, seed: int, steps: int):
    import cebra

    torch.manual_seed(seed)
    np.random.seed(seed)
    model = cebra.CEBRA(**CEBRA_SETTINGS, max_iterations=steps, device="cpu", verbose=False)
    model.fit(split.train.counts[:, split.neurons].astype(np.float32))
    return lambda counts: model.transform(counts[:, split.neurons].astype(np.float32))


def model_row(represent, split, cfg, lost: bool, seed: int, draws: int) -> dict:
    metrics, fit = representation_metrics(represent, split, split.neurons, cfg, seed)
    if lost:
        metrics["lost"] = lost_channel_scores(represent, fit.readout, split, split.neurons, cfg, draws=draws, seed=seed)
    return metrics


def summarise(runs: list[dict]) -> dict:
    out = {}
    for model in runs[0]:
        vals = {k: [r[model][k] for r in runs] for k in KEYS if k in runs[0][model]}
        out[model] = {k: {"mean": statistics.mean(v), "std": statistics.pstdev(v)} for k, v in vals.items()}
        if "lost" in runs[0][model]:
            out[model]["lost"] = {f: {"mean": statistics.mean(np.mean(r[model]["lost"][f]["reach_acc"]) for r in runs),
                                      "std": statistics.pstdev(np.mean(r[model]["lost"][f]["reach_acc"]) for r in runs)}
                                  for f in runs[0][model]["lost"]}
    return out


def print_tables(summary: dict, scored_on: str, n_seeds: int) -> None:
    pm = lambda s: f"{s['mean']:.3f} +- {s['std']:.3f}"  # noqa: E731
    print(f"\nChewie-1, {n_seeds} seeds, scored on {scored_on}")
    print(f"{'model':<26}{'k':>5}  {'acc':>15}  {'delta-acc':>15}  {'velocity R^2':>15}   "
          f"per bin (k = 1): acc / delta / R^2")
    for name, s in summary.items():
        k = f"{s['history_bins']['mean']:.1f}"
        print(f"{name:<26}{k:>5}  {pm(s['reach_acc']):>15}  {pm(s['reach_delta_acc']):>15}  {pm(s['velocity_r2']):>15}"
              f"   {s['reach_acc_per_bin']['mean']:.3f} / {s['reach_delta_acc_per_bin']['mean']:.3f} / "
              f"{s['velocity_r2_per_bin']['mean']:.3f}")
    lost = {n: s["lost"] for n, s in summary.items() if "lost" in s}
    if lost:
        fr = list(next(iter(lost.values())))
        print("\nlost channels: product readout acc with a share of the kept channels silenced at test time")
        print(f"{'model':<26}" + "".join(f"{float(f):>17.0%}" for f in fr))
        for name, row in lost.items():
            print(f"{name:<26}" + "".join(f"{pm(row[f]):>17}" for f in fr))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(CHEWIE))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--config", help="JSON config file")
    p.add_argument("--set", default="{}", help="JSON overrides merged into the config's sections")
    p.add_argument("--validation", action="store_true", help="score on a validation split of the training trials")
    p.add_argument("--cebra", action="store_true", help="add CEBRA-Time (needs the cebra package)")
    p.add_argument("--no-variants", action="store_true", help="skip the dropout variants of Swap-VAE")
    p.add_argument("--no-lost", action="store_true", help="skip the lost-channel scores")
    p.add_argument("--draws", type=int, default=5, help="random draws per lost-channel fraction")
    p.add_argument("--out", default="results/reach_accuracy.json")
    args = p.parse_args(argv)

    raw = json.loads(Path(args.config).read_text()) if args.config else {}
    config = SwapVAEConfig.model_validate(merge(raw, json.loads(args.set)))
    cfg = config.readout
    session = load_session(args.data)
    split = split_session(session, config.data.train_fraction, config.data.static_std)
    if args.validation:  # the same chronological rule, inside the training trials
        split = split_session(split.train, config.data.train_fraction, config.data.static_std)
    steps = config.optim.epochs * max(1, split.train.n_bins // config.optim.batch_size)
    lost = not args.no_lost
    raw_cfg = cfg.model_copy(update={"scaling": "feature"})
    to_rates = lambda c: c[:, split.neurons] / session.bin_size_s  # noqa: E731

    runs, timing = [], Counter()
    for seed in range(args.seeds):
        row = {}
        t = time.perf_counter()
        est = fit_swap(config, split, session.bin_size_s, seed)
        timing["swap_vae_train_s"] += est.train_seconds_
        row["Swap-VAE"] = model_row(est.transform, split, cfg, lost, seed, args.draws)
        for name, change in ({} if args.no_variants else VARIANTS).items():
            variant = fit_swap(SwapVAEConfig.model_validate(merge(config.model_dump(), change)), split,
                               session.bin_size_s, seed)
            row[name] = model_row(variant.transform, split, cfg, lost, seed, args.draws)
        if args.cebra:
            t_cebra = time.perf_counter()
            row["CEBRA-Time"] = model_row(fit_cebra(split, seed, steps), split, cfg, lost, seed,
                                          args.draws)
            timing["cebra_s"] += time.perf_counter() - t_cebra
        row["raw rates"] = model_row(to_rates, split, raw_cfg, lost, seed, args.draws)
        runs.append(row)
        print(f"seed {seed} ({time.perf_counter() - t:.0f} s): " + "  ".join(
            f"{m} {r['reach_acc']:.3f}/{r['reach_delta_acc']:.3f}/R2 {r['velocity_r2']:.3f} (k={r['history_bins']})"
            for m, r in row.items()), flush=True)

    summary = summarise(runs)
    scored_on = "validation (last 20% of training trials)" if args.validation else "test trials"
    print_tables(summary, scored_on, args.seeds)
    print(f"\nSwap-VAE training {timing['swap_vae_train_s'] / args.seeds:.1f} s per seed; load average "
          f"{os.getloadavg()[0]:.2f}")
    write_result(args.out, {
        "data": args.data, "scored_on": scored_on, "config": config.model_dump(mode="json"), "variants": VARIANTS,
        "cebra": {**CEBRA_SETTINGS, "max_iterations": steps} if args.cebra else None,
        "lost_fractions": FRACTIONS, "draws": args.draws, "seeds": runs, "summary": summary,
        "timing": {k: v / args.seeds for k, v in timing.items()},
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__}, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
