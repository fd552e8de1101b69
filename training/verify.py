"""Proving a bundle against the model it came from, before the export keeps it.

The reference is the torch model and the numpy readout on the run's test bins (plus an empty
bin and a loud one), each trial a stream: windows by ``runtime.history.causal_windows``. Every
graph under plain ONNX Runtime, and the runtime engine itself (a trial at a time, and one bin
at a time with a reset at each trial start), must reproduce it within ``TOL``. An int8 decode
graph is first measured against the reference (``measure_quantization``) and then is itself
the reference the engine must reproduce.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from swapvae.runtime.bundle import read_manifest
from swapvae.runtime.history import StreamHistory, causal_windows
from swapvae.runtime.reach import angular_error, classes_of_angles, resultant
from swapvae.schemas.manifest import Quantization, graph_io
from swapvae.schemas.session import Split
from swapvae.training.estimator import SwapVAE
from swapvae.training.graphs import ExportError
from swapvae.training.readout import Readout

TOL = 1e-4
# How close an int8 decode graph must stay to the fp32 model on the run's test bins (errors
# relative to each output's largest value); beyond this the export fails.
INT8_LIMITS = {"latent_err": 0.05, "rates_err": 0.05, "proba_err": 0.1, "direction_agreement": 0.95}


@dataclass(frozen=True)
class CheckBins:
    counts: np.ndarray  # (n, n_channels) float32
    trial: np.ndarray  # (n,) each trial one stream, in order

    @property
    def starts(self) -> np.ndarray:
        """Whether each bin begins its trial (a reset)."""
        return np.r_[True, self.trial[1:] != self.trial[:-1]]


def check_bins(split: Split) -> CheckBins:
    """The run's test bins, plus an empty bin and a loud one as trials of their own."""
    return check_bins_of(split.test.counts, split.test.trial)


def check_bins_of(counts: np.ndarray, trial: np.ndarray | None = None) -> CheckBins:
    """``counts`` (bins in order, ``trial`` each one's trial; one trial if None), plus an empty
    bin and a loud one as trials of their own (the extremes a rig can send)."""
    counts = np.asarray(counts, np.float32)
    trial = np.zeros(len(counts), np.int64) if trial is None else np.asarray(trial)
    extremes = np.stack([np.zeros(counts.shape[1]), 3 * counts.max(axis=0)])
    last = int(trial.max())
    return CheckBins(np.ascontiguousarray(np.concatenate([counts, extremes]), dtype=np.float32),
                     np.r_[trial, last + 1, last + 2])


def reference(est: SwapVAE, readout: Readout | None, bins: CheckBins) -> dict[str, np.ndarray]:
    """What every graph and the engine must reproduce: torch model and numpy readout."""
    c, mu, logvar = (a.astype(np.float64) for a in est.encode(bins.counts))
    z = np.concatenate([c, mu], axis=1)
    counts = bins.counts
    ref = {"latent": z, "content": c, "style_mean": mu, "style_logvar": logvar,
           "rates": est.reconstruct(counts).astype(np.float64),
           "count_min": counts.min(axis=1).astype(np.float64), "count_sum": counts.sum(axis=1, dtype=np.float64)}
    if readout is not None:
        w = readout.windows(z, bins.trial)
        p = readout.proba(w)
        r = resultant(p, readout.class_angles)
        classes = classes_of_angles(readout.class_angles, est.config_.readout.n_directions)
        ref.update(window=w, proba=p, direction=classes[p.argmax(1)], angle=readout.angle(w), resultant=r,
                   resultant_length=np.hypot(*r.T), velocity=readout.velocity(w))
    return ref


def _session(model: onnx.ModelProto, name: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own classes: say which graph and why
        raise ExportError(f"cannot load {name}.onnx in onnxruntime: {e}") from None


def run_graph(model: onnx.ModelProto, name: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All outputs of one graph by name, under plain ONNX Runtime."""
    sess = _session(model, name)
    try:
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    except Exception as e:
        raise ExportError(f"onnxruntime cannot run {name}.onnx: {e}") from None


def run_decode(model: onnx.ModelProto, bins: CheckBins, history_bins: int, per_bin: bool) -> dict[str, np.ndarray]:
    """The decode graph over ``bins``, each trial a stream, histories from its own latents:
    one bin per call (what a rig gets: an int8 graph quantizes its activations per call), or a
    whole batch (latents first, then the readout with the windows they make)."""
    sess = _session(model, "decode")
    names = [o.name for o in sess.get_outputs()]
    latent_dim = sess.get_outputs()[0].shape[1]
    has_history = history_bins > 1 and len(sess.get_inputs()) > 1

    def feed(x, history, first):
        f = {"counts": x}
        if has_history:
            f.update(history=history, first=first)
        return f

    if per_bin:
        rows, stream = [], StreamHistory(history_bins, latent_dim)
        for x, start in zip(bins.counts, bins.starts):
            if start:
                stream.reset()
            out = sess.run(None, feed(x[None], stream.row[None], np.array([[stream.fresh]])))
            stream.push(out[0][0])
            rows.append(out)
        out = {k: np.concatenate([r[j] for r in rows]) for j, k in enumerate(names)}
    else:
        n = len(bins.counts)
        first = np.ones((n, 1), bool)
        latent = sess.run(["latent"], feed(bins.counts, np.zeros((n, (history_bins - 1) * latent_dim), np.float32),
                                           first))[0]
        past = causal_windows(latent, bins.trial, history_bins)[:, latent_dim:]
        out = dict(zip(names, sess.run(None, feed(bins.counts, np.ascontiguousarray(past), bins.starts[:, None]))))
    return as_reference(out, latent_dim)


def as_reference(out: dict[str, np.ndarray], latent_dim: int, content_dim: int | None = None) -> dict[str, np.ndarray]:
    """decode.onnx outputs in the form of ``reference``."""
    r = {key: v.astype(np.float64) if v.dtype.kind == "f" else v for key, v in out.items()}
    if content_dim is not None:
        r["content"], r["style_mean"] = r["latent"][:, :content_dim], r["latent"][:, content_dim:]
    if "resultant" in r:
        r["angle"] = np.arctan2(r["resultant"][:, 1], r["resultant"][:, 0])
        r["resultant_length"] = np.hypot(*r["resultant"].T)
    return r


def measure_quantization(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> Quantization:
    rel = lambda key: float(np.max(np.abs(got[key] - ref[key])) / max(np.max(np.abs(ref[key])), 1e-12))  # noqa: E731
    has_readout = "proba" in ref
    angle_err = angular_error(got["angle"], ref["angle"]) if has_readout else np.zeros(1)
    return Quantization(scheme="int8 weights per output channel: encoder layer 1 on whole counts (clipped at 127), "
                               "decoder layers 2-3 dynamically quantized; the rest fp32", n_bins=len(ref["latent"]),
                        latent_err=rel("latent"), rates_err=rel("rates"),
                        proba_err=rel("proba") if has_readout else 0.0,
                        direction_agreement=(float(np.mean(got["direction"] == ref["direction"])) if has_readout
                                             else 1.0),
                        angle_err_p99_rad=float(np.percentile(angle_err, 99)))


def check_quantization(quant: Quantization) -> None:
    worse = [f"{key} {getattr(quant, key):.4g} (limit {lim})" for key, lim in INT8_LIMITS.items()
             if (getattr(quant, key) < lim if key == "direction_agreement" else getattr(quant, key) > lim)]
    if worse:
        raise ExportError("the int8 decode graph is too far from the fp32 model on the test bins: " + ", ".join(worse)
                          + "; export with fp32 weights")


def verify_bundle(bundle: Path, est: SwapVAE, readout: Readout | None, bins: CheckBins,
                  key=None) -> None:
    """Every graph under plain ONNX Runtime, and the runtime engine (a trial per call, and one
    bin per call; trusting only ``key``'s public half when the bundle is signed), must
    reproduce the reference on ``bins``; raise ExportError if not."""
    from swapvae.runtime.engine import BundleDecoder

    manifest = read_manifest(bundle)
    k_hist, L, k = manifest.history_bins, manifest.latent_dim, manifest.content_dim
    ref = reference(est, readout, bins)
    load = lambda name: onnx.load_model(bundle / f"{name}.onnx")  # noqa: E731
    decode = load("decode")
    batched = run_decode(decode, bins, k_hist, per_bin=False)
    trials = [CheckBins(bins.counts[bins.trial == t], bins.trial[bins.trial == t]) for t in np.unique(bins.trial)]
    if manifest.weights == "fp32":
        batched_ref = trial_ref = single_ref = ref
    else:  # int8 quantizes activations per call: each batching has its own reference
        batched_ref = as_reference(batched, L, k)
        trial_ref = as_reference(_concat([run_decode(decode, t, k_hist, per_bin=False) for t in trials]), L, k)
        single_ref = as_reference(run_decode(decode, _first(bins, 32), k_hist, per_bin=True), L, k)
    latent = ref["latent"].astype(np.float32)
    checks = [("encoder.onnx", run_graph(load("encoder"), "encoder", {"counts": bins.counts}), ref),
              ("decoder.onnx", run_graph(load("decoder"), "decoder", {"latent": latent}), ref),
              ("decode.onnx", batched, batched_ref)]
    if "readout" in graph_io(manifest.readout):
        checks.append(("readout.onnx", run_graph(load("readout"), "readout",
                                                 {"window": ref["window"].astype(np.float32)}), ref))
    engine = BundleDecoder(bundle, trusted=[key.public_key()] if key is not None else None)
    by_trial = [engine.decode(t.counts, reset=True).as_dict() for t in trials]
    checks.append(("runtime engine, a trial per call", _concat(by_trial), trial_ref))
    few = _first(bins, 32)
    singles = [engine.decode(x, reset=bool(s)).as_dict() for x, s in zip(few.counts, few.starts)]  # copies
    checks.append(("runtime engine, one bin at a time", _concat(singles), single_ref))
    problems = []
    for where, got, want in checks:
        n = len(next(iter(got.values())))
        problems += [f"{where}: {p}" for p in compare_outputs(got, {key: v[:n] for key, v in want.items()})]
    if problems:
        raise ExportError("the exported graphs do not reproduce the torch model:\n  " + "\n  ".join(problems))


def _first(bins: CheckBins, n: int) -> CheckBins:
    return CheckBins(bins.counts[:n], bins.trial[:n])


def _concat(outs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([o[key] for o in outs]) for key in outs[0] if outs[0][key] is not None}


def compare_outputs(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], tol: float = TOL) -> list[str]:
    """Mismatches beyond ``tol`` (absolute, relative above 1). The angle is compared as a point
    on the circle at the reference's resultant length (it is ill-defined where the class
    probabilities cancel out); the class only where the reference's top two differ by > tol."""
    problems = []
    for key, value in got.items():
        if key not in ref or value is None:
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
            err = angular_error(value, r) * ref["resultant_length"]
            if not (err <= tol).all():
                problems.append(f"angle differs by up to {np.nanmax(err):.3g} (x resultant length)")
        else:
            err = np.abs(value.astype(np.float64) - r) / np.maximum(1.0, np.abs(r))
            if not (err <= tol).all():
                problems.append(f"{key} differs by up to {np.nanmax(err):.3g}")
    return problems
