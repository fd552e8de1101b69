"""Loading, validating and splitting a binned reaching session: the one place data comes in.

A session is what ../shared/data/reaching/README.md describes: spike counts per 100 ms bin,
the trial and position-in-trial of every bin, the reach target (constant inside a trial)
and the hand velocity. ``load_session("simulated")`` returns the built-in simulated session.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

REQUIRED = ("counts", "trial", "bin_in_trial", "target", "velocity")


class DataError(ValueError):
    """A recording that cannot be used, with a message that names the problem."""


@dataclass(frozen=True)
class Session:
    counts: np.ndarray  # (n_bins, n_neurons) non-negative integer spike counts
    trial: np.ndarray  # (n_bins,) trial id, trials contiguous and in chronological order
    bin_in_trial: np.ndarray  # (n_bins,)
    target: np.ndarray  # (n_bins,) reach direction class, constant inside a trial
    velocity: np.ndarray  # (n_bins, 2) hand velocity
    bin_size_s: float = 0.1
    name: str = "session"

    @property
    def n_bins(self) -> int:
        return self.counts.shape[0]

    @property
    def n_neurons(self) -> int:
        return self.counts.shape[1]

    @property
    def trials(self) -> np.ndarray:
        return np.unique(self.trial)

    @property
    def speed(self) -> np.ndarray:
        return np.linalg.norm(self.velocity, axis=1)

    def select_bins(self, mask: np.ndarray) -> "Session":
        return Session(self.counts[mask], self.trial[mask], self.bin_in_trial[mask], self.target[mask],
                       self.velocity[mask], self.bin_size_s, self.name)


def validate(arrays: dict[str, np.ndarray], name: str, min_trials: int = 4) -> Session:
    """Check a recording's arrays and build a Session; raise DataError naming the problem."""
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise DataError(f"{name}: missing array(s) {missing}; a session needs {list(REQUIRED)}")
    counts = np.asarray(arrays["counts"])
    if counts.ndim != 2 or counts.shape[0] == 0 or counts.shape[1] == 0:
        raise DataError(f"{name}: counts must be a non-empty 2-D (bins, neurons) array, got shape {counts.shape}")
    n = counts.shape[0]
    for key, shape in (("trial", (n,)), ("bin_in_trial", (n,)), ("target", (n,)), ("velocity", (n, 2))):
        if np.shape(arrays[key]) != shape:
            raise DataError(f"{name}: {key} has shape {np.shape(arrays[key])}, expected {shape} "
                            f"to match counts' {n} bins")
    if not np.issubdtype(counts.dtype, np.number) or counts.dtype == np.bool_:
        raise DataError(f"{name}: counts must be numeric, got dtype {counts.dtype}")
    if np.issubdtype(counts.dtype, np.floating):
        bad = ~np.isfinite(counts)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise DataError(f"{name}: counts contain NaN/inf ({int(bad.sum())} entries, first at bin {r}, neuron {c})")
        frac = counts != np.round(counts)
        if frac.any():
            r, c = np.argwhere(frac)[0]
            raise DataError(f"{name}: counts must be integers, found {counts[r, c]} at bin {r}, neuron {c}")
    if (counts < 0).any():
        r, c = np.argwhere(counts < 0)[0]
        raise DataError(f"{name}: counts must be >= 0, found {counts[r, c]} at bin {r}, neuron {c}")
    velocity = np.asarray(arrays["velocity"], dtype=np.float64)
    if not np.isfinite(velocity).all():
        raise DataError(f"{name}: velocity contains NaN/inf at bin {int(np.argwhere(~np.isfinite(velocity))[0, 0])}")
    ints = {}
    for key in ("trial", "bin_in_trial", "target"):
        a = np.asarray(arrays[key])
        if not np.issubdtype(a.dtype, np.integer):
            if not (np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() and (a == np.round(a)).all()):
                raise DataError(f"{name}: {key} must hold integers, got dtype {a.dtype}")
        ints[key] = a.astype(np.int64)
    trial, target = ints["trial"], ints["target"]
    back = np.flatnonzero(np.diff(trial) < 0)
    if back.size:  # the chronological split and the in-trial pairs rely on this order
        raise DataError(f"{name}: trial ids must not decrease along the bins (bins in chronological order, "
                        f"each trial contiguous); trial {trial[back[0]]} is followed by {trial[back[0] + 1]} "
                        f"at bin {back[0] + 1}")
    starts = np.flatnonzero(np.diff(trial) != 0) + 1
    for seg in np.split(np.arange(n), starts):
        if len(np.unique(target[seg])) != 1:
            raise DataError(f"{name}: target changes inside trial {trial[seg[0]]} "
                            f"(values {sorted(set(target[seg].tolist()))})")
    if (target < 0).any():
        raise DataError(f"{name}: target must be a direction class >= 0, found {target.min()}")
    n_trials = len(starts) + 1
    if n_trials < min_trials:
        raise DataError(f"{name}: only {n_trials} trial(s); at least {min_trials} are needed to split train/test")
    bin_size = float(arrays["bin_size_s"]) if "bin_size_s" in arrays else 0.1
    if not (bin_size > 0 and np.isfinite(bin_size)):
        raise DataError(f"{name}: bin_size_s must be a positive number, got {bin_size}")
    return Session(counts.astype(np.float32), trial, ints["bin_in_trial"], target, velocity.astype(np.float32),
                   bin_size, name)


def load_session(path: str | Path, min_trials: int = 4, seed: int = 0) -> Session:
    """Load ``path``: a .npz recording, the built-in simulated session (``"simulated"``), or the
    paper's synthetic dataset (``"synthetic[:SEED[:SEQUENCES]]"``, SEQUENCES per cluster)."""
    if str(path) == "simulated":
        from training.simulate import simulate_reaching

        return simulate_reaching(seed=seed)
    if str(path).split(":")[0] == "synthetic":
        from training.synthetic import make_synthetic

        parts = str(path).split(":")[1:]
        if len(parts) > 2 or not all(p.isdigit() for p in parts):
            raise DataError(f"{path}: expected synthetic[:SEED[:SEQUENCES]] with integers")
        seed_, *n = [int(p) for p in parts] or [seed]
        return make_synthetic(*n, seed=seed_).session
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file (use 'simulated' for the built-in session)")
    if path.suffix != ".npz":
        raise DataError(f"{path}: unsupported format {path.suffix!r}; expected a .npz recording")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as e:  # object arrays would need pickle: never for an untrusted file
        raise DataError(f"{path}: cannot read without unpickling ({e})") from None
    except Exception as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    return validate(arrays, path.stem, min_trials)


@dataclass(frozen=True)
class Split:
    train: Session
    test: Session
    neurons: np.ndarray  # recording columns the model keeps (fitted on train); sessions keep all


def split_session(session: Session, train_fraction: float = 0.8, static_std: float = 1e-3) -> Split:
    """The paper's split: first ``train_fraction`` of trials (chronological) train, the rest test;
    neurons whose std over the training bins is <= ``static_std`` are dropped from both."""
    trials = session.trials  # trial ids are chronological
    n_train = int(round(train_fraction * len(trials)))
    if not 0 < n_train < len(trials):
        raise DataError(f"{session.name}: {len(trials)} trials cannot be split {train_fraction:.0%} / rest")
    is_train = np.isin(session.trial, trials[:n_train])
    train, test = session.select_bins(is_train), session.select_bins(~is_train)
    keep = static_filter(train.counts, static_std)
    if keep.size == 0:
        raise DataError(f"{session.name}: every neuron is static over the training bins")
    return Split(train, test, keep)


def static_filter(counts: np.ndarray, static_std: float) -> np.ndarray:
    """Indices of the channels whose std over ``counts`` exceeds ``static_std``."""
    return np.flatnonzero(counts.std(axis=0) > static_std)


def jitter_pairs(trial: np.ndarray, bin_in_trial: np.ndarray, jitter: int) -> np.ndarray:
    """All ordered (i, j) row pairs of the same trial with |bin_i - bin_j| <= jitter (i == j allowed).

    Pairs are enumerated once, as in the released code, and sampled uniformly each step."""
    pairs = []
    for offset in range(-jitter, jitter + 1):
        i = np.arange(max(0, -offset), len(trial) - max(0, offset))
        j = i + offset
        same = (trial[i] == trial[j]) & (np.abs(bin_in_trial[i] - bin_in_trial[j]) <= jitter)
        pairs.append(np.stack([i[same], j[same]], axis=1))
    return np.concatenate(pairs)
