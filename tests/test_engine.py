"""The embeddable runtime engine and the fine-bin sliding window."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from swapvae.runtime.engine import BundleDecoder, BundleError, DecodeOutput
from swapvae.runtime.window import SlidingWindowDecoder


@pytest.fixture(scope="module")
def dec(tiny_bundle):
    return BundleDecoder(tiny_bundle)


@pytest.fixture(scope="module")
def bins():
    from swapvae.schemas.session import split_session
    from swapvae.training.data import load_session

    return split_session(load_session("simulated")).test.counts[:40]


def test_runtime_never_imports_torch_or_training(tiny_bundle):
    code = ("import sys, numpy as np; from swapvae.runtime import engine, window; "
            f"d = engine.BundleDecoder({str(tiny_bundle)!r}); d.decode(np.ones(d.n_channels, np.float32)); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'sklearn') "
            "or m.startswith('swapvae.training')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_bin_and_batch_agree_and_have_the_documented_shapes(dec, bins):
    m = dec.manifest
    batch = dec.decode(bins, reset=True)  # 40 consecutive bins of one stream
    assert batch.content.shape == (40, m.content_dim) and batch.style_mean.shape == (40, m.style_dim)
    assert batch.angle.shape == batch.direction.shape == (40,) and batch.direction.dtype == np.int64
    assert batch.proba.shape == (40, m.n_classes) and batch.rates.shape == (40, m.n_neurons)
    assert batch.velocity.shape == (40, 2)
    assert all(getattr(batch, f).dtype == np.float32 for f in ("content", "style_mean", "angle", "proba", "velocity",
                                                                "rates"))
    np.testing.assert_allclose(batch.proba.sum(1), 1, rtol=1e-5)
    assert (batch.rates >= 0).all() and (np.abs(batch.angle) <= np.pi).all()
    for i in range(40):  # bin by bin, the same stream: the same windows, so the same outputs
        one = dec.decode(bins[i], reset=i == 0)
        for f in ("content", "style_mean", "proba", "velocity", "rates"):
            np.testing.assert_allclose(getattr(one, f)[0], getattr(batch, f)[i], rtol=1e-5, atol=1e-5, err_msg=f)
        assert one.direction[0] == batch.direction[i]
        assert abs(np.angle(np.exp(1j * (one.angle[0] - batch.angle[i])))) < 1e-4
    # The angle is the direction of the probability-weighted class vectors.
    a = np.asarray(m.readout.direction.angles_rad)
    np.testing.assert_allclose(np.exp(1j * batch.angle), np.exp(1j * np.arctan2(batch.proba @ np.sin(a),
                                                                                batch.proba @ np.cos(a))),
                               atol=1e-4)


def test_the_stream_keeps_its_history_and_a_reset_starts_a_trial(dec, bins):
    """The readout sees [z_t, z_t-1, z_t-2] (k = 3): a bin decoded after different pasts
    gives the same latent and rates but another readout; after a reset it is a trial's first
    bin again, whatever came before."""
    x = bins[10]
    first = dec.decode(x, reset=True).copy()
    after_other = (dec.decode(bins[0], reset=True), dec.decode(bins[1]), dec.decode(x))[-1].copy()
    np.testing.assert_array_equal(after_other.rates, first.rates)
    assert not np.allclose(after_other.proba, first.proba)
    again = dec.decode(x, reset=True)
    np.testing.assert_array_equal(again.proba, first.proba)
    np.testing.assert_array_equal(again.velocity, first.velocity)


def test_streams_are_independent_and_batched_streams_equal_one_at_a_time(dec, bins):
    a, b, c = dec.new_stream(), dec.new_stream(), dec.new_stream()
    ref = []
    for s, rows in ((a, bins[0:4]), (b, bins[4:8]), (c, bins[8:12])):
        ref.append([dec.decode_stream(s, r).copy() for r in rows])  # a stream never reset: its own bins
    a2, b2, c2 = dec.new_stream(), dec.new_stream(), dec.new_stream()
    for t in range(4):
        out = dec.decode_streams([a2, b2, c2], bins[[t, 4 + t, 8 + t]])
        for j in range(3):
            np.testing.assert_allclose(out.proba[j], ref[j][t].proba[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out.velocity[j], ref[j][t].velocity[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="distinct streams"):
        dec.decode_streams([a2, a2], bins[:2])


def test_a_refused_bin_leaves_the_stream_as_it_was(dec, bins):
    s = dec.new_stream()
    dec.decode_stream(s, bins[0])
    before = (s.row.copy(), s.n)
    bad = bins[1].copy()
    bad[3] = np.nan
    for reset in (False, True):
        with pytest.raises(ValueError, match="NaN"):
            dec.decode_stream(s, bad, reset=reset)
        with pytest.raises(ValueError, match="NaN"):
            dec.decode_streams([s], bad[None], resets=[reset])
    np.testing.assert_array_equal(s.row, before[0])
    assert s.n == before[1]


def test_one_bin_output_is_reused_until_the_next_call(dec, bins):
    first = dec.decode(bins[0])
    kept = first.copy()
    second = dec.decode(bins[1])
    assert second is first  # documented: views of preallocated buffers
    assert not np.array_equal(kept.rates, second.rates)
    np.testing.assert_allclose(kept.rates, dec.decode(bins[:1]).rates, rtol=1e-6)  # the copy kept bin 0
    before = second.copy()
    dec.warm()
    np.testing.assert_array_equal(second.rates, before.rates)  # warm() leaves the outputs alone
    np.testing.assert_array_equal(second.angle, before.angle)
    assert isinstance(second.as_dict()["rates"], np.ndarray)


def test_warm_ups_touch_no_stream_and_leave_the_next_decodes_bit_equal(dec, bins):
    """warm() runs decode_stream itself (so the Python path warms too) on scratch buffers and a
    scratch stream: the decoder's own stream and the outputs of later decodes are as without it."""
    a, b = dec.new_stream(), dec.new_stream()
    for x in bins[:3]:
        dec.decode_stream(a, x)
        dec.decode_stream(b, x)
    state = (dec.stream.n, dec.stream.row.copy(), a.n, a.row.copy())
    for _ in range(5):
        dec.warm()
    assert (dec.stream.n, a.n) == (state[0], state[2])
    np.testing.assert_array_equal(dec.stream.row, state[1])
    np.testing.assert_array_equal(a.row, state[3])
    for x in bins[3:6]:
        warmed = dec.decode_stream(a, x).copy()
        dec.warm()
        cold = dec.decode_stream(b, x).copy()
        for k in ("content", "style_mean", "rates", "angle", "proba", "velocity"):
            np.testing.assert_array_equal(getattr(warmed, k), getattr(cold, k))


def test_decoding_is_deterministic(dec, bins):
    """Denoised rates are decoder([c, mu]): no sampling at inference."""
    np.testing.assert_array_equal(dec.decode(bins).rates, dec.decode(bins).rates)


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.uint16, "list", "row"])
def test_any_real_dtype_and_a_row_are_accepted(dec, bins, dtype):
    x = bins[3]
    ref = dec.decode(x).copy()
    arg = x.tolist() if dtype == "list" else x[None] if dtype == "row" else x.astype(dtype)
    np.testing.assert_array_equal(dec.decode(arg).rates, ref.rates)
    np.testing.assert_array_equal(dec.decode(np.zeros(dec.n_channels) * -1.0).rates,
                                  dec.decode(np.zeros(dec.n_channels)).rates)  # -0.0 is a count of 0


def _with(x, i, v):
    x = np.array(x, dtype=np.float64)
    x.flat[i] = v
    return x


@pytest.mark.parametrize("make, message", [
    (lambda n: np.ones(n - 1, np.float32), r"shape \(120,\) or \(B, 120\).*got \(119,\)"),
    (lambda n: np.ones((2, 3, n), np.float32), r"got \(2, 3, 120\)"),
    (lambda n: np.ones((0, n), np.float32), "empty batch"),
    (lambda n: _with(np.ones(n), 5, np.nan), "NaN value.*channel 5"),
    (lambda n: _with(np.ones(n), 7, np.inf), "infinite.*channel 7"),
    (lambda n: _with(np.ones(n), 9, -1), "negative.*channel 9"),
    (lambda n: _with(np.ones((4, n)), n * 2 + 3, -2), "negative.*bin 2, channel 3"),
    (lambda n: _with(np.ones((4, n)), n + 1, np.nan), "NaN.*bin 1, channel 1"),
    (lambda n: _with(np.ones(n), 0, 1e300), "infinite \\(or beyond float32\\)"),
    (lambda n: np.ones(n, bool), "real numeric array, got dtype bool"),
    (lambda n: ["a"] * n, "real numeric array"),
])
def test_bad_input_is_refused_with_the_problem_named(dec, make, message):
    with pytest.raises(ValueError, match=message):
        dec.decode(make(dec.n_channels))
    dec.decode(np.ones(dec.n_channels, np.float32))  # and the decoder still works


def _copy(bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def test_tampered_or_incomplete_bundles_are_refused(tiny_bundle, tmp_path):
    with pytest.raises(BundleError, match="not a bundle directory"):
        BundleDecoder(tmp_path / "missing")
    b = _copy(tiny_bundle, tmp_path)
    blob = bytearray((b / "readout.onnx").read_bytes())
    blob[-1] ^= 1
    (b / "readout.onnx").write_bytes(bytes(blob))
    with pytest.raises(BundleError, match="readout.onnx does not match its sha256"):
        BundleDecoder(b)
    shutil.copy(tiny_bundle / "readout.onnx", b / "readout.onnx")
    BundleDecoder(b)
    (b / "encoder.onnx").unlink()
    with pytest.raises(BundleError, match="encoder.onnx is listed in the manifest but missing"):
        BundleDecoder(b)
    shutil.copy(tiny_bundle / "encoder.onnx", b / "encoder.onnx")
    manifest = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(json.dumps({**manifest, "n_channels": 121}))
    with pytest.raises(BundleError, match="does not match the manifest"):
        BundleDecoder(b)
    (b / "manifest.json").write_text(json.dumps({**manifest, "content_dim": 9, "style_dim": 7}))
    with pytest.raises(BundleError, match="does not match the manifest"):
        BundleDecoder(b)
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="invalid manifest"):
        BundleDecoder(b)
    (b / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        BundleDecoder(b)


def test_session_settings_and_providers(dec, tiny_bundle):
    opts = dec.session.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert dec.session.get_providers() == ["CPUExecutionProvider"]
    spinning = BundleDecoder(tiny_bundle, intra_op_threads=2, spin=True)
    assert spinning.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"
    with pytest.raises(ValueError, match="provider must be one of"):
        BundleDecoder(tiny_bundle, provider="tpu")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ValueError, match="needs onnxruntime-gpu"):
            BundleDecoder(tiny_bundle, provider="cuda")
    with pytest.raises(ValueError, match="intra_op_threads"):
        BundleDecoder(tiny_bundle, intra_op_threads=0)


# -- fine bins ---------------------------------------------------------------------------------
def test_sliding_window_decodes_the_sum_of_the_last_fine_bins(dec):
    rng = np.random.default_rng(0)
    fine = rng.poisson(0.4, (23, dec.n_channels)).astype(np.float32)
    w = SlidingWindowDecoder(dec, 0.02)
    assert w.k == 5
    out = []
    for row in fine:
        o = w.push(row)
        assert (o is None) == (len(out) + 1 < 5) and w.ready == (o is not None)
        out.append(o.copy() if o is not None else None)
    # the readout's history is at the model's bin spacing: windows 5 fine bins apart form a stream
    sums = {i: fine[i - 4:i + 1].sum(0) for i in range(4, 23)}
    ref = {}
    for phase in range(5):
        ends = [i for i in sums if i % 5 == phase]
        seq = dec.decode_stream(dec.new_stream(), np.stack([sums[i] for i in ends]))
        ref.update({i: (seq.rates[j], seq.proba[j]) for j, i in enumerate(ends)})
    for i in sums:
        np.testing.assert_allclose(out[i].rates[0], ref[i][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[i].proba[0], ref[i][1], rtol=1e-5, atol=1e-6)
    w.reset()
    assert not w.ready and w.push_many(fine[:3]) is None
    many = w.push_many(fine[3:])
    np.testing.assert_allclose(many.proba, np.stack([ref[i][1] for i in sums]), rtol=1e-5, atol=1e-6)
    ten_ms = SlidingWindowDecoder(dec, 0.01)
    assert ten_ms.k == 10


def test_sliding_window_refuses_bad_bins(dec):
    with pytest.raises(ValueError, match="must divide the model's bin"):
        SlidingWindowDecoder(dec, 0.03)
    with pytest.raises(ValueError, match="must be > 0"):
        SlidingWindowDecoder(dec, 0.0)
    w = SlidingWindowDecoder(dec, 0.05)
    x = np.full(dec.n_channels, 2.0)
    x[4] = -1  # would hide in the window sum
    with pytest.raises(ValueError, match="negative.*channel 4"):
        w.push(x)
    with pytest.raises(ValueError, match=r"shape \(120,\)"):
        w.push(np.ones(3))
    assert not w.ready  # a refused bin is not added


def test_decode_output_is_a_plain_dataclass():
    o = DecodeOutput(*(np.zeros((1, 2)) for _ in range(7)))
    assert set(o.as_dict()) == {"content", "style_mean", "angle", "direction", "proba", "velocity", "rates"}
    assert set(DecodeOutput(*(None if i in (2, 3, 4, 5) else np.zeros(1) for i in range(7))).as_dict()) == {
        "content", "style_mean", "rates"}  # a bundle without a readout
