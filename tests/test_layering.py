"""The direction of imports: schemas at the bottom, runtime above it, training above both, the
``swapvae`` command on top. A rig PC installs the runtime alone, so nothing under runtime/ may
import training, torch or scikit-learn, even lazily inside a function."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"schemas", "runtime", "training", "swapvae"}
# what each layer may import of ours, and third-party roots it must never import
ALLOWED = {"schemas": {"schemas"}, "runtime": {"schemas", "runtime"},
           "training": {"schemas", "runtime", "training"}}
FORBIDDEN = {"schemas": {"torch", "sklearn", "onnx", "onnxruntime", "zmq"}, "runtime": {"torch", "sklearn", "onnx"},
             "training": set()}


def imported_roots(path: Path) -> set[str]:
    """Top-level package of every absolute import in the file, wherever it sits (lazy ones too)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


MODULES = sorted(p for layer in ALLOWED for p in (ROOT / layer).rglob("*.py"))


def test_every_layer_has_modules():
    assert {p.relative_to(ROOT).parts[0] for p in MODULES} == set(ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_one_way(path):
    layer = path.relative_to(ROOT).parts[0]
    roots = imported_roots(path)
    upward = (roots & OURS) - ALLOWED[layer]
    assert not upward, f"{path.relative_to(ROOT)} ({layer}) imports {sorted(upward)}"
    banned = roots & FORBIDDEN[layer]
    assert not banned, f"{path.relative_to(ROOT)} ({layer}) imports {sorted(banned)}"


def test_runtime_loads_with_the_training_side_missing():
    """Every runtime module imports in a process where torch, scikit-learn and onnx cannot be
    imported at all (as on a runtime-only install), and pulls in nothing of training; a
    training command there says in one line what to install."""
    runtime = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "runtime").rglob("*.py"))
    code = f"""
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "sklearn", "onnx"):
            raise ModuleNotFoundError(f"blocked: {{name}}", name=name)
sys.meta_path.insert(0, Block())
for m in {runtime!r}:
    importlib.import_module(m.removesuffix(".__init__"))
assert not [m for m in sys.modules if m.split(".")[0] == "training"]
from swapvae.cli import main
assert main(["train", "--out", "/nonexistent/run"]) == 2  # one line naming the [train] extra, no traceback
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "pip install 'swapvae-bci[train]'" in out.stderr and "Traceback" not in out.stderr
