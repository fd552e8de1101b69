"""What a decode returns: one type for the engine, the reply writer and the client.

Its fields are the decode reply's sections (``schemas.protocol.DECODE_SECTIONS``, the one
definition), in wire order; each holds ``n_bins`` rows:

    content     (B, content_dim) float32   content latent
    style_mean  (B, style_dim) float32     style latent mean (never sampled at inference)
    angle       (B,) float32               radians in [-pi, pi]                     } None without
    direction   (B,) int (int64 from the engine, int32 on the wire)                 } a readout
    proba       (B, n_classes) float32     columns follow manifest.readout.direction } (a bundle
    velocity    (B, velocity_dim) float32  hand velocity, manifest.readout.velocity  } trained
    rates       (B, n_rates) float32       denoised rates of the kept neurons        } without labels)

The client's ``Decoded`` extends it with what the reply header says. Numpy only (a rig client
imports it without ONNX Runtime).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from swapvae.schemas.protocol import DECODE_SECTIONS

FIELDS: tuple[str, ...] = tuple(s.name for s in DECODE_SECTIONS)
READOUT_FIELDS: tuple[str, ...] = tuple(s.name for s in DECODE_SECTIONS if s.readout)


class _Methods:
    def copy(self):
        """The same output with copies of its arrays (a one-bin engine output is reused by the next call)."""
        return dataclasses.replace(self, **{k: getattr(self, k).copy() for k in FIELDS if getattr(self, k) is not None})

    def as_dict(self) -> dict[str, np.ndarray]:
        """Copies of the arrays by field name (absent sections left out)."""
        return {k: getattr(self, k).copy() for k in FIELDS if getattr(self, k) is not None}


DecodeOutput = dataclasses.make_dataclass(
    "DecodeOutput", [(name, "np.ndarray | None") for name in FIELDS], bases=(_Methods,))
DecodeOutput.__module__ = __name__
DecodeOutput.__doc__ = f"DecodeOutput({', '.join(FIELDS)}): one decode, fields as this module's doc says."
