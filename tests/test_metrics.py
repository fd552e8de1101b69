"""The paper's metrics on constructed inputs whose right answer is known."""
import numpy as np
import pytest

from swapvae.schemas import ReadoutConfig
from swapvae.schemas.session import Session
from swapvae.training.metrics import (
    bits_per_spike,
    disentanglement_per_latent,
    disentanglement_score,
    label_variances,
    mean_std,
    reconstruction_rmse,
    temporal_scores,
    trial_average,
)

FAST_READOUT = ReadoutConfig(C_grid=(0.1, 1.0), cv_folds=3)


def _labels(n_per_cell=30, n_c=4, n_s=4, seed=0):
    rng = np.random.default_rng(seed)
    yc = np.repeat(np.arange(n_c), n_s * n_per_cell)
    ys = np.tile(np.repeat(np.arange(n_s), n_per_cell), n_c)
    return yc, ys, rng


def test_disentangled_blocks_score_near_one():
    yc, ys, rng = _labels()
    content = np.stack([np.cos(yc), np.sin(yc), yc ** 2], 1).astype(float)
    style = np.stack([ys, np.sqrt(ys)], 1).astype(float)
    z = np.hstack([content, style]) + 0.01 * rng.normal(size=(len(yc), 5))
    assert disentanglement_score(z, yc, ys) > 0.97
    # the units of a latent do not matter
    assert disentanglement_score(z * [1, 100, 0.01, 5, 1e3], yc, ys) == pytest.approx(disentanglement_score(z, yc, ys))


def test_mixed_latents_score_near_zero():
    yc, ys, rng = _labels()
    z = np.stack([yc + ys, yc - ys, 2 * yc + 2 * ys], 1) + 0.01 * rng.normal(size=(len(yc), 3))
    assert disentanglement_score(z, yc, ys) < 0.1
    # half the latents pure, half mixed: in between
    half = np.hstack([z, np.stack([yc, ys], 1) * 3.0])
    assert 0.1 < disentanglement_score(half, yc, ys) < 0.9


def test_label_variances_and_its_errors():
    yc, ys, _ = _labels(n_per_cell=5)
    v_c, v_s = label_variances(np.stack([yc, ys], 1).astype(float), yc, ys)
    assert v_c[0] > 0.5 and v_s[0] == pytest.approx(0) and v_s[1] > 0.5 and v_c[1] == pytest.approx(0)
    with pytest.raises(ValueError, match="at least 2"):
        label_variances(np.ones((10, 2)), np.zeros(10), np.arange(10) % 2)


def _session(counts, trial, bin_in_trial, target):
    return Session(np.asarray(counts, np.float32), trial, bin_in_trial, target, np.zeros((len(trial), 2), np.float32))


def _trials(n_trials, length, n_dir=4, seed=0):
    rng = np.random.default_rng(seed)
    trial = np.repeat(np.arange(n_trials), length)
    bins = np.tile(np.arange(length), n_trials)
    target = np.repeat(rng.integers(n_dir, size=n_trials), length)
    return trial, bins, target, rng


def test_temporal_readout_finds_time_and_not_noise():
    trial, bins, target, rng = _trials(60, 10)
    z_time = np.eye(10)[bins] * 5 + rng.normal(size=(len(bins), 10))
    z_noise = rng.normal(size=(len(bins), 10))
    tr, te = trial < 45, trial >= 45
    sess = lambda m: _session(np.zeros((m.sum(), 1)), trial[m], bins[m], target[m])  # noqa: E731
    good = temporal_scores(z_time[tr], z_time[te], sess(tr), sess(te), FAST_READOUT)
    bad = temporal_scores(z_noise[tr], z_noise[te], sess(tr), sess(te), FAST_READOUT)
    assert good["acc"] > 0.9 and good["top1"] > 0.9 and good["within1"] >= good["top1"]
    assert bad["acc"] < 0.3 and bad["chance"] == pytest.approx(1 / 9)


def test_trial_average():
    counts = np.array([[1.0], [2.0], [3.0], [5.0]])
    mean, n = trial_average(counts, np.array([0, 0, 0, 1]), np.array([0, 1, 0, 0]), n_time=2)
    assert mean[0, 0, 0] == 2.0 and mean[0, 1, 0] == 2.0 and mean[1, 0, 0] == 5.0 and np.isnan(mean[1, 1, 0])
    assert n.tolist() == [[2, 1], [1, 0]]


def test_reconstruction_rmse_rewards_the_trial_average():
    trial, bins, target, rng = _trials(40, 9)
    psth = rng.uniform(0.5, 5, size=(4, 9, 6))
    counts = rng.poisson(psth[target, bins]).astype(float)
    s = _session(counts, trial, bins, target)
    test = _session(counts[trial >= 30], trial[trial >= 30], bins[trial >= 30], target[trial >= 30])
    neurons = np.arange(6)
    ref, _ = trial_average(counts, target, bins)
    perfect = reconstruction_rmse(ref[test.target, test.bin_in_trial], test, s, neurons)
    copy = reconstruction_rmse(test.counts, test, s, neurons)
    assert perfect["rmse"] == pytest.approx(0, abs=1e-6) and perfect["rmse_avg"] > 0
    assert copy["rmse"] == pytest.approx(copy["rmse_raw"]) and copy["rmse_avg"] == pytest.approx(0, abs=1e-6)
    assert copy["rmse"] > 0.5  # Poisson noise around the average


def test_bits_per_spike():
    rng = np.random.default_rng(0)
    rates = rng.uniform(0.1, 4.0, size=(2000, 8))
    counts = rng.poisson(rates).astype(float)
    mean = counts.mean(axis=0)
    assert bits_per_spike(np.broadcast_to(mean, counts.shape), counts, mean) == pytest.approx(0)
    assert bits_per_spike(rates, counts, mean) > 0.1  # the true rates explain more than the mean
    assert bits_per_spike(rates[::-1], counts, mean) < 0  # wrong rates are worse than the mean
    with pytest.raises(ValueError, match="spike"):
        bits_per_spike(rates, np.zeros_like(counts), mean)


def test_mean_std():
    assert mean_std([1.0, 3.0]) == pytest.approx((2.0, np.sqrt(2)))
    assert mean_std([4.0]) == (4.0, 0.0)
    assert np.isnan(mean_std([])[0]) and mean_std([1.0, float("nan"), 3.0])[0] == 2.0


def _toy_cells(columns, n_per_cell=3):
    """2 content x 2 style labels; ``columns`` maps (c, s) -> value for each latent."""
    yc = np.repeat([0, 0, 1, 1], n_per_cell)
    ys = np.repeat([0, 1, 0, 1], n_per_cell)
    z = np.stack([[f(c, s) for c, s in zip(yc, ys)] for f in columns], 1).astype(float)
    return z, yc, ys


def test_label_variances_hand_computed():
    # z0 = c: standardised to -1/+1 -> (1) = var(-1, 1) = 1, (2) = 0.
    # z1 = 2c + s: cells 0, 1, 2, 3, variance 1.25 -> (1) = 1 / 1.25 = 0.8, (2) = 0.25 / 1.25 = 0.2.
    z, yc, ys = _toy_cells([lambda c, s: c, lambda c, s: 2 * c + s])
    v_c, v_s = label_variances(z, yc, ys)
    np.testing.assert_allclose(v_c, [1.0, 0.8])
    np.testing.assert_allclose(v_s, [0.0, 0.2], atol=1e-12)


def test_both_readings_of_the_score_hand_computed():
    z, yc, ys = _toy_cells([lambda c, s: c, lambda c, s: 2 * c + s])
    # shares: p = (1, 0.8) / 1.8, q = (0, 1); TV = 0.5 * (5/9 + 5/9) = 5/9
    assert disentanglement_score(z, yc, ys) == pytest.approx(5 / 9)
    # per latent: |1 - 0| / 1 = 1 and |0.8 - 0.2| / 1 = 0.6, mean 0.8
    assert disentanglement_per_latent(z, yc, ys) == pytest.approx(0.8)
    # pure content + pure style latents: both readings give 1
    pure, yc, ys = _toy_cells([lambda c, s: c, lambda c, s: s])
    assert disentanglement_score(pure, yc, ys) == pytest.approx(1)
    assert disentanglement_per_latent(pure, yc, ys) == pytest.approx(1)
    # every latent mixes both labels in the same proportion (content-dominated): the shares reading
    # says 0, the per-latent reading says each latent is mostly content (0.6)
    same, yc, ys = _toy_cells([lambda c, s: 2 * c + s, lambda c, s: -4 * c - 2 * s + 1])
    assert disentanglement_score(same, yc, ys) == pytest.approx(0, abs=1e-12)
    assert disentanglement_per_latent(same, yc, ys) == pytest.approx(0.6)
    # a constant latent carries no label: 0 per latent, not a division by zero
    const, yc, ys = _toy_cells([lambda c, s: c, lambda c, s: 7.0])
    assert disentanglement_per_latent(const, yc, ys) == pytest.approx(0.5)


def test_per_latent_reading_ignores_units_and_orders_like_the_shares_on_clean_cases():
    yc, ys, rng = _labels()
    blocks = np.hstack([np.stack([yc, yc ** 2], 1), np.stack([ys, np.sqrt(ys)], 1)]).astype(float)
    z = blocks + 0.01 * rng.normal(size=blocks.shape)
    assert disentanglement_per_latent(z, yc, ys) > 0.97
    scaled = disentanglement_per_latent(z * [3, 0.1, 50, 1e-3], yc, ys)
    assert scaled == pytest.approx(disentanglement_per_latent(z, yc, ys))
    mixed = np.stack([yc + ys, yc - ys], 1) + 0.01 * rng.normal(size=(len(yc), 2))
    assert disentanglement_per_latent(mixed, yc, ys) < 0.1
