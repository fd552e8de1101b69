import numpy as np
import pytest

from swapvae.schemas.session import DataError, split_session, validate
from swapvae.training.data import jitter_pairs, load_session
from swapvae.training.simulate import simulate_reaching


def _arrays(n_trials=6, length=5, n_neurons=4):
    rng = np.random.default_rng(0)
    n = n_trials * length
    return {
        "counts": rng.poisson(2, (n, n_neurons)).astype(np.int16),
        "trial": np.repeat(np.arange(n_trials), length),
        "bin_in_trial": np.tile(np.arange(length), n_trials),
        "target": np.repeat(np.arange(n_trials) % 8, length),
        "velocity": rng.normal(size=(n, 2)).astype(np.float32),
        "bin_size_s": np.float64(0.1),
    }


def test_valid_arrays_load():
    s = validate(_arrays(), "ok")
    assert s.n_bins == 30 and s.n_neurons == 4 and len(s.trials) == 6


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.pop("trial"), "missing array"),
    (lambda a: a.pop("target"), "has 'velocity' but no 'target'"),
    (lambda a: a.__setitem__("trial", a["trial"][:-1]), "trial has shape"),
    (lambda a: a.__setitem__("velocity", a["velocity"][:, :1]), "velocity has shape"),
    (lambda a: a["counts"].__setitem__((3, 1), -1), "must be >= 0"),
    (lambda a: a.__setitem__("counts", a["counts"] + 0.5), "must be integers"),
    (lambda a: a.__setitem__("counts", np.where(np.arange(4) == 2, np.nan, a["counts"].astype(float))), "NaN/inf"),
    (lambda a: a["target"].__setitem__(2, 7), "target changes inside trial 0"),
    (lambda a: a.__setitem__("trial", np.r_[a["trial"][5:10], a["trial"][:5], a["trial"][10:]]), "chronological"),
    (lambda a: a["trial"].__setitem__(7, 0), "trial 1 is followed by 0"),
])
def test_bad_recordings_are_named(mutate, message):
    a = _arrays()
    mutate(a)
    with pytest.raises(DataError, match=message):
        validate(a, "bad")


def test_labels_are_optional_together():
    a = _arrays()
    del a["target"], a["velocity"]
    s = validate(a, "unlabelled")
    assert not s.has_labels and s.target is None and s.velocity is None
    assert split_session(s).test.target is None
    with pytest.raises(DataError, match="no hand velocity"):
        _ = s.speed


def test_too_few_trials():
    with pytest.raises(DataError, match="only 2 trial"):
        validate(_arrays(n_trials=2), "short", min_trials=4)


def test_load_npz_roundtrip_and_errors(tmp_path):
    path = tmp_path / "rec.npz"
    np.savez(path, **_arrays())
    assert load_session(path).n_bins == 30
    with pytest.raises(DataError, match="no such file"):
        load_session(tmp_path / "missing.npz")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DataError, match="unsupported format"):
        load_session(tmp_path / "x.csv")
    obj = tmp_path / "obj.npz"
    np.savez(obj, **{**_arrays(), "counts": np.array([object()] * 3, dtype=object)})
    with pytest.raises(DataError, match="unpickling"):
        load_session(obj)


def test_pairs_never_cross_trials_and_respect_jitter():
    s = simulate_reaching(n_neurons=5, n_trials=20, seed=1)
    pairs = jitter_pairs(s.trial, s.bin_in_trial, jitter=3)
    i, j = pairs.T
    assert (s.trial[i] == s.trial[j]).all()
    assert (np.abs(s.bin_in_trial[i] - s.bin_in_trial[j]) <= 3).all()
    # complete: every in-trial pair within the jitter is there, (i, i) included
    expected = sum(((np.abs(np.subtract.outer(np.arange(n), np.arange(n))) <= 3).sum())
                   for n in np.bincount(s.trial))
    assert len(pairs) == expected == len({tuple(p) for p in pairs})


def test_split_is_chronological_and_filters_static_neurons():
    a = _arrays(n_trials=10, n_neurons=5)
    a["counts"][:, 3] = 0  # static in training
    split = split_session(validate(a, "x"), train_fraction=0.8)
    assert split.train.trials.tolist() == list(range(8)) and split.test.trials.tolist() == [8, 9]
    assert split.neurons.tolist() == [0, 1, 2, 4]
    assert split.test.n_neurons == 5  # sessions keep every channel; the model applies the selection


def test_simulated_session_is_valid_and_seeded():
    s = simulate_reaching(seed=3)
    again = validate({"counts": s.counts, "trial": s.trial, "bin_in_trial": s.bin_in_trial, "target": s.target,
                      "velocity": s.velocity}, "sim")
    assert again.n_bins == s.n_bins and len(np.unique(s.target)) == 8
    assert np.array_equal(simulate_reaching(seed=3).counts, s.counts)
    assert not np.array_equal(simulate_reaching(seed=4).counts, s.counts)
    assert (s.counts.std(0) == 0).any()  # silent neurons exercise the static filter


def test_synthetic_dataset_loads_by_name():
    s = load_session("synthetic:3:20")
    assert len(s.trials) == 4 * 20 and set(np.unique(s.target)) == {0, 1, 2, 3}
    with pytest.raises(DataError, match="synthetic"):
        load_session("synthetic:x")
