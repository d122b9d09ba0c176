"""Tiny float models built with onnx.helper, shared by the tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def tiny_cnn(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """Conv+BN+Relu -> MaxPool -> Conv+Clip(0,6) -> residual Add -> Relu -> GAP -> Flatten -> Gemm.

    Covers BN folding, activation fusion, pass-through quantizers, a residual
    Add and a Gemm head; input "input" [N, 3, 16, 16], output "logits" [N, 10].
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["bn1"], name="bn1"),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c2", "zero", "six"], ["r2"], name="relu6_2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3", group=8, pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c3", "p1"], ["sum"], name="residual_add"),
        helper.make_node("Relu", ["sum"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wfc", "bfc"], ["logits"], name="fc", transB=1),
    ]
    inits = [
        _init("w1", rng.normal(0, 0.3, (8, 3, 3, 3))), _init("b1", rng.normal(0, 0.1, 8)),
        _init("g1", rng.uniform(0.5, 1.5, 8)), _init("be1", rng.normal(0, 0.1, 8)),
        _init("m1", rng.normal(0, 0.1, 8)), _init("v1", rng.uniform(0.5, 1.5, 8)),
        _init("w2", rng.normal(0, 0.2, (8, 8, 3, 3))), _init("b2", rng.normal(0, 0.1, 8)),
        _init("zero", np.array(0.0)), _init("six", np.array(6.0)),
        _init("w3", rng.normal(0, 0.3, (8, 1, 3, 3))), _init("b3", rng.normal(0, 0.1, 8)),
        _init("wfc", rng.normal(0, 0.3, (10, 8))), _init("bfc", rng.normal(0, 0.1, 10)),
    ]
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def flatten_by_batch_model(gather_index: int = 0) -> onnx.ModelProto:
    """x [batch, 3, 4, 4] -> Conv -> GlobalAveragePool -> Reshape(to [x.shape[gather_index], -1]) -> Gemm,
    the target computed as PyTorch's ``x.view(x.size(0), -1)`` exports it."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "index"], ["b"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["b", "axes"], ["b1"], name="unsqueeze"),
        helper.make_node("Concat", ["b1", "minus_one"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["g", "target"], ["f"], name="reshape"),
        helper.make_node("Gemm", ["f", "wf"], ["y"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((5, 6)).astype(np.float32), "wf"),
             numpy_helper.from_array(np.array(gather_index, np.int64), "index"),
             numpy_helper.from_array(np.array([0], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def random_inputs(shape: tuple[int, ...], n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, *shape)).astype(np.float32)


def single_conv(dims: list, extra_input: bool = False) -> onnx.ModelProto:
    """x [dims] -> Conv(3 -> 4, 3x3, same padding); optionally a second input added to the output."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3],
                                np.random.default_rng(0).normal(size=108).astype(np.float32).tolist())
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)]
    output = "y"
    if extra_input:
        inputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 4, 1, 1]))
        nodes.append(helper.make_node("Add", ["y", "bias"], ["z"]))
        output = "z"
    output_dims = [dims[0], 4, *dims[2:]]  # same padding: the input's map size
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_dims)],
                              [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model
