"""One Swap-VAE across sessions and a new session calibrated onto it (training/sessions.py,
training/calibration.py, ``swapvae train --shared`` and ``swapvae calibrate``): two simulated
sessions with different channel counts, a third calibrated, and the inputs refused by name."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from swapvae.cli import main as cli
from swapvae.schemas.session import write_npz
from swapvae.training import SwapVAE
from swapvae.training.model import SharedCore, SwapVAENet
from swapvae.training.simulate import simulate_reaching

TINY = dict(device="cpu", cpu_threads=1, epochs=6, batch_size=64, content_dim=4, style_dim=4, hidden=["d", 16],
            shared_width=20)
CONFIG = {"device": "cpu", "model": {"content_dim": 4, "style_dim": 4, "hidden": ["d", 16], "shared_width": 20},
          "optim": {"epochs": 4, "batch_size": 64, "cpu_threads": 1},
          "calibrate": {"epochs": 4},
          "readout": {"C_grid": [0.1], "cv_folds": 2, "history_grid": [2], "alpha_grid": [10.0]}}


@pytest.fixture(scope="module")
def sessions():
    return [simulate_reaching(n_neurons=n, n_trials=t, seed=s) for n, t, s in ((40, 40, 1), (30, 40, 2), (35, 30, 3))]


@pytest.fixture(scope="module")
def shared(sessions):
    a, b, _ = sessions
    return SwapVAE(**TINY).fit([a.counts, b.counts], trial=[a.trial, b.trial])


def test_one_session_through_the_shared_core_is_the_single_session_model():
    torch.manual_seed(0)
    core = SharedCore([7, 5], [12, 6], 3, 2)
    x1, x2 = torch.rand(4, 7), torch.rand(4, 7)
    torch.manual_seed(1)
    shared = core.loss([(0, x1, x2)])
    torch.manual_seed(1)
    alone = core.net(0).loss(x1, x2)
    assert all(torch.equal(shared[k], alone[k]) for k in shared)
    assert list(core.net(0).state_dict()) == list(SwapVAENet(7, [12, 6], 3, 2).state_dict())
    core.loss([(0, x1, x2), (1, torch.rand(3, 5), torch.rand(3, 5))])["loss"].backward()  # sessions mixed


def test_sessions_with_different_channel_counts_share_one_core(shared, sessions, tmp_path):
    a, b, _ = sessions
    assert [v.n_features_in_ for v in shared.sessions_] == [40, 30]
    za, zb = shared.sessions_[0].transform(a.counts), shared.sessions_[1].transform(b.counts)
    assert za.shape == (a.n_bins, 8) and zb.shape == (b.n_bins, 8)
    core_a = dict(shared.sessions_[0].model_.named_modules())["encoder.net.3"]
    assert core_a is dict(shared.sessions_[1].model_.named_modules())["encoder.net.3"]  # the same module
    with pytest.raises(ValueError, match=r"sessions_\[i\]\.transform"):
        shared.transform(a.counts)
    shared.save(tmp_path / "s.pt")
    back = SwapVAE.load(tmp_path / "s.pt")
    np.testing.assert_array_equal(back.sessions_[1].transform(b.counts), zb)


def test_a_new_session_is_calibrated_and_the_reference_is_left_as_it_was(shared, sessions):
    _, _, c = sessions
    before = {k: v.clone() for k, v in shared.model_.state_dict().items()}
    new = shared.calibrate(c.counts, trial=c.trial)
    assert all(torch.equal(before[k], v) for k, v in shared.model_.state_dict().items())
    state = new.model_.state_dict()  # the core frozen: weights and BatchNorm statistics as trained
    assert torch.equal(state["encoder.net.3.weight"], before["core_encoder.0.weight"])
    assert torch.equal(state["encoder.net.4.running_mean"], before["core_encoder.1.running_mean"])
    assert state["encoder.net.0.weight"].shape == (20, len(new.neurons_))  # its own read-in, its kept channels
    assert new.transform(c.counts).shape == (c.n_bins, 8) and new.n_features_in_ == 35
    assert new.config_.model.hidden == (20, 16)  # the core's width written out: it reloads as one session


def test_bad_inputs_are_named(shared, sessions):
    a, b, c = sessions
    with pytest.raises(ValueError, match="different bin sizes"):
        SwapVAE(**TINY).fit([a.counts, b.counts], trial=[a.trial, b.trial], bin_size_s=[0.1, 0.05])
    with pytest.raises(ValueError, match="bins of 0.05 s but the core was trained on bins of 0.1 s"):
        shared.calibrate(c.counts, trial=c.trial, bin_size_s=0.05)
    static = np.zeros_like(c.counts)
    with pytest.raises(ValueError, match="every channel of the new session is static"):
        shared.calibrate(static, trial=c.trial)
    single = SwapVAE(**TINY).fit(a.counts, trial=a.trial)
    with pytest.raises(ValueError, match="trained with a shared core"):
        single.calibrate(c.counts, trial=c.trial)
    with pytest.raises(ValueError, match="a list of 2"):
        SwapVAE(**TINY).fit([a.counts, b.counts], trial=a.trial)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sessions):
    root = tmp_path_factory.mktemp("sessions")
    for i, s in enumerate(sessions):
        write_npz(s, root / f"s{i}.npz")
    (root / "c.json").write_text(json.dumps(CONFIG))
    assert cli(["train", "--shared", "--data", str(root / "s0.npz"), str(root / "s1.npz"), "--out", str(root / "ref"),
                "--config", str(root / "c.json"), "--quiet"]) == 0
    return root


def test_train_shared_writes_each_sessions_metrics_and_the_reference(runs):
    metrics = json.loads((runs / "ref" / "metrics.json").read_text())
    assert metrics["shared"] and set(metrics["sessions"]) == {"s0", "s1"}
    assert all("reach_acc" in m and "raw_reach_acc" in m for m in metrics["sessions"].values())
    assert (runs / "ref" / "readout-1.json").exists() and (runs / "ref" / "reference.npz").exists()
    with np.load(runs / "ref" / "reference.npz", allow_pickle=False) as f:
        assert f["z"].shape[1] == 8 and len(f["trial"]) == len(f["z"])


@pytest.mark.parametrize("n", [0, 5])
def test_calibrate_writes_an_ordinary_run_that_exports_and_evaluates_to_its_metrics(runs, n, capsys):
    out = runs / f"new{n}"
    assert cli(["calibrate", str(runs / "ref"), "--data", str(runs / "s2.npz"), "--out", str(out),
                "--labelled-trials", str(n), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labelled_trials"] == n and {"reach_acc", "reach_delta_acc", "velocity_r2"} <= set(metrics)
    assert ("raw_reach_acc" in metrics) == (n > 0)  # raw rates with the same N trials; none without labels
    capsys.readouterr()
    assert cli(["evaluate", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["reach_acc"] == metrics["reach_acc"]
    assert again["velocity_r2"] == pytest.approx(metrics["velocity_r2"], abs=1e-6)  # reloaded: equal to rounding
    assert cli(["export", str(out), "--out", str(runs / f"bundle{n}")]) == 0
    assert json.loads((runs / f"bundle{n}" / "manifest.json").read_text())["n_channels"] == 35
    # the bundle, decoded bin by bin as the service decodes (replay's offline scores), against the
    # torch evaluation written at calibration: up to float32 ties at sector edges and rounding
    from swapvae.runtime.replay import offline_reach
    from swapvae.schemas.session import read_npz

    offline = offline_reach(runs / f"bundle{n}", read_npz(runs / "s2.npz"))
    assert offline["n_scored"] == metrics["n_test_bins"]
    for k in ("reach_acc", "reach_delta_acc"):
        assert abs(offline[k] - metrics[k]) <= 1.0 / offline["n_scored"] + 1e-12, k
    assert abs(offline["velocity_r2"] - metrics["velocity_r2"]) < 1e-4


def test_calibrate_refuses_what_it_cannot_do(runs, capsys):
    assert cli(["calibrate", str(runs / "new5"), "--data", str(runs / "s2.npz"), "--out", str(runs / "x")]) == 2
    assert "not trained with a shared core" in capsys.readouterr().err
    assert cli(["calibrate", str(runs / "ref"), "--data", str(runs / "s2.npz"), "--out", str(runs / "x"),
                "--labelled-trials", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
    # Several sessions without --shared train on Ray (tests/test_sweep.py, inside a loopback-only namespace);
    # here only the refusals that come before Ray starts.
    assert cli(["train", "--shared", "--validation", "--data", str(runs / "s0.npz"), str(runs / "s1.npz"),
                "--out", str(runs / "y")]) == 2
    assert "with --shared, train without it" in capsys.readouterr().err
    assert cli(["train", "--shared", "--address", "127.0.0.1:1", "--data", str(runs / "s0.npz"),
                str(runs / "s1.npz"), "--out", str(runs / "y")]) == 2
    assert "without --shared" in capsys.readouterr().err
    assert not (runs / "y").exists()


def test_report_draws_a_calibrated_runs_accuracy_against_labelled_trials(runs):
    from swapvae.training.report import write_report

    written = write_report(runs / "new5", out=runs / "figs")
    assert "calibration.png" in {p.name for p in written}
    assert (runs / "figs" / "calibration.png").stat().st_size > 5000


def test_a_readout_without_labels_is_the_reference_sessions_and_refused_with_a_tuned_core(shared, sessions):
    from swapvae.training.calibration import calibrated_readout, reference_rows

    a, b, c = sessions
    cfg = shared.config_.with_overrides(readout=CONFIG["readout"])
    new = shared.calibrate(c.counts, trial=c.trial)
    reference = reference_rows(shared.sessions_, [a, b], cfg)
    assert reference.z.shape[1] == 8 and len(np.unique(reference.trial)) == len(a.trials) + len(b.trials)
    fit = calibrated_readout(new, c, 0, reference, cfg)
    z = new.transform(c.counts)
    assert fit.readout.proba(fit.readout.windows(z, c.trial)).shape == (c.n_bins, cfg.readout.n_directions)
    with pytest.raises(ValueError, match="needs the reference sessions' labelled bins"):
        calibrated_readout(new, c, 0, None, cfg)
    with pytest.raises(ValueError, match="fine-tuned core"):
        calibrated_readout(new, c, 0, reference, cfg.with_overrides(calibrate={"core_lr": 1e-4}))
    with pytest.raises(ValueError, match="2 training splits for 3 sessions"):
        reference_rows([*shared.sessions_, new], [a, b], cfg)
