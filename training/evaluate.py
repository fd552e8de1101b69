"""Reach-direction readout on a frozen representation, scored as in the paper's Table 1.

Honest protocol: the readout is fitted on training bins only, its regularisation is chosen
by cross-validation grouped by training trial, and the model scored is the final one.

The readout is linear: 8-class logistic regression on the scaled representation. Its
angle is that of the probability-weighted class unit vectors, so a confident wrong class is
penalised like a regression error and a split decision lands between two sectors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from threadpoolctl import threadpool_limits

from runtime.reach import angle_from_proba, class_angles, reach_scores
from schemas import ReadoutConfig
from schemas.session import Session, Split

@dataclass
class Readout:
    """A scale -> linear -> softmax readout, in plain arrays so it exports anywhere."""
    mean: np.ndarray  # (k,)
    scale: np.ndarray  # (k,)
    coef: np.ndarray  # (n_classes, k)
    intercept: np.ndarray  # (n_classes,)
    class_angles: np.ndarray  # (n_classes,) radians
    C: float

    def proba(self, z: np.ndarray) -> np.ndarray:
        logits = ((z - self.mean) / self.scale) @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def angle(self, z: np.ndarray) -> np.ndarray:
        return angle_from_proba(self.proba(z), self.class_angles)

    def to_json(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, d: dict) -> "Readout":
        return cls(**{k: (np.asarray(v, dtype=np.float64) if isinstance(v, list) else v) for k, v in d.items()})


def _fit(z: np.ndarray, target: np.ndarray, C: float, cfg: ReadoutConfig) -> Readout:
    mean = z.mean(axis=0)
    scale = z.std(axis=0) if cfg.scaling == "feature" else np.full(z.shape[1], z.std())
    scale = np.where(scale > 0, scale, 1.0)
    clf = LogisticRegression(C=C, max_iter=5000).fit((z - mean) / scale, target)
    return Readout(mean, scale, clf.coef_, clf.intercept_, class_angles(clf.classes_, cfg.n_directions), C)


@threadpool_limits.wrap(limits=1)  # these fits are small: BLAS threads only add wake-ups, and spin badly on a busy CPU
def fit_readout(z: np.ndarray, target: np.ndarray, groups: np.ndarray, cfg: ReadoutConfig) -> Readout:
    """Choose C by grouped CV on these training bins (maximising acc + delta-acc), refit on all."""
    folds = list(GroupKFold(n_splits=min(cfg.cv_folds, len(np.unique(groups)))).split(z, target, groups))
    best, best_score = cfg.C_grid[0], -1.0
    for C in cfg.C_grid:
        pred = np.empty(len(z))
        for tr, va in folds:
            pred[va] = _fit(z[tr], target[tr], C, cfg).angle(z[va])
        score = sum(reach_scores(pred, target, cfg.n_directions))
        if score > best_score:
            best, best_score = C, score
    return _fit(z, target, best, cfg)


def moving(session: Session, cfg: ReadoutConfig) -> np.ndarray:
    return session.speed > cfg.speed_threshold


def readout_scores(z_train, z_test, split: Split, cfg: ReadoutConfig) -> tuple[Readout, float, float]:
    tr, te = moving(split.train, cfg), moving(split.test, cfg)
    readout = fit_readout(z_train[tr], split.train.target[tr], split.train.trial[tr], cfg)
    acc, dacc = reach_scores(readout.angle(z_test[te]), split.test.target[te], cfg.n_directions)
    return readout, acc, dacc


def evaluate_reach(estimator, split: Split, cfg: ReadoutConfig) -> tuple[dict[str, float], Readout]:
    """acc / delta-acc of the full, content and style spaces; returns the full-space readout."""
    metrics: dict[str, float] = {}
    full_readout = None
    spaces = ("full", "content", "style") if estimator.config.model.content_dim else ("full",)
    for space in spaces:
        readout, acc, dacc = readout_scores(estimator.transform(split.train.counts, space),
                                            estimator.transform(split.test.counts, space), split, cfg)
        suffix = "" if space == "full" else f"_{space}"
        metrics[f"reach_acc{suffix}"], metrics[f"reach_delta_acc{suffix}"] = acc, dacc
        if space == "full":
            full_readout = readout
            metrics["readout_C"] = readout.C
    metrics["n_test_bins"] = int(moving(split.test, cfg).sum())
    return metrics, full_readout


def raw_rate_baseline(split: Split, neurons: np.ndarray, cfg: ReadoutConfig) -> dict[str, float]:
    """The same readout on standardized raw rates of the kept neurons: the bar to beat."""
    to_rates = lambda s: s.counts[:, neurons] / s.bin_size_s  # noqa: E731
    cfg = cfg.model_copy(update={"scaling": "feature"})
    _, acc, dacc = readout_scores(to_rates(split.train), to_rates(split.test), split, cfg)
    return {"reach_acc": acc, "reach_delta_acc": dacc}
