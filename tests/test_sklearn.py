"""``training.SwapVAE`` as a scikit-learn estimator: the estimator checks, parameters, clone,
a Pipeline with trial ids as a step fit parameter, and a grouped grid search."""
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import check_estimator

from swapvae.schemas import SwapVAEConfig
from swapvae.schemas.session import split_session
from swapvae.training import SwapVAE
from swapvae.training.estimator import EXPECTED_FAILED_CHECKS, PARAMS, positions_in_trials
from swapvae.training.simulate import simulate_reaching

ROOT = Path(__file__).resolve().parents[1]
# tiny and single-threaded: fits take milliseconds, and a seed gives the same bits every time
TINY = dict(device="cpu", cpu_threads=1, epochs=2, batch_size=32, content_dim=4, style_dim=4, hidden=["d", 16])


@pytest.fixture(scope="module")
def data():
    """Bins of a small simulated session: counts, direction labels and trial ids."""
    s = split_session(simulate_reaching(n_neurons=40, n_trials=60, seed=5)).train
    return s.counts, s.target, s.trial


@pytest.mark.filterwarnings("ignore:SwapVAE.fit ignores y")  # the checks call fit(X, y) without trial ids
def test_scikit_learn_estimator_checks():
    # the default architecture (latent 64 + 64), two epochs; the checks feed random reals, which
    # the default refuses as not spike counts (data.whole_counts): they run with rates allowed
    est = SwapVAE(device="cpu", cpu_threads=1, epochs=2, batch_size=32, whole_counts=False)
    results = check_estimator(est, expected_failed_checks=EXPECTED_FAILED_CHECKS, on_skip=None,
                              on_fail=None)
    status = Counter(r["status"] for r in results)
    failed = {r["check_name"]: repr(r["exception"]) for r in results if r["status"] == "failed"}
    assert not failed, failed
    assert set(EXPECTED_FAILED_CHECKS) <= {r["check_name"] for r in results}  # no stale entry
    assert status["passed"] >= 40, status
    print(f"\nscikit-learn estimator checks: {dict(status)}")  # pytest -s shows it


def test_the_estimator_refuses_what_a_recording_reader_refuses(data):
    counts, _, trial = data
    with pytest.raises(ValueError, match=r"whole numbers .* whole_counts=False"):
        SwapVAE(**TINY).fit(counts + 0.5, trial=trial)
    SwapVAE(**TINY, whole_counts=False).fit(counts + 0.5, trial=trial)  # rates, asked for
    with pytest.raises(ValueError, match="trial ids must not decrease"):
        SwapVAE(**TINY).fit(counts[::-1], trial=trial[::-1])


def test_trial_ids_where_scikit_learn_puts_y_warn_and_say_trial(data):
    counts, target, trial = data
    with pytest.warns(UserWarning, match="ignores y .* trial="):
        by_position = SwapVAE(**TINY, seed=0).fit(counts, trial)
    one_trial = SwapVAE(**TINY, seed=0).fit(counts)
    np.testing.assert_array_equal(by_position.transform(counts), one_trial.transform(counts))  # y was ignored
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SwapVAE(**TINY).fit(counts, target, trial=trial)  # a Pipeline's target beside trial=: no warning


def test_flat_parameters_are_the_config_fields():
    assert set(SwapVAE().get_params()) == set(PARAMS) | {"config", "verbose"}
    for name, (section, field) in PARAMS.items():  # every flat name reaches a real config field
        owner = SwapVAEConfig() if section is None else getattr(SwapVAEConfig(), section)
        assert field in type(owner).model_fields, name
    assert SwapVAE().get_config() == SwapVAEConfig()


def test_partial_overrides_keep_the_rest_of_the_config():
    base = SwapVAEConfig.model_validate({"optim": {"lr": 1e-3, "batch_size": 64}, "readout": {"cv_folds": 3}})
    cfg = SwapVAE(config=base, epochs=2, kl_weight=4.0).get_config()
    assert (cfg.optim.epochs, cfg.optim.lr, cfg.optim.batch_size) == (2, 1e-3, 64)
    assert (cfg.loss.kl_weight, cfg.loss.align_weight, cfg.readout.cv_folds) == (4.0, 1.0, 3)
    assert SwapVAE(config={"seed": 3}, lr=0.01).get_config().seed == 3  # a config dict (a JSON file's) works too
    vae = SwapVAE(variant="beta_vae", kl_weight=2.0).get_config()  # the variant fills in what was not given
    assert (vae.model.content_dim, vae.loss.swap, vae.loss.kl_weight) == (0, False, 2.0)
    with pytest.raises(ValueError, match="epochs"):
        SwapVAE(epochs=0).fit(np.ones((4, 3)))
    with pytest.raises(ValueError, match="'cuda:N'"):
        SwapVAE(device="gpu").get_config()


def test_clone_and_set_params(data):
    counts, _, trial = data
    est = SwapVAE(**TINY).fit(counts, trial=trial)
    twin = clone(est)
    assert twin.get_params() == est.get_params() and not hasattr(twin, "model_")
    twin.set_params(epochs=3, seed=1)
    assert (twin.get_config().optim.epochs, twin.get_config().optim.batch_size, twin.seed) == (3, 32, 1)
    twin.fit(counts, trial=trial)
    assert len(twin.history_) == 3 and twin.config_.optim.epochs == 3 and len(est.history_) == 2


def test_unfitted_methods_raise_not_fitted():
    est = SwapVAE()
    for call in (lambda: est.transform(np.ones((3, 4))), lambda: est.inverse_transform(np.ones((3, 128))),
                 lambda: est.reconstruct(np.ones((3, 4))), lambda: est.encode(np.ones((3, 4))),
                 lambda: est.decode(np.ones((3, 128))), lambda: est.save("/nonexistent/c.pt")):
        with pytest.raises(NotFittedError):
            call()


def test_y_is_ignored_and_trial_ids_shape_the_pairs(data):
    counts, target, trial = data
    z = SwapVAE(**TINY).fit(counts, trial=trial).transform(counts)
    np.testing.assert_array_equal(SwapVAE(**TINY).fit(counts, target, trial=trial).transform(counts), z)
    # without trial ids every row is one trial: other pairs, another model
    assert not np.allclose(SwapVAE(**TINY).fit(counts).transform(counts), z)
    with pytest.raises(ValueError, match="one id per row"):
        SwapVAE(**TINY).fit(counts, trial=trial[:-1])


def test_bin_in_trial_is_counted_in_row_order():
    trial = np.array([4, 4, 4, 7, 7, 2, 4])
    assert positions_in_trials(trial).tolist() == [0, 1, 2, 0, 1, 0, 3]
    assert positions_in_trials(np.array(["a", "b", "a"])).tolist() == [0, 0, 1]


def test_fit_transform_and_inverse_transform(data, tmp_path):
    counts, _, trial = data
    counts = counts.copy()
    counts[:, 3] = 2  # a static channel: dropped by the filter, its mean comes back
    est = SwapVAE(**TINY)
    z = est.fit_transform(counts, trial=trial)
    assert z.shape == (len(counts), 8) and z.dtype == np.float32
    assert 3 not in est.neurons_ and est.n_features_in_ == 40
    expected = est.inverse_transform(z)
    assert expected.shape == counts.shape and (expected >= 0).all()
    np.testing.assert_allclose(expected[:, 3], 2.0)
    np.testing.assert_allclose(expected[:, est.neurons_], est.reconstruct(counts) / est.input_scale, rtol=1e-5)
    assert est.transform(counts, space="content").shape == (len(counts), 4)
    again = SwapVAE.load(est.save(tmp_path / "c.pt"))
    np.testing.assert_array_equal(again.inverse_transform(z), expected)
    with pytest.raises(ValueError, match="latents must have 8 columns"):
        est.inverse_transform(z[:, :5])
    with pytest.raises(ValueError, match="Negative values"):
        est.transform(-counts)


def test_pipeline_takes_trial_ids_as_a_step_fit_parameter(data):
    counts, target, trial = data
    pipe = Pipeline([("vae", SwapVAE(**TINY)), ("clf", LogisticRegression(max_iter=2000))])
    pipe.fit(counts, target, vae__trial=trial)
    alone = SwapVAE(**TINY).fit(counts, trial=trial)
    np.testing.assert_array_equal(pipe.named_steps["vae"].transform(counts), alone.transform(counts))
    assert pipe.predict(counts).shape == target.shape and 0 <= pipe.score(counts, target) <= 1


def test_grouped_grid_search_over_one_hyperparameter(data):
    counts, target, trial = data
    pipe = Pipeline([("vae", SwapVAE(**TINY)), ("clf", LogisticRegression(max_iter=2000))])
    search = GridSearchCV(pipe, {"vae__kl_weight": [1.0, 10.0]}, cv=GroupKFold(n_splits=3))
    search.fit(counts, target, groups=trial, vae__trial=trial)  # trial ids sliced per fold like the rows
    assert search.best_params_["vae__kl_weight"] in (1.0, 10.0)
    assert len(search.cv_results_["mean_test_score"]) == 2 and np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert search.best_estimator_.named_steps["vae"].config_.loss.kl_weight == search.best_params_["vae__kl_weight"]


def test_training_package_imports_torch_only_for_the_estimator():
    code = ("import sys, swapvae.training, swapvae.training.data\n"
            "assert 'torch' not in sys.modules and 'sklearn' not in sys.modules\n"
            "from swapvae.training import SwapVAE\n"
            "import swapvae.training.estimator\n"
            "assert SwapVAE is swapvae.training.estimator.SwapVAE and 'torch' in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
