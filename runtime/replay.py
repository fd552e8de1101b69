"""``swapvae replay BUNDLE --data PATH``: stream a recording's test bins through a running service.

The test bins are those of the offline evaluation: the same chronological split by trial with
the bundle's own data settings. Every test bin is sent, in order, one request per bin (as a
rig would), with RESET at each test trial's first bin, so the server's readout sees the same
causal windows as the offline evaluation (``runtime.history.causal_windows``). Reach acc and
delta-acc are scored on the bins whose hand speed exceeds the bundle's readout threshold,
velocity R^2 on all test bins. The scores therefore equal those of the same bundle decoded bin
by bin in-process with the same resets (``offline_reach``), exactly, and those of the
training-time evaluation (torch and a float64 readout) up to float rounding; the round trips
measured here are what a closed loop would see. A session without reach labels, or a bundle
without a readout, is replayed all the same for its latency: nothing is then scored.

Like all of ``runtime`` it needs numpy alone: the recording arrives as a ``schemas.session``
Session (``swapvae replay`` reads a .npz with numpy, or builds the simulated session when the
training side is installed), and the scores are ``runtime.reach``'s.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swapvae.runtime.bundle import read_manifest
from swapvae.runtime.client import Client, ServiceTimeout
from swapvae.runtime.reach import r2_scores, reach_scores
from swapvae.schemas.manifest import BundleManifest
from swapvae.schemas.session import Session, split_session


@dataclass
class ReplayBins:
    counts: np.ndarray  # (n_bins, n_channels) float32, every test bin in order
    first: np.ndarray  # (n_bins,) bool: the first bin of a test trial (sent with RESET)
    target: np.ndarray | None  # (n_bins,) direction class; None: nothing to score (see ``unscored``)
    velocity: np.ndarray | None  # (n_bins, 2) hand velocity
    scored: np.ndarray | None  # (n_bins,) bool: hand speed above the readout threshold (acc, delta-acc)
    n_directions: int
    session: str
    unscored: str | None = None  # why the replay measures latency alone


def replay_bins(manifest: BundleManifest, session: Session) -> ReplayBins:
    """The test bins of ``session`` under the split and scoring rule the bundle was evaluated with
    (its labels too, when the session has them and the bundle a readout to score)."""
    if session.n_neurons != manifest.n_channels:
        raise ValueError(f"{session.name} has {session.n_neurons} channels but the bundle expects "
                         f"{manifest.n_channels}: replay the recording it was trained on "
                         f"({manifest.training.data or 'unknown data'})")
    rule = manifest.training.evaluation
    test = split_session(session, rule.train_fraction).test
    first = np.r_[True, test.trial[1:] != test.trial[:-1]]  # the trial boundaries of causal_windows
    counts = np.ascontiguousarray(test.counts, np.float32)
    if manifest.readout is None or not session.has_labels:
        why = ("the bundle has no readout (trained without reach labels)" if manifest.readout is None else
               f"{session.name} has no reach labels (target, velocity)")
        return ReplayBins(counts, first, None, None, None, 0, session.name, f"nothing scored: {why}")
    # the recording's number of directions, which the readout's classes (those its labelled
    # trials held: a few calibration trials may miss some) need not all be
    n_dir = manifest.training.config.get("readout", {}).get("n_directions") or len(manifest.readout.direction.classes)
    return ReplayBins(counts, first, test.target, np.asarray(test.velocity, np.float64),
                      test.speed > rule.speed_threshold, int(n_dir), session.name)


def scores(angle: np.ndarray, velocity: np.ndarray, bins: ReplayBins) -> dict:
    """acc and delta-acc of the angles on the scored bins, R^2 of the velocities on all bins."""
    acc, dacc = reach_scores(angle[bins.scored], bins.target[bins.scored], bins.n_directions)
    r2 = r2_scores(velocity, bins.velocity)
    return {"reach_acc": acc, "reach_delta_acc": dacc, "velocity_r2": float(r2.mean()),
            "velocity_r2_vx": float(r2[0]), "velocity_r2_vy": float(r2[1]), "n_bins": len(angle),
            "n_scored": int(bins.scored.sum()), "n_trials": int(bins.first.sum())}


def offline_reach(bundle: str | Path, session: Session) -> dict:
    """The same scores from the engine in-process, one bin per call with the same resets, as
    the service decodes them."""
    from swapvae.runtime.engine import BundleDecoder

    dec = BundleDecoder(bundle)
    bins = replay_bins(dec.manifest, session)
    if bins.unscored:
        raise ValueError(bins.unscored)
    n = len(bins.counts)
    angle, velocity = np.empty(n, np.float32), np.empty((n, bins.velocity.shape[1]), np.float32)
    for i, (x, first) in enumerate(zip(bins.counts, bins.first)):
        out = dec.decode(x, reset=first)
        angle[i], velocity[i] = out.angle[0], out.velocity[0]
    return scores(angle, velocity, bins)


def percentiles_us(ns: np.ndarray) -> dict[str, float]:
    us = np.asarray(ns, np.float64) / 1e3
    p50, p90, p99, p999 = np.percentile(us, [50, 90, 99, 99.9])
    return {"p50": p50, "p90": p90, "p99": p99, "p999": p999, "mean": float(us.mean()), "max": float(us.max())}


def replay(bundle: str | Path, session: Session, endpoint: str, rate: float = 0.0, timeout_ms: int = 1000,
           wait_s: float = 30.0, keep_times: bool = False, **curve) -> dict:
    """Stream the test bins of ``session`` through the service at ``endpoint``; scores and latencies.

    Waits up to ``wait_s`` for the service to answer, so a script can start both at once.
    ``keep_times``: also return every request's times, ns (``times_ns``: round_trip, server, queue);
    ``curve``: the Client's CURVE keywords (server_key, client_secret)."""
    manifest = read_manifest(bundle)
    bins = replay_bins(manifest, session)
    with Client(endpoint, timeout_ms=timeout_ms, **curve) as client:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                info = client.info()
                break
            except ServiceTimeout:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"no service answers at {endpoint} after {wait_s:.0f} s "
                                       f"(start one with: swapvae serve {bundle} --bind {endpoint})") from None
                print(f"waiting for the service at {endpoint} ...", file=sys.stderr, flush=True)
        if info.manifest.get("files") != manifest.model_dump(mode="json")["files"]:
            raise ValueError(f"the service at {endpoint} serves a different bundle than {bundle} "
                             f"(its files' sha256 differ)")
        n, scoring = len(bins.counts), bins.unscored is None
        angle, velocity = np.empty(n, np.float32), np.empty((n, info.velocity_dim), np.float32)
        rtt, server, queue = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
        period = 1.0 / rate if rate > 0 else 0.0
        start = time.perf_counter()
        for i, (x, first) in enumerate(zip(bins.counts, bins.first)):
            if period:
                wait = start + i * period - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            try:
                out = client.decode(x, reset=first)
            except ServiceTimeout:
                raise RuntimeError(f"the service at {endpoint} stopped answering at bin {i} of {n} (a new "
                                   f"connection would be a new stream: start the replay again)") from None
            if out.reset_applied != first:  # e.g. evicted by other clients beyond --max-streams
                raise RuntimeError(f"the service lost this stream's history at bin {i} (evicted?): the windows "
                                   f"would differ from the offline evaluation's")
            if scoring:
                angle[i], velocity[i] = out.angle[0], out.velocity[0]
            rtt[i], server[i], queue[i] = out.rtt_ns, out.server_ns, out.queue_ns
        elapsed = time.perf_counter() - start
    scored = scores(angle, velocity, bins) if scoring else {"scores": bins.unscored, "n_bins": n,
                                                             "n_trials": int(bins.first.sum())}
    r = {**scored, "latency_us": percentiles_us(rtt), "server_us": percentiles_us(server),
         "queue_us": percentiles_us(queue), "bins_per_s": n / elapsed, "rate_hz": rate, "endpoint": endpoint,
         "session": bins.session}
    if keep_times:
        r["times_ns"] = {"round_trip": rtt, "server": server, "queue": queue}
    return r
