"""A simulated centre-out reaching session: the built-in default, so nothing is downloaded.

Shaped like the real recording (../shared/data/reaching): 100 ms bins, trials of 9-14 bins,
8 reach directions. Each trial has a bell-shaped hand-speed profile towards its target.
Neurons are cosine-tuned to reach direction with a gain that follows the speed profile (a
movement-locked term), some also carry a condition-independent temporal component, and a
few are silent, so the static-neuron filter has something to do. Counts are Poisson.
"""
from __future__ import annotations

import numpy as np

from swapvae.schemas.session import Session


def simulate_reaching(n_neurons: int = 120, n_trials: int = 200, n_directions: int = 8,
                      bin_size_s: float = 0.1, peak_speed: float = 25.0, seed: int = 0) -> Session:
    rng = np.random.default_rng(seed)
    preferred = rng.uniform(0, 2 * np.pi, n_neurons)
    baseline = rng.lognormal(np.log(4.0), 0.6, n_neurons)  # Hz
    depth = rng.uniform(0.3, 1.0, n_neurons) * baseline * 2.5  # Hz at peak speed
    temporal = rng.normal(0, 1, n_neurons) * baseline * (rng.random(n_neurons) < 0.4)
    silent = rng.choice(n_neurons, size=max(1, n_neurons // 30), replace=False)

    counts, trial, bin_in_trial, target, velocity = [], [], [], [], []
    for k in range(n_trials):
        length = int(rng.integers(9, 15))
        direction = int(rng.integers(n_directions))
        angle = 2 * np.pi * direction / n_directions + rng.normal(0, 0.1)
        t = np.arange(length)
        onset = rng.uniform(1.5, 3.0)
        width = rng.uniform(1.5, 2.5)
        profile = np.exp(-0.5 * ((t - onset - width) / (0.6 * width)) ** 2)  # bell-shaped speed
        speed = peak_speed * rng.uniform(0.8, 1.2) * profile
        v = np.stack([speed * np.cos(angle), speed * np.sin(angle)], axis=1)
        v += rng.normal(0, 0.5, v.shape)
        tuning = 1 + np.cos(angle - preferred)  # (neurons,)
        phase = np.sin(np.pi * t / length)[:, None]
        rate = baseline + depth * profile[:, None] * tuning + temporal * phase
        rate = np.clip(rate, 0.1, None)
        rate[:, silent] = 0.0
        counts.append(rng.poisson(rate * bin_size_s))
        trial.append(np.full(length, k))
        bin_in_trial.append(t)
        target.append(np.full(length, direction))
        velocity.append(v)
    return Session(np.concatenate(counts).astype(np.float32), np.concatenate(trial), np.concatenate(bin_in_trial),
                   np.concatenate(target), np.concatenate(velocity).astype(np.float32), bin_size_s, "simulated")
