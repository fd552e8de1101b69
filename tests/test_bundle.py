"""Reading bundles safely: signatures (export --sign, serve --trust), plain files only, keys."""
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from swapvae.cli import main as cli
from swapvae.runtime.bundle import BundleError, generate_signing_key, load_bundle, load_public_key
from swapvae.runtime.engine import BundleDecoder
from swapvae.training.export import export_bundle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return generate_signing_key(d / "lab"), generate_signing_key(d / "other")


@pytest.fixture(scope="module")
def signed(tiny_run, keys, tmp_path_factory):
    out = tmp_path_factory.mktemp("signed") / "bundle"
    export_bundle(tiny_run, out, sign=keys[0][0])
    return out


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path, capsys):
    assert cli(["keygen", "sign", str(tmp_path / "k")]) == 0
    assert stat.S_IMODE(os.stat(tmp_path / "k.key").st_mode) == 0o600
    load_public_key(tmp_path / "k.pub")
    before = (tmp_path / "k.key").read_bytes()
    assert cli(["keygen", "sign", str(tmp_path / "k")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "k.key").read_bytes() == before


def test_a_signed_bundle_loads_with_its_key_and_only_with_it(signed, keys, tiny_bundle):
    lab, other = (load_public_key(k[1]) for k in keys)
    assert (signed / "manifest.sig").exists()
    BundleDecoder(signed, trusted=[lab])
    BundleDecoder(signed, trusted=[other, lab])  # any trusted key may have signed it
    with pytest.raises(BundleError, match="does not verify with any trusted key"):
        load_bundle(signed, trusted=[other])
    with pytest.raises(BundleError, match="unsigned"):
        load_bundle(tiny_bundle, trusted=[lab])
    load_bundle(tiny_bundle)  # without --trust an unsigned bundle is served (hashes still checked)


def test_an_edited_graph_with_its_hash_edited_too_is_refused_when_trusting(signed, keys, tmp_path):
    """The hashes live in the manifest they protect: they catch accidents, the signature edits."""
    b = tmp_path / "b"
    shutil.copytree(signed, b)
    blob = bytearray((b / "decoder.onnx").read_bytes())
    blob[-1] ^= 1
    (b / "decoder.onnx").write_bytes(bytes(blob))
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["decoder.onnx"] = hashlib.sha256(bytes(blob)).hexdigest()
    (b / "manifest.json").write_text(json.dumps(m, indent=2))
    load_bundle(b)  # consistent hashes: only the signature can tell
    with pytest.raises(BundleError, match="does not verify"):
        load_bundle(b, trusted=[load_public_key(keys[0][1])])
    (b / "manifest.sig").write_text("{not json")
    with pytest.raises(BundleError, match="malformed"):
        load_bundle(b, trusted=[load_public_key(keys[0][1])])


def test_links_and_non_files_in_a_bundle_are_refused_always(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    outside = tmp_path / "outside.onnx"
    shutil.move(b / "decoder.onnx", outside)
    (b / "decoder.onnx").symlink_to(outside)  # same bytes, same hash: still refused
    with pytest.raises(BundleError, match="decoder.onnx is a symbolic link"):
        load_bundle(b)
    (b / "decoder.onnx").unlink()
    (b / "decoder.onnx").mkdir()
    with pytest.raises(BundleError, match="decoder.onnx"):
        load_bundle(b)
    c = tmp_path / "c"
    shutil.copytree(tiny_bundle, c)
    real = tmp_path / "manifest.json"
    shutil.move(c / "manifest.json", real)
    (c / "manifest.json").symlink_to(real)
    with pytest.raises(BundleError, match="manifest.json is a symbolic link"):
        load_bundle(c)
    current = tmp_path / "current"  # the bundle directory itself may be a link (atomic upgrades)
    current.symlink_to(tiny_bundle, target_is_directory=True)
    load_bundle(current)


def test_serve_with_trust_refuses_an_unsigned_bundle(tiny_bundle, keys):
    out = subprocess.run([sys.executable, "-m", "swapvae", "serve", str(tiny_bundle), "--bind", "tcp://127.0.0.1:*",
                          "--trust", str(keys[0][1])], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unsigned" in out.stderr and "Traceback" not in out.stderr
