"""``swapvae export RUN_DIR --out BUNDLE_DIR``: a trained run as an ONNX bundle the runtime serves.

The graphs come from ``training.graphs``; this module writes them with their manifest and
proves them against the torch model before anything is kept: ``onnx.checker`` on every
graph, and ONNX Runtime outputs (every graph, and the runtime engine itself) equal to the
torch model and readout on the run's test bins within 1e-4, or the export fails and leaves no
bundle behind. ``export_bundle`` reads as its steps.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx

from runtime.reach import classes_of_angles, resultant
from schemas.manifest import (CORE_FIELDS, GRAPH_IO, MANIFEST, BundleManifest, Direction, Evaluation, GraphSpec,
                              Quantization, TrainingInfo)
from schemas.session import Split
from training.estimator import SwapVAEEstimator
from training.evaluate import Readout
from training.graphs import (Affine, ExportError, build_graphs, fold_input, fold_sequential, package_version,
                             quantize_int8, readout_affine)
from training.rundir import RunDir

MIN_OPSET = 13  # Slice/Softmax/ArgMax semantics used here
TOL = 1e-4
WEIGHTS = ("fp32", "int8")
# How close an int8 decode graph must stay to the fp32 model on the run's test bins (errors
# relative to each output's largest value); beyond this the export fails.
INT8_LIMITS = {"latent_err": 0.05, "rates_err": 0.05, "proba_err": 0.1, "direction_agreement": 0.95}


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
    out = Path(out)
    _check_request(out, opset, weights)
    run = RunDir(run_dir)
    loaded, readout = run.load(), run.readout()
    est = loaded.estimator
    core = manifest_core(est, readout)
    graphs = build_graphs(*fold_model(est), readout_affine(readout), core, opset, weights)
    counts = check_counts(loaded.split)
    quant = None
    if weights == "int8":
        graphs["decode"], quant = quantize_checked(graphs["decode"], est, readout, counts)
    info = TrainingInfo(config=est.config.model_dump(mode="json"), metrics=run.metrics(),
                        data=run.source()["data"],
                        session=loaded.session.name, epochs_done=len(est.history_) or None,
                        evaluation=Evaluation(train_fraction=est.config.data.train_fraction,
                                              speed_threshold=est.config.readout.speed_threshold))
    return write_bundle(out, graphs, core, info, opset, weights, quant,
                        verify=lambda stage: verify_bundle(stage, est, readout, counts))


def _check_request(out: Path, opset: int, weights: str) -> None:
    import onnxruntime

    if weights not in WEIGHTS:
        raise ExportError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    max_opset = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= max_opset:
        raise ExportError(f"--opset {opset}: supported here are {MIN_OPSET}..{max_opset} "
                          f"(and what onnxruntime {onnxruntime.__version__} runs)")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise ExportError(f"{out} exists and is not a bundle directory; refusing to overwrite it")


def manifest_core(est: SwapVAEEstimator, readout: Readout) -> dict:
    """The manifest's CORE_FIELDS: what a client sends and what the graphs compute."""
    cfg = est.config
    try:
        classes = classes_of_angles(readout.class_angles, cfg.readout.n_directions)
    except ValueError as e:
        raise ExportError(f"readout: {e}") from None
    core = {"n_channels": est.n_channels_, "neurons": [int(i) for i in est.neurons_], "bin_size_s": est.bin_size_s_,
            "input_unit": cfg.data.input_unit, "input_scale": est.input_scale,
            "input_transform": cfg.model.input_transform,
            "rates_unit": "hz" if cfg.data.input_unit == "hz" else "counts_per_bin",
            "content_dim": cfg.model.content_dim, "style_dim": cfg.model.style_dim,
            "direction": Direction(classes=tuple(int(c) for c in classes),
                                   angles_rad=tuple(float(a) for a in readout.class_angles)).model_dump(mode="json")}
    assert set(core) == set(CORE_FIELDS)
    return core


def fold_model(est: SwapVAEEstimator) -> tuple[list[Affine], list[Affine]]:
    """The encoder and decoder as affine layers, the input selection and scale in the first."""
    cfg = est.config
    enc = fold_sequential(est.model_.encoder.net)
    # sqrt(scale * x) = sqrt(scale) * sqrt(x): the scale still folds into the first layer
    scale = np.sqrt(est.input_scale) if cfg.model.input_transform == "sqrt" else est.input_scale
    enc[0] = fold_input(enc[0], np.asarray(est.neurons_, dtype=np.int64), est.n_channels_, scale)
    return enc, fold_sequential(est.model_.decoder.net)


def check_counts(split: Split) -> np.ndarray:
    """What the export is verified on: the run's test bins, plus an empty bin and a loud one
    (the extremes a rig can send)."""
    test = split.test.counts
    extremes = np.stack([np.zeros(test.shape[1]), 3 * test.max(axis=0)])
    return np.ascontiguousarray(np.concatenate([test, extremes]), dtype=np.float32)


def quantize_checked(decode: onnx.ModelProto, est: SwapVAEEstimator, readout: Readout,
                     counts: np.ndarray) -> tuple[onnx.ModelProto, Quantization]:
    """The int8 decode graph and its measured distance from the fp32 model, one bin per call;
    ExportError beyond INT8_LIMITS."""
    if est.config.model.input_transform != "identity":
        raise ExportError(f"int8 weights need whole counts into the first layer; input_transform "
                          f"{est.config.model.input_transform!r} is not supported with them: export with fp32 weights")
    q = quantize_int8(decode)
    got = _decode_as_reference(_run_graph(q, "decode", {"counts": counts}, per_bin=True), est.config.model.content_dim)
    quant = measure_quantization(got, _reference(est, readout, counts))
    worse = [f"{key} {getattr(quant, key):.4g} (limit {lim})" for key, lim in INT8_LIMITS.items()
             if (getattr(quant, key) < lim if key == "direction_agreement" else getattr(quant, key) > lim)]
    if worse:
        raise ExportError("the int8 decode graph is too far from the fp32 model on the test bins: " + ", ".join(worse)
                          + "; export with fp32 weights")
    return q, quant


def write_bundle(out: Path, graphs: dict[str, onnx.ModelProto], core: dict, info: TrainingInfo, opset: int,
                 weights: str, quant: Quantization | None, verify) -> BundleManifest:
    """Write the graphs and their manifest into a staging directory beside ``out``, run
    ``verify(stage)``, and only then move it to ``out`` in one rename: a failed export leaves
    no bundle behind, and a reader never sees half of one."""
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
            files=files, training=info, versions=_versions())
        (stage / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        verify(stage)
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
    r = resultant(p, readout.class_angles)
    classes = classes_of_angles(readout.class_angles, est.config.readout.n_directions)
    return {"latent": z, "content": c, "style_mean": mu, "style_logvar": logvar,
            "rates": est.reconstruct(counts).astype(np.float64), "proba": p, "direction": classes[p.argmax(1)],
            "angle": readout.angle(z), "resultant": r, "resultant_length": np.hypot(*r.T),
            "count_min": counts.min(axis=1).astype(np.float64), "count_sum": counts.sum(axis=1, dtype=np.float64)}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    v = {d: package_version(d) for d in ("swapvae-bci", "torch", "onnx", "onnxruntime", "numpy", "scikit-learn")}
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
