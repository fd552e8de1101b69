"""The causal history the readout sees: the latents of the last ``k`` bins of one stream.

The readout's input at bin t is the window [z_t, z_{t-1}, ..., z_{t-k+1}] of per-bin latents
(most recent first, concatenated). A window never reaches before the start of a trial: at a
trial's first bins the trial's earliest latent fills the missing places. Offline that is
``causal_windows``; online a stream keeps its last k-1 latents in a ``StreamHistory``, which a
reset (a trial start) empties, and the next bin then fills. A stream that is never reset
still gets a valid window: its own preceding bins. ``StreamTable`` holds the histories of many
streams (a server's clients), bounded, evicting the least recently used.

Both rules give the same windows for the same bins (tests/test_history.py).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np


def causal_windows(z: np.ndarray, trial: np.ndarray, k: int) -> np.ndarray:
    """(n, k * d) windows of the latents ``z`` (n, d), bins in time order, never across a
    change of ``trial``."""
    if k < 1:
        raise ValueError(f"history of {k} bins: need at least 1")
    n = len(z)
    idx = np.arange(n)
    starts = np.r_[0, np.flatnonzero(np.diff(trial)) + 1]
    first = starts[np.searchsorted(starts, idx, side="right") - 1]  # each bin's trial start
    return np.concatenate([z[np.maximum(idx - lag, first)] for lag in range(k)], axis=1)


class StreamHistory:
    """The last ``k - 1`` latents of one stream, most recent first, in one float32 row (what the
    decode graph takes as ``history``); ``n`` bins seen since the last reset."""

    __slots__ = ("row", "n", "_d")

    def __init__(self, k: int, latent_dim: int):
        self.row = np.zeros((k - 1) * latent_dim, np.float32)
        self._d = latent_dim
        self.n = 0

    @property
    def fresh(self) -> bool:
        """No bin since the last reset: the next bin's window is that bin alone, repeated."""
        return self.n == 0

    def reset(self) -> None:
        self.n = 0

    def push(self, latent: np.ndarray) -> None:
        """Append the latent of the bin just decoded."""
        row, d = self.row, self._d
        if len(row):
            if self.n:
                row[d:] = row[:-d]  # numpy copies overlapping slices correctly
                row[:d] = latent
            else:  # the trial's first bin fills every earlier place
                row.reshape(-1, d)[:] = latent
        self.n += 1


class StreamTable:
    """Histories by stream key (e.g. a ROUTER identity), at most ``max_streams`` of them: a new
    stream beyond that evicts the least recently used one (counted in ``evicted``)."""

    def __init__(self, k: int, latent_dim: int, max_streams: int = 1024):
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        self.k, self.latent_dim, self.max_streams = k, latent_dim, max_streams
        self._streams: OrderedDict[bytes, StreamHistory] = OrderedDict()
        self._last: tuple[bytes | None, StreamHistory | None] = (None, None)  # the most recently used
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._streams)

    def restart(self, k: int, latent_dim: int) -> None:
        """Forget every stream, whose next bins start afresh with windows of ``k`` latents of
        ``latent_dim`` (a new model's latents mean something else); ``evicted`` is kept."""
        self.k, self.latent_dim = k, latent_dim
        self._streams.clear()
        self._last = (None, None)

    def get(self, key: bytes) -> StreamHistory:
        """The stream's history, created (fresh) if unknown; marks it most recently used."""
        last_key, last = self._last
        if key == last_key:  # the same stream again (one closed-loop client): already the most recent
            return last
        s = self._streams.get(key)
        if s is not None:
            self._streams.move_to_end(key)
        else:
            if len(self._streams) >= self.max_streams:
                self._streams.popitem(last=False)
                self.evicted += 1
            s = self._streams[key] = StreamHistory(self.k, self.latent_dim)
        self._last = (key, s)
        return s
