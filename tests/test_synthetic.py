"""The paper's synthetic dataset: its structure, its determinism, and that it is a valid session."""
import numpy as np
import pytest

from swapvae.schemas.session import split_session, validate
from swapvae.training.synthetic import N_CLUSTERS, SEQ_LEN, RealNVP, make_synthetic, sample_latents, synthetic_config


@pytest.fixture(scope="module")
def small():
    return make_synthetic(n_sequences=60, seed=3)


def test_shapes_and_trials(small):
    s = small.session
    n = N_CLUSTERS * 60 * SEQ_LEN
    assert s.counts.shape == (n, 100) and small.latent.shape == (n, 2) and small.rate.shape == (n, 100)
    assert np.array_equal(np.bincount(s.target), [60 * SEQ_LEN] * N_CLUSTERS)
    for t in np.unique(s.trial)[:20]:
        rows = s.trial == t
        assert np.array_equal(s.bin_in_trial[rows], np.arange(SEQ_LEN))
        assert len(np.unique(s.target[rows])) == 1
    assert (s.speed > 5).all()  # every bin passes the reach readout's speed filter


def test_is_a_valid_session_and_splits(small):
    s = small.session
    again = validate({"counts": s.counts, "trial": s.trial, "bin_in_trial": s.bin_in_trial, "target": s.target,
                      "velocity": s.velocity}, "synthetic")
    assert np.array_equal(again.counts, s.counts)
    split = split_session(s)
    assert len(np.unique(split.train.trial)) == int(round(0.8 * len(s.trials)))
    # sequences are shuffled, so the chronological split still sees every cluster on both sides
    assert set(split.test.target) == set(range(N_CLUSTERS))


def test_latents_follow_the_spec():
    z, cluster, u = sample_latents(2000, np.random.default_rng(0))
    assert z.shape == (4 * 2000, SEQ_LEN, 2)
    # u lies in the cluster's quarter of the circle and increases along the sequence
    assert ((u >= cluster[:, None] * np.pi / 2) & (u < (cluster[:, None] + 1) * np.pi / 2)).all()
    assert (np.diff(u, axis=1) > 0).all()
    # mean (5 sin u, 5 cos u) and per-coordinate variance (0.6 - 0.3|sin u|, 0.3|sin u|)
    resid = z - np.stack([5 * np.sin(u), 5 * np.cos(u)], -1)
    var = np.stack([0.6 - 0.3 * np.abs(np.sin(u)), 0.3 * np.abs(np.sin(u))], -1)
    np.testing.assert_allclose((resid ** 2 / var).mean(axis=(0, 1)), [1, 1], atol=0.05)


def test_rates_and_counts(small):
    assert small.rate.min() >= np.exp(-2.2) - 1e-9 and small.rate.max() <= np.exp(2.2) + 1e-9
    counts = small.session.counts
    assert (counts >= 0).all() and (counts == np.round(counts)).all()
    assert abs(counts.mean() - small.rate.mean()) < 0.05  # Poisson draws around the rates
    # the clusters are distinguishable in the rates: between-cluster spread >> 0
    means = np.stack([small.rate[small.session.target == c].mean(0) for c in range(N_CLUSTERS)])
    assert np.linalg.norm(means - means.mean(0), axis=1).min() > 1.0


def test_flow_is_fixed_by_its_seed_and_nonlinear():
    x = np.random.default_rng(0).normal(size=(50, 10))
    a, b = RealNVP(10, np.random.default_rng(1)), RealNVP(10, np.random.default_rng(1))
    np.testing.assert_array_equal(a(x), b(x))
    assert not np.allclose(a(x), RealNVP(10, np.random.default_rng(2))(x))
    lin = np.linalg.lstsq(np.c_[x, np.ones(50)], a(x), rcond=None)[1]
    assert lin.sum() > 1e-6  # not an affine map of its input
    with pytest.raises(ValueError, match="even"):
        RealNVP(9, np.random.default_rng(0))


def test_dataset_is_deterministic_for_a_seed():
    a, b, c = make_synthetic(10, seed=5), make_synthetic(10, seed=5), make_synthetic(10, seed=6)
    np.testing.assert_array_equal(a.session.counts, b.session.counts)
    assert not np.array_equal(a.session.counts, c.session.counts)


def test_synthetic_config_is_the_papers_recipe():
    cfg = synthetic_config()
    assert (cfg.model.content_dim, cfg.model.style_dim, cfg.model.hidden) == (16, 16, ("d", 32))
    assert cfg.data.jitter == 3 and cfg.readout.n_directions == 4
    vae = synthetic_config(variant="beta_vae", optim={"epochs": 2})
    assert (vae.model.content_dim, vae.model.style_dim, vae.loss.kl_weight, vae.optim.epochs) == (0, 32, 10.0, 2)
    assert synthetic_config(loss={"kl_weight": 1.0}).loss.kl_weight == 1.0


def test_flow_architecture_is_the_papers():
    """4 blocks of 2 affine couplings, coupling nets 25-25 hidden units for 100 dimensions
    (pi-VAE's n_nodes = [dd // 2, dd // 2, DD] with dd = DD // 2), a permutation between blocks."""
    flow = RealNVP(100, np.random.default_rng(0))
    assert len(flow.blocks) == 4 and all(len(block) == 2 for block in flow.blocks) and len(flow.perms) == 3
    for block in flow.blocks:
        for net in block:
            assert [w.shape for w, _ in net] == [(50, 25), (25, 25), (25, 100)]
            assert all((b == 0).all() for _, b in net)  # Keras: zero biases
    assert all(sorted(p) == list(range(100)) for p in flow.perms)


def test_coupling_scale_is_clamped_by_0_1_tanh():
    flow = RealNVP(4, np.random.default_rng(0))
    # a net whose scale half is huge and whose shift half is zero: x2 may only be scaled by e^(+-0.1)
    net = [(np.full((2, 1), 100.0), np.zeros(1)), (np.ones((1, 1)), np.zeros(1)),
           (np.array([[1e3, -1e3, 0.0, 0.0]]), np.zeros(4))]
    x = np.array([[1.0, 2.0, 3.0, -4.0], [0.5, 0.1, -2.0, 1.0]])
    out = flow._coupling(x, net)
    np.testing.assert_array_equal(out[:, 2:], x[:, :2])  # halves swapped, the first passed through
    np.testing.assert_allclose(out[:, :2] / x[:, 2:], [[np.exp(0.1), np.exp(-0.1)]] * 2)


def test_positions_are_clockwise_sub_arcs():
    z, cluster, u = sample_latents(3000, np.random.default_rng(1))
    quarter = np.pi / 2 / SEQ_LEN
    start = cluster[:, None] * np.pi / 2 + np.arange(SEQ_LEN) * quarter
    assert ((u >= start) & (u < start + quarter)).all()  # point t lies in the t-th quarter of the arc
    # clockwise: the polar angle of the mean point of each position decreases along the sequence
    for c in range(N_CLUSTERS):
        centre = z[cluster == c].mean(axis=0)
        steps = np.angle(centre[1:, 0] + 1j * centre[1:, 1]) - np.angle(centre[:-1, 0] + 1j * centre[:-1, 1])
        steps = (steps + np.pi) % (2 * np.pi) - np.pi
        assert (steps < 0).all() and np.allclose(steps, -quarter, atol=0.03)


def test_position_is_in_the_latent_but_not_linearly(small):
    """The style label is real signal: given the cluster, the angle of the true latent names the
    position well above chance; but it is a sawtooth of the angle, so a single linear readout of
    the 2-D latent across clusters cannot find it (measured on seed 0: 26% vs chance 25%)."""
    s = small.session
    angle = np.arctan2(small.latent[:, 0], small.latent[:, 1]) % (2 * np.pi)  # = u up to noise
    guess = np.clip(((angle - s.target * np.pi / 2) // (np.pi / 2 / SEQ_LEN)).astype(int), 0, SEQ_LEN - 1)
    assert np.mean(guess == s.bin_in_trial) > 0.6
    # least-squares linear readout (one-hot targets) of the 2-D latent: near chance
    x = np.c_[small.latent, np.ones(len(small.latent))]
    w = np.linalg.lstsq(x, np.eye(SEQ_LEN)[s.bin_in_trial], rcond=None)[0]
    assert np.mean((x @ w).argmax(1) == s.bin_in_trial) < 0.35
    # within clusters, position adds a clear share of the rates' variance beyond the cluster's
    def between(labels):
        keys, idx = np.unique(labels, return_inverse=True)
        means = np.stack([small.rate[idx == k].mean(0) for k in range(len(keys))])
        return means[idx].var(0).sum() / small.rate.var(0).sum()
    assert between(s.target * SEQ_LEN + s.bin_in_trial) - between(s.target) > 0.1


def test_released_layout_leaves_gaps_between_clusters():
    z, cluster, u = sample_latents(2000, np.random.default_rng(2), layout="released")
    start = cluster[:, None] * np.pi / 2
    assert ((u >= start) & (u < start + np.pi / 4)).all()  # arcs of width pi/4 at i pi/2: a pi/4 gap follows
    assert (np.diff(u, axis=1) > 0).all()
    with pytest.raises(ValueError, match="layout"):
        sample_latents(10, np.random.default_rng(0), layout="wide")
    a, b = make_synthetic(10, seed=5), make_synthetic(10, seed=5, layout="released")
    assert a.session.counts.shape == b.session.counts.shape and not np.array_equal(a.latent, b.latent)
