"""``swapvae report RUN_DIR``: PNG figures of what a trained run learned.

    embedding.png        2-D PCA of the content and style spaces (the full space for a VAE),
                         coloured by reach direction and by time in trial
    trajectories.png     trial-averaged latent trajectories per direction (first 9 bins)
    reconstruction.png   reconstructed vs actual rates of example neurons on test trials
    generation.png       per-direction mean rates of generated vs real bins (content models)
    training_curves.png  the loss terms per epoch

PCA is fitted on the training bins only and is linear, so what the figures show is in the
representation, not made by the projection. Reconstructions are of test trials.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from schemas.session import Session, Split
from training.data import load_options
from training.rundir import FIGURES_DIR, RunDir
from training.metrics import TEMPORAL_BINS, trial_average

FIGURES = ("embedding.png", "trajectories.png", "reconstruction.png", "generation.png", "training_curves.png")


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


def _direction_colors(n: int):
    plt = _plt()
    return plt.get_cmap("hsv")(np.arange(n) / n)  # cyclic, like the directions


def plot_embedding(est, split: Split, path: Path) -> None:
    plt = _plt()
    spaces = _spaces(est)
    session = _concat(split)
    n_dir = int(session.target.max()) + 1
    fig, axes = plt.subplots(len(spaces), 2, figsize=(10, 4.6 * len(spaces)), squeeze=False)
    for row, space in zip(axes, spaces):
        proj = _pca(est.transform(split.train.counts, space))
        xy = proj(est.transform(session.counts, space))
        sc = row[0].scatter(xy[:, 0], xy[:, 1], c=session.target, cmap="hsv", vmin=0, vmax=n_dir, s=6, alpha=0.7)
        fig.colorbar(sc, ax=row[0], label="reach direction")
        sc = row[1].scatter(xy[:, 0], xy[:, 1], c=session.bin_in_trial, cmap="viridis", s=6, alpha=0.7)
        fig.colorbar(sc, ax=row[1], label="bin in trial")
        for ax, by in zip(row, ("direction", "time in trial")):
            ax.set(title=f"{space} space, coloured by {by}", xlabel="PC 1", ylabel="PC 2")
    fig.suptitle(f"{session.name}: 2-D PCA (fitted on training bins) of all bins")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_trajectories(est, split: Split, path: Path, n_time: int = TEMPORAL_BINS) -> None:
    plt = _plt()
    spaces = [*_spaces(est), "full"] if est.config_.model.content_dim else ["full"]
    session = _concat(split)
    n_dir = int(session.target.max()) + 1
    n_time = min(n_time, int(session.bin_in_trial.max()) + 1)
    colors = _direction_colors(n_dir)
    fig, axes = plt.subplots(1, len(spaces), figsize=(5 * len(spaces), 4.6), squeeze=False)
    for ax, space in zip(axes[0], spaces):
        proj = _pca(est.transform(split.train.counts, space))
        avg, n = trial_average(est.transform(session.counts, space), session.target, session.bin_in_trial, n_time)
        for d in range(n_dir):
            xy = proj(avg[d][n[d] > 0])
            ax.plot(xy[:, 0], xy[:, 1], "-", color=colors[d], lw=1.8, label=f"dir {d}")
            ax.plot(xy[0, 0], xy[0, 1], "o", color=colors[d], ms=5)
            ax.plot(xy[-1, 0], xy[-1, 1], ">", color=colors[d], ms=7)
        ax.set(title=f"{space} space", xlabel="PC 1", ylabel="PC 2")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"trial-averaged latent trajectories per direction, bins 0-{n_time - 1} (o start, > end)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    n_dir = act_avg.shape[0]
    colors = _direction_colors(n_dir)
    rows = np.flatnonzero(np.isin(test.trial, np.unique(test.trial)[:n_trials]))
    fig, axes = plt.subplots(2, len(neurons), figsize=(4.2 * len(neurons), 7.5), squeeze=False)
    for j, nrn in enumerate(neurons):
        ax = axes[0][j]
        for d in range(n_dir):
            if (n[d] > 0).all():
                ax.plot(act_avg[d, :, nrn], "-", color=colors[d], lw=1.5)
                ax.plot(rec_avg[d, :, nrn], "--", color=colors[d], lw=1.5)
        ax.set(title=f"neuron {est.neurons_[nrn]}: test trial average", xlabel="bin in trial", ylabel="rate (Hz)")
        ax = axes[1][j]
        ax.step(np.arange(len(rows)), actual[rows, nrn], where="mid", color="0.5", lw=1, label="actual counts")
        ax.plot(np.arange(len(rows)), recon[rows, nrn], color="C3", lw=1.6, label="reconstruction")
        for b in np.flatnonzero(np.diff(test.trial[rows]) != 0):
            ax.axvline(b + 0.5, color="0.85", lw=0.8)
        ax.set(title=f"neuron {est.neurons_[nrn]}: first {n_trials} test trials", xlabel="bin", ylabel="rate (Hz)")
    axes[0][0].plot([], [], "k-", label="actual")
    axes[0][0].plot([], [], "k--", label="reconstructed")
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    fig.suptitle("reconstructed vs actual rates of the most direction-tuned neurons (colour = direction)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_generation(est, split: Split, path: Path, seed: int = 0) -> bool:
    """Per direction and neuron: mean rate of real training bins vs of generated bins whose
    content comes from those bins and style from the prior. False if the model has no content."""
    if not est.config_.model.content_dim:
        return False
    from training.generate import generate

    plt = _plt()
    rng = np.random.default_rng(seed)
    train = split.train
    hz = 1.0 / train.bin_size_s
    n_dir = int(train.target.max()) + 1
    colors = _direction_colors(n_dir)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    lim = 0.0
    for d in range(n_dir):
        real = train.counts[train.target == d][:, est.neurons_]
        if not len(real):
            continue
        for ax, style in zip(axes, ("prior", "bins")):
            gen, _ = generate(est, train.counts[train.target == d], 500, rng, style=style, style_counts=train.counts)
            x, y = real.mean(axis=0) * hz, gen.mean(axis=0) * hz
            ax.scatter(x, y, s=8, color=colors[d], alpha=0.7, label=f"dir {d}")
            lim = max(lim, x.max(), y.max())
    for ax, style in zip(axes, ("style from the prior", "style from other bins")):
        ax.plot([0, lim], [0, lim], "k:", lw=1)
        ax.set(title=f"generated, {style}", xlabel="real mean rate (Hz)", ylabel="generated mean rate (Hz)")
    axes[0].legend(fontsize=7, markerscale=2)
    fig.suptitle("per-direction mean rate of each neuron: real training bins vs 500 generated bins")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_training_curves(history: list[dict], path: Path) -> None:
    plt = _plt()
    terms = [k for k in ("loss", "rec", "kl", "align") if history and k in history[0]]
    fig, axes = plt.subplots(1, len(terms), figsize=(3.6 * len(terms), 3.4), squeeze=False)
    epochs = [h["epoch"] for h in history]
    for ax, term in zip(axes[0], terms):
        values = np.array([h[term] for h in history])
        ax.plot(epochs, values, lw=1.5)
        if (values > 0).all() and values.max() / max(values.min(), 1e-12) > 20:
            ax.set_yscale("log")
        ax.set(title=term, xlabel="epoch")
    fig.suptitle("training loss terms (mean per epoch)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _concat(split: Split) -> Session:
    a, b = split.train, split.test
    cat = lambda x, y: np.concatenate([x, y])  # noqa: E731
    return Session(cat(a.counts, b.counts), cat(a.trial, b.trial), cat(a.bin_in_trial, b.bin_in_trial),
                   cat(a.target, b.target), cat(a.velocity, b.velocity), a.bin_size_s, a.name)


def write_report(run_dir: str | Path, data: str | None = None, out: str | Path | None = None,
                 options: dict | None = None) -> list[Path]:
    """The figures of a run (on its own data unless ``data`` is given); those coloured or
    averaged by reach direction only for a session with labels."""
    run = RunDir(run_dir)
    loaded = run.load(data, options=options)
    est, split = loaded.estimator, loaded.split
    out = Path(out) if out is not None else run.path / FIGURES_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if not split.train.has_labels:
        if est.history_:
            plot_training_curves(est.history_, out / "training_curves.png")
            written.append(out / "training_curves.png")
        return written
    plot_embedding(est, split, out / "embedding.png")
    plot_trajectories(est, split, out / "trajectories.png")
    plot_reconstruction(est, split, out / "reconstruction.png")
    written += [out / "embedding.png", out / "trajectories.png", out / "reconstruction.png"]
    if plot_generation(est, split, out / "generation.png"):
        written.append(out / "generation.png")
    if est.history_:
        plot_training_curves(est.history_, out / "training_curves.png")
        written.append(out / "training_curves.png")
    return written


def report_command(args) -> int:
    written = write_report(args.run_dir, args.data, args.out, load_options(args))
    for path in written:
        print(path)
    if not any(p.name == "embedding.png" for p in written):
        print("the session has no reach labels (target, velocity): the figures by direction were skipped")
    return 0
