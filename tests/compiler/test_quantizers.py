"""The shared weight grid: symmetric per-channel, max|w|/qmax, round half to even."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.quantizers import (
    MIN_CHANNEL_SCALE_RATIO,
    dequantize_weight,
    fake_quantize_weight,
    quantize_weight,
    weight_output_axis,
    weight_scale,
    weight_tensor_quant,
)


def test_scale_is_channel_absmax_over_qmax():
    weight = np.array([[1.0, -3.0], [0.5, 0.25], [0.0, 0.0]], dtype=np.float32)
    floor = 3 / 127 * MIN_CHANNEL_SCALE_RATIO  # the all-zero channel: any scale is exact
    np.testing.assert_allclose(weight_scale(weight, 0, 8), [3 / 127, 0.5 / 127, floor], rtol=1e-7)
    np.testing.assert_allclose(weight_scale(weight, 1, 4), [1 / 7, 3 / 7], rtol=1e-7)
    np.testing.assert_allclose(weight_scale(weight, None, 8), [3 / 127], rtol=1e-7)


def test_a_dead_channel_scale_is_floored_so_its_int32_bias_stays_small():
    """A channel 1e-9 of the largest (a dead one after BatchNorm folding) gets 2**-12 of the largest
    scale: its weights' error stays far below the largest channel's rounding step, and its bias at
    ``sx * sw`` far from int32's limit."""
    weight = np.array([[1.0, -3.0], [2e-9, -1e-9], [1e-3, 2e-3]], dtype=np.float32)
    scale = weight_scale(weight, 0, 8)
    assert scale[1] == pytest.approx(3 / 127 * MIN_CHANNEL_SCALE_RATIO, rel=1e-6)
    assert scale[2] == pytest.approx(2e-3 / 127, rel=1e-6)  # above the floor: its own
    error = np.abs(fake_quantize_weight(weight, 0, 8) - weight)
    assert error[1].max() <= scale[1] / 2 < (3 / 127) / 2 / 1000
    bias_at_input_scale = 0.5 / (0.02 * scale[1])  # bias 0.5, input scale 0.02
    assert abs(bias_at_input_scale) < 2**24


def test_quantize_rounds_half_to_even_and_hits_the_extremes():
    scale = np.array([1.0], dtype=np.float32)
    weight = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 9.0, -9.0], dtype=np.float32)
    q = quantize_weight(weight, scale, None, 4)
    assert q.tolist() == [0, 2, 2, 0, -2, 7, -8]
    assert q.dtype == np.int8
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)
    qw = quantize_weight(w, weight_scale(w, 0, 4), 0, 4)
    assert np.all(np.abs(qw).reshape(5, -1).max(axis=1) == 7)


@pytest.mark.parametrize("bits", [4, 8])  # 2-bit scales clip on purpose: test_two_bit_* below
def test_fake_quant_error_is_at_most_half_a_step(bits):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(16, 8, 3, 3)).astype(np.float32) * rng.uniform(0.01, 10, size=(16, 1, 1, 1))
    scale = weight_scale(w, 0, bits)
    err = np.abs(fake_quantize_weight(w, 0, bits) - w)
    assert np.all(err <= scale.reshape(-1, 1, 1, 1) / 2 * (1 + 1e-6))


def test_matches_onnx_quantize_linear_per_channel():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 4)).astype(np.float32)
    axis = 1
    scale = weight_scale(w, axis, 8)
    node = helper.make_node("QuantizeLinear", ["w", "s", "zp"], ["q"], axis=axis)
    graph = helper.make_graph(
        [node],
        "q",
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, [6, 4])],
        [helper.make_tensor_value_info("q", TensorProto.INT8, [6, 4])],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(np.zeros(4, np.int8), "zp")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"w": w})[0], quantize_weight(w, scale, axis, 8))


def test_tensor_quant_entry_and_axes():
    w = np.arange(12, dtype=np.float32).reshape(3, 4) - 6
    tq = weight_tensor_quant("w", w, -1, 4)
    assert tq.axis == 1 and tq.bits == 4 and tq.signed and tq.zero_point == [0] * 4
    np.testing.assert_allclose(tq.scale_array(), weight_scale(w, 1, 4))
    q = quantize_weight(w, tq.scale_array(), 1, 4)
    np.testing.assert_allclose(dequantize_weight(q, tq.scale_array(), 1), fake_quantize_weight(w, 1, 4))
    assert weight_output_axis("Conv", 4) == 0
    assert weight_output_axis("Gemm", 2, trans_b=1) == 0
    assert weight_output_axis("MatMul", 2) == 1


def test_planned_scale_prefers_the_plan_entry():
    from compiler.quantizers import planned_weight_scale

    w = np.random.default_rng(3).normal(size=(4, 5)).astype(np.float32)
    assert np.array_equal(planned_weight_scale({}, "w", w, 0, 4), weight_scale(w, 0, 4))
    entry = weight_tensor_quant("w", w, 0, 4, scale=weight_scale(w, 0, 4) * 0.5)
    assert np.array_equal(planned_weight_scale({"w": entry}, "w", w, 0, 4), entry.scale_array())
    with pytest.raises(ValueError):
        planned_weight_scale({"w": entry}, "w", w, 0, 8)


def test_activation_mse_clip_never_loses_to_minmax():
    from compiler.quantizers import fake_quantize_activation

    x = np.random.default_rng(4).normal(size=4096).astype(np.float32)  # rare tails: clipping pays at 4 bits
    plain = np.sum((fake_quantize_activation(x, 4) - x) ** 2)
    clipped = np.sum((fake_quantize_activation(x, 4, mse_clip=True) - x) ** 2)
    assert clipped < plain


# -- block-wise weights ------------------------------------------------------------------------


def test_block_scale_is_block_absmax_with_a_short_last_block():
    w = np.arange(1, 31, dtype=np.float32).reshape(10, 3) * np.where(np.arange(30) % 2, -1, 1).reshape(10, 3)
    scale = weight_scale(w, 0, 4, block_size=4)  # blocks of rows 0-3, 4-7, 8-9
    assert scale.shape == (3, 3)
    expected = np.stack([np.abs(w[0:4]).max(0), np.abs(w[4:8]).max(0), np.abs(w[8:10]).max(0)]) / 7
    np.testing.assert_allclose(scale, expected, rtol=1e-7)
    np.testing.assert_allclose(weight_scale(w.T, 1, 4, block_size=4), expected.T, rtol=1e-7)
    zero = np.zeros((8, 2), np.float32)
    assert np.all(weight_scale(zero, 0, 4, block_size=4) == 1.0)


def test_block_quantization_error_is_at_most_half_a_block_step():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(96, 8)).astype(np.float32) * rng.uniform(0.01, 10, size=(96, 1))
    scale = weight_scale(w, 0, 4, block_size=32)
    step = np.repeat(scale, 32, axis=0)
    assert np.all(np.abs(fake_quantize_weight(w, 0, 4, block_size=32) - w) <= step / 2 * (1 + 1e-6))


@pytest.mark.parametrize("axis,shape,block", [(0, (40, 6), 16), (1, (6, 40), 16), (0, (64, 4), 32)])
def test_block_dequantization_matches_onnxruntime(axis, shape, block):
    """A block-wise int4 DequantizeLinear (opset 21) in onnxruntime equals dequantize_weight, ragged blocks too."""
    w = np.random.default_rng(6).normal(size=shape).astype(np.float32)
    scale = weight_scale(w, axis, 4, block_size=block)
    q = quantize_weight(w, scale, axis, 4, block_size=block)
    inits = [helper.make_tensor("q", TensorProto.INT4, shape, q.flatten().tolist()),
             numpy_helper.from_array(scale, "s"),
             helper.make_tensor("z", TensorProto.INT4, scale.shape, [0] * scale.size)]
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=axis, block_size=block)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    value = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    np.testing.assert_array_equal(value, dequantize_weight(q, scale, axis, block_size=block))


def test_blocks_beat_per_channel_on_a_weight_with_outliers():
    """An outlier inflates its whole column's per-channel step, but only its own block's step: about
    block/256 of the elements keep the coarse step, the others get the fine one of plain Gaussian weights."""
    rng = np.random.default_rng(7)
    w = rng.normal(size=(256, 16)).astype(np.float32)
    w[rng.integers(0, 256, 16), np.arange(16)] = 25.0  # one large input weight per output channel
    per_channel = np.sum((fake_quantize_weight(w, 1, 4) - w) ** 2)
    for block in (32, 64, 128):
        blocked = np.sum((fake_quantize_weight(w, 0, 4, block_size=block) - w) ** 2)
        assert blocked < (block / 256 + 0.1) * per_channel, block


def test_block_tensor_quant_records_shape_and_round_trips_through_json():
    from compiler.plan import QuantPlan

    w = np.random.default_rng(8).normal(size=(64, 5)).astype(np.float32)
    tq = weight_tensor_quant("w", w, 0, 4, block_size=32)
    assert tq.block_size == 32 and tq.scale_shape == [2, 5] and tq.axis == 0 and len(tq.scale) == 10
    assert tq.granularity == "block 32" and tq.zero_point_array().shape == (2, 5)
    np.testing.assert_array_equal(tq.scale_array(), weight_scale(w, 0, 4, block_size=32))
    plan = QuantPlan(weight_block_size=32, tensors={"w": tq})
    loaded = QuantPlan.from_dict(json.loads(plan.to_json()))
    assert loaded.weight_block_size == 32
    np.testing.assert_array_equal(loaded.tensors["w"].scale_array(), tq.scale_array())
    assert plan.weight_scale_bytes() == 10 * 4 + 5  # fp32 scales + packed int4 zero points


def test_planned_scale_expands_a_block_entry():
    from compiler.quantizers import planned_weight_scale

    w = np.random.default_rng(9).normal(size=(6, 64)).astype(np.float32)  # Gemm transB: [N, K]
    entry = weight_tensor_quant("w", w, 1, 4, block_size=16)
    expanded = planned_weight_scale({"w": entry}, "w", w, 0, 4)
    assert expanded.shape == w.shape
    np.testing.assert_array_equal(fake_quantize_weight(w, 0, 4, expanded), fake_quantize_weight(w, 1, 4, block_size=16))
    with pytest.raises(ValueError):
        planned_weight_scale({"w": entry}, "w", w, 0, 8)


def test_which_layers_get_blocks():
    from compiler.quantizers import layer_weight_grid

    assert layer_weight_grid(32, "MatMul", (384, 1536), 4, 1) == (0, 32)  # [K, N]: blocks along K
    assert layer_weight_grid(32, "Gemm", (1536, 384), 4, 0) == (1, 32)  # transB [N, K]
    assert layer_weight_grid(32, "MatMul", (384, 1536), 8, 1) == (1, None)  # int8 stays per channel
    assert layer_weight_grid(32, "Conv", (16, 8, 3, 3), 4, 0) == (0, None)
    assert layer_weight_grid(32, "MatMul", (32, 64), 4, 1) == (1, None)  # one block = per channel
    assert layer_weight_grid(None, "MatMul", (384, 64), 4, 1) == (1, None)


def test_asymmetric_block_grid_fits_skewed_blocks_better():
    """A zero point per block spends all 16 levels on [min, max]; the clipping search only helps."""
    from compiler.quantizers import block_weight_quant, search_weight_grid

    rng = np.random.default_rng(10)
    w = (rng.gamma(2.0, size=(8, 256)) - 0.5).astype(np.float32)  # mostly positive, skewed
    errors = {}
    for name, asymmetric, grid in (("symmetric", False, 20), ("asymmetric minmax", True, 1),
                                   ("asymmetric", True, 20)):
        scale, zero = search_weight_grid(w, None, 4, 32, asymmetric=asymmetric, grid=grid)
        assert scale.shape == (8, 8) and (zero is None) != asymmetric
        errors[name] = np.sum((fake_quantize_weight(w, 1, 4, scale, 32, zero) - w) ** 2)
    assert errors["asymmetric"] <= errors["asymmetric minmax"] < 0.7 * errors["symmetric"]
    tq = block_weight_quant("w", w.T, 0, 4, 32)  # the same weight as a MatMul [K, N]: blocks along axis 0
    assert tq.scale_shape == [8, 8] and tq.zero_point_array().shape == (8, 8)
    fitted = fake_quantize_weight(w.T, 0, 4, tq.scale_array(), 32, tq.zero_point_array())
    np.testing.assert_allclose(np.sum((fitted - w.T) ** 2), errors["asymmetric"], rtol=1e-5)


def _relative_error(approx: np.ndarray, w: np.ndarray, axis: int = 0) -> np.ndarray:
    reduce = tuple(a for a in range(w.ndim) if a != axis)
    return np.sum((approx - w) ** 2, axis=reduce) / np.sum(w**2, axis=reduce)


@pytest.mark.parametrize("shape,axis", [((16, 8, 3, 3), 0), ((32, 12), 1)])
def test_two_bit_per_channel_scales_are_searched_not_min_max(shape, axis):
    """A min-max ternary scale rounds most weights to 0; the searched scale clips the tails instead."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=shape).astype(np.float32)
    scale = weight_scale(w, axis, 2)
    reduce = tuple(a for a in range(w.ndim) if a != axis)
    absmax = np.max(np.abs(w), axis=reduce)
    assert scale.shape == (shape[axis],) and np.all(scale < absmax)  # clipped below max|w| / qmax
    q = quantize_weight(w, scale, axis, 2)
    assert q.min() >= -2 and q.max() <= 1 and len(np.unique(q)) == 4
    searched = _relative_error(fake_quantize_weight(w, axis, 2), w, axis)
    min_max = _relative_error(fake_quantize_weight(w, axis, 2, absmax.astype(np.float32)), w, axis)
    assert np.all(searched < min_max) and np.mean(searched) < 0.5 * np.mean(min_max)
    # No clipping ratio in [0.5, 1] on a finer grid does much better: the search found its neighbourhood.
    for ratio in np.linspace(0.5, 1.0, 101):
        finer = _relative_error(fake_quantize_weight(w, axis, 2, (absmax * ratio).astype(np.float32)), w, axis)
        assert np.all(searched <= finer + 0.01)


def test_two_bit_per_tensor_and_block_scales_have_the_int4_shapes():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(24, 40)).astype(np.float32)
    assert weight_scale(w, None, 2).shape == weight_scale(w, None, 4).shape == (1,)
    assert weight_scale(w, 1, 2, block_size=16).shape == weight_scale(w, 1, 4, block_size=16).shape == (24, 3)
    blocked = fake_quantize_weight(w, 1, 2, block_size=16)
    per_channel = fake_quantize_weight(w, 0, 2)
    assert np.sum((blocked - w) ** 2) < np.sum((per_channel - w) ** 2)  # more scales, less error


def test_two_bit_block_grid_is_asymmetric_with_zero_points_in_range():
    from compiler.quantizers import block_weight_quant

    rng = np.random.default_rng(4)
    w = (rng.normal(size=(64, 12)) + 0.5).astype(np.float32)  # MatMul [K, N], shifted: asymmetric blocks help
    tq = block_weight_quant("w", w, 0, 2, 16)
    assert tq.bits == 2 and tq.block_size == 16 and tq.scale_shape == [4, 12]
    zero = tq.zero_point_array()
    assert zero.min() >= -2 and zero.max() <= 1 and np.any(zero != 0)
    asymmetric = fake_quantize_weight(w, 0, 2, tq.scale_array(), 16, zero)
    symmetric = fake_quantize_weight(w, 0, 2, block_size=16)
    assert np.sum((asymmetric - w) ** 2) <= np.sum((symmetric - w) ** 2)
    q = quantize_weight(w, tq.scale_array(), 0, 2, 16, zero)
    assert q.min() >= -2 and q.max() <= 1
