"""Where sessions come in for training: ``load_session`` reads or builds one by name, and
``jitter_pairs`` enumerates the in-trial view pairs Swap-VAE trains on.

The session type, its validation, the .npz format and the paper's split are
``schemas.session`` (numpy only, so the runtime's replay reads recordings too).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from schemas.session import DataError, Session, read_npz

SOURCES = ".npz recording, 'simulated' (the built-in session) or 'synthetic[:SEED[:SEQUENCES]]'"


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
        raise DataError(f"{path}: unsupported format {path.suffix!r}; expected a {SOURCES}")
    return read_npz(path, min_trials)


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
