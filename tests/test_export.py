"""Export: the bundle's files and manifest, equality with the torch model, loud failures."""
import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError

from swapvae.cli import main as cli
from swapvae.runtime.history import causal_windows
from swapvae.schemas.config import SwapVAEConfig
from swapvae.schemas.manifest import BundleManifest, graph_io
from swapvae.schemas.session import split_session
from swapvae.training.data import load_session
from swapvae.training.estimator import SwapVAE
from swapvae.training.export import ExportError, export_bundle
from swapvae.training.model import SwapVAENet
from swapvae.training.readout import Readout
from swapvae.training.rundir import RunDir

TOL = 1e-4


def _test_bins(run_dir):
    est = RunDir(run_dir).estimator()
    cfg = est.config_
    return est, split_session(load_session("simulated"), cfg.data.train_fraction, cfg.data.static_std).test


def _close(got, ref, what):
    err = np.abs(got.astype(np.float64) - ref) / np.maximum(1.0, np.abs(ref))
    assert err.max() <= TOL, f"{what}: max error {err.max():.3g}"


def _sessions(bundle):
    return {g: ort.InferenceSession(str(bundle / f"{g}.onnx"), providers=["CPUExecutionProvider"])
            for g in graph_io(BundleManifest.model_validate_json((bundle / "manifest.json").read_text()).readout)}


def test_bundle_has_hashed_checked_graphs_with_dynamic_batch(tiny_bundle):
    m = BundleManifest.model_validate_json((tiny_bundle / "manifest.json").read_text())
    io = graph_io(m.readout)
    assert set(io) == {"decode", "encoder", "decoder", "readout"} and set(m.files) == {f"{g}.onnx" for g in io}
    assert io["decode"][0] == ("counts", "history", "first") and "velocity" in io["decode"][1]
    for name, digest in m.files.items():
        assert hashlib.sha256((tiny_bundle / name).read_bytes()).hexdigest() == digest
    for spec in m.graphs.values():
        model = onnx.load(tiny_bundle / spec.file)
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == list(spec.inputs)
        assert [o.name for o in model.graph.output] == list(spec.outputs)
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        assert model.opset_import[0].version == m.opset == 17
        assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"], "BatchNorm must be folded"
    assert m.n_channels == 120 and m.bin_size_s == 0.1 and m.input_scale == pytest.approx(10.0)  # Hz by default
    assert (m.content_dim, m.style_dim) == (8, 8) and m.readout.direction.classes == tuple(range(8))
    assert m.history_bins == 3 and m.velocity_dim == 2 and m.training.evaluation.train_fraction == 0.8
    assert m.training.config["model"]["content_dim"] == 8 and "reach_acc" in m.training.metrics
    assert {"torch", "onnx", "onnxruntime", "numpy"} <= set(m.versions)


def test_graphs_reproduce_the_torch_model_and_numpy_readout(tiny_run, tiny_bundle):
    """Each graph, run by plain ONNX Runtime, against the estimator and the numpy readout on the
    test bins' causal windows (the readout with history is part of the exported graph)."""
    est, test = _test_bins(tiny_run)
    counts = test.counts
    readout = RunDir(tiny_run).readout()
    sess = _sessions(tiny_bundle)
    c, mu, logvar = sess["encoder"].run(None, {"counts": counts})
    _, _, ref_logvar = est.encode(counts)
    _close(c, est.transform(counts, "content"), "content")
    _close(mu, est.transform(counts, "style"), "style mean")
    _close(logvar, ref_logvar, "style log-variance")
    z = np.concatenate([c, mu], axis=1)
    (rates,) = sess["decoder"].run(None, {"latent": z})
    _close(rates, est.reconstruct(counts), "rates")  # g([c, mu]): no sampling
    zf = est.transform(counts, "full").astype(np.float64)
    w = readout.windows(zf, test.trial)
    assert w.shape == (len(counts), 3 * 16)
    angle, direction, proba, velocity, resultant = sess["readout"].run(None, {"window": w.astype(np.float32)})
    _close(proba, readout.proba(w), "proba")
    _close(velocity, readout.velocity(w), "velocity")
    err = np.abs(np.angle(np.exp(1j * (angle - readout.angle(w)))))
    assert np.median(err) < TOL and np.mean(err < TOL) > 0.99
    np.testing.assert_array_equal(direction, readout.proba(w).argmax(1))
    first = np.r_[True, test.trial[1:] != test.trial[:-1]][:, None]
    out = dict(zip([o.name for o in sess["decode"].get_outputs()],
                   sess["decode"].run(None, {"counts": counts, "history": w[:, 16:].astype(np.float32),
                                             "first": first})))
    _close(out["latent"], zf, "fused latent")
    _close(out["rates"], rates, "fused rates")
    _close(out["proba"], proba, "fused proba")
    _close(out["velocity"], velocity, "fused velocity")
    _close(np.arctan2(out["resultant"][:, 1], out["resultant"][:, 0]), angle, "fused angle")
    np.testing.assert_array_equal(out["direction"], direction)
    np.testing.assert_array_equal(out["count_min"], counts.min(1))
    np.testing.assert_allclose(out["count_sum"], counts.sum(1), rtol=1e-6)
    # a first bin ignores whatever history it is given: its window is its own latent, repeated
    garbage = np.full_like(w[:, 16:], 1e3, dtype=np.float32)
    fresh = dict(zip([o.name for o in sess["decode"].get_outputs()],
                     sess["decode"].run(None, {"counts": counts, "history": garbage, "first": np.ones_like(first)})))
    _close(fresh["proba"], readout.proba(causal_windows(zf, np.arange(len(zf)), 3)), "fresh-window proba")


def _synthetic_run(path, *, input_unit="counts", content_dim=8, classes=(0, 1, 2, 3, 4, 5, 6, 7), seed=0,
                   history=2):
    """A run dir with random weights and non-trivial BatchNorm statistics, without training."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    variant = {"variant": "beta_vae"} if content_dim == 0 else {"model": {"content_dim": content_dim, "style_dim": 6,
                                                                          "hidden": ["d", 24]}}
    cfg = SwapVAEConfig.model_validate({**variant, "data": {"input_unit": input_unit}})
    if content_dim == 0:
        cfg = cfg.with_overrides(model={"content_dim": 0, "style_dim": 6, "hidden": ["d", 24]})
    est = SwapVAE(config=cfg)
    est.config_, est.neurons_ = cfg, np.sort(rng.choice(120, 90, replace=False))
    est.n_features_in_, est.bin_size_s_, est.channel_mean_ = 120, 0.1, np.zeros(120, np.float32)
    est.history_, est.train_seconds_ = [], float("nan")
    m = cfg.model
    est.model_ = SwapVAENet(90, m.hidden_sizes(90), m.content_dim, m.style_dim)
    for mod in est.model_.modules():
        if isinstance(mod, torch.nn.BatchNorm1d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 3)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.5, 0.5)
    est.model_.eval()
    run = RunDir.create(path, cfg, "simulated", "simulated")
    est.save(run.checkpoint)
    width = history * (m.content_dim + m.style_dim)
    n_cls = len(classes)
    run.save_readout(Readout(history, rng.normal(size=(n_cls, width)), rng.normal(size=n_cls),
                             2 * np.pi * np.asarray(classes) / 8, rng.normal(size=(2, width)), rng.normal(size=2),
                             0.1, 1.0))
    run.save_metrics({"reach_acc": 0.5})
    return est


@pytest.mark.parametrize("kind", ["hz_input_and_missing_classes", "no_content"])
def test_export_folds_preprocessing_and_batchnorm(tmp_path, kind):
    from swapvae.runtime.engine import BundleDecoder

    opts = {"hz_input_and_missing_classes": {"input_unit": "hz", "classes": (0, 2, 3, 5, 7), "history": 4},
            "no_content": {"content_dim": 0, "history": 1}}[kind]
    est = _synthetic_run(tmp_path / "run", **opts)
    manifest = export_bundle(tmp_path / "run", tmp_path / "bundle")
    assert manifest.neurons == tuple(est.neurons_.tolist()) and manifest.history_bins == opts.get("history", 2)
    counts = split_session(load_session("simulated")).test.counts[:50]
    out = BundleDecoder(tmp_path / "bundle").decode(counts, reset=True)  # 50 consecutive bins of one stream
    _close(out.rates, est.reconstruct(counts), "rates")
    z = est.transform(counts, "full").astype(np.float64)
    _close(np.concatenate([out.content, out.style_mean], 1), z, "latent")
    readout = RunDir(tmp_path / "run").readout()
    w = readout.windows(z, np.zeros(len(z)))
    ref = readout.proba(w)
    _close(out.proba, ref, "proba")
    _close(out.velocity, readout.velocity(w), "velocity")
    np.testing.assert_array_equal(out.direction, np.asarray(manifest.readout.direction.classes)[ref.argmax(1)])
    if kind.startswith("hz"):
        assert manifest.input_scale == pytest.approx(10.0) and manifest.rates_unit == "hz"
        assert manifest.readout.direction.classes == (0, 2, 3, 5, 7)
    else:
        assert out.content.shape == (50, 0)


def test_export_that_does_not_reproduce_torch_fails_and_leaves_nothing(tiny_run, tmp_path, monkeypatch):
    import swapvae.training.export as export

    real = export.readout_heads

    def off_by_a_bit(r):
        a = real(r)
        a.bias = a.bias + np.arange(len(a.bias)) * 1e-2
        return a
    monkeypatch.setattr(export, "readout_heads", off_by_a_bit)
    with pytest.raises(ExportError, match="proba differs"):
        export_bundle(tiny_run, tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []  # no bundle, no staging directory


def test_export_refuses_unknown_layers_and_bad_opset(tiny_run, tmp_path):
    from swapvae.training.export import fold_sequential

    with pytest.raises(ExportError, match="does not know how to write layer"):
        fold_sequential(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh()))
    with pytest.raises(ExportError, match="--opset 11"):
        export_bundle(tiny_run, tmp_path / "b", opset=11)
    (tmp_path / "notabundle").mkdir()
    (tmp_path / "notabundle" / "precious.txt").write_text("x")
    with pytest.raises(ExportError, match="not a bundle directory"):
        export_bundle(tiny_run, tmp_path / "notabundle")


def test_cli_export(tiny_run, tmp_path, capsys):
    assert cli(["export", str(tiny_run), "--out", str(tmp_path / "b"), "--opset", "18"]) == 0
    assert "verified against the torch model" in capsys.readouterr().out
    assert BundleManifest.model_validate_json((tmp_path / "b" / "manifest.json").read_text()).opset == 18
    assert cli(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_manifest_rejects_inconsistent_fields(tiny_bundle):
    good = json.loads((tiny_bundle / "manifest.json").read_text())
    BundleManifest.model_validate(good)
    bad = [
        ({"neurons": [3, 2]}, "sorted"),
        ({"neurons": [0, 120]}, "sorted"),
        ({"files": {**good["files"], "../escape.onnx": "0" * 64}}, "string_pattern_mismatch|pattern"),
        ({"files": {k: v for k, v in good["files"].items() if k != "decode.onnx"}}, "no sha256"),
        ({"readout": {**good["readout"], "direction": {"classes": [0, 1, 2], "angles_rad": [0.0, 1.0]}}},
         "3 classes but 2 angles"),
        ({"readout": {**good["readout"], "history_bins": 1}}, "graph 'decode': inputs/outputs"),
        ({"readout": None}, "graphs must be exactly"),
        ({"rates_unit": "counts_per_bin" if good["input_unit"] == "hz" else "hz"}, "does not match input_unit"),
        ({"format_version": 1}, "format_version"),
        ({"extra": 1}, "extra"),
    ]
    for change, message in bad:
        with pytest.raises(ValidationError, match=message):
            BundleManifest.model_validate({**good, **change})


def test_int8_export_quantizes_the_served_graph_and_records_its_error(tiny_run, tmp_path):
    from swapvae.runtime.engine import BundleDecoder

    m = export_bundle(tiny_run, tmp_path / "b8", weights="int8")
    assert m.weights == "int8" and m.quantization is not None
    q = m.quantization
    assert q.n_bins > 100 and q.direction_agreement >= 0.95 and q.latent_err <= 0.05 and q.rates_err <= 0.05
    assert q.latent_err > 0  # it did quantize: int8 is not exact
    ops = lambda g: {n.op_type for n in onnx.load(tmp_path / "b8" / f"{g}.onnx").graph.node}  # noqa: E731
    assert "MatMulInteger" in ops("decode") and "MatMulInteger" not in ops("encoder")  # the per-part graphs stay fp32
    # the readout stays fp32: the same latent gives the same direction through both bundles' readouts
    est, test = _test_bins(tiny_run)
    counts = test.counts
    out = BundleDecoder(tmp_path / "b8").decode(counts)
    ref = est.reconstruct(counts)
    assert np.abs(out.rates - ref).max() <= 0.05 * np.abs(ref).max()


def test_int8_export_beyond_its_limits_fails_and_leaves_nothing(tiny_run, tmp_path, monkeypatch):
    import swapvae.training.verify as verify

    monkeypatch.setitem(verify.INT8_LIMITS, "latent_err", 0.0)
    with pytest.raises(ExportError, match="too far.*latent_err"):
        export_bundle(tiny_run, tmp_path / "bundle", weights="int8")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ExportError, match="weights must be one of"):
        export_bundle(tiny_run, tmp_path / "bundle", weights="fp16")


def test_label_free_run_exports_latents_and_rates_only(tmp_path, capsys):
    """Counts and trials are enough: no readout is fitted, the bundle says so, the engine
    serves latents and rates and gives None for the readout's outputs."""
    from swapvae.runtime.engine import BundleDecoder
    from swapvae.schemas.session import write_npz
    from swapvae.training.run import train_run
    from swapvae.training.simulate import simulate_reaching

    s = simulate_reaching(n_neurons=30, n_trials=40, seed=2)
    data = write_npz(type(s)(s.counts, s.trial, s.bin_in_trial, bin_size_s=s.bin_size_s, name="unlabelled"),
                     tmp_path / "unlabelled.npz")
    cfg = SwapVAEConfig.model_validate({"device": "cpu",
                                        "model": {"content_dim": 4, "style_dim": 4, "hidden": ["d", 16]},
                                        "optim": {"epochs": 2, "batch_size": 64}})
    metrics = train_run(str(data), tmp_path / "run", cfg, progress=False)
    assert "reach_acc" not in metrics and "no reach labels" in metrics["readout"]
    assert np.isfinite(metrics["bits_per_spike"])  # what a session without labels gets: the held-out fit
    m = export_bundle(tmp_path / "run", tmp_path / "bundle")
    assert m.readout is None and set(m.graphs) == {"decode", "encoder", "decoder"} and m.n_classes == 0
    dec = BundleDecoder(tmp_path / "bundle")
    out = dec.decode(s.counts[0]).copy()
    assert out.angle is None and out.direction is None and out.proba is None and out.velocity is None
    assert out.rates.shape == (1, m.n_neurons) and out.content.shape == (1, 4)

    # served: the reply has no readout sections and says so; a replay measures the latency alone
    from swapvae.cli import main
    from swapvae.runtime import wire
    from swapvae.runtime.serve.server import Server
    from swapvae.schemas.protocol import InfoReply, MsgType

    server = Server(dec, bind=None, sub="inproc://label-free-sub", pub="inproc://label-free-pub", warmup=0)
    try:
        head, body = wire.parse_reply(server.handle(wire.pack_request(MsgType.DECODE, 1, 0, s.counts[0], flags=1),
                                                    b"c"))
        info = InfoReply.model_validate_json(bytes(wire.parse_reply(server.handle(wire.pack_request(MsgType.INFO)))[1]))
    finally:
        server.close()
    assert head.msg_type == MsgType.DECODE_REPLY and head.flags == wire.RESET_APPLIED  # no HAS_READOUT
    assert (head.n_classes, head.velocity_dim, head.history_bins) == (0, 0, 0)
    arrays = wire.decode_arrays(head, body)
    assert arrays["angle"] is None and arrays["velocity"] is None
    np.testing.assert_array_equal(arrays["rates"], out.rates)
    assert not info.has_readout and info.history_bins == 0
    from test_server import Running

    served = Server(BundleDecoder(tmp_path / "bundle"), bind="tcp://127.0.0.1:*", warmup=0)
    loop = Running(served)
    try:
        capsys.readouterr()
        assert main(["replay", str(tmp_path / "bundle"), "--endpoint", served.endpoints["router"], "--json"]) == 0
    finally:
        loop.stop()
        served.close()
    r = json.loads(capsys.readouterr().out)
    assert "no readout" in r["scores"] and r["n_bins"] > 0 and r["latency_us"]["p50"] > 0 and "reach_acc" not in r


def test_manifest_int8_weights_need_a_quantization_record(tiny_bundle):
    good = json.loads((tiny_bundle / "manifest.json").read_text())
    assert good["weights"] == "fp32" and good["quantization"] is None
    with pytest.raises(ValidationError, match="go together"):
        BundleManifest.model_validate({**good, "weights": "int8"})
