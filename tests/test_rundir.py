"""A lab's runs are safe from the tool (training/rundir.py, training/staging.py): a run is used
from any folder and found again on another machine (its recording checked by sha256), and
nothing is overwritten unasked or left half written."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CONFIG
from deploy_files import Served

from swapvae.cli import main as cli
from swapvae.schemas.session import write_npz


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A lab folder with a recording and a run trained there with a relative --data, as typed."""
    root = tmp_path_factory.mktemp("lab")
    from swapvae.training.simulate import simulate_reaching

    write_npz(simulate_reaching(n_neurons=40, n_trials=60, seed=3), root / "session.npz")
    (root / "config.json").write_text(json.dumps(TINY_CONFIG))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert cli(["train", "--data", "session.npz", "--out", "runs/r", "--config", "config.json", "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    return root


def _metrics(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_run_is_used_from_another_folder(lab, tmp_path, monkeypatch, capsys):
    source = json.loads((lab / "runs/r/run.json").read_text())
    assert source["data"] == str(lab / "session.npz") and len(source["data_sha256"]) == 64
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli(["evaluate", str(lab / "runs/r"), "--json"]) == 0
    assert _metrics(capsys)["reach_acc"] == json.loads((lab / "runs/r/metrics.json").read_text())["reach_acc"]
    assert cli(["export", str(lab / "runs/r"), "--out", "b"]) == 0
    assert cli(["report", str(lab / "runs/r"), "--out", "figs"]) == 0
    capsys.readouterr()
    with Served([str(Path(sys.executable).parent / "swapvae"), "serve", "b", "--bind", "tcp://127.0.0.1:*"]) as s:
        assert cli(["replay", "b", "--endpoint", s.endpoint, "--json"]) == 0  # the manifest's absolute path
    replayed = json.loads(capsys.readouterr().out)
    assert replayed["n_bins"] > 0 and 0 <= replayed["reach_acc"] <= 1


def test_a_copied_run_finds_its_recording_with_data_and_refuses_another(lab, tmp_path, monkeypatch, capsys):
    """Another machine: the run copied, the recording elsewhere (the original path gone)."""
    shutil.copytree(lab / "runs/r", tmp_path / "r")
    moved = tmp_path / "elsewhere.npz"
    shutil.copy(lab / "session.npz", moved)
    recorded = json.loads((tmp_path / "r/run.json").read_text())
    recorded["data"] = "/nonexistent/lab/session.npz"  # where it was on the other machine
    (tmp_path / "r/run.json").write_text(json.dumps(recorded))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli(["evaluate", "r"]) == 2
    err = capsys.readouterr().err
    assert "/nonexistent/lab/session.npz, which is not there" in err and "--data" in err and "simulated" not in err
    assert cli(["export", "r", "--out", "b"]) == 2 and "--data" in capsys.readouterr().err
    assert cli(["evaluate", "r", "--data", str(moved), "--json"]) == 0
    assert _metrics(capsys)["reach_acc"] == json.loads((lab / "runs/r/metrics.json").read_text())["reach_acc"]
    assert cli(["export", "r", "--out", "b", "--data", str(moved)]) == 0
    assert json.loads((tmp_path / "b/manifest.json").read_text())["training"]["data"] == str(moved)
    other = tmp_path / "other.npz"
    with np.load(moved) as f:
        arrays = dict(f)
    arrays["counts"] = arrays["counts"][::-1].copy()
    np.savez(other, **arrays)
    capsys.readouterr()
    assert cli(["evaluate", "r", "--data", str(other)]) == 2
    assert "is not the recording the run" in capsys.readouterr().err
    assert cli(["evaluate", "r", "--data", str(other), "--other-session", "--json"]) == 0


def test_training_over_an_existing_run_is_refused_unless_forced_and_then_replaces_it_whole(lab, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(lab / "runs/r", run)
    (run / "figures").mkdir()
    (run / "figures" / "old.png").write_bytes(b"old")
    before = (run / "checkpoint.pt").read_bytes()
    argv = ["train", "--data", "simulated", "--out", str(run), "--epochs", "1", "--quiet"]
    assert cli(argv) == 2
    assert "exists: refusing to overwrite a run" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == before
    assert cli([*argv, "--force"]) == 0
    assert json.loads((run / "run.json").read_text())["data"] == "simulated"
    assert not (run / "figures").exists()  # the old run's files went with it
    assert not list(tmp_path.glob(".r.*"))  # no staging left behind


def test_an_interrupted_training_leaves_the_old_run_as_it_was(lab, tmp_path, monkeypatch, capsys):
    from swapvae.training import estimator

    run = tmp_path / "r"
    shutil.copytree(lab / "runs/r", run)
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    real = estimator.SwapVAE._train

    def interrupted(self, step, steps_per_epoch, checkpoint, *rest):
        self.save(checkpoint)  # a checkpoint, then Ctrl-C
        raise KeyboardInterrupt
    monkeypatch.setattr(estimator.SwapVAE, "_train", interrupted)
    assert cli(["train", "--data", "simulated", "--out", str(run), "--force", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and ".r.partial" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files  # config.json and run.json untouched
    assert (tmp_path / ".r.partial" / "checkpoint.pt").exists()  # the run so far, kept
    monkeypatch.setattr(estimator.SwapVAE, "_train", real)


def test_export_over_an_existing_bundle_is_refused_unless_forced(tiny_run, tmp_path, capsys):
    out = tmp_path / "b"
    assert cli(["export", str(tiny_run), "--out", str(out)]) == 0
    manifest = (out / "manifest.json").read_bytes()
    assert cli(["export", str(tiny_run), "--out", str(out)]) == 2
    assert "exists: refusing to overwrite a bundle" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == manifest
    (out / "stale.txt").write_text("from before")
    assert cli(["export", str(tiny_run), "--out", str(out), "--force"]) == 0
    assert not (out / "stale.txt").exists() and (out / "manifest.json").exists()  # replaced whole
