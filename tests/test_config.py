import json

import pytest
from pydantic import ValidationError

from swapvae.schemas import SwapVAEConfig


def test_defaults_are_the_paper_recipe_where_validation_did_not_move_them():
    c = SwapVAEConfig()
    assert (c.model.content_dim, c.model.style_dim, c.model.hidden) == (64, 64, ("d", 128))
    assert (c.loss.kl_weight, c.loss.align_weight, c.loss.swap) == (10.0, 1.0, True)
    assert (c.optim.lr, c.optim.batch_size, c.data.input_unit) == (5e-4, 256, "hz")
    # chosen on a validation split of the training trials (docs/RECIPE.md)
    assert (c.optim.epochs, c.data.dropout_max, c.data.jitter) == (450, 0.3, 10)
    assert c.model.hidden_sizes(163) == [163, 128]


@pytest.mark.parametrize("variant, swap, align, content", [
    ("no_swap", False, 1.0, 64), ("no_align", True, 0.0, 64),
    ("vae", False, 0.0, 0), ("beta_vae", False, 0.0, 0),
])
def test_variants(variant, swap, align, content):
    c = SwapVAEConfig(variant=variant)
    assert (c.loss.swap, c.loss.align_weight, c.model.content_dim) == (swap, align, content)


def test_explicit_fields_beat_the_variant():
    c = SwapVAEConfig.model_validate({"variant": "beta_vae", "loss": {"kl_weight": 4.0}})
    assert c.loss.kl_weight == 4.0 and c.model.content_dim == 0


@pytest.mark.parametrize("raw, message", [
    ({"variant": "nope"}, "variant"),
    ({"loss": {"klweight": 1}}, "klweight"),
    ({"optim": {"lr": -1}}, "lr"),
    ({"data": {"dropout_max": 1.5}}, "dropout_max"),
    ({"model": {"hidden": []}}, "hidden"),
    ({"model": {"content_dim": 0}}, "content_dim must be > 0"),
])
def test_invalid_configs_are_named(raw, message):
    with pytest.raises(ValidationError, match=message):
        SwapVAEConfig.model_validate(raw)


def test_from_file(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"seed": 3, "optim": {"epochs": 2}}))
    c = SwapVAEConfig.from_file(p)
    assert c.seed == 3 and c.optim.epochs == 2 and c.optim.lr == 5e-4
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SwapVAEConfig.from_file(p)


def test_partial_section_overrides_keep_the_rest():
    base = SwapVAEConfig.model_validate({"optim": {"lr": 1e-3, "batch_size": 64}, "loss": {"kl_weight": 4.0}})
    c = base.with_overrides(optim={"epochs": 2}, seed=5)
    assert (c.optim.epochs, c.optim.lr, c.optim.batch_size, c.seed) == (2, 1e-3, 64, 5)
    assert c.loss.kl_weight == 4.0
    # a variant given later fills in only the fields nobody set
    v = SwapVAEConfig.model_validate({"loss": {"kl_weight": 4.0}}).with_overrides(variant="beta_vae")
    assert (v.model.content_dim, v.loss.swap, v.loss.kl_weight) == (0, False, 4.0)
    with pytest.raises(ValidationError, match="epochs"):
        base.with_overrides(optim={"epochs": 0})


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names(device):
    assert SwapVAEConfig(device=device).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "cpu:0", "CUDA"])
def test_bad_device_names_are_refused(device):
    with pytest.raises(ValidationError, match="'cuda:N'"):
        SwapVAEConfig(device=device)


def test_retired_fields_load_at_their_neutral_value_and_are_refused_otherwise():
    """Runs written before the experiments were removed (config.json, checkpoints) still load."""
    old = {"variant": "swap_only", "data": {"thin_min": 1.0, "jitter": 7}, "model": {"input_transform": "identity"}}
    c = SwapVAEConfig.model_validate(old)
    assert c.variant == "no_align" and c.loss.align_weight == 0.0 and c.data.jitter == 7
    assert "thin_min" not in c.model_dump()["data"] and "input_transform" not in c.model_dump()["model"]
    with pytest.raises(ValueError, match="data.thin_min = 0.3 was an experiment"):
        SwapVAEConfig.model_validate({"data": {"thin_min": 0.3}})
    with pytest.raises(ValueError, match="model.input_transform = 'sqrt' was an experiment"):
        SwapVAEConfig.model_validate({"model": {"input_transform": "sqrt"}})
