"""The main job on the bundled model, end to end through the Python API."""

import json

import pytest

from compiler.errors import EdgeqError
from compiler.pipeline import CompileOptions, compile_model, parse_bits


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundled") / "out"
    return compile_model(CompileOptions(out_dir=str(out), progress=False))


def test_bundled_cnn_loses_at_most_0_3_points(bundled):
    fidelity = bundled.plan.fidelity
    assert fidelity["float_accuracy"] > 0.88
    assert fidelity["quantized_accuracy"] >= fidelity["float_accuracy"] - 0.003


def test_bundled_cnn_runs_on_integer_kernels(bundled):
    kernels = bundled.plan.totals["onnxruntime_kernels"]
    assert kernels["float"] == {}
    assert kernels["integer"]["QLinearConv"] >= 3


def test_plan_json_lists_every_layer_with_bits_and_scales(bundled):
    plan = json.loads((bundled.out_dir / "plan.json").read_text())
    assert plan["recipe"]["name"] == "cnn"
    layers = {layer["node"]: layer for layer in plan["layers"]}
    tensors = {tensor["name"]: tensor for tensor in plan["tensors"]}
    for layer in layers.values():
        assert layer["a_bits"] == 8
        if layer["weight"]:
            assert layer["w_bits"] == 8
            assert tensors[layer["weight"]]["scale"]
    assert plan["totals"]["weight_bytes"] == sum(layer["weight_params"] for layer in layers.values())


@pytest.mark.parametrize("text,expected", [("w8a8", (8, 8)), ("W4A8", (4, 8)), ("w8a16", (8, 16)), ("w2a8", (2, 8))])
def test_parse_bits(text, expected):
    assert parse_bits(text) == expected


@pytest.mark.parametrize("text", ["8", "w8", "w5a8", "w1a8", "w8a4", "a8w8"])
def test_parse_bits_rejects(text):
    with pytest.raises(EdgeqError, match="--bits"):
        parse_bits(text)


def test_calibration_fits_each_quantizer_at_its_own_width():
    """A 16-bit layer's input range is MSE-fitted for 16 bits, not clipped as for 8."""
    from compiler.calibrate import collect_ranges
    from compiler.pipeline import _calibrate
    from passes.insert_qdq import activation_groups
    from passes.select_layers import select_layers
    from tests.passes.tiny_models import conv_data, conv_net

    model, data = conv_net(), conv_data()
    plan = select_layers(model)
    wide_layer = next(iter(plan.layers.values()))
    wide_layer.a_bits = 16
    ranges = _calibrate(CompileOptions(progress=False), model, plan, data, integer_only=False)

    groups = {name: group.bits for group in activation_groups(model, plan) for name in group.tensors}
    wide_input = wide_layer.inputs[0]
    assert groups[wide_input] == 16
    by_width = {bits: collect_ranges(model, data, [wide_input], method="mse", bits=bits, progress=False)[wide_input]
                for bits in (8, 16)}
    assert by_width[8] != by_width[16]  # the data clips differently at the two widths
    assert ranges[wide_input] == by_width[16]
    narrow = [name for name, bits in groups.items() if bits == 8 and name in ranges]
    assert narrow, "the other quantizers stay 8-bit"
    for name in narrow:
        assert ranges[name] == collect_ranges(model, data, [name], method="mse", bits=8, progress=False)[name]
