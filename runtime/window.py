"""Decode at a finer bin than the model's: a sliding window of fine-bin counts.

Closed-loop rigs update faster than the model's bin (e.g. every 10 or 20 ms for a 100 ms
model). ``SlidingWindowDecoder`` keeps the last ``k = bin_size_s / fine_bin_s`` fine bins and
decodes their sum (a full-size bin, which is what the model was trained on) at every fine
bin. Until ``k`` fine bins have arrived there is no full window, and ``push`` returns None.

The readout's history stays at the model's bin spacing: windows that end ``k`` fine bins
apart form one stream (``k`` interleaved streams in all), so the latents a decode sees are
100 ms apart for a 100 ms model, as in training.
"""
from __future__ import annotations

import numpy as np

from swapvae.runtime.engine import BundleDecoder, check_counts
from swapvae.runtime.output import FIELDS, DecodeOutput


class SlidingWindowDecoder:
    def __init__(self, decoder: BundleDecoder, fine_bin_s: float):
        bin_s = decoder.manifest.bin_size_s
        if not fine_bin_s > 0:
            raise ValueError(f"fine_bin_s must be > 0, got {fine_bin_s}")
        k = round(bin_s / fine_bin_s)
        if k < 1 or abs(k * fine_bin_s - bin_s) > 1e-6 * bin_s:
            raise ValueError(f"fine_bin_s {fine_bin_s} s must divide the model's bin of {bin_s} s "
                             f"(e.g. {bin_s / 5:g} or {bin_s / 10:g})")
        self.decoder, self.fine_bin_s, self.k = decoder, fine_bin_s, k
        n = decoder.n_channels
        # float64 sums of integer counts are exact, so adding the new bin and subtracting the
        # oldest never drifts; the exact re-sum once per cycle covers non-integer inputs.
        self._ring = np.zeros((k, n))
        self._sum = np.zeros(n)
        self._window = np.zeros(n, np.float32)
        self._next = 0
        self._seen = 0
        self._streams = [decoder.new_stream() for _ in range(k)]  # one per phase of the fine bin

    @property
    def ready(self) -> bool:
        """True once a full window of fine bins has arrived (push then decodes)."""
        return self._seen >= self.k

    def reset(self) -> None:
        """Forget the window and the readout's history, e.g. at a trial start or after a gap."""
        self._ring[:] = 0
        self._sum[:] = 0
        self._next = self._seen = 0
        for s in self._streams:
            s.reset()

    def push(self, counts_fine: np.ndarray) -> DecodeOutput | None:
        """Add one fine bin of raw counts ``(n_channels,)``; return the decode of the last
        ``k`` fine bins (same buffer semantics as ``BundleDecoder.decode`` for one bin), or
        None while the window is still filling."""
        x = self._checked(counts_fine, 1)
        self._add(x)
        if self._seen < self.k:
            return None
        self._window[:] = self._sum
        return self.decoder.decode_stream(self._streams[self._next], self._window)

    def push_many(self, counts_fine: np.ndarray) -> DecodeOutput | None:
        """Add consecutive fine bins ``(T, n_channels)``; return the decodes (fresh arrays) of
        the windows ending at each of them that completes a window, or None if none does."""
        outs = []
        for row in self._checked(counts_fine, 2):
            self._add(row)
            if self._seen >= self.k:
                self._window[:] = self._sum
                outs.append(self.decoder.decode_stream(self._streams[self._next], self._window).copy())
        if not outs:
            return None
        return DecodeOutput(*(None if getattr(outs[0], f) is None else np.concatenate([getattr(o, f) for o in outs])
                              for f in FIELDS))

    def _checked(self, counts: np.ndarray, ndim: int) -> np.ndarray:
        x = np.asarray(counts)
        n = self.decoder.n_channels
        if x.ndim != ndim or x.shape[-1] != n:
            want = f"({n},)" if ndim == 1 else f"(T, {n})"
            raise ValueError(f"fine-bin counts must have shape {want}, got {x.shape}")
        if x.dtype.kind not in "fiu":
            raise ValueError(f"counts must be a real numeric array, got dtype {x.dtype}")
        x = x.astype(np.float64, copy=False)
        # Checked per fine bin: a negative count could hide inside a positive window sum.
        if not (np.minimum.reduce(x, axis=None) >= 0 and np.isfinite(x).all()):
            check_counts(x.reshape(-1, n))
        return x

    def _add(self, row: np.ndarray) -> None:
        self._sum += row - self._ring[self._next]
        self._ring[self._next] = row
        self._next = (self._next + 1) % self.k
        self._seen += 1
        if self._next == 0:
            np.sum(self._ring, axis=0, out=self._sum)
