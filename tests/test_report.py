"""``swapvae report``: every figure is written as a real PNG (or PDF, SVG), for Swap-VAE and for a
VAE run, and for a session without labels the ones that need none; what a paper reader checks:
a cyclic direction map labelled in degrees, a held-out curve, units, legends."""

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


def _pngs(names):
    return sorted(f"{n}.png" for n in names)


def test_cli_writes_every_figure(swap_run, capsys):
    assert cli(["report", str(swap_run)]) == 0
    out = swap_run / "figures"
    assert sorted(p.name for p in out.iterdir()) == _pngs(FIGURES)
    assert all(_is_png(out / name) for name in _pngs(FIGURES))
    assert str(out / "embedding.png") in capsys.readouterr().out


def test_format_and_print_resolution(swap_run, tmp_path):
    assert cli(["report", str(swap_run), "--out", str(tmp_path / "svg"), "--format", "svg"]) == 0
    assert sorted(p.suffix for p in (tmp_path / "svg").iterdir()) == [".svg"] * len(FIGURES)
    assert (tmp_path / "svg" / "embedding.svg").read_text().lstrip().startswith("<?xml")
    assert cli(["report", str(swap_run), "--out", str(tmp_path / "pdf"), "--format", "pdf"]) == 0
    assert (tmp_path / "pdf" / "confusion.pdf").read_bytes()[:5] == b"%PDF-"
    from PIL import Image

    low, high = (cli(["report", str(swap_run), "--out", str(tmp_path / str(d)), "--dpi", str(d)]) for d in (100, 300))
    assert low == high == 0
    w = [Image.open(tmp_path / str(d) / "velocity.png").size[0] for d in (100, 300)]
    assert w[1] == pytest.approx(3 * w[0], rel=0.02)
    with pytest.raises(SystemExit):  # argparse names the choices
        cli(["report", str(swap_run), "--format", "jpg"])
    with pytest.raises(ValueError, match="--dpi 5"):
        write_report(swap_run, out=tmp_path / "x", dpi=5)


def test_figures_a_paper_reader_accepts(swap_run):
    """Directions from a cyclic map, labelled in degrees; the held-out curve beside the training
    one, with the NLL's omitted constant said; the velocity's unit where the recording has one."""
    from dataclasses import replace

    from swapvae.training.report import direction_colors, plot_embedding, plot_training_curves, plot_velocity

    c = direction_colors(8)[:, :3]
    d = lambda i, j: np.linalg.norm(c[i] - c[j])  # noqa: E731
    assert d(0, 1) < d(0, 4) and d(0, 7) < d(0, 4) and d(3, 4) < d(3, 7)  # neighbours alike, 315 deg next to 0
    loaded = RunDir(swap_run).load()
    est, split = loaded.estimator, loaded.split
    fig = plot_embedding(est, split)
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert labels[:3] == ["0\N{DEGREE SIGN}", "45\N{DEGREE SIGN}", "90\N{DEGREE SIGN}"]
    fig = plot_training_curves(est.history_)
    lines = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert "held-out bins (test trials)" in lines and "training bins" in lines
    assert "without its constant" in fig._suptitle.get_text()
    test = replace(split.test, velocity_unit="cm/s")
    fig = plot_velocity(RunDir(swap_run).readout(), est.transform(test.counts), test)
    assert fig.axes[0].get_ylabel() == "vx (cm/s)"
    fig = plot_velocity(RunDir(swap_run).readout(), est.transform(split.test.counts), split.test)
    assert fig.axes[0].get_ylabel() == "vx (unit not recorded)"


def test_a_session_without_labels_gets_the_figures_that_need_none(tmp_path):
    from swapvae.schemas.session import write_npz
    from swapvae.training.simulate import simulate_reaching

    s = simulate_reaching(n_neurons=30, n_trials=40, seed=2)
    data = write_npz(type(s)(s.counts, s.trial, s.bin_in_trial, bin_size_s=s.bin_size_s, name="unlabelled"),
                     tmp_path / "unlabelled.npz")
    run = _run(tmp_path / "run", TINY, data=str(data))
    written = write_report(run, out=tmp_path / "figs")
    assert sorted(p.name for p in written) == _pngs(["training_curves", "embedding", "reconstruction"])
    assert all(_is_png(p) for p in written)


def test_vae_run_has_no_generation_figure(tmp_path):
    run = _run(tmp_path / "vae", {**TINY, "variant": "vae", "model": {"hidden": ["d", 16]}})
    written = write_report(run, out=tmp_path / "figs")
    assert sorted(p.name for p in written) == _pngs(set(FIGURES) - {"generation"})
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
        plot_confusion(readout, est.transform(split.test.counts), split.test, cfg)
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
