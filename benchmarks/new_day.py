"""A decoder for the next day: a new session decoded from few labelled trials, or none, every
model in the same run and under the same readout rules (issue 24).

    python benchmarks/new_day.py                              # both directions, 3 seeds, test trials
    python benchmarks/new_day.py --validation --set '{"calibrate": {"epochs": 900}}'

For a pair REF:NEW (Chewie-1 and Mihi-1 both ways), each seed, and each N of labelled trials
(the first N of the new session's training trials; "all": every one):

    calibrated   the product: a Swap-VAE core trained with a shared core on REF's training
                 trials (``swapvae train --shared``), NEW calibrated onto it (``calibrate``: a
                 new read-in and read-out on NEW's unlabelled training bins, the core frozen),
                 its readout from the N trials (``training.calibration``; N = 0: REF's readout)
    own SSL      Swap-VAE trained on NEW's training bins alone, without labels; readout on the
                 N trials (at N = all: the full single-session product, the ceiling)
    raw rates    the same readout on NEW's raw rates (N = 0: nothing to fit)
    aligned      REF's own fixed decoder on NEW's latents (its own-SSL model) aligned to REF's
                 (Gallego et al. 2020): an orthogonal Procrustes map between the two sessions'
                 condition-averaged latents (direction x time in trial) of the N trials; at
                 N = 0, without labels, PCA axes matched in order of variance, signs by skew
    CEBRA multi  CEBRA's multi-session model (``cebra``, the [bench] extra) on REF's training
                 bins and NEW's N labelled trials, aligned through the auxiliary variable (the
                 reach direction as cos, sin); the same readout on NEW's N trials (N = 0: none)

Scored on NEW's test trials (acc / delta-acc on moving bins, velocity R^2 on all), or with
``--validation`` on the last 20% of NEW's training trials, the models and readouts seeing only
the first 80%: where the recipe's choices are made (docs/RECIPE.md). Trained models are kept in
``--workdir`` and reused. Prints a table per pair and writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import CHEWIE, cpu_name, write_result  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from swapvae.schemas import SwapVAEConfig
from swapvae.schemas.session import Session, split_session
from swapvae.training.calibration import calibrated_readout, reference_rows
from swapvae.training.data import load_session
from swapvae.training.estimator import SwapVAE
from swapvae.training.evaluate import score
from swapvae.training.readout import first_trials, fit_readout_on, labelled

MIHI = CHEWIE.parent / "mihi-2014-03-03-moving.npz"
SESSIONS = {"chewie": CHEWIE, "mihi": MIHI}
MODELS = ("calibrated", "own SSL", "raw rates", "aligned", "CEBRA multi")
KEYS = ("reach_acc", "reach_delta_acc", "velocity_r2")
CEBRA_SETTINGS = {"model_architecture": "offset1-model", "output_dimension": 32, "num_hidden_units": 128,
                  "batch_size": 256, "learning_rate": 3e-4, "temperature_mode": "auto", "temperature": 1.0,
                  "distance": "cosine", "conditional": "time_delta"}


def merge(raw: dict, over: dict) -> dict:
    return {**raw, **{k: merge(raw.get(k, {}), v) if isinstance(v, dict) else v for k, v in over.items()}}


class Models:
    """Trained models kept in a work directory, keyed by what made them."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)

    def get(self, key: dict, fit) -> SwapVAE:
        path = self.dir / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + ".pt")
        if path.exists():
            return SwapVAE.load(path)
        est = fit()
        est.save(path)
        return est


def splits(name: str, config: SwapVAEConfig, validation: bool):
    """(train, eval, kept neurons) of a session: the test trials, or the last 20% of the
    training trials with the first 80% as train (``validation``)."""
    s = split_session(load_session(SESSIONS[name]), config.data.train_fraction, config.data.static_std)
    if validation:
        s = split_session(s.train, config.data.train_fraction, config.data.static_std)
    return s.train, s.test, s.neurons


def scored(readout, represent, evaluation: Session, config: SwapVAEConfig) -> dict:
    return {k: v for k, v in score(readout, represent(evaluation.counts), evaluation, config.readout).items()
            if k in KEYS}


def condition_means(z: np.ndarray, s: Session, n_dir: int, n_time: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean latent of each (direction, bin in trial) cell present, and which cells those are."""
    cells = s.target * n_time + np.minimum(s.bin_in_trial, n_time - 1)
    present = np.unique(cells)
    return np.stack([z[cells == c].mean(0) for c in present]), present


def procrustes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The orthogonal map R minimising ||a R - b|| (both centred by the caller)."""
    u, _, vt = np.linalg.svd(a.T @ b)
    return u @ vt


def aligned_row(ref: SwapVAE, ref_train: Session, ref_readout, own: SwapVAE, new_part: Session | None,
                new_train: Session, evaluation: Session, config: SwapVAEConfig) -> dict:
    """REF's fixed decoder on NEW's own latents mapped into REF's latent space (module doc)."""
    z_ref, z_new = ref.transform(ref_train.counts), own.transform(new_train.counts)
    mu_ref, mu_new = z_ref.mean(0), z_new.mean(0)
    if new_part is None:  # no labels: principal axes matched by variance, signs by skew
        def axes(z):
            _, _, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
            proj = (z - z.mean(0)) @ vt.T
            return vt * np.sign(((proj ** 3).mean(0)) + 1e-12)[:, None]
        r = axes(z_new).T @ axes(z_ref)
    else:
        n_dir, n_time = config.readout.n_directions, 9
        a, ca = condition_means(own.transform(new_part.counts), new_part, n_dir, n_time)
        b, cb = condition_means(z_ref, ref_train, n_dir, n_time)
        both = np.intersect1d(ca, cb)
        a, b = a[np.isin(ca, both)] - mu_new, b[np.isin(cb, both)] - mu_ref
        r = procrustes(a, b)
    return scored(ref_readout, lambda c: (own.transform(c) - mu_new) @ r + mu_ref, evaluation, config)


def fit_cebra(ref_train: Session, ref_neurons, new_part: Session, new_neurons, seed: int, steps: int):
    import cebra

    torch.manual_seed(seed)
    np.random.seed(seed)
    aux = lambda s: np.stack([np.cos(2 * np.pi * s.target / 8), np.sin(2 * np.pi * s.target / 8)], 1)  # noqa: E731
    model = cebra.CEBRA(**CEBRA_SETTINGS, max_iterations=steps, device="cpu", verbose=False)
    model.fit([ref_train.counts[:, ref_neurons], new_part.counts[:, new_neurons]],
              [aux(ref_train).astype(np.float32), aux(new_part).astype(np.float32)])
    return lambda counts: model.transform(counts[:, new_neurons].astype(np.float32), session_id=1)


def run_pair(ref_name: str, new_name: str, seed: int, ns: list, config: SwapVAEConfig, args, models: Models) -> dict:
    cfg = config.with_overrides(seed=seed)
    ref_train, _, ref_neurons = splits(ref_name, cfg, False)  # the reference day: all its training trials
    new_train, evaluation, new_neurons = splits(new_name, cfg, args.validation)
    key = {"cfg": cfg.model_dump(mode="json", exclude={"calibrate", "readout"}), "ref": ref_name}
    t = time.perf_counter()
    ref = models.get({**key, "kind": "shared"}, lambda: SwapVAE(config=cfg).fit(
        [ref_train.counts], trial=[ref_train.trial], bin_in_trial=[ref_train.bin_in_trial], neurons=[ref_neurons],
        bin_size_s=ref_train.bin_size_s))
    own = models.get({**key, "kind": "own", "new": new_name, "validation": args.validation},
                     lambda: SwapVAE(config=cfg).fit(new_train.counts, trial=new_train.trial,
                                                     bin_in_trial=new_train.bin_in_trial, neurons=new_neurons,
                                                     bin_size_s=new_train.bin_size_s))
    ref.config_ = ref.config_.with_overrides(calibrate=cfg.calibrate.model_dump(), readout=cfg.readout.model_dump())
    reference = reference_rows(ref.sessions_, [ref_train], cfg) if 0 in ns else None
    new = models.get({**key, "kind": "calibrated", "new": new_name, "validation": args.validation,
                      "calibrate": cfg.calibrate.model_dump()},
                     lambda: ref.calibrate(new_train.counts, trial=new_train.trial,
                                           bin_in_trial=new_train.bin_in_trial, neurons=new_neurons))
    trained = time.perf_counter() - t
    ref_view = ref.sessions_[0]
    ref_readout = fit_readout_on(labelled(ref_view.transform, ref_train, ref_neurons, cfg.readout, seed),
                                 cfg.readout).readout
    raw = lambda c: c[:, new_neurons] / new_train.bin_size_s  # noqa: E731
    raw_cfg = cfg.readout.model_copy(update={"scaling": "feature"})
    out = {}
    for n in ns:
        part = None if n == 0 else first_trials(new_train, None if n == "all" else n)
        row = {"calibrated": scored(calibrated_readout(new, new_train, None if n == "all" else n, reference,
                                                       cfg).readout, new.transform, evaluation, cfg)}
        if part is not None and "own SSL" in args.models:
            row["own SSL"] = scored(fit_readout_on(labelled(own.transform, part, new_neurons, cfg.readout, seed),
                                                   cfg.readout).readout, own.transform, evaluation, cfg)
        if part is not None and "raw rates" in args.models:
            rr = fit_readout_on(labelled(raw, part, new_neurons, raw_cfg, seed), raw_cfg).readout
            row["raw rates"] = {k: v for k, v in score(rr, raw(evaluation.counts), evaluation, raw_cfg).items()
                                if k in KEYS}
        if "aligned" in args.models:
            row["aligned"] = aligned_row(ref_view, ref_train, ref_readout, own, part, new_train, evaluation, cfg)
        if "CEBRA multi" in args.models and part is not None:
            emb = fit_cebra(ref_train, ref_neurons, part, new_neurons, seed, args.cebra_steps)
            row["CEBRA multi"] = scored(fit_readout_on(labelled(emb, part, new_neurons, cfg.readout, seed),
                                                       cfg.readout).readout, emb, evaluation, cfg)
        out[str(n)] = row
        print(f"  {ref_name}->{new_name} seed {seed} N={n}: " + ", ".join(
            f"{m} {r['reach_acc']:.3f}" for m, r in row.items()), file=sys.stderr, flush=True)
    out["train_seconds"] = trained
    return out


def summarise(runs: list[dict], ns: list) -> dict:
    out = {}
    for n in map(str, ns):
        out[n] = {}
        for model in MODELS:
            vals = [r[n][model] for r in runs if model in r[n]]
            if vals:
                out[n][model] = {k: {"mean": statistics.mean(v[k] for v in vals),
                                     "std": statistics.pstdev(v[k] for v in vals)} for k in KEYS}
    return out


def print_table(pair: str, summary: dict, n_seeds: int, scored_on: str) -> None:
    print(f"\n{pair}: {n_seeds} seeds, scored on {scored_on}; acc / delta-acc / velocity R^2, mean +- sd")
    print(f"{'N':>4}  " + "".join(f"{m:>27}" for m in MODELS))
    for n, row in summary.items():
        cells = []
        for m in MODELS:
            s = row.get(m)
            cells.append("-" if s is None else f"{s['reach_acc']['mean']:.3f}+-{s['reach_acc']['std']:.3f} "
                         f"{s['reach_delta_acc']['mean']:.2f} {s['velocity_r2']['mean']:.2f}")
        print(f"{n:>4}  " + "".join(f"{c:>27}" for c in cells))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=["chewie:mihi", "mihi:chewie"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--ns", nargs="+", default=["0", "5", "10", "20", "all"])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated rows beside 'calibrated'")
    p.add_argument("--set", default="{}", help="JSON overrides of the config's sections")
    p.add_argument("--validation", action="store_true", help="score on the last 20%% of NEW's training trials")
    p.add_argument("--cebra-steps", type=int, default=3000)
    p.add_argument("--workdir", default="/tmp/new_day_models", help="trained models are kept and reused here")
    p.add_argument("--out", default="results/new_day.json")
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    ns = [n if n == "all" else int(n) for n in args.ns]
    config = SwapVAEConfig.model_validate(merge({"device": "cpu"}, json.loads(args.set)))
    models = Models(Path(args.workdir))
    scored_on = "the last 20% of the new session's training trials (validation)" if args.validation else "test trials"
    result = {"config": config.model_dump(mode="json"), "scored_on": scored_on, "ns": args.ns, "pairs": {},
              "machine": {"cpu": cpu_name()}}
    for pair in args.pairs:
        ref_name, new_name = pair.split(":")
        runs = [run_pair(ref_name, new_name, seed, ns, config, args, models) for seed in range(args.seeds)]
        summary = summarise(runs, ns)
        result["pairs"][pair] = {"runs": runs, "summary": summary}
        print_table(pair, summary, args.seeds, scored_on)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
