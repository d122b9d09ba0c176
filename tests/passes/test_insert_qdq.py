import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.calibrate import collect_ranges
from compiler.fidelity import compare_outputs
from compiler.ort_kernels import kernel_usage
from passes.canonicalize import canonicalize
from passes.insert_qdq import quantize_model, tensors_to_calibrate
from passes.select_layers import select_layers
from tests.tiny_models import random_inputs, tiny_cnn


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def quantized_tiny_cnn(w_bits=8, a_bits=8, integer_only=False, signed=False):
    model = canonicalize(tiny_cnn())
    calib = {"input": random_inputs((3, 16, 16), 64)}
    plan = select_layers(model, w_bits=w_bits, a_bits=a_bits, integer_only=integer_only,
                         activation_signed=signed)
    names = tensors_to_calibrate(model, plan, integer_only=integer_only)
    ranges = collect_ranges(model, calib, names, progress=False)
    return model, plan, quantize_model(model, plan, ranges, integer_only=integer_only)


def outputs(model, x):
    return session(model).run(None, {"input": x})[0]


def test_qdq_model_is_faithful_and_keeps_io_names():
    model, plan, qdq = quantized_tiny_cnn()
    onnx.checker.check_model(qdq)
    assert [v.name for v in qdq.graph.input] == ["input"]
    assert [v.name for v in qdq.graph.output] == ["logits"]
    x = random_inputs((3, 16, 16), 32, seed=7)
    metrics = compare_outputs(outputs(model, x), outputs(qdq, x))
    assert metrics["sqnr_db"] > 25
    assert metrics["top1_agreement"] >= 0.9


def test_weights_are_int8_per_channel_and_bias_int32():
    _, plan, qdq = quantized_tiny_cnn()
    inits = {init.name: init for init in qdq.graph.initializer}
    conv = next(node for node in qdq.graph.node if node.name == "conv2")
    weight_dq = next(node for node in qdq.graph.node if node.output[0] == conv.input[1])
    bias_dq = next(node for node in qdq.graph.node if node.output[0] == conv.input[2])
    assert inits[weight_dq.input[0]].data_type == TensorProto.INT8
    assert numpy_helper.to_array(inits[weight_dq.input[1]]).shape == (8,)  # one scale per channel
    assert inits[bias_dq.input[0]].data_type == TensorProto.INT32
    tq = plan.tensors[plan.layers["conv2"].weight]
    assert tq.axis == 0 and len(tq.scale) == 8 and tq.zero_point == [0] * 8


def test_relu_and_relu6_are_folded_into_the_output_quantizer():
    _, plan, qdq = quantized_tiny_cnn()
    ops = [node.op_type for node in qdq.graph.node]
    assert "Relu" not in ops and "Clip" not in ops
    assert plan.layers["conv1"].info["fused_activation"] == "Relu"
    assert plan.tensors["r2"].range_min == 0.0 and plan.tensors["r2"].range_max <= 6.0
    assert plan.tensors["r1"].zero_point == [0]  # uint8: real 0 is the clamp


def test_pass_through_ops_share_their_input_quantizer():
    _, plan, _ = quantized_tiny_cnn()
    assert plan.tensors["p1"].scale == plan.tensors["r1"].scale  # MaxPool
    assert plan.tensors["flat"].scale == plan.tensors["gap"].scale  # Flatten


def test_onnxruntime_uses_integer_kernels():
    _, _, qdq = quantized_tiny_cnn()
    usage = kernel_usage(qdq)
    assert usage["integer"]["QLinearConv"] == 3
    assert usage["integer"]["QLinearAdd"] == 1 and usage["integer"]["QGemm"] == 1
    assert usage["float"] == {}


def test_output_stays_float_unless_integer_only():
    _, plan, qdq = quantized_tiny_cnn()
    assert "logits" not in plan.tensors
    _, plan_int, qdq_int = quantized_tiny_cnn(integer_only=True)
    assert "logits" in plan_int.tensors
    last = qdq_int.graph.node[-1]
    assert last.op_type == "DequantizeLinear" and last.output[0] == "logits"


def test_int8_activations():
    _, plan, qdq = quantized_tiny_cnn(signed=True)
    assert plan.tensors["input"].dtype == "int8"
    x = random_inputs((3, 16, 16), 4)
    assert outputs(qdq, x).shape == (4, 10)


@pytest.mark.parametrize("w_bits,a_bits", [(4, 8), (8, 16)])
def test_sub_byte_weights_and_16_bit_activations_load_in_onnxruntime(w_bits, a_bits):
    model, plan, qdq = quantized_tiny_cnn(w_bits=w_bits, a_bits=a_bits)
    expected_type = {4: TensorProto.INT4, 8: TensorProto.INT8}[w_bits]
    weight_types = {init.data_type for init in qdq.graph.initializer if init.name.endswith("_quantized")}
    assert expected_type in weight_types
    x = random_inputs((3, 16, 16), 16, seed=3)
    metrics = compare_outputs(outputs(model, x), outputs(qdq, x))
    assert metrics["sqnr_db"] > (10 if w_bits == 4 else 25)
    assert plan.weight_bytes() == sum((layer.weight_params * w_bits + 7) // 8
                                      for layer in plan.layers.values() if layer.w_bits)


def test_concat_inputs_share_one_quantizer():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="conv_a"),
        helper.make_node("Conv", ["x", "w2"], ["b"], name="conv_b"),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "w3"], ["y"], name="conv_out"),
    ]
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in (("w1", (4, 2, 1, 1)), ("w2", (4, 2, 1, 1)), ("w3", (3, 8, 1, 1)))]
    graph = helper.make_graph(nodes, "concat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], inits)
    model = canonicalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    plan = select_layers(model)
    calib = {"x": rng.normal(size=(16, 2, 4, 4)).astype(np.float32)}
    ranges = collect_ranges(model, calib, tensors_to_calibrate(model, plan), progress=False)
    quantize_model(model, plan, ranges)
    assert plan.tensors["a"].scale == plan.tensors["b"].scale == plan.tensors["cat"].scale


def test_dead_channel_bias_fits_int32():
    """A channel with ~zero weights (dead after BN folding) must not overflow its int32 bias."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 2, 1, 1)).astype(np.float32)
    weight[2] = 1e-18
    bias = np.array([0.1, -0.2, 0.5, 0.3], np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "dead", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = canonicalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    plan = select_layers(model, integer_only=True)
    calib = {"x": rng.normal(size=(8, 2, 4, 4)).astype(np.float32)}
    ranges = collect_ranges(model, calib, tensors_to_calibrate(model, plan, integer_only=True), progress=False)
    qdq = quantize_model(model, plan, ranges, integer_only=True)
    bias_init = next(i for i in qdq.graph.initializer if i.data_type == TensorProto.INT32)
    q_bias = numpy_helper.to_array(bias_init)
    assert np.all(np.abs(q_bias.astype(np.int64)) < 2**31 - 1)
    x = calib["x"][:1]
    np.testing.assert_allclose(session(qdq).run(None, {"x": x})[0][0, 2], 0.5, atol=0.05)


def test_activation_stays_when_its_output_is_not_quantized():
    """A partial plan: conv1 alone is quantized, its Relu must still run in float."""
    model = canonicalize(tiny_cnn())
    plan = select_layers(model)
    plan.layers = {"conv1": plan.layers["conv1"]}
    calib = {"input": random_inputs((3, 16, 16), 32)}
    ranges = collect_ranges(model, calib, tensors_to_calibrate(model, plan), progress=False)
    qdq = quantize_model(model, plan, ranges)
    assert "Relu" in [node.op_type for node in qdq.graph.node]
    x = random_inputs((3, 16, 16), 8, seed=5)
    assert compare_outputs(outputs(model, x), outputs(qdq, x))["sqnr_db"] > 30


# -- block-wise weights ------------------------------------------------------------------------


def _blockwise_linear_pair(block: int):
    """linear_pair (Gemm transB [24, 12], MatMul [24, 8]) at w4a8 with block-wise weights."""
    from tests.passes.tiny_models import linear_pair

    model = canonicalize(linear_pair())
    plan = select_layers(model, w_bits=4, a_bits=8)
    plan.weight_block_size = block
    calib = {"x": np.random.default_rng(3).normal(size=(64, 12)).astype(np.float32)}
    ranges = collect_ranges(model, calib, tensors_to_calibrate(model, plan), progress=False)
    return model, plan, quantize_model(model, plan, ranges), calib


def _weight_dequantizers(qdq: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Layer node name -> the DequantizeLinear feeding its weight input."""
    made_by = {node.output[0]: node for node in qdq.graph.node}
    return {node.name: made_by[node.input[1]] for node in qdq.graph.node if node.op_type in ("Gemm", "MatMul")
            and made_by.get(node.input[1]) is not None and made_by[node.input[1]].op_type == "DequantizeLinear"}


def test_block_wise_weights_are_exported_as_blocked_dequantize_linear():
    from compiler.graph import attribute, initializer_array, opset_version

    model, plan, qdq, _ = _blockwise_linear_pair(8)
    onnx.checker.check_model(qdq)
    assert opset_version(qdq) >= 21
    dequantizers = _weight_dequantizers(qdq)
    # Gemm transB weight [N=24, K=12]: blocks along axis 1 (8 + a short 4); MatMul [K=24, N=8]: axis 0
    for layer_name, axis, scale_shape in (("fc1", 1, (24, 2)), ("fc2", 0, (3, 8))):
        node = dequantizers[layer_name]
        tq = plan.tensors[plan.layers[layer_name].weight]
        assert attribute(node, "block_size", 0) == 8 and attribute(node, "axis", 1) == axis
        assert tq.block_size == 8 and tq.axis == axis and tq.scale_shape == list(scale_shape)
        assert initializer_array(qdq, node.input[1]).shape == scale_shape
        np.testing.assert_array_equal(initializer_array(qdq, node.input[2]), tq.zero_point_array())
        assert next(i for i in qdq.graph.initializer if i.name == node.input[0]).data_type == TensorProto.INT4
        assert plan.layers[layer_name].info["weight_block_size"] == 8
    gemm = next(node for node in qdq.graph.node if node.name == "fc1")
    assert initializer_array(qdq, gemm.input[2]) is not None  # no per-channel sx*sw: the bias stays float


def test_block_wise_qdq_model_matches_numpy_block_dequantization():
    """onnxruntime's blocked DequantizeLinear gives exactly the numpy block grid of compiler.quantizers."""
    from compiler.graph import initializer_array
    from compiler.quantizers import fake_quantize_weight
    from passes.insert_qdq import dequantized_value

    model, plan, qdq, calib = _blockwise_linear_pair(8)
    reference = onnx.ModelProto()
    reference.CopyFrom(qdq)
    for layer_name, node in _weight_dequantizers(qdq).items():
        tq = plan.tensors[plan.layers[layer_name].weight]
        float_weight = initializer_array(model, plan.layers[layer_name].weight)
        numpy_value = fake_quantize_weight(float_weight, tq.axis, 4, tq.scale_array(), tq.block_size,
                                           tq.zero_point_array())
        np.testing.assert_array_equal(dequantized_value(qdq, node.output[0]), numpy_value)
        reference.graph.node.remove(node)
        reference.graph.initializer.append(numpy_helper.from_array(numpy_value, node.output[0]))
    x = calib["x"][:16]
    quantized = session(qdq).run(None, {"x": x})[0]
    # The reference runs op by op: with a float weight between Q/DQ activations onnxruntime's
    # graph fusions would quantize that weight themselves.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(reference.SerializeToString(), options, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(quantized, plain.run(None, {"x": x})[0], rtol=1e-5, atol=1e-4)
    assert compare_outputs(session(model).run(None, {"x": x})[0], quantized)["sqnr_db"] > 15


def test_plan_weight_grids_records_blocks_before_rounding():
    from compiler.plan import QuantPlan
    from passes.insert_qdq import plan_weight_grids
    from tests.passes.tiny_models import linear_pair

    model = canonicalize(linear_pair())
    plan = select_layers(model, w_bits=4)
    assert plan_weight_grids(model, plan) == 0 and not plan.tensors  # per channel: nothing to record
    plan.weight_block_size = 16  # fc1's K=12 fits one block: per channel; fc2's K=24 gets blocks
    assert plan_weight_grids(model, plan) == 1
    assert set(plan.tensors) == {plan.layers["fc2"].weight} and plan.tensors[plan.layers["fc2"].weight].block_size == 16
    eight = select_layers(model, w_bits=8)
    eight.weight_block_size = 8
    assert plan_weight_grids(model, eight) == 0  # int8 weights keep onnxruntime's integer kernels
    assert isinstance(eight, QuantPlan)


def test_opset_is_lifted_only_when_a_weight_is_block_wise():
    """A recipe's block size must not touch W8A8 models (MiniLM's transformer recipe sets one)."""
    from compiler.graph import opset_version
    from tests.passes.tiny_models import linear_pair

    model = canonicalize(linear_pair())
    plan = select_layers(model, w_bits=8, a_bits=8)
    plan.weight_block_size = 8
    calib = {"x": np.random.default_rng(3).normal(size=(16, 12)).astype(np.float32)}
    qdq = quantize_model(model, plan, collect_ranges(model, calib, tensors_to_calibrate(model, plan), progress=False))
    assert opset_version(qdq) == opset_version(model) < 21
    assert not any(tq.block_wise for tq in plan.tensors.values())


def test_concat_input_read_elsewhere_keeps_its_own_quantizer():
    """A small Relu map concatenated with a 100x larger branch, and also upsampled into a conv: tied to the
    Concat's quantizer it reached that conv at the Concat's coarse scale (model SQNR 1.7 dB). It is now
    requantized into the Concat, and an input only the Concat reads still shares the Concat's quantizer."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv_small", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Resize", ["r", "", "scales"], ["u"], name="upsample", mode="nearest"),
        helper.make_node("Conv", ["u", "w2"], ["big"], name="conv_big", pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["big"], ["d"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Concat", ["d", "r"], ["cat"], name="concat", axis=1),
    ]
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(8, 4, 3, 3)).astype(np.float32) * 10, "w2"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    graph = helper.make_graph(nodes, "concat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("cat", TensorProto.FLOAT, ["N", 12, 8, 8])], inits)
    model = canonicalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    plan = select_layers(model)
    calib = {"x": rng.normal(size=(16, 3, 8, 8)).astype(np.float32)}
    ranges = collect_ranges(model, calib, tensors_to_calibrate(model, plan), progress=False)
    qdq = quantize_model(model, plan, ranges)
    assert plan.tensors["d"].scale == plan.tensors["cat"].scale  # read only by the Concat: shared
    assert plan.tensors["r"].scale[0] < plan.tensors["cat"].scale[0] / 20  # its own range
    reference, quantized = (session(m).run(None, calib)[0] for m in (model, qdq))
    assert compare_outputs(reference, quantized)["sqnr_db"] > 30


def test_concat_keeps_a_relu_its_signed_neighbour_would_undo():
    """Relu -> (nearest Resize) -> Concat with a signed conv output: sharing the Concat's range (with
    negatives) had dropped the Relu folded into the quantizer (0 dB on the Relu map, 6 dB on the output).
    The Relu map keeps a quantizer from 0 and is requantized into the Concat; two Relu maps still share."""
    rng = np.random.default_rng(0)

    def build(second: str) -> onnx.ModelProto:
        nodes = [
            helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            helper.make_node("Resize", ["r1", "", "scales"], ["up"], name="upsample", mode="nearest"),
            helper.make_node("Conv", ["x", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
            *([helper.make_node("Relu", ["c2"], ["r2"], name="relu2")] if second == "r2" else []),
            helper.make_node("Concat", ["up", second], ["cat"], name="concat", axis=1),
            helper.make_node("Conv", ["cat", "w3"], ["y"], name="conv3"),
        ]
        inits = [numpy_helper.from_array(rng.normal(size=shape).astype(np.float32) / 3, name)
                 for name, shape in (("w1", (4, 3, 3, 3)), ("w2", (4, 3, 3, 3)), ("w3", (2, 8, 1, 1)))]
        inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
        graph = helper.make_graph(nodes, "relu_concat",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 8, 8])], inits)
        return canonicalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))

    calib = {"x": rng.normal(size=(16, 3, 8, 8)).astype(np.float32)}
    for second in ("c2", "r2"):
        model = build(second)
        plan = select_layers(model)
        ranges = collect_ranges(model, calib, tensors_to_calibrate(model, plan), progress=False)
        qdq = quantize_model(model, plan, ranges)
        if second == "c2":  # signed neighbour: the Relu map's quantizer starts at 0
            assert plan.tensors["up"].scale != plan.tensors["cat"].scale
            assert ranges["up"][0] == 0.0
        else:  # both clamped alike: one quantizer, no requantization
            assert plan.tensors["up"].scale == plan.tensors["r2"].scale == plan.tensors["cat"].scale
        reference, quantized = (session(m).run(None, calib)[0] for m in (model, qdq))
        assert compare_outputs(reference, quantized)["sqnr_db"] > 30

