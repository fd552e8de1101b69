"""The rig install (issue 13's bar): the runtime alone, in a fresh venv, serves a Chewie-1
bundle and ``swapvae replay`` through it reproduces the offline scores.

The venv is made the way an operator makes it: ``deploy/install.sh`` under a test root
(SWAPVAE_ROOT, which leaves the system's users and systemd alone), i.e. ``python -m venv``
and ``pip install '<checkout>[cpu]'``. The ``[cpu]`` extra, not a bare ``.``: pip has no
default extras, and the runtime's ONNX Runtime comes in one of two extras ([cpu] onnxruntime,
[gpu] onnxruntime-gpu) that must never both be installed, so a bare ``pip install .`` has
numpy, pydantic, pyzmq and cryptography but no ONNX Runtime, on purpose (tests/test_packaging.py).
onnxruntime and numpy are pinned to the versions of this test's own environment, which
computes the offline scores: the same bits in, the same scores out, exactly.

The bundle is installed with ``deploy/install-bundle.sh`` (verified by the rig's own
``swapvae verify``) and served from the unit's command line with serve.env's values; the
replay runs from the rig venv too. pip reads its index (PyPI in CI) for the runtime's wheels:
one venv per test session, about 15 s with a warm pip cache. Without an index the tests skip,
saying so, when pip's own output shows it could not connect; any other pip failure fails.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import CHEWIE  # noqa: E402  (tests/ is on sys.path)
from deploy_files import DEPLOY, Served, unit_command

pytestmark = pytest.mark.slow  # a subprocess suite: make test-fast leaves it out

# A small model, a few seconds on two cores: the bar is that the rig reproduces the offline
# scores of whatever bundle it gets, not the model's accuracy.
CHEWIE_CONFIG = {
    "seed": 0, "device": "cpu",
    "model": {"content_dim": 8, "style_dim": 8, "hidden": ["d", 64]},
    "optim": {"epochs": 20, "batch_size": 128, "checkpoint_every": 20, "cpu_threads": 1},
    "readout": {"C_grid": [0.1], "cv_folds": 2, "history_grid": [3]},
}
SCORES = ("reach_acc", "reach_delta_acc", "velocity_r2", "velocity_r2_vx", "velocity_r2_vy", "n_bins", "n_scored",
          "n_trials")
# What pip prints when it cannot reach an index (urllib3's and the resolver's words).
NO_INDEX = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
            "Name or service not known", "Network is unreachable", "ConnectTimeoutError", "ProxyError",
            "Connection refused", "Could not fetch URL")


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment for the rig's processes: nothing that would let them see this checkout
    or this test's venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    return {**env, "PYTHONNOUSERSITE": "1", **extra}


@pytest.fixture(scope="session")
def rig(tmp_path_factory):
    """A test root laid out by deploy/install.sh: ``rig / "opt/swapvae/venv"`` has the runtime only."""
    root = tmp_path_factory.mktemp("rig")
    out = _install_sh(root)
    if out.returncode != 0:
        log = out.stdout + out.stderr
        reason = no_index(log)
        if reason:
            pytest.skip(f"pip cannot reach a package index here: {reason}")
        pytest.fail(f"deploy/install.sh failed:\n{log[-5000:]}")
    return root


def _install_sh(root: Path) -> subprocess.CompletedProcess:
    """deploy/install.sh under ``root``, onnxruntime and numpy pinned to this environment's;
    short network timeouts (the build's own pip, for setuptools, reads them from PIP_*)."""
    pins = f"onnxruntime=={metadata.version('onnxruntime')} numpy=={metadata.version('numpy')}"
    env = _clean_env(SWAPVAE_ROOT=str(root), SWAPVAE_PYTHON=sys.executable, SWAPVAE_PIP_ARGS=pins,
                     PIP_RETRIES="2", PIP_DEFAULT_TIMEOUT="30")
    return subprocess.run(["bash", str(DEPLOY / "install.sh")], capture_output=True, text=True, env=env,
                          timeout=900, cwd=root)


def no_index(pip_log: str) -> str | None:
    """pip's own line saying it could not connect to an index, if its log has one."""
    for line in pip_log.splitlines():
        mark = next((m for m in NO_INDEX if m in line), None)
        if mark:
            return f"{mark}: {line.strip()[:300]}"
    return None


def test_an_unreachable_index_is_told_from_other_pip_failures():
    refused = ("WARNING: Retrying (Retry(total=0, ...)) after connection broken by 'NewConnectionError('<...>: "
               "Failed to establish a new connection: [Errno 111] Connection refused')': /simple/setuptools/\n"
               "ERROR: No matching distribution found for setuptools>=68")
    assert no_index(refused).startswith("NewConnectionError")
    assert no_index("ERROR: No matching distribution found for onnxruntime==9.9") is None  # no such release
    assert no_index("error: subprocess-exited-with-error\nSyntaxError: invalid syntax") is None


def _venv(rig: Path, name: str) -> str:
    return str(rig / "opt/swapvae/venv/bin" / name)


def _run(rig: Path, *argv: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """A command of the rig venv, run away from the checkout."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, cwd=rig, env=_clean_env(),
                          **kw)


@pytest.fixture(scope="session")
def chewie_bundle(tmp_path_factory):
    """A small Swap-VAE trained on Chewie-1 and exported (in this test's full environment)."""
    if not CHEWIE.exists():
        pytest.skip(f"{CHEWIE} is not here")
    from swapvae.schemas.config import SwapVAEConfig
    from swapvae.training.export import export_bundle
    from swapvae.training.run import train_run

    run = tmp_path_factory.mktemp("chewie_run")
    train_run(str(CHEWIE), run, SwapVAEConfig.model_validate(CHEWIE_CONFIG), progress=False)
    out = tmp_path_factory.mktemp("chewie_bundle") / "chewie"
    export_bundle(run, out)
    return out


def test_the_rig_venv_has_the_runtime_and_no_training_side(rig):
    probe = ("import importlib.util as u, json, swapvae, onnxruntime; "
             "print(json.dumps({'missing': [m for m in ('torch', 'sklearn', 'onnx', 'matplotlib', 'tqdm', 'pynwb') "
             "if u.find_spec(m) is None], 'swapvae': swapvae.__file__, 'ort': onnxruntime.__version__}))")
    out = _run(rig, _venv(rig, "python"), "-c", probe)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["missing"] == ["torch", "sklearn", "onnx", "matplotlib", "tqdm", "pynwb"]
    assert got["swapvae"].startswith(str(rig / "opt/swapvae/venv"))  # the installed package, not this checkout
    assert got["ort"] == metadata.version("onnxruntime")
    pkgs = _run(rig, _venv(rig, "python"), "-m", "pip", "list", "--format", "json")
    names = sorted(p["name"].lower() for p in json.loads(pkgs.stdout))
    assert "onnxruntime-gpu" not in names and "torch" not in names and "scikit-learn" not in names
    print("\nrig venv:", ", ".join(f"{p['name']} {p['version']}" for p in json.loads(pkgs.stdout)))


@pytest.mark.parametrize("argv", [["train", "--data", "simulated", "--out", "run"], ["export", "run", "--out", "b"],
                                  ["report", "run"], ["evaluate", "run"]], ids=lambda a: a[0])
def test_training_commands_on_the_rig_name_the_train_extra_in_one_line(rig, argv):
    out = _run(rig, _venv(rig, "swapvae"), *argv, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "pip install 'swapvae-bci[train]'" in out.stderr, out.stderr


def test_bar_rig_serves_and_replays_chewie_to_the_offline_scores(rig, chewie_bundle):
    """install-bundle.sh (the rig's verify), the unit's command line (the rig's serve), the
    rig's replay: the scores equal ``offline_reach`` of the same bundle, computed here."""
    from swapvae.runtime.replay import offline_reach
    from swapvae.schemas.session import read_npz

    installed = subprocess.run(["bash", str(DEPLOY / "install-bundle.sh"), str(chewie_bundle)], capture_output=True,
                               text=True, timeout=120, cwd=rig,
                               env=_clean_env(SWAPVAE_ROOT=str(rig), SWAPVAE_SYSTEMCTL=""))
    assert installed.returncode == 0, installed.stderr
    current = rig / "opt/swapvae/bundles/current"
    assert os.readlink(current).startswith("chewie-")
    core = str(sorted(os.sched_getaffinity(0))[-1])
    argv = unit_command({"SWAPVAE_BIND": "tcp://127.0.0.1:*", "SWAPVAE_CORE": core}, _venv(rig, "swapvae"),
                        root=str(rig))
    assert argv[:3] == [_venv(rig, "swapvae"), "serve", str(current)]
    with Served(argv, cwd=rig, env=_clean_env()) as served:
        out = _run(rig, _venv(rig, "swapvae"), "replay", str(current), "--data", str(CHEWIE), "--endpoint",
                   served.endpoint, "--json")
        assert out.returncode == 0, f"{shlex.join(argv)}\n{out.stderr}"
        no_plot = _run(rig, _venv(rig, "swapvae"), "replay", str(current), "--data", str(CHEWIE), "--endpoint",
                       served.endpoint, "--plot", str(rig / "x.png"), timeout=60)
    assert "Traceback" not in served.stderr, served.stderr
    got = json.loads(out.stdout)
    offline = offline_reach(chewie_bundle, read_npz(CHEWIE))
    assert {k: got[k] for k in SCORES} == {k: offline[k] for k in SCORES}  # exactly: the same bins, windows, bits
    print(f"\nChewie-1 on the rig venv: reach_acc {got['reach_acc']:.4f} (offline {offline['reach_acc']:.4f}), "
          f"delta-acc {got['reach_delta_acc']:.4f} ({offline['reach_delta_acc']:.4f}), velocity R^2 "
          f"{got['velocity_r2']:.4f} ({offline['velocity_r2']:.4f}) on {got['n_bins']} bins; round trip p50 "
          f"{got['latency_us']['p50']:.0f} us, p99 {got['latency_us']['p99']:.0f} us")
    # --plot without matplotlib: one line naming what to install, before anything is streamed
    assert no_plot.returncode == 2 and no_plot.stderr.count("\n") == 1, no_plot.stderr
    assert "pip install matplotlib" in no_plot.stderr


def test_install_sh_again_updates_and_keeps_the_settings(rig):
    """Idempotent: a second run reinstalls the code into the same venv, keeps an edited
    serve.env and the installed bundles."""
    env_file = rig / "etc/swapvae/serve.env"
    edited = env_file.read_text().replace("SWAPVAE_CORE=1", "SWAPVAE_CORE=3")
    env_file.write_text(edited)
    bundles = sorted(p.name for p in (rig / "opt/swapvae/bundles").iterdir())
    out = _install_sh(rig)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "kept your" in out.stdout and env_file.read_text() == edited
    assert sorted(p.name for p in (rig / "opt/swapvae/bundles").iterdir()) == bundles
    assert _run(rig, _venv(rig, "swapvae"), "stats", "--help").returncode == 0
