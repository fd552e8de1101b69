"""The product readout: what it holds, and how it is fitted on a frozen representation by the
honest protocol (chosen by grouped CV on the training trials only).

The readout decodes each bin from a causal window of the last ``k`` per-bin latents of its
trial (``swapvae.runtime.history.causal_windows``): reach direction by 8-class logistic
regression (angle = that of the probability-weighted class vectors, ``swapvae.runtime.reach``)
and hand velocity by ridge regression. ``k`` and the direction's C are chosen together by
cross-validation grouped by training trial (acc + delta-acc on moving bins), the velocity's
alpha by the same folds (mean R^2 over all bins). The paper's Table 1 protocol is the same
readout with ``k = 1``. Both heads are stored as affine maps of the raw window, so they export
as plain Gemms. Scoring is ``swapvae.training.evaluate``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from threadpoolctl import threadpool_limits

from swapvae.runtime.history import causal_windows
from swapvae.runtime.reach import angle_from_proba, class_angles, r2_scores, reach_scores
from swapvae.schemas import ReadoutConfig
from swapvae.schemas.session import Session

_ARRAYS = ("coef", "intercept", "class_angles", "velocity_coef", "velocity_intercept")


@dataclass
class Readout:
    """Direction and velocity from the window [z_t, ..., z_{t-k+1}] (``k * d`` values):
    logits = window @ coef.T + intercept, velocity = window @ velocity_coef.T + velocity_intercept."""
    history_bins: int
    coef: np.ndarray  # (n_classes, k * d)
    intercept: np.ndarray  # (n_classes,)
    class_angles: np.ndarray  # (n_classes,) radians
    velocity_coef: np.ndarray  # (2, k * d); (0, k * d) without a velocity head
    velocity_intercept: np.ndarray  # (2,) or (0,)
    C: float
    alpha: float | None = None

    def windows(self, z: np.ndarray, trial: np.ndarray) -> np.ndarray:
        return causal_windows(z, trial, self.history_bins)

    def proba(self, window: np.ndarray) -> np.ndarray:
        logits = window @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def angle(self, window: np.ndarray) -> np.ndarray:
        return angle_from_proba(self.proba(window), self.class_angles)

    def velocity(self, window: np.ndarray) -> np.ndarray:
        return window @ self.velocity_coef.T + self.velocity_intercept

    def to_json(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, d: dict) -> Readout:
        return cls(**{k: (np.asarray(v, dtype=np.float64) if k in _ARRAYS else v) for k, v in d.items()})


# -- fitting ------------------------------------------------------------------------------------
def _standardizer(x: np.ndarray, scaling: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale): "feature" standardises each column, "global" divides all by one std
    (keeping the geometry a model learned: near-prior style dimensions stay small)."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0) if scaling == "feature" else np.full(x.shape[1], x.std())
    return mean, np.where(scale > 0, scale, 1.0)


def _cv_direction(x: np.ndarray, target: np.ndarray, folds, cfg: ReadoutConfig,
                  scored: np.ndarray | None = None) -> dict[float, float]:
    """acc + delta-acc of each C on the held-out folds (only the ``scored`` rows of them: the
    clean bins when silenced copies pad the training rows)."""
    scored = np.ones(len(x), bool) if scored is None else scored
    pred = {C: np.empty(len(x)) for C in cfg.C_grid}
    for tr, va in folds:
        va = va[scored[va]]
        mean, scale = _standardizer(x[tr], cfg.scaling)
        xtr, xva = (x[tr] - mean) / scale, (x[va] - mean) / scale
        # each C starts where the last one ended; a loose tolerance is enough to rank them
        clf = LogisticRegression(max_iter=5000, tol=1e-3, warm_start=True)
        for C in sorted(cfg.C_grid):
            clf.set_params(C=C).fit(xtr, target[tr])
            pred[C][va] = angle_from_proba(clf.predict_proba(xva), class_angles(clf.classes_, cfg.n_directions))
    return {C: sum(reach_scores(p[scored], target[scored], cfg.n_directions)) for C, p in pred.items()}


def _fit_direction(x: np.ndarray, target: np.ndarray, C: float, cfg: ReadoutConfig):
    """(coef, intercept, class angles) of the logistic regression on standardised ``x``,
    folded into an affine map of ``x`` itself."""
    mean, scale = _standardizer(x, cfg.scaling)
    clf = LogisticRegression(C=C, max_iter=5000).fit((x - mean) / scale, target)
    coef = clf.coef_ / scale
    return coef, clf.intercept_ - coef @ mean, class_angles(clf.classes_, cfg.n_directions)


def _ridge_path(x: np.ndarray, y: np.ndarray, alphas, scaling: str):
    """Ridge solutions for every alpha from one decomposition, as affine maps of ``x``:
    [(coef, intercept)]. With more bins than features (the usual case) from the eigenvectors of
    the features' Gram matrix in float64, V (L + a)^-1 V' Z'y: one pass over the bins (n p^2)
    instead of an SVD of the bins (several times that: at 20 000 bins x 256 neurons x 5 lags it was
    over half of the raw-rate baseline's time); the SVD's otherwise. Both in float64."""
    mean, scale = _standardizer(x, scaling)
    z = ((x - mean) / scale).astype(np.float64, copy=False)
    y_mean = y.mean(axis=0)
    yc = y - y_mean
    if z.shape[0] >= z.shape[1]:
        lam, v = np.linalg.eigh(z.T @ z)  # Z'Z = V L V'
        lam, vty = np.clip(lam, 0.0, None), v.T @ (z.T @ yc)
    else:
        u, s, vt = np.linalg.svd(z, full_matrices=False)  # Z = U S V': L = S^2, V'Z'y = S U'y
        lam, v, vty = s * s, vt.T, s[:, None] * (u.T @ yc)
    out = []
    for a in alphas:
        coef = (v @ (vty / (lam + a)[:, None])).T / scale  # (outputs, features)
        out.append((coef, y_mean - coef @ mean))
    return out


def _cv_velocity(x: np.ndarray, velocity: np.ndarray, folds, cfg: ReadoutConfig) -> dict[float, float]:
    """Mean R^2 over components of each alpha on the held-out folds."""
    pred = {a: np.empty_like(velocity, dtype=np.float64) for a in cfg.alpha_grid}
    for tr, va in folds:
        for a, (coef, b) in zip(cfg.alpha_grid, _ridge_path(x[tr], velocity[tr], cfg.alpha_grid, cfg.scaling)):
            pred[a][va] = x[va] @ coef.T + b
    return {a: float(np.nanmean(r2_scores(p, velocity))) for a, p in pred.items()}


def _folds(groups: np.ndarray, cfg: ReadoutConfig) -> list:
    return list(GroupKFold(n_splits=min(cfg.cv_folds, len(np.unique(groups)))).split(groups, groups=groups))


def silenced_copies(train: Session, neurons: np.ndarray, cfg: ReadoutConfig, seed: int) -> list[np.ndarray]:
    """``cfg.silenced_copies`` copies of the training counts in which each trial has a random
    share U(0, ``cfg.silenced_max``) of the kept channels zeroed: extra rows that teach the
    direction readout not to lean on a few channels (a failed electrode reads zero)."""
    rng = np.random.default_rng([seed, 2000])
    copies = []
    for _ in range(cfg.silenced_copies):
        c = np.array(train.counts, copy=True)
        for t in np.unique(train.trial):
            off = rng.choice(neurons, int(rng.uniform(0, cfg.silenced_max) * len(neurons)), replace=False)
            c[np.ix_(np.flatnonzero(train.trial == t), off)] = 0
        copies.append(c)
    return copies


@dataclass
class ReadoutFit:
    readout: Readout
    cv: dict[tuple[int, float], float]  # (k, C) -> acc + delta-acc on the held-out folds
    per_bin: Readout  # the paper's protocol: k = 1, C by the same CV, no silenced copies
    history_direction: int  # the window each head chose; the readout's is the longer one
    history_velocity: int


def _pad_lags(coef: np.ndarray, k: int, width: int) -> np.ndarray:
    """A head fitted on a k-bin window as weights of a longer window: zero on the older lags."""
    return np.pad(coef, ((0, 0), (0, width - coef.shape[1]))) if coef.shape[1] < width else coef


@dataclass
class Labelled:
    """What a readout is fitted on: the per-bin latents of labelled training bins (and of their
    silenced copies), in time order, with their trials and labels. ``concat`` pools sessions'
    (in a latent space they share), their trials kept apart."""
    z: np.ndarray  # (n, d)
    copies: list[np.ndarray]  # each (n, d)
    trial: np.ndarray
    target: np.ndarray
    velocity: np.ndarray
    moving: np.ndarray  # bins scored for direction (hand speed above the threshold)

    @classmethod
    def concat(cls, parts: list[Labelled]) -> Labelled:
        shift, trials = 0, []
        for p in parts:  # each session's trials after the last one's: distinct ids, still in order
            trials.append(p.trial - p.trial.min() + shift)
            shift = int(trials[-1].max()) + 1
        cat = lambda f: np.concatenate([getattr(p, f) for p in parts])  # noqa: E731
        n_copies = min(len(p.copies) for p in parts)
        return cls(cat("z"), [np.concatenate([p.copies[i] for p in parts]) for i in range(n_copies)],
                   np.concatenate(trials), cat("target"), cat("velocity"), cat("moving"))


def first_trials(session: Session, n: int | None) -> Session:
    """The bins of the first ``n`` trials (a new day's calibration block); all for None."""
    if n is None:
        return session
    if n < 2:
        raise ValueError(f"a readout fitted on {n} labelled trial(s): it needs at least 2 (cross-validation groups "
                         f"by trial); with none, use the reference sessions' readout")
    return session.select_bins(np.isin(session.trial, session.trials[:n]))


def labelled(represent, train: Session, neurons: np.ndarray, cfg: ReadoutConfig, seed: int = 0) -> Labelled:
    """The latents ``represent(counts) -> (bins, d)`` of ``train`` and of its silenced copies."""
    return Labelled(represent(train.counts), [represent(c) for c in silenced_copies(train, neurons, cfg, seed)],
                    train.trial, train.target, train.velocity, train.speed > cfg.speed_threshold)


def fit_readout(represent, train: Session, neurons: np.ndarray, cfg: ReadoutConfig, seed: int = 0,
                history_grid: tuple[int, ...] | None = None) -> ReadoutFit:
    """The product readout of the representation ``represent(counts) -> (bins, d)`` of the
    training bins (in order; the first ``cfg.labelled_trials`` trials when set)."""
    train = first_trials(train, cfg.labelled_trials)
    return fit_readout_on(labelled(represent, train, neurons, cfg, seed), cfg, history_grid)


@threadpool_limits.wrap(limits=1)  # these fits are small: BLAS threads only add wake-ups, and spin badly on a busy CPU
def fit_readout_on(rows: Labelled, cfg: ReadoutConfig, history_grid: tuple[int, ...] | None = None) -> ReadoutFit:
    """The product readout fitted on ``rows``. Direction: (k, C) by grouped CV on the moving
    bins, the training rows padded with the silenced copies (a trial's copies in its fold, only
    clean bins scored). Velocity: (k, alpha) by the same kind of CV on all clean bins. The
    readout's window is the longer of the two k; the other head gets zero weights on the older
    lags."""
    grid = tuple(sorted(history_grid or cfg.history_grid))
    z, copies, moving = rows.z, rows.copies, rows.moving
    train = rows  # trial, velocity: as a session's
    target, groups = rows.target[moving], rows.trial[moving]
    n_views = 1 + len(copies)
    rows_target, rows_groups = np.tile(target, n_views), np.tile(groups, n_views)
    clean = np.r_[np.ones(len(target), bool), np.zeros(len(copies) * len(target), bool)]
    dir_folds, vel_folds = _folds(rows_groups, cfg), _folds(train.trial, cfg)
    windows = {k: causal_windows(z, train.trial, k) for k in sorted({1, *grid})}

    rows = {k: np.concatenate([windows[k][moving], *(causal_windows(c, train.trial, k)[moving] for c in copies)])
            for k in grid}  # the direction head's training rows: clean bins, then each silenced copy

    # ties: the shorter window, then the stronger penalty
    cv = {(k, C): v for k in grid for C, v in _cv_direction(rows[k], rows_target, dir_folds, cfg, clean).items()}
    k_dir, C = max(cv, key=lambda kc: (cv[kc], -kc[0], -kc[1]))
    vcv = {(k, a): v for k in grid for a, v in _cv_velocity(windows[k], train.velocity, vel_folds, cfg).items()}
    k_vel, alpha = max(vcv, key=lambda ka: (vcv[ka], -ka[0], ka[1]))
    k = max(k_dir, k_vel)
    width = windows[1].shape[1] * k
    coef, b, angles = _fit_direction(rows[k_dir], rows_target, C, cfg)
    ((vcoef, vb),) = _ridge_path(windows[k_vel], train.velocity, (alpha,), cfg.scaling)
    readout = Readout(k, _pad_lags(coef, k_dir, width), b, angles, _pad_lags(vcoef, k_vel, width), vb, C, alpha)

    cv1 = _cv_direction(windows[1][moving], target, _folds(groups, cfg), cfg)  # the paper's per-bin protocol
    C1 = max(cv1, key=lambda c: (cv1[c], -c))
    v1 = _cv_velocity(windows[1], train.velocity, vel_folds, cfg)
    a1 = max(v1, key=lambda a: (v1[a], a))
    coef1, b1, angles1 = _fit_direction(windows[1][moving], target, C1, cfg)
    ((vcoef1, vb1),) = _ridge_path(windows[1], train.velocity, (a1,), cfg.scaling)
    per_bin = Readout(1, coef1, b1, angles1, vcoef1, vb1, C1, a1)
    return ReadoutFit(readout, cv, per_bin, k_dir, k_vel)


@threadpool_limits.wrap(limits=1)
def fit_classifier(x: np.ndarray, target: np.ndarray, groups: np.ndarray, cfg: ReadoutConfig) -> Readout:
    """A per-bin direction readout (no history, no velocity) on features ``x``, C by grouped
    CV: the paper's readouts of single spaces and of time in trial."""
    cv = _cv_direction(x, target, _folds(groups, cfg), cfg)
    C = max(cv, key=lambda c: (cv[c], -c))
    coef, b, angles = _fit_direction(x, target, C, cfg)
    return Readout(1, coef, b, angles, np.zeros((0, x.shape[1])), np.zeros(0), C)
