"""Sweeps and many trials on Ray Tune (``swapvae sweep SPEC --out DIR``).

A SPEC (``schemas.sweep.SweepSpec``) lists sessions, seeds and a search space over config
fields: a grid (every point on every session and seed, one Tune trial each) or Optuna's TPE
(one Tune trial per point, run on every session and seed in turn and scored by their mean).
Each (session, point, seed) is an ordinary run directory, ``DIR/trials/SESSION/POINT/seedS``,
trained and scored on the validation split of the session's training trials (``swapvae train
--validation``: the test trials are never used to choose); its metrics.json is written once,
when it completes. Then the best point of each session (the mean score over seeds) is trained
again on all its training trials into ``DIR/chosen/SESSION`` (``swapvae train``), scored on its
test trials beside the raw rates of the same run, and with ``export`` written as a bundle.

Ray does the scheduling: a local Ray started here (loopback only, no dashboard), or a cluster
at ``address``. Fault tolerance rests on the run directories: a trial whose metrics.json
exists is done and never run again, and one that stopped mid-training resumes from its last
checkpoint (``swapvae train --resume``), so ``--resume`` after a crash or a SIGKILL of the
driver only runs what is missing. A trial that raises is reported with its one-line error
(also kept in ``DIR/trials/.../error.txt``) and the others go on.

``train_sessions`` is the same without a search (``swapvae train --data a b ... --out DIR``):
each session one run, ``DIR/SESSION``, all in parallel on Ray, with one table.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swapvae.schemas import SwapVAEConfig
from swapvae.schemas.session import is_file_source
from swapvae.schemas.sweep import METRICS, SessionSpec, SweepSpec, nested
from swapvae.training.staging import partial_dir

SPEC_FILE, RESULTS_JSON, RESULTS_CSV = "spec.json", "results.json", "results.csv"
TEST_KEYS = ("reach_acc", "reach_delta_acc", "velocity_r2", "raw_reach_acc", "raw_reach_delta_acc", "raw_velocity_r2",
             "bits_per_spike")


@dataclass(frozen=True)
class Trial:
    session: SessionSpec
    name: str  # the session's name (its file's stem)
    point: tuple[tuple[str, Any], ...]  # (dotted config path, value) pairs
    seed: int

    @property
    def point_id(self) -> str:
        return point_id(dict(self.point))

    @property
    def key(self) -> str:
        return f"{self.name}/{self.point_id}/seed{self.seed}"


def point_id(point: dict[str, Any]) -> str:
    """A folder name for a point of the space: ``optim.epochs=3,optim.lr=0.001``."""
    def text(v):
        return f"{v:.4g}" if isinstance(v, float) else json.dumps(v, separators=(",", ":")).strip('"')
    name = ",".join(f"{k}={text(v)}" for k, v in point.items()) or "base"
    return name.replace("/", "_").replace(" ", "")


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    keys = list(spec.grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(spec.grid[k] for k in keys))]


def trials_of(spec: SweepSpec, point: dict[str, Any]) -> list[Trial]:
    """The trials of one point: every session, every seed."""
    frozen = tuple(point.items())
    return [Trial(s, name, frozen, seed) for s, name in zip(spec.sessions, spec.session_names()) for seed in spec.seeds]


def trial_config(spec: SweepSpec, point: dict[str, Any], seed: int) -> SwapVAEConfig:
    """The base config with the point's values and the seed. A trial with no fixed thread count
    uses its CPU share (Ray gives it that many), so a trial is the same at any concurrency."""
    changes: dict[str, Any] = {}
    for path, value in point.items():
        _merge_into(changes, nested(path, value))
    cfg = SwapVAEConfig.model_validate(spec.config).with_overrides(**changes, seed=seed)
    if cfg.optim.cpu_threads == 0:
        cfg = cfg.with_overrides(optim={"cpu_threads": max(1, int(spec.resources.cpus))})
    return cfg


def _merge_into(into: dict, more: dict) -> None:
    for k, v in more.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge_into(into[k], v)
        else:
            into[k] = v


def score(metrics: dict, metric: str, prefix: str = "") -> float:
    """The SPEC's metric (larger is better) of a validation run's metrics (``prefix="raw_"``:
    of the raw rates under the same readout); NaN if absent (a session without labels scored by
    reach accuracy, or the raw rates' bits per spike)."""
    keys = [prefix + k for k in METRICS[metric]]
    return float(sum(metrics[k] for k in keys)) if all(k in metrics for k in keys) else math.nan


# -- one trial (runs in a Ray worker) ---------------------------------------------------------
def trial_dir(out: Path, trial: Trial) -> Path:
    return out / "trials" / trial.key


def error_file(out: Path, trial: Trial) -> Path:
    """Where a failed trial's one-line error is kept (beside its run, which may not exist)."""
    return out / "trials" / trial.name / trial.point_id / f"seed{trial.seed}.error.txt"


def run_trial(spec: SweepSpec, out: Path, trial: Trial) -> dict:
    """The trial's validation metrics: read back when it is done, resumed from its checkpoint
    when it stopped mid-training, trained otherwise. A failure leaves its one line in
    ``error.txt`` beside the run and raises."""
    from swapvae.training.run import resume_run, train_run

    run = trial_dir(out, trial)
    if (run / "metrics.json").is_file():
        return json.loads((run / "metrics.json").read_text())
    error = error_file(out, trial)
    error.parent.mkdir(parents=True, exist_ok=True)
    error.unlink(missing_ok=True)
    try:
        if (partial_dir(run) / "checkpoint.pt").is_file():
            try:
                return resume_run(run, progress=False)
            except ValueError:  # stopped before its first resumable checkpoint: train it afresh
                pass
        return train_run(trial.session.data, run, trial_config(spec, dict(trial.point), trial.seed), progress=False,
                         options=trial.session.options(), validation=True)
    except BaseException as e:
        error.write_text(one_line(e) + "\n")
        raise


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"


# -- the sweep (the driver) -------------------------------------------------------------------
@dataclass
class Progress:
    """What the progress line counts."""
    total: int
    done: int = 0
    failed: int = 0
    running: set = field(default_factory=set)
    best: tuple[float, str] | None = None

    def line(self) -> str:
        best = f"; best so far {self.best[0]:.3f} ({self.best[1]})" if self.best else ""
        return (f"sweep: {self.done}/{self.total} done, {len(self.running)} running, {self.failed} failed"
                f"{best}")


def _callback(progress: Progress, say):
    from ray.tune import Callback

    class Line(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            progress.running.add(trial.trial_id)
            say(progress.line())

        def on_trial_result(self, iteration, trials, trial, result, **info):
            s = result.get("score")
            if s is not None and not math.isnan(s) and (progress.best is None or s > progress.best[0]):
                progress.best = (s, result.get("label", ""))

        def on_trial_complete(self, iteration, trials, trial, **info):
            progress.running.discard(trial.trial_id)
            progress.done += 1
            say(progress.line())

        def on_trial_error(self, iteration, trials, trial, **info):
            progress.running.discard(trial.trial_id)
            progress.failed += 1
            say(progress.line())
    return Line()


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Ray for the sweep: the cluster at ``address`` (or RAY_ADDRESS), else a local one on the
    loopback address only, without the dashboard or a metrics exporter."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own console table off: our progress line instead
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        # "local": a new Ray of our own, never one that another process left running on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False, _metrics_export_port=None)


def check_sessions(spec: SweepSpec) -> None:
    """FileNotFoundError for a session file that is not there, before anything starts (one that is
    there but cannot be read fails its trials, which are reported)."""
    for s in spec.sessions:
        if is_file_source(s.data) and not Path(s.data).is_file():
            raise FileNotFoundError(f"session {s.data}: no such file")


def _claim(out: Path, spec: SweepSpec, resume: bool) -> None:
    """DIR for this SPEC: a new one, or with ``resume`` the one this SPEC started."""
    written = out / SPEC_FILE
    text = spec.model_dump_json(indent=2)
    if resume:
        if not written.is_file():
            raise ValueError(f"nothing to resume: {out} holds no sweep ({SPEC_FILE} missing)")
        if SweepSpec.model_validate_json(written.read_text()) != spec:
            raise ValueError(f"{out} holds a sweep of another SPEC ({written}): resume it with that SPEC, or choose "
                             f"another --out")
        return
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists: --resume continues the sweep there, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    written.write_text(text)


def run_sweep(spec: SweepSpec, out: str | Path, *, address: str | None = None, resume: bool = False,
              export: bool = False, num_cpus: int | None = None, say=print) -> dict:
    """Run the SPEC's trials on Ray, then train and score each session's chosen point; write
    the results table (CSV and JSON) and return it. ``say`` gets the progress lines."""
    out = Path(out).resolve()
    check_sessions(spec)
    _claim(out, spec, resume)
    t0 = time.perf_counter()
    start_ray(address, num_cpus)
    t1 = time.perf_counter()
    if spec.optuna is None:
        _grid(spec, out, say)
    else:
        _optuna(spec, out, say)
    results = collect(spec, out)
    t2 = time.perf_counter()
    results["chosen"] = _refit(spec, out, results, export, say)
    results["seconds"] = {"ray_start": t1 - t0, "trials": t2 - t1, "chosen": time.perf_counter() - t2}
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2))
    write_csv(results, out / RESULTS_CSV)
    return results


def _tuner(trainable, spec: SweepSpec, out: Path, progress: Progress, say, param_space: dict, **tune_config):
    from ray import tune

    return tune.Tuner(
        tune.with_resources(trainable, {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus}),
        param_space=param_space,
        tune_config=tune.TuneConfig(**tune_config),
        run_config=tune.RunConfig(storage_path=str(out / "ray"), name=f"run-{time.strftime('%Y%m%d-%H%M%S')}",
                                  verbose=0, callbacks=[_callback(progress, say)],
                                  failure_config=tune.FailureConfig(max_failures=0)))


def _record_node(run: Path) -> None:
    """Which Ray node trained a run (``node.json`` beside its metrics; kept from the first time)."""
    import ray

    path = run / "node.json"
    if not path.exists():
        path.write_text(json.dumps({"node_id": ray.get_runtime_context().get_node_id(), "host": os.uname().nodename}))


def _grid(spec: SweepSpec, out: Path, say) -> None:
    from ray import tune

    trials = {t.key: t for p in grid_points(spec) for t in trials_of(spec, p)}
    pending = [k for k, t in trials.items() if not (trial_dir(out, t) / "metrics.json").is_file()]
    progress = Progress(total=len(trials), done=len(trials) - len(pending))
    say(progress.line())
    if not pending:
        return

    def trainable(config):
        trial = trials[config["trial"]]
        m = run_trial(spec, out, trial)
        _record_node(trial_dir(out, trial))
        return {"score": score(m, spec.metric), "label": trial.key}

    _tuner(trainable, spec, out, progress, say, {"trial": tune.grid_search(pending)}).fit()


def _optuna(spec: SweepSpec, out: Path, say) -> None:
    """TPE over the SPEC's space; points already done (a resumed sweep) are given to the
    sampler as evaluated, and only the rest of the budget runs."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    space = {}
    for path, r in spec.optuna.space.items():
        if r.choices is not None:
            space[path] = optuna.distributions.CategoricalDistribution(r.choices)
        elif r.integer:
            space[path] = optuna.distributions.IntDistribution(int(r.low), int(r.high), log=r.log)
        else:
            space[path] = optuna.distributions.FloatDistribution(r.low, r.high, log=r.log)
    done = [(p, s) for p, s in point_scores(spec, out).items() if not math.isnan(s)]
    budget = spec.optuna.trials - len(done)
    progress = Progress(total=spec.optuna.trials, done=len(done))
    say(progress.line())
    if budget <= 0:
        return

    def trainable(config):
        point = {path: config[path] for path in spec.optuna.space}
        ms = []
        for t in trials_of(spec, point):
            ms.append(run_trial(spec, out, t))
            _record_node(trial_dir(out, t))
        return {"score": statistics.fmean(score(m, spec.metric) for m in ms), "label": point_id(point)}

    search = OptunaSearch(space, metric="score", mode="max", seed=0,
                          points_to_evaluate=[dict(p) for p, _ in done] or None,
                          evaluated_rewards=[s for _, s in done] or None)
    _tuner(trainable, spec, out, progress, say, {}, search_alg=search, num_samples=budget).fit()


# -- results ----------------------------------------------------------------------------------
def _points_on_disk(spec: SweepSpec, out: Path) -> list[dict[str, Any]]:
    """The points of the space that have trial folders (a grid's are known; Optuna's are read
    back from each trial's config.json)."""
    if spec.optuna is None:
        return grid_points(spec)
    points: dict[str, dict] = {}
    for name in spec.session_names():
        for cfg in sorted((out / "trials" / name).glob("*/seed*/config.json")):
            full = json.loads(cfg.read_text())
            point = {p: _get(full, p) for p in spec.optuna.space}
            points[point_id(point)] = point
    return list(points.values())


def _get(d: dict, path: str):
    for part in path.split("."):
        d = d[part]
    return d


def point_scores(spec: SweepSpec, out: Path) -> dict[tuple, float]:
    """Each point whose trials are all done: its mean score over sessions and seeds."""
    scores = {}
    for point in _points_on_disk(spec, out):
        ms = [trial_dir(out, t) / "metrics.json" for t in trials_of(spec, point)]
        if all(m.is_file() for m in ms):
            scores[tuple(point.items())] = statistics.fmean(score(json.loads(m.read_text()), spec.metric) for m in ms)
    return scores


def collect(spec: SweepSpec, out: Path) -> dict:
    """The table: one row per session and point, its score over seeds (mean, sd, n) beside the
    raw rates' under the same readout and splits (the baseline of the same runs); and the trials
    that failed with their one-line errors."""
    rows, failed = [], []
    for point in _points_on_disk(spec, out):
        for name in spec.session_names():
            got, raw = [], []
            for t in (t for t in trials_of(spec, point) if t.name == name):
                metrics, error = trial_dir(out, t) / "metrics.json", error_file(out, t)
                if metrics.is_file():
                    m = json.loads(metrics.read_text())
                    got.append(score(m, spec.metric))
                    raw.append(score(m, spec.metric, "raw_"))
                elif error.is_file():
                    failed.append({"trial": t.key, "error": error.read_text().strip()})
            mean, sd, n = _mean_sd(got)
            raw_mean, raw_sd, _ = _mean_sd(raw)
            rows.append({"session": name, "point": point, "point_id": point_id(point), "metric": spec.metric,
                         "mean": mean, "sd": sd, "n_seeds": n, "raw_mean": raw_mean, "raw_sd": raw_sd})
    return {"rows": rows, "failed": failed}


def _mean_sd(values: list[float]) -> tuple[float, float, int]:
    v = [x for x in values if not math.isnan(x)]
    return (statistics.fmean(v) if v else math.nan, statistics.stdev(v) if len(v) > 1 else 0.0 if v else math.nan,
            len(v))


def _refit(spec: SweepSpec, out: Path, results: dict, export: bool, say) -> dict:
    """Each session's best point (highest mean over seeds), trained on all its training trials
    with the first seed, scored on its test trials; as Ray tasks, in parallel."""
    import ray

    best: dict[str, dict] = {}
    for row in results["rows"]:
        if not math.isnan(row["mean"]) and (row["session"] not in best or row["mean"] > best[row["session"]]["mean"]):
            best[row["session"]] = row
    sessions = dict(zip(spec.session_names(), spec.sessions))

    @ray.remote(num_cpus=spec.resources.cpus, num_gpus=spec.resources.gpus)
    def refit(name: str, point: dict) -> dict:
        from swapvae.training.export import export_bundle
        from swapvae.training.run import train_run

        run = out / "chosen" / name
        if (run / "metrics.json").is_file():  # a resumed sweep: already trained
            metrics = json.loads((run / "metrics.json").read_text())
        else:
            metrics = train_run(sessions[name].data, run, trial_config(spec, point, spec.seeds[0]), progress=False,
                                options=sessions[name].options(), force=True)
        if export:
            export_bundle(run, out / "bundles" / name, force=True)
        return metrics

    refs = {name: refit.remote(name, row["point"]) for name, row in best.items()}
    chosen = {}
    for name, ref in refs.items():
        m = ray.get(ref)
        chosen[name] = {"point": best[name]["point"], "validation": best[name]["mean"],
                        "run": str(out / "chosen" / name), "test": {k: m.get(k) for k in TEST_KEYS}}
        if export:
            chosen[name]["bundle"] = str(out / "bundles" / name)
    return chosen


def write_csv(results: dict, path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["session", "point", "metric", "mean", "sd", "n_seeds", "raw_mean", "raw_sd"])
        for r in results["rows"]:
            w.writerow([r["session"], r["point_id"], r["metric"], f"{r['mean']:.6g}", f"{r['sd']:.6g}", r["n_seeds"],
                        f"{r['raw_mean']:.6g}", f"{r['raw_sd']:.6g}"])


def format_results(results: dict) -> str:
    """The table printed at the end: validation score per session and point, the failures, and
    each session's chosen point on its test trials beside the raw rates."""
    ws = max([7, *(len(r["session"]) for r in results["rows"])])
    wp = max([5, *(len(r["point_id"]) for r in results["rows"])])
    metric = results["rows"][0]["metric"] if results["rows"] else ""
    lines = [f"{'session':<{ws}}  {'point':<{wp}}  {'validation ' + metric:<28}  raw rates, same readout"]
    for r in results["rows"]:
        got = f"{r['mean']:.3f} +- {r['sd']:.3f} (n={r['n_seeds']})" if r["n_seeds"] else "no trial done"
        raw = f"{r['raw_mean']:.3f} +- {r['raw_sd']:.3f}" if not math.isnan(r["raw_mean"]) else "-"
        lines.append(f"{r['session']:<{ws}}  {r['point_id']:<{wp}}  {got:<28}  {raw}")
    for f in results["failed"]:
        lines.append(f"failed: {f['trial']}: {f['error']}")
    for name, c in results.get("chosen", {}).items():
        t = c["test"]
        if t.get("reach_acc") is not None:
            test = (f"acc {t['reach_acc']:.3f} / delta {t['reach_delta_acc']:.3f} / vel R^2 {t['velocity_r2']:.3f}; "
                    f"raw rates {t['raw_reach_acc']:.3f} / {t['raw_reach_delta_acc']:.3f} / {t['raw_velocity_r2']:.3f}")
        else:
            test = f"{t['bits_per_spike']:.3f} bits/spike"
        lines.append(f"chosen for {name}: {point_id(c['point'])} (validation {c['validation']:.3f}); test trials: "
                     f"{test}" + (f"; bundle {c['bundle']}" if "bundle" in c else ""))
    return "\n".join(lines)


# -- many sessions without a search (``swapvae train --data a b ... --out DIR``) ---------------
def train_sessions(sessions: list[SessionSpec], out: str | Path, config: SwapVAEConfig, *, validation: bool = False,
                   force: bool = False, address: str | None = None, num_cpus: int | None = None,
                   gpus: float = 0.0, say=print) -> dict:
    """Each session an independent run, ``DIR/SESSION`` (what ``swapvae train`` writes), all
    trained in parallel as Ray tasks; the table written as ``DIR/results.json`` and ``.csv``. A
    run gets ``config.optim.cpu_threads`` CPUs (1 when that is 0, the automatic choice, which
    is then fixed at 1 so a run is the same at any concurrency) and ``gpus`` of a GPU. A
    session that fails is reported with its one-line error, and the others go on."""
    import ray

    out = Path(out).resolve()
    names = [Path(s.data).stem for s in sessions]
    if len(set(names)) != len(names):
        raise ValueError(f"two sessions with one name ({names}): each run's folder is named by its session")
    check_sessions(SweepSpec(sessions=sessions))
    runs = {name: out / name for name in names}
    if not force and (there := [str(r) for r in runs.values() if r.exists()]):
        raise ValueError(f"{', '.join(there)} exist: choose another --out, or --force to replace them")
    cpus = config.optim.cpu_threads or 1
    config = config.with_overrides(optim={"cpu_threads": cpus})
    start_ray(address, num_cpus)

    @ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    def train(session: SessionSpec, run: Path) -> dict:
        from swapvae.training.run import train_run

        try:
            return train_run(session.data, run, config, progress=False, options=session.options(), force=force,
                             validation=validation)
        except Exception as e:  # the other sessions go on; the reason is the table's
            return {"error": one_line(e)}

    out.mkdir(parents=True, exist_ok=True)
    pending = {train.remote(s, runs[name]): name for s, name in zip(sessions, names)}
    got: dict[str, dict] = {}
    say(f"train: 0/{len(names)} done, {len(names)} queued on Ray")
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(ready[0])
        try:
            got[name] = ray.get(ready[0])
        except Exception as e:  # the worker died (out of memory, killed)
            got[name] = {"error": one_line(e)}
        failed = sum("error" in m for m in got.values())
        say(f"train: {len(got) - failed}/{len(names)} done, {len(pending)} running, {failed} failed")
    results = {"split": "validation" if validation else "test", "runs": {
        name: ({"run": str(runs[name]), **{k: got[name].get(k) for k in TEST_KEYS}} if "error" not in got[name]
               else {"run": None, "error": got[name]["error"]}) for name in names}}
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2))
    with (out / RESULTS_CSV).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["session", "run", *TEST_KEYS, "error"])
        for name, r in results["runs"].items():
            w.writerow([name, r["run"] or "", *("" if r.get(k) is None else f"{r[k]:.6g}" for k in TEST_KEYS),
                        r.get("error", "")])
    return results


def format_sessions(results: dict) -> str:
    """``train_sessions``' table: one row per session, its scores beside the raw rates'."""
    w = max([7, *(len(n) for n in results["runs"])])
    lines = [f"scored on the {'validation split' if results['split'] == 'validation' else 'test trials'}",
             f"{'session':<{w}} {'acc':>6} {'delta':>6} {'vel R^2':>8} | {'raw acc':>7} {'delta':>6} {'vel R^2':>8} |"
             f" {'bits/spike':>10}"]

    def f(v, w):
        return f"{v:>{w}.3f}" if v is not None else f"{'-':>{w}}"
    for name, r in results["runs"].items():
        if "error" in r:
            lines.append(f"{name:<{w}} failed: {r['error']}")
            continue
        lines.append(f"{name:<{w}} {f(r['reach_acc'], 6)} {f(r['reach_delta_acc'], 6)} {f(r['velocity_r2'], 8)} | "
                     f"{f(r['raw_reach_acc'], 7)} {f(r['raw_reach_delta_acc'], 6)} {f(r['raw_velocity_r2'], 8)} | "
                     f"{f(r['bits_per_spike'], 10)}")
    return "\n".join(lines)
