"""A bundle made ready to serve (``ServingBundle``): everything the server keeps that depends on
the engine.

``prepare(engine, ...)`` runs the start-up work (a probe decode to learn the reply layout, the
warm-up decodes that pay for cold caches, timing the engine per bin and per warm-up) and builds
the reply writer, the one-bin fast path, the byte limits and the INFO bodies. It touches
nothing of a running server, so a SIGHUP reload runs it on a thread of its own while the old
bundle keeps serving, and the serving loop then switches to the result between two requests
(runtime/server.py).

INFO comes in two bodies: the whole manifest, and one without what a bundle says about its
training (the ``training`` section: config, metrics, data paths; library ``versions``;
``quantization`` errors), for peers that are neither authenticated (CURVE) nor local.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from swapvae.runtime import wire
from swapvae.runtime.serve.limits import Limits
from swapvae.runtime.serve.prewarm import WarmPlanner
from swapvae.schemas.protocol import MAX_BODY_BYTES, DType, InfoReply

SERVER_NAME = "swapvae-runtime/2"
PRIVATE_MANIFEST_KEYS = ("training", "versions", "quantization")  # left out of INFO for unknown peers


@dataclass
class ServingBundle:
    engine: object
    n_channels: int
    layout: wire.DecodeLayout
    writer: wire.DecodeReplyWriter
    one_bin: wire.OneBinRequests
    limits: Limits
    planner: WarmPlanner
    info_full: bytes  # INFO_REPLY bodies: with the training details, and without
    info_public: bytes
    ns_per_bin: float  # a bin's cost in a multi-bin call (sizes the first bulk slices; 0: not measured)
    name: str  # which bundle, for the log: its directory and decode graph's sha256

    def same_history(self, other: ServingBundle) -> bool:
        """Whether streams' histories carry over to ``other``: the same window and latent sizes
        (the latents are the old model's; a retrained model of the same sizes reads them as its
        own until they leave the window, ``history_bins - 1`` bins later)."""
        e, o = self.engine, other.engine
        return (e.history_bins, e.latent_dim) == (o.history_bins, o.latent_dim)


def prepare(engine, max_batch: int, warmup: int = 200, prewarm: bool = True, streaming: bool = False,
            max_body_bytes: int = MAX_BODY_BYTES) -> ServingBundle:
    n = int(engine.n_channels)
    scratch = engine.new_stream()  # start-up decodes never touch a client's stream
    probe = engine.decode_stream(scratch, np.zeros(n, np.float32))
    if not all(np.isfinite(a).all() for a in (probe.content, probe.style_mean, probe.rates)):
        raise ValueError(f"{getattr(engine, 'bundle_dir', 'the bundle')}: a zero bin decodes to non-finite values")
    readout = probe.angle is not None
    width = lambda a: 0 if a is None else a.shape[-1]  # noqa: E731
    layout = wire.DecodeLayout(width(probe.content), width(probe.style_mean), width(probe.proba),
                               width(probe.velocity), int(engine.history_bins) if readout else 0,
                               width(probe.rates), readout)
    writer = wire.DecodeReplyWriter(layout)
    # Engines whose one-bin outputs are not contiguous float32 take the general path only.
    one_bin = wire.OneBinRequests(n, max_batch, enabled=writer.check(probe))
    # Cold caches and a lazily grown memory arena make the first calls slow; pay that here.
    rng = np.random.default_rng(0)
    for i in range(warmup):
        engine.decode_stream(scratch, rng.poisson(2.0, n).astype(np.float32), i % 50 == 0)
    ns_per_bin = _time_per_bin(engine, scratch, rng, n) if warmup else 0.0  # 0: not measured
    limits = Limits.of(n, layout.body_bytes(1), max_body_bytes)
    # Needs an engine with warm(), which leaves the last decode's outputs alone.
    planner = WarmPlanner(getattr(engine, "warm", None) if prewarm else None)
    manifest = json.loads(engine.manifest.model_dump_json())
    info = dict(server=SERVER_NAME, n_channels=n, content_dim=layout.content_dim, style_dim=layout.style_dim,
                n_classes=layout.n_classes, velocity_dim=layout.velocity_dim, history_bins=layout.history_bins,
                has_readout=layout.has_readout, n_rates=layout.n_rates,
                accepted_dtypes=[d.name.lower() for d in DType], max_bins=limits.max_bins,
                max_request_bytes=limits.max_request_bytes, streaming=streaming)
    public = {k: v for k, v in manifest.items() if k not in PRIVATE_MANIFEST_KEYS}
    full = InfoReply(**info, manifest=manifest, training_details=True).model_dump_json().encode()
    reduced = InfoReply(**info, manifest=public, training_details=False).model_dump_json().encode()
    decode_sha = manifest.get("files", {}).get("decode.onnx", "")[:12]
    name = f"{getattr(engine, 'bundle_dir', type(engine).__name__)} (decode.onnx {decode_sha or '?'})"
    return ServingBundle(engine, n, layout, writer, one_bin, limits, planner, full, reduced, ns_per_bin, name)


def _time_per_bin(engine, scratch, rng, n: int, bins: int = 64) -> float:
    x = rng.poisson(2.0, (bins, n)).astype(np.float32)
    took = []
    for _ in range(3):
        t = time.perf_counter_ns()
        engine.decode_stream(scratch, x, True)
        took.append(time.perf_counter_ns() - t)
    return float(np.median(took)) / bins
