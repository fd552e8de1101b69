"""The paper's synthetic dataset (section 4.1, after pi-VAE), generated from a seed.

2-D latents from 4 clusters on a circle of radius 5: cluster i draws u in [i pi/2, (i+1) pi/2),
mean (5 sin u, 5 cos u), per-coordinate variance (0.6 - 0.3|sin u|, 0.3|sin u|)
(../shared/docs/METHOD.md). A sequence ("trial") takes l = 4 points of one cluster ordered
clockwise: point t draws u from the t-th quarter of the cluster's arc, so the position in the
sequence is the time label. A fixed random RealNVP maps the zero-padded latent to 100
dimensions; rate = exp(2.2 tanh(out)); counts ~ Poisson(rate).

The result is a ``training.data.Session``: target = cluster (the content label), bin_in_trial
= position (the style label), velocity a unit-free vector of length 10 pointing at the
cluster's angle so that every bin passes the reach readout's speed filter (threshold 5).
Sequences are shuffled, so the chronological 80/20 split of ``split_session`` is a random
split by sequence, like the paper's.

Checked against METHOD.md and the released code (issue 4): coupling nets are [d/2, d/4, d/4, d]
(pi-VAE's n_nodes = [dd // 2, dd // 2, DD], so 25-25 hidden units for 100 dimensions), 4 blocks
of 2 couplings, 0.1 tanh scale clamp, Glorot-uniform weights and zero biases. Points of a
sequence are drawn independently, one per quarter of the cluster's arc, like the released
``sample_sequence``, which bins independent draws by u. The released data file itself is not
reproducible from the release: its sampler implies clusters of width pi/4 at i pi/2 and its
pi-VAE helper uses variance 0.1 |mean|; we follow METHOD.md by default (``layout="method"``).
``layout="released"`` takes the released sampler's arcs (width pi/4 starting at i pi/2, so a
gap of pi/4 between clusters; variance still METHOD.md's): content can then be a smooth
function of the latent, where METHOD.md's touching arcs make it jump at every cluster border.
``benchmarks/paper_tables.py`` scores both. Position is a sawtooth of the angle, so it is not
linearly decodable from the true 2-D latent (26% with 4 positions) though it is from the angle
given the cluster (80%) and, linearly, from the log rates (77%).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from swapvae.schemas import SwapVAEConfig
from swapvae.schemas.session import Session

N_CLUSTERS = 4
SEQ_LEN = 4
# Bins are independent draws, so "speed" only has to clear the readout's filter.
_SPEED = 10.0


@dataclass(frozen=True)
class SyntheticSet:
    session: Session
    latent: np.ndarray  # (n_bins, 2) the true 2-D latent of each bin
    rate: np.ndarray  # (n_bins, n_neurons) the Poisson rate counts were drawn from


class RealNVP:
    """Affine-coupling flow as in pi-VAE's simulator: blocks of 2 couplings, a fixed
    permutation between blocks. Each coupling conditions on the first half, transforms the
    second half (scale clamped to 0.1 tanh, so the map stays close to volume-preserving),
    then swaps halves. Weights are Glorot-uniform and biases zero, as Keras initialises them."""

    def __init__(self, dim: int, rng: np.random.Generator, n_blocks: int = 4, couplings: int = 2):
        if dim % 2:
            raise ValueError(f"RealNVP needs an even dimension, got {dim}")
        half, hidden = dim // 2, dim // 4
        self.dim = dim
        self.blocks = [[self._coupling_net([half, hidden, hidden, dim], rng) for _ in range(couplings)]
                       for _ in range(n_blocks)]
        self.perms = [rng.permutation(dim) for _ in range(n_blocks - 1)]

    @staticmethod
    def _coupling_net(sizes: list[int], rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            limit = np.sqrt(6.0 / (a + b))
            layers.append((rng.uniform(-limit, limit, (a, b)), np.zeros(b)))
        return layers

    def _coupling(self, x: np.ndarray, net) -> np.ndarray:
        half = self.dim // 2
        x1, x2 = x[:, :half], x[:, half:]
        h = x1
        for k, (w, b) in enumerate(net):
            h = h @ w + b
            if k < len(net) - 1:
                h = np.maximum(h, 0.0)
        s, t = 0.1 * np.tanh(h[:, :half]), h[:, half:]
        return np.concatenate([x2 * np.exp(s) + t, x1], axis=1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for k, block in enumerate(self.blocks):
            if k > 0:
                x = x[:, self.perms[k - 1]]
            for net in block:
                x = self._coupling(x, net)
        return x


Layout = Literal["method", "released"]
ARC = {"method": np.pi / 2, "released": np.pi / 4}  # width of each cluster's arc; both start at i pi/2


def sample_latents(n_sequences: int, rng: np.random.Generator,
                   layout: Layout = "method") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(latent (n, 4, 2), cluster (n,), u (n, 4)) for ``n_sequences`` per cluster."""
    if layout not in ARC:
        raise ValueError(f"layout must be one of {sorted(ARC)}, got {layout!r}")
    cluster = np.repeat(np.arange(N_CLUSTERS), n_sequences)
    quarter = ARC[layout] / SEQ_LEN
    start = cluster[:, None] * np.pi / 2 + np.arange(SEQ_LEN)[None, :] * quarter
    u = start + rng.uniform(0, quarter, start.shape)
    mean = np.stack([5 * np.sin(u), 5 * np.cos(u)], axis=-1)
    var = np.stack([0.6 - 0.3 * np.abs(np.sin(u)), 0.3 * np.abs(np.sin(u))], axis=-1)
    z = mean + rng.standard_normal(mean.shape) * np.sqrt(var)
    return z, cluster, u


def make_synthetic(n_sequences: int = 1250, n_neurons: int = 100, seed: int = 0,
                   layout: Layout = "method") -> SyntheticSet:
    """``n_sequences`` sequences of 4 bins per cluster (default: 20,000 bins, as in the
    released data). The flow is seeded by ``seed`` too, so one seed fixes the whole dataset;
    both layouts share the flow for a seed."""
    rng = np.random.default_rng(seed)
    flow = RealNVP(n_neurons, np.random.default_rng([seed, 1]))
    z, cluster, _ = sample_latents(n_sequences, rng, layout)
    order = rng.permutation(len(cluster))  # trial ids chronological => split is random by sequence
    z, cluster = z[order], cluster[order]
    n_trials = len(cluster)
    latent = z.reshape(-1, 2)
    padded = np.zeros((len(latent), n_neurons))
    padded[:, :2] = latent
    rate = np.exp(2.2 * np.tanh(flow(padded)))
    counts = rng.poisson(rate).astype(np.float32)
    target = np.repeat(cluster, SEQ_LEN)
    angle = 2 * np.pi * target / N_CLUSTERS
    velocity = (_SPEED * np.stack([np.cos(angle), np.sin(angle)], axis=1)).astype(np.float32)
    session = Session(counts, np.repeat(np.arange(n_trials), SEQ_LEN), np.tile(np.arange(SEQ_LEN), n_trials),
                      target, velocity, 0.1, "synthetic")
    return SyntheticSet(session, latent, rate)


def synthetic_config(**overrides) -> SwapVAEConfig:
    """The paper's synthetic recipe (released synthetic_main.py): latent 16 content + 16 style,
    hidden [100, 32], jitter 3, counts as input, KL weight 10, alignment weight 1, Adam 5e-4,
    batch 256; 30 epochs (fixed in advance) and a 4-way readout. Every field is pinned here, so
    the recipe does not move with the project's Chewie-1 defaults. ``variant`` and other fields
    can be given as in ``SwapVAEConfig``; a variant's own loss settings are kept."""
    model = {"content_dim": 16, "style_dim": 16, "hidden": ["d", 32]}
    raw = {"model": model, "data": {"input_unit": "counts", "jitter": 3, "dropout_max": 0.0},
           "optim": {"epochs": 30, "lr": 5e-4, "batch_size": 256, "weight_decay": 0.0},
           "readout": {"n_directions": N_CLUSTERS}}
    if overrides.get("variant", "swap_vae") == "swap_vae":
        raw["loss"] = {"swap": True, "kl_weight": 10.0, "align_weight": 1.0}
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    if raw.get("variant") in ("vae", "beta_vae"):  # the whole latent is style for a VAE
        raw["model"] = {**raw["model"], "content_dim": 0, "style_dim": 32}
    return SwapVAEConfig.model_validate(raw)
