"""The pure half of export: a trained model as ONNX graphs, no files and no checks.

BatchNorm is folded into the preceding Linear (eval-mode statistics), and the neuron
selection and unit scaling into the first layer (dropped channels get zero weights), so a
client sends the raw count vector and one bin costs one ORT call of a few Gemm nodes. Writing
the graphs ourselves rather than tracing keeps them minimal and identical across torch
versions. ``training.export`` writes them into a bundle and proves them against the model.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from swapvae.schemas.manifest import CORE_KEY, ReadoutSpec, graph_io
from swapvae.training.readout import Readout


class ExportError(RuntimeError):
    """The export could not be written or did not reproduce the torch model."""


# -- folding the torch model into plain affine layers --------------------------------------------
@dataclass
class Affine:
    weight: np.ndarray  # (out, in) float64
    bias: np.ndarray  # (out,)
    activation: str | None = None  # "Relu" | "Softplus"


def fold_sequential(seq: nn.Sequential) -> list[Affine]:
    """Linear [-> BatchNorm1d] [-> ReLU | Softplus] blocks as affine layers, BatchNorm folded
    with its running statistics (what eval mode computes)."""
    layers: list[Affine] = []
    for m in seq:
        if isinstance(m, nn.Linear):
            w = m.weight.detach().double().numpy()
            b = m.bias.detach().double().numpy() if m.bias is not None else np.zeros(w.shape[0])
            layers.append(Affine(w.copy(), b.copy()))
        elif isinstance(m, nn.BatchNorm1d):
            if not layers or layers[-1].activation is not None or m.running_mean is None:
                raise ExportError(f"cannot fold {m}: it must follow a Linear and track running statistics")
            gamma = m.weight.detach().double().numpy() if m.affine else np.ones(m.num_features)
            beta = m.bias.detach().double().numpy() if m.affine else np.zeros(m.num_features)
            s = gamma / np.sqrt(m.running_var.double().numpy() + m.eps)
            last = layers[-1]
            last.weight = s[:, None] * last.weight
            last.bias = s * (last.bias - m.running_mean.double().numpy()) + beta
        elif isinstance(m, (nn.ReLU, nn.Softplus)):
            if not layers or layers[-1].activation is not None:
                raise ExportError(f"cannot export {seq}: activation {m} does not follow a Linear")
            if isinstance(m, nn.Softplus) and (m.beta != 1 or m.threshold < 20):
                raise ExportError(f"ONNX Softplus is log(1 + exp(x)); {m} differs from it")
            layers[-1].activation = "Relu" if isinstance(m, nn.ReLU) else "Softplus"
        else:
            raise ExportError(f"export does not know how to write layer {m!r}; extend training/export.py")
    return layers


def fold_input(first: Affine, neurons: np.ndarray, n_channels: int, scale: float) -> Affine:
    """Take raw counts over all channels: zero weights for dropped channels, unit scale folded in."""
    w = np.zeros((first.weight.shape[0], n_channels))
    w[:, neurons] = first.weight * scale
    return Affine(w, first.bias, first.activation)


def readout_heads(r: Readout) -> Affine:
    """Both heads of the readout as one affine map of the window: [logits, velocity]."""
    return Affine(np.concatenate([r.coef, r.velocity_coef]), np.concatenate([r.intercept, r.velocity_intercept]))


# -- writing ONNX ----------------------------------------------------------------------------
class _GraphBuilder:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value, hint: str = "c", dtype=np.float32) -> str:
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def split(self, x: str, widths: list[int], outs: list[str | None]) -> list[str]:
        """Columns of ``x`` in consecutive blocks of ``widths``."""
        outs = [o or self._name("part") for o in outs]
        self.nodes.append(helper.make_node("Split", [x, self.const(widths, "widths", np.int64)], outs,
                                           name=self._name("split"), axis=1))
        return outs

    def mlp(self, x: str, layers: list[Affine], hint: str, out: str | None = None) -> str:
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1
            y = self.op("Gemm", x, self.const(layer.weight, f"{hint}{i}_w"), self.const(layer.bias, f"{hint}{i}_b"),
                        transB=1, out=out if last and not layer.activation else None)
            x = self.op(layer.activation, y, out=out if last else None) if layer.activation else y
        return x

    def counts_layer_int8(self, layer: Affine) -> str:
        """The first layer with int8 weights (symmetric, one scale per output channel) on the
        counts as exact uint8 integers: W x + b = s * (W_q x_u8) + b. Counts are whole numbers
        (rounded here) and clipped at 127, the largest at which AVX2's u8 x s8 pair sums
        cannot saturate int16 (127 * 127 * 2 < 2^15); a neuron firing above 127 spikes per bin
        is not physiological at the bins this serves."""
        scale = np.abs(layer.weight).max(axis=1) / 127.0
        scale[scale == 0] = 1.0
        w_q = np.clip(np.rint(layer.weight / scale[:, None]), -127, 127).T  # (n_channels, out)
        x = self.op("Clip", self.op("Round", "counts"), self.const(0.0, "lo"), self.const(127.0, "hi"))
        y = self.op("MatMulInteger", self.op("Cast", x, to=TensorProto.UINT8), self.const(w_q, "enc0_wq", np.int8))
        y = self.op("Add", self.op("Mul", self.op("Cast", y, to=TensorProto.FLOAT), self.const(scale, "enc0_s")),
                    self.const(layer.bias, "enc0_b"))
        return self.op(layer.activation, y) if layer.activation else y

    def cols(self, x: str, start: int, stop: int, out: str | None = None) -> str:
        return self.op("Slice", x, self.const([start], "s", np.int64), self.const([stop], "e", np.int64),
                       self.const([1], "ax", np.int64), out=out)

    def window(self, latent: str, k: int) -> str:
        """The readout's input: [latent, history] (most recent first, (B, k L)), where a stream's
        first bin since a reset has no history yet and its own latent fills every place."""
        if k == 1:
            return latent
        tiled = self.op("Tile", latent, self.const([1, k - 1], "reps", np.int64))
        past = self.op("Where", "first", tiled, "history")
        return self.op("Concat", latent, past, axis=1)

    def readout(self, window: str, heads: Affine, classes: np.ndarray, angles: np.ndarray) -> str:
        """Outputs proba, direction, velocity and resultant (the probability-weighted class
        vectors: angle = atan2 of it); returns the resultant."""
        both = self.op("Gemm", window, self.const(heads.weight, "ro_w"), self.const(heads.bias, "ro_b"), transB=1)
        logits, _ = self.split(both, [len(classes), heads.weight.shape[0] - len(classes)], [None, "velocity"])
        proba = self.op("Softmax", logits, axis=-1, out="proba")
        idx = self.op("ArgMax", proba, axis=1, keepdims=0)
        if np.array_equal(classes, np.arange(len(classes))):
            self.op("Identity", idx, out="direction")  # removed by ORT's optimizer
        else:
            self.op("Gather", self.const(classes, "classes", np.int64), idx, axis=0, out="direction")
        return self.op("MatMul", proba, self.const(np.stack([np.cos(angles), np.sin(angles)], axis=1), "cossin"),
                       out="resultant")

    def atan2(self, y: str, x: str, out: str) -> str:
        """ONNX has no Atan2: atan(y / x), plus pi with the sign of y where x < 0. atan(y / x)
        is accurate everywhere (x = 0 gives +-inf, so +-pi/2). The tiny offset on y turns the
        one undefined point (0, 0), e.g. uniform class probabilities, into an angle, not NaN;
        it is far below float32 resolution for any y that matters."""
        y = self.op("Add", y, self.const(1e-30, "tiny"))
        a = self.op("Atan", self.op("Div", y, x))
        turn = self.op("Mul", self.op("Sign", y), self.const(np.pi, "pi"))
        fix = self.op("Where", self.op("Less", x, self.const(0.0, "zero")), turn, self.const(0.0, "zero"))
        return self.op("Add", a, fix, out=out)

    def reduce(self, op_type: str, x: str, axis: int, out: str, opset: int) -> str:
        # Axes moved from attribute to input: ReduceSum at opset 13, the others at 18.
        if opset >= (13 if op_type == "ReduceSum" else 18):
            return self.op(op_type, x, self.const([axis], "axes", np.int64), keepdims=0, out=out)
        return self.op(op_type, x, axes=[axis], keepdims=0, out=out)

    def model(self, name: str, inputs: list[tuple[str, int, int]], outputs: list[tuple[str, int, list]],
              opset: int, doc: str, metadata: dict[str, str]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info(n, t, ["batch", d]) for n, t, d in inputs],
            [helper.make_tensor_value_info(n, t, shape) for n, t, shape in outputs],
            initializer=self.inits)
        opsets = [helper.make_opsetid("", opset)]
        # The oldest IR version that carries this opset, so older ORT builds on rig PCs load it.
        m = helper.make_model(graph, opset_imports=opsets, producer_name="swapvae-bci",
                              producer_version=package_version("swapvae-bci"), doc_string=doc,
                              ir_version=helper.find_min_ir_version_for(opsets))
        helper.set_model_props(m, metadata)
        onnx.checker.check_model(m, full_check=True)
        return m


@dataclass(frozen=True)
class _Graphs:
    """What every graph of one bundle shares: its core fields (embedded in each), the readout
    spec, and each input's and output's type and shape (``io`` names the ones a graph has)."""
    core: dict
    opset: int

    @property
    def readout(self) -> ReadoutSpec | None:
        return ReadoutSpec.model_validate(self.core["readout"]) if self.core["readout"] is not None else None

    @property
    def latent_dim(self) -> int:
        return self.core["content_dim"] + self.core["style_dim"]

    @property
    def history_bins(self) -> int:
        return self.readout.history_bins if self.readout else 1

    def directions(self) -> tuple[np.ndarray, np.ndarray]:
        d = self.readout.direction
        return np.asarray(d.classes, dtype=np.int64), np.asarray(d.angles_rad, dtype=np.float64)

    def model(self, g: _GraphBuilder, name: str, doc: str) -> onnx.ModelProto:
        c, F, I64, B = self.core, TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
        k, s, L, hist = c["content_dim"], c["style_dim"], self.latent_dim, self.history_bins
        n_cls = len(self.readout.direction.classes) if self.readout else 0
        outputs = {"latent": (F, ["batch", L]), "content": (F, ["batch", k]), "style_mean": (F, ["batch", s]),
                   "style_logvar": (F, ["batch", s]), "rates": (F, ["batch", len(c["neurons"])]),
                   "angle": (F, ["batch"]), "direction": (I64, ["batch"]), "proba": (F, ["batch", n_cls]),
                   "velocity": (F, ["batch", 2]), "resultant": (F, ["batch", 2]), "count_min": (F, ["batch"]),
                   "count_sum": (F, ["batch"])}
        inputs = {"counts": (F, c["n_channels"]), "history": (F, (hist - 1) * L), "first": (B, 1),
                  "window": (F, hist * L), "latent": (F, L)}
        ins, outs = graph_io(self.readout)[name]
        return g.model(f"swapvae_{name}", [(n, *inputs[n]) for n in ins], [(n, *outputs[n]) for n in outs],
                       self.opset, doc, {CORE_KEY: json.dumps(self.core)})


def decode_graph(spec: _Graphs, enc: list[Affine], dec: list[Affine], heads: Affine | None,
                 weights: str) -> onnx.ModelProto:
    """The fused per-bin graph the runtime serves: as few nodes as possible."""
    g = _GraphBuilder()
    L = spec.latent_dim
    head = enc[-1]  # drop the log-variance rows: the encoder's last Gemm yields [c, mu] directly
    layers = [*enc[:-1], Affine(head.weight[:L], head.bias[:L], head.activation)]
    if weights == "int8":
        latent = g.mlp(g.counts_layer_int8(layers[0]), layers[1:], "enc1_", out="latent")
    else:
        latent = g.mlp("counts", layers, "enc", out="latent")
    g.mlp(latent, dec, "dec", out="rates")
    if spec.readout:
        # The angle is atan2 of the resultant; ONNX has no Atan2 and its 8-node substitute cost
        # as much as the encoder's three Gemms, so the runtime takes the atan2 of two floats.
        g.readout(g.window(latent, spec.history_bins), heads, *spec.directions())
    # Input checks in the same call (cheaper than separate numpy reductions): a NaN or inf
    # makes the sum non-finite, a negative count makes the min negative.
    g.reduce("ReduceMin", "counts", 1, out="count_min", opset=spec.opset)
    g.reduce("ReduceSum", "counts", 1, out="count_sum", opset=spec.opset)
    return spec.model(g, "decode", "raw counts of one bin or a batch (and each stream's history) -> latent [content, "
                                   "style mean], readout (direction class, probabilities, velocity, resultant: angle "
                                   "= atan2(resultant[:, 1], resultant[:, 0])), denoised rates, and min/sum of each "
                                   "bin's counts for input checks")


def encoder_graph(spec: _Graphs, enc: list[Affine]) -> onnx.ModelProto:
    g = _GraphBuilder()
    k, s = spec.core["content_dim"], spec.core["style_dim"]
    h = g.mlp("counts", enc, "enc")
    g.cols(h, 0, k, out="content")
    g.cols(h, k, k + s, out="style_mean")
    g.cols(h, k + s, k + 2 * s, out="style_logvar")
    return spec.model(g, "encoder", "raw counts -> content latent, style mean, style log-variance")


def decoder_graph(spec: _Graphs, dec: list[Affine]) -> onnx.ModelProto:
    g = _GraphBuilder()
    g.mlp("latent", dec, "dec", out="rates")
    return spec.model(g, "decoder", "latent [content, style] -> firing rates of the kept neurons")


def readout_graph(spec: _Graphs, heads: Affine) -> onnx.ModelProto:
    g = _GraphBuilder()
    res = g.readout("window", heads, *spec.directions())
    x, y = g.split(res, [1, 1], [None, None])
    g.atan2(g.op("Squeeze", y, g.const([1], "axes", np.int64)), g.op("Squeeze", x, g.const([1], "axes", np.int64)),
            out="angle")
    return spec.model(g, "readout", "window [latent_t, ..., latent_t-k+1] -> reach angle, class, class "
                                    "probabilities, velocity, resultant")


def build_graphs(enc: list[Affine], dec: list[Affine], heads: Affine | None, core: dict, opset: int,
                 weights: str = "fp32") -> dict[str, onnx.ModelProto]:
    """The graphs of ``graph_io`` (schemas/manifest.py); ``core`` is the manifest's CORE_FIELDS,
    embedded in each. ``heads``: the readout's [logits, velocity] map of the window (None for a
    bundle without a readout). With ``weights="int8"`` the decode graph's first layer is int8
    (see ``quantize_int8``)."""
    spec = _Graphs(core, opset)
    graphs = {"decode": decode_graph(spec, enc, dec, heads, weights), "encoder": encoder_graph(spec, enc),
              "decoder": decoder_graph(spec, dec)}
    if spec.readout:
        graphs["readout"] = readout_graph(spec, heads)
    return graphs


# -- int8 weights ------------------------------------------------------------------------------
def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """int8 weights for a decode graph built with ``weights="int8"``. At d = 1024 the fp32
    weights (~9 MB) outgrow a rig CPU's cache and every bin streams them from memory; the two
    d-wide layers hold most of them:
    - the encoder's first layer, already int8 on exact integer counts (``counts_layer_int8``);
    - the decoder's last two layers: ONNX Runtime's dynamic quantization (int8 weights per
      output channel, activations quantized per call). Only the rates pass through them.
    The rest (the small middle layers and the readout) stays fp32: quantizing the encoder's
    activations on the fly changed the direction of up to 10% of bins in our measurements."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    gemms = {n.name: n.input[1] for n in model.graph.node if n.op_type == "Gemm"}
    quantize = [name for name, w in gemms.items() if w.startswith("dec") and not w.startswith("dec0_")]
    keep = [name for name in gemms if name not in quantize]
    # quantize_dynamic first rewrites each Gemm as "<name>_MatMul" + Add: exclude both names
    exclude = keep + [f"{name}_MatMul" for name in keep] + [n.name for n in model.graph.node if n.op_type == "MatMul"]
    before = sum(n.op_type == "MatMulInteger" for n in model.graph.node)
    root = logging.getLogger()  # quantize_dynamic logs advice on the root logger at WARNING
    level = root.level
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(model, src)
        try:
            root.setLevel(logging.ERROR)
            quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
        finally:
            root.setLevel(level)
        q = onnx.load_model(dst)
    n_int8 = sum(n.op_type == "MatMulInteger" for n in q.graph.node)
    if before != 1 or n_int8 != before + len(quantize):
        raise ExportError(f"int8 quantization made {n_int8} int8 layers, expected {1 + len(quantize)}: the first "
                          f"and the decoder's last {len(quantize)} (onnxruntime.quantization changed?)")
    onnx.checker.check_model(q, full_check=True)
    return q


def package_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"
