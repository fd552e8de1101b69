"""The direction of imports: schemas at the bottom, runtime above it, training above both, the
``swapvae`` command on top. A rig PC installs the runtime alone, so nothing under runtime/ may
import training, torch or scikit-learn, even lazily inside a function.

The folders are installed under one name (``swapvae.schemas``, ``swapvae.runtime``,
``swapvae.training``; pyproject.toml), so a module imports them by that name only: a bare
``import training`` would find a lab's own ``training/`` folder first."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("schemas", "runtime", "training")
COMMAND = "swapvae"  # swapvae/: the command and its adapters (swapvae.cli, swapvae.commands)
# what each layer may import of ours, and third-party roots it must never import
ALLOWED = {"schemas": {"schemas"}, "runtime": {"schemas", "runtime"},
           "training": {"schemas", "runtime", "training"}, COMMAND: {"schemas", "runtime", "training", COMMAND}}
FORBIDDEN = {"schemas": {"torch", "sklearn", "onnx", "onnxruntime", "zmq", "argparse", "pylsl"},
             "runtime": {"torch", "sklearn", "onnx", "argparse", "ray", "pylsl"},
             "training": {"argparse", "ray", "optuna", "pylsl"}, COMMAND: {"pylsl"}}
# The one module that drives Ray (inside its functions only: test_training_and_the_runtime_load_without_ray),
# and the one that speaks LSL (inside its functions only: test_lsl.py)
MAY_IMPORT = {"training/sweep.py": {"ray", "optuna"}, "runtime/lsl.py": {"pylsl"}}


def imported(path: Path) -> tuple[set[str], set[str]]:
    """(our layers, third-party roots) of every absolute import in the file, wherever it sits
    (lazy ones too). ``swapvae.runtime.engine`` is the layer runtime; ``swapvae.cli`` the command."""
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == COMMAND else [])
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == COMMAND:
                ours.add(parts[1] if len(parts) > 1 and parts[1] in LAYERS else COMMAND)
            else:
                others.add(parts[0])
    return ours, others


def layer_of(path: Path) -> str:
    return path.relative_to(ROOT).parts[0]


MODULES = sorted(p for layer in ALLOWED for p in (ROOT / layer).rglob("*.py"))


def test_every_layer_has_modules():
    assert {layer_of(p) for p in MODULES} == set(ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_one_way(path):
    layer = layer_of(path)
    ours, others = imported(path)
    bare = others & set(LAYERS)
    assert not bare, f"{path.relative_to(ROOT)} imports {sorted(bare)} by the bare name: use swapvae.{sorted(bare)[0]}"
    upward = ours - ALLOWED[layer]
    assert not upward, f"{path.relative_to(ROOT)} ({layer}) imports {sorted(upward)}"
    banned = others & FORBIDDEN[layer] - MAY_IMPORT.get(str(path.relative_to(ROOT)), set())
    assert not banned, f"{path.relative_to(ROOT)} ({layer}) imports {sorted(banned)}"


LIBRARY = [p for p in MODULES if layer_of(p) in LAYERS]


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_library_function_takes_a_commands_arguments(path):
    """Command-line flags stop at swapvae/commands/: library functions take explicit keywords,
    so renaming a flag cannot break the library unseen."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            params = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            named = [a.arg for a in params if a.arg == "args" or "Namespace" in ast.unparse(a.annotation or ast.Pass())]
            assert not named, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({', '.join(named)})"


def test_the_checker_sees_each_kind_of_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import argparse\nfrom swapvae.training.data import x\nimport swapvae.runtime.engine as e\n"
                 "from swapvae import cli\ndef f():\n    import training\n")
    assert imported(f) == ({"training", "runtime", COMMAND}, {"argparse", "training"})


def test_runtime_loads_with_the_training_side_missing():
    """Every runtime module imports in a process where torch, scikit-learn and onnx cannot be
    imported at all (as on a runtime-only install), and pulls in nothing of training; a
    training command there says in one line what to install."""
    runtime = sorted("swapvae." + ".".join(p.relative_to(ROOT).with_suffix("").parts)
                     for p in (ROOT / "runtime").rglob("*.py"))
    code = f"""
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "sklearn", "onnx"):
            raise ModuleNotFoundError(f"blocked: {{name}}", name=name)
sys.meta_path.insert(0, Block())
for m in {runtime!r}:
    importlib.import_module(m.removesuffix(".__init__"))
assert not [m for m in sys.modules if m.startswith("swapvae.training")]
from swapvae.cli import main
assert main(["train", "--out", "/nonexistent/run"]) == 2  # one line naming the [train] extra, no traceback
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "pip install 'swapvae-bci[train]'" in out.stderr and "Traceback" not in out.stderr


def test_a_labs_own_training_folder_does_not_shadow_ours(tmp_path):
    """A lab's analysis folder with a training/ (and schemas/, runtime/) package of its own: the
    README's import still finds ours."""
    for name in LAYERS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("MINE = True\n")
    code = ("import numpy as np, training\nassert training.MINE\n"
            "from swapvae.training import SwapVAE\nfrom swapvae.schemas.session import split_session\n"
            "from swapvae.runtime.engine import BundleDecoder\n"
            "print(SwapVAE(epochs=1).get_config().optim.epochs)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def test_training_and_the_runtime_load_without_ray():
    """The [train] install and the rig's have no Ray: every module of training, runtime and
    schemas imports where ray, optuna and yaml cannot be imported (the sweep imports them only
    when it runs), and ``swapvae sweep`` there says in one line what to install."""
    modules = sorted("swapvae." + ".".join(p.relative_to(ROOT).with_suffix("").parts)
                     for layer in ("schemas", "runtime", "training") for p in (ROOT / layer).rglob("*.py"))
    code = f"""
import importlib, json, sys, tempfile
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "optuna", "yaml"):
            raise ModuleNotFoundError(f"blocked: {{name}}", name=name)
sys.meta_path.insert(0, Block())
for m in {modules!r}:
    importlib.import_module(m.removesuffix(".__init__"))
from swapvae.cli import main
spec = tempfile.mktemp(suffix=".json")
open(spec, "w").write(json.dumps({{"sessions": ["simulated"]}}))
assert main(["sweep", spec, "--out", tempfile.mkdtemp() + "/sweep"]) == 2
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "pip install 'swapvae-bci[sweep]'" in out.stderr and "Traceback" not in out.stderr
