"""The install rule: exactly one ONNX Runtime, from [cpu] or [gpu], never both, and a command
that finds none says which extra to add."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def test_one_onnxruntime_per_extra():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_name(r) for r in project["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    assert not base & {"onnxruntime", "onnxruntime-gpu"}  # else [gpu] would install both
    assert extras["cpu"] == {"onnxruntime"} and extras["gpu"] == {"onnxruntime-gpu"}
    for name, reqs in extras.items():  # [train,gpu], [dev,gpu], ...: still onnxruntime-gpu alone
        if name not in ("cpu", "gpu"):
            assert not reqs & {"onnxruntime", "onnxruntime-gpu"}, name
    assert "pynwb" in extras["train"]
    assert {"ray", "optuna"} <= extras["sweep"] and not (extras["train"] | extras["cpu"]) & {"ray", "optuna"}


def test_a_command_without_onnxruntime_names_the_extras():
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "onnxruntime":
            raise ModuleNotFoundError(f"blocked: {name}", name=name)
sys.meta_path.insert(0, Block())
from swapvae.cli import main
assert main(["serve", "/nonexistent/bundle"]) == 2
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "pip install 'swapvae-bci[cpu]' (or '[gpu]'" in out.stderr and "Traceback" not in out.stderr


def test_cuda_advice_names_two_builds_installed_together(monkeypatch):
    from importlib import metadata

    from swapvae.runtime.engine import onnxruntime_advice

    monkeypatch.setattr(metadata, "version", lambda name: "1.0")
    assert "both installed" in onnxruntime_advice() and "pip install onnxruntime-gpu" in onnxruntime_advice()

    def only_cpu(name):
        if name == "onnxruntime-gpu":
            raise metadata.PackageNotFoundError(name)
        return "1.0"
    monkeypatch.setattr(metadata, "version", only_cpu)
    assert "swapvae-bci[gpu]" in onnxruntime_advice()
