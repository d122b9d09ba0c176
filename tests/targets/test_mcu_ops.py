"""Every op the MCU lowering emits, bit-exact on the emulated Cortex-M4.

Hand-made integer graphs (compiler/intgraph.py) are lowered with the kernels of
targets.tvm_ops, built with arm-none-eabi-gcc, run in qemu-system-arm and
compared byte for byte with the reference interpreter.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.interpreter import run_integer_graph_raw
from compiler.requant import dyadic
from targets.mcu import TARGET, lower_int_model

pytestmark = [
    pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
                       reason="gcc-arm-none-eabi / qemu-system-arm not installed"),
]


def _weight_range(w_bits: int) -> tuple[int, int]:
    """Symmetric int8 weights use [-127, 127]; int4 ones the full [-8, 7] (both nibble signs)."""
    return (-127, 127) if w_bits == 8 else (-(2 ** (w_bits - 1)), 2 ** (w_bits - 1) - 1)


class _Builder:
    """Integer graph under construction: float input -> Quantize -> ops -> Dequantize."""

    def __init__(self, shape: list[int], seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.shape = shape
        self.nodes = [helper.make_node("Quantize", ["x"], ["x_q"], name="quant", domain="edgeq",
                                       scale=0.05, y_zero_point=-5, y_min=-128, y_max=127, y_dtype="int8")]
        self.inits = []
        self.count = 0

    def _name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def _requant_attrs(self, real_scale: np.ndarray, relu: bool = False, y_zp: int = 3) -> dict:
        multiplier, shift = dyadic(real_scale)
        return {"multiplier": [int(m) for m in np.ravel(multiplier)], "shift": [int(s) for s in np.ravel(shift)],
                "y_zero_point": y_zp, "y_min": y_zp if relu else -128, "y_max": 127, "y_dtype": "int8"}

    def conv(self, x: str, channels_in: int, channels_out: int, kernel: int, stride: int = 1, pad: int = 0,
             group: int = 1, x_zp: int = 3, relu: bool = False, w_bits: int = 8) -> str:
        name = self._name("conv")
        low, w_max = _weight_range(w_bits)
        weight = self.rng.integers(low, w_max + 1, (channels_out, channels_in // group, kernel, kernel)).astype(np.int8)
        bias = self.rng.integers(-500, 500, channels_out).astype(np.int32)
        self.inits += [numpy_helper.from_array(weight, f"{name}_w"), numpy_helper.from_array(bias, f"{name}_b")]
        fan_in = channels_in // group * kernel * kernel
        scale = self.rng.uniform(0.5, 1.5, channels_out) / (120.0 * np.sqrt(fan_in))
        self.nodes.append(helper.make_node(
            "QConv", [x, f"{name}_w", f"{name}_b"], [name], name=name, domain="edgeq",
            kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4, dilations=[1, 1],
            group=group, x_zero_point=x_zp, w_bits=w_bits, **self._requant_attrs(scale * 127 / w_max, relu)))
        return name

    def gemm(self, x: str, k: int, m: int, w_bits: int = 8) -> str:
        name = self._name("fc")
        low, w_max = _weight_range(w_bits)
        weight = self.rng.integers(low, w_max + 1, (k, m)).astype(np.int8)
        bias = self.rng.integers(-500, 500, m).astype(np.int32)
        self.inits += [numpy_helper.from_array(weight, f"{name}_w"), numpy_helper.from_array(bias, f"{name}_b")]
        self.nodes.append(helper.make_node(
            "QGemm", [x, f"{name}_w", f"{name}_b"], [name], name=name, domain="edgeq", x_zero_point=3,
            w_bits=w_bits, **self._requant_attrs(np.full(m, 127 / w_max / (120.0 * np.sqrt(k))))))
        return name

    def add(self, a: str, b: str) -> str:
        name = self._name("add")
        self.nodes.append(helper.make_node(
            "QAdd", [a, b], [name], name=name, domain="edgeq", a_zero_point=3, b_zero_point=3,
            a_multiplier=1 << 20, b_multiplier=3 << 19, shift=21, y_zero_point=-2, y_min=-128, y_max=127,
            y_dtype="int8"))
        return name

    def pool(self, op: str, x: str, **attrs) -> str:
        name = self._name(op.lower())
        domain = "" if op == "MaxPool" else "edgeq"
        if op != "MaxPool":
            window = int(np.prod(attrs.get("kernel_shape", [1]))) if op == "QAveragePool" else attrs.pop("window")
            attrs.update(x_zero_point=3, **self._requant_attrs(np.array([1.0 / window])))
        self.nodes.append(helper.make_node(op, [x], [name], name=name, domain=domain, **attrs))
        return name

    def softmax(self, x: str, x_scale: float) -> str:
        from passes.integerize import softmax_exp_table

        name = self._name("softmax")
        multiplier, shift = dyadic(256.0)
        self.nodes.append(helper.make_node(
            "QSoftmax", [x], [name], name=name, domain="edgeq", exp_table=softmax_exp_table(x_scale, 255),
            multiplier=[int(multiplier)], shift=[int(shift)], y_zero_point=-128, y_min=-128, y_max=127,
            y_dtype="int8"))
        return name

    def requantize(self, x: str) -> str:
        name = self._name("rq")
        self.nodes.append(helper.make_node("Requantize", [x], [name], name=name, domain="edgeq", x_zero_point=3,
                                           **self._requant_attrs(np.array([0.7]), y_zp=-1)))
        return name

    def simple(self, op: str, inputs: list[str], **attrs) -> str:
        name = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def model(self, out: str):
        self.nodes.append(helper.make_node("Dequantize", [out], ["y"], name="dequant", domain="edgeq",
                                           scale=0.1, zero_point=3))
        graph = helper.make_graph(self.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, self.shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  initializer=self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgeq", 1)])


def _conv_chain():
    b = _Builder([1, 3, 12, 12])
    t = b.conv("x_q", 3, 8, 3, pad=1, x_zp=-5, relu=True)
    t = b.conv(t, 8, 8, 3, stride=2, pad=1, group=8)  # depthwise, strided
    t = b.pool("MaxPool", t, kernel_shape=[2, 2], strides=[2, 2])
    t = b.conv(t, 8, 6, 1)
    t = b.pool("QGlobalAveragePool", t, window=3 * 3)
    t = b.simple("Flatten", [t], axis=1)
    return b.model(b.gemm(t, 6, 5))


def _residual():
    b = _Builder([1, 4, 8, 8], seed=1)
    t = b.conv("x_q", 4, 6, 3, pad=1, x_zp=-5, relu=True)
    u = b.conv(t, 6, 6, 3, pad=1)
    t = b.add(t, u)
    t = b.pool("QAveragePool", t, kernel_shape=[2, 2], strides=[2, 2])
    return b.model(b.requantize(t))


def _concat_reshape():
    b = _Builder([1, 2, 6, 6], seed=2)
    u = b.conv("x_q", 2, 3, 3, pad=1, x_zp=-5)
    v = b.conv("x_q", 2, 5, 1, x_zp=-5)
    t = b.simple("Concat", [u, v], axis=1)
    b.inits.append(numpy_helper.from_array(np.array([1, -1], np.int64), "shape"))
    return b.model(b.simple("Reshape", [t, "shape"]))


def _wide_depthwise():
    """A depthwise conv whose all-channel window (128 x 3 x 3 bytes) passes TVM's 1024-byte stack limit."""
    b = _Builder([1, 128, 5, 5], seed=3)
    return b.model(b.conv("x_q", 128, 128, 3, pad=1, group=128, x_zp=-5, relu=True))


def _int4_weights():
    """w_bits=4 conv (odd weight count: a half-used last byte), depthwise conv and gemm: packed in flash."""
    b = _Builder([1, 3, 7, 7], seed=4)
    t = b.conv("x_q", 3, 5, 3, pad=1, x_zp=-5, relu=True, w_bits=4)  # 5*3*3*3 = 135 weights
    t = b.conv(t, 5, 5, 3, stride=2, pad=1, group=5, w_bits=4)
    t = b.pool("QGlobalAveragePool", t, window=4 * 4)
    t = b.simple("Flatten", [t], axis=1)
    return b.model(b.gemm(t, 5, 3, w_bits=4))


def _softmax_head():
    """A classifier head: global pool, gemm, integer softmax (an exp table, an int64 division on the M4)."""
    b = _Builder([1, 4, 6, 6], seed=5)
    t = b.conv("x_q", 4, 8, 3, pad=1, x_zp=-5, relu=True)
    t = b.pool("QGlobalAveragePool", t, window=6 * 6)
    t = b.simple("Flatten", [t], axis=1)
    return b.model(b.softmax(b.gemm(t, 8, 10), x_scale=0.08))


@pytest.mark.parametrize("make", [_conv_chain, _residual, _concat_reshape, _wide_depthwise, _int4_weights,
                                  _softmax_head],
                         ids=lambda f: f.__name__.strip("_"))
def test_bit_exact_in_qemu(make, tmp_path) -> None:
    pytest.importorskip("targets.tvm_ops", reason="targets.tvm_ops (the integer ops' TE definitions) not there yet")
    model = make()
    lower_int_model(model, tmp_path / "mcu")
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(7).normal(0, 2.5, (3, *shape[1:])).astype(np.float32)
    report = TARGET.verify(tmp_path, {"x": x}, int_model=model, on="qemu")
    assert report["bit_exact"], report
    expected = run_integer_graph_raw(model, {"x": x[:1]})["y"]
    got = TARGET.run_raw(tmp_path, {"x": x[:1]}, on="host")
    np.testing.assert_array_equal(got.reshape(expected.shape), expected)


def test_conv_kernel_uses_a_pixel_window() -> None:
    """Convolutions get the pixel-window schedule: a C*kh*kw stack window, one fused MAC loop."""
    tvm_ops = pytest.importorskip("targets.tvm_ops", reason="targets.tvm_ops not there yet")
    from targets.mcu.codegen import Kernel, build_kernels_c

    model = _conv_chain()
    types = tvm_ops.tensor_types(model)
    conv = next(node for node in model.graph.node if node.op_type == "QConv")
    func, args, constants = tvm_ops.node_primfunc(model, conv, types)
    source = build_kernels_c([Kernel("k_conv", func, list(args), dict(constants))])
    assert "pad_ptr[27]" in source  # 3 input channels x 3 x 3
    assert "_fused < 27;" in source


def test_wide_depthwise_conv_uses_a_per_channel_window() -> None:
    """Past TVM's stack limit the window is taken per output channel: 3 x 3 bytes, no workspace call."""
    tvm_ops = pytest.importorskip("targets.tvm_ops", reason="targets.tvm_ops not there yet")
    from targets.mcu.codegen import MAX_WINDOW_BYTES, WORKSPACE_CALLS, Kernel, build_kernels_c

    model = _wide_depthwise()
    assert 128 * 3 * 3 > MAX_WINDOW_BYTES
    types = tvm_ops.tensor_types(model)
    conv = next(node for node in model.graph.node if node.op_type == "QConv")
    func, args, constants = tvm_ops.node_primfunc(model, conv, types)
    source = build_kernels_c([Kernel("k_dw", func, list(args), dict(constants))])
    assert "pad_ptr[9]" in source
    assert not any(call in source for call in WORKSPACE_CALLS)


def test_int4_weights_are_packed_in_flash(tmp_path) -> None:
    """w_bits=4 weights: two per byte in weights.c, memory.json says so, still bit-exact on the host build."""
    import json

    pytest.importorskip("targets.tvm_ops", reason="targets.tvm_ops not there yet")
    from compiler.graph import initializer_array
    from targets.mcu.packing import pack_int4, unpack_int4

    model = _int4_weights()
    weighted = [n for n in model.graph.node if n.op_type in ("QConv", "QGemm")]
    weights = {n.input[1]: initializer_array(model, n.input[1]) for n in weighted}
    for node in weighted:
        value = weights[node.input[1]]
        np.testing.assert_array_equal(unpack_int4(pack_int4(value, node.op_type), value.shape, node.op_type), value)
    lower_int_model(model, tmp_path / "mcu")
    memory = json.loads((tmp_path / "mcu" / "memory.json").read_text())
    assert memory["int4_packed"] and memory["int4_weight_tensors"] == len(weights)
    biases = [initializer_array(model, n.input[2]) for n in model.graph.node if n.op_type in ("QConv", "QGemm")]
    rows = {"conv1_w": (5, 27), "conv2_w": (5, 9), "fc5_w": (3, 5)}  # (outputs, reduction) of each weight
    assert {name: value.size for name, value in weights.items()} == {k: o * d for k, (o, d) in rows.items()}
    packed_bytes = sum(outputs * ((depth + 1) // 2) for outputs, depth in rows.values())  # odd rows end in a pad nibble
    assert memory["weight_bytes"] == packed_bytes + sum(b.nbytes for b in biases)
    source = (tmp_path / "mcu" / "weights.c").read_text()
    assert "const uint8_t edgeq_w_conv1_w[70]" in source  # 5 rows of 27 int4 values -> 5 x 14 bytes
    x = np.random.default_rng(8).normal(0, 2.5, (2, 3, 7, 7)).astype(np.float32)
    expected = run_integer_graph_raw(model, {"x": x})["y"]
    got = TARGET.run_raw(tmp_path, {"x": x}, on="host")
    np.testing.assert_array_equal(got.reshape(expected.shape), expected)
