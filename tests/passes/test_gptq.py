"""GPTQ writes weights on the shared grid, records that grid, and beats nearest rounding."""

import logging

import numpy as np

from compiler.graph import initializer_array, set_initializer
from compiler.linear_layers import find_linear_layers
from compiler.plan import LayerPlan, QuantPlan
from compiler.quantizers import fake_quantize_weight, quantize_weight
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
