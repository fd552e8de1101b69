"""Pydantic models shared by training and runtime: configs, bundle manifest, wire protocol.

Depends on nothing else in this project, so both sides read the same definitions.
"""
from swapvae.schemas.config import (
    VARIANTS,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ReadoutConfig,
    SwapVAEConfig,
)

__all__ = [
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ReadoutConfig",
    "SwapVAEConfig",
    "VARIANTS",
]
