"""The bundle manifest: everything the runtime needs to serve an exported model.

A bundle is a directory holding ONNX graphs and this ``manifest.json``. It is the only thing
that crosses from swapvae.training to a rig PC, so the manifest says what a client must send (the raw
count vector of all ``n_channels`` recorded channels, one bin of ``bin_size_s``), what comes
back, and the sha256 of every file, which the runtime checks before it loads anything.

Graphs (names fixed by ``graph_io``; the batch axis is dynamic; k = readout.history_bins, L = latent_dim):
    decode   counts (B, n_channels) [, history (B, (k-1) L), first (B, 1) bool]
             -> latent [, resultant, direction, proba, velocity], rates, count_min, count_sum
             the fused per-bin graph the runtime serves: latent = [content, style_mean]; the
             readout sees the window [latent, history] (most recent first); ``first`` marks a
             stream's first bin since a reset, whose window is its own latent repeated.
             angle = atan2(resultant[:, 1], resultant[:, 0]) (ONNX has no Atan2, and its
             substitute doubled the latency); count_min/count_sum let the caller reject
             negative/NaN/inf input without another pass over it
    encoder  counts (B, n_channels) -> content, style_mean, style_logvar
    decoder  latent (B, L) -> rates
    readout  window (B, k L) -> angle, direction, proba, velocity, resultant   (with a readout)

A bundle trained without reach labels has no ``readout``: it serves latents and rates only.

Preprocessing (neuron selection, counts -> model unit) is folded into the first layer of the
graphs that take counts; ``neurons`` and ``input_scale`` record it. ``rates`` are over the
kept ``neurons``, in ``rates_unit``. Denoised rates are decoder([content, style_mean]): the
style is never sampled at inference.
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

FORMAT_VERSION = 2
MANIFEST = "manifest.json"



def graph_io(readout: ReadoutSpec | None) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Input and output names of each graph of a bundle with this readout."""
    heads = ("resultant", "direction", "proba", "velocity") if readout is not None else ()
    history = ("history", "first") if readout is not None and readout.history_bins > 1 else ()
    io = {
        "decode": (("counts", *history), ("latent", *heads, "rates", "count_min", "count_sum")),
        "encoder": (("counts",), ("content", "style_mean", "style_logvar")),
        "decoder": (("latent",), ("rates",)),
    }
    if readout is not None:
        io["readout"] = (("window",), ("angle", "direction", "proba", "velocity", "resultant"))
    return io


# Fields the runtime relies on; export also writes them into each graph's metadata (key
# CORE_KEY), so the runtime can tell an edited manifest from the one the graphs were built with.
CORE_FIELDS = ("n_channels", "neurons", "bin_size_s", "input_unit", "input_scale", "rates_unit", "content_dim",
               "style_dim", "readout")
CORE_KEY = "swapvae_manifest_core"
# Core fields of earlier versions, retired with their experiment, and the value that did nothing:
# bundles exported then still load with it; with any other value they are refused.
RETIRED_CORE = {"input_transform": "identity"}


def without_retired(core: dict[str, Any], where: str = "the bundle") -> dict[str, Any]:
    """``core`` (a manifest's fields, or those a graph embeds) without retired fields at their
    neutral value; ValueError for one that held anything else."""
    for key, neutral in RETIRED_CORE.items():
        if key in core and core[key] != neutral:
            raise ValueError(f"{where}: {key} {core[key]!r} was an experiment this version no longer serves "
                             f"(only {neutral!r}); train the run again without it and export it anew")
    return {k: v for k, v in core.items() if k not in RETIRED_CORE}

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
# A plain file name inside the bundle: no directories, so a manifest cannot point outside it.
FileName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GraphSpec(_Frozen):
    file: FileName
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


class Direction(_Frozen):
    """The reach-direction readout's classes: ``proba`` columns follow ``classes``;
    ``direction`` is a class label; ``angle`` is atan2 of the probability-weighted unit
    vectors at ``angles_rad``."""
    classes: tuple[int, ...] = Field(min_length=2)
    angles_rad: tuple[float, ...] = Field(min_length=2)

    @model_validator(mode="after")
    def _matching(self) -> Direction:
        if len(self.classes) != len(self.angles_rad):
            raise ValueError(f"direction: {len(self.classes)} classes but {len(self.angles_rad)} angles")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"direction: classes repeat: {self.classes}")
        if not all(math.isfinite(a) for a in self.angles_rad):
            raise ValueError("direction: angles must be finite")
        return self


class Evaluation(_Frozen):
    """How the run was scored, so a replay streams the very test bins: the chronological split
    by trial (the first ``train_fraction`` of trials train) and the moving-bin rule (hand speed
    above ``speed_threshold``) of the reach readout."""
    train_fraction: float = Field(gt=0, lt=1)
    speed_threshold: float = Field(ge=0)


class ReadoutSpec(_Frozen):
    """The readout on a causal window of the last ``history_bins`` latents of a stream: reach
    direction (classes, probabilities, angle) and hand velocity (``velocity`` names its
    components, in the training data's unit). A server keeps each stream's last
    ``history_bins - 1`` latents; a reset (a trial start) empties them."""
    history_bins: int = Field(ge=1, le=64)
    direction: Direction
    velocity: tuple[str, ...] = ("vx", "vy")


class TrainingInfo(_Frozen):
    # Kept as plain JSON so a rig can load bundles from older/newer training configs.
    config: dict[str, Any]
    evaluation: Evaluation
    metrics: dict[str, Any]
    data: str | None = None  # the recording: a file's absolute path, or a built-in session's name
    data_sha256: str | None = None  # the file's, so a replay can tell it from another one
    session: str | None = None
    epochs_done: int | None = None


class Quantization(_Frozen):
    """How far an int8 ``decode`` graph is from the fp32 model, measured by the export on the
    run's test bins: errors are max |int8 - fp32| over bins, divided by the largest |fp32|
    value of that output."""
    scheme: str
    n_bins: int = Field(ge=1)
    latent_err: float = Field(ge=0)
    rates_err: float = Field(ge=0)
    proba_err: float = Field(ge=0)
    direction_agreement: float = Field(ge=0, le=1)
    angle_err_p99_rad: float = Field(ge=0)


class BundleManifest(_Frozen):
    format_version: Literal[2] = FORMAT_VERSION
    created_utc: str
    n_channels: int = Field(ge=1, description="length of the raw count vector a client sends")
    neurons: tuple[int, ...] = Field(min_length=1, description="kept channels, sorted; rates follow this order")
    bin_size_s: float = Field(gt=0, allow_inf_nan=False)
    input_unit: Literal["counts", "hz"]
    input_scale: float = Field(gt=0, allow_inf_nan=False, description="model input = counts[neurons] * input_scale")
    rates_unit: Literal["counts_per_bin", "hz"]
    content_dim: int = Field(ge=0)
    style_dim: int = Field(ge=1)
    readout: ReadoutSpec | None = Field(description="None: trained without reach labels; latents and rates only")
    opset: int = Field(ge=1)
    # "int8": decode.onnx (the graph the runtime serves) has int8 weights, for models whose
    # fp32 weights do not fit the CPU cache; encoder/decoder/readout.onnx stay fp32. Its first
    # layer takes the counts as whole numbers: they are rounded, and clipped at 127 per bin.
    weights: Literal["fp32", "int8"] = "fp32"
    quantization: Quantization | None = None
    graphs: dict[str, GraphSpec]
    files: dict[FileName, Sha256]
    training: TrainingInfo
    versions: dict[str, str]

    @property
    def n_neurons(self) -> int:
        return len(self.neurons)

    @property
    def latent_dim(self) -> int:
        return self.content_dim + self.style_dim

    @property
    def n_classes(self) -> int:
        return len(self.readout.direction.classes) if self.readout else 0

    @property
    def history_bins(self) -> int:
        return self.readout.history_bins if self.readout else 1

    @property
    def velocity_dim(self) -> int:
        return len(self.readout.velocity) if self.readout else 0

    def core(self) -> dict[str, Any]:
        """The CORE_FIELDS as plain JSON values."""
        return self.model_dump(mode="json", include=set(CORE_FIELDS))

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, values: Any) -> Any:
        return without_retired(values, "manifest") if isinstance(values, dict) else values

    @model_validator(mode="after")
    def _consistent(self) -> BundleManifest:
        n = self.neurons
        if any(b <= a for a, b in zip(n, n[1:])) or n[0] < 0 or n[-1] >= self.n_channels:
            raise ValueError(f"neurons must be sorted, unique and in [0, {self.n_channels}); got {_short(n)}")
        io = graph_io(self.readout)
        if set(self.graphs) != set(io):
            raise ValueError(f"graphs must be exactly {sorted(io)}, got {sorted(self.graphs)}")
        for name, spec in self.graphs.items():
            if (spec.inputs, spec.outputs) != io[name]:
                raise ValueError(f"graph {name!r}: inputs/outputs {spec.inputs}/{spec.outputs}, "
                                 f"expected {io[name][0]}/{io[name][1]}")
            if spec.file not in self.files:
                raise ValueError(f"graph {name!r}: file {spec.file!r} has no sha256 in 'files'")
        if (self.weights == "int8") != (self.quantization is not None):
            raise ValueError("weights 'int8' and a 'quantization' record go together")
        if MANIFEST in self.files:
            raise ValueError(f"'files' cannot list {MANIFEST} itself")
        expected_unit = "hz" if self.input_unit == "hz" else "counts_per_bin"
        if self.rates_unit != expected_unit:
            raise ValueError(f"rates_unit {self.rates_unit!r} does not match input_unit {self.input_unit!r}")
        if not re.fullmatch(r"\d{4}-\d\d-\d\dT.*", self.created_utc):
            raise ValueError(f"created_utc must be an ISO timestamp, got {self.created_utc!r}")
        return self


def _short(seq: tuple[int, ...], n: int = 8) -> str:
    return str(list(seq[:n]))[:-1] + (", ...]" if len(seq) > n else "]")
