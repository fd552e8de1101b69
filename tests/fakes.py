"""A stand-in engine with the BundleDecoder interface, for tests of the wire format and the
server without ONNX Runtime."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np


@dataclass
class FakeOutput:
    content: np.ndarray
    style_mean: np.ndarray
    angle: np.ndarray
    direction: np.ndarray
    proba: np.ndarray
    rates: np.ndarray


class FakeManifest:
    def model_dump_json(self) -> str:
        return json.dumps({"n_channels": 6, "files": {"decode.onnx": "0" * 64}})


class FakeEngine:
    """Deterministic outputs from the counts; batch-1 outputs are views of reused buffers."""
    n_channels = 6
    manifest = FakeManifest()

    def __init__(self, fail: Exception | None = None):
        self.fail = fail
        self._one = FakeOutput(np.zeros((1, 3), np.float32), np.zeros((1, 2), np.float32), np.zeros(1, np.float32),
                               np.zeros(1, np.int64), np.zeros((1, 4), np.float32), np.zeros((1, 5), np.float32))

    def decode(self, counts):
        if self.fail is not None:
            raise self.fail
        x = np.asarray(counts, np.float32)
        if x.shape[-1] != self.n_channels:
            raise ValueError(f"counts must have {self.n_channels} channels, got shape {x.shape}")
        if not np.isfinite(x).all() or (x < 0).any():
            raise ValueError("counts must be finite and >= 0")
        x2 = x.reshape(-1, self.n_channels)
        s = x2.sum(1)
        out = FakeOutput(x2[:, :3] * 2, x2[:, 3:5] + 1, s / 10, (s % 4).astype(np.int64),
                         np.tile([0.1, 0.2, 0.3, 0.4], (len(x2), 1)).astype(np.float32), x2[:, 1:6] * 3)
        if x.ndim == 1:
            for k in ("content", "style_mean", "angle", "direction", "proba", "rates"):
                getattr(self._one, k)[...] = getattr(out, k)
            return self._one
        return out


def expected(x: np.ndarray) -> FakeOutput:
    return FakeEngine().decode(np.asarray(x, np.float32).reshape(-1, 6))
