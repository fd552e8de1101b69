"""Training batches streamed from host memory, for recordings larger than the training device's.

A fit keeps its bins and pair index on the training device when they fit (``data.placement``
"device"; "auto" does so when they take at most half of the device's free memory). Otherwise
``HostBatches`` keeps them in host memory and ships the device only what a step needs: a
worker thread draws ``data.stream_chunk_steps`` steps' pairs at a time, gathers both views'
rows into one of three (on CUDA, page-locked) host buffers, and the training thread copies a
chunk to the device asynchronously and serves it a step at a time. Three buffers let one be
filled while one waits and one is read.

Which pairs a step gets depends only on the seed and the step's number (chunk ``c`` draws from
``numpy.random.default_rng([seed, c])``), not on what ran before: a resumed fit seeks to its
first step and draws what the uninterrupted fit drew, with no state in the checkpoint.
"""
from __future__ import annotations

import queue
import threading

import numpy as np
import torch

# Share of the device's free memory a recording may take and still be placed there whole: the
# model, Adam's state and a step's activations need the rest.
DEVICE_SHARE = 0.5


def data_bytes(n_bins: int, n_neurons: int, n_pairs: int) -> int:
    """Bytes of a fit's float32 bins and int64 pair index."""
    return 4 * n_bins * n_neurons + 16 * n_pairs


def choose_placement(placement: str, device: torch.device, nbytes: int) -> str:
    """``data.placement`` resolved for this device: "device" or "host". On the CPU the two are
    the same memory, so "auto" is "device"."""
    if placement != "auto":
        return placement
    if device.type != "cuda":
        return "device"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if nbytes <= DEVICE_SHARE * free else "host"


class HostBatches:
    """The two views (before dropout) of ``batch`` in-trial pairs per step, from bins ``x``
    (host, float32) and ``pairs`` (i, j) rows; ``next()`` gives a step's views on ``device``."""

    def __init__(self, x: torch.Tensor, pairs: np.ndarray, batch: int, device: torch.device, seed: int,
                 chunk_steps: int = 32):
        if x.device.type != "cpu" or x.dtype != torch.float32:
            raise ValueError(f"HostBatches takes float32 bins in host memory, not {x.dtype} on {x.device}")
        self.device, self.seed, self.batch, self.k = device, int(seed), int(batch), int(chunk_steps)
        self.pairs = np.ascontiguousarray(pairs, dtype=np.int64)
        cuda = device.type == "cuda"
        self.x = x.pin_memory() if cuda and not x.is_pinned() else x
        shape = (self.k, 2 * self.batch, x.shape[1])
        self.buffers = [torch.empty(shape, dtype=torch.float32, pin_memory=cuda) for _ in range(3)]
        self.copied: list = [None] * 3  # the CUDA event after each buffer's last copy to the device
        self._worker: threading.Thread | None = None
        self._step = 0

    def rows(self, chunk: int) -> np.ndarray:
        """Row numbers of chunk ``chunk``'s steps, (chunk_steps, 2 * batch): a step's first views,
        then their partners (the order of the on-device gather)."""
        draw = np.random.default_rng([self.seed, chunk]).integers(len(self.pairs), size=(self.k, self.batch))
        return self.pairs[draw].transpose(0, 2, 1).reshape(self.k, 2 * self.batch)

    def seek(self, step: int) -> None:
        """Serve from step ``step`` (0-based) on: the steps an uninterrupted run serves there."""
        self.close()
        self._step = int(step)
        self._ready: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._chunk = None
        self._worker = threading.Thread(target=self._fill, args=(step // self.k,), name="host-batches",
                                        daemon=True)
        self._worker.start()

    def _fill(self, chunk: int) -> None:
        try:
            while not self._stop.is_set():
                i = chunk % 3
                if self.copied[i] is not None:
                    self.copied[i].synchronize()  # its last copy to the device is done
                index = torch.from_numpy(self.rows(chunk).reshape(-1))
                torch.index_select(self.x, 0, index, out=self.buffers[i].view(-1, self.x.shape[1]))
                self._put((chunk, i))
                chunk += 1
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._worker is None:
            self.seek(0)
        chunk, offset = divmod(self._step, self.k)
        if self._chunk is None or self._chunk[0] != chunk:
            item = self._ready.get()
            if isinstance(item, BaseException):
                raise RuntimeError(f"streaming training batches from host memory failed: {item}") from item
            got, i = item
            assert got == chunk, (got, chunk)
            on_device = self.buffers[i].to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                self.copied[i] = torch.cuda.Event()
                self.copied[i].record()
            self._chunk = (chunk, on_device)
        self._step += 1
        return self._chunk[1][offset].chunk(2)

    def close(self) -> None:
        if self._worker is not None:
            self._stop.set()
            self._worker.join()
            self._worker = None
