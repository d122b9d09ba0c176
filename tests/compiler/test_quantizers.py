"""The shared weight grid: symmetric per-channel, max|w|/qmax, round half to even."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.quantizers import (
    dequantize_weight,
    fake_quantize_weight,
    quantize_weight,
    weight_output_axis,
    weight_scale,
    weight_tensor_quant,
)


def test_scale_is_channel_absmax_over_qmax():
    weight = np.array([[1.0, -3.0], [0.5, 0.25], [0.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(weight_scale(weight, 0, 8), [3 / 127, 0.5 / 127, 1.0], rtol=1e-7)
    np.testing.assert_allclose(weight_scale(weight, 1, 4), [1 / 7, 3 / 7], rtol=1e-7)
    np.testing.assert_allclose(weight_scale(weight, None, 8), [3 / 127], rtol=1e-7)


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


@pytest.mark.parametrize("bits", [2, 4, 8])
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
