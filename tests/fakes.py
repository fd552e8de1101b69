"""A stand-in engine with the BundleDecoder interface, for tests of the wire format and the
server without ONNX Runtime: per-stream history (runtime/history.py) as the real engine."""
from __future__ import annotations

import json

import numpy as np

from swapvae.runtime.history import StreamHistory
from swapvae.runtime.output import FIELDS, DecodeOutput


class FakeManifest:
    def model_dump_json(self) -> str:
        return json.dumps({"n_channels": 6, "files": {"decode.onnx": "0" * 64}})


class FakeEngine:
    """Deterministic outputs from the counts and the stream's history; batch-1 outputs are
    views of reused buffers, as the real engine's.

    Per bin x (6 channels): latent z = [2 x0, 2 x1, 2 x2, x3 + 1, x4 + 1] (content 3, style 2);
    the readout's window is [z_t, z_t-1, z_t-2] (k = 3; a trial's first latent fills the
    places before it); angle = sum(x) / 10, direction = sum(x) % 4, fixed proba,
    velocity = [sum of the window's z[0], the oldest place's z[0]], rates = 3 x[1:6].
    ``readout=False``: a bundle without a readout (those four are None, k = 1)."""
    n_channels = 6
    latent_dim = 5
    manifest = FakeManifest()

    def __init__(self, fail: Exception | None = None, readout: bool = True):
        self.fail, self.readout = fail, readout
        self.history_bins = 3 if readout else 1
        self.stream = self.new_stream()
        self._one = self._empty(1)

    def _empty(self, n: int) -> DecodeOutput:
        r = self.readout
        return DecodeOutput(content=np.zeros((n, 3), np.float32), style_mean=np.zeros((n, 2), np.float32),
                            angle=np.zeros(n, np.float32) if r else None,
                            direction=np.zeros(n, np.int64) if r else None,
                            proba=np.zeros((n, 4), np.float32) if r else None,
                            velocity=np.zeros((n, 2), np.float32) if r else None, rates=np.zeros((n, 5), np.float32))

    def new_stream(self) -> StreamHistory:
        return StreamHistory(self.history_bins, self.latent_dim)

    def decode(self, counts, reset: bool = False):
        return self.decode_stream(self.stream, counts, reset)

    def _checked(self, counts) -> np.ndarray:
        if self.fail is not None:
            raise self.fail
        x = np.asarray(counts, np.float32)
        if x.shape[-1] != self.n_channels or x.ndim > 2:
            raise ValueError(f"counts must have {self.n_channels} channels, got shape {x.shape}")
        if not np.isfinite(x).all() or (x < 0).any():
            raise ValueError("counts must be finite and >= 0")
        return x.reshape(-1, self.n_channels)

    def _bin(self, stream: StreamHistory, x: np.ndarray, reset: bool, out: DecodeOutput, i: int) -> None:
        """Decode one bin of ``stream`` into row i of ``out`` and advance the stream."""
        if reset:
            stream.reset()
        z = np.r_[x[:3] * 2, x[3:5] + 1].astype(np.float32)
        out.content[i], out.style_mean[i], out.rates[i] = z[:3], z[3:], x[1:6] * 3
        if self.readout:
            past = np.tile(z, self.history_bins - 1) if stream.fresh else stream.row
            window = np.r_[z, past].reshape(self.history_bins, -1)
            s = x.sum()
            out.angle[i], out.direction[i], out.proba[i] = s / 10, s % 4, [0.1, 0.2, 0.3, 0.4]
            out.velocity[i] = [window[:, 0].sum(), window[-1, 0]]
        stream.push(z)

    def decode_stream(self, stream: StreamHistory, counts, reset: bool = False):
        x = self._checked(counts)
        one = np.ndim(counts) == 1
        out = self._one if one else self._empty(len(x))
        for i, row in enumerate(x):
            self._bin(stream, row, reset and i == 0, out, i)
        return out

    def decode_streams(self, streams: list, counts, resets=None):
        x = self._checked(counts)
        if len(streams) != len(x) or len({id(s) for s in streams}) != len(streams):
            raise ValueError("decode_streams takes one bin of each of distinct streams")
        out = self._empty(len(x))
        for i, (s, row) in enumerate(zip(streams, x)):
            self._bin(s, row, bool(resets[i]) if resets is not None else False, out, i)
        return out


def expected(x, before=(), readout: bool = True) -> DecodeOutput:
    """What the fake decodes for the bins ``x`` ((6,) or (B, 6)) of a stream that saw ``before``
    (bins since its last reset, oldest first) and no other."""
    eng = FakeEngine(readout=readout)
    bins = np.asarray(x, np.float32).reshape(-1, 6)
    out = eng.decode_stream(eng.new_stream(), np.concatenate([np.reshape(before, (-1, 6)), bins]).astype(np.float32))
    return DecodeOutput(**{k: None if getattr(out, k) is None else getattr(out, k)[-len(bins):] for k in FIELDS})


class QueueSource:
    """A source of the serving loop whose messages wait in memory: ``recv`` reads them in the
    order ``put`` queued them, ``answer`` records the replies. No socket, no timing: tests drive
    the loop's read path (``Server._serve``) and the lanes exactly. ``keyed``: ROUTER-like
    ([identity, request] messages, one stream per identity) or the SUB input (one stream)."""

    def __init__(self, keyed: bool = True):
        import zmq

        self.keyed, self._again, self._pollin = keyed, zmq.Again, int(zmq.POLLIN)
        self.queue, self.replies = [], []

    def put(self, frame, key: bytes = b"a") -> None:
        self.queue.append([key, frame] if self.keyed else [frame])

    def recv(self, flags: int = 0) -> list:
        if not self.queue:
            raise self._again()
        return self.queue.pop(0)

    def get(self, option: int) -> int:  # only ZMQ_EVENTS is asked
        return self._pollin if self.queue else 0

    def request(self, frames: list):
        return frames[-1]

    def envelope_error(self, frames: list) -> str:
        return "refused"

    def answer(self, frames: list, reply, copy: bool = True) -> None:
        self.replies.append((frames[0] if self.keyed else b"", bytes(reply)))

    def serve_all(self, server) -> None:
        """Read everything queued, as the loop's turns would, then run both lanes dry."""
        while self.queue:
            server._serve(self)
        while server.controls.items or server.bulk.queues:
            if server.controls.items:
                server.controls.step()
            if server.bulk.queues:
                server.bulk.step()
