"""The supervised decoder baseline: it learns, it picks its epochs on training trials only,
and generated samples are built only from the bins being fitted."""
import numpy as np
import pytest
import torch

from swapvae.schemas.session import split_session
from swapvae.training.simulate import simulate_reaching
from swapvae.training.supervised import SupervisedDecoder


@pytest.fixture(scope="module")
def split():
    return split_session(simulate_reaching(n_neurons=60, n_trials=120, seed=5))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _moving(s):
    return s.speed > 5


def test_learns_direction_and_exposes_a_representation(split):
    tr, te = split.train, split.test
    m, mt = _moving(tr), _moving(te)
    dec = SupervisedDecoder(max_epochs=40, rep_dim=16).fit(tr.counts[m], tr.target[m], tr.trial[m],
                                                           neurons=split.neurons)
    acc, dacc = dec.score(te.counts[mt], te.target[mt])
    assert acc > 0.5 and dacc >= acc  # chance is 1/8
    assert 1 <= dec.epochs_ <= 40 and len(dec.val_curve_) == 40
    assert dec.transform(te.counts).shape == (len(te.counts), 16)
    assert np.allclose(dec.proba(te.counts[:5]).sum(1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="full"):
        dec.transform(te.counts, space="content")


def test_deterministic_for_a_seed(split):
    tr = split.train
    a = SupervisedDecoder(max_epochs=5, seed=1).fit(tr.counts, tr.target, tr.trial, neurons=split.neurons)
    b = SupervisedDecoder(max_epochs=5, seed=1).fit(tr.counts, tr.target, tr.trial, neurons=split.neurons)
    np.testing.assert_array_equal(a.transform(split.test.counts), b.transform(split.test.counts))


def test_augment_sees_only_the_bins_being_fitted(split):
    tr = split.train
    calls = []

    def augment(rows):
        calls.append(np.asarray(rows))
        return tr.counts[rows][:, split.neurons], tr.target[rows]  # "generated" = copies

    SupervisedDecoder(max_epochs=3, val_fraction=0.25).fit(tr.counts, tr.target, tr.trial, neurons=split.neurons,
                                                          augment=augment)
    assert len(calls) == 2
    trials = np.unique(tr.trial)
    val_trials = trials[-int(round(0.25 * len(trials))):]
    assert not np.isin(tr.trial[calls[0]], val_trials).any()  # epoch selection: never from validation trials
    assert np.array_equal(calls[1], np.arange(len(tr.counts)))  # the final fit: all training bins


def test_wrong_generated_labels_hurt(split):
    """Generated samples do enter training: mislabelled ones degrade the decoder."""
    tr, te = split.train, split.test
    m, mt = _moving(tr), _moving(te)
    counts, target, trial = tr.counts[m], tr.target[m], tr.trial[m]

    def mislabelled(rows):
        x = np.repeat(counts[rows][:, split.neurons], 3, axis=0)
        return x, (np.repeat(target[rows], 3) + 4) % 8

    clean = SupervisedDecoder(max_epochs=20).fit(counts, target, trial, neurons=split.neurons)
    noisy = SupervisedDecoder(max_epochs=20).fit(counts, target, trial, neurons=split.neurons, augment=mislabelled)
    assert noisy.score(te.counts[mt], te.target[mt])[0] < clean.score(te.counts[mt], te.target[mt])[0] - 0.2
