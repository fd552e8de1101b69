"""``swapvae report``: every figure is written as a real PNG, for Swap-VAE and for a VAE run."""

import numpy as np
import pytest
import torch

from swapvae.cli import main as cli
from swapvae.schemas import SwapVAEConfig
from swapvae.schemas.session import split_session
from swapvae.training.data import load_session
from swapvae.training.report import FIGURES, _pca, example_neurons, write_report
from swapvae.training.run import train_run
from swapvae.training.rundir import RunDir

PNG = b"\x89PNG\r\n\x1a\n"
TINY = {"device": "cpu", "model": {"content_dim": 4, "style_dim": 4, "hidden": ["d", 16]},
        "optim": {"epochs": 2, "batch_size": 128}, "readout": {"C_grid": [0.1], "cv_folds": 2, "history_grid": [2],
                                                                "alpha_grid": [10.0]}}


def _run(tmp_path, raw, data="simulated"):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_run(data, tmp_path, SwapVAEConfig.model_validate(raw), progress=False)
    finally:
        torch.set_num_threads(threads)
    return tmp_path


@pytest.fixture(scope="module")
def swap_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("swap_run"), TINY)


def _is_png(path):
    return path.read_bytes()[:8] == PNG and path.stat().st_size > 5000  # a drawn figure, not an empty canvas


def test_cli_writes_every_figure(swap_run, capsys):
    assert cli(["report", str(swap_run)]) == 0
    out = swap_run / "figures"
    assert sorted(p.name for p in out.iterdir()) == sorted(FIGURES)
    assert all(_is_png(out / name) for name in FIGURES)
    assert str(out / "embedding.png") in capsys.readouterr().out


def test_vae_run_has_no_generation_figure(tmp_path):
    run = _run(tmp_path / "vae", {**TINY, "variant": "vae", "model": {"hidden": ["d", 16]}})
    written = write_report(run, out=tmp_path / "figs")
    assert sorted(p.name for p in written) == sorted(set(FIGURES) - {"generation.png"})
    assert all(_is_png(p) for p in written)


def test_report_on_the_synthetic_dataset(tmp_path):
    run = _run(tmp_path / "syn", {**TINY, "readout": {**TINY["readout"], "n_directions": 4}}, data="synthetic:1:50")
    written = write_report(run)
    assert len(written) == len(FIGURES) and all(_is_png(p) for p in written)


def test_errors_are_reported_without_traceback(tmp_path, swap_run, capsys):
    (tmp_path / "bare").mkdir()
    assert cli(["report", str(tmp_path / "bare")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert cli(["report", str(swap_run), "--data", "synthetic:0", "--out", str(tmp_path / "x")]) == 2
    assert "is not the data the run" in capsys.readouterr().err  # another session only when asked
    assert cli(["report", str(swap_run), "--data", "synthetic:0", "--other-session", "--out", str(tmp_path / "x")]) == 2
    assert "channels" in capsys.readouterr().err


def test_direction_colours_are_distinct_for_every_class():
    from swapvae.training.report import direction_colors

    for n in (4, 8, 12):
        colors = direction_colors(n)[:, :3]
        gaps = np.linalg.norm(colors[:, None] - colors[None], axis=-1) + np.eye(n)
        assert gaps.min() > 0.05, n  # no two classes alike (the hue wheel made 0 and 7 both red)


def test_confusion_counts_every_moving_test_bin_once(swap_run):
    from swapvae.training.report import plot_confusion

    loaded = RunDir(swap_run).load()
    est, split, cfg = loaded.estimator, loaded.split, loaded.config.readout
    readout = RunDir(swap_run).readout()
    calls = {}
    import matplotlib.axes

    real = matplotlib.axes.Axes.imshow

    def spy(self, share, **kw):
        calls["share"] = share
        return real(self, share, **kw)

    matplotlib.axes.Axes.imshow = spy
    try:
        plot_confusion(readout, est.transform(split.test.counts), split.test, cfg, swap_run / "c.png")
    finally:
        matplotlib.axes.Axes.imshow = real
    share = calls["share"]
    present = np.unique(split.test.target[split.test.speed > cfg.speed_threshold])
    np.testing.assert_allclose(share[present].sum(axis=1), 1.0)  # row-normalised: each true direction's bins


def test_pca_projects_onto_the_largest_variance():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 3)) * [10.0, 1.0, 0.1]
    xy = _pca(z)(z)
    assert xy.shape == (500, 2) and xy[:, 0].var() > 50 and xy[:, 1].var() < 2
    assert _pca(z[:, :1])(z[:, :1]).shape == (500, 2)  # fewer dimensions than the plot: padded


def test_example_neurons_are_the_direction_tuned_ones():
    split = split_session(load_session("simulated"))

    class Est:
        neurons_ = split.neurons

    picked = example_neurons(Est, split.train, k=4)
    tr = split.train
    tuning = np.var([tr.counts[tr.target == d][:, split.neurons].mean(0) for d in range(8)], axis=0)
    assert set(picked) == set(np.argsort(-tuning)[:4])
