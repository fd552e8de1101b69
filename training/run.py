"""``swapvae train``, ``swapvae calibrate`` and ``swapvae evaluate``: run directories
(training.rundir) from a session and a config (or a training that stopped, resumed), from
several sessions sharing one core, or from a new session calibrated onto such a core; and their
metrics tables."""
from __future__ import annotations

from pathlib import Path

from swapvae.schemas import SwapVAEConfig
from swapvae.schemas.session import split_session
from swapvae.training.calibration import calibrated_readout, reference_rows
from swapvae.training.data import load_session
from swapvae.training.estimator import SwapVAE
from swapvae.training.evaluate import evaluate
from swapvae.training.readout import ReadoutFit
from swapvae.training.rundir import RunDir, run_split
from swapvae.training.staging import partial_dir, refuse_existing, staged


def train_run(data: str, out: str | Path, config: SwapVAEConfig, progress: bool = True,
              options: dict | None = None, force: bool = False, validation: bool = False) -> dict:
    """Load (``options``: ``load_session``'s keywords for an NWB file), split, fit, evaluate;
    write everything into ``out``; return the metrics. ``out`` appears whole when training and
    evaluation are done (training.staging); an existing ``out`` is refused unless ``force``,
    and then replaced only then. Until then the run is in ``.OUT.partial`` beside it, which a
    training that stops early leaves there with its last checkpoint. ``validation``: trained
    and scored inside the training trials (``rundir.run_split``), for choosing settings."""
    out = Path(out)
    refuse_existing(out, force, "run")  # before anything is read or trained
    options = {k: v for k, v in (options or {}).items() if v is not None}
    session = load_session(data, min_trials=config.data.min_trials, **options)
    split = run_split(session, config, validation)
    with staged(out, force=force, what="run", keep_partial=True) as stage:
        run = RunDir.create(stage, config, data, session.name, options, validation)
        est = SwapVAE(config=config, verbose=progress).fit(
            split.train.counts, trial=split.train.trial, bin_in_trial=split.train.bin_in_trial, neurons=split.neurons,
            bin_size_s=session.bin_size_s, checkpoint=run.checkpoint, held_out=split.test.counts)
        return _finish(run, est, split, config)


def resume_run(out: str | Path, progress: bool = True, data: str | None = None, force: bool = False) -> dict:
    """A ``train_run`` into ``out`` that stopped early, continued from its last checkpoint (in
    ``.OUT.partial``) to the run an uninterrupted one writes: the same config and recording
    (``data``: where that recording is now, its sha256 checked), the same bits at the thread
    count it recorded."""
    out = Path(out)
    run = RunDir(partial_dir(out))
    if not run.checkpoint.is_file():
        state = " (it is complete)" if out.is_dir() and RunDir(out).checkpoint.is_file() else ""
        raise ValueError(f"nothing to resume for {out}{state}: {run.path} holds no checkpoint (a training into {out} "
                         f"that stopped after its first checkpoint leaves one)")
    if run.shared or "calibrated_from" in run.source():
        raise ValueError(f"{run.path}: a run trained with --shared, or calibrated, is trained again, not resumed")
    loaded = run.load(data)  # the recording checked as evaluate does, split as the run was
    config, split, session = loaded.config, loaded.split, loaded.session
    with staged(out, force=force, what="run", resume=True):
        est = SwapVAE(config=config, verbose=progress).fit(
            split.train.counts, trial=split.train.trial, bin_in_trial=split.train.bin_in_trial, neurons=split.neurons,
            bin_size_s=session.bin_size_s, checkpoint=run.checkpoint, held_out=split.test.counts,
            resume=run.checkpoint)
        return _finish(run, est, split, config)


def _finish(run: RunDir, est: SwapVAE, split, config: SwapVAEConfig) -> dict:
    """A trained run's history, evaluation, readout and metrics, written into ``run``."""
    run.save_history(est.history_)
    metrics, readout = evaluate(est, split, config.readout)
    metrics["train_seconds"] = est.train_seconds_
    if run.validation:
        metrics["split"] = "validation"
    if readout is not None:
        run.save_readout(readout)
    run.save_metrics(metrics)
    return metrics


def train_shared_run(datas: list[str], out: str | Path, config: SwapVAEConfig, progress: bool = True,
                     options: dict | None = None, force: bool = False) -> dict:
    """One model with a core shared across the sessions ``datas`` (training.sessions), each
    session split and evaluated as ``train_run`` does; the metrics by session. The run also
    keeps the sessions' labelled training bins as shared latents (a new day's readout without
    labels). ``options``: NWB options for every NWB file among them."""
    out = Path(out)
    refuse_existing(out, force, "run")
    if len(datas) < 1:
        raise ValueError("--shared needs at least one --data session")
    options = {k: v for k, v in (options or {}).items() if v is not None}
    sessions = [load_session(d, min_trials=config.data.min_trials,
                             **(options if str(d).endswith(".nwb") else {})) for d in datas]
    if len({s.bin_size_s for s in sessions}) > 1:
        raise ValueError("sessions with different bin sizes (" + ", ".join(f"{s.name}: {s.bin_size_s:g} s" for s in
                         sessions) + "): one core learns bins of one width; bin them alike (--bin-size for NWB)")
    names = [s.name for s in sessions]
    if len(set(names)) < len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    splits = [split_session(s, config.data.train_fraction, config.data.static_std) for s in sessions]
    with staged(out, force=force, what="run", keep_partial=True) as stage:
        run = RunDir.create_shared(stage, config, datas, names, options)
        est = SwapVAE(config=config, verbose=progress).fit(
            [sp.train.counts for sp in splits], trial=[sp.train.trial for sp in splits],
            bin_in_trial=[sp.train.bin_in_trial for sp in splits], neurons=[sp.neurons for sp in splits],
            bin_size_s=sessions[0].bin_size_s, checkpoint=run.checkpoint)
        run.save_history(est.history_)
        by_session = {}
        for i, (name, view, sp) in enumerate(zip(names, est.sessions_, splits)):
            metrics, readout = evaluate(view, sp, config.readout)
            if readout is not None:
                run.save_readout(readout, session=i)
            by_session[name] = {**metrics, "train_seconds": est.train_seconds_}
        labelled = [i for i, sp in enumerate(splits) if sp.train.has_labels]
        if labelled:
            run.save_reference(reference_rows([est.sessions_[i] for i in labelled],
                                              [splits[i].train for i in labelled], config))
        metrics = {"shared": True, "sessions": by_session, "train_seconds": est.train_seconds_}
        run.save_metrics(metrics)
    return metrics


def calibrate_run(ref_dir: str | Path, data: str, out: str | Path, labelled_trials: int | None = None,
                  seed: int | None = None, progress: bool = True, options: dict | None = None,
                  force: bool = False) -> dict:
    """A new session ``data`` fitted onto the shared core of the run ``ref_dir``
    (``SwapVAE.calibrate``), its readout from its first ``labelled_trials`` training trials (all
    if None; 0: the reference sessions' readout, training.calibration), scored on its test
    trials: an ordinary run at ``out``, with ``labelled_trials`` and the ``raw_*`` readouts of
    the same trials in its metrics."""
    out = Path(out)
    refuse_existing(out, force, "run")
    ref = RunDir(ref_dir)
    ref.source()  # FileNotFoundError naming the run directory if it is not one
    if not ref.shared:
        raise ValueError(f"{ref_dir} was not trained with a shared core (swapvae train --shared --data ...): "
                         f"calibrate fits a new session onto one")
    est = ref.estimator()
    est.config_ = est.config_.with_overrides(
        readout={"labelled_trials": labelled_trials}, **({} if seed is None else {"seed": seed}))
    options = {k: v for k, v in (options or {}).items() if v is not None}
    session = load_session(data, min_trials=est.config_.data.min_trials, **options)
    split = split_session(session, est.config_.data.train_fraction, est.config_.data.static_std)
    if labelled_trials and labelled_trials > len(split.train.trials):
        raise ValueError(f"--labelled-trials {labelled_trials}: {session.name} has {len(split.train.trials)} training "
                         f"trials")
    if labelled_trials != 0 and not split.train.has_labels:
        raise ValueError(f"{session.name} has no reach labels (target, velocity): calibrate it with "
                         f"--labelled-trials 0 (the reference readout), or give its labels")
    est.verbose = progress
    reference = ref.reference() if labelled_trials == 0 else None
    with staged(out, force=force, what="run", keep_partial=True) as stage:
        run = RunDir.create(stage, est.config_, data, session.name, options)
        new = est.calibrate(split.train.counts, trial=split.train.trial, bin_in_trial=split.train.bin_in_trial,
                            neurons=split.neurons, bin_size_s=session.bin_size_s, checkpoint=run.checkpoint,
                            held_out=split.test.counts)
        run.save_config(new.config_)
        run.save_source({**run.source(), "calibrated_from": str(ref.path.resolve())})
        run.save_history(new.history_)
        fit = calibrated_readout(new, split.train, labelled_trials, reference, new.config_)
        metrics, readout = evaluate(new, split, new.config_.readout, fit)
        metrics["train_seconds"] = new.train_seconds_
        run.save_readout(readout)
        run.save_metrics(metrics)
    return metrics


def evaluate_run(run_dir: str | Path, data: str | None = None, options: dict | None = None,
                 other_session: bool = False) -> dict:
    """The run's metrics again: on its own recording (found where the run says, or at ``data``:
    the same file elsewhere), or on another session with the same split rule (``other_session``).
    A calibrated run's readout is scored as it was fitted (its labelled trials, or none); a
    shared run's metrics are those it wrote, by session."""
    run = RunDir(run_dir)
    if run.shared:
        return run.metrics()
    loaded = run.load(data, options=options, other_session=other_session)
    run.require_labels(loaded)
    fit = None
    if "calibrated_from" in run.source():
        readout = run.readout()
        fit = ReadoutFit(readout, {}, None, readout.history_bins, readout.history_bins)
    metrics, _ = evaluate(loaded.estimator, loaded.split, loaded.config.readout, fit)
    metrics["train_seconds"] = loaded.estimator.train_seconds_
    if run.validation:
        metrics["split"] = "validation"
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
    baselines under the same rules beside it; one per session for a shared run."""
    if metrics.get("shared"):
        return "\n\n".join(f"session {name}:\n{format_table(m)}" for name, m in metrics["sessions"].items())
    n = metrics.get("labelled_trials")
    note = "" if n is None else f"readouts fitted on the first {n} labelled training trials\n" if n else \
        "no labels: the reference sessions' readout\n"
    if metrics.get("split") == "validation":
        note += "scored on a validation split: the later training trials (split by data.train_fraction), the " \
                "test trials unused\n"
    return note + _table(metrics)


def _table(metrics: dict) -> str:
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
