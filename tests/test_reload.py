"""Reloading the bundle on SIGHUP (issue 13, the server's half): the new bundle is verified
before the switch, the old one keeps serving if it fails, replies switch at one point in each
client's sequence, no request is lost, and streams keep their histories only when the new
bundle's window and latent sizes are the same."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fakes import FakeEngine, expected
from test_server import Running
from test_service import Service

from swapvae.runtime import wire
from swapvae.runtime.client import Client
from swapvae.runtime.serve.server import Server
from swapvae.schemas.protocol import InfoReply, MsgType, ReplyFlag


def _decode(server, key, x, reset=False):
    head, body = wire.parse_reply(server.handle(wire.pack_request(MsgType.DECODE, 1, 0, x, flags=int(reset)), key))
    return head, wire.decode_arrays(head, body)


def test_reload_keeps_streams_of_the_same_sizes_and_resets_them_otherwise():
    s = Server(FakeEngine(), bind=None, sub="inproc://rl1", pub="inproc://rl2", warmup=0)
    x = [np.full(6, i, np.float32) for i in range(1, 5)]
    try:
        _decode(s, b"a", x[0], reset=True)
        _decode(s, b"a", x[1])
        s.reload(FakeEngine())  # same window and latent sizes: the history carries over
        head, got = _decode(s, b"a", x[2])
        assert not head.flags & ReplyFlag.RESET_APPLIED
        np.testing.assert_array_equal(got["velocity"], expected(x[2], x[:2]).velocity)
        s.reload(FakeEngine(readout=False))  # another window: every stream starts afresh
        head, _ = _decode(s, b"a", x[3])
        assert head.flags & ReplyFlag.RESET_APPLIED and s.stats().reloads == 2
    finally:
        s.close()


class WiderEngine(FakeEngine):
    n_channels = 7


@pytest.mark.parametrize("allowed", [False, True])
def test_a_reload_to_another_channel_count_is_refused_unless_allowed(allowed, capsys):
    """A SIGHUP from a 6- to a 7-channel bundle: refused (the log and STATS say why, clients keep
    their 6-channel decodes) unless the server was started with --allow-channel-change."""
    engines = iter([WiderEngine()])
    s = Server(FakeEngine(), bind=None, sub="inproc://ch1", pub="inproc://ch2", warmup=0,
               loader=lambda: next(engines), allow_channel_change=allowed)
    loop = Running(s)
    try:
        s.request_reload()
        deadline = time.monotonic() + 10
        while s.recorder.reload_failures + s.recorder.reloads < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        st = s.stats()
    finally:
        loop.stop()
        s.close()
    err = capsys.readouterr().err
    if allowed:
        assert (st.reloads, st.reload_failures, st.reload_error, s.n_channels) == (1, 0, None, 7)
    else:
        assert (st.reloads, st.reload_failures, s.n_channels) == (0, 1, 6)
        assert "takes 7 channels and this one 6" in st.reload_error and "--allow-channel-change" in st.reload_error
        assert "reload refused, still serving" in err and "takes 7 channels" in err


def test_a_failed_load_keeps_the_old_engine_and_a_good_one_switches_between_requests():
    engines = iter([RuntimeError("bad bundle"), FakeEngine(readout=False)])

    def loader():
        e = next(engines)
        if isinstance(e, Exception):
            raise e
        return e

    s = Server(FakeEngine(), bind=None, sub="inproc://rl3", pub="inproc://rl4", warmup=0, loader=loader)
    loop = Running(s)
    try:
        for want_readout in (True, False):  # the first load fails, the second takes
            s.request_reload()
            deadline = time.monotonic() + 10
            done = 1 + (not want_readout)
            while s.recorder.reload_failures + s.recorder.reloads < done and time.monotonic() < deadline:
                time.sleep(0.01)
            assert s.recorder.reload_failures == 1 and s.recorder.reloads == int(not want_readout)
            assert s.bundle.layout.has_readout is want_readout
    finally:
        loop.stop()
        s.close()


def _bundle_versions(tiny_bundle, root: Path, sign_key=None) -> dict[str, Path]:
    """v1 (the tiny bundle), v2 (its manifest with another created_utc: a valid new bundle whose
    INFO differs), v3 (v2 with a corrupt decode graph); signed by ``sign_key`` if given."""
    from swapvae.runtime.bundle import SIGNATURE, sign_manifest

    out = {}
    for name in ("v1", "v2", "v3"):
        d = root / name
        shutil.copytree(tiny_bundle, d)
        if name != "v1":
            m = json.loads((d / "manifest.json").read_text())
            m["created_utc"] = f"2030-01-01T00:00:0{name[1]}Z"
            (d / "manifest.json").write_text(json.dumps(m))
        if name == "v3":
            g = bytearray((d / "decode.onnx").read_bytes())
            g[-10] ^= 0xFF
            (d / "decode.onnx").write_bytes(bytes(g))
        (d / SIGNATURE).unlink(missing_ok=True)
        if sign_key is not None:
            (d / SIGNATURE).write_bytes(sign_manifest((d / "manifest.json").read_bytes(), sign_key))
        out[name] = d
    return out


def _point(current: Path, target: Path) -> None:
    """Swap the symlink atomically, as an operator would (ln -s new tmp && mv -T tmp current)."""
    tmp = current.with_name("current.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, current)


def test_sighup_swaps_to_the_new_bundle_under_a_stream_of_requests(tiny_bundle, tmp_path):
    versions = _bundle_versions(tiny_bundle, tmp_path)
    current = tmp_path / "current"
    current.symlink_to(versions["v1"])
    svc = Service(current)
    rng = np.random.default_rng(0)
    x = rng.poisson(1.5, (50, 120)).astype(np.float32)
    seen: list[str] = []  # created_utc of the INFO answered after each decode, in order
    errors: list[str] = []
    stop = threading.Event()

    def stream():
        try:
            with Client(svc.endpoint, timeout_ms=10_000, context=None) as c:
                first = True
                while not stop.is_set():
                    for row in x:
                        out = c.decode(row, reset=first)
                        if out.reset_applied != first:  # same sizes: streams are kept across the reload
                            errors.append(f"reset_applied {out.reset_applied} after {len(seen)} requests")
                        first = False
                    seen.append(c.info().manifest["created_utc"])
                    time.sleep(0.02)  # the control rate: 50 a second
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    th = threading.Thread(target=stream)
    th.start()
    try:
        def wait_for(pred, what: str) -> None:
            deadline = time.monotonic() + 60
            while not pred() and time.monotonic() < deadline and th.is_alive():
                time.sleep(0.25)  # a STATS poll within the control rate (10 a second)
            assert pred(), f"{what}; seen {seen[-5:]}, errors {errors}"

        v1 = json.loads((versions["v1"] / "manifest.json").read_text())["created_utc"]
        wait_for(lambda: len(seen) >= 3, "the stream did not start")
        _point(current, versions["v2"])
        svc.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: seen and seen[-1].startswith("2030-01-01T00:00:02"), "no switch to v2")
        _point(current, versions["v3"])  # corrupt: refused, v2 keeps serving
        svc.proc.send_signal(signal.SIGHUP)
        with Client(svc.endpoint, timeout_ms=5000) as c:
            wait_for(lambda: c.stats().reload_failures == 1, "the corrupt bundle was not refused")
            n = len(seen)
            wait_for(lambda: len(seen) >= n + 3, "the stream stopped")
            st = c.stats()
        assert st.reloads == 1 and st.reload_failures == 1
    finally:
        stop.set()
        th.join(60)
        code = svc.stop()
    assert errors == [] and code == 0
    switch = [i for i in range(1, len(seen)) if seen[i] != seen[i - 1]]
    assert seen[0] == v1 and len(switch) == 1 and set(seen[switch[0]:]) == {"2030-01-01T00:00:02Z"}, seen


def test_a_reload_keeps_the_trusted_keys(tiny_bundle, tmp_path):
    from swapvae.runtime.bundle import generate_signing_key, load_private_key

    private, public = generate_signing_key(tmp_path / "lab")
    signed = _bundle_versions(tiny_bundle, tmp_path / "signed", load_private_key(private))
    unsigned = _bundle_versions(tiny_bundle, tmp_path / "unsigned")
    current = tmp_path / "current"
    current.symlink_to(signed["v1"])
    svc = Service(current, "--trust", str(public))
    try:
        with Client(svc.endpoint, timeout_ms=5000) as c:
            for target, reloads, failures, created in ((unsigned["v2"], 0, 1, None),
                                                       (signed["v2"], 1, 1, "2030-01-01T00:00:02Z")):
                _point(current, target)
                svc.proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    st = c.stats()
                    if (st.reloads, st.reload_failures) == (reloads, failures):
                        break
                    time.sleep(0.25)
                assert (st.reloads, st.reload_failures) == (reloads, failures)
                info = InfoReply.model_validate(c.info())
                assert info.manifest["created_utc"] == (created or json.loads(
                    (signed["v1"] / "manifest.json").read_text())["created_utc"])
    finally:
        assert svc.stop() == 0


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this platform")
def test_core_pins_every_thread_of_the_server(tiny_bundle):
    core = sorted(os.sched_getaffinity(0))[-1]
    svc = Service(tiny_bundle, "--core", str(core))
    try:
        pid = svc.proc.pid
        cpus = {t: (Path(f"/proc/{pid}/task/{t}/status").read_text().split("Cpus_allowed_list:")[1].split()[0])
                for t in os.listdir(f"/proc/{pid}/task")}
        assert len(cpus) >= 2 and set(cpus.values()) == {str(core)}, cpus  # ZeroMQ's I/O thread too
    finally:
        svc.stop()
