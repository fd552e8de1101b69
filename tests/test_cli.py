"""What a person sees when a command fails or is cut short: one line and an exit status, never a
traceback; each case a user met (issue 18)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from swapvae.cli import main as cli
from swapvae.commands.options import NWB_OPTIONS
from swapvae.training import data as training_data

SWAPVAE = str(Path(sys.executable).parent / "swapvae")


def test_the_nwb_flags_are_load_sessions_keywords():
    import inspect

    assert set(NWB_OPTIONS) <= set(inspect.signature(training_data.load_session).parameters)


def test_ctrl_c_during_replay_is_one_line(tiny_bundle, monkeypatch, capsys):
    from swapvae.runtime import client

    def interrupted(self, *a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(client.Client, "info", interrupted)
    assert cli(["replay", str(tiny_bundle), "--endpoint", "tcp://127.0.0.1:9"]) == 130
    err = capsys.readouterr().err
    assert err == "swapvae replay: interrupted\n"


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(tiny_bundle):
    r, w = os.pipe()
    os.close(r)  # `swapvae verify B --json | head` after head has gone
    try:
        out = subprocess.run([SWAPVAE, "verify", str(tiny_bundle), "--json"], stdout=w, stderr=subprocess.PIPE,
                             text=True, timeout=120)
    finally:
        os.close(w)
    assert out.returncode == 141 and out.stderr == "", out.stderr


def test_a_checkpoint_that_is_not_one_is_refused_without_unsafe_advice(tmp_path):
    from swapvae.training import SwapVAE

    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a checkpoint written by SwapVAE.save") as e:
        SwapVAE.load(bad)
    assert "weights_only" not in str(e.value)


def test_an_endpoint_without_its_transport_is_named(tiny_bundle, capsys):
    assert cli(["serve", str(tiny_bundle), "--bind", "127.0.0.1:5605"]) == 2
    err = capsys.readouterr().err
    assert "--bind '127.0.0.1:5605' is not a ZeroMQ endpoint" in err and "tcp://127.0.0.1:5555" in err
    assert "other machines" not in err


def test_a_text_file_named_npz_is_called_what_it_is(tmp_path, capsys):
    (tmp_path / "notes.npz").write_text("counts, trial\n1, 2\n")
    assert cli(["train", "--data", str(tmp_path / "notes.npz"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "not a .npz file" in err and "pickle" not in err


def test_replaying_the_wrong_session_says_so_without_asking_for_data_again(tiny_bundle, tmp_path, capsys):
    from swapvae.schemas.session import write_npz
    from swapvae.training.simulate import simulate_reaching

    other = write_npz(simulate_reaching(n_neurons=30, n_trials=20, seed=9), tmp_path / "other.npz")
    assert cli(["replay", str(tiny_bundle), "--data", str(other), "--endpoint", "tcp://127.0.0.1:9"]) == 2
    assert "is not the data the bundle" in capsys.readouterr().err
    assert cli(["replay", str(tiny_bundle), "--data", str(other), "--other-session",
                "--endpoint", "tcp://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "has 30 channels but the bundle expects 120" in err and "pass --data" not in err


def test_evaluating_a_labelled_run_on_data_without_labels_says_how(tiny_run, tmp_path, capsys):
    from nwb_files import session_to_nwb

    from swapvae.schemas.session import split_session
    from swapvae.training.simulate import simulate_reaching

    s = simulate_reaching(seed=0)  # the tiny run's session, as an NWB file read without its labels
    nwb = session_to_nwb(s, tmp_path / "s.nwb")
    assert split_session(s).train.has_labels
    assert cli(["evaluate", str(tiny_run), "--data", str(nwb), "--other-session"]) == 2
    err = capsys.readouterr().err
    assert "no reach labels" in err and "--target-column" in err and "--velocity-series" in err


def test_inverse_transform_takes_contents_alone():
    from swapvae.training import SwapVAE
    from swapvae.training.simulate import simulate_reaching

    s = simulate_reaching(n_neurons=20, n_trials=12, seed=1)
    vae = SwapVAE(epochs=1, content_dim=4, style_dim=3, hidden=["d", 8], device="cpu", cpu_threads=1)
    vae.fit(s.counts, trial=s.trial)
    c = vae.transform(s.counts[:5], space="content")
    z0 = np.hstack([c, np.zeros((5, 3), np.float32)])
    np.testing.assert_array_equal(vae.inverse_transform(c), vae.inverse_transform(z0))
    assert vae.inverse_transform(c).shape == (5, 20)
