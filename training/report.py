"""``swapvae report RUN_DIR``: figures of what a trained run learned and how it decodes, as PNG
(or PDF, SVG: ``--format``) at a print resolution (``--dpi``).

    embedding            2-D PCA of the content and style spaces (the full space for a VAE):
                         training bins as dots, test bins as crosses, coloured by reach
                         direction and by time in trial (by time alone without labels)
    trajectories         trial-averaged latent trajectories per direction (first 9 bins)
    reconstruction       reconstructed vs actual rates of example neurons on test trials
    generation           per-direction mean rates of generated vs real bins (content models)
    training_curves      the loss terms per epoch, and the reconstruction of training and
                         held-out bins
    confusion            decoded vs true direction on the moving test bins (product readout)
    velocity             decoded vs true hand velocity over the first test trials
    lost_channels        direction accuracy with 10-40% of the channels silenced, beside raw rates
    calibration          (a calibrated run, ``swapvae calibrate``) acc and delta-acc against the
                         number N of labelled trials its readout learns from, beside raw rates

Reach direction is circular: its classes are coloured from a cyclic map (neighbouring
directions in neighbouring hues, 315 deg next to 0) and labelled in degrees. PCA is fitted on
the training bins only and is linear, so what the figures show is in the representation, not
made by the projection. Without reach labels a session gets the training curves, the embedding
by time in trial and the reconstruction.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from swapvae.runtime.reach import classes_of_angles, r2_scores
from swapvae.schemas.session import Session, Split
from swapvae.training.metrics import TEMPORAL_BINS, trial_average
from swapvae.training.readout import Readout, fit_readout
from swapvae.training.robustness import lost_channel_scores
from swapvae.training.rundir import FIGURES_DIR, RunDir

FIGURES = ("embedding", "trajectories", "reconstruction", "generation", "training_curves", "confusion", "velocity",
           "lost_channels")
FORMATS = ("png", "pdf", "svg")
NLL_NOTE = "Poisson NLL without its constant (the sum of log x! over a bin's counts), so it can be negative"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _spaces(est) -> list[str]:
    return ["content", "style"] if est.config_.model.content_dim else ["full"]


def _pca(z_fit: np.ndarray, k: int = 2):
    """Projection onto the top-k principal axes of ``z_fit`` (a function of new z)."""
    mean = z_fit.mean(axis=0)
    _, _, vt = np.linalg.svd(z_fit - mean, full_matrices=False)
    axes = vt[:k].T
    if axes.shape[1] < k:  # fewer dimensions than k: pad with zeros
        axes = np.pad(axes, ((0, 0), (0, k - axes.shape[1])))
    return lambda z: (z - mean) @ axes


def direction_colors(n: int) -> np.ndarray:
    """One colour per direction class from a cyclic map: class d of n at d / n of the circle."""
    return _plt().get_cmap("hsv")(np.arange(n) / n)


def degrees(d: int, n: int) -> str:
    return f"{360 * d / n:g}\N{DEGREE SIGN}"


def _direction_legend(ax, n: int, **kw) -> None:
    colors = direction_colors(n)
    for d in range(n):
        ax.plot([], [], "o", color=colors[d], label=degrees(d, n))
    ax.legend(title="reach direction", fontsize=7, **kw)


def plot_embedding(est, split: Split):
    """By reach direction and by time in trial; by time alone for a session without labels."""
    plt = _plt()
    spaces = _spaces(est)
    labelled = split.train.has_labels
    n_time = int(max(split.train.bin_in_trial.max(), split.test.bin_in_trial.max())) + 1
    cols = 2 if labelled else 1
    fig, axes = plt.subplots(len(spaces), cols, figsize=(5.5 * cols, 4.8 * len(spaces)), squeeze=False)
    if labelled:
        n_dir = int(max(split.train.target.max(), split.test.target.max())) + 1
        colors = direction_colors(n_dir)
    for row, space in zip(axes, spaces):
        proj = _pca(est.transform(split.train.counts, space))
        for part, marker, alpha in ((split.train, ".", 0.45), (split.test, "x", 0.8)):
            xy = proj(est.transform(part.counts, space))
            if labelled:
                row[0].scatter(xy[:, 0], xy[:, 1], c=colors[part.target], marker=marker, s=14, alpha=alpha,
                               linewidths=0.8)
            sc = row[-1].scatter(xy[:, 0], xy[:, 1], c=part.bin_in_trial, cmap="viridis", vmin=0, vmax=n_time - 1,
                                 marker=marker, s=14, alpha=alpha, linewidths=0.8)
        fig.colorbar(sc, ax=row[-1], label=f"bin in trial (0 = trial start; bins of {split.train.bin_size_s:g} s)")
        if labelled:
            _direction_legend(row[0], n_dir, loc="best")
        for ax, by in zip(row, ("reach direction", "time in trial") if labelled else ("time in trial",)):
            ax.set(title=f"{space} space, by {by}", xlabel="PC 1", ylabel="PC 2")
    fig.suptitle(f"{split.train.name}: 2-D PCA of the latents, fitted on the training bins "
                 f"(dots: training bins, crosses: test bins)")
    return fig


def plot_trajectories(est, split: Split, n_time: int = TEMPORAL_BINS):
    plt = _plt()
    spaces = [*_spaces(est), "full"] if est.config_.model.content_dim else ["full"]
    session = _concat(split)
    n_dir = int(session.target.max()) + 1
    n_time = min(n_time, int(session.bin_in_trial.max()) + 1)
    colors = direction_colors(n_dir)
    fig, axes = plt.subplots(1, len(spaces), figsize=(5 * len(spaces), 4.6), squeeze=False)
    for ax, space in zip(axes[0], spaces):
        proj = _pca(est.transform(split.train.counts, space))
        avg, n = trial_average(est.transform(session.counts, space), session.target, session.bin_in_trial, n_time)
        for d in range(n_dir):
            xy = proj(avg[d][n[d] > 0])
            if len(xy):
                ax.plot(xy[:, 0], xy[:, 1], "-", color=colors[d], lw=1.8)
                ax.plot(xy[0, 0], xy[0, 1], "o", color=colors[d], ms=5)
                ax.plot(xy[-1, 0], xy[-1, 1], ">", color=colors[d], ms=7)
        ax.set(title=f"{space} space", xlabel="PC 1", ylabel="PC 2")
    _direction_legend(axes[0][-1], n_dir, loc="best")
    fig.suptitle(f"trial-averaged latent trajectories per direction, bins 0-{n_time - 1} (o start, > end)")
    return fig


def example_neurons(est, train: Session, k: int = 4) -> np.ndarray:
    """Indices (among the kept neurons) of the ``k`` most direction-tuned ones on training bins,
    or without labels the ``k`` whose trial-averaged rate varies most over time in trial."""
    x = train.counts[:, est.neurons_]
    if train.has_labels:
        avg, n = trial_average(x, train.target, np.zeros_like(train.target), 1)
        return np.argsort(-np.nanvar(avg[n[:, 0] > 0, 0], axis=0))[:k]
    avg, n = trial_average(x, np.zeros(len(x), int), train.bin_in_trial, int(train.bin_in_trial.max()) + 1)
    return np.argsort(-np.nanvar(avg[0][n[0] > 0], axis=0))[:k]


def plot_reconstruction(est, split: Split, n_time: int = TEMPORAL_BINS, n_trials: int = 6):
    plt = _plt()
    test = split.test
    hz = 1.0 / test.bin_size_s
    neurons = example_neurons(est, split.train)
    actual = test.counts[:, est.neurons_] * hz
    recon = est.reconstruct(test.counts) / est.input_scale * hz
    n_time = min(n_time, int(test.bin_in_trial.max()) + 1)
    groups = test.target if test.has_labels else np.zeros(test.n_bins, int)  # by direction, or all trials
    act_avg, n = trial_average(actual, groups, test.bin_in_trial, n_time)
    rec_avg, _ = trial_average(recon, groups, test.bin_in_trial, n_time)
    colors = direction_colors(act_avg.shape[0]) if test.has_labels else ["C0"]
    rows = np.flatnonzero(np.isin(test.trial, np.unique(test.trial)[:n_trials]))
    fig, axes = plt.subplots(2, len(neurons), figsize=(4.2 * len(neurons), 7.5), squeeze=False)
    for j, nrn in enumerate(neurons):
        ax = axes[0][j]
        for d in range(act_avg.shape[0]):
            if (n[d] > 0).all():
                ax.plot(act_avg[d, :, nrn], "-", color=colors[d], lw=1.5)
                ax.plot(rec_avg[d, :, nrn], "--", color=colors[d], lw=1.5)
        ax.set(title=f"neuron {est.neurons_[nrn]}: test trial average", xlabel="bin in trial", ylabel="rate (Hz)")
        ax = axes[1][j]
        ax.step(np.arange(len(rows)), actual[rows, nrn], where="mid", color="0.5", lw=1, label="actual")
        ax.plot(np.arange(len(rows)), recon[rows, nrn], color="C3", lw=1.6, label="reconstructed")
        for b in np.flatnonzero(np.diff(test.trial[rows]) != 0):
            ax.axvline(b + 0.5, color="0.85", lw=0.8)
        ax.set(title=f"neuron {est.neurons_[nrn]}: first {n_trials} test trials", xlabel="test bin", ylabel="rate (Hz)")
    axes[0][0].plot([], [], "k-", label="actual")
    axes[0][0].plot([], [], "k--", label="reconstructed")
    if test.has_labels:
        _direction_legend(axes[0][-1], act_avg.shape[0], loc="best")
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    fig.suptitle("reconstructed vs actual rates of the " + ("most direction-tuned neurons (colour: reach direction)"
                 if test.has_labels else "neurons that vary most over a trial (all test trials averaged)"))
    return fig


def plot_generation(est, split: Split, seed: int = 0):
    """Per direction and neuron: mean rate of real training bins vs of generated bins whose
    content comes from those bins and style from the prior. False if the model has no content."""
    if not est.config_.model.content_dim:
        return None
    from swapvae.training.generate import generate

    plt = _plt()
    rng = np.random.default_rng(seed)
    train = split.train
    hz = 1.0 / train.bin_size_s
    n_dir = int(train.target.max()) + 1
    colors = direction_colors(n_dir)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    lim = 0.0
    for d in range(n_dir):
        real = train.counts[train.target == d][:, est.neurons_]
        if not len(real):
            continue
        for ax, style in zip(axes, ("prior", "bins")):
            gen, _ = generate(est, train.counts[train.target == d], 500, rng, style=style, style_counts=train.counts)
            x, y = real.mean(axis=0) * hz, gen.mean(axis=0) * hz
            ax.scatter(x, y, s=8, color=colors[d], alpha=0.7)
            lim = max(lim, x.max(), y.max())
    for ax, style in zip(axes, ("style from the prior", "style from other bins")):
        ax.plot([0, lim], [0, lim], "k:", lw=1)
        ax.set(title=f"generated, {style}", xlabel="real mean rate (Hz)", ylabel="generated mean rate (Hz)")
    _direction_legend(axes[0], n_dir, loc="upper left")
    fig.suptitle("per-direction mean rate of each neuron: real training bins vs 500 generated bins")
    return fig


def plot_training_curves(history: list[dict]):
    """The loss terms on the training batches per epoch, and where the history has them the
    reconstruction of fixed training bins and of held-out bins (the test trials: watched, never
    used to choose anything)."""
    plt = _plt()
    terms = [k for k in ("loss", "rec", "kl", "align") if history and k in history[0]]
    names = {"loss": "total loss", "rec": "reconstruction (Poisson NLL)", "kl": "KL (style)", "align": "alignment"}
    watched = [h for h in history if "rec_held_out" in h]
    fig, axes = plt.subplots(1, len(terms) + bool(watched), figsize=(3.8 * (len(terms) + bool(watched)), 3.6),
                             squeeze=False)
    epochs = [h["epoch"] for h in history]
    for ax, term in zip(axes[0], terms):
        values = np.array([h[term] for h in history])
        ax.plot(epochs, values, lw=1.5, color="C0", label="training batches")
        if (values > 0).all() and values.max() / max(values.min(), 1e-12) > 20:
            ax.set_yscale("log")
        ax.set(title=names[term], xlabel="epoch", ylabel="mean per batch")
    if watched:
        ax = axes[0][-1]
        e = [h["epoch"] for h in watched]
        ax.plot(e, [h["rec_train"] for h in watched], lw=1.5, color="C0", label="training bins")
        ax.plot(e, [h["rec_held_out"] for h in watched], lw=1.5, color="C3", label="held-out bins (test trials)")
        ax.set(title="reconstruction of the denoised rates", xlabel="epoch", ylabel="Poisson NLL per bin")
        ax.legend(fontsize=8)
    fig.suptitle(f"training: {NLL_NOTE}")
    return fig


def plot_confusion(readout: Readout, z_test: np.ndarray, test: Session, cfg):
    plt = _plt()
    moving = test.speed > cfg.speed_threshold
    w = readout.windows(z_test, test.trial)[moving]
    n = cfg.n_directions
    decoded = classes_of_angles(readout.class_angles, n)[readout.proba(w).argmax(1)]
    true = test.target[moving]
    counts = np.zeros((n, n), int)
    np.add.at(counts, (true, decoded), 1)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                ax.text(j, i, counts[i, j], ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, label="share of the true direction's bins")
    ticks = [degrees(d, n) for d in range(n)]
    ax.set(xticks=range(n), yticks=range(n), xticklabels=ticks, yticklabels=ticks,
           xlabel="decoded reach direction (most probable class)", ylabel="true reach direction",
           title=f"direction on {moving.sum()} moving test bins (window of {readout.history_bins} bins)")
    return fig


def plot_velocity(readout: Readout, z_test: np.ndarray, test: Session, n_trials: int = 4):
    plt = _plt()
    pred = readout.velocity(readout.windows(z_test, test.trial))
    r2 = r2_scores(pred, test.velocity)
    rows = np.flatnonzero(np.isin(test.trial, np.unique(test.trial)[:n_trials]))
    t = np.arange(len(rows)) * test.bin_size_s
    fig, axes = plt.subplots(2, 1, figsize=(9, 5.6), sharex=True)
    for ax, c, name in zip(axes, range(2), ("vx", "vy")):
        ax.plot(t, test.velocity[rows, c], "k-", lw=1.4, label="true")
        ax.plot(t, pred[rows, c], "C3-", lw=1.4, label="decoded")
        for b in np.flatnonzero(np.diff(test.trial[rows]) != 0):
            ax.axvline(t[b] + test.bin_size_s / 2, color="0.8", lw=0.8)
        ax.set(ylabel=f"{name} ({test.velocity_unit or 'unit not recorded'})",
               title=f"{name}: R^2 {r2[c]:.3f} on all test bins")
    axes[0].legend(fontsize=8)
    axes[1].set(xlabel=f"time over the first {n_trials} test trials (s; grey lines: trial boundaries)")
    fig.suptitle(f"hand velocity, decoded from a window of {readout.history_bins} bins")
    return fig


def plot_lost_channels(est, readout: Readout, split: Split, cfg, draws: int = 5):
    """The run's decoder and the same rules on raw rates, with test channels silenced."""
    plt = _plt()
    raw_cfg = cfg.model_copy(update={"scaling": "feature"})
    rates = lambda c: c[:, est.neurons_] / split.test.bin_size_s  # noqa: E731
    raw_readout = fit_readout(rates, split.train, est.neurons_, raw_cfg, est.config_.seed).readout
    rows = {"this model": lost_channel_scores(est.transform, readout, split, est.neurons_, cfg, draws=draws),
            "raw rates": lost_channel_scores(rates, raw_readout, split, est.neurons_, raw_cfg, draws=draws)}
    fig, ax = plt.subplots(figsize=(6, 4.4))
    for (name, scores), color in zip(rows.items(), ("C0", "0.4")):
        fr = [float(f) for f in scores]
        acc = [scores[f]["reach_acc"] for f in scores]
        ax.errorbar(np.array(fr) * 100, [np.mean(a) for a in acc], yerr=[np.std(a) for a in acc], color=color,
                    marker="o", capsize=3, label=name)
    ax.set(xlabel="kept channels silenced at test time (%)", ylabel="direction acc (moving test bins)",
           title=f"lost channels: {draws} random draws each (mean +- sd)", ylim=(0, 1))
    ax.legend()
    return fig


def plot_calibration(run: RunDir, est, split: Split, grid=(0, 5, 10, 20, None)):
    """A calibrated run's readout from its first N labelled training trials (0: the reference
    sessions' readout, where the reference run is at hand), and raw rates with the same trials,
    scored on the test trials, against N (None: all)."""
    from swapvae.training.calibration import calibrated_readout
    from swapvae.training.evaluate import score
    from swapvae.training.readout import first_trials, fit_readout_on, labelled

    plt = _plt()
    cfg = est.config_
    reference_run = RunDir(run.source()["calibrated_from"])
    reference = reference_run.reference() if (reference_run.path / "reference.npz").is_file() else None
    n_all = len(split.train.trials)
    ns = [n for n in grid if (n != 0 or (reference is not None and cfg.calibrate.core_lr == 0))
          and (n is None or n <= n_all)]
    raw = lambda c: c[:, est.neurons_] / split.train.bin_size_s  # noqa: E731
    raw_cfg = cfg.readout.model_copy(update={"scaling": "feature"})
    z_test = est.transform(split.test.counts)
    rows = {"this model": [], "raw rates": []}
    for n in ns:
        fit = calibrated_readout(est, split.train, n, reference, cfg)
        rows["this model"].append(score(fit.readout, z_test, split.test, cfg.readout))
        if n != 0:
            rr = fit_readout_on(labelled(raw, first_trials(split.train, n), est.neurons_, raw_cfg, cfg.seed), raw_cfg)
            rows["raw rates"].append(score(rr.readout, raw(split.test.counts), split.test, raw_cfg))
    x = [n_all if n is None else n for n in ns]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for (name, scores), color in zip(rows.items(), ("C0", "0.4")):
        xs = x if name == "this model" else [v for v, n in zip(x, ns) if n != 0]
        ax.plot(xs, [s["reach_acc"] for s in scores], "o-", color=color, label=f"{name}: acc")
        ax.plot(xs, [s["reach_delta_acc"] for s in scores], "s--", color=color, label=f"{name}: delta-acc")
    ax.set(xlabel=f"labelled training trials N (all = {n_all}; 0: the reference sessions' readout)",
           ylabel="share of moving test bins", ylim=(0, 1),
           title=f"{split.train.name}: readout from the first N labelled trials")
    ax.legend(fontsize=8)
    return fig


def _concat(split: Split) -> Session:
    a, b = split.train, split.test
    cat = lambda x, y: np.concatenate([x, y])  # noqa: E731
    return Session(cat(a.counts, b.counts), cat(a.trial, b.trial), cat(a.bin_in_trial, b.bin_in_trial),
                   cat(a.target, b.target), cat(a.velocity, b.velocity), a.bin_size_s, a.name, a.velocity_unit)


def write_report(run_dir: str | Path, data: str | None = None, out: str | Path | None = None,
                 options: dict | None = None, other_session: bool = False, fmt: str = "png",
                 dpi: int = 150) -> list[Path]:
    """The figures of a run (on its own recording, found where the run says or at ``data``, or
    on another session with ``other_session``), as ``fmt`` files (png, pdf, svg) at ``dpi``;
    those drawn by reach direction only for a session with labels."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    if not 30 <= dpi <= 1200:
        raise ValueError(f"--dpi {dpi}: between 30 and 1200")
    run = RunDir(run_dir)
    loaded = run.load(data, options=options, other_session=other_session)
    run.require_labels(loaded)
    est, split, cfg = loaded.estimator, loaded.split, loaded.config.readout
    out = Path(out) if out is not None else run.path / FIGURES_DIR
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    written = []

    def draw(name: str, plot, *a) -> None:
        fig = plot(*a)
        if fig is not None:
            fig.tight_layout()
            fig.savefig(out / f"{name}.{fmt}", dpi=dpi)
            plt.close(fig)
            written.append(out / f"{name}.{fmt}")

    if est.history_:
        draw("training_curves", plot_training_curves, est.history_)
    draw("embedding", plot_embedding, est, split)
    draw("reconstruction", plot_reconstruction, est, split)
    if not split.train.has_labels:
        return written
    draw("trajectories", plot_trajectories, est, split)
    draw("generation", plot_generation, est, split)
    readout = run.readout()
    z_test = est.transform(split.test.counts)
    draw("confusion", plot_confusion, readout, z_test, split.test, cfg)
    draw("velocity", plot_velocity, readout, z_test, split.test)
    draw("lost_channels", plot_lost_channels, est, readout, split, cfg)
    if "calibrated_from" in run.source():
        draw("calibration", plot_calibration, run, est, split)
    return written
