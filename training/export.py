"""``swapvae export RUN_DIR --out BUNDLE_DIR``: a trained run as an ONNX bundle the runtime serves.

The graphs are written from the trained weights with BatchNorm folded into the preceding
Linear (eval-mode statistics), and the neuron selection and unit scaling folded into the
first layer (dropped channels get zero weights), so a client sends the raw count vector and
one bin costs one ORT call of a few Gemm nodes. Writing the graphs ourselves rather than
tracing keeps them minimal and identical across torch versions; the export then proves them
against the torch model: ``onnx.checker`` on every graph, and ONNX Runtime outputs (every
graph, and the runtime engine itself) equal to the torch model and readout on the run's test
bins within 1e-4, or it fails and leaves no bundle behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from schemas.manifest import (CORE_FIELDS, CORE_KEY, GRAPH_IO, MANIFEST, BundleManifest, Direction, GraphSpec,
                              Quantization, TrainingInfo)
from training.estimator import SwapVAEEstimator
from training.evaluate import Readout, load_readout

MIN_OPSET = 13  # Slice/Softmax/ArgMax semantics used here
TOL = 1e-4
WEIGHTS = ("fp32", "int8")
# How close an int8 decode graph must stay to the fp32 model on the run's test bins (errors
# relative to each output's largest value); beyond this the export fails.
INT8_LIMITS = {"latent_err": 0.05, "rates_err": 0.05, "proba_err": 0.1, "direction_agreement": 0.95}


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


def readout_affine(r: Readout) -> Affine:
    """((z - mean) / scale) @ coef.T + intercept as one affine map of z."""
    w = r.coef / r.scale[None, :]
    return Affine(w, r.intercept - w @ r.mean)


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

    def encoder_input(self, core: dict) -> str:
        """The raw counts as the first Gemm takes them (selection and scale are in its weights)."""
        return self.op("Sqrt", "counts") if core["input_transform"] == "sqrt" else "counts"

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

    def readout(self, latent: str, affine: Affine, classes: np.ndarray) -> str:
        """proba and direction; returns the proba tensor for the angle to use."""
        logits = self.op("Gemm", latent, self.const(affine.weight, "ro_w"), self.const(affine.bias, "ro_b"), transB=1)
        proba = self.op("Softmax", logits, axis=-1, out="proba")
        idx = self.op("ArgMax", proba, axis=1, keepdims=0)
        if np.array_equal(classes, np.arange(len(classes))):
            self.op("Identity", idx, out="direction")  # removed by ORT's optimizer
        else:
            self.op("Gather", self.const(classes, "classes", np.int64), idx, axis=0, out="direction")
        return proba

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

    def model(self, name: str, inputs: list[tuple[str, int]], outputs: list[tuple[str, int, list]],
              opset: int, doc: str, metadata: dict[str, str]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", d]) for n, d in inputs],
            [helper.make_tensor_value_info(n, t, shape) for n, t, shape in outputs],
            initializer=self.inits)
        opsets = [helper.make_opsetid("", opset)]
        # The oldest IR version that carries this opset, so older ORT builds on rig PCs load it.
        m = helper.make_model(graph, opset_imports=opsets, producer_name="swapvae-bci",
                              producer_version=_version("swapvae-bci"), doc_string=doc,
                              ir_version=helper.find_min_ir_version_for(opsets))
        helper.set_model_props(m, metadata)
        onnx.checker.check_model(m, full_check=True)
        return m


def build_graphs(enc: list[Affine], dec: list[Affine], ro: Affine, core: dict, opset: int,
                 weights: str = "fp32") -> dict[str, onnx.ModelProto]:
    """The four graphs of GRAPH_IO; ``core`` is the manifest's CORE_FIELDS, embedded in each.
    With ``weights="int8"`` the decode graph's first layer is int8 (see ``quantize_int8``)."""
    k, s, n_channels, n_neurons = core["content_dim"], core["style_dim"], core["n_channels"], len(core["neurons"])
    classes = np.asarray(core["direction"]["classes"], dtype=np.int64)
    angles = np.asarray(core["direction"]["angles_rad"], dtype=np.float64)
    n_cls = len(classes)
    meta = {CORE_KEY: json.dumps(core)}
    latent_dim = k + s
    F, I = TensorProto.FLOAT, TensorProto.INT64
    spec = {"latent": (F, ["batch", latent_dim]), "content": (F, ["batch", k]), "style_mean": (F, ["batch", s]),
            "style_logvar": (F, ["batch", s]),
            "rates": (F, ["batch", n_neurons]), "angle": (F, ["batch"]), "direction": (I, ["batch"]),
            "proba": (F, ["batch", n_cls]), "resultant": (F, ["batch", 2]), "count_min": (F, ["batch"]),
            "count_sum": (F, ["batch"])}
    outs = lambda names: [(n, *spec[n]) for n in names]  # noqa: E731
    graphs = {}

    g = _GraphBuilder()  # fused: the one call per bin the runtime makes; as few nodes as possible
    head = enc[-1]  # drop the log-variance rows: the encoder's last Gemm yields [c, mu] directly
    layers = [*enc[:-1], Affine(head.weight[:latent_dim], head.bias[:latent_dim], head.activation)]
    if weights == "int8":
        latent = g.mlp(g.counts_layer_int8(layers[0]), layers[1:], "enc1_", out="latent")
    else:
        latent = g.mlp(g.encoder_input(core), layers, "enc", out="latent")
    g.mlp(latent, dec, "dec", out="rates")
    proba = g.readout(latent, ro, classes)
    # The angle is atan2 of this resultant; ONNX has no Atan2 and its 8-node substitute cost
    # as much as the encoder's three Gemms, so the runtime takes the atan2 of two floats.
    g.op("MatMul", proba, g.const(np.stack([np.cos(angles), np.sin(angles)], axis=1), "cossin"), out="resultant")
    # Input checks in the same call (cheaper than separate numpy reductions): a NaN or inf
    # makes the sum non-finite, a negative count makes the min negative.
    g.reduce("ReduceMin", "counts", 1, out="count_min", opset=opset)
    g.reduce("ReduceSum", "counts", 1, out="count_sum", opset=opset)
    graphs["decode"] = g.model("swapvae_decode", [("counts", n_channels)], outs(GRAPH_IO["decode"][1]), opset,
                               "raw counts of one bin or a batch -> latent [content, style mean], direction "
                               "(class, probabilities, resultant: angle = atan2(resultant[:, 1], resultant[:, 0])), "
                               "denoised rates, and min/sum of each bin's counts for input checks", meta)

    g = _GraphBuilder()
    h = g.mlp(g.encoder_input(core), enc, "enc")
    g.cols(h, 0, k, out="content")
    g.cols(h, k, k + s, out="style_mean")
    g.cols(h, k + s, k + 2 * s, out="style_logvar")
    graphs["encoder"] = g.model("swapvae_encoder", [("counts", n_channels)], outs(GRAPH_IO["encoder"][1]), opset,
                                "raw counts -> content latent, style mean, style log-variance", meta)

    g = _GraphBuilder()
    g.mlp("latent", dec, "dec", out="rates")
    graphs["decoder"] = g.model("swapvae_decoder", [("latent", latent_dim)], outs(GRAPH_IO["decoder"][1]), opset,
                                "latent [content, style] -> firing rates of the kept neurons", meta)

    g = _GraphBuilder()
    proba = g.readout("latent", ro, classes)
    x = g.op("MatMul", proba, g.const(np.cos(angles), "cos"))
    y = g.op("MatMul", proba, g.const(np.sin(angles), "sin"))
    g.atan2(y, x, out="angle")
    graphs["readout"] = g.model("swapvae_readout", [("latent", latent_dim)], outs(GRAPH_IO["readout"][1]), opset,
                                "latent [content, style mean] -> reach angle, class, class probabilities", meta)
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


def _run_graph(model: onnx.ModelProto, name: str, feed: dict, per_bin: bool = False) -> dict[str, np.ndarray]:
    """Outputs of ``model`` under plain ONNX Runtime; ``per_bin`` runs one bin per call (what a
    rig gets: an int8 graph quantizes its activations per call, so batching changes them)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        if not per_bin:
            return dict(zip(GRAPH_IO[name][1], sess.run(None, feed)))
        (key, x), = feed.items()
        rows = [sess.run(None, {key: x[i:i + 1]}) for i in range(len(x))]
        return {out: np.concatenate([r[j] for r in rows]) for j, out in enumerate(GRAPH_IO[name][1])}
    except Exception as e:  # ORT raises its own classes: say which graph and why
        raise ExportError(f"onnxruntime {ort.__version__} cannot run {name}.onnx: {e}") from None


def _decode_as_reference(out: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """decode.onnx outputs in the form of ``_reference``: what the engine must reproduce."""
    r = {key: v.astype(np.float64) if v.dtype.kind == "f" else v for key, v in out.items()}
    r["content"], r["style_mean"] = r["latent"][:, :k], r["latent"][:, k:]
    r["angle"] = np.arctan2(r["resultant"][:, 1], r["resultant"][:, 0])
    r["resultant_length"] = np.hypot(*r["resultant"].T)
    return r


def measure_quantization(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> Quantization:
    rel = lambda key: float(np.max(np.abs(got[key] - ref[key])) / max(np.max(np.abs(ref[key])), 1e-12))  # noqa: E731
    angle_err = np.abs(np.angle(np.exp(1j * (got["angle"] - ref["angle"]))))
    return Quantization(scheme="int8 weights per output channel: encoder layer 1 on whole counts (clipped at 127), "
                               "decoder layers 2-3 dynamically quantized; the rest fp32", n_bins=len(ref["latent"]), latent_err=rel("latent"),
                        rates_err=rel("rates"), proba_err=rel("proba"),
                        direction_agreement=float(np.mean(got["direction"] == ref["direction"])),
                        angle_err_p99_rad=float(np.percentile(angle_err, 99)))


# -- the export --------------------------------------------------------------------------------
def export_bundle(run_dir: str | Path, out: str | Path, opset: int = 17, weights: str = "fp32") -> BundleManifest:
    """Write ``run_dir`` as a bundle at ``out``, verified; return its manifest. ``weights="int8"``
    quantizes the served decode graph and fails unless it stays within INT8_LIMITS of fp32."""
    import onnxruntime

    if weights not in WEIGHTS:
        raise ExportError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    run_dir, out = Path(run_dir), Path(out)
    max_opset = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= max_opset:
        raise ExportError(f"--opset {opset}: supported here are {MIN_OPSET}..{max_opset} "
                          f"(and what onnxruntime {onnxruntime.__version__} runs)")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise ExportError(f"{out} exists and is not a bundle directory; refusing to overwrite it")
    est = SwapVAEEstimator.load(run_dir)
    if not (run_dir / "readout.json").exists():
        raise ExportError(f"{run_dir}: no readout.json (was the run evaluated?)")
    readout = load_readout(run_dir)
    cfg = est.config
    k, s = cfg.model.content_dim, cfg.model.style_dim
    n_dir = cfg.readout.n_directions
    classes = np.rint(readout.class_angles * n_dir / (2 * np.pi)).astype(np.int64)
    if not np.allclose(2 * np.pi * classes / n_dir, readout.class_angles):
        raise ExportError(f"readout class angles {readout.class_angles} are not multiples of 2 pi / {n_dir}")
    neurons = np.asarray(est.neurons_, dtype=np.int64)

    core = {"n_channels": est.n_channels_, "neurons": [int(i) for i in neurons], "bin_size_s": est.bin_size_s_,
            "input_unit": cfg.data.input_unit, "input_scale": est.input_scale,
            "input_transform": cfg.model.input_transform,
            "rates_unit": "hz" if cfg.data.input_unit == "hz" else "counts_per_bin", "content_dim": k, "style_dim": s,
            "direction": Direction(classes=tuple(int(c) for c in classes),
                                   angles_rad=tuple(float(a) for a in readout.class_angles)).model_dump(mode="json")}
    assert set(core) == set(CORE_FIELDS)
    enc = fold_sequential(est.model_.encoder.net)
    # sqrt(scale * x) = sqrt(scale) * sqrt(x): the scale still folds into the first layer
    scale = np.sqrt(est.input_scale) if cfg.model.input_transform == "sqrt" else est.input_scale
    enc[0] = fold_input(enc[0], neurons, est.n_channels_, scale)
    if weights == "int8" and cfg.model.input_transform != "identity":
        raise ExportError(f"int8 weights need whole counts into the first layer; input_transform "
                          f"{cfg.model.input_transform!r} is not supported with them: export with fp32 weights")
    graphs = build_graphs(enc, fold_sequential(est.model_.decoder.net), readout_affine(readout), core, opset, weights)
    run = _read_json(run_dir / "run.json")
    counts = _test_counts(run, est)
    quant = None
    if weights == "int8":
        graphs["decode"] = quantize_int8(graphs["decode"])
        got = _decode_as_reference(_run_graph(graphs["decode"], "decode", {"counts": counts}, per_bin=True), k)
        quant = measure_quantization(got, _reference(est, readout, counts))
        worse = [f"{key} {getattr(quant, key):.4g} (limit {lim})" for key, lim in INT8_LIMITS.items()
                 if (getattr(quant, key) < lim if key == "direction_agreement" else getattr(quant, key) > lim)]
        if worse:
            raise ExportError("the int8 decode graph is too far from the fp32 model on the test bins: " + ", ".join(worse)
                              + "; export with fp32 weights")

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it private; the bundle is for the rig to read
    try:
        files = {}
        for name, model in graphs.items():
            onnx.save_model(model, stage / f"{name}.onnx")
            files[f"{name}.onnx"] = sha256_file(stage / f"{name}.onnx")
        manifest = BundleManifest(
            created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"), **core,
            opset=opset, weights=weights, quantization=quant,
            graphs={n: GraphSpec(file=f"{n}.onnx", inputs=i, outputs=o) for n, (i, o) in GRAPH_IO.items()},
            files=files,
            training=TrainingInfo(config=cfg.model_dump(mode="json"), metrics=_read_json(run_dir / "metrics.json"),
                                  data=run.get("data"), session=run.get("session"), epochs_done=len(est.history_) or None),
            versions=_versions(),
        )
        (stage / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        verify_bundle(stage, est, readout, counts)
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return manifest


def verify_bundle(bundle: Path, est: SwapVAEEstimator, readout: Readout, counts: np.ndarray) -> None:
    """Every graph under plain ONNX Runtime, and the runtime engine (batched and one bin at a
    time), must reproduce the torch model and readout on ``counts``; raise ExportError if not.
    With int8 weights, decode.onnx was measured against the model before (``quantization`` in
    the manifest) and is the reference the engine must reproduce."""
    from runtime.engine import BundleDecoder

    manifest = BundleManifest.model_validate_json((bundle / MANIFEST).read_text())
    ref = _reference(est, readout, counts)
    latent = np.concatenate([ref["content"], ref["style_mean"]], axis=1).astype(np.float32)
    run = lambda name, feed, per_bin=False: _run_graph(onnx.load_model(bundle / f"{name}.onnx"), name, feed, per_bin)  # noqa: E731
    decoded = run("decode", {"counts": counts})
    n1 = min(len(counts), 32)
    if manifest.weights == "fp32":
        batched_ref = single_ref = ref
    else:  # int8 quantizes activations per call: a batch and single bins each have their reference
        k = manifest.content_dim
        batched_ref = _decode_as_reference(decoded, k)
        single_ref = _decode_as_reference(run("decode", {"counts": counts[:n1]}, per_bin=True), k)
    checks = [
        ("encoder.onnx", run("encoder", {"counts": counts}), ref),
        ("decoder.onnx", run("decoder", {"latent": latent}), ref),
        ("readout.onnx", run("readout", {"latent": latent}), ref),
        ("decode.onnx", decoded, batched_ref),
    ]
    engine = BundleDecoder(bundle)
    checks.append(("runtime engine, batched", engine.decode(counts).as_dict(), batched_ref))
    singles = [engine.decode(counts[i]).as_dict() for i in range(n1)]  # copies: batch-1 outputs are views
    checks.append(("runtime engine, one bin at a time",
                   {key: np.concatenate([o[key] for o in singles]) for key in singles[0]}, single_ref))
    problems = []
    for where, got, want in checks:
        n = len(next(iter(got.values())))
        problems += [f"{where}: {p}" for p in compare_outputs(got, {key: v[:n] for key, v in want.items()})]
    if problems:
        raise ExportError("the exported graphs do not reproduce the torch model:\n  " + "\n  ".join(problems))


def compare_outputs(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], tol: float = TOL) -> list[str]:
    """Mismatches beyond ``tol`` (absolute, relative above 1). The angle is compared as a point
    on the circle at the reference's resultant length (it is ill-defined where the class
    probabilities cancel out); the class only where the reference's top two differ by > tol."""
    problems = []
    for key, value in got.items():
        if key not in ref:
            continue
        r = ref[key]
        if value.shape != r.shape:
            problems.append(f"{key} has shape {value.shape}, expected {r.shape}")
        elif key == "direction":
            top2 = np.sort(ref["proba"], axis=1)[:, -2:]
            bad = (value != r) & (top2[:, 1] - top2[:, 0] > tol)
            if bad.any():
                problems.append(f"direction differs on {int(bad.sum())} of {len(r)} bins")
        elif key == "angle":
            err = np.abs(np.angle(np.exp(1j * (value.astype(np.float64) - r)))) * ref["resultant_length"]
            if not (err <= tol).all():
                problems.append(f"angle differs by up to {np.nanmax(err):.3g} (x resultant length)")
        else:
            err = np.abs(value.astype(np.float64) - r) / np.maximum(1.0, np.abs(r))
            if not (err <= tol).all():
                problems.append(f"{key} differs by up to {np.nanmax(err):.3g}")
    return problems


def _reference(est: SwapVAEEstimator, readout: Readout, counts: np.ndarray) -> dict[str, np.ndarray]:
    c, mu, logvar = (a.astype(np.float64) for a in est.encode(counts))
    z = np.concatenate([c, mu], axis=1)
    p = readout.proba(z)
    resultant = np.stack([p @ np.cos(readout.class_angles), p @ np.sin(readout.class_angles)], axis=1)
    classes = np.rint(readout.class_angles * est.config.readout.n_directions / (2 * np.pi)).astype(np.int64)
    return {"latent": z, "content": c, "style_mean": mu, "style_logvar": logvar,
            "rates": est.reconstruct(counts).astype(np.float64), "proba": p, "direction": classes[p.argmax(1)],
            "angle": readout.angle(z), "resultant": resultant, "resultant_length": np.hypot(*resultant.T),
            "count_min": counts.min(axis=1).astype(np.float64), "count_sum": counts.sum(axis=1, dtype=np.float64)}


def _test_counts(run: dict, est: SwapVAEEstimator) -> np.ndarray:
    """The run's test bins, plus an empty bin and a loud one (the extremes a rig can send)."""
    from training.data import load_session, split_session

    data = run.get("data")
    if not data:
        raise ExportError("run.json names no data: the export needs the run's test bins to verify itself")
    cfg = est.config
    try:
        session = load_session(data, min_trials=cfg.data.min_trials)
    except (ValueError, OSError) as e:
        raise ExportError(f"cannot load the run's data to verify the export: {e}") from None
    if session.n_neurons != est.n_channels_:
        raise ExportError(f"{data} has {session.n_neurons} channels but the model was trained on {est.n_channels_}")
    test = split_session(session, cfg.data.train_fraction, cfg.data.static_std).test.counts
    extremes = np.stack([np.zeros(est.n_channels_), 3 * test.max(axis=0)])
    return np.ascontiguousarray(np.concatenate([test, extremes]), dtype=np.float32)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _versions() -> dict[str, str]:
    v = {d: _version(d) for d in ("swapvae-bci", "torch", "onnx", "onnxruntime", "numpy", "scikit-learn")}
    v["python"] = platform.python_version()
    return v


def export_command(args) -> int:
    m = export_bundle(args.run_dir, args.out, opset=args.opset, weights=args.weights)
    print(f"bundle written to {args.out}: {m.n_channels} channels in ({m.n_neurons} kept), "
          f"latent {m.content_dim}+{m.style_dim}, {m.n_classes} directions, opset {m.opset}, {m.weights} weights")
    q = m.quantization
    if q is None:
        print(f"verified against the torch model within {TOL:g}")
    else:
        print(f"encoder/decoder/readout.onnx verified against the torch model within {TOL:g}, the engine against "
              f"the int8 decode.onnx within {TOL:g}; int8 vs fp32 on {q.n_bins} test bins, one bin per call: "
              f"direction agrees on {q.direction_agreement:.1%}, angle error p99 {q.angle_err_p99_rad:.3g} rad, "
              f"max error latent {q.latent_err:.2%}, rates {q.rates_err:.2%}, proba {q.proba_err:.2%} "
              f"(of each output's largest value)")
    return 0
