import numpy as np
from onnx import TensorProto, helper, numpy_helper

from passes.canonicalize import canonicalize
from passes.select_layers import select_layers
from tests.tiny_models import tiny_cnn


def test_cnn_layers_selected_with_default_bits():
    plan = select_layers(canonicalize(tiny_cnn()), w_bits=4, a_bits=8)
    assert list(plan.layers) == ["conv1", "conv2", "conv3", "residual_add", "gap", "fc"]
    assert plan.layers["conv1"].w_bits == 4 and plan.layers["conv1"].weight_params == 8 * 3 * 3 * 3
    assert plan.layers["residual_add"].w_bits is None
    assert plan.layers["residual_add"].inputs == ["c3", "p1"]
    assert plan.float_nodes == []


def _attention_block():
    """Embedding + a masked self-attention score, as BERT exports it."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(50, 8)).astype(np.float32), "embeddings"),
        numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "wq"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "min_value"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Gather", ["embeddings", "input_ids"], ["hidden"], name="embed"),
        helper.make_node("MatMul", ["hidden", "wq"], ["query"], name="q_proj"),
        helper.make_node("Transpose", ["query"], ["key_t"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["query", "key_t"], ["scores"], name="qk"),
        helper.make_node("Unsqueeze", ["attention_mask", "axis1"], ["mask3"], name="unsq"),
        helper.make_node("Cast", ["mask3"], ["mask_f"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "mask_f"], ["inverted"], name="invert"),
        helper.make_node("Mul", ["inverted", "min_value"], ["mask_bias"], name="mask_scale"),
        helper.make_node("Add", ["scores", "mask_bias"], ["masked"], name="mask_add"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 6]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, 6])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_attention_mask_and_softmax_stay_float_with_reasons():
    plan = select_layers(_attention_block())
    assert "q_proj" in plan.layers
    reasons = {entry["node"]: entry["reason"] for entry in plan.float_nodes}
    assert "mask" in reasons["mask_add"]
    assert "attention" in reasons["qk"]
    assert "softmax" in reasons
    assert "mask_add" not in plan.layers


def test_integer_only_quantizes_attention_matmul():
    plan = select_layers(_attention_block(), integer_only=True)
    assert "qk" in plan.layers
    assert "softmax" in plan.layers  # integer-only code has a QSoftmax; elsewhere it stays float (above)
    assert "mask_add" not in plan.layers


def test_elementwise_functions_are_layers_only_for_integer_only_targets():
    from passes.canonicalize import canonicalize
    from tests.qdq_fixtures import mobilenet_v3_block_model

    model = canonicalize(mobilenet_v3_block_model())  # names every node
    integer = select_layers(model, integer_only=True)
    kept = select_layers(model)
    for op in ("HardSwish", "HardSigmoid", "Sigmoid", "Softmax"):
        assert op in {integer.layers[name].op_type for name in integer.layers}, op
        assert op in {entry["op_type"] for entry in kept.float_nodes}, op

