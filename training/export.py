"""``swapvae export RUN_DIR --out BUNDLE_DIR``: a trained run as an ONNX bundle the runtime serves.

The graphs come from ``training.graphs``; this module writes them with their manifest and
proves them against the torch model before anything is kept: ``onnx.checker`` on every
graph, and ONNX Runtime outputs (every graph, and the runtime engine itself) equal to the
torch model and readout on the run's test bins within 1e-4, or the export fails and leaves no
bundle behind. ``export_bundle`` reads as its steps.
"""
from __future__ import annotations

import hashlib
import platform
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx

from swapvae.runtime.bundle import SIGNATURE, load_private_key, sign_manifest
from swapvae.runtime.reach import classes_of_angles
from swapvae.schemas.manifest import (
    CORE_FIELDS,
    MANIFEST,
    BundleManifest,
    Direction,
    Evaluation,
    GraphSpec,
    Quantization,
    ReadoutSpec,
    TrainingInfo,
    graph_io,
)
from swapvae.schemas.session import source_of
from swapvae.training.estimator import SwapVAE
from swapvae.training.graphs import (
    Affine,
    ExportError,
    build_graphs,
    fold_input,
    fold_sequential,
    package_version,
    quantize_int8,
    readout_heads,
)
from swapvae.training.readout import Readout
from swapvae.training.rundir import RunDir
from swapvae.training.staging import refuse_existing, staged
from swapvae.training.verify import (
    TOL,
    CheckBins,
    check_bins,
    check_quantization,
    measure_quantization,
    reference,
    run_decode,
    verify_bundle,
)

MIN_OPSET = 13  # Slice/Split/Squeeze/Softmax/ArgMax semantics used here
WEIGHTS = ("fp32", "int8")


# -- the export --------------------------------------------------------------------------------
def export_bundle(run_dir: str | Path, out: str | Path, opset: int = 17, weights: str = "fp32",
                  sign: str | Path | None = None, data: str | None = None, other_session: bool = False,
                  force: bool = False) -> BundleManifest:
    """Write ``run_dir`` as a bundle at ``out``, verified; return its manifest. ``weights="int8"``
    quantizes the served decode graph and fails unless it stays within INT8_LIMITS of fp32.
    ``sign``: an Ed25519 private key file; the manifest is then signed (runtime/bundle.py).
    ``data``: where the run's recording is now (a run copied to another machine; its sha256
    must match unless ``other_session``): the export checks the graphs on its test bins. An
    existing ``out`` is refused unless ``force``, and then replaced once the new bundle is
    verified."""
    out = Path(out)
    _check_request(out, opset, weights, force)  # before the run is read
    run = RunDir(run_dir)
    if run.validation:
        raise ValueError(f"{run_dir} was trained and scored on a validation split of its training trials (to choose "
                         f"settings): train the chosen config with swapvae train to export it")
    loaded = run.load(data, other_session=other_session)
    est = loaded.estimator
    readout = run.readout() if loaded.session.has_labels else None
    source = source_of(data) if data is not None else run.source()
    info = training_info(est, metrics=run.metrics(), data=source["data"], data_sha256=source.get("data_sha256"),
                         session=loaded.session.name)
    return export_estimator(est, out, readout, check_bins(loaded.split), info, opset, weights, sign, force)


def export_estimator(est: SwapVAE, out: str | Path, readout: Readout | None, bins: CheckBins, info: TrainingInfo,
                     opset: int = 17, weights: str = "fp32", sign: str | Path | None = None,
                     force: bool = False) -> BundleManifest:
    """Write a fitted estimator (and the product ``readout``, or None: latents and rates only)
    as a bundle at ``out``, proved on ``bins`` as ``export_bundle`` does; ``info``: the
    manifest's training section (``training_info``). ``SwapVAE.export`` is this from Python."""
    key = load_private_key(sign) if sign is not None else None
    out = Path(out)
    _check_request(out, opset, weights, force)
    core = manifest_core(est, readout)
    graphs = build_graphs(*fold_model(est), readout_heads(readout) if readout else None, core, opset, weights)
    quant = None
    if weights == "int8":
        graphs["decode"], quant = quantize_checked(graphs["decode"], est, readout, bins)
    return write_bundle(out, graphs, core, info, opset, weights, quant, key,
                        verify=lambda stage: verify_bundle(stage, est, readout, bins, key), force=force)


def training_info(est: SwapVAE, metrics: dict | None = None, **where) -> TrainingInfo:
    """The manifest's training section for ``est``; ``where``: data, data_sha256, session."""
    cfg = est.config_
    evaluation = Evaluation(train_fraction=cfg.data.train_fraction, speed_threshold=cfg.readout.speed_threshold)
    return TrainingInfo(config=cfg.model_dump(mode="json"), metrics=metrics or {},
                        epochs_done=len(est.history_) or None, evaluation=evaluation, **where)


def _check_request(out: Path, opset: int, weights: str, force: bool) -> None:
    import onnxruntime

    if weights not in WEIGHTS:
        raise ExportError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    max_opset = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= max_opset:
        raise ExportError(f"--opset {opset}: supported here are {MIN_OPSET}..{max_opset} "
                          f"(and what onnxruntime {onnxruntime.__version__} runs)")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise ExportError(f"{out} exists and is not a bundle directory; refusing to overwrite it")
    refuse_existing(out, force, "bundle")


def manifest_core(est: SwapVAE, readout: Readout | None) -> dict:
    """The manifest's CORE_FIELDS: what a client sends and what the graphs compute."""
    cfg = est.config
    spec = None
    if readout is not None:
        try:
            classes = classes_of_angles(readout.class_angles, cfg.readout.n_directions)
        except ValueError as e:
            raise ExportError(f"readout: {e}") from None
        direction = Direction(classes=tuple(int(c) for c in classes),
                              angles_rad=tuple(float(a) for a in readout.class_angles))
        spec = ReadoutSpec(history_bins=readout.history_bins, direction=direction).model_dump(mode="json")
    core = {"n_channels": est.n_features_in_, "neurons": [int(i) for i in est.neurons_], "bin_size_s": est.bin_size_s_,
            "input_unit": cfg.data.input_unit, "input_scale": est.input_scale,
            "rates_unit": "hz" if cfg.data.input_unit == "hz" else "counts_per_bin",
            "content_dim": cfg.model.content_dim, "style_dim": cfg.model.style_dim, "readout": spec}
    assert set(core) == set(CORE_FIELDS)
    return core


def fold_model(est: SwapVAE) -> tuple[list[Affine], list[Affine]]:
    """The encoder and decoder as affine layers, the input selection and scale in the first."""
    enc = fold_sequential(est.model_.encoder.net)
    enc[0] = fold_input(enc[0], np.asarray(est.neurons_, dtype=np.int64), est.n_features_in_, est.input_scale)
    return enc, fold_sequential(est.model_.decoder.net)


def quantize_checked(decode: onnx.ModelProto, est: SwapVAE, readout: Readout | None,
                     bins: CheckBins) -> tuple[onnx.ModelProto, Quantization]:
    """The int8 decode graph and its measured distance from the fp32 model, one bin per call;
    ExportError beyond INT8_LIMITS."""
    q = quantize_int8(decode)
    k = readout.history_bins if readout else 1
    got = run_decode(q, bins, k, per_bin=True)
    got["content"] = got["latent"][:, :est.config_.model.content_dim]
    quant = measure_quantization(got, reference(est, readout, bins))
    check_quantization(quant)
    return q, quant


def write_bundle(out: Path, graphs: dict[str, onnx.ModelProto], core: dict, info: TrainingInfo, opset: int,
                 weights: str, quant: Quantization | None, key, verify, force: bool = False) -> BundleManifest:
    """Write the graphs and their manifest into a staging directory beside ``out``, run
    ``verify(stage)``, and only then move it to ``out`` in one rename (training.staging): a
    failed export leaves no bundle behind, a reader never sees half of one, and the bundle that
    was there stays until the new one is verified."""
    readout_spec = ReadoutSpec.model_validate(core["readout"]) if core["readout"] is not None else None
    with staged(out, force=force, what="bundle") as stage:
        files = {}
        for name, model in graphs.items():
            onnx.save_model(model, stage / f"{name}.onnx")
            files[f"{name}.onnx"] = sha256_file(stage / f"{name}.onnx")
        manifest = BundleManifest(
            created_utc=datetime.now(UTC).isoformat(timespec="seconds"), **core,
            opset=opset, weights=weights, quantization=quant,
            graphs={n: GraphSpec(file=f"{n}.onnx", inputs=i, outputs=o)
                    for n, (i, o) in graph_io(readout_spec).items()},
            files=files, training=info, versions=_versions())
        raw = manifest.model_dump_json(indent=2).encode()
        (stage / MANIFEST).write_bytes(raw)
        if key is not None:
            (stage / SIGNATURE).write_bytes(sign_manifest(raw, key))
        verify(stage)
    return manifest


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


def describe(m: BundleManifest) -> str:
    """What a bundle holds and how it was checked, in a line or two (``swapvae export`` prints it)."""
    r = m.readout
    readout = ("no readout (no reach labels): latents and rates" if r is None else
               f"{len(r.direction.classes)} directions{' and velocity' if r.velocity else ''} from the last "
               f"{r.history_bins} bins")
    text = (f"{m.n_channels} channels in ({m.n_neurons} kept), latent {m.content_dim}+{m.style_dim}, {readout}, "
            f"opset {m.opset}, {m.weights} weights\n")
    q = m.quantization
    if q is None:
        return text + f"verified against the torch model within {TOL:g}"
    return text + (f"encoder/decoder/readout.onnx verified against the torch model within {TOL:g}, the engine "
                   f"against the int8 decode.onnx within {TOL:g}; int8 vs fp32 on {q.n_bins} test bins, one bin per "
                   f"call: direction agrees on {q.direction_agreement:.1%}, angle error p99 {q.angle_err_p99_rad:.3g} "
                   f"rad, max error latent {q.latent_err:.2%}, rates {q.rates_err:.2%}, proba {q.proba_err:.2%} "
                   f"(of each output's largest value)")
