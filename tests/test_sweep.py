"""Sweeps on Ray (schemas/sweep.py, training/sweep.py, ``swapvae sweep``): the SPEC checked by
name before anything starts; trials that are ordinary validation runs, equal to ``swapvae
train --validation``; a failing trial reported while the others finish; a sweep whose driver
is killed with SIGKILL resumed without rerunning what was done; a two-node cluster. Ray picks
its node's address and probes the network, so every Ray run here is inside a network
namespace that holds only loopback (tests/sandbox.py), bound to 127.0.0.1."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from sandbox import loopback_only

from swapvae.cli import main as cli
from swapvae.schemas.sweep import SweepSpec

ROOT = Path(__file__).resolve().parents[1]
SWAPVAE = [sys.executable, "-m", "swapvae"]
TINY = {"model": {"content_dim": 4, "style_dim": 4, "hidden": ["d", 16]}, "optim": {"cpu_threads": 1},
        "readout": {"C_grid": [0.1], "cv_folds": 2, "history_grid": [2]}}
ISSUE_SPEC = """\
sessions: [simulated]
seeds: [0, 1]
grid:
  optim.epochs: [3, 6]
resources: {cpus: 1}
"""


def _spec(tmp_path: Path, text: str, **more) -> Path:
    raw = {**yaml.safe_load(text), "config": TINY, **more}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _sweep(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(loopback_only([*SWAPVAE, "sweep", *argv]), cwd=ROOT, capture_output=True, text=True,
                          timeout=600, **kw)


def _metrics(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    m.pop("train_seconds")
    return m


# -- the SPEC ---------------------------------------------------------------------------------
def test_the_issues_spec_reads_as_written():
    spec = SweepSpec.model_validate(yaml.safe_load(ISSUE_SPEC))
    assert [s.data for s in spec.sessions] == ["simulated"] and spec.seeds == [0, 1]
    assert spec.grid == {"optim.epochs": [3, 6]} and spec.resources.cpus == 1


@pytest.mark.parametrize("raw, message", [
    ({"grid": {"optim.epoch": [3]}}, "'optim.epoch' is not a config field (in optim: optim.lr"),
    ({"grid": {"optimise.epochs": [3]}}, "'optimise.epochs' is not a config field"),
    ({"grid": {"optim.epochs": []}}, "'optim.epochs' has no values to search"),
    ({"grid": {"optim.epochs": [0]}}, "'optim.epochs' = 0: Input should be greater than or equal to 1"),
    ({"grid": {"seed": [1, 2]}}, "'seed' is not searched: list them under seeds"),
    ({"optuna": {"trials": 4, "space": {"optim.lr": {"low": 0.01, "high": 0.001}}}}, "low 0.01 must be below high"),
    ({"optuna": {"trials": 4, "space": {}}}, "space"),
    ({"grid": {"optim.epochs": [3]}, "optuna": {"trials": 2, "space": {"optim.lr": {"choices": [0.001]}}}},
     "a grid or an optuna search, not both"),
    ({"config": {"optim": {"epoch": 3}}}, "config: ('optim', 'epoch')"),
    ({"sessions": []}, "sessions"),
    ({"seeds": [0, 0]}, "seeds repeat"),
])
def test_a_bad_spec_is_refused_naming_the_problem(tmp_path, capsys, raw, message):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"sessions": ["simulated"], **raw}))
    assert cli(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # refused before anything was made


def test_a_session_that_is_not_there_is_named_before_ray_starts(tmp_path, capsys):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"sessions": ["simulated", str(tmp_path / "gone.npz")]}))
    assert cli(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    assert f"session {tmp_path / 'gone.npz'}: no such file" in capsys.readouterr().err


# -- on Ray -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_sweeps_trials_are_the_validation_runs_of_swapvae_train(tmp_path, capsys):
    spec = _spec(tmp_path, ISSUE_SPEC)
    out = tmp_path / "sweep"
    res = _sweep([str(spec), "--out", str(out), "--num-cpus", "2", "--export"])
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted(p.parent for p in (out / "trials").rglob("metrics.json"))
    assert [str(r.relative_to(out / "trials")) for r in runs] == [
        f"simulated/optim.epochs={e}/seed{s}" for e in (3, 6) for s in (0, 1)]
    for run in runs:  # each an ordinary run: the same metrics as swapvae train --validation, bit for bit
        config = json.loads((run / "config.json").read_text())
        (tmp_path / "c.json").write_text(json.dumps(config))
        assert cli(["train", "--validation", "--data", "simulated", "--config", str(tmp_path / "c.json"),
                    "--out", str(tmp_path / "alone"), "--force", "--quiet"]) == 0
        assert _metrics(run) == _metrics(tmp_path / "alone"), run
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0] == "session,point,metric,mean,sd,n_seeds,raw_mean,raw_sd" and len(rows) == 3
    results = json.loads((out / "results.json").read_text())
    chosen = results["chosen"]["simulated"]
    best = max(results["rows"], key=lambda r: r["mean"])
    assert all(r["raw_mean"] > 0 for r in results["rows"])  # the raw rates' baseline on the same splits
    assert chosen["point"] == best["point"] and chosen["test"]["raw_reach_acc"] is not None
    assert (out / "bundles" / "simulated" / "manifest.json").is_file()
    assert "chosen for simulated:" in res.stdout and "raw rates" in res.stdout
    assert "sweep: 4/4 done, 0 running, 0 failed" in res.stderr


@pytest.mark.slow
def test_a_trial_that_fails_is_reported_and_the_others_finish(tmp_path):
    broken = tmp_path / "broken.npz"
    broken.write_text("not a recording")
    spec = _spec(tmp_path, f"sessions: [simulated, {broken}]\nseeds: [0]\ngrid: {{optim.epochs: [3]}}\n")
    out = tmp_path / "sweep"
    res = _sweep([str(spec), "--out", str(out), "--num-cpus", "2"])
    assert res.returncode == 1, res.stderr[-3000:]
    assert (out / "trials" / "simulated" / "optim.epochs=3" / "seed0" / "metrics.json").is_file()
    failed = [line for line in res.stdout.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and failed[0].startswith("failed: broken/optim.epochs=3/seed0: DataError:"), res.stdout
    assert "not a .npz file" in failed[0] and "chosen for simulated" in res.stdout and "1 failed" in res.stderr


@pytest.mark.slow
def test_a_sweep_killed_with_sigkill_resumes_without_rerunning_what_was_done(tmp_path):
    spec = _spec(tmp_path, "sessions: [simulated]\nseeds: [0, 1]\ngrid: {optim.epochs: [20, 30]}\n")
    out = tmp_path / "sweep"
    proc = subprocess.Popen(loopback_only([*SWAPVAE, "sweep", str(spec), "--out", str(out), "--num-cpus", "1"]),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((out / "trials").rglob("metrics.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the driver; then what it started (its local Ray), as a lost machine
    proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    time.sleep(1)
    done = {p: p.stat().st_mtime_ns for p in (out / "trials").rglob("metrics.json")}
    assert 1 <= len(done) < 4, proc.stderr.read().decode()[-2000:]
    res = _sweep([str(spec), "--out", str(out), "--num-cpus", "2", "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    after = {p: p.stat().st_mtime_ns for p in (out / "trials").rglob("metrics.json")}
    assert len(after) == 4 and len(list((out / "trials").glob("*/*/seed*"))) == 4  # nothing lost, nothing doubled
    assert all(after[p] == t for p, t in done.items())  # what was done was not run again
    assert f"sweep: {len(done)}/4 done, 0 running, 0 failed" in res.stderr  # where it took up again
    again = _sweep([str(spec), "--out", str(out)])
    assert again.returncode == 2 and "--resume continues the sweep there" in again.stderr


@pytest.mark.slow
def test_an_optuna_search_runs_its_budget_and_a_resume_runs_only_what_is_missing(tmp_path):
    spec = _spec(tmp_path, "sessions: [simulated]\nseeds: [0]\noptuna:\n  trials: 2\n  space:\n"
                           "    optim.epochs: {low: 2, high: 9, integer: true}\n")
    out = tmp_path / "sweep"
    res = _sweep([str(spec), "--out", str(out), "--num-cpus", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted((out / "trials" / "simulated").glob("optim.epochs=*/seed0/metrics.json"))
    epochs = [json.loads((r.parent / "config.json").read_text())["optim"]["epochs"] for r in runs]
    assert len(runs) == 2 and all(2 <= e <= 9 for e in epochs)  # TPE's points, inside the range, each a run
    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]) == 2 and results["chosen"]["simulated"]["point"]["optim.epochs"] in epochs
    stamps = [r.stat().st_mtime_ns for r in runs]
    again = _sweep([str(spec), "--out", str(out), "--num-cpus", "2", "--resume"])
    assert again.returncode == 0 and "sweep: 2/2 done" in again.stderr  # the budget was spent: nothing runs
    assert [r.stat().st_mtime_ns for r in runs] == stamps


@pytest.mark.slow
def test_trials_run_on_both_nodes_of_a_two_node_cluster(tmp_path):
    spec = _spec(tmp_path, "sessions: [simulated]\nseeds: [0, 1, 2, 3]\ngrid: {optim.epochs: [20]}\n")
    out = tmp_path / "sweep"
    script = textwrap.dedent(f"""
        import json
        from ray.cluster_utils import Cluster
        from swapvae.schemas.sweep import SweepSpec
        from swapvae.training.sweep import run_sweep

        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                                 "include_dashboard": False}})
        worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        run_sweep(SweepSpec.from_file({str(spec)!r}), {str(out)!r}, address=cluster.address, say=lambda s: None)
        print(json.dumps(sorted({{cluster.head_node.node_id, worker.node_id}})))
    """)
    res = subprocess.run(loopback_only([sys.executable, "-c", script]), cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    nodes = set(json.loads(res.stdout.strip().splitlines()[-1]))
    used = {json.loads(p.read_text())["node_id"] for p in (out / "trials").rglob("node.json")}
    assert len(list((out / "trials").rglob("metrics.json"))) == 4
    assert used == nodes, (used, nodes)  # both nodes trained trials


def test_the_readmes_sweep_spec_is_valid():
    block = re.search(r"^```yaml\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M).group(1)
    spec = SweepSpec.model_validate(yaml.safe_load(block))
    assert spec.grid == {"optim.epochs": [3, 6]} and spec.config == {"optim": {"lr": 0.0005}}


def test_the_repositorys_spec_files_are_valid_and_read_their_sessions_from_their_folder():
    specs = sorted((ROOT / "docs" / "sweeps").glob("*.yaml"))
    assert len(specs) >= 5
    chewie = (ROOT.parent / "shared/data/reaching/chewie-2013-10-03.npz").resolve()
    for path in specs:
        spec = SweepSpec.from_file(path)
        assert spec.grid or spec.optuna, path
        assert all(Path(s.data).is_absolute() for s in spec.sessions), path
        assert any(Path(s.data).resolve() == chewie for s in spec.sessions), path
        assert f"swapvae sweep docs/sweeps/{path.name}" in path.read_text(), path  # its own command line


def test_a_specs_relative_session_is_read_from_the_specs_folder_not_the_working_one(tmp_path, monkeypatch):
    (tmp_path / "specs").mkdir()
    path = tmp_path / "specs" / "s.yaml"
    path.write_text("sessions: [../day1.npz, simulated, {data: day2.nwb, target_column: direction}]\n")
    monkeypatch.chdir(ROOT)
    spec = SweepSpec.from_file(path)
    assert [s.data for s in spec.sessions] == [str(tmp_path / "day1.npz"), "simulated",
                                               str(tmp_path / "specs" / "day2.nwb")]
    assert spec.sessions[2].options() == {"target_column": "direction"}


def test_several_sessions_without_shared_name_their_problems_before_ray_starts(tmp_path, capsys):
    (tmp_path / "out" / "simulated").mkdir(parents=True)
    assert cli(["train", "--data", "simulated", "synthetic:2", "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'out' / 'simulated'} exist: choose another --out, or --force" in capsys.readouterr().err
    assert cli(["train", "--data", "simulated", "simulated", "--out", str(tmp_path / "o2")]) == 2
    assert "two sessions with one name" in capsys.readouterr().err
    assert cli(["train", "--data", "simulated", "--address", "127.0.0.1:6379", "--out", str(tmp_path / "o3")]) == 2
    assert "--address and --gpus-per-run place the runs of several --data sessions" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


@pytest.mark.slow
def test_several_sessions_train_as_independent_runs_on_ray_with_one_table(tmp_path):
    broken = tmp_path / "broken.npz"
    broken.write_text("not a recording")
    (tmp_path / "c.json").write_text(json.dumps(TINY))
    out = tmp_path / "runs"
    res = subprocess.run(loopback_only([*SWAPVAE, "train", "--data", "simulated", "synthetic:2", str(broken),
                                        "--config", str(tmp_path / "c.json"), "--epochs", "3", "--out", str(out)]),
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]  # one session failed; the other two are complete runs
    assert re.search(r"^broken +failed: DataError: .*not a \.npz file", res.stdout, re.M), res.stdout
    assert "train: 2/3 done, 0 running, 1 failed" in res.stderr
    rows = (out / "results.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["session", "simulated", "synthetic:2", "broken"]
    # each run is the one swapvae train writes for that session alone (cpu_threads fixed at 1)
    assert cli(["train", "--data", "synthetic:2", "--config", str(tmp_path / "c.json"), "--epochs", "3",
                "--out", str(tmp_path / "alone"), "--quiet"]) == 0
    assert _metrics(out / "synthetic:2") == _metrics(tmp_path / "alone")
    got = json.loads((out / "results.json").read_text())["runs"]["simulated"]
    assert got["reach_acc"] == json.loads((out / "simulated" / "metrics.json").read_text())["reach_acc"]
