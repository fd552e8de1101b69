"""What the service counts for STATS, and the one place a decode's times are written.

The serving loop calls ``decoded`` for each one-bin request answered alone and
``decoded_together`` for those that shared an engine call: each writes the requests' server
times (read off the socket -> reply ready) and queue times (the part before their turn) into
two preallocated rings of the latest ``window`` one-bin decodes (no allocation on the hot
path, and nothing else: the hot path is unchanged by STATS).

STATS is cheap whatever the window: the percentiles come from log-scale histograms of the
rings' contents (``SUB`` buckets per octave), kept up to date incrementally when STATS asks
(``_fold``: only the ring slots written since the last STATS are added, and the values they
overwrote removed, in one vectorized pass), so a STATS costs O(decodes since the last one)
plus a fixed pass over the buckets, not a sort of the window: about 0.1 ms. The server reuses
the summaries for 100 ms (``max_age_ns``), so a flood of STATS recomputes them ten times a
second at most; the counters are always current. The mean is kept the same way;
the max, from the maxima of blocks of
256 slots, of which only those written since are refreshed. The other counters are kept as requests are answered.
"""
from __future__ import annotations

import array
import time

import numpy as np

from swapvae.schemas.protocol import Bulk, Drops, LatencySummary, StatsReply

SUB = 32  # histogram buckets per octave: a bucket's midpoint is within 1/64 of any value in it
_OCTAVES = 40  # values up to 2**40 ns (18 minutes); longer ones land in the last bucket
N_BUCKETS = (_OCTAVES - 4) * SUB


def bucket(ns: np.ndarray) -> np.ndarray:
    """Histogram bucket of each time (ns, int64 >= 0): exact below SUB, then SUB per octave."""
    v = np.minimum(np.maximum(ns, 0), (1 << _OCTAVES) - 1)
    shift = np.maximum(np.frexp(v.astype(np.float64))[1] - 6, 0)  # v < 2**e: octave e - 1, SUB = 2**5
    return (v >> shift) + (shift << 5)  # in [SUB, 2 * SUB) from the octave of SUB up, offset by octave


def _midpoints() -> np.ndarray:
    idx = np.arange(N_BUCKETS)
    octave, sub = idx // SUB, idx % SUB
    low = np.where(octave == 0, idx, (SUB + sub) * (2.0 ** np.maximum(octave - 1, 0)))
    width = np.where(octave == 0, 1.0, 2.0 ** np.maximum(octave - 1, 0))
    return low + (width - 1) / 2


_MID = _midpoints()
_RANKS = np.array([0.5, 0.9, 0.99, 0.999])


class _Windows:
    """Histograms and sums of the values of three series of a ring (server, queue and work
    times), kept in step with it by ``replace``: one vectorized pass for all three."""

    def __init__(self):
        self.hist = np.zeros((3, N_BUCKETS), np.int64)
        self.sum = np.zeros(3, np.int64)

    def replace(self, old: np.ndarray, new: np.ndarray) -> None:
        """``old`` and ``new``: (3, k) values leaving and entering the window."""
        both = np.concatenate([new, old], axis=1)
        series = np.arange(3)[:, None] * N_BUCKETS
        sign = np.ones(new.shape[1] + old.shape[1], np.int64)
        sign[new.shape[1]:] = -1
        idx = (bucket(both) + series).ravel()
        self.hist += np.bincount(idx, np.tile(sign, 3), 3 * N_BUCKETS).astype(np.int64).reshape(3, N_BUCKETS)
        self.sum += both @ sign

    def summaries(self, n: int, top: list) -> list[LatencySummary]:
        if not n:
            return [LatencySummary(n=0)] * 3
        cum = np.cumsum(self.hist, axis=1)
        ranks = np.maximum(1, np.ceil(_RANKS * n))  # nearest rank
        at = np.minimum([np.searchsorted(c, ranks) for c in cum], N_BUCKETS - 1)
        p = (np.minimum(_MID[at], np.array(top)[:, None]) / 1e3).tolist()
        mean = (self.sum / n / 1e3).tolist()
        return [LatencySummary(n=n, mean=mean[k], p50=p[k][0], p90=p[k][1], p99=p[k][2], p999=p[k][3],
                               max=top[k] / 1e3) for k in range(3)]


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
        self._seen = np.zeros((2, window), np.int64)  # the rings as of the last fold
        self._block = min(window, 256)
        self._max = np.zeros((3, window // self._block), np.int64)  # per block of slots: server, queue, work
        self._folded = 0  # one_bin_decodes at the last fold
        self._windows = _Windows()
        self._summary = None  # (when, the three summaries) last computed
        self.started = time.monotonic()
        self.requests = 0  # frames received, valid or not
        self.one_bin_decodes = 0  # one-bin decodes answered (alone or coalesced); also the rings' write index
        self.batches = 0  # multi-bin DECODE requests answered
        self.bins_batched = 0  # bins of those
        self.coalesced = 0  # one-bin decodes that shared an engine call with others queued
        self.streamed = 0  # replies published on the stream
        self.errors: dict[str, int] = {}
        self.by_type: dict[str, int] = {}  # valid control requests; decodes are counted above
        self.drops = Drops()  # counted where they happen (sources, the stream's seq check)
        self.subscribers = 0
        self.auth_denied = 0
        self.reloads = 0
        self.reload_failures = 0
        self.reload_error: str | None = None  # why the last reload was refused

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

    def _fold(self) -> None:
        """Bring the histograms up to the rings: add the slots written since the last fold and
        remove what they overwrote (all of it again when the rings went round since), and
        refresh the maxima of the blocks of slots written."""
        i, j, w = self.one_bin_decodes, self._folded, self.window
        if i == j:
            return
        if i - j >= w:  # rebuilt from the whole window
            self._windows = _Windows()
            pos, old_pos = np.arange(min(i, w)), np.zeros(0, np.intp)
        else:
            idx = np.arange(j, i)
            pos = idx & self._mask
            old_pos = pos[idx >= w]  # slots below w held nothing yet
        srv, que = self._ring_np[pos], self._queue_np[pos]
        old_srv, old_que = self._seen[0, old_pos], self._seen[1, old_pos]
        self._seen[0, pos], self._seen[1, pos] = srv, que
        self._windows.replace(np.stack([old_srv, old_que, old_srv - old_que]), np.stack([srv, que, srv - que]))
        nb, first = len(self._max[0]), j // self._block  # blocks written since: a run of them, mod nb
        blocks = (first + np.arange(min(nb, (i - 1) // self._block - first + 1))) % nb
        seen = self._seen[:, :].reshape(2, -1, self._block)[:, blocks]
        self._max[:2, blocks] = seen.max(axis=2)
        self._max[2, blocks] = (seen[0] - seen[1]).max(axis=1)
        self._folded = i

    def latency(self, queue: bool = False) -> LatencySummary:
        """The server times of the ring's decodes (or their queue times), us."""
        return self._summaries()[1 if queue else 0]

    def _summaries(self, max_age_ns: int = 0) -> tuple[LatencySummary, LatencySummary, LatencySummary]:
        """The three summaries, or those computed less than ``max_age_ns`` ago."""
        now = time.perf_counter_ns()
        if self._summary is not None and now - self._summary[0] < max_age_ns:
            return self._summary[1]
        self._summary = (now, self._compute())
        return self._summary[1]

    def _compute(self) -> tuple[LatencySummary, LatencySummary, LatencySummary]:
        self._fold()
        n = min(self.one_bin_decodes, self.window)
        top = self._max.max(axis=1).tolist()  # unwritten slots hold 0: no effect on a max of times >= 0
        return tuple(self._windows.summaries(n, top))

    def stats(self, prewarms: int, busy_poll: bool, provider: str, streams: tuple[int, int, int] = (0, 0, 0),
              bulk: Bulk | None = None, limits: dict | None = None, max_age_ns: int = 0) -> StatsReply:
        """``streams``: (held now, evicted since start, the most held); the latency summaries may
        be up to ``max_age_ns`` old (the counters are always current)."""
        decodes = self.one_bin_decodes + self.batches
        by_type = dict(self.by_type)
        by_type["DECODE"] = decodes + sum(self.errors.get(k, 0) for k in ("BAD_VALUE", "INTERNAL"))
        bins = self.one_bin_decodes + self.bins_batched
        latency, queue, work = self._summaries(max_age_ns)
        return StatsReply(uptime_s=time.monotonic() - self.started, requests=self.requests, decodes=decodes,
                          bins=bins, errors=dict(self.errors), by_type=by_type,
                          streamed=self.streamed, prewarms=prewarms, coalesced=self.coalesced,
                          streams=streams[0], streams_evicted=streams[1], max_streams=streams[2],
                          latency_us=latency, queue_us=queue, work_us=work, window=self.window,
                          dropped=self.drops.model_copy(), bulk=bulk or Bulk(), subscribers=self.subscribers,
                          auth_denied=self.auth_denied, reloads=self.reloads, reload_failures=self.reload_failures,
                          reload_error=self.reload_error,
                          limits=dict(limits or {}), busy_poll=busy_poll, provider=provider)
