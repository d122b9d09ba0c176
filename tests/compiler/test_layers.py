"""Layer shapes for the cost models: MACs and element counts from ONNX shape inference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.errors import EdgeqError
from compiler.layers import layer_shapes


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def weight(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], name="dw", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Add", ["c1", "c2"], ["a"], name="add"),
        helper.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        initializer=[weight("w1", (8, 3, 3, 3)), weight("w2", (8, 1, 3, 3)), weight("wf", (5, 8))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_macs_and_elements_per_sample():
    shapes = layer_shapes(_model())
    assert set(shapes) == {"conv", "dw", "add", "gap", "fc"}
    conv = shapes["conv"]
    assert (conv.kind, conv.output_elems, conv.input_elems) == ("conv", 8 * 8 * 8, 3 * 16 * 16)
    assert conv.macs == 8 * 8 * 8 * 3 * 3 * 3 and conv.weight_params == 8 * 3 * 9 and conv.output_channels == 8
    dw = shapes["dw"]
    assert dw.kind == "depthwise" and dw.macs == 8 * 8 * 8 * 9
    assert shapes["add"].kind == "eltwise" and shapes["add"].input_elems == 2 * 512
    assert shapes["gap"].macs == 512 and shapes["gap"].output_elems == 8
    fc = shapes["fc"]
    assert (fc.kind, fc.macs, fc.weight_params, fc.output_channels) == ("gemm", 40, 40, 5)


def test_one_by_one_convs_are_pointwise_unless_grouped():
    """A 1x1 conv of one group is a matrix product per pixel, priced apart from KxK convs (the CPU
    table has its own row); a grouped 1x1 conv stays a conv."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["p"], name="pointwise"),
             helper.make_node("Conv", ["p", "w2"], ["y"], name="grouped", group=2)]
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w1", (8, 4, 1, 1)), ("w2", (8, 4, 1, 1)))]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 5, 5])], initializer=inits)
    shapes = layer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert (shapes["pointwise"].kind, shapes["pointwise"].macs) == ("pointwise", 8 * 25 * 4)
    assert (shapes["grouped"].kind, shapes["grouped"].macs) == ("conv", 8 * 25 * 4)


def test_batch_and_selection():
    shapes = layer_shapes(_model(), ["fc"], input_shapes={"x": [4, 3, 16, 16]})
    assert list(shapes) == ["fc"] and shapes["fc"].macs == 4 * 40
    with pytest.raises(EdgeqError, match="not in the model"):
        layer_shapes(_model(), ["nope"])


def test_falls_back_to_running_the_model_when_shapes_are_unknown():
    model = _model()
    # Hide the shapes from ONNX shape inference: a Reshape to a runtime-computed shape.
    shape_nodes = [
        helper.make_node("Shape", ["f"], ["fs"], name="shape"),
        helper.make_node("Reshape", ["f", "fs"], ["f2"], name="reshape"),
    ]
    nodes = list(model.graph.node)
    nodes[-1].input[0] = "f2"
    del model.graph.node[:]
    model.graph.node.extend(nodes[:-1] + shape_nodes + nodes[-1:])
    shapes = layer_shapes(model)
    assert shapes["fc"].macs == 40
