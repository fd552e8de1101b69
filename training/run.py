"""``swapvae train`` and ``swapvae evaluate``: a run directory (training.rundir) from a session
and a config, and its metrics table."""
from __future__ import annotations

from pathlib import Path

from swapvae.schemas import SwapVAEConfig
from swapvae.schemas.session import split_session
from swapvae.training.data import load_session
from swapvae.training.estimator import SwapVAE
from swapvae.training.evaluate import evaluate
from swapvae.training.rundir import RunDir
from swapvae.training.staging import refuse_existing, staged


def train_run(data: str, out: str | Path, config: SwapVAEConfig, progress: bool = True,
              options: dict | None = None, force: bool = False) -> dict:
    """Load (``options``: ``load_session``'s keywords for an NWB file), split, fit, evaluate;
    write everything into ``out``; return the metrics. ``out`` appears whole when training and
    evaluation are done (training.staging); an existing ``out`` is refused unless ``force``,
    and then replaced only then. Until then the run is in ``.OUT.partial`` beside it, which a
    training that stops early leaves there with its last checkpoint."""
    out = Path(out)
    refuse_existing(out, force, "run")  # before anything is read or trained
    options = {k: v for k, v in (options or {}).items() if v is not None}
    session = load_session(data, min_trials=config.data.min_trials, **options)
    split = split_session(session, config.data.train_fraction, config.data.static_std)
    with staged(out, force=force, what="run", keep_partial=True) as stage:
        run = RunDir.create(stage, config, data, session.name, options)
        est = SwapVAE(config=config, verbose=progress).fit(
            split.train.counts, trial=split.train.trial, bin_in_trial=split.train.bin_in_trial, neurons=split.neurons,
            bin_size_s=session.bin_size_s, checkpoint=run.checkpoint, held_out=split.test.counts)
        run.save_history(est.history_)
        metrics, readout = evaluate(est, split, config.readout)
        metrics["train_seconds"] = est.train_seconds_
        if readout is not None:
            run.save_readout(readout)
        run.save_metrics(metrics)
    return metrics


def evaluate_run(run_dir: str | Path, data: str | None = None, options: dict | None = None,
                 other_session: bool = False) -> dict:
    """The run's metrics again: on its own recording (found where the run says, or at ``data``:
    the same file elsewhere), or on another session with the same split rule (``other_session``)."""
    run = RunDir(run_dir)
    loaded = run.load(data, options=options, other_session=other_session)
    run.require_labels(loaded)
    metrics, _ = evaluate(loaded.estimator, loaded.split, loaded.config.readout)
    metrics["train_seconds"] = loaded.estimator.train_seconds_
    return metrics


ROWS = (  # label, metrics key prefix, suffix, history key
    ("Swap-VAE [c, mu], causal history", "", "", "history_bins"),
    ("Swap-VAE [c, mu], per bin (paper)", "", "_per_bin", None),
    ("  content c, per bin", "", "_content", None),
    ("  style mu, per bin", "", "_style", None),
    ("raw rates, causal history", "raw_", "", "raw_history_bins"),
    ("raw rates, per bin", "raw_", "_per_bin", None),
)


def format_table(metrics: dict) -> str:
    """The metrics as a table: the product readout first, the paper's protocol and the raw-rate
    baselines under the same rules beside it."""
    bps = (f"held-out reconstruction: {metrics['bits_per_spike']:.3f} bits per spike over a mean-rate model "
           f"(test bins)\n" if "bits_per_spike" in metrics else "")
    if "reach_acc" not in metrics:
        return (f"reach readouts: {metrics.get('readout', 'none')}\n{bps}"
                f"training time: {metrics.get('train_seconds', 0):.1f} s")
    head = ("readout", "k", "acc", "delta-acc", "velocity R^2")
    rows = []
    for label, pre, suf, hist in ROWS:
        if f"{pre}reach_acc{suf}" not in metrics:
            continue
        vel = metrics.get(f"{pre}velocity_r2{suf}")
        rows.append((label, str(metrics[hist]) if hist else "1", f"{metrics[f'{pre}reach_acc{suf}']:.3f}",
                     f"{metrics[f'{pre}reach_delta_acc{suf}']:.3f}", "" if vel is None else f"{vel:.3f}"))
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in [head, *rows]]
    if bps:
        lines.append(bps.rstrip())
    lines.append(f"direction on {metrics.get('n_test_bins', '?')} moving test bins, velocity on all "
                 f"{metrics.get('n_test_bins_all', '?')}; raw-rate velocity with history is the Wiener filter; "
                 f"training time {metrics.get('train_seconds', float('nan')):.1f} s")
    return "\n".join(lines)
