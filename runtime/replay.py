"""``swapvae replay BUNDLE --data PATH``: stream a recording's test bins through a running service.

The test bins are those of the offline evaluation: the same chronological split by trial with
the bundle's own data settings, scored on the bins whose hand speed exceeds the bundle's
readout threshold. Every test bin is sent, in order, one request per bin (as a rig would);
the reach accuracy of the returned angles therefore equals the offline evaluation of the same
bundle decoded bin by bin in-process (``offline_reach``), and the round trips measured here
are what a closed loop would see.

Like all of ``runtime`` it needs numpy alone: the recording arrives as a ``schemas.session``
Session (``swapvae replay`` reads a .npz with numpy, or builds the simulated session when the
training side is installed), and the scores are ``runtime.reach``'s.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.client import Client, ServiceTimeout
from runtime.reach import reach_scores
from schemas.manifest import MANIFEST, BundleManifest
from schemas.session import Session, split_session


@dataclass
class ReplayBins:
    counts: np.ndarray  # (n_bins, n_channels) float32, every test bin in order
    target: np.ndarray  # (n_bins,) direction class
    scored: np.ndarray  # (n_bins,) bool: hand speed above the readout threshold
    n_directions: int
    session: str


def read_manifest(bundle: str | Path) -> BundleManifest:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{bundle}: no {MANIFEST} (is this a bundle written by 'swapvae export'?)")
    return BundleManifest.model_validate_json(path.read_bytes())


def replay_bins(manifest: BundleManifest, session: Session) -> ReplayBins:
    """The test bins of ``session`` under the split and scoring rule the bundle was evaluated with."""
    if session.n_neurons != manifest.n_channels:
        raise ValueError(f"{session.name} has {session.n_neurons} channels but the bundle expects {manifest.n_channels} "
                         f"(it was trained on {manifest.training.data or 'unknown data'}); pass --data")
    if not session.has_labels:
        raise ValueError(f"{session.name} has no reach labels (target, velocity): nothing to score a replay against")
    rule = manifest.training.evaluation
    test = split_session(session, rule.train_fraction).test
    return ReplayBins(np.ascontiguousarray(test.counts, np.float32), test.target, test.speed > rule.speed_threshold,
                      len(manifest.direction.classes), session.name)


def scores(angle: np.ndarray, bins: ReplayBins) -> tuple[float, float]:
    return reach_scores(angle[bins.scored], bins.target[bins.scored], bins.n_directions)


def offline_reach(bundle: str | Path, session: Session) -> dict:
    """The same scores from the engine in-process, one bin per call as the service decodes."""
    from runtime.engine import BundleDecoder

    dec = BundleDecoder(bundle)
    bins = replay_bins(dec.manifest, session)
    angle = np.array([dec.decode(x).angle[0] for x in bins.counts], np.float32)
    acc, dacc = scores(angle, bins)
    return {"reach_acc": acc, "reach_delta_acc": dacc, "n_bins": len(angle), "n_scored": int(bins.scored.sum())}


def percentiles_us(ns: np.ndarray) -> dict[str, float]:
    us = np.asarray(ns, np.float64) / 1e3
    p50, p90, p99, p999 = np.percentile(us, [50, 90, 99, 99.9])
    return {"p50": p50, "p90": p90, "p99": p99, "p999": p999, "mean": float(us.mean()), "max": float(us.max())}


def replay(bundle: str | Path, session: Session, endpoint: str, rate: float = 0.0, timeout_ms: int = 1000,
           wait_s: float = 30.0) -> dict:
    """Stream the test bins of ``session`` through the service at ``endpoint``; scores and latencies.

    Waits up to ``wait_s`` for the service to answer, so a script can start both at once."""
    manifest = read_manifest(bundle)
    bins = replay_bins(manifest, session)
    with Client(endpoint, timeout_ms=timeout_ms) as client:
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
        n = len(bins.counts)
        angle = np.empty(n, np.float32)
        rtt, server = np.empty(n, np.int64), np.empty(n, np.int64)
        period = 1.0 / rate if rate > 0 else 0.0
        start = time.perf_counter()
        for i, x in enumerate(bins.counts):
            if period:
                wait = start + i * period - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            try:
                out = client.decode(x)
            except ServiceTimeout:
                raise RuntimeError(f"the service at {endpoint} stopped answering at bin {i} of {n}") from None
            angle[i], rtt[i], server[i] = out.angle[0], out.rtt_ns, out.server_ns
        elapsed = time.perf_counter() - start
    acc, dacc = scores(angle, bins)
    return {"reach_acc": acc, "reach_delta_acc": dacc, "n_bins": n, "n_scored": int(bins.scored.sum()),
            "latency_us": percentiles_us(rtt), "server_us": percentiles_us(server),
            "bins_per_s": n / elapsed, "rate_hz": rate, "endpoint": endpoint, "session": bins.session}


def replay_command(args, load_session) -> int:
    """``load_session(data, min_trials)``: how the command reads ``--data`` (swapvae.cli)."""
    data = args.data or read_manifest(args.bundle).training.data
    if data is None:
        raise ValueError(f"{args.bundle}: the manifest does not say which data it was trained on; pass --data")
    r = replay(args.bundle, load_session(data), args.endpoint, args.rate)
    if args.json:
        print(json.dumps(r))
        return 0
    lat, srv = r["latency_us"], r["server_us"]
    pace = f"at {r['rate_hz']:g} Hz" if r["rate_hz"] else "back to back"
    print(f"replayed {r['n_bins']} test bins of {r['session']} through {r['endpoint']} {pace} "
          f"({r['bins_per_s']:.0f} bins/s)")
    print(f"reach acc {r['reach_acc']:.3f}, delta-acc {r['reach_delta_acc']:.3f} "
          f"on the {r['n_scored']} moving bins")
    print(f"round trip  p50 {lat['p50']:7.1f}  p99 {lat['p99']:7.1f}  p99.9 {lat['p999']:7.1f}  max {lat['max']:7.1f} us")
    print(f"server      p50 {srv['p50']:7.1f}  p99 {srv['p99']:7.1f}  p99.9 {srv['p999']:7.1f}  max {srv['max']:7.1f} us")
    return 0
