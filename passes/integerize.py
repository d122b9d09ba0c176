"""Integerize: a QDQ ONNX model becomes the integer-only graph of :mod:`compiler.intgraph`.

Requires
    A QDQ model in the standard format (``passes/insert_qdq`` or
    ``onnxruntime.quantization.quantize_static(quant_format=QDQ)``): activations
    pass through QuantizeLinear/DequantizeLinear pairs with per-tensor
    parameters; weights are int8 (or int4, opset 21) initializers feeding
    DequantizeLinear, symmetric, per tensor or per output channel; biases are
    int32 initializers feeding DequantizeLinear (or plain float initializers);
    every compute op (Conv, Gemm, MatMul, Add, Mul, AveragePool,
    GlobalAveragePool, Concat, Softmax over the last axis, and the elementwise
    functions of compiler.intgraph.TABLE_OPS) has its output quantized by a
    QuantizeLinear, possibly through Relu/Clip nodes. Static shapes where GlobalAveragePool is
    used. Only 2-D convolutions with explicit padding (``auto_pad`` NOTSET or
    VALID).

Guarantees
    The result has one ``edgeq.Quantize`` per quantized graph input and one
    ``edgeq.Dequantize`` per float graph output, and between them only integer
    tensors: integer ops of domain ``edgeq`` and the exact standard ops of
    :data:`compiler.intgraph.DATA_MOVEMENT_OPS`. Graph inputs and outputs keep
    their names. Zero points are folded into the int32 biases, Relu/Clip become
    the ``y_min``/``y_max`` clamp of the op before them (or a clamping
    ``Requantize``), data movement on a float graph input is moved after its
    Quantize (they commute), a nearest-neighbour Resize becomes one Gather per
    resized axis (the indices onnxruntime's Resize reads). The quantization of
    every integer tensor is recorded as JSON in the model's metadata (key
    ``edgeq.tensor_quant``).

Float function
    Not preserved exactly: the QDQ model's float rescaling becomes dyadic
    integer requantization (round half up instead of half even, 31-bit
    multipliers). Outputs differ by at most about 1 LSB on a small fraction of
    values (measured by ``tests/compiler/test_interpreter.py``); Softmax's exp
    is a Q16 table, its probabilities within 1 LSB of onnxruntime's
    (``tests/passes/test_integerize.py``).

Float regions
    Any op that would have to run in float between the input Quantize and the
    output Dequantize is an error naming the node -- including a float tail
    after the last DequantizeLinear (e.g. an unquantized Softmax): integer-only
    targets cannot run it, and silently dropping it would change the outputs.
    Quantize the tail or remove it before integerizing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compiler.errors import EdgeqError
from compiler.graph import (
    NameAllocator,
    attribute,
    clamp_bounds,
    consumers,
    graph_input_names,
    initializer_array,
    opset_version,
    producers,
    topological_sort,
    value_shapes,
)
from compiler.intgraph import DATA_MOVEMENT_OPS, INT_DOMAIN, INT_DOMAIN_VERSION, TABLE_OPS
from compiler.requant import (
    IDENTITY_MULTIPLIER,
    IDENTITY_SHIFT,
    dequantize_linear,
    dtype_range,
    dyadic,
    quantize_linear,
)

log = logging.getLogger(__name__)

CLAMP_OPS = frozenset({"Relu", "Clip"})
# Compute ops whose output must be quantized by a following QuantizeLinear.
COMPUTE_OPS = frozenset(
    {"Conv", "Gemm", "MatMul", "Add", "Mul", "AveragePool", "GlobalAveragePool"}
)
TENSOR_QUANT_KEY = "edgeq.tensor_quant"
STORAGE_DTYPE = {"int4": "int8", "uint4": "uint8", "int8": "int8", "uint8": "uint8",
                 "int16": "int16", "uint16": "uint16", "int32": "int32"}
BITS = {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8, "int16": 16, "uint16": 16, "int32": 32}


@dataclass(frozen=True)
class QParams:
    """Per-tensor quantization of an integer activation tensor."""

    scale: float  # a float32 value
    zero_point: int
    dtype: str  # storage dtype of the integer graph (int4 is stored as int8)
    qmin: int
    qmax: int

    def to_json(self) -> dict:
        return {"scale": self.scale, "zero_point": self.zero_point, "dtype": self.dtype,
                "qmin": self.qmin, "qmax": self.qmax}


@dataclass
class QConst:
    """A constant that the QDQ model dequantizes (weight, bias, constant operand)."""

    values: np.ndarray  # int64
    scale: np.ndarray  # float32, scalar or per channel
    zero_point: np.ndarray  # int64, like scale
    axis: int
    dtype: str  # ONNX element type name of the stored values, e.g. int8, int4


def integerize(qdq_model: onnx.ModelProto) -> onnx.ModelProto:
    """The integer-only graph of ``qdq_model`` (which is not modified)."""
    return _Integerizer(qdq_model).run()


def tensor_quant(int_model: onnx.ModelProto) -> dict[str, dict]:
    """Quantization of every integer tensor of an integerized model, by tensor name."""
    for prop in int_model.metadata_props:
        if prop.key == TENSOR_QUANT_KEY:
            return json.loads(prop.value)
    return {}


def _inferred_shapes(model: onnx.ModelProto) -> dict:
    """Tensor shapes by ONNX shape inference (only GlobalAveragePool needs them).

    Quantizers write INT4 initializers into models of opset < 21, where
    inference silently stops; it is also tried with the opset raised to 21 and
    the more complete answer wins.
    """
    best = value_shapes(model)
    for opset in (None, 21):
        candidate = onnx.ModelProto()
        candidate.CopyFrom(model)
        if opset is not None:
            for entry in candidate.opset_import:
                if entry.domain in ("", "ai.onnx"):
                    entry.version = max(entry.version, opset)
        try:
            shapes = value_shapes(onnx.shape_inference.infer_shapes(candidate, strict_mode=True))
        except Exception as error:
            log.debug("shape inference (opset %s) failed: %s", opset, error)
            continue
        if len(shapes) > len(best):
            best = shapes
    return best


def _describe(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node '{node.name or node.output[0]}'"


def _text(value: str | bytes) -> str:
    """A string attribute as str (onnx.helper gives bytes)."""
    return value.decode() if isinstance(value, bytes) else value


def _float_error(node: onnx.NodeProto, why: str) -> EdgeqError:
    return EdgeqError(
        f"{_describe(node)} would stay in float ({why}); integer-only targets cannot run float ops"
    )


SOFTMAX_EXP_BITS = 16  # QSoftmax's exp table holds exp(-d * scale) in Q16


def softmax_exp_table(scale: float, max_distance: int) -> list[int]:
    """``round(exp(-d * scale) * 2**16)`` for d = 0 .. ``max_distance``, cut after the last nonzero
    entry (plus one 0, which every larger distance reads)."""
    distances = np.arange(max_distance + 1, dtype=np.float64)
    table = np.rint(np.exp(-distances * scale) * 2.0**SOFTMAX_EXP_BITS).astype(np.int64)
    nonzero = int(np.count_nonzero(table))  # exp decreases: the nonzero entries come first
    return [int(v) for v in table[:min(nonzero + 1, len(table))]]


def evaluate_unary(node: onnx.NodeProto, values: np.ndarray, opset: int) -> np.ndarray:
    """ONNX's reference implementation of one-input ``node`` (its attributes kept) on float32 ``values``."""
    from onnx.reference import ReferenceEvaluator

    single = helper.make_node(node.op_type, ["x"], ["y"], domain=node.domain)
    single.attribute.extend(node.attribute)
    graph = helper.make_graph([single], "unary", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return np.asarray(ReferenceEvaluator(model).run(None, {"x": values.astype(np.float32)})[0], dtype=np.float32)


def nearest_source_indices(node: onnx.NodeProto, size: int, out_size: int, scale: float | None) -> np.ndarray:
    """The input index each output position of a nearest Resize reads along one axis (``node``'s
    coordinate_transformation_mode and nearest_mode; ``scale`` when the node gives scales, else sizes):
    onnxruntime's Resize run on the positions themselves, so the integer graph moves what the QDQ model
    does (ONNX's reference Resize differs from it for align_corners with a fractional scale)."""
    import onnxruntime as ort

    inputs = ["x", "", "scales"] if scale is not None else ["x", "", "", "sizes"]
    single = helper.make_node("Resize", inputs, ["y"])
    single.attribute.extend(item for item in node.attribute if item.name in ("coordinate_transformation_mode",
                                                                             "nearest_mode", "mode"))
    value = (numpy_helper.from_array(np.array([scale], np.float32), "scales") if scale is not None
             else numpy_helper.from_array(np.array([out_size], np.int64), "sizes"))
    graph = helper.make_graph([single], "axis", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[value])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9  # what onnxruntime 1.31 loads
    positions = np.arange(size, dtype=np.float32)
    return np.asarray(ort.InferenceSession(model.SerializeToString()).run(None, {"x": positions})[0]).astype(np.int64)


class _Integerizer:
    def __init__(self, qdq_model: onnx.ModelProto) -> None:
        model = onnx.ModelProto()
        model.CopyFrom(qdq_model)
        if opset_version(model) < 13:
            raise EdgeqError(f"integerize needs ONNX opset >= 13, model has {opset_version(model)}")
        topological_sort(model)
        self.model = model
        self.shapes = _inferred_shapes(model)
        self.producer = producers(model)
        self.consumer = consumers(model)
        self.init_names = {init.name for init in model.graph.initializer}
        self.new_name = NameAllocator(model)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.params: dict[str, QParams] = {}  # integer tensor -> its quantization
        self.int_of: dict[str, str] = {}  # float tensor -> integer tensor it dequantizes
        self.int_name: dict[str, str] = {}  # QuantizeLinear output -> integer tensor
        self.const_of: dict[str, QConst] = {}  # float tensor -> dequantized constant
        # float tensor -> (graph input, data-movement nodes applied to it)
        self.input_view: dict[str, tuple[str, list[onnx.NodeProto]]] = {
            name: (name, []) for name in graph_input_names(model)
        }
        self.done: set[int] = set()

    # -- driver ------------------------------------------------------------------
    def run(self) -> onnx.ModelProto:
        for node in self.model.graph.node:
            if id(node) in self.done:
                continue
            self.done.add(id(node))
            self._visit(node)
        return self._finish()

    def _visit(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        if op == "Constant":  # read where used (compiler.graph.initializer_array)
            return
        if op == "QuantizeLinear":
            self._quantize(node)
        elif op == "DequantizeLinear":
            self._dequantize(node)
        elif op == "Conv":
            self._conv(node)
        elif op in ("Gemm", "MatMul"):
            self._gemm_or_matmul(node)
        elif op in ("Add", "Mul"):
            self._add_or_mul(node)
        elif op in ("AveragePool", "GlobalAveragePool"):
            self._average_pool(node)
        elif op == "Concat":
            self._concat(node)
        elif op == "Softmax":
            self._softmax(node)
        elif op in TABLE_OPS:
            self._lookup(node)
        elif op == "Resize":
            self._resize(node)
        elif op in DATA_MOVEMENT_OPS:
            self._data_movement(node)
        elif op in CLAMP_OPS:
            self._standalone_clamp(node)
        else:
            raise _float_error(node, f"no integer lowering for {op}")

    # -- quantization parameters ---------------------------------------------------
    def _qparams(self, node: onnx.NodeProto) -> QParams:
        """Per-tensor parameters of an activation Quantize/DequantizeLinear."""
        scale = self._const(node.input[1], node)
        zero = self._const(node.input[2], node) if len(node.input) > 2 and node.input[2] else None
        if scale.size != 1 or (zero is not None and zero.size != 1):
            raise EdgeqError(f"{_describe(node)}: activations must be quantized per tensor")
        if attribute(node, "block_size", 0):
            raise EdgeqError(f"{_describe(node)}: block-wise activation quantization is not supported")
        type_name = zero.dtype.name if zero is not None else "uint8"
        if type_name not in STORAGE_DTYPE:
            raise EdgeqError(f"{_describe(node)}: unsupported quantized type {type_name}")
        storage = STORAGE_DTYPE[type_name]
        if BITS[type_name] == 4:
            qmin, qmax = (-8, 7) if type_name == "int4" else (0, 15)
        else:
            qmin, qmax = dtype_range(storage)
        zp = int(zero.astype(np.int64).reshape(())) if zero is not None else 0
        return QParams(float(np.float32(scale.reshape(()))), zp, storage, qmin, qmax)

    def _const(self, name: str, node: onnx.NodeProto) -> np.ndarray:
        value = initializer_array(self.model, name)
        if value is None:
            raise EdgeqError(f"{_describe(node)}: input '{name}' must be a constant")
        return value

    def _record(self, name: str, params: QParams) -> str:
        self.params[name] = params
        return name

    # -- Q / DQ ------------------------------------------------------------------
    def _quantize(self, node: onnx.NodeProto) -> None:
        source, out = node.input[0], node.output[0]
        params = self._qparams(node)
        if source in self.int_of:
            self.int_name[out] = self._convert(self.int_of[source], params, out)
        elif source in self.input_view:
            self.int_name[out] = self._quantize_input(source, params, out)
        else:
            maker = self.producer.get(source)
            why = f"it quantizes '{source}'" + (f", computed by float {_describe(maker)}" if maker else "")
            raise _float_error(node, why)

    def _convert(self, src: str, params: QParams, out: str | None = None) -> str:
        """``src`` re-expressed with ``params``: itself, or a Requantize."""
        if self.params[src] == params:
            return src
        have = self.params[src]
        multiplier, shift = dyadic(have.scale / params.scale)
        out = out or self.new_name(f"{src}_requant")
        self._emit("Requantize", [src], out, params, x_zero_point=have.zero_point,
                   multiplier=[int(multiplier)], shift=[int(shift)])
        return out

    def _quantize_input(self, source: str, params: QParams, out: str) -> str:
        """Quantize a graph input, then replay the data movement that preceded the Q."""
        graph_input, moves = self.input_view[source]
        quantized = out if not moves else self.new_name(f"{graph_input}_quantized")
        self._emit("Quantize", [graph_input], quantized, params, scale=params.scale)
        for index, move in enumerate(moves):
            target = out if index == len(moves) - 1 else self.new_name(f"{move.output[0]}_int")
            self._emit_moved(move, quantized, target, params)
            quantized = target
        return quantized

    def _dequantize(self, node: onnx.NodeProto) -> None:
        source, out = node.input[0], node.output[0]
        if source in self.init_names or (source in self.producer and self.producer[source].op_type == "Constant"):
            self.const_of[out] = self._qconst(node)
        elif source in self.int_name:
            self.int_of[out] = self.int_name[source]
        else:
            raise EdgeqError(f"{_describe(node)}: dequantizes '{source}', which is not a quantized tensor")

    def _qconst(self, node: onnx.NodeProto) -> QConst:
        values = self._const(node.input[0], node)
        scale = self._const(node.input[1], node).astype(np.float32)
        zero = (self._const(node.input[2], node) if len(node.input) > 2 and node.input[2]
                else np.zeros_like(scale, dtype=np.int64))
        if attribute(node, "block_size", 0):
            raise EdgeqError(f"{_describe(node)}: block-wise weight scales (block_size "
                             f"{attribute(node, 'block_size', 0)}) have no integer-only lowering (requantization "
                             "is per output channel); quantize with --weight-block channel")
        axis = attribute(node, "axis", 1)
        if axis < 0:
            axis += values.ndim
        return QConst(values.astype(np.int64), scale, zero.astype(np.int64), axis, values.dtype.name)

    # -- emission helpers -----------------------------------------------------------
    def _emit(self, op: str, inputs: list[str], out: str, params: QParams | None,
              clamp: tuple[int, int] | None = None, name: str | None = None, **attrs) -> None:
        """Append an ``edgeq`` node; ``params`` (the output's) adds the y_* attributes."""
        if params is not None:
            y_min, y_max = clamp or (params.qmin, params.qmax)
            attrs.update(y_zero_point=params.zero_point, y_min=y_min, y_max=y_max,
                         y_dtype=params.dtype)
            self._record(out, params)
        node = helper.make_node(op, inputs, [out], name=name or self.new_name(f"{op}_{out}"),
                                domain=INT_DOMAIN, **attrs)
        self.nodes.append(node)

    def _add_init(self, base: str, value: np.ndarray) -> str:
        name = self.new_name(base)
        self.inits[name] = numpy_helper.from_array(value, name)
        return name

    def _copy_init(self, name: str, value: np.ndarray) -> str:
        """An unchanged constant input, copied once under its own name."""
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(value, name)
        return name

    def _output_quant(self, node: onnx.NodeProto) -> tuple[str, QParams, tuple[int, int]]:
        """Follow ``node``'s output through Relu/Clip to its QuantizeLinear.

        Returns the Q output name, its parameters and the clamp range in the
        integer domain; marks the Relu/Clip/Q nodes done.
        """
        tensor, low, high = node.output[0], -np.inf, np.inf
        chain: list[onnx.NodeProto] = []
        while True:
            users = self.consumer.get(tensor, [])
            if tensor in {v.name for v in self.model.graph.output} or len(users) != 1:
                raise _float_error(node, f"its output '{tensor}' is not quantized by a single "
                                         "QuantizeLinear")
            user = users[0]
            if user.op_type == "QuantizeLinear":
                break
            if user.op_type not in CLAMP_OPS:
                raise _float_error(node, f"its output feeds float {_describe(user)}")
            lo, hi = self._clamp_bounds(user)
            low, high = max(low, lo), min(high, hi)
            chain.append(user)
            tensor = user.output[0]
        params = self._qparams(user)
        for consumed in [*chain, user]:
            self.done.add(id(consumed))
        self.int_name[user.output[0]] = user.output[0]
        return user.output[0], params, self._clamp_ints(params, low, high)

    def _clamp_bounds(self, node: onnx.NodeProto) -> tuple[float, float]:
        low, high = clamp_bounds(self.model, node)
        for index, bound in ((1, low), (2, high)):
            if bound is None:
                self._const(node.input[index], node)  # raises, naming the bound that is not a constant
        return low, high

    @staticmethod
    def _clamp_ints(params: QParams, low: float, high: float) -> tuple[int, int]:
        """Integer bounds equal to clamping in float before the QuantizeLinear."""
        def edge(value: float, default: int) -> int:
            if not np.isfinite(value):
                return default
            return int(quantize_linear(value, params.scale, params.zero_point, params.qmin,
                                       params.qmax, np.int64))
        return max(params.qmin, edge(low, params.qmin)), min(params.qmax, edge(high, params.qmax))

    def _int_input(self, node: onnx.NodeProto, index: int) -> str:
        name = node.input[index]
        if name not in self.int_of:
            raise _float_error(node, f"input '{name}' is not a dequantized integer tensor")
        return self.int_of[name]

    def _requant_attrs(self, real: np.ndarray) -> dict:
        multiplier, shift = dyadic(real)
        return {"multiplier": [int(v) for v in np.atleast_1d(multiplier)],
                "shift": [int(v) for v in np.atleast_1d(shift)]}

    # -- weighted ops ----------------------------------------------------------------
    def _weight(self, node: onnx.NodeProto, index: int, channel_axis: int, channels: int
                ) -> tuple[QConst, np.ndarray, int]:
        """Weight constant, its per-output-channel scale [channels] and its bit width."""
        name = node.input[index]
        if name not in self.const_of:
            raise _float_error(node, f"weight '{name}' is not a dequantized integer constant")
        weight = self.const_of[name]
        if np.any(weight.zero_point != 0):
            raise EdgeqError(f"{_describe(node)}: weights must be symmetric (zero point 0)")
        if weight.scale.size not in (1, channels) or (weight.scale.size > 1 and weight.axis != channel_axis):
            raise EdgeqError(f"{_describe(node)}: weight must be quantized per tensor or per output channel")
        scale = np.broadcast_to(weight.scale.reshape(-1), (channels,)).astype(np.float64)
        if weight.dtype == "int4" or (weight.values.min() >= -8 and weight.values.max() <= 7):
            bits = 4
        elif weight.dtype == "int8":
            bits = 8
        else:
            raise EdgeqError(f"{_describe(node)}: weights must be int8 or int4, got {weight.dtype}")
        return weight, scale, bits

    def _bias(self, node: onnx.NodeProto, index: int | None, acc_scale: np.ndarray, beta: float = 1.0
              ) -> np.ndarray:
        """The bias in accumulator units (int64 [channels]); zeros if absent (``index`` None)."""
        if index is None or len(node.input) <= index or not node.input[index]:
            return np.zeros(acc_scale.shape, np.int64)
        name = node.input[index]
        if name in self.const_of:
            bias = self.const_of[name]
            scale = np.broadcast_to(bias.scale.reshape(-1), acc_scale.shape).astype(np.float64)
            zero = np.broadcast_to(bias.zero_point.reshape(-1), acc_scale.shape)
            if beta == 1.0 and np.all(zero == 0) and np.allclose(scale, acc_scale, rtol=1e-6, atol=0):
                return bias.values.reshape(-1).astype(np.int64)  # already in accumulator units
            real = (bias.values.reshape(-1) - zero) * scale
        else:
            value = initializer_array(self.model, name)
            if value is None or value.dtype.kind != "f":
                raise _float_error(node, f"bias '{name}' is neither a dequantized nor a float constant")
            real = value.reshape(-1).astype(np.float64)
        return np.rint(beta * real / acc_scale).astype(np.int64)

    def _emit_weighted(self, node: onnx.NodeProto, op: str, x: str, weight: np.ndarray,
                       w_bits: int, bias: np.ndarray, real_scale: np.ndarray, **attrs) -> None:
        out, params, clamp = self._output_quant(node)
        x_zero = self.params[x].zero_point
        reduce_axes = tuple(range(1, weight.ndim)) if op == "QConv" else (0,)
        folded = bias - x_zero * weight.sum(axis=reduce_axes)
        if np.abs(folded).max(initial=0) >= 2**31:
            raise EdgeqError(f"{_describe(node)}: folded bias does not fit int32")
        base = node.name or out
        w_name = self._add_init(f"{base}_weight_int", weight.astype(np.int8))
        b_name = self._add_init(f"{base}_bias_int", folded.astype(np.int32))
        self._emit(op, [x, w_name, b_name], out, params, clamp, name=self.new_name(base),
                   x_zero_point=x_zero, w_bits=w_bits, **self._requant_attrs(real_scale), **attrs)

    def _conv(self, node: onnx.NodeProto) -> None:
        x = self._int_input(node, 0)
        weight_dims = self.const_of.get(node.input[1])
        if weight_dims is None:
            raise _float_error(node, f"weight '{node.input[1]}' is not a dequantized integer constant")
        if weight_dims.values.ndim != 4:
            raise EdgeqError(f"{_describe(node)}: only 2-D convolutions are supported")
        channels = weight_dims.values.shape[0]
        weight, w_scale, w_bits = self._weight(node, 1, 0, channels)
        auto_pad = _text(attribute(node, "auto_pad", b"NOTSET"))
        if auto_pad not in ("NOTSET", "VALID"):
            raise EdgeqError(f"{_describe(node)}: auto_pad={auto_pad} is not supported (use explicit pads)")
        x_scale = self.params[x].scale
        acc_scale = x_scale * w_scale
        out_scale = self._peek_out_scale(node)
        self._emit_weighted(
            node, "QConv", x, weight.values, w_bits, self._bias(node, 2, acc_scale),
            acc_scale / out_scale,
            kernel_shape=list(weight.values.shape[2:]),
            strides=list(attribute(node, "strides", [1, 1])),
            pads=list(attribute(node, "pads", [0, 0, 0, 0])),
            dilations=list(attribute(node, "dilations", [1, 1])),
            group=int(attribute(node, "group", 1)),
        )

    def _peek_out_scale(self, node: onnx.NodeProto) -> float:
        """Scale of the QuantizeLinear after ``node`` (through Relu/Clip), without consuming it."""
        tensor = node.output[0]
        for _ in range(8):
            users = self.consumer.get(tensor, [])
            if len(users) != 1:
                break
            if users[0].op_type == "QuantizeLinear":
                return self._qparams(users[0]).scale
            if users[0].op_type not in CLAMP_OPS:
                break
            tensor = users[0].output[0]
        raise _float_error(node, f"its output '{node.output[0]}' is not quantized by a single "
                                 "QuantizeLinear")

    def _gemm_or_matmul(self, node: onnx.NodeProto) -> None:
        a_name, b_name = node.input[0], node.input[1]
        if node.op_type == "MatMul" and a_name in self.int_of and b_name in self.int_of:
            self._matmul_activations(node)
            return
        x = self._int_input(node, 0)
        trans_b = node.op_type == "Gemm" and attribute(node, "transB", 0)
        if node.op_type == "Gemm" and attribute(node, "transA", 0):
            raise EdgeqError(f"{_describe(node)}: Gemm with transA=1 is not supported")
        alpha = float(attribute(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
        beta = float(attribute(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
        raw = self.const_of.get(b_name)
        if raw is None or raw.values.ndim != 2:
            raise _float_error(node, f"weight '{b_name}' is not a dequantized 2-D integer constant")
        channels = raw.values.shape[0] if trans_b else raw.values.shape[1]
        weight, w_scale, w_bits = self._weight(node, 1, 0 if trans_b else 1, channels)
        values = weight.values.T if trans_b else weight.values
        acc_scale = self.params[x].scale * w_scale
        bias = self._bias(node, 2 if node.op_type == "Gemm" else None, acc_scale, beta)
        self._emit_weighted(node, "QGemm", x, np.ascontiguousarray(values), w_bits, bias,
                            alpha * acc_scale / self._peek_out_scale(node))

    def _matmul_activations(self, node: onnx.NodeProto) -> None:
        a, b = self._int_input(node, 0), self._int_input(node, 1)
        pa, pb = self.params[a], self.params[b]
        real = pa.scale * pb.scale / self._peek_out_scale(node)
        out, params, clamp = self._output_quant(node)
        self._emit("QMatMul", [a, b], out, params, clamp, name=self.new_name(node.name or out),
                   a_zero_point=pa.zero_point, b_zero_point=pb.zero_point,
                   **self._requant_attrs(real))

    # -- elementwise and pooling ----------------------------------------------------------
    def _operand(self, node: onnx.NodeProto, index: int) -> tuple[str, QParams]:
        """An integer input, or a dequantized constant turned into an integer initializer."""
        name = node.input[index]
        if name in self.int_of:
            tensor = self.int_of[name]
            return tensor, self.params[tensor]
        if name in self.const_of:
            const = self.const_of[name]
            if const.scale.size != 1 or const.zero_point.size != 1:
                raise EdgeqError(f"{_describe(node)}: constant operand '{name}' must be quantized per tensor")
            storage = STORAGE_DTYPE.get(const.dtype)
            if storage is None:
                raise EdgeqError(f"{_describe(node)}: unsupported constant type {const.dtype}")
            lo, hi = dtype_range(storage)
            params = QParams(float(const.scale.reshape(())), int(const.zero_point.reshape(())),
                             storage, lo, hi)
            tensor = self._add_init(f"{name}_int", const.values.astype(storage))
            return self._record(tensor, params), params
        raise _float_error(node, f"input '{name}' is neither an integer tensor nor a quantized constant")

    def _add_or_mul(self, node: onnx.NodeProto) -> None:
        (a, pa), (b, pb) = self._operand(node, 0), self._operand(node, 1)
        out_scale = self._peek_out_scale(node)
        out, params, clamp = self._output_quant(node)
        name = self.new_name(node.name or out)
        if node.op_type == "Add":
            ratio_a, ratio_b = pa.scale / out_scale, pb.scale / out_scale
            _, shift = dyadic(max(ratio_a, ratio_b))
            self._emit("QAdd", [a, b], out, params, clamp, name=name, a_zero_point=pa.zero_point,
                       b_zero_point=pb.zero_point, a_multiplier=int(np.rint(ratio_a * 2.0**shift)),
                       b_multiplier=int(np.rint(ratio_b * 2.0**shift)), shift=int(shift))
        else:
            self._emit("QMul", [a, b], out, params, clamp, name=name, a_zero_point=pa.zero_point,
                       b_zero_point=pb.zero_point,
                       **self._requant_attrs(pa.scale * pb.scale / out_scale))

    def _average_pool(self, node: onnx.NodeProto) -> None:
        x = self._int_input(node, 0)
        px = self.params[x]
        attrs: dict = {}
        if node.op_type == "AveragePool":
            kernel = list(attribute(node, "kernel_shape"))
            pads = list(attribute(node, "pads", [0] * 2 * len(kernel)))
            include_pad = int(attribute(node, "count_include_pad", 0))
            auto_pad = attribute(node, "auto_pad", b"NOTSET")
            if attribute(node, "ceil_mode", 0) or auto_pad not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
                raise EdgeqError(f"{_describe(node)}: ceil_mode / auto_pad are not supported")
            if any(pads) and not include_pad:
                raise EdgeqError(f"{_describe(node)}: padded AveragePool needs count_include_pad=1")
            divisor = int(np.prod(kernel))
            attrs = dict(kernel_shape=kernel, pads=pads, count_include_pad=include_pad,
                         strides=list(attribute(node, "strides", [1] * len(kernel))))
            op = "QAveragePool"
        else:
            shape = self._shape_of(node.input[0])
            if not shape or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
                raise EdgeqError(f"{_describe(node)}: needs static spatial dims, got {shape}")
            divisor = int(np.prod(shape[2:]))
            op = "QGlobalAveragePool"
        real = px.scale / (self._peek_out_scale(node) * divisor)
        out, params, clamp = self._output_quant(node)
        self._emit(op, [x], out, params, clamp, name=self.new_name(node.name or out),
                   x_zero_point=px.zero_point, **self._requant_attrs(real), **attrs)

    def _softmax(self, node: onnx.NodeProto) -> None:
        """``QSoftmax`` over the last axis: exp of each value's distance below the row's maximum from
        a table made for the input scale, normalised in integers (compiler.intgraph)."""
        x = self._int_input(node, 0)
        px = self.params[x]
        shape = self._shape_of(node.input[0])
        axis = int(attribute(node, "axis", -1))
        if not shape or axis % len(shape) != len(shape) - 1 or not isinstance(shape[-1], int):
            raise _float_error(node, f"Softmax over axis {axis} of shape {shape}: only the last axis, "
                                     "of static size, has an integer lowering")
        y_scale = self._peek_out_scale(node)
        requant = self._requant_attrs(1.0 / y_scale)
        if shape[-1] * 2 ** (1 + SOFTMAX_EXP_BITS + requant["shift"][0]) >= 2**63:
            raise EdgeqError(f"{_describe(node)}: {shape[-1]} values per row overflow the integer normalisation")
        out, params, clamp = self._output_quant(node)
        self._emit("QSoftmax", [x], out, params, clamp, name=self.new_name(node.name or out),
                   exp_table=softmax_exp_table(px.scale, px.qmax - px.qmin), **requant)

    def _lookup(self, node: onnx.NodeProto) -> None:
        """``QLookup``: the op evaluated on every input level, as the QDQ model would compute it."""
        x = self._int_input(node, 0)
        px = self.params[x]
        out, params, clamp = self._output_quant(node)
        levels = np.arange(px.qmin, px.qmax + 1)
        values = evaluate_unary(node, dequantize_linear(levels, px.scale, px.zero_point), opset_version(self.model))
        table = quantize_linear(values, params.scale, params.zero_point, clamp[0], clamp[1], np.int64)
        self._emit("QLookup", [x], out, params, clamp, name=self.new_name(node.name or out),
                   table=[int(v) for v in table], x_min=int(px.qmin))

    def _shape_of(self, name: str) -> list | None:
        """Inferred shape of ``name``, looking through Q/DQ (they keep the shape)."""
        while name not in self.shapes and name in self.producer:
            maker = self.producer[name]
            if maker.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                break
            name = maker.input[0]
        return self.shapes.get(name)

    def _concat(self, node: onnx.NodeProto) -> None:
        inputs = [self._operand(node, index)[0] for index in range(len(node.input))]
        try:
            out_scale = self._peek_out_scale(node)
        except EdgeqError:
            out_scale = None
        if out_scale is None:
            shared = {self.params[name] for name in inputs}
            if len(shared) != 1:
                raise _float_error(node, "inputs have different scales and the output is not quantized")
            params = shared.pop()
            out = self.new_name(f"{node.output[0]}_int")
            self.int_of[node.output[0]] = out
            clamp = (params.qmin, params.qmax)
        else:
            out, params, clamp = self._output_quant(node)
        inputs = [self._convert(name, params) for name in inputs]
        if clamp != (params.qmin, params.qmax):
            raise EdgeqError(f"{_describe(node)}: a clamp after Concat is not supported")
        self.nodes.append(helper.make_node("Concat", inputs, [out], name=self.new_name(node.name or out),
                                           axis=attribute(node, "axis")))
        self._record(out, params)

    # -- data movement --------------------------------------------------------------------
    def _data_movement(self, node: onnx.NodeProto) -> None:
        source, result = node.input[0], node.output[0]
        if source in self.input_view:  # still float: replayed after the input's Quantize
            graph_input, moves = self.input_view[source]
            self.input_view[result] = (graph_input, [*moves, node])
            return
        src = self._int_input(node, 0)
        params = self.params[src]
        out = self._moved_name(node, params)
        self._emit_moved(node, src, out, params)

    def _resize(self, node: onnx.NodeProto) -> None:
        """A nearest-neighbour Resize is a Gather along each resized axis, with the source indices
        onnxruntime's Resize reads (:func:`nearest_source_indices`: every coordinate_transformation_mode
        and nearest_mode, exact)."""
        mode, transform = (_text(attribute(node, key, default)) for key, default in (
            ("mode", "nearest"), ("coordinate_transformation_mode", "half_pixel")))
        if mode != "nearest" or transform == "tf_crop_and_resize":
            raise _float_error(node, f"Resize mode {mode} ({transform}): only nearest-neighbour Resize, "
                                     "an exact data movement, has an integer lowering")
        in_shape, out_shape = self._shape_of(node.input[0]), self._shape_of(node.output[0])
        if not in_shape or not out_shape or not all(isinstance(d, int) for d in [*in_shape, *out_shape]):
            raise _float_error(node, f"Resize from {in_shape} to {out_shape}: needs static shapes")
        scales = (initializer_array(self.model, node.input[2])
                  if len(node.input) > 2 and node.input[2] else None)
        src = self._int_input(node, 0)
        params = self.params[src]
        resized = [axis for axis, (a, b) in enumerate(zip(in_shape, out_shape, strict=True)) if a != b]
        out = self._moved_name(node, params)
        if not resized:  # same size: the identity
            self.nodes.append(helper.make_node("Identity", [src], [out], name=self.new_name(node.name or out)))
        for position, axis in enumerate(resized):
            scale = float(scales[axis]) if scales is not None and scales.size else None
            indices = nearest_source_indices(node, in_shape[axis], out_shape[axis], scale)
            target = out if position == len(resized) - 1 else self.new_name(f"{out}_axis{axis}")
            self.nodes.append(helper.make_node(
                "Gather", [src, self._add_init(f"{out}_axis{axis}_indices", indices)], [target],
                name=self.new_name(f"{node.name or out}_axis{axis}"), axis=axis))
            src = target
        self._record(out, params)

    def _moved_name(self, node: onnx.NodeProto, params: QParams) -> str:
        """Name the data movement result after the Q that only requantizes it to the same params."""
        users = self.consumer.get(node.output[0], [])
        outputs = {v.name for v in self.model.graph.output}
        if len(users) == 1 and users[0].op_type == "QuantizeLinear" and node.output[0] not in outputs:
            if self._qparams(users[0]) == params:
                self.done.add(id(users[0]))
                self.int_name[users[0].output[0]] = users[0].output[0]
                return users[0].output[0]
        out = self.new_name(f"{node.output[0]}_int")
        self.int_of[node.output[0]] = out
        return out

    def _emit_moved(self, node: onnx.NodeProto, src: str, out: str, params: QParams) -> None:
        """Emit data-movement ``node`` on integer tensor ``src``, constant inputs copied."""
        inputs = [src]
        for index, name in enumerate(node.input[1:], start=1):
            if not name:
                inputs.append(name)
                continue
            value = initializer_array(self.model, name)
            if value is None:
                raise EdgeqError(f"{_describe(node)}: input '{name}' must be a constant")
            if node.op_type == "Pad" and index == 2:
                value = quantize_linear(value, params.scale, params.zero_point, params.qmin,
                                        params.qmax, params.dtype)
                inputs.append(self._add_init(f"{out}_pad_value", value))
            else:
                inputs.append(self._copy_init(name, value))
        if node.op_type == "Pad":
            if len(inputs) < 2:
                raise EdgeqError(f"{_describe(node)}: Pad needs its pads as an input (opset >= 11)")
            if len(inputs) < 3 or not inputs[2]:
                zero = np.array(params.zero_point, dtype=params.dtype)
                inputs[2:3] = [self._add_init(f"{out}_pad_value", zero)]
        moved = helper.make_node(node.op_type, inputs, [out], name=self.new_name(node.name or out))
        moved.attribute.extend(node.attribute)
        self.nodes.append(moved)
        self._record(out, params)
        self.int_of.setdefault(node.output[0], out)

    def _standalone_clamp(self, node: onnx.NodeProto) -> None:
        src = self._int_input(node, 0)
        params = self.params[src]
        clamp = self._clamp_ints(params, *self._clamp_bounds(node))
        out = self._moved_name(node, params)
        self._emit("Requantize", [src], out, params, clamp, name=self.new_name(node.name or out),
                   x_zero_point=params.zero_point, multiplier=[IDENTITY_MULTIPLIER],
                   shift=[IDENTITY_SHIFT])

    # -- result --------------------------------------------------------------------------
    def _finish(self) -> onnx.ModelProto:
        graph = self.model.graph
        outputs = []
        for value in graph.output:
            name = value.name
            if name in self.int_of:
                src = self.int_of[name]
                p = self.params[src]
                self._emit("Dequantize", [src], name, None, scale=p.scale, zero_point=p.zero_point)
                outputs.append(value)
            elif name in self.int_name:
                src = self.int_name[name]
                if src != name:
                    self.nodes.append(helper.make_node("Identity", [src], [name], name=self.new_name(name)))
                elem = helper.np_dtype_to_tensor_dtype(np.dtype(self.params[src].dtype))
                outputs.append(helper.make_tensor_value_info(name, elem, None))
            else:
                maker = self.producer.get(name)
                raise EdgeqError(
                    f"graph output '{name}' is computed in float"
                    + (f" by {_describe(maker)}" if maker else "")
                    + "; integer-only targets need it to come from a DequantizeLinear"
                )
        inputs = [value for value in graph.input if value.name not in self.init_names]
        for value in inputs:
            if value.type.tensor_type.elem_type != TensorProto.FLOAT:
                raise EdgeqError(f"graph input '{value.name}' must be float32")
        used = {name for node in self.nodes for name in node.input}
        inits = [tensor for name, tensor in self.inits.items() if name in used]
        value_info = [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(p.dtype)), None)
            for name, p in self.params.items()
            if name not in self.inits and name not in {v.name for v in outputs}
        ]
        new_graph = helper.make_graph(self.nodes, graph.name or "edgeq_int", inputs, outputs,
                                      initializer=inits, value_info=value_info)
        opsets = [helper.make_opsetid("", max(13, opset_version(self.model))),
                  helper.make_opsetid(INT_DOMAIN, INT_DOMAIN_VERSION)]
        result = helper.make_model(new_graph, opset_imports=opsets, producer_name="edgeq")
        result.ir_version = min(self.model.ir_version or 9, 10)
        quant = {name: p.to_json() for name, p in self.params.items()}
        helper.set_model_props(result, {TENSOR_QUANT_KEY: json.dumps(quant, sort_keys=True)})
        return result
