"""The LSL checks that need real streams, run by tests/test_lsl.py inside a network namespace that
holds only loopback, with the test's LSLAPICFG. Prints one JSON object; the test asserts on it.

    python tests/lsl_loop.py serve BUNDLE   # play -> swapvae serve --lsl-in/--lsl-out -> inlet
    python tests/lsl_loop.py spikes         # spike events -> inlet -> SpikeBinner vs the counts
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pylsl

from swapvae.runtime.lsl import SpikeBinner, open_inlet, play, resolve

SWAPVAE = [str(Path(sys.executable).parent / "swapvae")]
ENDPOINT = "tcp://127.0.0.1:5611"


def read_outlet(name: str, n: int, timeout_s: float, out: dict) -> threading.Thread:
    """A reader of ``n`` samples of ``name``, connected before this returns (out: labels, rows, ts)."""
    inlet = open_inlet(resolve(name, 20), 20)
    out["labels"] = inlet.info(5).get_channel_labels()
    out["units"] = inlet.info(5).get_channel_units()
    rows, ts = [], []

    def run():
        deadline = time.monotonic() + timeout_s
        while len(ts) < n and time.monotonic() < deadline:
            s, t = inlet.pull_chunk(timeout=0.2, max_samples=1024, as_numpy=True)
            if len(t):
                rows.append(s)
                ts.extend(t)
        out["rows"] = np.concatenate(rows) if rows else np.zeros((0, len(out["labels"])), np.float32)
        out["ts"] = np.asarray(ts)

    th = threading.Thread(target=run)
    th.start()
    return th


def serve(bundle: str) -> dict:
    from swapvae.runtime.bundle import read_manifest
    from swapvae.runtime.client import Client
    from swapvae.runtime.replay import offline_reach, replay_bins, scores
    from swapvae.training.data import load_session

    r: dict = {}
    # a stream that does not fit the bundle: refused before serving, both values named
    wrong = pylsl.StreamOutlet(pylsl.StreamInfo("wrong", "SpikeCounts", 7, 10.0, pylsl.cf_float32, "wrong"))
    res = subprocess.run([*SWAPVAE, "serve", bundle, "--bind", ENDPOINT, "--lsl-in", "wrong", "--lsl-wait-s", "10"],
                         capture_output=True, text=True, timeout=60)
    r["wrong"] = {"rc": res.returncode, "err": res.stderr.strip().splitlines()[-1:]}
    del wrong

    session = load_session("simulated")
    bins = replay_bins(read_manifest(bundle), session)
    n = len(bins.counts)
    server = subprocess.Popen([*SWAPVAE, "serve", bundle, "--bind", ENDPOINT, "--lsl-in", "rig", "--lsl-out", "dec",
                               "--lsl-publish", "all"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        got: dict = {}
        reader = read_outlet("dec", n, 120, got)  # the outlet exists before the input does
        play1 = subprocess.run([*SWAPVAE, "play", "simulated", "--bundle", bundle, "--lsl", "rig", "--speed", "20",
                                "--json"], capture_output=True, text=True, timeout=120)
        reader.join()
        r["ready"] = server.stdout.readline().strip()
        r["play"] = json.loads(play1.stdout) if play1.returncode == 0 else play1.stderr
        labels, rows = got["labels"], got["rows"]
        r["labels"], r["units"], r["n_read"], r["n_test_bins"] = labels, got["units"], len(rows), n
        if len(rows) == n:
            angle = rows[:, labels.index("angle")]
            velocity = rows[:, [labels.index(v) for v in ("vx", "vy")]]
            r["lsl"] = scores(angle, velocity, bins)
            r["offline"] = offline_reach(bundle, session)
            r["ts_steps_bins"] = sorted(set(np.round(np.diff(got["ts"]) / session.bin_size_s, 3).tolist()))
        # the player has gone (its stream with it): the sockets serve on, and a new player of the
        # same source is taken up by the inlet's recovery
        with Client(ENDPOINT, timeout_ms=2000) as c:
            c.ping()
            r["stats_between"] = c.stats().lsl.model_dump()
        again: dict = {}
        reader = read_outlet("dec", n, 120, again)
        play2 = subprocess.run([*SWAPVAE, "play", "simulated", "--bundle", bundle, "--lsl", "rig", "--speed", "20",
                                "--json"], capture_output=True, text=True, timeout=120)
        reader.join()
        r["play2_rc"], r["n_read_again"] = play2.returncode, len(again["rows"])
        if len(again["rows"]) == n:
            rows = again["rows"]
            r["lsl_again"] = scores(rows[:, labels.index("angle")], rows[:, [labels.index("vx"), labels.index("vy")]],
                                    bins)
        with Client(ENDPOINT, timeout_ms=2000) as c:
            r["stats_after"] = c.stats().lsl.model_dump()
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
        r["server_rc"], r["server_err"] = server.returncode, err.strip().splitlines()[-3:]
    return r


def spikes() -> dict:
    from swapvae.training.data import load_session

    s = load_session("simulated")
    keep = s.trial < s.trial[0] + 6  # six trials
    counts, trial, bin_s = s.counts[keep].astype(np.float32), s.trial[keep], s.bin_size_s
    played: dict = {}
    th = threading.Thread(target=lambda: played.update(play(counts, trial, bin_s, "spk", kind="spikes", speed=10)))
    th.start()
    inlet = open_inlet(resolve("spk", 20), 20)
    binner, bins = SpikeBinner(counts.shape[1], bin_s), []
    n_spikes = int(counts.sum())
    taken, deadline = 0, time.monotonic() + 120
    while taken < n_spikes and time.monotonic() < deadline:
        x, ts = inlet.pull_chunk(timeout=0.2, max_samples=4096, as_numpy=True)
        for c, t in zip(x[:, 0], ts):
            bins += binner.push(int(c), t)
        taken += len(ts)
    th.join()
    bins += binner.close_until(binner.t0 + (binner.k + 1.5) * bin_s)  # the last bin: its end has come
    # the played timeline: bin i in slot i + (trials begun before it), one empty bin between trials
    slot = np.arange(len(counts)) + np.cumsum(np.r_[False, trial[1:] != trial[:-1]])
    expect = np.zeros((slot[-1] + 1, counts.shape[1]), np.float32)
    expect[slot] = counts
    first = int(round((bins[0][1] - played["t0"]) / bin_s)) - 1  # the slot of the first binned bin
    got = np.stack([b for b, _ in bins])
    lead = expect[:first]  # bins before the first spike are not seen: they must be empty
    return {"n_spikes": n_spikes, "taken": taken, "played": played, "first_slot": first,
            "lead_empty": bool((lead == 0).all()), "n_bins": len(got), "n_expected": len(expect) - first,
            "equal": bool(len(got) == len(expect) - first and np.array_equal(got, expect[first:])),
            "late": binner.late}


if __name__ == "__main__":
    out = serve(sys.argv[2]) if sys.argv[1] == "serve" else spikes()
    print(json.dumps(out, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
