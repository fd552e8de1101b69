"""A training that stopped resumes to the run an uninterrupted one writes (``SwapVAE.fit(...,
resume=)``, ``swapvae train --resume RUN``): checkpoints hold the optimizer, the random-number
states and the epoch, and the result is bit-equal at the recorded thread count."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from swapvae.cli import main as cli
from swapvae.schemas import SwapVAEConfig
from swapvae.schemas.session import write_npz
from swapvae.training import SwapVAE
from swapvae.training.simulate import simulate_reaching

ROOT = Path(__file__).resolve().parents[1]
KW = dict(device="cpu", cpu_threads=1, epochs=6, batch_size=64, content_dim=4, style_dim=4, hidden=["d", 16])
CFG = SwapVAEConfig().with_overrides(optim={"checkpoint_every": 2})


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def session():
    return simulate_reaching(n_neurons=40, n_trials=40, seed=1)


def _fit_stopping_after(epoch: int, session, checkpoint: Path, monkeypatch, **kw) -> None:
    real = SwapVAE.save

    def save(self, path, training=None):
        real(self, path, training)
        if training is not None and training["meta"]["epoch"] == epoch:
            raise Stop  # the process dies just after this checkpoint
    monkeypatch.setattr(SwapVAE, "save", save)
    with pytest.raises(Stop):
        SwapVAE(config=CFG, **{**KW, **kw}).fit(session.counts, trial=session.trial, checkpoint=checkpoint,
                                                held_out=session.counts[:50])
    monkeypatch.setattr(SwapVAE, "save", real)


def test_a_resumed_fit_is_the_uninterrupted_one_bit_for_bit(session, tmp_path, monkeypatch):
    full = SwapVAE(config=CFG, **KW).fit(session.counts, trial=session.trial, held_out=session.counts[:50])
    _fit_stopping_after(4, session, tmp_path / "c.pt", monkeypatch)
    resumed = SwapVAE(config=CFG, **KW).fit(session.counts, trial=session.trial, checkpoint=tmp_path / "c.pt",
                                            held_out=session.counts[:50], resume=tmp_path / "c.pt")
    a, b = full.model_.state_dict(), resumed.model_.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # weights and BatchNorm statistics
    assert resumed.history_ == full.history_  # epochs 1-4 from the checkpoint, 5-6 trained again, equal
    assert [h["epoch"] for h in resumed.history_] == list(range(1, 7))


def test_what_cannot_be_resumed_is_named(session, tmp_path, monkeypatch):
    _fit_stopping_after(2, session, tmp_path / "c.pt", monkeypatch)
    with pytest.raises(ValueError, match=r"another config \(differs in: optim\)"):
        SwapVAE(config=CFG, **{**KW, "epochs": 7}).fit(session.counts, trial=session.trial, resume=tmp_path / "c.pt")
    with pytest.raises(ValueError, match="other channels"):
        SwapVAE(config=CFG, **KW).fit(session.counts, trial=session.trial, neurons=list(range(30)),
                                      resume=tmp_path / "c.pt")
    SwapVAE(config=CFG, **KW).fit(session.counts, trial=session.trial, checkpoint=tmp_path / "done.pt")
    with pytest.raises(ValueError, match="no training state to resume from"):
        SwapVAE(config=CFG, **KW).fit(session.counts, trial=session.trial, resume=tmp_path / "done.pt")
    with pytest.raises(ValueError, match="resume continues a single-session fit"):
        SwapVAE(config=CFG, **KW).fit([session.counts, session.counts], resume=tmp_path / "c.pt")


@pytest.mark.slow
def test_train_killed_with_sigkill_resumes_to_the_uninterrupted_run(tmp_path, capsys):
    write_npz(simulate_reaching(n_neurons=40, n_trials=60, seed=3), tmp_path / "s.npz")
    config = {"device": "cpu", "model": {"content_dim": 4, "style_dim": 4, "hidden": ["d", 16]},
              "optim": {"epochs": 200, "batch_size": 128, "checkpoint_every": 2, "cpu_threads": 1},
              "readout": {"C_grid": [0.1], "cv_folds": 2, "history_grid": [2]}}
    (tmp_path / "c.json").write_text(json.dumps(config))
    argv = ["train", "--data", str(tmp_path / "s.npz"), "--config", str(tmp_path / "c.json"), "--quiet"]
    partial = tmp_path / ".killed.partial" / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-m", "swapvae", *argv, "--out", str(tmp_path / "killed")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial.exists() and not (tmp_path / "killed").exists(), proc.stderr.read().decode()[-2000:]
    assert cli([*argv[:1], "--resume", str(tmp_path / "killed"), "--seed", "1"]) == 2
    assert "drop --seed" in capsys.readouterr().err
    assert cli(["train", "--resume", str(tmp_path / "killed"), "--quiet"]) == 0
    assert cli([*argv, "--out", str(tmp_path / "whole")]) == 0
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    assert not partial.parent.exists()  # moved into place whole
    strip = lambda m: {k: v for k, v in m.items() if k != "train_seconds"}  # noqa: E731
    assert strip(json.loads((killed / "metrics.json").read_text())) == strip(
        json.loads((whole / "metrics.json").read_text()))
    assert json.loads((killed / "history.json").read_text()) == json.loads((whole / "history.json").read_text())
    a, b = (torch.load(p / "checkpoint.pt", weights_only=True)["state_dict"] for p in (killed, whole))
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert cli(["train", "--resume", str(killed)]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "(it is complete)" in err
