"""2-bit weights in the QDQ export: INT2 where onnxruntime runs it, INT4 containers elsewhere.

The first test probes onnxruntime itself, op type by op type, and checks that
``passes.insert_qdq.int2_runs_in_onnxruntime`` says exactly what onnxruntime
does (both ways: no INT2 where the session would not load, no container where
INT2 would run). The others export tiny models at 2 bits and compare
onnxruntime's outputs with the numpy fake-quantized weights.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.calibrate import collect_ranges
from compiler.graph import attribute, initializer_array, opset_version
from compiler.quantizers import fake_quantize_weight
from passes.canonicalize import canonicalize
from passes.insert_qdq import (
    INT2,
    INT2_CONTAINER,
    INT2_CONTAINER_BITS,
    INT2_ONE_BLOCK,
    dequantized_value,
    int2_runs_in_onnxruntime,
    int2_weight_form,
    quantize_model,
    tensors_to_calibrate,
)
from passes.select_layers import select_layers

ACTIVATION_TYPES = {None: None, "uint8": (TensorProto.UINT8, 128), "int8": (TensorProto.INT8, 0),
                    "uint16": (TensorProto.UINT16, 32768)}
# op type -> (weight shape, input shape, per-channel axis, block axis or None, extra attributes)
PROBE_OPS = {
    "Conv": ([4, 3, 3, 3], [1, 3, 6, 6], 0, None, {}),
    "ConvTranspose": ([3, 4, 3, 3], [1, 3, 6, 6], 1, None, {}),
    "Gemm": ([4, 16], [2, 16], 0, 1, {"transB": 1}),
    "MatMul": ([16, 4], [2, 16], 1, 0, {}),
}
# The same for a per-channel grid written as one block per output channel (block axis = the whole
# reduction axis): a 1x1 convolution's weight is a matrix too.
ONE_BLOCK_PROBE_OPS = {
    "Conv": ([4, 16, 1, 1], [1, 16, 5, 5], 0, 1, {}),
    "Gemm": PROBE_OPS["Gemm"],
    "MatMul": PROBE_OPS["MatMul"],
}


def _session(model: onnx.ModelProto, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:  # op by op: no fusion quantizes a float weight behind our back
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _qdq_pair(tensor: str, activation: str, nodes: list, inits: list) -> str:
    """Route ``tensor`` through Q -> DQ of ``activation``'s type; return the dequantized name."""
    elem_type, zero = ACTIVATION_TYPES[activation]
    inits += [helper.make_tensor(f"{tensor}_s", TensorProto.FLOAT, [], [0.05]),
              helper.make_tensor(f"{tensor}_z", elem_type, [], [zero])]
    nodes += [helper.make_node("QuantizeLinear", [tensor, f"{tensor}_s", f"{tensor}_z"], [f"{tensor}_q"]),
              helper.make_node("DequantizeLinear", [f"{tensor}_q", f"{tensor}_s", f"{tensor}_z"], [f"{tensor}_d"])]
    return f"{tensor}_d"


def _probe_model(op: str, block_wise: bool, storage_bits: int, input_type, output_type, one_block: bool = False):
    """input -> [Q/DQ] -> op(DQ(weight of 2-bit values stored at storage_bits)) -> [Q/DQ], and the same
    graph with the weight as a float initializer (the numpy dequantization). ``one_block``: block-wise
    with one block spanning the reduction axis."""
    weight_shape, input_shape, axis, block_axis, attrs = (ONE_BLOCK_PROBE_OPS if one_block else PROBE_OPS)[op]
    rng = np.random.default_rng(0)
    q = rng.integers(-2, 2, weight_shape)
    block_wise = block_wise or one_block
    block_size = weight_shape[block_axis] if one_block else 8
    if block_wise:
        axis = block_axis
        scale_shape = list(weight_shape)
        scale_shape[axis] //= block_size
        dq_attrs = {"axis": axis, "block_size": block_size}
    else:
        scale_shape = [weight_shape[axis]]
        dq_attrs = {"axis": axis}
    scale = rng.uniform(0.05, 0.2, scale_shape).astype(np.float32)
    zero = rng.integers(-2, 2, scale_shape) if block_wise else np.zeros(scale_shape, np.int64)
    dtype = {2: ml_dtypes.int2, 4: ml_dtypes.int4}[storage_bits]
    nodes, inits = [], [numpy_helper.from_array(q.astype(dtype), "wq"), numpy_helper.from_array(scale, "ws"),
                        numpy_helper.from_array(zero.astype(dtype), "wz")]
    nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], **dq_attrs))
    source = _qdq_pair("x", input_type, nodes, inits) if input_type else "x"
    nodes.append(helper.make_node(op, [source, "w"], ["y"], **attrs))
    result = _qdq_pair("y", output_type, nodes, inits) if output_type else "y"
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info(result, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])
    model.ir_version = 10
    if block_wise:
        full_scale = np.repeat(scale, block_size, axis=axis)
        full_zero = np.repeat(zero, block_size, axis=axis)
    else:
        shape = [1] * len(weight_shape)
        shape[axis] = -1
        full_scale, full_zero = scale.reshape(shape), 0
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    reference.graph.node.remove(reference.graph.node[0])
    del reference.graph.initializer[:3]
    reference.graph.initializer.append(numpy_helper.from_array(((q - full_zero) * full_scale).astype(np.float32), "w"))
    return model, reference, rng.normal(size=input_shape).astype(np.float32)


def _probe_cases():
    for op in PROBE_OPS:
        for block_wise in ((False, True) if PROBE_OPS[op][3] is not None else (False,)):
            for input_type, output_type in itertools.product(("uint8", "int8", "uint16", None),
                                                             ("uint8", "uint16", None)):
                if input_type == "int8" and output_type == "uint8":
                    output_type = "int8"  # signed activations are signed throughout
                yield op, block_wise, input_type, output_type


def _bits(activation: str | None) -> int | None:
    return None if activation is None else int(activation.removeprefix("u").removeprefix("int"))


@pytest.mark.parametrize("op,block_wise,input_type,output_type", list(_probe_cases()))
def test_int2_rule_is_what_onnxruntime_does(op, block_wise, input_type, output_type):
    """INT2 loads exactly where the rule says, then matches numpy; the int4 container always does."""
    expected = int2_runs_in_onnxruntime(op, block_wise, _bits(input_type), _bits(output_type))
    for storage_bits in (2, INT2_CONTAINER_BITS):
        model, reference, x = _probe_model(op, block_wise, storage_bits, input_type, output_type)
        try:
            session = _session(model)
        except Exception as error:  # noqa: BLE001 - onnxruntime's refusal is the probe's answer
            assert storage_bits == 2 and not expected, f"onnxruntime refused {storage_bits}-bit storage: {error}"
            assert "int2" in str(error)
            continue
        assert storage_bits != 2 or expected, "INT2 runs here: the rule stores an int4 container needlessly"
        got, want = session.run(None, {"x": x})[0], _session(reference, optimize=False).run(None, {"x": x})[0]
        # With a float input onnxruntime turns DequantizeLinear(per channel) -> MatMul into MatMulNBits
        # (INT2 and INT4 alike), which quantizes the activation itself: close, not exact.
        tolerance = 0.01 * np.abs(want).max() if (op, block_wise, input_type) == ("MatMul", False, None) else 1e-5
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=tolerance)


def _contexts():
    for input_type, output_type in itertools.product(("uint8", "int8", "uint16", None), ("uint8", "uint16", None)):
        yield input_type, ("int8" if input_type == "int8" and output_type == "uint8" else output_type)


@pytest.mark.parametrize("op", list(ONE_BLOCK_PROBE_OPS))
def test_one_block_int2_form_is_what_onnxruntime_does(op):
    """Where the rule writes a per-channel INT2 weight as one block per channel, onnxruntime runs it
    (and matches numpy); where it falls back to an int4 container, the one-block form does not load."""
    for input_type, output_type in _contexts():
        form = int2_weight_form(op, False, _bits(input_type), _bits(output_type))
        if form == INT2:
            continue  # the per-axis form runs: test_int2_rule_is_what_onnxruntime_does
        model, reference, x = _probe_model(op, False, 2, input_type, output_type, one_block=True)
        context = f"{op} between {input_type} and {output_type}"
        try:
            session = _session(model)
        except Exception as error:  # noqa: BLE001 - onnxruntime's refusal is the probe's answer
            assert form == INT2_CONTAINER, f"{context}: one-block INT2 refused: {error}"
            continue
        assert form == INT2_ONE_BLOCK, f"{context}: one-block INT2 runs, the rule stores a container"
        np.testing.assert_allclose(session.run(None, {"x": x})[0],
                                   _session(reference, optimize=False).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def _all_ops_net(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> ConvTranspose -> Relu -> GAP -> Flatten -> Gemm -> Relu -> MatMul (float output)."""
    rng = np.random.default_rng(seed)
    inits = {"wc": rng.normal(0, 0.3, (8, 3, 3, 3)), "bc": rng.normal(0, 0.1, 8),
             "wt": rng.normal(0, 0.3, (8, 32, 2, 2)), "bt": rng.normal(0, 0.1, 32),
             "wg": rng.normal(0, 0.3, (24, 32)), "bg": rng.normal(0, 0.1, 24),
             "wm": rng.normal(0, 0.3, (24, 10))}
    nodes = [
        helper.make_node("Conv", ["x", "wc", "bc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["rc"], name="relu_c"),
        helper.make_node("ConvTranspose", ["rc", "wt", "bt"], ["t"], name="deconv", strides=[2, 2]),
        helper.make_node("Relu", ["t"], ["rt"], name="relu_t"),
        helper.make_node("GlobalAveragePool", ["rt"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wg", "bg"], ["g"], name="fc", transB=1),
        helper.make_node("Relu", ["g"], ["rg"], name="relu_g"),
        helper.make_node("MatMul", ["rg", "wm"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(nodes, "all_ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return canonicalize(model)


def _export(a_bits: int = 8, block: int | None = None):
    model = _all_ops_net()
    calib = {"x": np.random.default_rng(1).normal(size=(32, 3, 8, 8)).astype(np.float32)}
    plan = select_layers(model, w_bits=2, a_bits=a_bits)
    plan.weight_block_size = block
    ranges = collect_ranges(model, calib, tensors_to_calibrate(model, plan), progress=False)
    return model, plan, quantize_model(model, plan, ranges), calib


def _weight_dequantizers(qdq: onnx.ModelProto, plan) -> dict[str, onnx.NodeProto]:
    by_output = {node.output[0]: node for node in qdq.graph.node if node.op_type == "DequantizeLinear"}
    layers = {node.name: node for node in qdq.graph.node if node.name in plan.layers}
    return {name: by_output[layers[name].input[1]] for name, layer in plan.layers.items() if layer.w_bits}


# Storage the rule gives each layer of _all_ops_net: with 8-bit activations Conv (8-bit input and output)
# and MatMul per channel (8-bit input) would be fused -> int4 containers; ConvTranspose never is;
# per-channel Gemm is written as one block per channel, which is not fused; block-wise Gemm is not
# fused, block-wise MatMul is; 16-bit activations are never fused.
CASES = {
    "w2a8": (8, None, {"conv": 4, "deconv": 2, "fc": 2, "mm": 4}),
    "w2a8 blocks of 8": (8, 8, {"conv": 4, "deconv": 2, "fc": 2, "mm": 4}),
    "w2a16": (16, None, {"conv": 2, "deconv": 2, "fc": 2, "mm": 2}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_bit_export_loads_in_onnxruntime_and_matches_numpy(case):
    a_bits, block, storage = CASES[case]
    model, plan, qdq, calib = _export(a_bits, block)
    onnx.checker.check_model(qdq)
    assert opset_version(qdq) == (25 if 2 in storage.values() else 21)
    inits = {init.name: init for init in qdq.graph.initializer}
    reference = onnx.ModelProto()
    reference.CopyFrom(qdq)
    for name, node in _weight_dequantizers(qdq, plan).items():
        layer, tq = plan.layers[name], plan.tensors[plan.layers[name].weight]
        stored = inits[node.input[0]]
        assert layer.w_bits == 2 and tq.bits == 2 and tq.dtype == "int2"  # the plan records the grid
        assert stored.data_type == {2: TensorProto.INT2, 4: TensorProto.INT4}[storage[name]], name
        assert inits[node.input[2]].data_type == stored.data_type
        assert layer.info["weight_storage"].startswith(f"int{storage[name]}")
        assert layer.info["weight_storage_bits"] == storage[name]
        assert len(stored.raw_data) == (int(np.prod(stored.dims)) * storage[name] + 7) // 8  # packed
        one_block = layer.info.get("weight_one_block", False)
        assert one_block == (name == "fc" and a_bits == 8 and block is None)
        assert bool(attribute(node, "block_size", 0)) == (name in ("fc", "mm") and block is not None or one_block)
        if one_block:  # the per-channel scales, one block spanning the reduction axis
            assert attribute(node, "block_size", 0) == stored.dims[attribute(node, "axis", 1)]
            np.testing.assert_array_equal(numpy_helper.to_array(inits[node.input[1]]).reshape(-1), tq.scale_array())
        values = numpy_helper.to_array(stored).astype(np.int8)
        assert values.min() >= -2 and values.max() <= 1  # 2-bit values, whatever the container
        numpy_value = fake_quantize_weight(initializer_array(model, layer.weight), tq.axis, 2, tq.scale_array(),
                                           tq.block_size, tq.zero_point_array() if tq.block_wise else None)
        np.testing.assert_array_equal(dequantized_value(qdq, node.output[0]), numpy_value)
        reference.graph.node.remove(next(n for n in reference.graph.node if n.output[0] == node.output[0]))
        reference.graph.initializer.append(numpy_helper.from_array(numpy_value, node.output[0]))
    x = calib["x"][:8]
    quantized = _session(qdq).run(None, {"x": x})[0]
    np.testing.assert_allclose(quantized, _session(reference, optimize=False).run(None, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)


def test_int4_weights_are_stored_packed_and_unchanged_in_value():
    """The packed raw_data storage sub-byte weights now use still holds the plan's values."""
    model = _all_ops_net()
    calib = {"x": np.random.default_rng(1).normal(size=(16, 3, 8, 8)).astype(np.float32)}
    plan = select_layers(model, w_bits=4)
    qdq = quantize_model(model, plan, collect_ranges(model, calib, tensors_to_calibrate(model, plan), progress=False))
    assert opset_version(qdq) == 21
    inits = {init.name: init for init in qdq.graph.initializer}
    for name, node in _weight_dequantizers(qdq, plan).items():
        stored = inits[node.input[0]]
        assert stored.data_type == TensorProto.INT4 and len(stored.raw_data) == (int(np.prod(stored.dims)) + 1) // 2
        tq = plan.tensors[plan.layers[name].weight]
        np.testing.assert_array_equal(dequantized_value(qdq, node.output[0]),
                                      fake_quantize_weight(initializer_array(model, plan.layers[name].weight),
                                                           tq.axis, 4, tq.scale_array()))
        assert "weight_storage" not in plan.layers[name].info
    _session(qdq).run(None, {"x": calib["x"][:2]})


@pytest.mark.parametrize("trans_b", [0, 1])
def test_one_block_gemm_weight_runs_exactly_either_layout(trans_b):
    """A Gemm weight [K, N] (transB 0) blocks along axis 0, one [N, K] along axis 1; both dequantize to
    the per-channel grid and onnxruntime's output equals the float graph with that weight."""
    rng = np.random.default_rng(trans_b)
    weight = rng.normal(0, 0.3, (32, 24) if trans_b == 0 else (24, 32)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=trans_b)], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 24])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model = canonicalize(model)
    plan = select_layers(model, w_bits=2, a_bits=8)
    x = rng.normal(size=(16, 32)).astype(np.float32)
    qdq = quantize_model(model, plan, collect_ranges(model, {"x": x}, tensors_to_calibrate(model, plan),
                                                     progress=False))
    node = _weight_dequantizers(qdq, plan)["fc"]
    tq = plan.tensors[plan.layers["fc"].weight]
    assert plan.layers["fc"].info["weight_one_block"] and attribute(node, "axis", 1) == 1 - tq.axis
    numpy_value = fake_quantize_weight(weight, tq.axis, 2, tq.scale_array())
    np.testing.assert_array_equal(dequantized_value(qdq, node.output[0]), numpy_value)
    reference = onnx.ModelProto()
    reference.CopyFrom(qdq)
    reference.graph.node.remove(next(n for n in reference.graph.node if n.output[0] == node.output[0]))
    reference.graph.initializer.append(numpy_helper.from_array(numpy_value, node.output[0]))
    np.testing.assert_array_equal(_session(qdq).run(None, {"x": x})[0],
                                  _session(reference, optimize=False).run(None, {"x": x})[0])
