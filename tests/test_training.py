"""Training end to end on small simulated sessions: learning, determinism, checkpoints, NaN."""
import json
import time

import numpy as np
import pytest
import torch

from swapvae.cli import main as cli
from swapvae.schemas import SwapVAEConfig
from swapvae.schemas.session import split_session
from swapvae.training.estimator import SwapVAE, TrainingDiverged
from swapvae.training.evaluate import evaluate
from swapvae.training.model import SwapVAENet
from swapvae.training.simulate import simulate_reaching

FAST = {"optim": {"epochs": 3, "batch_size": 64}}


@pytest.fixture(scope="module")
def split():
    return split_session(simulate_reaching(n_neurons=100, n_trials=100, seed=1))


def _fit(split, config, **kw):
    return SwapVAE(config=config).fit(split.train.counts, trial=split.train.trial,
                                               bin_in_trial=split.train.bin_in_trial, neurons=split.neurons, **kw)


@pytest.mark.parametrize("dropout_max", [0.0, 0.3])
def test_short_training_learns_direction(split, dropout_max):
    # counts make the KL term strong relative to reconstruction within this short schedule, so
    # the style block stays nearly free of direction and the content/style split is testable
    config = SwapVAEConfig.model_validate({"optim": {"epochs": 30, "batch_size": 128, "lr": 2e-3},
                                           "data": {"input_unit": "counts", "dropout_max": dropout_max}})
    est = _fit(split, config)
    metrics, _ = evaluate(est, split, config.readout)
    # chance is 1/8; an untrained network of this size scores about 0.5 on this session
    assert metrics["reach_acc_content"] > 0.55, metrics
    assert metrics["reach_acc_content"] > metrics["reach_acc_style"] + 0.1, metrics  # direction lives in content
    first, last = est.history_[0], est.history_[-1]
    assert last["align"] < 0.5 * first["align"] and last["rec"] < first["rec"]


def _same_bits(a, b) -> list[str]:
    sb = b.model_.state_dict()
    return [k for k, v in a.model_.state_dict().items() if not torch.equal(v, sb[k])]


def _fixed(threads: int, **optim) -> SwapVAEConfig:
    # dropout on: its random draws must be reproducible too
    return SwapVAEConfig.model_validate({"optim": {**FAST["optim"], "batch_size": 256, "cpu_threads": threads, **optim},
                                         "data": {"dropout_max": 0.3}, "device": "cpu"})


@pytest.mark.parametrize("threads", [1, 2])
def test_same_seed_same_bits_at_a_fixed_thread_count(split, threads):
    """What holds on every CPU: at one thread count a seed trains the same bits (batches of
    256 pairs, so BLAS does split work across 2 threads here)."""
    config = _fixed(threads)
    a, b = _fit(split, config), _fit(split, config)
    assert _same_bits(a, b) == []
    assert [h["threads"] for h in a.history_] == [threads] * 3
    c = _fit(split, config.with_overrides(seed=1))
    assert not torch.equal(a.model_.encoder.net[0].weight, c.model_.encoder.net[0].weight)


def test_chosen_thread_count_trains_the_run_of_that_fixed_count(split):
    """cpu_threads = 0 times a few steps on a scratch copy, then trains at one count: the run
    is exactly the fixed-count run at the count it records, whatever the timing chose."""
    tuned = _fit(split, _fixed(0))
    counts = {h["threads"] for h in tuned.history_}
    assert len(counts) == 1 and counts <= {1, torch.get_num_threads()}
    assert _same_bits(tuned, _fit(split, _fixed(counts.pop()))) == []


def test_thread_counts_agree_to_rounding(split):
    """Across thread counts BLAS may sum a batch in another order (it does on AVX-512 Xeons
    with MKL): one step then differs by float rounding, nothing more."""
    if torch.get_num_threads() < 2 and (torch.set_num_threads(2) or torch.get_num_threads() < 2):
        pytest.skip("torch cannot run 2 threads here")
    x = torch.as_tensor(split.train.counts[:, split.neurons] * 10)
    before, grads = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            model = SwapVAENet(x.shape[1], [x.shape[1], 128])
            model.loss(x[:256], x[256:512])["loss"].backward()  # the decoder's batch is 1536 rows
            grads.append({k: p.grad for k, p in model.named_parameters()})
    finally:
        torch.set_num_threads(before)
    scale = max(g.abs().max().item() for g in grads[0].values())  # biases before a BatchNorm get ~0
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=1e-5, atol=1e-5 * scale, msg=k)


def test_choose_threads_keeps_the_faster_choice():
    from swapvae.training.estimator import choose_threads

    def timed(cost):
        def step():
            time.sleep(cost[torch.get_num_threads()])
        return step

    before = torch.get_num_threads()
    try:
        assert choose_threads(timed({2: 0.002, 1: 0.02}), (2, 1)) == 2
        assert choose_threads(timed({2: 0.02, 1: 0.002}), (2, 1)) == 1
        assert choose_threads(timed({2: 0.010, 1: 0.0099}), (2, 1)) == 2  # a tie keeps all cores
    finally:
        torch.set_num_threads(before)


def test_checkpoint_roundtrip_is_safe_and_exact(split, tmp_path):
    est = _fit(split, SwapVAEConfig.model_validate(FAST), checkpoint=tmp_path / "c.pt")
    torch.load(tmp_path / "c.pt", weights_only=True)  # no pickled objects inside
    again = SwapVAE.load(tmp_path / "c.pt")
    assert np.array_equal(again.neurons_, split.neurons)
    np.testing.assert_allclose(again.transform(split.test.counts), est.transform(split.test.counts), atol=1e-6)
    np.testing.assert_allclose(again.reconstruct(split.test.counts), est.reconstruct(split.test.counts), atol=1e-5)
    assert len(again.history_) == 3
    with pytest.raises(ValueError, match="X has 10 features, but SwapVAE is expecting 100"):
        again.transform(split.test.counts[:, :10])


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(split, tmp_path, monkeypatch):
    config = SwapVAEConfig.model_validate({"optim": {"epochs": 6, "batch_size": 64, "checkpoint_every": 2,
                                                     "cpu_threads": 1}})
    real_loss, calls = SwapVAENet.loss, []
    steps_per_epoch = len(split.train.counts) // 64

    def poisoned(self, *a, **kw):
        out = real_loss(self, *a, **kw)
        calls.append(1)
        if len(calls) > 3 * steps_per_epoch:  # epoch 4 goes bad
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(SwapVAENet, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"non-finite in epoch 4.*last good checkpoint"):
        _fit(split, config, checkpoint=tmp_path / "c.pt")
    kept = SwapVAE.load(tmp_path / "c.pt")  # the epoch-2 checkpoint, intact and finite
    assert len(kept.history_) == 2
    assert all(torch.isfinite(v).all() for v in kept.model_.state_dict().values() if v.is_floating_point())


@pytest.mark.slow
def test_cli_train_and_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"optim": {"epochs": 2, "batch_size": 64}}))
    assert cli(["train", "--data", "simulated", "--out", str(out), "--config", str(cfg), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("reach_acc", "reach_delta_acc", "history_bins", "reach_acc_per_bin", "reach_delta_acc_per_bin",
                "reach_acc_content", "reach_acc_style", "raw_reach_acc", "raw_reach_delta_acc", "raw_history_bins",
                "velocity_r2", "raw_velocity_r2", "train_seconds"):
        assert key in metrics, key
    assert 0.0 <= metrics["reach_acc"] <= 1.0
    for name in ("checkpoint.pt", "config.json", "readout.json", "history.json", "run.json"):
        assert (out / name).exists(), name
    capsys.readouterr()
    assert cli(["evaluate", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    for key in ("reach_acc", "velocity_r2", "raw_reach_acc", "raw_velocity_r2"):  # same split, model, readout
        assert again[key] == pytest.approx(metrics[key]), key
    assert cli(["evaluate", str(out)]) == 0
    table = capsys.readouterr().out
    assert "causal history" in table and "per bin (paper)" in table and "raw rates" in table


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    assert cli(["train", "--data", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "r")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optim": {"lr": -1}}))
    assert cli(["train", "--out", str(tmp_path / "r"), "--config", str(bad)]) == 2
    assert "lr" in capsys.readouterr().err


def test_training_thread_setting_is_scoped(split):
    before = torch.get_num_threads()
    config = SwapVAEConfig.model_validate({**FAST, "optim": {**FAST["optim"], "cpu_threads": 1}})
    _fit(split, config)
    assert torch.get_num_threads() == before


def test_device_names_resolve_or_say_what_torch_sees(monkeypatch):
    from swapvae.training.estimator import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="'cuda:1' was asked for but torch sees no CUDA device"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(RuntimeError, match=r"torch sees 2 CUDA device\(s\): cuda:0..cuda:1"):
        resolve_device("cuda:2")


def test_cli_refuses_a_bad_device_without_traceback(tmp_path, capsys):
    assert cli(["train", "--data", "simulated", "--out", str(tmp_path / "r"), "--device", "gpu:1"]) == 2
    assert "'cuda:N'" in capsys.readouterr().err


def test_held_out_bins_are_scored_in_the_history_and_change_nothing_in_training(split):
    config = SwapVAEConfig.model_validate({**FAST, "optim": {**FAST["optim"], "cpu_threads": 1}})
    plain = _fit(split, config)
    watched = _fit(split, config, held_out=split.test.counts)
    assert not _same_bits(plain, watched)  # the same random draws, the same weights
    scored = [h for h in watched.history_ if "rec_held_out" in h]
    assert scored and scored[-1]["epoch"] == config.optim.epochs
    assert all(np.isfinite([h["rec_train"], h["rec_held_out"]]).all() for h in scored)
    assert scored[-1]["rec_train"] < scored[0]["rec_train"]  # it learns the training bins
    assert not any("rec_held_out" in h for h in plain.history_)


def test_a_fixed_epoch_length_counts_steps_not_passes(split, monkeypatch):
    """optim.steps_per_epoch: an epoch of that many optimiser steps whatever the recording's size."""
    from swapvae.training import estimator

    steps = []
    real = estimator.SwapVAE._step
    monkeypatch.setattr(estimator.SwapVAE, "_step", lambda self, *a: steps.append(1) or real(self, *a))
    est = _fit(split, _fixed(1, steps_per_epoch=5))
    assert len(steps) == 3 * 5 and len(est.history_) == 3
    steps.clear()
    _fit(split, _fixed(1))
    assert len(steps) == 3 * max(1, len(split.train.counts) // 256)  # 0: one pass over the bins


def test_the_learning_rate_rule_for_larger_batches():
    from swapvae.training.estimator import learning_rate

    cfg = SwapVAEConfig.model_validate({"optim": {"lr": 1e-3, "batch_size": 1024}})
    assert learning_rate(cfg) == 1e-3  # the default rule: lr as given
    assert learning_rate(cfg.with_overrides(optim={"lr_batch_rule": "sqrt"})) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="lr_batch_rule"):
        SwapVAEConfig.model_validate({"optim": {"lr_batch_rule": "linear"}})


def test_bf16_autocast_trains_with_the_loss_terms_in_float32(split):
    """optim.precision bf16: the forward pass in bfloat16, the Poisson NLL, KL and alignment in
    float32; the run stays close to float32's (the accuracy effect: train_scale.py --accuracy)."""
    from swapvae.training.estimator import autocast

    cfg = _fixed(1, precision="bf16")
    net = SwapVAENet(100, [100, 32], 8, 8)
    x = torch.poisson(torch.full((16, 100), 2.0))
    with autocast(cfg, torch.device("cpu")):
        out = net.loss(x[:8], x[8:])
        assert net.encoder(x)[0].dtype == torch.bfloat16  # autocast is on for the layers
    assert all(v.dtype == torch.float32 for v in out.values())
    a, b = _fit(split, cfg), _fit(split, _fixed(1))
    assert all(np.isfinite(h["loss"]) for h in a.history_)
    assert a.history_[-1]["rec"] == pytest.approx(b.history_[-1]["rec"], rel=0.02)
    assert _same_bits(a, b)  # not the float32 run itself


def test_the_scale_benchmark_writes_its_table(tmp_path):
    """benchmarks/train_scale.py, tiny: the JSON scripts read (each size with the bins on the device and
    streamed from host memory), and the growth fit over three sizes."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_scale.py"
    out = tmp_path / "scale.json"
    res = subprocess.run([sys.executable, str(script), "--sizes", "400x24", "1200x24", "400x48", "--steps", "3",
                          "--device", "cpu", "--placement", "device", "host", "--threads", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    r = json.loads(out.read_text())
    assert [(row["device"], row["placement"], row["bins"] > 0) for row in r["rows"]] == \
        [("cpu", "device", True), ("cpu", "host", True)] * 3
    for row in r["rows"]:
        assert row["bins_per_s"] > 0 and row["peak_mem_mb"] > 0 and 0 < row["overhead_share"] < 1
        assert sum(row["share"].values()) == pytest.approx(1.0)
    assert {"bins_exponent", "neurons_exponent"} <= r["growth"]["cpu"].keys() and r["accuracy"] == []


def test_the_ridge_path_from_the_gram_matrix_equals_the_direct_solutions():
    """training/readout.py's ridge path (eigh of Z'Z with more bins than features, the SVD with fewer)
    against (Z'Z + aI)^-1 Z'y solved directly for each alpha."""
    from swapvae.training.readout import _ridge_path, _standardizer

    rng = np.random.default_rng(0)
    for n, p in ((3000, 120), (80, 200)):
        x = rng.poisson(3.0, (n, p)).astype(np.float32)
        y = rng.normal(size=(n, 2)) + 0.1 * x[:, :2]
        for scaling in ("feature", "global"):
            mean, scale = _standardizer(x, scaling)
            z = ((x - mean) / scale).astype(np.float64)
            for a, (coef, b) in zip((0.1, 10.0, 1e4), _ridge_path(x, y, (0.1, 10.0, 1e4), scaling)):
                want = np.linalg.solve(z.T @ z + a * np.eye(p), z.T @ (y - y.mean(0))).T / scale
                assert np.allclose(coef, want, rtol=1e-5, atol=1e-9 * np.abs(want).max()), (n, scaling, a)
                assert np.allclose(b, y.mean(0) - want @ mean, rtol=1e-5, atol=1e-7)
