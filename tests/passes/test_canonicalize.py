import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.errors import EdgeqError
from compiler.graph import attribute, opset_version
from passes.canonicalize import canonicalize
from tests.tiny_models import flatten_by_batch_model, random_inputs, tiny_cnn


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_float_function_is_preserved_and_bn_folded():
    model = tiny_cnn()
    x = random_inputs((3, 16, 16), 8)
    result = canonicalize(model)
    np.testing.assert_allclose(run(result, x), run(model, x), rtol=1e-4, atol=1e-5)
    assert "BatchNormalization" not in [node.op_type for node in result.graph.node]
    # the caller's model is untouched
    assert "BatchNormalization" in [node.op_type for node in model.graph.node]


def test_node_names_are_kept_and_unique():
    result = canonicalize(tiny_cnn())
    names = [node.name for node in result.graph.node]
    assert len(set(names)) == len(names)
    assert {"conv1", "conv2", "fc", "residual_add"} <= set(names)


def _model(nodes, inits, opset=13, out_shape=(2, 4)):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


def test_identity_dropout_and_constant_subgraphs_go_away():
    scale = numpy_helper.from_array(np.full((4,), 2.0, np.float32), "two")
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.full((4,), 3.0, np.float32))),
        helper.make_node("Mul", ["c", "two"], ["c6"], name="fold_me"),
        helper.make_node("Identity", ["x"], ["xi"]),
        helper.make_node("Dropout", ["xi"], ["xd"]),
        helper.make_node("Add", ["xd", "c6"], ["y"], name="add"),
    ]
    model = _model(nodes, [scale])
    result = canonicalize(model)
    assert [node.op_type for node in result.graph.node] == ["Add"]
    x = random_inputs((4,), 2)
    np.testing.assert_allclose(run(result, x), x + 6.0)


def test_old_opset_is_upgraded():
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    model = _model(nodes, [], opset=9)
    result = canonicalize(model)
    assert opset_version(result) >= 13
    x = random_inputs((4,), 2)
    np.testing.assert_allclose(run(result, x), np.maximum(x, 0))


def test_unconvertible_opset_is_a_user_error():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [], opset=13)
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("custom.domain", 1))
    with pytest.raises(EdgeqError, match="opset"):
        canonicalize(model)


@pytest.mark.slow
def test_real_model_function_preserved():
    pytest.importorskip("torch")
    from models import zoo
    from models.photos import evaluation_images

    model = onnx.load(str(zoo.build("mobilenetv2")))
    x = evaluation_images()[:4]
    result = canonicalize(model)
    np.testing.assert_allclose(run(result, x), run(model, x), rtol=1e-3, atol=1e-3)
    assert "BatchNormalization" not in [node.op_type for node in result.graph.node]


def test_zero_pad_folds_into_the_following_conv():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([0, 0, 0, 1, 0, 0, 1, 2], np.int64), "pads"),
             numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Pad", ["x", "pads"], ["padded"], name="pad"),
             helper.make_node("Conv", ["padded", "w"], ["y"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = canonicalize(model)
    assert [node.op_type for node in result.graph.node] == ["Conv"]
    assert attribute(result.graph.node[0], "pads") == [1, 2, 2, 3]
    x = rng.normal(size=(1, 3, 9, 9)).astype(np.float32)
    np.testing.assert_allclose(run(result, x), run(model, x), rtol=1e-5, atol=1e-5)


def test_reshape_to_the_batch_size_gets_a_constant_target():
    model = flatten_by_batch_model(0)
    result = canonicalize(model)
    reshape = next(node for node in result.graph.node if node.op_type == "Reshape")
    target = next(init for init in result.graph.initializer if init.name == reshape.input[1])
    assert numpy_helper.to_array(target).tolist() == [0, -1]  # 0: keep the (dynamic) batch dimension
    assert {node.op_type for node in result.graph.node} == {"Conv", "GlobalAveragePool", "Reshape", "Gemm"}
    for batch in (1, 3):  # the batch stays dynamic
        x = random_inputs((3, 4, 4), batch)
        np.testing.assert_allclose(run(result, x), run(model, x), rtol=1e-5, atol=1e-6)


def test_reshape_to_another_dimension_keeps_its_computed_target():
    """x.size(1) is 3 (static): [3, -1] is a constant target too; but a dynamic dimension read at
    another position than the one it fills cannot be written as 0."""
    static = canonicalize(flatten_by_batch_model(1))
    reshape = next(node for node in static.graph.node if node.op_type == "Reshape")
    assert numpy_helper.to_array(next(i for i in static.graph.initializer if i.name == reshape.input[1])).tolist() == [3, -1]
    model = flatten_by_batch_model(0)
    concat = next(node for node in model.graph.node if node.op_type == "Concat")
    concat.input[:] = ["minus_one", "b1"]  # [-1, batch]: the batch size lands in position 1
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "rows"
    result = canonicalize(model)
    assert "Shape" in {node.op_type for node in result.graph.node}
