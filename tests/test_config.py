import json

import pytest
from pydantic import ValidationError

from schemas import SwapVAEConfig


def test_defaults_are_the_paper_recipe():
    c = SwapVAEConfig()
    assert (c.model.content_dim, c.model.style_dim, c.model.hidden) == (64, 64, ("d", 128))
    assert (c.loss.kl_weight, c.loss.align_weight, c.loss.swap) == (10.0, 1.0, True)
    assert (c.optim.lr, c.optim.batch_size, c.optim.epochs, c.data.input_unit) == (5e-4, 256, 225, "hz")
    assert c.model.hidden_sizes(163) == [163, 128]


@pytest.mark.parametrize("variant, swap, align, content", [
    ("no_swap", False, 1.0, 64), ("no_align", True, 0.0, 64), ("swap_only", True, 0.0, 64),
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
