"""Bias correction removes the mean output shift that weight rounding causes."""

import logging

import numpy as np

from compiler.calibrate import ConvPatches, im2col, run_batches
from compiler.graph import initializer_array, set_initializer
from compiler.linear_layers import copy_model, find_linear_layers
from compiler.plan import QuantPlan
from compiler.quantizers import fake_quantize_weight
from passes.bias_correction import bias_correction, mean_patch
from passes.gptq import gptq
from tests.passes.tiny_models import conv_data, conv_net, run


def _rounded(model, bits):
    """What QDQ insertion does to the weights (nearest rounding on the shared grid)."""
    result = copy_model(model)
    for layer in find_linear_layers(result).values():
        set_initializer(result, layer.weight, fake_quantize_weight(layer.weight_array(result), layer.out_axis, bits))
    return result


def test_mean_patch_matches_im2col():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 8, 7, 6)).astype(np.float32) + 1.0
    model = conv_net()
    for name in ("conv1", "dw"):
        layer = next(layer for layer in find_linear_layers(model).values() if layer.name == name)
        shape = layer.weight_array(model).shape
        total, rows = mean_patch(x[:, : shape[0] if layer.is_depthwise else 3], layer, shape)
        group = layer.group
        cols = im2col(x[:, : shape[0] if layer.is_depthwise else 3], ConvPatches((3, 3), pads=(1, 1, 1, 1), group=group))
        expected = cols.mean(axis=1)  # [G, K]
        np.testing.assert_allclose(total / rows, expected if layer.is_depthwise else expected[0], rtol=1e-5, atol=1e-6)


def _mean_output_error(model, quantized, data):
    return np.abs(np.mean(run(quantized, data)[0] - run(model, data)[0], axis=0)).mean()


def test_bias_correction_cancels_mean_shift():
    model, data = conv_net(), conv_data(count=64)
    corrected, _ = bias_correction(model, QuantPlan(w_bits=4), data)
    assert _mean_output_error(model, _rounded(corrected, 4), data) < _mean_output_error(model, _rounded(model, 4), data)
    assert "expand_bias_corrected" in {init.name for init in corrected.graph.initializer}
    # the first layer sees the float input, so its corrected mean output is exactly the float one
    probe = {}
    run_batches(model, data, ["c1"], lambda b: probe.setdefault("float", b["c1"]), batch_size=64, progress=False)
    run_batches(_rounded(corrected, 4), data, ["c1"], lambda b: probe.setdefault("q", b["c1"]), batch_size=64, progress=False)
    run_batches(_rounded(model, 4), data, ["c1"], lambda b: probe.setdefault("q0", b["c1"]), batch_size=64, progress=False)
    shift = np.abs(probe["q"].mean(axis=(0, 2, 3)) - probe["float"].mean(axis=(0, 2, 3)))
    shift_before = np.abs(probe["q0"].mean(axis=(0, 2, 3)) - probe["float"].mean(axis=(0, 2, 3)))
    assert shift.max() < 1e-3 * np.abs(probe["float"]).max() and shift.max() < 0.05 * shift_before.max()


def test_after_gptq_uses_the_recorded_grid_and_float_reference(caplog):
    model, data = conv_net(), conv_data(count=64)
    rounded, plan = gptq(model, QuantPlan(w_bits=4), data, progress=False)
    corrected, plan = bias_correction(rounded, plan, data, float_model=model)
    assert not np.array_equal(initializer_array(corrected, "b2"), initializer_array(rounded, "b2"))
    np.testing.assert_array_equal(initializer_array(corrected, "w2"), initializer_array(rounded, "w2"))
    with caplog.at_level(logging.INFO, logger="passes.bias_correction"):
        bias_correction(corrected, plan, data, float_model=model)
    assert "already corrected" in caplog.text


def test_empirical_mode_matches_the_final_output_mean_exactly():
    model, data = conv_net(), conv_data(count=64)
    corrected, _ = bias_correction(model, QuantPlan(w_bits=4), data, mode="empirical", layers_per_pass=1)
    analytic, _ = bias_correction(model, QuantPlan(w_bits=4), data, mode="analytic")
    float_mean = run(model, data)[0].mean(axis=0)
    empirical_gap = np.abs(run(_rounded(corrected, 4), data)[0].mean(axis=0) - float_mean)
    analytic_gap = np.abs(run(_rounded(analytic, 4), data)[0].mean(axis=0) - float_mean)
    assert empirical_gap.max() < 1e-4 * np.abs(float_mean).max() + 1e-5
    assert empirical_gap.max() < analytic_gap.max()


def test_bad_mode_is_rejected():
    import pytest

    with pytest.raises(ValueError):
        bias_correction(conv_net(), QuantPlan(w_bits=4), conv_data(count=4), mode="guess")
