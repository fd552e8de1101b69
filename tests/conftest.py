"""Shared fixtures: one tiny trained run and its exported bundle, built once per session.

The model is small and trained for a few epochs so the whole suite stays fast on two cores;
tests that need a realistic size build their own.
"""
from __future__ import annotations

from pathlib import Path

import pytest

# Chewie-1 (tests that need it skip where it is missing). The shared data lie beside the checkout
# (a worktree sits a level deeper): the nearest shared/ up.
_CHEWIE = "shared/data/reaching/chewie-2013-10-03.npz"
CHEWIE = next((p / _CHEWIE for p in Path(__file__).resolve().parents if (p / _CHEWIE).exists()),
              Path(__file__).resolve().parents[2] / _CHEWIE)


TINY_CONFIG = {
    "seed": 0,
    "device": "cpu",
    "model": {"content_dim": 8, "style_dim": 8, "hidden": ["d", 32]},
    "optim": {"epochs": 3, "batch_size": 128, "checkpoint_every": 3},
    "readout": {"C_grid": [0.1], "cv_folds": 2, "history_grid": [3]},  # k = 3: the history path is exercised
}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run directory trained on the simulated session (checkpoint, readout, metrics)."""
    from swapvae.schemas.config import SwapVAEConfig
    from swapvae.training.run import train_run

    out = tmp_path_factory.mktemp("tiny_run")
    train_run("simulated", out, SwapVAEConfig.model_validate(TINY_CONFIG), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory):
    """``tiny_run`` exported to an ONNX bundle directory (verified by the export itself)."""
    from swapvae.training.export import export_bundle

    out = tmp_path_factory.mktemp("tiny_bundle")
    export_bundle(tiny_run, out)
    return out
