"""Generating new neural activity with a trained Swap-VAE, and the paper's use of it.

A sample takes its content c from a real bin of the wanted direction and its style s from
the prior N(0, I) or from another bin (its posterior mean), and decodes [c, s] to firing
rates; the counts are Poisson draws from those rates. Because content carries the direction
and style the rest, each sample is a new bin of that direction.

``generated_training_set`` builds the labelled samples that the paper mixes into the
training set of a supervised classifier (``training.supervised.SupervisedDecoder(augment=)``).
"""
from __future__ import annotations

from typing import Literal

import numpy as np

Style = Literal["prior", "bins"]


def encode(estimator, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(content c, style mean mu) of raw count vectors."""
    c, mu, _ = estimator.encode(counts)
    return c, mu


def decode_counts(estimator, c: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Firing rates in spikes per bin over the kept neurons for latents [c, s]."""
    return estimator.decode(np.concatenate([c, s], axis=1)) / estimator.input_scale


def generate(estimator, content_counts: np.ndarray, n: int, rng: np.random.Generator, *, style: Style = "prior",
             style_counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` new bins whose content comes from random rows of ``content_counts`` (bins of one
    direction) and whose style is drawn from the prior or taken from random rows of
    ``style_counts``. Returns (Poisson counts, rates), both over the kept neurons."""
    if estimator.config_.model.content_dim == 0:
        raise ValueError("this model has no content block to condition on (a VAE variant)")
    c, _ = encode(estimator, content_counts)
    c = c[rng.integers(len(c), size=n)]
    if style == "prior":
        s = rng.standard_normal((n, estimator.config_.model.style_dim))
    elif style == "bins":
        if style_counts is None:
            raise ValueError("style='bins' needs style_counts")
        _, mu = encode(estimator, style_counts)
        s = mu[rng.integers(len(mu), size=n)]
    else:
        raise ValueError(f"style must be 'prior' or 'bins', got {style!r}")
    rates = decode_counts(estimator, c, s.astype(np.float32))
    return rng.poisson(rates).astype(np.float32), rates


def generated_training_set(estimator, counts: np.ndarray, target: np.ndarray, fraction: float,
                           rng: np.random.Generator, style: Style = "prior") -> tuple[np.ndarray, np.ndarray]:
    """``round(fraction * len(counts))`` labelled samples, as many per direction as that
    direction has among ``counts`` (so class balance is kept); content from those bins, style
    from the prior or from bins of any direction among ``counts``."""
    counts, target = np.asarray(counts), np.asarray(target)
    n_total = int(round(fraction * len(counts)))
    if n_total == 0:
        return np.zeros((0, len(estimator.neurons_)), np.float32), np.zeros(0, dtype=target.dtype)
    directions, per = np.unique(target, return_counts=True)
    quota = np.floor(per / per.sum() * n_total).astype(int)
    quota[np.argsort(-(per / per.sum() * n_total - quota))[: n_total - quota.sum()]] += 1  # largest remainders
    xs, ys = [], []
    for d, n in zip(directions, quota):
        if n:
            x, _ = generate(estimator, counts[target == d], int(n), rng, style=style, style_counts=counts)
            xs.append(x)
            ys.append(np.full(n, d, dtype=target.dtype))
    return np.concatenate(xs), np.concatenate(ys)
