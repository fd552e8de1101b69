"""Every hyperparameter of a Swap-VAE run, in one validated config.

Defaults follow the paper's released recipe (../shared/docs/METHOD.md) except where a
field's comment says why we differ; every such choice was made on a validation split of the
training trials, and docs/RECIPE.md has the measurements. The paper's ablations are selected with ``variant``:
it fills in the loss/model fields that define the variant, and any field given explicitly
still wins, so ``{"variant": "beta_vae", "loss": {"kl_weight": 4}}`` is a beta-VAE with beta 4.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Variant = Literal["swap_vae", "no_swap", "no_align", "vae", "beta_vae"]

# What each ablation of the paper changes, relative to the full model (Table 3 / section 5).
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "swap_vae": {},
    "no_swap": {"loss": {"swap": False}},  # alignment only
    "no_align": {"loss": {"align_weight": 0.0}},  # BlockSwap with no alignment term (the paper's "swap only")
    "vae": {"model": {"content_dim": 0, "style_dim": 128},
            "loss": {"swap": False, "align_weight": 0.0, "kl_weight": 1.0}},
    "beta_vae": {"model": {"content_dim": 0, "style_dim": 128},
                 "loss": {"swap": False, "align_weight": 0.0, "kl_weight": 10.0}},
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    train_fraction: float = Field(0.8, gt=0.0, lt=1.0, description="chronological split by trial")
    static_std: float = Field(1e-3, ge=0.0, description="drop neurons whose train-bin std is <= this")
    min_trials: int = Field(4, ge=2, description="refuse sessions with fewer trials")
    # Spike counts are whole numbers: fractional input is refused as the recording readers refuse
    # it. False fits rates or smoothed counts (the Poisson loss does not need whole numbers).
    whole_counts: bool = Field(True, description="refuse fractional counts")
    # Model input and Poisson target: rates in Hz, as the reference code; the unit sets the
    # balance against the fixed KL and alignment weights, and counts decoded worse.
    input_unit: Literal["counts", "hz"] = "hz"
    # The paper pairs bins up to 5 apart; 10 (most of a 9-14 bin reach) decoded better.
    jitter: int = Field(10, ge=0, description="max |i - j| between the two views, in bins")
    # The paper's "Drop" augmentation, at a lighter p ~ U(0, 0.3) than the paper's 0.6.
    dropout_max: float = Field(0.3, ge=0.0, lt=1.0, description="neuron dropout p ~ U(0, dropout_max)")
    # Where a fit keeps its bins and pair index: on the training device, or in host memory with
    # each step's rows shipped over (training.stream), for recordings the device cannot hold.
    placement: Literal["auto", "device", "host"] = Field(
        "auto", description="auto: on the device when the bins and pairs take at most half its free memory")
    stream_chunk_steps: int = Field(32, ge=1, description="steps gathered and copied at once when placement is host")


class ModelConfig(_Section):
    content_dim: int = Field(64, ge=0)
    style_dim: int = Field(64, ge=1)
    # Encoder hidden widths; "d" means the number of input neurons (released code: [d, 128]).
    hidden: tuple[int | Literal["d"], ...] = ("d", 128)
    # In a model shared across sessions (training.sessions) each session's read-in maps its own
    # channels to this width, which "d" then means: the core's width does not depend on a session.
    shared_width: int = Field(192, ge=1, description="what 'd' in hidden means for a core shared across sessions")

    def hidden_sizes(self, n_neurons: int) -> list[int]:
        return [n_neurons if h == "d" else int(h) for h in self.hidden]

    def shared_hidden(self) -> tuple[int, ...]:
        """The widths of a core shared across sessions: "d" is ``shared_width``."""
        return tuple(self.shared_width if h == "d" else int(h) for h in self.hidden)

    @model_validator(mode="after")
    def _positive_hidden(self) -> ModelConfig:
        if not self.hidden or any(h != "d" and h <= 0 for h in self.hidden):
            raise ValueError(f"model.hidden must be non-empty positive widths or 'd', got {self.hidden}")
        return self


class LossConfig(_Section):
    swap: bool = True
    kl_weight: float = Field(10.0, ge=0.0)
    # The released weight: small beside the Poisson NLL in Hz, yet contents already group by
    # direction, and larger weights collapsed them without decoding better.
    align_weight: float = Field(1.0, ge=0.0)
    eps: float = Field(1e-8, gt=0.0, description="inside log(rate) of the Poisson NLL")


class OptimConfig(_Section):
    lr: float = Field(5e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(256, ge=2, description="pairs per step")
    # Twice the released ~225: with dropout the model keeps improving on later trials.
    epochs: int = Field(450, ge=1, description="each epoch is steps_per_epoch steps (0: one pass over the bins)")
    checkpoint_every: int = Field(25, ge=1, description="epochs between checkpoints")
    # A recording of 10^6 bins makes one pass thousands of steps: a fixed epoch keeps checkpoints,
    # progress and the history's points at a useful spacing.
    steps_per_epoch: int = Field(0, ge=0, description="0: one pass, max(1, n_train_bins // batch_size) steps; "
                                                      "else this many steps")
    # Larger batches want a larger step: Adam's square-root rule (Malladi et al., 2022) against
    # the reference batch of 256 pairs, or none (lr as given).
    lr_batch_rule: Literal["none", "sqrt"] = Field("none", description="sqrt: lr x sqrt(batch_size / 256)")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: the forward pass under bfloat16 "
                                                                   "autocast; the loss terms in float32")
    # Torch CPU threads while training; 0: whichever of one per core and one runs a step faster
    # when training starts (training.estimator.choose_threads; one thread wins beside other
    # busy processes). A run is bit-reproducible for a seed at a given thread count.
    cpu_threads: int = Field(0, ge=0)


class ReadoutConfig(_Section):
    speed_threshold: float = Field(5.0, ge=0.0, description="bins with |velocity| above this are scored for direction")
    n_directions: int = Field(8, ge=2)
    # The readout sees a causal window of the last k per-bin latents of the trial; k is chosen
    # from this grid by the same grouped CV as C (history_grid=(1,) is the paper's per-bin protocol).
    history_grid: tuple[int, ...] = Field((1, 2, 3, 4, 5), min_length=1)
    # Direction: 8-class logistic regression, angle = that of the probability-weighted class
    # vectors. "global" divides every feature by one common std, keeping the geometry the model
    # learned (near-prior style dimensions stay small); "feature" standardises each feature.
    scaling: Literal["global", "feature"] = "global"
    C_grid: tuple[float, ...] = Field((3e-4, 1e-3, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0), min_length=1)
    # The direction readout also trains on copies of the training bins with a random share
    # U(0, silenced_max) of each trial's channels zeroed: it leans less on a few channels, which
    # decoded better on later trials and with channels lost (docs/RECIPE.md).
    silenced_copies: int = Field(2, ge=0)
    silenced_max: float = Field(0.4, ge=0.0, lt=1.0)
    # Velocity: ridge regression on a window of its own length (k from history_grid), alpha by the same folds.
    alpha_grid: tuple[float, ...] = Field((0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5), min_length=1)
    cv_folds: int = Field(5, ge=2, description="folds grouped by training trial")
    # A new day's calibration block: the readout sees only the first N training trials' labels
    # (None: all of them). 0: no labels at all, the reference sessions' readout (swapvae calibrate).
    labelled_trials: int | None = Field(None, ge=0, description="readouts fitted on the first N training trials")

    @model_validator(mode="after")
    def _grids(self) -> ReadoutConfig:
        if min(self.history_grid) < 1 or min(self.C_grid) <= 0 or min(self.alpha_grid) <= 0:
            raise ValueError("readout grids must be positive (history_grid in bins >= 1)")
        return self


class CalibrateConfig(_Section):
    """Fitting a new session onto a core trained across sessions (``swapvae calibrate``): a fresh
    read-in and read-out trained on its unlabelled bins with the Swap-VAE loss, then the readout
    on its first ``readout.labelled_trials`` trials (none: the reference sessions' readout)."""
    epochs: int = Field(300, ge=1, description="epochs of the new read-in and read-out on the new session's bins")
    lr: float = Field(1e-3, gt=0.0)
    # 0: the core is frozen (its BatchNorm statistics too); > 0: it is fine-tuned at this rate
    # (1e-4 tied with the frozen core on validation: docs/RECIPE.md).
    core_lr: float = Field(0.0, ge=0.0)


class SwapVAEConfig(_Section):
    variant: Variant = "swap_vae"
    seed: int = 0
    # "auto": CUDA when torch sees it, else the CPU; "cuda:N" picks one of several GPUs.
    device: str = "auto"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    readout: ReadoutConfig = ReadoutConfig()
    calibrate: CalibrateConfig = CalibrateConfig()

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", v):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (N a GPU index), got {v!r}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _apply_variant(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        values = _without_retired(values)
        name = values.get("variant", "swap_vae")
        preset = VARIANTS.get(name)
        if preset is None:  # let the Literal produce the error message
            return values
        merged = dict(values)
        for section, fields in preset.items():
            given = merged.get(section, {})
            if isinstance(given, BaseModel):
                given = given.model_dump(exclude_unset=True)
            merged[section] = {**fields, **given}
        return merged

    @model_validator(mode="after")
    def _consistent(self) -> SwapVAEConfig:
        if self.model.content_dim == 0 and (self.loss.swap or self.loss.align_weight > 0):
            raise ValueError("swap and alignment act on the content latent: content_dim must be > 0")
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> SwapVAEConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"config {path}: not valid JSON ({e})") from None
        return cls.model_validate(raw)

    def with_overrides(self, **fields: Any) -> SwapVAEConfig:
        """This config with ``fields`` changed, validated. A section given as a dict (or a
        section model) changes only the fields it names: ``with_overrides(optim={"epochs": 2})``
        keeps the learning rate and the rest of ``optim``. Fields this config was built with
        explicitly stay explicit, so a ``variant`` given here fills in only the others."""
        return type(self).model_validate(_merge(self.model_dump(exclude_unset=True), fields))


# Fields of earlier versions, retired with the experiments they served (docs/RECIPE.md has their
# measurements): a config written then (a run's config.json, a checkpoint) still loads when it
# holds the value that did nothing; any other value is refused, naming the field.
RETIRED = {("data", "thin_min"): 1.0, ("model", "input_transform"): "identity"}
RETIRED_VARIANTS = {"swap_only": "no_align"}  # one recipe had two names


def _without_retired(values: dict[str, Any]) -> dict[str, Any]:
    values = dict(values)
    if values.get("variant") in RETIRED_VARIANTS:
        values["variant"] = RETIRED_VARIANTS[values["variant"]]
    for (section, field), neutral in RETIRED.items():
        given = values.get(section)
        if isinstance(given, dict) and field in given:
            if given[field] != neutral:
                raise ValueError(f"{section}.{field} = {given[field]!r} was an experiment, removed from this version "
                                 f"(docs/RECIPE.md); only {neutral!r}, which did nothing, is still read")
            values[section] = {k: v for k, v in given.items() if k != field}
    return values


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied, dicts (config sections) merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_unset=True)
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
