"""Training from host memory (``data.placement`` "host", training.stream): each step gets the
rows its pairs name, a step's pairs depend only on the seed and its number, a resumed fit is
the uninterrupted one, and a failing gather is raised in the training thread, named."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from swapvae.schemas import SwapVAEConfig
from swapvae.training import SwapVAE
from swapvae.training.simulate import simulate_reaching
from swapvae.training.stream import HostBatches, choose_placement, data_bytes

KW = dict(device="cpu", cpu_threads=1, epochs=6, batch_size=64, content_dim=4, style_dim=4, hidden=["d", 16])
HOST = SwapVAEConfig().with_overrides(data={"placement": "host", "stream_chunk_steps": 5},
                                      optim={"checkpoint_every": 2})


@pytest.fixture(scope="module")
def session():
    return simulate_reaching(n_neurons=40, n_trials=40, seed=1)


def _batches(n_bins=50, n=7, chunk=4, seed=3):
    x = torch.arange(n_bins * 3, dtype=torch.float32).reshape(n_bins, 3)
    pairs = np.stack([np.arange(n_bins - 1), np.arange(1, n_bins)], axis=1)
    return x, pairs, HostBatches(x, pairs, n, torch.device("cpu"), seed, chunk)


def test_each_step_gets_the_rows_of_its_pairs_across_chunks():
    x, pairs, b = _batches()
    try:
        for step in range(11):  # chunks of 4: two boundaries crossed
            x1, x2 = (v.clone() for v in b.next())
            rows = b.rows(step // 4)[step % 4]
            assert torch.equal(x1, x[rows[:7]]) and torch.equal(x2, x[rows[7:]])
            assert np.all(rows[7:] == rows[:7] + 1)  # partners: the (i, j) pairs' second rows
    finally:
        b.close()


def test_a_seek_serves_what_the_uninterrupted_stream_served():
    *_, a = _batches()
    *_, b = _batches()
    try:
        straight = [torch.cat(a.next()).clone() for _ in range(10)]
        b.next()  # read, then sought back and forward: the steps depend on their number only
        b.seek(6)
        assert all(torch.equal(torch.cat(b.next()), straight[s]) for s in range(6, 10))
        b.seek(0)
        assert torch.equal(torch.cat(b.next()), straight[0])
    finally:
        a.close(), b.close()
    *_, c = _batches(seed=4)
    try:
        assert not torch.equal(torch.cat(c.next()), straight[0])  # another seed, other pairs
    finally:
        c.close()


def test_a_failing_gather_is_raised_in_the_training_thread_named():
    x = torch.zeros(10, 3)
    b = HostBatches(x, np.array([[0, 1], [8, 12]]), 64, torch.device("cpu"), 0, 2)  # row 12 does not exist
    try:
        with pytest.raises(RuntimeError, match="streaming training batches from host memory failed"):
            b.next()
    finally:
        b.close()
    with pytest.raises(ValueError, match="float32 bins in host memory"):
        HostBatches(x.double(), np.zeros((1, 2), int), 4, torch.device("cpu"), 0)


def test_auto_placement_is_the_device_on_the_cpu():
    assert choose_placement("auto", torch.device("cpu"), 10**12) == "device"  # the same memory
    assert choose_placement("host", torch.device("cpu"), 1) == "host"
    assert data_bytes(1000, 100, 20_000) == 400_000 + 320_000


def test_a_host_fit_learns_and_resumes_to_the_uninterrupted_one(session, tmp_path: Path, monkeypatch):
    full = SwapVAE(config=HOST, **KW).fit(session.counts, trial=session.trial)
    assert full.placement_ == "host"
    assert full.history_[-1]["loss"] < full.history_[0]["loss"]
    device = SwapVAE(config=HOST.with_overrides(data={"placement": "device"}), **KW).fit(session.counts,
                                                                                         trial=session.trial)
    assert device.placement_ == "device"
    # other pairs drawn, the same objective: the losses end close
    assert abs(full.history_[-1]["loss"] - device.history_[-1]["loss"]) < 0.1 * abs(device.history_[-1]["loss"])

    real = SwapVAE.save

    class Stop(Exception):
        pass

    def save(self, path, training=None):
        real(self, path, training)
        if training is not None and training["meta"]["epoch"] == 4:
            raise Stop
    monkeypatch.setattr(SwapVAE, "save", save)
    with pytest.raises(Stop):
        SwapVAE(config=HOST, **KW).fit(session.counts, trial=session.trial, checkpoint=tmp_path / "c.pt")
    monkeypatch.setattr(SwapVAE, "save", real)
    resumed = SwapVAE(config=HOST, **KW).fit(session.counts, trial=session.trial, resume=tmp_path / "c.pt")
    a, b = full.model_.state_dict(), resumed.model_.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history_ == full.history_


def test_several_sessions_refuse_host_placement(session):
    with pytest.raises(ValueError, match="placement 'host' streams one session's bins"):
        SwapVAE(config=HOST, **KW).fit([session.counts, session.counts], trial=[session.trial, session.trial])
