"""Reach-direction accuracy of Swap-VAE on Chewie-1 over seeds, against a raw-rate baseline.

    python benchmarks/reach_accuracy.py                 # the bar: default config, 5 seeds, test trials
    python benchmarks/reach_accuracy.py --validation --set '{"data": {"dropout_max": 0.3}}'

``--validation`` scores on the last 20% of the *training* trials (the model and readout see
only the first 80% of them): that is where recipe choices are made. The test trials are
scored only for a recipe fixed that way. Prints a table and writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections import Counter
import time
from pathlib import Path

import numpy as np
import torch

from _common import CHEWIE  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from schemas import SwapVAEConfig
from schemas.session import split_session
from training.data import load_session
from training.estimator import SwapVAE
from training.evaluate import evaluate_reach, raw_rate_baseline

KEYS = ("reach_acc", "reach_delta_acc", "reach_acc_content", "reach_delta_acc_content",
        "reach_acc_style", "reach_delta_acc_style", "train_seconds")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(CHEWIE))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--config", help="JSON config file")
    p.add_argument("--set", default="{}", help="JSON overrides merged into the config's sections")
    p.add_argument("--validation", action="store_true", help="score on a validation split of the training trials")
    p.add_argument("--out", default="results/reach_accuracy.json")
    p.add_argument("--dump", help="directory to save each seed's representations (.npz) for readout studies")
    args = p.parse_args(argv)

    raw = json.loads(Path(args.config).read_text()) if args.config else {}
    for section, fields in json.loads(args.set).items():
        raw[section] = {**raw.get(section, {}), **fields} if isinstance(fields, dict) else fields
    config = SwapVAEConfig.model_validate(raw)

    session = load_session(args.data)
    split = split_session(session, config.data.train_fraction, config.data.static_std)
    if args.validation:  # the same chronological rule, inside the training trials
        split = split_session(split.train, config.data.train_fraction, config.data.static_std)
    baseline = raw_rate_baseline(split, split.neurons, config.readout)

    runs = []
    for seed in range(args.seeds):
        est = SwapVAE(config=config, seed=seed)
        est.fit(split.train.counts, trial=split.train.trial, bin_in_trial=split.train.bin_in_trial,
                neurons=split.neurons, bin_size_s=session.bin_size_s)
        metrics, _ = evaluate_reach(est, split, config.readout)
        metrics["train_seconds"] = est.train_seconds_
        metrics["epochs_by_threads"] = dict(Counter(str(h["threads"]) for h in est.history_))
        runs.append(metrics)
        if args.dump:
            Path(args.dump).mkdir(parents=True, exist_ok=True)
            np.savez(Path(args.dump) / f"seed{seed}.npz", z_train=est.transform(split.train.counts),
                     z_test=est.transform(split.test.counts), content_dim=config.model.content_dim,
                     **{f"{part}_{k}": getattr(getattr(split, part), k) for part in ("train", "test")
                        for k in ("target", "trial", "bin_in_trial", "speed")})
        print(f"seed {seed}: " + "  ".join(f"{k}={metrics[k]:.3f}" for k in KEYS if k in metrics), flush=True)

    summary = {k: {"mean": statistics.mean(r[k] for r in runs), "std": statistics.pstdev(r[k] for r in runs)}
               for k in KEYS if k in runs[0]}
    scored_on = "validation (last 20% of training trials)" if args.validation else "test trials"
    print(f"\n{session.name}, {args.seeds} seeds, scored on {scored_on} ({runs[0]['n_test_bins']} moving bins)")
    print(f"{'':<24}{'acc':>14}{'delta-acc':>16}")
    for name, suffix in (("full [c, mu]", ""), ("content c", "_content"), ("style mu", "_style")):
        if f"reach_acc{suffix}" in summary:
            a, d = summary[f"reach_acc{suffix}"], summary[f"reach_delta_acc{suffix}"]
            print(f"{name:<24}{a['mean']:>8.3f} +- {a['std']:.3f}{d['mean']:>10.3f} +- {d['std']:.3f}")
    print(f"{'raw rates (logistic)':<24}{baseline['reach_acc']:>8.3f}{'':>9}{baseline['reach_delta_acc']:>10.3f}")
    t = summary["train_seconds"]
    threads = config.optim.cpu_threads or f"tuned 1-{torch.get_num_threads()}"
    used = sum((Counter(r["epochs_by_threads"]) for r in runs), Counter())
    print(f"training time per seed: {t['mean']:.1f} +- {t['std']:.1f} s (torch CPU threads {threads}; "
          f"epochs ending on each count: {dict(sorted(used.items()))}; load average {os.getloadavg()[0]:.2f})")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"data": args.data, "scored_on": scored_on, "config": config.model_dump(mode="json"),
                               "seeds": runs, "summary": summary, "baseline_raw": baseline,
                               "machine": {"python": sys.version.split()[0], "torch": torch.__version__,
                                           "threads": threads, "platform": platform.platform()},
                               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
