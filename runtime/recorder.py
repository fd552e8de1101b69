"""What the service counts for STATS, and the one place a decode's processing time is written.

The serving loop calls ``decoded`` once per engine call of one-bin requests (a preallocated ring
of the latest ``window`` times, no allocation), and the other counters as requests are answered;
``stats`` reads them when a STATS request asks.
"""
from __future__ import annotations

import array
import time

import numpy as np

from schemas.protocol import LatencySummary, StatsReply


class Recorder:
    """Counters since start and the processing times (ns) of the latest ``window`` one-bin decodes."""

    def __init__(self, window: int = 1 << 16):
        if window < 1 or window & (window - 1):
            raise ValueError(f"window must be a power of two, got {window}")
        self.window = window
        self._mask = window - 1
        self._ring = array.array("q", bytes(8 * window))
        self.started = time.monotonic()
        self.requests = 0  # frames received, valid or not
        self.one_bin_decodes = 0  # one-bin decodes answered (alone or coalesced); also the ring's write index
        self.batches = 0  # multi-bin DECODE requests answered
        self.bins_batched = 0  # bins of those
        self.coalesced = 0  # one-bin decodes that shared an engine call with others queued
        self.streamed = 0  # replies published on the stream
        self.errors: dict[str, int] = {}
        self.by_type: dict[str, int] = {}  # valid control requests; decodes are counted above

    def decoded(self, ns: int, n: int = 1) -> None:
        """``n`` one-bin decodes answered by one engine call that took ``ns``."""
        i, ring, mask = self.one_bin_decodes, self._ring, self._mask
        ring[i & mask] = ns
        if n > 1:
            for j in range(i + 1, i + n):
                ring[j & mask] = ns
            self.coalesced += n
        self.one_bin_decodes = i + n

    def multi_bin(self, n_bins: int) -> None:
        self.batches += 1
        self.bins_batched += n_bins

    def error(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1

    def control(self, name: str) -> None:
        self.by_type[name] = self.by_type.get(name, 0) + 1

    def latency(self) -> LatencySummary:
        """Percentiles of the processing times in the ring, us."""
        n = min(self.one_bin_decodes, self.window)
        if not n:
            return LatencySummary(n=0)
        lat = np.frombuffer(self._ring, np.int64)[:n] / 1e3  # once full, the whole ring is the window
        p50, p90, p99, p999 = np.percentile(lat, [50, 90, 99, 99.9])
        return LatencySummary(n=n, mean=float(lat.mean()), p50=p50, p90=p90, p99=p99, p999=p999, max=float(lat.max()))

    def stats(self, prewarms: int, busy_poll: bool, provider: str) -> StatsReply:
        decodes = self.one_bin_decodes + self.batches
        by_type = dict(self.by_type)
        by_type["DECODE"] = decodes + sum(self.errors.get(k, 0) for k in ("BAD_VALUE", "INTERNAL"))
        bins = self.one_bin_decodes + self.bins_batched
        return StatsReply(uptime_s=time.monotonic() - self.started, requests=self.requests, decodes=decodes,
                          bins=bins, errors=dict(self.errors), by_type=by_type,
                          streamed=self.streamed, prewarms=prewarms, coalesced=self.coalesced,
                          latency_us=self.latency(), window=self.window, busy_poll=busy_poll, provider=provider)
