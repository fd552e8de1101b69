"""``swapvae report RUN_DIR``: PNG figures of what a trained run learned and how it decodes.

    embedding.png        2-D PCA of the content and style spaces (the full space for a VAE):
                         training bins as dots, test bins as crosses, coloured by reach
                         direction and by time in trial
    trajectories.png     trial-averaged latent trajectories per direction (first 9 bins)
    reconstruction.png   reconstructed vs actual rates of example neurons on test trials
    generation.png       per-direction mean rates of generated vs real bins (content models)
    training_curves.png  the loss terms per epoch
    confusion.png        decoded vs true direction on the moving test bins (product readout)
    velocity.png         decoded vs true hand velocity over the first test trials
    lost_channels.png    direction accuracy with 10-40% of the channels silenced, beside raw rates

Directions have one fixed colour each (a qualitative palette: no two classes alike). PCA is
fitted on the training bins only and is linear, so what the figures show is in the
representation, not made by the projection. The readout figures need a labelled session.
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

FIGURES = ("embedding.png", "trajectories.png", "reconstruction.png", "generation.png", "training_curves.png",
           "confusion.png", "velocity.png", "lost_channels.png")


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
    """One fixed colour per direction class: tab10's first n (distinct, no wrap-around)."""
    plt = _plt()
    return plt.get_cmap("tab10" if n <= 10 else "tab20")(np.arange(n))


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def _direction_legend(ax, n: int, **kw) -> None:
    colors = direction_colors(n)
    for d in range(n):
        ax.plot([], [], "o", color=colors[d], label=f"{d} ({360 * d / n:.0f} deg)")
    ax.legend(title="direction", fontsize=7, **kw)


def plot_embedding(est, split: Split, path: Path) -> None:
    plt = _plt()
    spaces = _spaces(est)
    n_dir = int(max(split.train.target.max(), split.test.target.max())) + 1
    colors = direction_colors(n_dir)
    n_time = int(max(split.train.bin_in_trial.max(), split.test.bin_in_trial.max())) + 1
    fig, axes = plt.subplots(len(spaces), 2, figsize=(11, 4.8 * len(spaces)), squeeze=False)
    for row, space in zip(axes, spaces):
        proj = _pca(est.transform(split.train.counts, space))
        for part, marker, alpha in ((split.train, ".", 0.45), (split.test, "x", 0.8)):
            xy = proj(est.transform(part.counts, space))
            row[0].scatter(xy[:, 0], xy[:, 1], c=colors[part.target], marker=marker, s=14, alpha=alpha, linewidths=0.8)
            sc = row[1].scatter(xy[:, 0], xy[:, 1], c=part.bin_in_trial, cmap="viridis", vmin=0, vmax=n_time - 1,
                                marker=marker, s=14, alpha=alpha, linewidths=0.8)
        fig.colorbar(sc, ax=row[1], label="bin in trial (0 = trial start)")
        _direction_legend(row[0], n_dir, loc="best")
        for ax, by in zip(row, ("reach direction", "time in trial")):
            ax.set(title=f"{space} space, by {by}", xlabel="PC 1", ylabel="PC 2")
    fig.suptitle(f"{split.train.name}: 2-D PCA of the latents, fitted on the training bins "
                 f"(dots: training bins, crosses: test bins)")
    _save(fig, path)


def plot_trajectories(est, split: Split, path: Path, n_time: int = TEMPORAL_BINS) -> None:
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
    _save(fig, path)


def example_neurons(est, train: Session, k: int = 4) -> np.ndarray:
    """Indices (among the kept neurons) of the ``k`` most direction-tuned ones on training bins."""
    avg, n = trial_average(train.counts[:, est.neurons_], train.target, np.zeros_like(train.target), 1)
    return np.argsort(-np.nanvar(avg[n[:, 0] > 0, 0], axis=0))[:k]


def plot_reconstruction(est, split: Split, path: Path, n_time: int = TEMPORAL_BINS, n_trials: int = 6) -> None:
    plt = _plt()
    test = split.test
    hz = 1.0 / test.bin_size_s
    neurons = example_neurons(est, split.train)
    actual = test.counts[:, est.neurons_] * hz
    recon = est.reconstruct(test.counts) / est.input_scale * hz
    n_time = min(n_time, int(test.bin_in_trial.max()) + 1)
    act_avg, n = trial_average(actual, test.target, test.bin_in_trial, n_time)
    rec_avg, _ = trial_average(recon, test.target, test.bin_in_trial, n_time)
    colors = direction_colors(act_avg.shape[0])
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
        ax.step(np.arange(len(rows)), actual[rows, nrn], where="mid", color="0.5", lw=1, label="actual (Hz)")
        ax.plot(np.arange(len(rows)), recon[rows, nrn], color="C3", lw=1.6, label="reconstructed (Hz)")
        for b in np.flatnonzero(np.diff(test.trial[rows]) != 0):
            ax.axvline(b + 0.5, color="0.85", lw=0.8)
        ax.set(title=f"neuron {est.neurons_[nrn]}: first {n_trials} test trials", xlabel="test bin", ylabel="rate (Hz)")
    axes[0][0].plot([], [], "k-", label="actual")
    axes[0][0].plot([], [], "k--", label="reconstructed")
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    fig.suptitle("reconstructed vs actual rates of the most direction-tuned neurons (colour = direction)")
    _save(fig, path)


def plot_generation(est, split: Split, path: Path, seed: int = 0) -> bool:
    """Per direction and neuron: mean rate of real training bins vs of generated bins whose
    content comes from those bins and style from the prior. False if the model has no content."""
    if not est.config_.model.content_dim:
        return False
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
    _save(fig, path)
    return True


def plot_training_curves(history: list[dict], path: Path) -> None:
    plt = _plt()
    terms = [k for k in ("loss", "rec", "kl", "align") if history and k in history[0]]
    names = {"loss": "total loss", "rec": "reconstruction (Poisson NLL)", "kl": "KL (style)", "align": "alignment"}
    fig, axes = plt.subplots(1, len(terms), figsize=(3.6 * len(terms), 3.4), squeeze=False)
    epochs = [h["epoch"] for h in history]
    for ax, term in zip(axes[0], terms):
        values = np.array([h[term] for h in history])
        ax.plot(epochs, values, lw=1.5)
        if (values > 0).all() and values.max() / max(values.min(), 1e-12) > 20:
            ax.set_yscale("log")
        ax.set(title=names[term], xlabel="epoch", ylabel="mean per epoch")
    fig.suptitle("training loss terms")
    _save(fig, path)


def plot_confusion(readout: Readout, z_test: np.ndarray, test: Session, cfg, path: Path) -> None:
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
    ax.set(xticks=range(n), yticks=range(n), xlabel="decoded direction (most probable class)",
           ylabel="true direction", title=f"direction on {moving.sum()} moving test bins "
                                          f"(window of {readout.history_bins} bins)")
    _save(fig, path)


def plot_velocity(readout: Readout, z_test: np.ndarray, test: Session, path: Path, n_trials: int = 4) -> None:
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
        ax.set(ylabel=f"{name} (data's unit)", title=f"{name}: R^2 {r2[c]:.3f} on all test bins")
    axes[0].legend(fontsize=8)
    axes[1].set(xlabel=f"time over the first {n_trials} test trials (s; grey lines: trial boundaries)")
    fig.suptitle(f"hand velocity, decoded from a window of {readout.history_bins} bins")
    _save(fig, path)


def plot_lost_channels(est, readout: Readout, split: Split, cfg, path: Path, draws: int = 5) -> None:
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
    _save(fig, path)


def _concat(split: Split) -> Session:
    a, b = split.train, split.test
    cat = lambda x, y: np.concatenate([x, y])  # noqa: E731
    return Session(cat(a.counts, b.counts), cat(a.trial, b.trial), cat(a.bin_in_trial, b.bin_in_trial),
                   cat(a.target, b.target), cat(a.velocity, b.velocity), a.bin_size_s, a.name)


def write_report(run_dir: str | Path, data: str | None = None, out: str | Path | None = None,
                 options: dict | None = None, other_session: bool = False) -> list[Path]:
    """The figures of a run (on its own recording, found where the run says or at ``data``, or
    on another session with ``other_session``); those drawn by reach direction only for a
    session with labels."""
    run = RunDir(run_dir)
    loaded = run.load(data, options=options, other_session=other_session)
    est, split, cfg = loaded.estimator, loaded.split, loaded.config.readout
    out = Path(out) if out is not None else run.path / FIGURES_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def draw(name: str, plot, *a) -> None:
        if plot(*a, out / name) is not False:
            written.append(out / name)

    if est.history_:
        draw("training_curves.png", plot_training_curves, est.history_)
    if not split.train.has_labels:
        return written
    draw("embedding.png", plot_embedding, est, split)
    draw("trajectories.png", plot_trajectories, est, split)
    draw("reconstruction.png", plot_reconstruction, est, split)
    draw("generation.png", plot_generation, est, split)
    readout = run.readout()
    z_test = est.transform(split.test.counts)
    draw("confusion.png", plot_confusion, readout, z_test, split.test, cfg)
    draw("velocity.png", plot_velocity, readout, z_test, split.test)
    draw("lost_channels.png", plot_lost_channels, est, readout, split, cfg)
    return written
