"""``swapvae train`` and ``swapvae evaluate``: a run directory (training.rundir) from a session
and a config, and its metrics table."""
from __future__ import annotations

import json
from pathlib import Path

from schemas import SwapVAEConfig
from schemas.session import split_session
from training.data import load_session
from training.estimator import SwapVAEEstimator
from training.evaluate import evaluate_reach, raw_rate_baseline
from training.rundir import RunDir


def train_run(data: str, out: str | Path, config: SwapVAEConfig, progress: bool = True) -> dict:
    """Load, split, fit, evaluate; write everything into ``out``; return the metrics."""
    session = load_session(data, min_trials=config.data.min_trials)
    split = split_session(session, config.data.train_fraction, config.data.static_std)
    run = RunDir.create(out, config, data, session.name)
    est = SwapVAEEstimator(config).fit(split.train.counts, split.train.trial, split.train.bin_in_trial,
                                       neurons=split.neurons, bin_size_s=session.bin_size_s,
                                       checkpoint=run.checkpoint, progress=progress)
    run.save_history(est.history_)
    metrics, readout = evaluate_reach(est, split, config.readout)
    metrics["train_seconds"] = est.train_seconds_
    run.save_readout(readout)
    run.save_metrics(metrics)
    return metrics


def evaluate_run(run_dir: str | Path, data: str | None = None) -> dict:
    loaded = RunDir(run_dir).load(data)
    est, split, cfg = loaded.estimator, loaded.split, loaded.config
    metrics, _ = evaluate_reach(est, split, cfg.readout)
    metrics["train_seconds"] = est.train_seconds_
    baseline = raw_rate_baseline(split, est.neurons_, cfg.readout)
    metrics["baseline_raw_acc"], metrics["baseline_raw_delta_acc"] = baseline["reach_acc"], baseline["reach_delta_acc"]
    return metrics


def format_table(metrics: dict) -> str:
    rows = [("space", "acc", "delta-acc")]
    for space, suffix in (("full [c, mu]", ""), ("content c", "_content"), ("style mu", "_style")):
        if f"reach_acc{suffix}" in metrics:
            rows.append((space, f"{metrics[f'reach_acc{suffix}']:.3f}", f"{metrics[f'reach_delta_acc{suffix}']:.3f}"))
    if "baseline_raw_acc" in metrics:
        rows.append(("raw rates (baseline)", f"{metrics['baseline_raw_acc']:.3f}", f"{metrics['baseline_raw_delta_acc']:.3f}"))
    w = max(len(r[0]) for r in rows)
    lines = [f"{a:<{w}}  {b:>6}  {c:>9}" for a, b, c in rows]
    lines.append(f"test bins scored: {metrics.get('n_test_bins', '?')}, training time: {metrics.get('train_seconds', float('nan')):.1f} s")
    return "\n".join(lines)


def train_command(args) -> int:
    config = SwapVAEConfig.from_file(args.config) if args.config else SwapVAEConfig()
    raw = config.model_dump(exclude_unset=True)
    if args.variant:
        raw = {**{k: v for k, v in raw.items() if k in ("seed", "device", "data", "readout", "optim")}, "variant": args.variant}
    if args.seed is not None:
        raw["seed"] = args.seed
    if args.device:
        raw["device"] = args.device
    if args.epochs:
        raw["optim"] = {**raw.get("optim", {}), "epochs": args.epochs}
    config = SwapVAEConfig.model_validate(raw)
    metrics = train_run(args.data, args.out, config, progress=not args.quiet)
    print(format_table(metrics))
    print(f"run written to {args.out}")
    return 0


def evaluate_command(args) -> int:
    metrics = evaluate_run(args.run_dir, args.data)
    print(json.dumps(metrics) if args.json else format_table(metrics))
    return 0
