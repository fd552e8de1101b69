"""Lost channels: how a fitted decoder holds up when electrodes fail during a session.

A failed electrode reads zero for the rest of the session, so a draw silences a random share
of the kept channels (the same ones in every test bin); the model and its readout stay as
they were fitted on intact training bins. Draws are seeded, so every representation scored
in one run meets the same failures.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from swapvae.schemas import ReadoutConfig
from swapvae.schemas.session import Split
from swapvae.training.evaluate import score
from swapvae.training.readout import Readout

FRACTIONS = (0.1, 0.2, 0.4)


def silenced(counts: np.ndarray, neurons: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``counts`` with ``round(fraction * len(neurons))`` of the kept channels zeroed."""
    out = np.array(counts, copy=True)
    out[:, rng.choice(neurons, size=int(round(fraction * len(neurons))), replace=False)] = 0
    return out


def lost_channel_scores(represent: Callable[[np.ndarray], np.ndarray], readout: Readout, split: Split,
                        neurons: np.ndarray, cfg: ReadoutConfig, fractions=FRACTIONS, draws: int = 5,
                        seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """Scores of ``readout`` on ``represent(test counts)`` with channels silenced: for each
    fraction (and 0, intact), reach_acc, reach_delta_acc and velocity_r2 of every draw."""
    out = {}
    for fraction in (0.0, *fractions):
        runs = []
        for draw in range(draws if fraction else 1):
            rng = np.random.default_rng([seed, int(round(fraction * 1000)), draw])
            counts = silenced(split.test.counts, neurons, fraction, rng) if fraction else split.test.counts
            runs.append(score(readout, represent(counts), split.test, cfg))
        out[f"{fraction:g}"] = {k: [r[k] for r in runs] for k in ("reach_acc", "reach_delta_acc", "velocity_r2")}
    return out
