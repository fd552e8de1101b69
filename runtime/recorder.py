"""What the service counts for STATS, and the one place a decode's times are written.

The serving loop calls ``decoded`` for each one-bin request answered alone and
``decoded_together`` for those that shared an engine call: each writes the requests' server
times (read off the socket -> reply ready) and queue times (the part before their turn) into
two preallocated rings of the latest ``window`` one-bin decodes (no allocation on the hot
path). The other counters are kept as requests are answered; ``stats`` reads them when a
STATS request asks.
"""
from __future__ import annotations

import array
import time

import numpy as np

from schemas.protocol import LatencySummary, StatsReply


class Recorder:
    """Counters since start, and the server and queue times (ns) of the latest ``window`` one-bin decodes."""

    def __init__(self, window: int = 1 << 16):
        if window < 1 or window & (window - 1):
            raise ValueError(f"window must be a power of two, got {window}")
        self.window = window
        self._mask = window - 1
        self._ring = array.array("q", bytes(8 * window))  # server_ns
        self._queue = array.array("q", bytes(8 * window))  # queue_ns
        self._ring_np, self._queue_np = np.frombuffer(self._ring, np.int64), np.frombuffer(self._queue, np.int64)
        self.started = time.monotonic()
        self.requests = 0  # frames received, valid or not
        self.one_bin_decodes = 0  # one-bin decodes answered (alone or coalesced); also the rings' write index
        self.batches = 0  # multi-bin DECODE requests answered
        self.bins_batched = 0  # bins of those
        self.coalesced = 0  # one-bin decodes that shared an engine call with others queued
        self.streamed = 0  # replies published on the stream
        self.errors: dict[str, int] = {}
        self.by_type: dict[str, int] = {}  # valid control requests; decodes are counted above

    def decoded(self, ns: int, queue_ns: int = 0) -> None:
        """A one-bin decode answered by an engine call of its own: ``ns`` in the server, of
        which ``queue_ns`` waiting for its turn."""
        i = self.one_bin_decodes
        j = i & self._mask
        self._ring[j] = ns
        self._queue[j] = queue_ns
        self.one_bin_decodes = i + 1

    def decoded_together(self, ns: np.ndarray, queue_ns: np.ndarray) -> None:
        """One-bin decodes that shared one engine call: their times in the server and waiting."""
        n, i = len(ns), self.one_bin_decodes
        at = np.arange(i, i + n) & self._mask
        self._ring_np[at] = ns
        self._queue_np[at] = queue_ns
        self.coalesced += n
        self.one_bin_decodes = i + n

    def multi_bin(self, n_bins: int) -> None:
        self.batches += 1
        self.bins_batched += n_bins

    def error(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1

    def control(self, name: str) -> None:
        self.by_type[name] = self.by_type.get(name, 0) + 1

    def latency(self, queue: bool = False) -> LatencySummary:
        """Percentiles of the server times in the ring (or the queue times), us."""
        n = min(self.one_bin_decodes, self.window)
        if not n:
            return LatencySummary(n=0)
        lat = (self._queue_np if queue else self._ring_np)[:n] / 1e3  # once full, the whole ring is the window
        p50, p90, p99, p999 = np.percentile(lat, [50, 90, 99, 99.9])
        return LatencySummary(n=n, mean=float(lat.mean()), p50=p50, p90=p90, p99=p99, p999=p999, max=float(lat.max()))

    def stats(self, prewarms: int, busy_poll: bool, provider: str, streams: tuple[int, int, int] = (0, 0, 0)) -> StatsReply:
        """``streams``: (held now, evicted since start, the most held)."""
        decodes = self.one_bin_decodes + self.batches
        by_type = dict(self.by_type)
        by_type["DECODE"] = decodes + sum(self.errors.get(k, 0) for k in ("BAD_VALUE", "INTERNAL"))
        bins = self.one_bin_decodes + self.bins_batched
        return StatsReply(uptime_s=time.monotonic() - self.started, requests=self.requests, decodes=decodes,
                          bins=bins, errors=dict(self.errors), by_type=by_type,
                          streamed=self.streamed, prewarms=prewarms, coalesced=self.coalesced,
                          streams=streams[0], streams_evicted=streams[1], max_streams=streams[2],
                          latency_us=self.latency(), queue_us=self.latency(queue=True), window=self.window,
                          busy_poll=busy_poll, provider=provider)
