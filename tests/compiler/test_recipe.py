"""Recipes: TOML parsing and validation, family defaults, running the steps."""

import pytest

from compiler.errors import EdgeqError
from compiler.plan import QuantPlan
from compiler.recipe import (
    apply_rounding,
    apply_transforms,
    available_recipes,
    default_recipe,
    load_recipe,
    model_family,
)
from tests.passes.tiny_models import (
    attention_block,
    conv_data,
    conv_net,
    linear_pair,
    max_rel_error,
    run,
)


def test_bundled_recipes_load_and_validate():
    assert {"cnn", "cnn_equalize", "transformer", "transformer_rotate", "none", "default"} <= set(available_recipes())
    for name in available_recipes():
        recipe = load_recipe(name)
        assert recipe.name == name
    cnn = load_recipe("cnn_equalize")
    assert [step.pass_name for step in cnn.steps] == ["equalize", "gptq", "bias_correction"]
    assert cnn.to_dict()["steps"][1]["max_w_bits"] == 4


def test_family_defaults():
    assert model_family(conv_net()) == "cnn" and default_recipe(conv_net()).name == "cnn"
    assert model_family(attention_block()) == "transformer"
    assert default_recipe(attention_block()).name == "transformer"
    assert model_family(linear_pair()) == "other"


@pytest.mark.parametrize(
    "text,message",
    [
        ('[[steps]]\npass = "magic"\n', "unknown pass"),
        ('[[steps]]\npass = "equalize"\noptions = { colour = 1 }\n', "unknown options"),
        ("name = [", "not valid TOML"),
        ('flavour = "x"\n', "unknown keys"),
        ("weight_block_size = 1\n", "weight_block_size"),
        ('weight_block_size = "64"\n', "weight_block_size"),
    ],
)
def test_bad_recipes_are_user_errors(tmp_path, text, message):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(EdgeqError, match=message):
        load_recipe(str(path))
    with pytest.raises(EdgeqError, match="unknown recipe"):
        load_recipe("no-such-recipe")


def test_recipe_runs_and_is_recorded(tmp_path):
    model, data = conv_net(), conv_data()
    recipe = load_recipe("cnn_equalize")
    transformed = apply_transforms(recipe, model, data, w_bits=4)
    assert max_rel_error(run(model, data), run(transformed, data)) <= 1e-4
    plan = QuantPlan(w_bits=4)
    rounded, plan = apply_rounding(recipe, transformed, plan, data, progress=False)
    assert plan.recipe["name"] == "cnn_equalize" and plan.tensors  # gptq recorded the weight grids
    plan8 = QuantPlan(w_bits=8)
    _, plan8 = apply_rounding(recipe, transformed, plan8, data, progress=False)
    assert not plan8.tensors  # gptq is for <= 4-bit weights only
    custom = tmp_path / "mine.toml"
    custom.write_text('name = "mine"\n[[steps]]\npass = "rotate"\noptions = { kind = "random" }\n')
    mine = load_recipe(str(custom))
    rotated = apply_transforms(mine, linear_pair(), {})
    assert rotated.SerializeToString() != linear_pair().SerializeToString()


def test_weight_block_size_key_is_recorded_and_cli_overrides_it(tmp_path):
    from compiler.pipeline import choose_weight_block

    path = tmp_path / "blocks.toml"
    path.write_text('name = "blocks"\nweight_block_size = 64\nsteps = []\n')
    recipe = load_recipe(str(path))
    assert recipe.weight_block_size == 64 and recipe.to_dict()["weight_block_size"] == 64
    assert recipe.with_steps(lambda step: True).weight_block_size == 64
    assert choose_weight_block(None, recipe, "onnx", False) == (64, "recipe blocks")
    assert choose_weight_block("32", recipe, "onnx", False) == (32, "--weight-block")
    assert choose_weight_block("channel", recipe, "onnx", False) == (None, "--weight-block")
    block, source = choose_weight_block(None, recipe, "cpu", True)  # integer-only: the default is dropped
    assert block is None and "ignored" in source
    with pytest.raises(EdgeqError, match="integer-only"):
        choose_weight_block("64", recipe, "cpu", True)
