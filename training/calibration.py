"""A new day's readout, from few labels or none (``swapvae calibrate``).

    N > 0         the product readout fitted on the new session's first N training trials
    N = 0         the reference readout: the product readout fitted on the reference sessions'
                  labelled training bins (``reference_rows``), applied to the new session's
                  latents as they come out of the core they share

Two ways of lending the reference sessions' labels to N > 0 lost on validation splits of the
development pair and were not kept (docs/RECIPE.md): pooling their labelled bins with the N
trials, and pulling the labelled bins' contents towards the reference's class means during
calibration. A shared core does not make the new session's latents line up with the
reference's. The reference rows are the reference sessions' latents through their own
read-ins, which a frozen core leaves valid; with a fine-tuned core they are stale, so N = 0 is
refused then.
"""
from __future__ import annotations

from swapvae.schemas import SwapVAEConfig
from swapvae.schemas.session import Session
from swapvae.training.readout import Labelled, ReadoutFit, first_trials, fit_readout_on, labelled


def reference_rows(views: list, trains: list[Session], cfg: SwapVAEConfig) -> Labelled:
    """The labelled training bins of sessions of a shared model (``views[i]``, a session's
    estimator, and ``trains[i]`` its training split), as latents in the shared space, pooled."""
    if len(trains) != len(views):
        raise ValueError(f"{len(trains)} training splits for {len(views)} sessions")
    return Labelled.concat([labelled(view.transform, train, view.neurons_, cfg.readout, cfg.seed + i)
                            for i, (view, train) in enumerate(zip(views, trains))])


def calibrated_readout(new, train: Session, n: int | None, reference: Labelled | None,
                       cfg: SwapVAEConfig) -> ReadoutFit:
    """The readout of a calibrated session ``new`` (``SwapVAE.calibrate``'s) from its training
    split ``train``: its first ``n`` trials' labels (None: all), or with ``n == 0`` the
    ``reference`` sessions' readout (the module doc)."""
    if n != 0:
        return fit_readout_on(labelled(new.transform, first_trials(train, n), new.neurons_, cfg.readout, cfg.seed),
                              cfg.readout)
    if reference is None:
        raise ValueError("a readout without labels (N = 0) needs the reference sessions' labelled bins "
                         "(reference.npz of a run trained with --shared on labelled sessions)")
    if cfg.calibrate.core_lr > 0:
        raise ValueError("with a fine-tuned core (calibrate.core_lr > 0) the reference sessions' latents no longer "
                         "hold: a readout without labels (N = 0) is refused")
    return fit_readout_on(reference, cfg.readout)
