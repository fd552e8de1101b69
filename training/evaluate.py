"""Scoring readouts on a frozen representation, by the honest protocol: fitted on the training
trials (``swapvae.training.readout``), scored on the test trials. Nothing is selected on the
test trials; the model scored is the final one.

Every number is reported beside the same readout on the raw rates of the kept neurons
(per-feature standardised): the bar a representation has to clear.
"""
from __future__ import annotations

import numpy as np

from swapvae.runtime.reach import r2_scores, reach_scores
from swapvae.schemas import ReadoutConfig
from swapvae.schemas.session import Session, Split
from swapvae.training.metrics import bits_per_spike
from swapvae.training.readout import Readout, ReadoutFit, fit_classifier, fit_readout


# -- scoring ------------------------------------------------------------------------------------
def score(readout: Readout, z: np.ndarray, test: Session, cfg: ReadoutConfig) -> dict[str, float]:
    """acc / delta-acc on the moving test bins, velocity R^2 on all test bins."""
    w = readout.windows(z, test.trial)
    moving = test.speed > cfg.speed_threshold
    acc, dacc = reach_scores(readout.angle(w[moving]), test.target[moving], cfg.n_directions)
    r2 = r2_scores(readout.velocity(w), test.velocity)
    return {"reach_acc": acc, "reach_delta_acc": dacc, "velocity_r2": float(r2.mean()),
            "velocity_r2_vx": float(r2[0]), "velocity_r2_vy": float(r2[1])}


def labelled_rows(train: Session, cfg: ReadoutConfig) -> np.ndarray:
    """Which training bins a readout may learn from: those of the first ``cfg.labelled_trials``
    trials (all when None)."""
    if cfg.labelled_trials is None:
        return np.ones(train.n_bins, bool)
    return np.isin(train.trial, train.trials[:cfg.labelled_trials])


def readout_scores(z_train, z_test, split: Split, cfg: ReadoutConfig) -> tuple[Readout, float, float]:
    """The paper's per-bin protocol on one representation: (readout, acc, delta-acc)."""
    tr = (split.train.speed > cfg.speed_threshold) & labelled_rows(split.train, cfg)
    te = split.test.speed > cfg.speed_threshold
    readout = fit_classifier(z_train[tr], split.train.target[tr], split.train.trial[tr], cfg)
    acc, dacc = reach_scores(readout.angle(z_test[te]), split.test.target[te], cfg.n_directions)
    return readout, acc, dacc


def representation_metrics(represent, split: Split, neurons: np.ndarray, cfg: ReadoutConfig,
                           seed: int = 0, fit: ReadoutFit | None = None) -> tuple[dict, ReadoutFit]:
    """The product readout and the per-bin protocol on one representation ``represent(counts)``
    of the train and test bins: reach_acc, reach_delta_acc, velocity_r2* (with history_bins,
    readout_C, velocity_alpha), and the same with the suffix _per_bin. ``fit``: readouts fitted
    elsewhere (a calibrated session's), scored as they are."""
    if fit is None:
        fit = fit_readout(represent, split.train, neurons, cfg, seed)
    r = fit.readout
    z_test = represent(split.test.counts)
    metrics = {**score(r, z_test, split.test, cfg), "history_bins": r.history_bins,
               "history_bins_direction": fit.history_direction, "history_bins_velocity": fit.history_velocity,
               "readout_C": r.C, "velocity_alpha": r.alpha}
    if fit.per_bin is not None:
        metrics.update({f"{k}_per_bin": v for k, v in score(fit.per_bin, z_test, split.test, cfg).items()})
    return metrics, fit


def evaluate(estimator, split: Split, cfg: ReadoutConfig, fit: ReadoutFit | None = None) -> tuple[dict, Readout | None]:
    """metrics.json's numbers and the product readout (None for a session without labels):

    reach_acc, reach_delta_acc, velocity_r2*   the product readout (history_bins, readout_C, velocity_alpha)
    *_per_bin                                  the paper's per-bin protocol (k = 1)
    reach_acc_content / _style                 per-bin readouts of each block (the paper's disentanglement check)
    raw_*                                      the same rules on raw rates (raw_history_bins)
    bits_per_spike                             the test bins' reconstruction (labels not needed)

    Readouts learn from the first ``cfg.labelled_trials`` training trials when it is set (a new
    day's calibration block: ``labelled_trials`` is then in the metrics too); with 0 the product
    readout ``fit`` (the reference sessions', ``training.calibration``) is scored alone."""
    neurons = estimator.neurons_
    rates = estimator.reconstruct(split.test.counts) / estimator.input_scale  # counts per bin
    unlabelled = {"bits_per_spike": bits_per_spike(rates, split.test.counts[:, neurons],
                                                   split.train.counts[:, neurons].mean(axis=0)),
                  "n_test_bins_all": split.test.n_bins}
    if not split.train.has_labels:
        return {"readout": "skipped: the session has no reach labels (target, velocity)", **unlabelled}, None
    n = cfg.labelled_trials
    if n == 0 and fit is None:
        raise ValueError("readout.labelled_trials is 0: no labels to fit a readout on; score the reference readout")
    metrics, fit = representation_metrics(estimator.transform, split, estimator.neurons_, cfg,
                                          estimator.config_.seed, fit)
    if n is not None:
        metrics["labelled_trials"] = n
    if n == 0:  # nothing else can learn without labels
        metrics["n_test_bins"] = int((split.test.speed > cfg.speed_threshold).sum())
        return {**metrics, **unlabelled}, fit.readout
    if estimator.config_.model.content_dim:
        for space in ("content", "style"):
            _, acc, dacc = readout_scores(estimator.transform(split.train.counts, space),
                                          estimator.transform(split.test.counts, space), split, cfg)
            metrics[f"reach_acc_{space}"], metrics[f"reach_delta_acc_{space}"] = acc, dacc
    metrics.update(raw_rate_baseline(split, estimator.neurons_, cfg, estimator.config_.seed)[0])
    metrics["n_test_bins"] = int((split.test.speed > cfg.speed_threshold).sum())
    metrics.update(unlabelled)
    return metrics, fit.readout


def raw_rate_baseline(split: Split, neurons: np.ndarray, cfg: ReadoutConfig, seed: int = 0) -> tuple[dict, ReadoutFit]:
    """The product readout's rules on per-feature standardised raw rates of the kept neurons
    (the velocity head is then the classic Wiener filter: ridge on lagged rates); keys raw_*."""
    cfg = cfg.model_copy(update={"scaling": "feature"})
    metrics, fit = representation_metrics(lambda c: c[:, neurons] / split.train.bin_size_s, split, neurons, cfg, seed)
    return {f"raw_{k}": v for k, v in metrics.items()}, fit
