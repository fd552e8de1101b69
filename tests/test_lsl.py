"""The Lab Streaming Layer bridge (runtime/lsl.py): binning, the input's checks and the freshest-
sample policy with stand-ins for pylsl's inlet and outlet; then the real liblsl, only inside a
network namespace that holds nothing but loopback (tests/sandbox.py) with an LSL configuration
that keeps discovery on this machine (tests/lsl_loop.py drives the streams there)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from swapvae.runtime.lsl import FineBinner, LslBridge, LslInputError, SpikeBinner, check_input, output_channels

ROOT = Path(__file__).resolve().parents[1]
LSL_CONFIG = """[ports]
IPv6 = disable
[multicast]
ResolveScope = machine
KnownPeers = {127.0.0.1}
[log]
level = -3
"""


# -- binning ----------------------------------------------------------------------------------
@pytest.mark.parametrize("t0", [0.0, 12.34])
def test_spike_binning_equals_offline_binning_edges_included(t0):
    rng = np.random.default_rng(1)
    n, b, k = 5, 0.02, 300
    edges = t0 + np.arange(k + 1) * b  # offline: np.histogram over these edges
    t = np.sort(np.r_[rng.uniform(edges[0], edges[-2], 3000), edges[3:k - 1:7]])  # some exactly on an edge
    ch = rng.integers(0, n, len(t))
    binner = SpikeBinner(n, b, t0=t0)
    bins = [x for c, s in zip(ch, t) for x in binner.push(int(c), s)]
    bins += binner.close_until(edges[-1])
    got = np.stack([c for c, _ in bins])
    first = binner.index(t[0])
    want = np.stack([np.histogram(t[ch == c], edges)[0] for c in range(n)], axis=1)[first:]
    assert got.shape == want.shape and np.array_equal(got, want)
    assert [end for _, end in bins] == edges[first + 1:].tolist()  # each closed bin carries its end
    assert binner.push(0, t[0]) == [] and binner.late == 1  # a spike for a closed bin: counted, dropped


def test_a_spike_bin_closes_on_the_clock_and_empty_bins_are_bins():
    binner = SpikeBinner(3, 0.1)
    assert binner.push(2, 1.05) == [] and binner.close_until(1.0999) == []
    closed = binner.close_until(1.35)  # bins [1.0, 1.1), [1.1, 1.2), [1.2, 1.3) are over
    assert [c.tolist() for c, _ in closed] == [[0, 0, 1], [0, 0, 0], [0, 0, 0]]


def test_fine_counts_sum_into_bins_and_a_lost_sample_drops_the_partial_bin():
    fine = FineBinner(2, 4, 0.005)
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    done = [o.copy() for o in (fine.push(x[i], i * 0.005) for i in range(8)) if o is not None]
    assert np.array_equal(done, [x[:4].sum(0), x[4:8].sum(0)])
    assert fine.push(x[8], 0.045) is None and fine.push(x[9], 0.050) is None
    assert fine.push(x[10], 0.065) is None and fine.dropped == 2  # 15 ms later: samples were lost
    assert [fine.push(x[i], 0.065 + (i - 10) * 0.005) is None for i in range(11, 14)] == [True, True, False]


# -- the input's checks -----------------------------------------------------------------------
class Info:
    def __init__(self, n, fmt=1, rate=10.0, name="rig"):
        self._v = (name, n, fmt, rate)

    def name(self):
        return self._v[0]

    def channel_count(self):
        return self._v[1]

    def channel_format(self):
        return self._v[2]

    def nominal_srate(self):
        return self._v[3]


@pytest.mark.parametrize("info, kind, message", [
    (Info(7), "counts", "has 7 channels; the bundle takes 120"),
    (Info(120, fmt=3), "counts", "channel format string"),
    (Info(120, rate=1000.0), "counts", "nominal rate of 1000 Hz; the bundle's bins are 100 ms (10 Hz)"),
    (Info(120, rate=15.0), "fine", "nominal rate of 15 Hz"),
    (Info(120, fmt=4, rate=0.0), "spikes", "has 120 channels; a spike event has 1"),
])
def test_a_stream_that_does_not_fit_is_refused_naming_both_values(tiny_bundle, info, kind, message):
    from swapvae.runtime.bundle import read_manifest

    with pytest.raises(LslInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_input(info, read_manifest(tiny_bundle), kind)


def test_streams_that_fit_and_their_fine_samples_per_bin(tiny_bundle):
    from swapvae.runtime.bundle import read_manifest

    m = read_manifest(tiny_bundle)
    assert check_input(Info(120, rate=10.0), m, "counts") == 1
    assert check_input(Info(120, rate=0.0, fmt=5), m, "counts") == 1  # irregular: no rate to check
    assert check_input(Info(120, rate=1000.0), m, "fine") == 100
    assert check_input(Info(1, fmt=4, rate=0.0), m, "spikes") == 1
    labels = [c[0] for c in output_channels(m, rates=True)]
    assert labels[0] == "angle" and labels[1:9] == [f"p_{c}" for c in range(8)] and labels[9:11] == ["vx", "vy"]
    assert labels[11] == "content_0" and labels[-1] == f"rate_{m.neurons[-1]}"
    assert len(labels) == 1 + 8 + 2 + m.content_dim + len(m.neurons)


# -- the bridge with stand-ins: the freshest sample, gaps, bad samples -----------------------------
class Inlet:
    """pull_chunk as pylsl's: fills dest_obj, returns (None, timestamps)."""

    def __init__(self):
        self.chunks = []

    def pull_chunk(self, timeout, max_samples, dest_obj, min_samples):
        if not self.chunks:
            return None, []
        x, ts = self.chunks.pop(0)
        dest_obj[:len(x)] = x
        return None, list(ts)


class Outlet:
    def __init__(self):
        self.rows, self.ts = [], []

    def push_chunk(self, row, t):
        self.rows.append(np.array(row))
        self.ts.append(t)


def _reference(bundle, x, resets):
    """Every bin decoded in order on one stream, as replay's engine does: the published rows."""
    from swapvae.runtime.engine import BundleDecoder

    dec = BundleDecoder(bundle)
    rows = []
    for xi, r in zip(x, resets):
        o = dec.decode(xi, reset=r)
        rows.append(np.r_[o.angle, o.proba[0], o.velocity[0], o.content[0]])
    return np.array(rows, np.float32)


def _bridge(bundle, publish="newest"):
    from swapvae.runtime.engine import BundleDecoder

    inlet, outlet = Inlet(), Outlet()
    return LslBridge(BundleDecoder(bundle), inlet, outlet, publish=publish), inlet, outlet


def test_a_backlog_goes_through_the_history_but_only_the_newest_is_published(tiny_bundle):
    x = np.random.default_rng(0).poisson(1.0, (9, 120)).astype(np.float32)
    ts = 100 + 0.1 * np.arange(9)
    want = _reference(tiny_bundle, x, [True] + [False] * 8)
    b, inlet, outlet = _bridge(tiny_bundle)
    inlet.chunks = [(x[:1], ts[:1]), (x[1:6], ts[1:6]), (x[6:], ts[6:])]  # fell behind: 5, then 3 waiting
    assert [b.step(0) for _ in range(4)] == [1, 5, 3, 0]
    assert np.array_equal(outlet.rows, want[[0, 5, 8]]) and outlet.ts == [ts[0], ts[5], ts[8]]
    s = b.stats()
    assert (s["samples"], s["bins"], s["published"], s["stale_skipped"], s["history_restarts"]) == (9, 9, 3, 6, 1)

    b, inlet, outlet = _bridge(tiny_bundle, publish="all")
    inlet.chunks = [(x[:1], ts[:1]), (x[1:6], ts[1:6]), (x[6:], ts[6:])]
    while b.step(0):
        pass
    assert np.array_equal(outlet.rows, want) and outlet.ts == ts.tolist() and b.stats()["stale_skipped"] == 0

    # a refused bin behind the newest good one: the good one is published, as it was decoded
    b, inlet, outlet = _bridge(tiny_bundle)
    bad = np.full((1, 120), -1.0, np.float32)
    inlet.chunks = [(np.r_[x[:3], bad], np.r_[ts[:3], ts[3]])]
    b.step(0)
    assert np.array_equal(outlet.rows, want[[2]]) and outlet.ts == [ts[2]] and b.stats()["bad_samples"] == 1


def test_a_gap_or_time_going_back_restarts_the_history_and_bad_counts_are_counted(tiny_bundle):
    x = np.random.default_rng(1).poisson(1.0, (8, 120)).astype(np.float32)
    ts = np.array([0.0, 0.1, 0.2, 0.5, 0.6, 0.3, 0.4, 0.5])  # a 3-bin gap, then time goes back
    bad = x[2].copy()
    bad[7] = np.nan
    neg = x[2].copy()
    neg[3] = -1
    b, inlet, outlet = _bridge(tiny_bundle, publish="all")
    inlet.chunks = [(x[i:i + 1], ts[i:i + 1]) for i in range(6)] + [(bad[None], [0.35]), (neg[None], [0.38]),
                                                                     (x[6:], ts[6:])]
    while inlet.chunks:
        b.step(0)
    # refused bins leave nothing behind: the bin after one starts afresh, as after a gap
    want = _reference(tiny_bundle, np.r_[x[:6], x[6:]], [True, False, False, True, False, True, True, False])
    assert np.array_equal(outlet.rows, want)
    s = b.stats()
    assert (s["bins"], s["published"], s["bad_samples"], s["history_restarts"]) == (8, 8, 2, 4)


def test_the_bridge_thread_counts_a_failing_inlet_and_carries_on(tiny_bundle):
    import time

    b, inlet, outlet = _bridge(tiny_bundle)
    calls = []

    def broken(**kw):
        calls.append(1)
        raise RuntimeError("the stream was lost")

    inlet.pull_chunk = broken
    b.start()
    time.sleep(0.8)
    b.stop()
    assert len(calls) >= 2 and b.stats()["errors"] == len(calls)
    assert b.stats()["last_error"] == "RuntimeError: the stream was lost" and not b._thread.is_alive()


# -- the real liblsl, inside a loopback-only namespace --------------------------------------------
def _in_namespace(tmp_path, *argv, timeout=600) -> dict:
    pytest.importorskip("pylsl", reason="the [lsl] extra is not installed")
    from sandbox import loopback_only

    cfg = tmp_path / "lsl_api.cfg"
    cfg.write_text(LSL_CONFIG)
    env_argv = ["env", f"LSLAPICFG={cfg}", sys.executable, str(ROOT / "tests" / "lsl_loop.py"), *argv]
    res = subprocess.run(loopback_only(env_argv), cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_played_bins_served_over_lsl_score_as_the_replay_exactly_and_survive_the_source_leaving(
        tiny_bundle, tmp_path):
    r = _in_namespace(tmp_path, "serve", str(tiny_bundle))
    assert r["wrong"]["rc"] == 2 and "has 7 channels; the bundle takes 120" in r["wrong"]["err"][0]
    assert "lsl-in=rig lsl-out=dec" in r["ready"]
    assert r["labels"][0] == "angle" and r["units"][0] == "radians" and r["labels"][9:11] == ["vx", "vy"]
    assert r["n_read"] == r["n_test_bins"] == r["play"]["bins"], r
    assert r["lsl"] == r["offline"]  # acc, delta-acc, velocity R^2: equal, not close
    assert r["ts_steps_bins"] == [1.0, 2.0]  # each decode carries its bin's timestamp (a gap bin between trials)
    between = r["stats_between"]
    assert between["published"] == between["bins"] == r["n_test_bins"]
    assert between["history_restarts"] == r["offline"]["n_trials"] and between["errors"] == 0
    # the player left and came back (the same source id): the inlet recovered by itself
    assert r["play2_rc"] == 0 and r["n_read_again"] == r["n_test_bins"] and r["lsl_again"] == r["offline"]
    assert r["stats_after"]["published"] == 2 * r["n_test_bins"] and r["server_rc"] == 0


def test_spike_events_through_lsl_bin_as_the_recording_s_counts(tmp_path):
    r = _in_namespace(tmp_path, "spikes")
    assert r["taken"] == r["n_spikes"] == r["played"]["spikes"] > 1000
    assert r["equal"] and r["lead_empty"] and r["late"] == 0, r
    assert r["n_bins"] == r["n_expected"] >= r["played"]["bins"]


def test_the_bridge_thread_warms_the_engine_before_a_steady_streams_next_bin(tiny_bundle):
    import time

    class Paced(Inlet):
        """A bin every 5 ms, as a rig's stream: a pull waits for it or for its timeout."""

        def __init__(self, x):
            self.x, self.i, self.next = x, 0, time.perf_counter() + 0.005

        def pull_chunk(self, timeout, max_samples, dest_obj, min_samples):
            wait = self.next - time.perf_counter()
            if self.i == len(self.x) or wait > timeout:
                time.sleep(timeout)
                return None, []
            time.sleep(max(wait, 0.0))
            dest_obj[0] = self.x[self.i]
            self.i, self.next = self.i + 1, self.next + 0.005
            return None, [0.1 * self.i]

    b, _, outlet = _bridge(tiny_bundle)
    x = np.random.default_rng(2).poisson(1.0, (80, 120)).astype(np.float32)
    b.inlet = Paced(x)
    b.start()
    deadline = time.monotonic() + 10
    while b.inlet.i < 80 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.05)
    b.stop()
    assert b.stats()["published"] == b.stats()["bins"] == 80
    assert b.planner.warms > 0  # warm-ups ran between bins, and left the decodes as they were:
    assert np.array_equal(outlet.rows, _reference(tiny_bundle, x, [True] + [False] * 79))


def test_spikes_decoded_every_step_equal_the_sliding_window_on_offline_bins(tiny_bundle):
    """--lsl-step-ms 20 on a 100 ms bundle: spikes binned into 20 ms steps, and each step's decode
    that of SlidingWindowDecoder over the same steps binned offline."""
    from swapvae.runtime.engine import BundleDecoder
    from swapvae.runtime.window import SlidingWindowDecoder

    rng = np.random.default_rng(3)
    step, n_steps = 0.02, 60
    edges = 50.0 + np.arange(n_steps + 1) * step
    t = np.sort(rng.uniform(edges[0], edges[-1], 4000))
    ch = rng.integers(0, 120, len(t))
    dec = BundleDecoder(tiny_bundle)
    now = [0.0]  # the clock: before the recording while its spikes come, then just past its end
    b = LslBridge(dec, Inlet(), Outlet(), kind="spikes", publish="all", step_s=step, clock=lambda: now[0])
    b.inlet.chunks = [(ch[i:i + 500, None].astype(np.float32), t[i:i + 500]) for i in range(0, len(t), 500)]
    while b.inlet.chunks:
        b.step(0)
    now[0] = edges[-1] + step / 2 + 1e-6
    b.step(0)  # the clock closes the last step (close_after_s: half a step)
    fine = np.stack([np.histogram(t[ch == c], edges)[0] for c in range(120)], axis=1).astype(np.float32)
    ref = SlidingWindowDecoder(BundleDecoder(tiny_bundle), step)
    want = [o.copy() for o in map(ref.push, fine) if o is not None]
    assert len(want) == n_steps - 4 == len(b.outlet.rows) == b.stats()["published"]
    got = np.array(b.outlet.rows)
    assert np.array_equal(got[:, 0], [w.angle[0] for w in want])
    assert np.array_equal(got[:, -dec.manifest.content_dim:], [w.content[0] for w in want])
    assert np.allclose(b.outlet.ts, edges[5:], rtol=0, atol=1e-9)  # each decode carries its window's end


def test_a_decode_finer_than_the_input_is_refused(tiny_bundle):
    from swapvae.runtime.engine import BundleDecoder

    with pytest.raises(LslInputError, match="needs input finer than that"):
        LslBridge(BundleDecoder(tiny_bundle), Inlet(), Outlet(), kind="counts", step_s=0.02)
    with pytest.raises(LslInputError, match="fine samples of 1/4 bin"):
        LslBridge(BundleDecoder(tiny_bundle), Inlet(), Outlet(), kind="fine", per_bin=4, step_s=0.02)


def test_lsl_flags_without_an_input_are_refused(tiny_bundle, capsys):
    from swapvae.cli import main

    assert main(["serve", str(tiny_bundle), "--lsl-out", "x", "--lsl-step-ms", "20"]) == 2
    assert "--lsl-out, --lsl-step-ms configure the LSL bridge: give --lsl-in too" in capsys.readouterr().err


def test_stats_carry_the_bridge_s_counters_and_the_stats_command_shows_them(tiny_bundle):
    from fakes import FakeEngine

    from swapvae.runtime.serve.admin import format_stats
    from swapvae.runtime.serve.server import Server
    from swapvae.schemas.protocol import StatsReply

    b, inlet, _ = _bridge(tiny_bundle)
    b.stream = "rig1"
    inlet.chunks = [(np.ones((3, 120), np.float32), [0.0, 0.1, 0.2])]
    b.step(0)
    s = Server(FakeEngine(), bind="tcp://127.0.0.1:*", warmup=0)
    try:
        assert s.stats().lsl is None
        s.lsl = b
        st = StatsReply.model_validate_json(s.stats().model_dump_json())  # as a client reads it
    finally:
        s.close()
    assert (st.lsl.bins, st.lsl.published, st.lsl.stale_skipped, st.lsl.kind) == (3, 1, 2, "counts")
    assert "lsl       rig1 (counts): 3 samples, 3 bins, 1 published, 2 stale held back" in format_stats(st, "x")
