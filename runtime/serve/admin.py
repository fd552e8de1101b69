"""Operators' tools: ``swapvae verify BUNDLE`` and ``swapvae stats ENDPOINT``.

``verify`` loads a bundle as ``swapvae serve`` does (the same ``BundleDecoder``: hashes, the
signature with ``--trust``, the ONNX Runtime session and its graph checks, then the server's
own start-up, ``serving.prepare``: the probe decode and the warm-up) and describes what it
holds. ``deploy/install-bundle.sh``
runs it before it points ``current`` at a new bundle, so a bundle the server would refuse is
never switched to. With ``--endpoint`` it also waits until the service there serves this very
bundle (INFO's manifest carries the sha256 of every file), which is how the upgrade script
learns that a reload took.

``stats`` asks a running service for its STATS reply (``schemas.protocol.StatsReply``);
``format_stats`` writes it as a table.

Like the rest of ``runtime`` this needs numpy, pydantic, pyzmq and ONNX Runtime alone.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from swapvae.runtime.bundle import SIGNATURE, key_id, load_public_key
from swapvae.runtime.client import Client, ServiceError, ServiceTimeout
from swapvae.schemas.manifest import BundleManifest
from swapvae.schemas.protocol import LatencySummary, StatsReply


# -- verify --------------------------------------------------------------------------------------
def bundle_summary(bundle: str | Path, provider: str = "cpu", trust: list[str] | None = None
                   ) -> tuple[dict, BundleManifest]:
    """Load ``bundle`` as the server would; a description of it, and its manifest. Raises
    (BundleError, ValueError) with the server's own reason for a bundle it would refuse."""
    from swapvae.runtime.engine import BundleDecoder
    from swapvae.runtime.serve.coalescing import MAX_BATCH
    from swapvae.runtime.serve.serving import prepare

    trusted = [load_public_key(p) for p in trust] if trust else None
    t0 = time.perf_counter()
    dec = BundleDecoder(bundle, provider=provider, trusted=trusted)
    prepare(dec, MAX_BATCH, prewarm=False)  # the server's start-up: refuses what the server would
    load_s = time.perf_counter() - t0
    m = dec.manifest
    times = []
    stream, x = dec.new_stream(), np.zeros(m.n_channels, np.float32)
    for _ in range(50):
        t = time.perf_counter_ns()
        dec.decode_stream(stream, x)
        times.append(time.perf_counter_ns() - t)
    root = Path(bundle).resolve()
    if trusted:
        signature = f"signed, verified with {', '.join(key_id(k) for k in trusted)}"
    elif os.path.lexists(root / SIGNATURE):
        signature = "signed, not checked (no --trust)"
    else:
        signature = "unsigned"
    r = m.readout
    metrics = {k: v for k, v in m.training.metrics.items()
               if k in ("reach_acc", "reach_delta_acc", "velocity_r2") and isinstance(v, (int, float))}
    return {
        "bundle": str(bundle), "path": str(root), "created_utc": m.created_utc, "n_channels": m.n_channels,
        "n_neurons": m.n_neurons, "bin_size_s": m.bin_size_s, "content_dim": m.content_dim, "style_dim": m.style_dim,
        "readout": None if r is None else {"history_bins": r.history_bins, "classes": list(r.direction.classes),
                                           "velocity": list(r.velocity)},
        "weights": m.weights, "signature": signature, "provider": provider, "data": m.training.data,
        "session": m.training.session, "metrics": metrics, "files": m.files, "load_s": load_s,
        "decode_us_p50": float(np.median(times)) / 1e3,
    }, m


def served_by(endpoint: str, manifest: BundleManifest, wait_s: float, timeout_ms: int = 1000, **curve) -> None:
    """Return once the service at ``endpoint`` serves the bundle of ``manifest`` (INFO's
    manifest equals it: the same files, and the same export, since two exports of one run
    differ in ``created_utc``); RuntimeError after ``wait_s`` (saying what it serves instead)."""
    want = json.loads(manifest.model_dump_json())
    deadline = time.monotonic() + wait_s
    last = "no reply"
    with Client(endpoint, timeout_ms=timeout_ms, **curve) as client:
        while True:
            try:
                info = client.info()
                if info.manifest == want:
                    return
                last = f"it serves another bundle (created {info.manifest.get('created_utc')})"
            except ServiceTimeout:
                last = f"no reply within {timeout_ms} ms"
            if time.monotonic() >= deadline:
                raise RuntimeError(f"the service at {endpoint} does not serve this bundle after {wait_s:g} s: {last}")
            time.sleep(0.2)


def format_summary(s: dict, endpoint: str | None = None) -> str:
    """``bundle_summary``'s description as the lines ``swapvae verify`` prints."""
    r = s["readout"]
    lines = [f"{s['bundle']}: OK, loads as the server would ({s['path']})"]
    rows = [("created", s["created_utc"]), ("signature", s["signature"]),
            ("channels", f"{s['n_channels']} in, {s['n_neurons']} kept; bins of {s['bin_size_s'] * 1e3:g} ms"),
            ("latents", f"content {s['content_dim']}, style {s['style_dim']}; weights {s['weights']}"),
            ("readout", "none (latents and rates only)" if r is None else
             f"{len(r['classes'])} directions and velocity ({', '.join(r['velocity'])}) on {r['history_bins']} bins"),
            ("trained on", f"{s['data'] or '?'} ({s['session'] or '?'})"),
            ("metrics", ", ".join(f"{k} {v:.3f}" for k, v in s["metrics"].items()) or "-"),
            ("engine", f"{s['provider']}: loaded in {s['load_s']:.2f} s, one bin {s['decode_us_p50']:.0f} us (p50)")]
    if endpoint:
        rows.append(("service", f"{endpoint} serves it"))
    lines += [f"  {k:<11} {v}" for k, v in rows]
    return "\n".join(lines)


# -- stats ---------------------------------------------------------------------------------------
def stats(endpoint: str, timeout_ms: int = 1000, **curve) -> StatsReply:
    """The STATS reply of the service at ``endpoint``; RuntimeError, in one line, without one."""
    try:
        with Client(endpoint, timeout_ms=timeout_ms, **curve) as c:
            return c.stats()
    except ServiceTimeout:
        raise RuntimeError(f"no reply from {endpoint} within {timeout_ms} ms (is the service running there?)") from None
    except ServiceError as e:
        raise RuntimeError(f"the service at {endpoint} answered STATS with an error: {e}") from None


def _uptime(s: float) -> str:
    d, s = divmod(int(s), 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"


def format_rates(prev: StatsReply, cur: StatsReply) -> str:
    """What changed between two STATS replies, per second: the lines ``stats --watch`` adds."""
    dt = max(cur.uptime_s - prev.uptime_s, 1e-9)
    was = prev.dropped.model_dump()
    drops = {k: v - was[k] for k, v in cur.dropped.model_dump().items() if v != was[k]}
    errors = {k: v - prev.errors.get(k, 0) for k, v in cur.errors.items() if v != prev.errors.get(k, 0)}
    return (f"  now       {(cur.requests - prev.requests) / dt:.1f} requests/s, {(cur.bins - prev.bins) / dt:.1f} "
            f"bins/s; over the last {dt:.1f} s: errors {_counts(errors)}, dropped {_counts(drops)}")


def format_stats(s: StatsReply, endpoint: str) -> str:
    lines = [f"{endpoint}: up {_uptime(s.uptime_s)}, provider {s.provider}"
             f"{', busy-poll' if s.busy_poll else ''}, protocol v{s.protocol_version}"]
    rows = [("requests", f"{s.requests} (by type: {_counts(s.by_type)})"),
            ("decodes", f"{s.decodes} ({s.bins} bins; {s.coalesced} shared an engine call; {s.streamed} streamed)"),
            ("errors", _counts(s.errors)),
            ("streams", f"{s.streams} held of at most {s.max_streams}, {s.streams_evicted} evicted"),
            ("prewarms", str(s.prewarms))]
    if s.lsl is not None:
        x = s.lsl
        rows.append(("lsl", f"{x.stream} ({x.kind}): {x.samples} samples, {x.bins} bins, {x.published} published, "
                            f"{x.stale_skipped} stale held back, {x.bad_samples} bad, {x.history_restarts} restarts"
                            + (f", {x.errors} errors (last: {x.last_error})" if x.errors else "")))
    lines += [f"  {k:<9} {v}" for k, v in rows]
    lines.append(f"  latency over the last {s.latency_us.n} one-bin decodes (of at most {s.window}), us:")
    cols = ("p50", "p90", "p99", "p999", "max", "mean")
    lines.append(f"    {'':<7}" + "".join(f"{c.replace('p999', 'p99.9'):>9}" for c in cols))

    def row(name: str, lat: LatencySummary) -> str:
        return f"    {name:<7}" + "".join(f"{'-' if getattr(lat, c) is None else f'{getattr(lat, c):.1f}':>9}"
                                         for c in cols)
    lines += [row("server", s.latency_us), row("queued", s.queue_us)]
    return "\n".join(lines)
