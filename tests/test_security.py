"""CURVE end to end (issue 12): keys from ``swapvae keygen curve``, a server that lets in the
clients on its allow-list only (an unknown key gets nothing at all), the Python and C clients
with CURVE, binds other machines can reach refused without CURVE unless ``--insecure``, and
INFO's training details only for authenticated or local peers."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import zmq
from test_c_client import CFLAGS, SRC, _zmq_header
from test_service import ROOT, Service

from swapvae.cli import main
from swapvae.runtime import wire
from swapvae.runtime.client import Client, ServiceTimeout
from swapvae.runtime.security import CurveKeyError, load_secret
from swapvae.schemas.protocol import MsgType


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("curve")
    (d / "allow").mkdir()
    for name in ("server", "allow/alice", "mallory"):
        assert main(["keygen", "curve", str(d / name)]) == 0
    return d


@pytest.fixture(scope="module")
def secure(tiny_bundle, keys):
    s = Service(tiny_bundle, "--curve-secret", str(keys / "server.key_secret"), "--allow", str(keys / "allow"))
    yield s
    s.stop()


def test_keygen_writes_a_private_file_only_its_owner_reads_and_never_overwrites(keys, capsys):
    secret, public = keys / "server.key_secret", keys / "server.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and "secret-key" not in public.read_text()
    pub, sec = load_secret(secret)
    assert len(pub) == len(sec) == 40 and pub.decode() in public.read_text()
    assert zmq.auth.load_certificate(public)[0] == pub  # pyzmq's own reader agrees
    assert main(["keygen", "curve", str(keys / "server")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    loose = keys / "loose.key_secret"
    loose.write_text(secret.read_text())
    os.chmod(loose, 0o644)
    with pytest.raises(CurveKeyError, match="readable by its owner only"):
        load_secret(loose)


def test_an_allowed_key_decodes_and_an_unknown_one_gets_nothing(secure, keys, tiny_bundle):
    from swapvae.runtime.engine import BundleDecoder

    eng = BundleDecoder(tiny_bundle)
    x = np.random.default_rng(0).poisson(1.5, (3, eng.n_channels)).astype(np.float32)
    server_key = keys / "server.key"
    with Client(secure.endpoint, timeout_ms=5000, server_key=server_key,
                client_secret=keys / "allow" / "alice.key_secret") as c:
        info = c.info()
        assert info.training_details and "training" in info.manifest  # authenticated: the whole manifest
        got = c.decode(x[0], reset=True)
        np.testing.assert_array_equal(got.velocity, eng.decode_stream(eng.new_stream(), x[0]).velocity)
        # the largest valid request passes libzmq's size check inside CURVE's framing
        big = np.ones((info.max_bins, eng.n_channels), np.float64)
        assert len(wire.pack_request(MsgType.DECODE, 0, 0, big)) == info.max_request_bytes
        assert c.decode(big).angle.shape == (info.max_bins,)
        before = c.stats().auth_denied
        for client in (dict(server_key=server_key, client_secret=keys / "mallory.key_secret"), {}):
            with Client(secure.endpoint, timeout_ms=500, **client) as other:
                with pytest.raises(ServiceTimeout):
                    other.ping()
        assert c.stats().auth_denied > before  # mallory's handshake refused (the plain client's never starts)


def test_the_c_client_speaks_curve(secure, keys, tmp_path, tiny_bundle):
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not _zmq_header():
        pytest.skip("no C compiler or no libzmq headers (apt-get install libzmq3-dev)")
    exe = tmp_path / "svae_demo"
    built = subprocess.run([cc, *CFLAGS, "-D_POSIX_C_SOURCE=200809L", "-o", str(exe), str(SRC / "svae_demo.c"),
                            "-lzmq"],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    stdin = " ".join(["1"] * 120) + "\n"
    ok = subprocess.run([str(exe), secure.endpoint, "3000", str(keys / "server.key"),
                         str(keys / "allow" / "alice.key_secret")], input=stdin, capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[1] == "info n_channels=120" and "decode seq=3" in ok.stdout
    refused = subprocess.run([str(exe), secure.endpoint, "300", str(keys / "server.key"),
                              str(keys / "mallory.key_secret")], input=stdin, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 1 and "no PONG" in refused.stderr


def test_a_bind_other_machines_reach_needs_curve_or_insecure(tiny_bundle):
    cmd = [sys.executable, "-m", "swapvae", "serve", str(tiny_bundle), "--bind", "tcp://0.0.0.0:0"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "can be reached from other machines" in out.stderr and "--insecure" in out.stderr
    svc = Service(tiny_bundle, "--bind", "tcp://0.0.0.0:*", "--insecure")  # the later --bind wins
    try:
        endpoint = svc.endpoint.replace("0.0.0.0", "127.0.0.1")
        with Client(endpoint, timeout_ms=5000) as c:
            info = c.info()
            assert not info.training_details and not {"training", "versions", "quantization"} & set(info.manifest)
            assert info.manifest["files"] and info.n_channels == 120  # what a client needs stays
            assert c.decode(np.ones(120, np.float32)).angle.shape == (1,)
    finally:
        svc.stop()


def test_operator_commands_take_the_clients_curve_keys(secure, keys, capsys):
    alice = ["--server-key", str(keys / "server.key"), "--client-secret", str(keys / "allow" / "alice.key_secret")]
    assert main(["stats", secure.endpoint, "--json", *alice]) == 0
    assert '"requests"' in capsys.readouterr().out
    assert main(["stats", secure.endpoint, "--timeout-ms", "300"]) == 2  # no keys: no reply at all
    assert "no reply" in capsys.readouterr().err
    assert main(["stats", secure.endpoint, "--server-key", str(keys / "server.key")]) == 2  # half a pair
    assert "CURVE needs both" in capsys.readouterr().err
