"""Tiny float ONNX graphs and their onnxruntime QDQ quantizations, shared by tests.

``quantize_qdq`` runs ``onnxruntime.quantization.quantize_static`` with
``quant_format=QDQ, per_channel=True`` -- the standard QDQ format that
``passes.integerize`` consumes. Each ``*_model`` builder returns a float model
with one input ``x``; weights are seeded random.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes, inputs, outputs, inits, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _value(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _weight(rng, name: str, shape, scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def conv_block_model(seed: int = 0) -> onnx.ModelProto:
    """Conv+Relu -> depthwise Conv+Clip(0,6) -> grouped Conv -> residual Add -> MaxPool
    -> Concat with an AveragePool branch -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = [
        _weight(rng, "w1", (8, 3, 3, 3)), _weight(rng, "b1", (8,), 0.1),
        _weight(rng, "w2", (8, 1, 3, 3)), _weight(rng, "b2", (8,), 0.1),
        _weight(rng, "w3", (8, 4, 1, 1)), _weight(rng, "b3", (8,), 0.1),
        _weight(rng, "wf", (5, 16), 0.3), _weight(rng, "bf", (5,), 0.1),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], group=2),
        helper.make_node("Add", ["c3", "r1"], ["a"]),
        helper.make_node("MaxPool", ["a"], ["m"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("AveragePool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Concat", ["m", "p"], ["cat"], axis=1),
        helper.make_node("GlobalAveragePool", ["cat"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
    ]
    return _model(nodes, [_value("x", [1, 3, 16, 16])], [_value("y", [1, 5])], inits)


def mobilenet_v3_block_model(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV3's ingredients, float: Conv -> HardSwish -> depthwise Conv -> squeeze-excite
    (GlobalAveragePool -> Conv -> Relu -> Conv -> HardSigmoid -> Mul) -> Conv -> Sigmoid ->
    GlobalAveragePool -> Flatten -> Gemm -> Softmax."""
    rng = np.random.default_rng(seed)
    inits = [
        _weight(rng, "w1", (8, 3, 3, 3)), _weight(rng, "b1", (8,), 0.1),
        _weight(rng, "w2", (8, 1, 3, 3)), _weight(rng, "b2", (8,), 0.1),
        _weight(rng, "ws1", (4, 8, 1, 1)), _weight(rng, "bs1", (4,), 0.1),
        _weight(rng, "ws2", (8, 4, 1, 1)), _weight(rng, "bs2", (8,), 0.1),
        _weight(rng, "w3", (8, 8, 1, 1)), _weight(rng, "b3", (8,), 0.1),
        _weight(rng, "wf", (5, 8), 1.0), _weight(rng, "bf", (5,), 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c1"], ["h1"]),
        helper.make_node("Conv", ["h1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=8),
        helper.make_node("GlobalAveragePool", ["c2"], ["squeeze"]),
        helper.make_node("Conv", ["squeeze", "ws1", "bs1"], ["s1"]),
        helper.make_node("Relu", ["s1"], ["s1r"]),
        helper.make_node("Conv", ["s1r", "ws2", "bs2"], ["s2"]),
        helper.make_node("HardSigmoid", ["s2"], ["gate"], alpha=1 / 6),
        helper.make_node("Mul", ["c2", "gate"], ["excited"]),
        helper.make_node("Conv", ["excited", "w3", "b3"], ["c3"]),
        helper.make_node("Sigmoid", ["c3"], ["s3"]),
        helper.make_node("GlobalAveragePool", ["s3"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["y"], axis=-1),
    ]
    return _model(nodes, [_value("x", [1, 3, 16, 16])], [_value("y", [1, 5])], inits)


def upsampling_model(seed: int = 0, mode: str = "nearest") -> onnx.ModelProto:
    """A U-Net step, float: Conv stride 2 -> Relu -> Resize x2 (``mode``) -> Concat with a full-resolution
    Conv branch -> 1x1 Conv."""
    rng = np.random.default_rng(seed)
    inits = [
        _weight(rng, "w1", (8, 3, 3, 3)), _weight(rng, "b1", (8,), 0.1),
        _weight(rng, "w2", (8, 3, 3, 3)), _weight(rng, "b2", (8,), 0.1),
        _weight(rng, "w3", (4, 16, 1, 1)), _weight(rng, "b3", (4,), 0.1),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Resize", ["r1", "", "scales"], ["up"], mode=mode),
        helper.make_node("Conv", ["x", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["up", "c2"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w3", "b3"], ["y"]),
    ]
    return _model(nodes, [_value("x", [1, 3, 8, 8])], [_value("y", [1, 4, 8, 8])], inits)


def matmul_model(seed: int = 0) -> onnx.ModelProto:
    """Transpose -> Reshape -> MatMul (constant weight) + Add bias -> Relu -> Pad ->
    Unsqueeze/Squeeze, and a MatMul of two activations (batch-independent shapes)."""
    rng = np.random.default_rng(seed)
    inits = [
        _weight(rng, "wm", (8, 6)), _weight(rng, "bm", (6,), 0.1),
        numpy_helper.from_array(np.array([-1, 4, 8], np.int64), "shape"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 1], np.int64), "pads"),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["t", "shape"], ["r"]),
        helper.make_node("MatMul", ["r", "wm"], ["mm"]),
        helper.make_node("Add", ["mm", "bm"], ["mb"]),
        helper.make_node("Relu", ["mb"], ["h"]),
        helper.make_node("Pad", ["h", "pads"], ["hp"]),
        helper.make_node("Unsqueeze", ["hp", "axes"], ["s"]),
        helper.make_node("Squeeze", ["s", "axes"], ["u"]),
        helper.make_node("Transpose", ["u"], ["ut"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["u", "ut"], ["y"]),
    ]
    return _model(nodes, [_value("x", [1, 8, 4])], [_value("y", [1, 5, 5])], inits)


class _Reader:
    def __init__(self, samples: list[dict[str, np.ndarray]]) -> None:
        self.samples = iter(samples)

    def get_next(self):
        return next(self.samples, None)


def random_inputs(model: onnx.ModelProto, count: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """``count`` batch-1 samples per graph input, drawn from N(0, 1)."""
    rng = np.random.default_rng(seed)
    shapes = {
        value.name: [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        for value in model.graph.input
    }
    return [
        {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
        for _ in range(count)
    ]


def quantize_qdq(
    model: onnx.ModelProto,
    calib: list[dict[str, np.ndarray]],
    weight_type: str = "QInt8",
    activation_type: str = "QUInt8",
    extra_options: dict | None = None,
) -> onnx.ModelProto:
    """onnxruntime's static QDQ quantization (per channel) of ``model``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
        onnx.save(model, src)
        quantize_static(
            str(src), str(dst), _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
            weight_type=QuantType[weight_type], activation_type=QuantType[activation_type],
            extra_options=extra_options or {},
        )
        return onnx.load(dst)


class QDQBuilder:
    """Hand-written QDQ graphs: for patterns quantize_static never emits (kept Relu/Clip,
    shared-scale Concat, float ops left between Q/DQ pairs, int4-range int8 weights)."""

    def __init__(self, seed: int = 0, opset: int = OPSET) -> None:
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.count = 0

    def _name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, value: np.ndarray, base: str = "c") -> str:
        name = self._name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def qdq(self, tensor: str, scale: float, zero_point: int = 128, dtype=np.uint8) -> str:
        """Quantize-dequantize ``tensor`` with per-tensor parameters."""
        scale_name = self.const(np.array(scale, np.float32), "s")
        zero_name = self.const(np.array(zero_point, dtype), "z")
        quantized = self.node("QuantizeLinear", [tensor, scale_name, zero_name])
        return self.node("DequantizeLinear", [quantized, scale_name, zero_name])

    def input(self, name: str, shape, scale: float = 0.05, zero_point: int = 128, dtype=np.uint8) -> str:
        self.inputs.append(_value(name, shape))
        return self.qdq(name, scale, zero_point, dtype)

    def weight(self, shape, bits: int = 8, axis: int = 0) -> str:
        """Symmetric per-channel weight along ``axis``, values in the ``bits`` range."""
        limit = (1 << (bits - 1)) - 1
        values = self.rng.integers(-limit - 1, limit + 1, shape).astype(np.int8)
        scales = (self.rng.uniform(0.5, 1.5, shape[axis]) * 0.02).astype(np.float32)
        return self.node("DequantizeLinear", [self.const(values, "w"), self.const(scales, "ws"),
                                              self.const(np.zeros(shape[axis], np.int8), "wz")],
                         axis=axis)

    def bias(self, channels: int, scale: np.ndarray | float) -> str:
        values = self.rng.integers(-2000, 2000, channels).astype(np.int32)
        scales = np.broadcast_to(np.asarray(scale, np.float32), (channels,)).copy()
        return self.node("DequantizeLinear", [self.const(values, "b"), self.const(scales, "bs"),
                                              self.const(np.zeros(channels, np.int32), "bz")],
                         axis=0)

    def model(self, output: str, out_name: str = "y") -> onnx.ModelProto:
        """The model with graph output ``out_name`` = ``output`` (its shape inferred)."""
        nodes = [*self.nodes, helper.make_node("Identity", [output], [out_name], name="out")]
        probe = helper.make_model(helper.make_graph(nodes, "probe", self.inputs, [], self.inits),
                                  opset_imports=[helper.make_opsetid("", self.opset)])
        inferred = onnx.shape_inference.infer_shapes(probe)
        shape = next(
            [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in inferred.graph.value_info if v.name == output
        )
        return _model(nodes, self.inputs, [_value(out_name, shape)], self.inits, self.opset)


def softmax_model(input_dtype=np.int8, classes: int = 10) -> onnx.ModelProto:
    """x -> MatMul (int8 weights) -> Softmax over the last axis, its probabilities quantized to uint8:
    a classifier's head as integer-only targets compile it. ``input_dtype`` np.int16: 16-bit logits."""
    b = QDQBuilder(seed=5, opset=21 if input_dtype == np.int16 else OPSET)  # int16 QuantizeLinear: opset 21
    x = b.input("x", [1, 3, 16], scale=0.05, zero_point=0, dtype=np.int8)
    logits = b.qdq(b.node("MatMul", [x, b.weight([16, classes], axis=1)]), 0.06 if input_dtype == np.int8 else 0.0003,
                   0, input_dtype)
    return b.model(b.qdq(b.node("Softmax", [logits], axis=-1), 1 / 256, 0, np.uint8))


MOBILENET_V2_BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenet_v2_like_model(resolution: int = 224, classes: int = 1000, seed: int = 0,
                            width: float = 1.0) -> onnx.ModelProto:
    """MobileNetV2's exact layer structure (BN folded, ReLU6 as Clip) with random He-initialised
    weights: the real network's shapes and op mix for speed/compile tests without torch."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    count = [0]

    def conv(x: str, cin: int, cout: int, kernel: int, stride: int, group: int = 1,
             relu6: bool = True) -> str:
        count[0] += 1
        index = count[0]
        fan_in = cin // group * kernel * kernel
        w = rng.standard_normal((cout, cin // group, kernel, kernel)) * np.sqrt(2.0 / fan_in)
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{index}"))
        inits.append(numpy_helper.from_array((rng.standard_normal(cout) * 0.05).astype(np.float32), f"b{index}"))
        pad = kernel // 2
        nodes.append(helper.make_node("Conv", [x, f"w{index}", f"b{index}"], [f"c{index}"], name=f"conv{index}",
                                      strides=[stride, stride], pads=[pad] * 4, group=group))
        if not relu6:
            return f"c{index}"
        nodes.append(helper.make_node("Clip", [f"c{index}", "zero", "six"], [f"r{index}"], name=f"relu6_{index}"))
        return f"r{index}"

    inits += [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
              numpy_helper.from_array(np.array(6.0, np.float32), "six")]
    channels = int(32 * width)
    x = conv("x", 3, channels, 3, 2)
    for expand, out, repeats, stride in MOBILENET_V2_BLOCKS:
        out = max(8, int(out * width))
        for repeat in range(repeats):
            hidden = channels * expand
            h = conv(x, channels, hidden, 1, 1) if expand != 1 else x
            h = conv(h, hidden, hidden, 3, stride if repeat == 0 else 1, group=hidden)
            h = conv(h, hidden, out, 1, 1, relu6=False)
            if repeat > 0 or (stride == 1 and channels == out):
                count[0] += 1
                nodes.append(helper.make_node("Add", [h, x], [f"add{count[0]}"], name=f"add{count[0]}"))
                h = f"add{count[0]}"
            x, channels = h, out
    x = conv(x, channels, 1280, 1, 1)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"))
    inits.append(_weight(rng, "fc_w", (classes, 1280), 0.03))
    inits.append(_weight(rng, "fc_b", (classes,), 0.01))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1))
    return _model(nodes, [_value("x", [1, 3, resolution, resolution])], [_value("y", [1, classes])], inits)
