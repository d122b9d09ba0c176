"""Tiny float ONNX graphs (onnx.helper) and an onnxruntime runner for the transform tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def max_rel_error(before: list[np.ndarray], after: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12)) for a, b in zip(after, before, strict=True))


def _uneven(rng, shape, axis=0, spread=3.0):
    """Weights whose output channels span ``10**spread`` in magnitude (what CLE fixes)."""
    scale_shape = [1] * len(shape)
    scale_shape[axis] = shape[axis]
    return (rng.normal(size=shape) * 10 ** rng.uniform(-spread / 2, spread / 2, size=scale_shape)).astype(np.float32)


def conv_net(seed: int = 0) -> onnx.ModelProto:
    """conv3x3 -> Relu -> depthwise -> ReLU6 -> 1x1 -> (linear) 1x1 -> Relu -> GAP -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": _uneven(rng, (8, 3, 3, 3)), "b1": rng.normal(size=8).astype(np.float32),
        "wd": _uneven(rng, (8, 1, 3, 3)), "bd": rng.normal(size=8).astype(np.float32),
        "w2": _uneven(rng, (6, 8, 1, 1)), "b2": rng.normal(size=6).astype(np.float32),
        "w3": _uneven(rng, (10, 6, 1, 1)),
        "wf": _uneven(rng, (4, 10)), "bf": rng.normal(size=4).astype(np.float32),
        "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "wd", "bd"], ["cd"], name="dw", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Clip", ["cd", "lo", "hi"], ["rd"], name="relu6"),
        helper.make_node("Conv", ["rd", "w2", "b2"], ["c2"], name="project"),
        helper.make_node("Conv", ["c2", "w3"], ["c3"], name="expand"),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )


def conv_data(count: int = 32, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=(count, 3, 8, 8)).astype(np.float32)}


def mlp_block(seed: int = 0, hidden: int = 16, ffn: int = 32, outlier: float = 30.0, residual: str = "ln") -> onnx.ModelProto:
    """Transformer-like block: x -> LayerNorm -> {MatMul q, MatMul k+Add} ; LN -> MatMul+Add -> Gelu-ish -> MatMul+Add -> + x.

    ``outlier`` scales a few LayerNorm gamma channels (the activation outliers smoothing targets).
    ``residual`` is the tensor added back at the end: "ln" (post-LN style, the LN output has
    a non-linear consumer) or "x".
    """
    rng = np.random.default_rng(seed)
    gamma = np.ones(hidden, np.float32) + 0.1 * rng.normal(size=hidden).astype(np.float32)
    gamma[[1, 7]] *= outlier
    inits = {
        "gamma": gamma, "beta": (0.5 * rng.normal(size=hidden)).astype(np.float32),
        "wq": rng.normal(size=(hidden, hidden)).astype(np.float32) / 4,
        "wk": rng.normal(size=(hidden, hidden)).astype(np.float32) / 4,
        "bk": rng.normal(size=hidden).astype(np.float32),
        "w_up": rng.normal(size=(hidden, ffn)).astype(np.float32) / 4,
        "b_up": rng.normal(size=ffn).astype(np.float32),
        "w_down": rng.normal(size=(ffn, hidden)).astype(np.float32) / 4,
        "b_down": rng.normal(size=hidden).astype(np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["ln", "wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["ln", "wk"], ["k0"], name="k"),
        helper.make_node("Add", ["k0", "bk"], ["k"], name="k_bias"),
        helper.make_node("Mul", ["q", "k"], ["qk"], name="qk"),
        helper.make_node("MatMul", ["qk", "w_up"], ["up0"], name="up"),
        helper.make_node("Add", ["up0", "b_up"], ["up"], name="up_bias"),
        helper.make_node("Sigmoid", ["up"], ["sig"], name="sig"),
        helper.make_node("Mul", ["up", "sig"], ["act"], name="silu"),
        helper.make_node("MatMul", ["act", "w_down"], ["down0"], name="down"),
        helper.make_node("Add", ["down0", "b_down"], ["down"], name="down_bias"),
        helper.make_node("Add", ["down", residual], ["y"], name="residual"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", hidden])],
        inits,
    )


def mlp_data(count: int = 16, seq: int = 8, hidden: int = 16, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=(count, seq, hidden)).astype(np.float32)}


def attention_block(seed: int = 0, hidden: int = 16, heads: int = 2) -> onnx.ModelProto:
    """Self-attention: q/k/v MatMul+Add, split heads, softmax(q k^T) v, merge heads, output MatMul+Add."""
    rng = np.random.default_rng(seed)
    head = hidden // heads
    inits = {f"w{n}": (rng.normal(size=(hidden, hidden)) / 4).astype(np.float32) for n in "qkvo"}
    inits.update({f"b{n}": rng.normal(size=hidden).astype(np.float32) for n in "qkvo"})
    inits["split"] = np.array([0, 0, heads, head], np.int64)
    inits["merge"] = np.array([0, 0, hidden], np.int64)
    nodes = []
    for n in "qkv":
        nodes += [
            helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}0"], name=f"{n}_proj"),
            helper.make_node("Add", [f"{n}0", f"b{n}"], [f"{n}1"], name=f"{n}_bias"),
            helper.make_node("Reshape", [f"{n}1", "split"], [f"{n}2"], name=f"{n}_split"),
            helper.make_node("Transpose", [f"{n}2"], [f"{n}h"], name=f"{n}_heads",
                             perm=[0, 2, 3, 1] if n == "k" else [0, 2, 1, 3]),
        ]
    nodes += [
        helper.make_node("MatMul", ["qh", "kh"], ["scores"], name="scores"),
        helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "vh"], ["ctx"], name="attend"),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="merge_t", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge"], ["ctx_m"], name="merge"),
        helper.make_node("MatMul", ["ctx_m", "wo"], ["o0"], name="o_proj"),
        helper.make_node("Add", ["o0", "bo"], ["y"], name="o_bias"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", hidden])],
        inits,
    )


def linear_pair(seed: int = 0, k: int = 12, hidden: int = 24, n: int = 8) -> onnx.ModelProto:
    """x -> Gemm(transB) -> MatMul+Add -> y, with an outlier channel in the intermediate."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(hidden, k)).astype(np.float32)
    w1[3] *= 50
    inits = {"w1": w1, "b1": rng.normal(size=hidden).astype(np.float32),
             "w2": rng.normal(size=(hidden, n)).astype(np.float32), "b2": rng.normal(size=n).astype(np.float32)}
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("MatMul", ["h", "w2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["h2", "b2"], ["y"], name="fc2_bias"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        inits,
    )
