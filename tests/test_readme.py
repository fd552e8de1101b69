"""The README's Python blocks run as written, in a folder where `make demo` has left
``bundles/demo`` and a service answers on the README's endpoint."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_files import Served

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
pytestmark = pytest.mark.slow  # the first block trains two small models


def test_the_readme_has_its_python_blocks():
    assert len(BLOCKS) == 4


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_bundle):
    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(tiny_bundle, folder / "bundles" / "demo")
    return folder


def _run(code: str, cwd: Path) -> None:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_a_readme_block_runs_as_written(i, demo):
    code = BLOCKS[i]
    if "tcp://127.0.0.1:5555" not in code:
        _run(code, demo)
        return
    swapvae = str(Path(sys.executable).parent / "swapvae")
    try:
        served = Served([swapvae, "serve", "bundles/demo", "--bind", "tcp://127.0.0.1:5555"], cwd=demo)
    except AssertionError as e:
        if "Address already in use" in str(e):
            pytest.skip("port 5555, the README's, is taken on this machine")
        raise
    with served:
        _run(code, demo)
