"""GPTQ writes weights on the shared grid, records that grid, and beats nearest rounding."""

import logging

import numpy as np

from compiler.graph import initializer_array, set_initializer
from compiler.linear_layers import find_linear_layers
from compiler.plan import LayerPlan, QuantPlan
from compiler.quantizers import dequantize_weight, fake_quantize_weight, quantize_weight
from passes.gptq import _reconstruction_error, gptq, gptq_round, search_scale
from tests.passes.tiny_models import conv_data, conv_net, mlp_block, mlp_data, run


def _nearest(model, plan_bits):
    from compiler.linear_layers import copy_model

    result = copy_model(model)
    for layer in find_linear_layers(result).values():
        set_initializer(result, layer.weight, fake_quantize_weight(layer.weight_array(result), layer.out_axis, plan_bits))
    return result


def test_weights_land_on_the_recorded_grid():
    model = conv_net()
    plan = QuantPlan(w_bits=4)
    result, plan = gptq(model, plan, conv_data(), progress=False)
    layers = find_linear_layers(result).values()
    assert {layer.weight for layer in layers} == set(plan.tensors)
    for layer in layers:
        entry = plan.tensors[layer.weight]
        weight = initializer_array(result, layer.weight)
        q = quantize_weight(weight, entry.scale_array(), entry.axis, entry.bits)
        assert entry.bits == 4 and entry.axis == layer.out_axis and entry.zero_point == [0] * len(entry.scale)
        assert np.abs(q).max() <= 8
        shape = [1] * weight.ndim
        shape[entry.axis] = -1
        np.testing.assert_array_equal(q.astype(np.float32) * entry.scale_array().reshape(shape), weight)
    assert not np.array_equal(initializer_array(model, "w2"), initializer_array(result, "w2"))  # caller's copy


def test_error_feedback_beats_nearest_on_correlated_inputs():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(64, 64))
    x = rng.normal(size=(4096, 64)) @ mixing
    hessian = (x.T @ x / len(x))[None]
    weight = rng.normal(size=(1, 32, 64))
    scale = search_scale(weight, np.diagonal(hessian, axis1=1, axis2=2), 4)
    rounded = gptq_round(weight, hessian, scale, 4)
    nearest = np.clip(np.round(weight / scale[..., None]), -8, 7) * scale[..., None]
    assert _reconstruction_error(weight, rounded, hessian) < 0.7 * _reconstruction_error(weight, nearest, hessian)


def test_model_output_closer_than_nearest_rounding():
    model, data = mlp_block(outlier=1.0), mlp_data(count=64)
    result, _ = gptq(model, QuantPlan(w_bits=4), data, progress=False)
    reference = run(model, data)[0]
    gptq_err = np.mean((run(result, data)[0] - reference) ** 2)
    nearest_err = np.mean((run(_nearest(model, 4), data)[0] - reference) ** 2)
    assert gptq_err < nearest_err


def test_only_planned_layers_and_rerun_skipped(caplog):
    model = conv_net()
    plan = QuantPlan(w_bits=8)
    plan.layers["project"] = LayerPlan(node="project", op_type="Conv", w_bits=4, a_bits=8, weight="w2")
    plan.layers["fc"] = LayerPlan(node="fc", op_type="Gemm", w_bits=8, a_bits=8, weight="wf")
    result, plan = gptq(model, plan, conv_data(), max_bits=4, progress=False)
    assert set(plan.tensors) == {"w2"}
    assert plan.layers["project"].info["rounding"] == "gptq"
    np.testing.assert_array_equal(initializer_array(result, "wf"), initializer_array(model, "wf"))
    with caplog.at_level(logging.INFO, logger="passes.gptq"):
        again, _ = gptq(result, plan, conv_data(), progress=False)
    assert "already GPTQ-rounded" in caplog.text


def test_one_shot_and_sequential_both_round_every_layer():
    model, data = conv_net(), conv_data()
    for sequential in (False, True):
        plan = QuantPlan(w_bits=4)
        _, plan = gptq(model, plan, data, sequential=sequential, layers_per_pass=2, progress=False)
        assert len(plan.tensors) == len(find_linear_layers(model))


def test_pointwise_conv_hessian_from_pixels_equals_im2col():
    from compiler.calibrate import ConvPatches, collect_second_moment
    from passes.gptq import _hessians

    model, data = conv_net(), conv_data()
    project = next(layer for layer in find_linear_layers(model).values() if layer.name == "project")
    fast = _hessians(model, [(project, 4)], data, 32, False)["project"]
    exact = collect_second_moment(model, data, [project.input], conv_patches={project.input: ConvPatches((1, 1))},
                                  progress=False)[project.input]
    np.testing.assert_allclose(fast.reshape(exact.shape), exact, rtol=1e-6, atol=1e-9)


# -- block-wise scales (GPTQ's "group size") ---------------------------------------------------


def test_block_wise_weights_land_on_the_recorded_block_grid():
    model, data = mlp_block(hidden=16, ffn=32), mlp_data(count=32)
    plan = QuantPlan(w_bits=4, weight_block_size=8)
    result, plan = gptq(model, plan, data, progress=False)
    for layer in find_linear_layers(result).values():
        entry = plan.tensors[layer.weight]
        weight = initializer_array(result, layer.weight)
        reduction = weight.shape[0]  # MatMul weights [K, N]: blocks along K (axis 0)
        assert entry.block_size == 8 and entry.axis == 0 and entry.scale_shape == [reduction // 8, weight.shape[1]]
        zero = entry.zero_point_array()
        assert zero.min() >= -8 and zero.max() <= 7 and np.any(zero != 0)  # asymmetric blocks
        q = quantize_weight(weight, entry.scale_array(), entry.axis, 4, entry.block_size, zero)
        assert q.min() >= -8 and q.max() <= 7
        np.testing.assert_array_equal(dequantize_weight(q, entry.scale_array(), entry.axis, entry.block_size, zero),
                                      weight)


def test_block_wise_gptq_follows_a_block_entry_already_in_the_plan():
    """The pipeline records the blocks before rounding; GPTQ keeps that block size."""
    from compiler.quantizers import weight_tensor_quant

    model, data = mlp_block(hidden=16, ffn=32), mlp_data(count=32)
    plan = QuantPlan(w_bits=4)
    plan.tensors["w_up"] = weight_tensor_quant("w_up", initializer_array(model, "w_up"), 0, 4, block_size=4)
    _, plan = gptq(model, plan, data, progress=False)
    assert plan.tensors["w_up"].block_size == 4 and plan.tensors["w_up"].scale_shape == [4, 32]
    assert plan.tensors["w_down"].block_size is None  # no block entry, no plan default: per channel


def test_block_scales_reconstruct_better_than_per_channel():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2048, 128)) @ rng.normal(size=(128, 128))
    hessian = (x.T @ x / len(x))[None]
    weight = rng.normal(size=(1, 16, 128))
    weight[0, np.arange(16), rng.integers(0, 128, 16)] *= 12  # one outlier input weight per row
    diag = np.diagonal(hessian, axis1=1, axis2=2)
    channel_scale = search_scale(weight, diag, 4)
    block_scale = search_scale(weight, diag, 4, block_size=32)
    assert channel_scale.shape == (1, 16) and block_scale.shape == (1, 16, 4)
    per_channel = gptq_round(weight, hessian, channel_scale, 4)
    blocked = gptq_round(weight, hessian, np.repeat(block_scale, 32, axis=-1), 4)
    assert _reconstruction_error(weight, blocked, hessian) < _reconstruction_error(weight, per_channel, hessian)


def test_block_wise_model_output_closer_than_per_channel():
    model, data = mlp_block(outlier=1.0, hidden=16, ffn=64), mlp_data(count=64)
    reference = run(model, data)[0]
    errors = {}
    for block in (None, 8):
        result, _ = gptq(model, QuantPlan(w_bits=4, weight_block_size=block), data, progress=False)
        errors[block] = np.mean((run(result, data)[0] - reference) ** 2)
    assert errors[8] < errors[None]


def test_candidates_are_what_one_shot_gptq_rounds_at_each_width():
    """gptq_candidates(widths) = gptq(sequential=False) of the plan with every layer at that width."""
    from passes.gptq import gptq_candidates

    model, data = conv_net(), conv_data()
    before = model.SerializeToString()
    candidates = gptq_candidates(model, QuantPlan(w_bits=8), data, [2, 4], damp=0.01, max_seconds=5)
    assert model.SerializeToString() == before
    layers = find_linear_layers(model).values()
    for bits in (2, 4):
        expected_model, expected_plan = gptq(model, QuantPlan(w_bits=bits), data, sequential=False, progress=False)
        assert set(candidates[bits]) == {layer.name for layer in layers}
        for layer in layers:
            weight, grid = candidates[bits][layer.name]
            np.testing.assert_array_equal(weight, initializer_array(expected_model, layer.weight))
            assert grid == expected_plan.tensors[layer.weight] and grid.bits == bits
    assert not np.array_equal(candidates[2]["project"][0], candidates[4]["project"][0])
