"""Where sessions come in for training: ``load_session`` reads or builds one by name (a .npz,
an NWB file through ``training.nwb``, the simulated or the synthetic session), and
``jitter_pairs`` enumerates the in-trial view pairs Swap-VAE trains on.

The session type, its validation, the .npz format and the paper's split are
``schemas.session`` (numpy only, so the runtime's replay reads recordings too).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from swapvae.schemas.session import DataError, Session, read_npz

SOURCES = ".npz recording, .nwb recording, 'simulated' (the built-in session) or 'synthetic[:SEED[:SEQUENCES]]'"
# How to read an NWB file (training.nwb); a run directory records the ones it was given.
NWB_OPTIONS = ("bin_size_s", "target_column", "velocity_series")


def load_session(path: str | Path, min_trials: int = 4, seed: int = 0, *, bin_size_s: float | None = None,
                 target_column: str | None = None, velocity_series: str | None = None) -> Session:
    """Load ``path``: a .npz recording (docs/DATA.md), an NWB file (``training.nwb``: bins of
    ``bin_size_s``, 0.1 s unless given, and the labels from the trials column
    ``target_column`` and the time series ``velocity_series`` when given), the built-in
    simulated session (``"simulated"``), or the paper's synthetic dataset
    (``"synthetic[:SEED[:SEQUENCES]]"``, SEQUENCES per cluster)."""
    nwb = {k: v for k, v in zip(NWB_OPTIONS, (bin_size_s, target_column, velocity_series)) if v is not None}
    if nwb and Path(str(path)).suffix != ".nwb":
        raise DataError(f"{path}: {', '.join(sorted(nwb))} set how an NWB file is read; this is not one")
    if str(path) == "simulated":
        from swapvae.training.simulate import simulate_reaching

        return simulate_reaching(seed=seed)
    if str(path).split(":")[0] == "synthetic":
        from swapvae.training.synthetic import make_synthetic

        parts = str(path).split(":")[1:]
        if len(parts) > 2 or not all(p.isdigit() for p in parts):
            raise DataError(f"{path}: expected synthetic[:SEED[:SEQUENCES]] with integers")
        seed_, *n = [int(p) for p in parts] or [seed]
        return make_synthetic(*n, seed=seed_).session
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".nwb":
        from swapvae.training.nwb import read_nwb

        return read_nwb(path, min_trials=min_trials, **nwb)
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
