"""The numpy integer interpreter against onnxruntime running the QDQ model."""

import time

import numpy as np
import onnxruntime as ort
import pytest

from compiler.interpreter import (
    compare_layers_with_onnxruntime,
    compare_with_onnxruntime,
    run_integer_graph,
    run_integer_graph_raw,
)
from compiler.requant import dequantize_linear
from passes.integerize import integerize, tensor_quant
from tests.qdq_fixtures import (
    QDQBuilder,
    conv_block_model,
    matmul_model,
    mobilenet_v2_like_model,
    quantize_qdq,
    random_inputs,
)


def batch(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([s[name] for s in samples]) for name in samples[0]}


@pytest.mark.parametrize("weight_type,activation_type", [
    ("QInt8", "QUInt8"), ("QInt8", "QInt8"), ("QInt4", "QUInt8"), ("QInt8", "QUInt16"),
])
@pytest.mark.parametrize("builder", [conv_block_model, matmul_model])
def test_matches_onnxruntime_within_one_lsb(builder, weight_type, activation_type):
    model = builder()
    qdq = quantize_qdq(model, random_inputs(model, 16), weight_type, activation_type)
    int_model = integerize(qdq)
    samples = random_inputs(model, 8, seed=9)
    layers = compare_layers_with_onnxruntime(qdq, int_model, samples[0])
    assert len(layers) >= 5
    for entry in layers.values():  # each op on onnxruntime's own inputs: rounding ties only
        assert entry["max_lsb"] <= 1 and entry["differing"] <= 0.03 * entry["elements"], layers
    stats = compare_with_onnxruntime(qdq, int_model, batch(samples))
    for entry in stats.values():  # end to end (40-200 values: a few tie flips carry through)
        assert entry["max_lsb"] <= 1 and entry["fraction"] <= 0.2, stats


def test_raw_outputs_dequantize_to_the_float_outputs():
    model = conv_block_model()
    int_model = integerize(quantize_qdq(model, random_inputs(model, 16)))
    sample = batch(random_inputs(model, 4, seed=2))
    raw = run_integer_graph_raw(int_model, sample)["y"]
    dequant = next(n for n in int_model.graph.node if n.op_type == "Dequantize")
    quant = tensor_quant(int_model)[dequant.input[0]]
    assert raw.dtype == np.uint8
    expected = dequantize_linear(raw, quant["scale"], quant["zero_point"])
    assert np.array_equal(run_integer_graph(int_model, sample)["y"], expected)


@pytest.mark.parametrize("attrs", [
    dict(strides=[2, 1], pads=[0, 1, 2, 1]),
    dict(dilations=[2, 2], pads=[2, 2, 2, 2]),
    dict(group=2, pads=[1, 0, 1, 0], strides=[1, 2]),
    dict(group=4, dilations=[1, 2], pads=[1, 2, 1, 2], strides=[2, 2]),  # depthwise
])
def test_conv_geometry_matches_onnxruntime(attrs):
    b = QDQBuilder(seed=5)
    x = b.input("x", [2, 4, 9, 10], scale=0.05, zero_point=117)
    group = attrs.get("group", 1)
    w = b.weight((4, 4 // group, 3, 3))
    conv = b.node("Conv", [x, w, b.bias(4, 0.05 * 0.02)], **attrs)
    model = b.model(b.qdq(conv, 0.05, 90))
    int_model = integerize(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sample = {"x": np.random.default_rng(0).standard_normal((2, 4, 9, 10)).astype(np.float32) * 3}
    ours = run_integer_graph(int_model, sample)["y"]
    theirs = session.run(None, sample)[0]
    assert ours.shape == theirs.shape
    lsb = np.rint(np.abs(ours - theirs) / 0.05)
    assert lsb.max() <= 1 and np.count_nonzero(lsb) <= 0.02 * lsb.size


def test_each_layer_of_a_mobilenet_v2_matches_onnxruntime_on_its_inputs():
    """Layer-local rounding differences (end-to-end they grow through random weights)."""
    model = mobilenet_v2_like_model(resolution=64, classes=10, width=0.5)
    qdq = quantize_qdq(model, random_inputs(model, 4))
    int_model = integerize(qdq)
    stats = compare_layers_with_onnxruntime(qdq, int_model, random_inputs(model, 1, seed=3)[0])
    assert len(stats) >= 60  # every conv, add, pool and the classifier was compared
    elements = sum(entry["elements"] for entry in stats.values())
    differing = sum(entry["differing"] for entry in stats.values())
    assert max(entry["max_lsb"] for entry in stats.values()) <= 1
    assert differing <= 1e-3 * elements


@pytest.mark.slow
def test_mobilenet_v2_batch_8_runs_in_seconds():
    model = mobilenet_v2_like_model()
    int_model = integerize(quantize_qdq(model, random_inputs(model, 2)))
    sample = batch(random_inputs(model, 8, seed=4))
    start = time.perf_counter()
    out = run_integer_graph(int_model, sample)["y"]
    elapsed = time.perf_counter() - start
    assert out.shape == (8, 1000)
    assert elapsed < 30, f"{elapsed:.1f} s"  # ~3-10 s here, depending on the machine's load


@pytest.mark.slow
def test_bundled_fashion_cnn_matches_onnxruntime():
    from models import bundled

    if not bundled.model_path().exists():
        pytest.skip("models/fashion_cnn.onnx is not built yet")
    import onnx

    from passes.canonicalize import canonicalize

    model = canonicalize(onnx.load(bundled.model_path()))  # folds BatchNormalization, as the pipeline does
    calib = bundled.calibration_data()["input"]
    qdq = quantize_qdq(model, [{"input": calib[i:i + 1]} for i in range(0, 256, 8)])
    int_model = integerize(qdq)
    images = {"input": bundled.test_data()[0]["input"][:64]}
    layers = compare_layers_with_onnxruntime(qdq, int_model, {"input": images["input"][:1]})
    assert max(entry["max_lsb"] for entry in layers.values()) <= 1
    stats = compare_with_onnxruntime(qdq, int_model, images)
    for entry in stats.values():
        assert entry["max_lsb"] <= 2 and entry["fraction"] <= 0.1, stats
