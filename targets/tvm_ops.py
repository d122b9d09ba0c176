"""The integer graph's ops as TVM TE computes: one PrimFunc per node, epilogue fused.

Shared by every TVM target (cpu: one Relax module built with llvm; mcu: the
same PrimFuncs built one by one with ``{"kind": "c"}``; gpu). The semantics
are :mod:`compiler.intgraph`'s and the arithmetic is the reference
interpreter's (:mod:`compiler.interpreter`), so every target can be compared
with it bit for bit:

* int8/uint8 x int8 products accumulate in int32 (int64 where the worst case
  ``K * max|x| * max|w|`` could overflow int32, e.g. 16-bit activations);
* the epilogue -- ``+ bias``, :mod:`compiler.requant`'s round-half-even
  requantization in int64, ``+ y_zero_point``, clamp to ``[y_min, y_max]``,
  cast -- is a second stage of the same PrimFunc;
* padding of convolutions and average pools reads the input zero point,
  max pooling pads with the dtype's minimum.

The entry points
----------------
:func:`node_primfunc` ``(int_model, node, types) -> (func, args, constants)``
    One PrimFunc for one node. ``args`` names the PrimFunc's parameters in
    order -- the node's tensor inputs (activations and weight/bias/index
    initializers), then extra constants, then the output (last). ``constants``
    holds the values of the extra constants that are not initializers of the
    model (per-channel requantization ``multiplier``/``shift`` arrays, named
    ``<node>_multiplier`` / ``<node>_shift``); per-tensor values are inlined.
    Compile-time inputs (Reshape shapes, Pad pads/value, Slice bounds) are not
    parameters. The PrimFunc has no ``global_symbol``: the caller names it.
:func:`node_kernels` ``(int_model, types) -> list[NodeKernel]``
    The same for every node except the float edges (Quantize/Dequantize).
:func:`tensor_types` ``(int_model) -> {name: (shape, dtype)}``
    Static shapes (batch 1) of every tensor, which the two functions need.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from tvm import te, tirx, topi

from compiler.data import input_sample_dims
from compiler.errors import EdgeqError
from compiler.graph import attribute, initializer_array
from compiler.interpreter import pad_widths, run_all, slice_ranges

Types = dict[str, tuple[tuple[int, ...], str]]
EDGE_OPS = frozenset({"Quantize", "Dequantize"})
INT32_LIMIT = 2**31

log = logging.getLogger(__name__)


@dataclass
class NodeKernel:
    """One node as one PrimFunc, with what a caller needs to call it."""

    node: onnx.NodeProto
    func: tirx.PrimFunc
    args: list[str]  # tensor names in parameter order; the output is last
    constants: dict[str, np.ndarray] = field(default_factory=dict)  # args that are not graph tensors

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]


def tensor_types(int_model: onnx.ModelProto, batch: int = 1) -> Types:
    """Shape and dtype of every tensor, from one interpreter run on zeros (batch ``batch``)."""
    inputs = {name: np.zeros([batch, *dims], np.float32) for name, dims in input_sample_dims(int_model).items()}
    return {name: (tuple(int(d) for d in np.shape(v)), np.asarray(v).dtype.name)
            for name, v in run_all(int_model, inputs).items()}


def node_primfunc(int_model: onnx.ModelProto, node: onnx.NodeProto, types: Types
                  ) -> tuple[tirx.PrimFunc, list[str], dict[str, np.ndarray]]:
    """The PrimFunc of ``node``, its parameter names (output last) and extra constants."""
    kernel = _Builder(int_model, node, types).build()
    return kernel.func, kernel.args, kernel.constants


def node_kernels(int_model: onnx.ModelProto, types: Types) -> list[NodeKernel]:
    """One kernel per node of the integer core (every node but Quantize/Dequantize)."""
    return [_Builder(int_model, node, types).build() for node in int_model.graph.node
            if node.op_type not in EDGE_OPS]


# -- expression helpers -------------------------------------------------------------
def _i64(value: int) -> tirx.PrimExpr:
    return tirx.const(int(value), "int64")


def requant_expr(acc: tirx.PrimExpr, multiplier: tirx.PrimExpr | int, shift: tirx.PrimExpr | int
                 ) -> tirx.PrimExpr:
    """:func:`compiler.requant.requantize` on one int64 value (round half to even)."""
    if isinstance(multiplier, int | np.integer):
        multiplier = _i64(multiplier)
    if isinstance(shift, int | np.integer):
        half, mask, shift = _i64(1 << (int(shift) - 1)), _i64((1 << int(shift)) - 1), _i64(shift)
    else:
        half = tirx.shift_left(_i64(1), shift - _i64(1))
        mask = half * _i64(2) - _i64(1)
    product = acc * multiplier
    rounded = tirx.shift_right(product + half, shift)
    tie = tirx.EQ(tirx.bitwise_and(product, mask), half)
    return rounded - tirx.Select(tie, tirx.bitwise_and(rounded, _i64(1)), _i64(0))


def clamp_cast(value: tirx.PrimExpr, node: onnx.NodeProto) -> tirx.PrimExpr:
    """``clip(value + y_zero_point, y_min, y_max)`` cast to ``y_dtype`` (value is int64)."""
    shifted = value + _i64(attribute(node, "y_zero_point", 0))
    clipped = tirx.max(tirx.min(shifted, _i64(attribute(node, "y_max"))), _i64(attribute(node, "y_min")))
    return clipped.astype(_str(attribute(node, "y_dtype")))


def _str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _max_abs_dtype(dtype: str) -> int:
    info = np.iinfo(np.dtype(str(dtype)))
    return max(abs(int(info.min)), int(info.max))


def _accumulator(reduce_size: int, x_dtype: str, weight: np.ndarray | None) -> str:
    """int32 unless the worst-case sum could overflow it."""
    w_max = int(np.abs(weight.astype(np.int64)).max(initial=0)) if weight is not None else 1
    return "int32" if reduce_size * _max_abs_dtype(x_dtype) * max(w_max, 1) < INT32_LIMIT else "int64"


def _broadcast_index(in_shape: tuple[int, ...], out_shape: tuple[int, ...], index) -> list:
    """Index into an input of numpy-broadcast ``in_shape`` for output position ``index``."""
    offset = len(out_shape) - len(in_shape)
    return [0 if dim == 1 and out_shape[offset + axis] != 1 else index[offset + axis]
            for axis, dim in enumerate(in_shape)]


# -- the builder ----------------------------------------------------------------------
class _Builder:
    """Builds the TE compute of one node."""

    def __init__(self, int_model: onnx.ModelProto, node: onnx.NodeProto, types: Types) -> None:
        self.model = int_model
        self.node = node
        self.types = types
        self.params: list[te.Tensor] = []
        self.args: list[str] = []
        self.constants: dict[str, np.ndarray] = {}
        self.requant_pair: tuple | None = None

    # parameters
    def tensor(self, name: str) -> te.Tensor:
        """A parameter for graph tensor (or initializer) ``name``."""
        shape, dtype = self.types[name] if name in self.types else self._init_type(name)
        placeholder = te.placeholder(shape, dtype, name=_ident(name))
        self.params.append(placeholder)
        self.args.append(name)
        return placeholder

    def _init_type(self, name: str) -> tuple[tuple[int, ...], str]:
        value = self.const(name)
        return tuple(value.shape), value.dtype.name

    def const(self, name: str) -> np.ndarray:
        value = initializer_array(self.model, name)
        if value is None:
            raise EdgeqError(f"{self.node.op_type} '{self.node.name}': input '{name}' must be a constant")
        return value

    def constant(self, key: str, values: np.ndarray) -> te.Tensor:
        """A parameter holding ``values`` (not a graph tensor): named ``<node>_<key>`` in ``constants``."""
        name = f"{self.node.name or self.node.output[0]}_{key}"
        self.constants[name] = values
        placeholder = te.placeholder(values.shape, values.dtype.name, name=_ident(name))
        self.params.append(placeholder)
        self.args.append(name)
        return placeholder

    def per_channel(self, key: str) -> Callable[[tirx.PrimExpr], tirx.PrimExpr | int] | int:
        """Requantization constant ``key``: an int (per tensor) or a channel -> load function."""
        values = np.asarray(attribute(self.node, key), dtype=np.int64).reshape(-1)
        if values.size == 1:
            return int(values[0])
        placeholder = self.constant(key, values)
        return lambda channel: placeholder[channel]

    def requant(self, acc: tirx.PrimExpr, channel: tirx.PrimExpr | None = None) -> tirx.PrimExpr:
        """The fused epilogue on int64 ``acc`` of output channel ``channel``."""
        if self.requant_pair is None:  # parameters are made once, when TE first traces this
            self.requant_pair = (self.per_channel("multiplier"), self.per_channel("shift"))
        multiplier, shift = (v(channel) if callable(v) else v for v in self.requant_pair)
        return clamp_cast(requant_expr(acc, multiplier, shift), self.node)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.types[self.node.output[0]][0]

    def build(self) -> NodeKernel:
        op = self.node.op_type
        method = getattr(self, f"op_{op}", None)
        if method is None:
            raise EdgeqError(f"no TVM lowering for {op} (node '{self.node.name}')")
        out = method()  # graph inputs become parameters before the extra constants
        func = te.create_prim_func([*self.params, out])
        return NodeKernel(self.node, func, [*self.args, self.node.output[0]], dict(self.constants))

    # weighted ops
    def op_QConv(self) -> te.Tensor:
        node = self.node
        x = self.tensor(node.input[0])
        weight_value = self.const(node.input[1])
        w = self.tensor(node.input[1])
        bias = self.tensor(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        out_channels, per_group, kh, kw = weight_value.shape
        group = attribute(node, "group", 1)
        sh, sw = attribute(node, "strides", [1, 1])
        dh, dw = attribute(node, "dilations", [1, 1])
        top, left, bottom, right = attribute(node, "pads", [0, 0, 0, 0])
        x_zero = attribute(node, "x_zero_point", 0)
        padded = x
        if any((top, left, bottom, right)):
            padded = topi.nn.pad(x, [0, 0, top, left], [0, 0, bottom, right],
                                 pad_value=tirx.const(x_zero, x.dtype), name="pad")
        acc_dtype = _accumulator(per_group * kh * kw, x.dtype, weight_value)
        out_per_group = out_channels // group
        rc = te.reduce_axis((0, per_group), name="rc")
        ry = te.reduce_axis((0, kh), name="ry")
        rx = te.reduce_axis((0, kw), name="rx")

        def conv(n, o, h, v):
            channel = (o // out_per_group) * per_group + rc if group > 1 else rc
            pixel = padded[n, channel, h * sh + ry * dh, v * sw + rx * dw].astype(acc_dtype)
            return te.sum(pixel * w[o, rc, ry, rx].astype(acc_dtype), axis=[rc, ry, rx])

        acc = te.compute(self.out_shape, conv, name="acc")

        def epilogue(n, o, h, v):
            total = acc[n, o, h, v].astype("int64")
            if bias is not None:
                total = total + bias[o].astype("int64")
            return self.requant(total, o)

        return te.compute(self.out_shape, epilogue, name="y")

    def op_QGemm(self) -> te.Tensor:
        node = self.node
        x = self.tensor(node.input[0])
        weight_value = self.const(node.input[1])
        w = self.tensor(node.input[1])
        bias = self.tensor(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        depth = weight_value.shape[0]
        acc_dtype = _accumulator(depth, x.dtype, weight_value)
        k = te.reduce_axis((0, depth), name="k")
        acc = te.compute(self.out_shape, lambda *i: te.sum(
            x[(*i[:-1], k)].astype(acc_dtype) * w[k, i[-1]].astype(acc_dtype), axis=k), name="acc")

        def epilogue(*i):
            total = acc[i].astype("int64")
            if bias is not None:
                total = total + bias[i[-1]].astype("int64")
            return self.requant(total, i[-1])

        return te.compute(self.out_shape, epilogue, name="y")

    def op_QMatMul(self) -> te.Tensor:
        node = self.node
        a, b = self.tensor(node.input[0]), self.tensor(node.input[1])
        a_zero, b_zero = attribute(node, "a_zero_point", 0), attribute(node, "b_zero_point", 0)
        depth = a.shape[-1]
        k = te.reduce_axis((0, depth), name="k")
        out = self.out_shape
        batch = out[:-2]

        def matmul(*i):
            a_index = [*_broadcast_index(tuple(a.shape[:-2]), batch, i[:-2]), i[-2], k]
            b_index = [*_broadcast_index(tuple(b.shape[:-2]), batch, i[:-2]), k, i[-1]]
            return te.sum((a[tuple(a_index)].astype("int64") - _i64(a_zero))
                          * (b[tuple(b_index)].astype("int64") - _i64(b_zero)), axis=k)

        acc = te.compute(out, matmul, name="acc")
        return te.compute(out, lambda *i: self.requant(acc[i]), name="y")

    # elementwise
    def _binary(self, combine: Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr]) -> te.Tensor:
        node = self.node
        a, b = self.tensor(node.input[0]), self.tensor(node.input[1])
        a_zero, b_zero = attribute(node, "a_zero_point", 0), attribute(node, "b_zero_point", 0)
        out = self.out_shape

        def fn(*i):
            va = a[tuple(_broadcast_index(tuple(a.shape), out, i))].astype("int64") - _i64(a_zero)
            vb = b[tuple(_broadcast_index(tuple(b.shape), out, i))].astype("int64") - _i64(b_zero)
            return combine(va, vb)

        return te.compute(out, fn, name="y")

    def op_QAdd(self) -> te.Tensor:
        node = self.node
        a_mult, b_mult = _i64(attribute(node, "a_multiplier")), _i64(attribute(node, "b_multiplier"))
        shift = int(attribute(node, "shift"))
        return self._binary(lambda va, vb: clamp_cast(
            requant_expr(va * a_mult + vb * b_mult, 1, shift), node))

    def op_QMul(self) -> te.Tensor:
        return self._binary(lambda va, vb: self.requant(va * vb))

    def op_Requantize(self) -> te.Tensor:
        x = self.tensor(self.node.input[0])
        zero = _i64(attribute(self.node, "x_zero_point", 0))
        return te.compute(self.out_shape, lambda *i: self.requant(x[i].astype("int64") - zero), name="y")

    # pooling
    def _pool_windows(self, x: te.Tensor, pad_value: int):
        node = self.node
        kh, kw = attribute(node, "kernel_shape")
        sh, sw = attribute(node, "strides", [1, 1])
        dh, dw = attribute(node, "dilations", [1, 1])
        top, left, bottom, right = attribute(node, "pads", [0, 0, 0, 0])
        padded = x
        if any((top, left, bottom, right)):
            padded = topi.nn.pad(x, [0, 0, top, left], [0, 0, bottom, right],
                                 pad_value=tirx.const(pad_value, x.dtype), name="pad")
        ry = te.reduce_axis((0, kh), name="ry")
        rx = te.reduce_axis((0, kw), name="rx")
        return lambda n, c, h, w: padded[n, c, h * sh + ry * dh, w * sw + rx * dw], [ry, rx]

    def op_QAveragePool(self) -> te.Tensor:
        x = self.tensor(self.node.input[0])
        zero = attribute(self.node, "x_zero_point", 0)
        window, axes = self._pool_windows(x, zero)
        acc = te.compute(self.out_shape, lambda *i: te.sum(
            window(*i).astype("int64") - _i64(zero), axis=axes), name="acc")
        return te.compute(self.out_shape, lambda *i: self.requant(acc[i]), name="y")

    def op_QGlobalAveragePool(self) -> te.Tensor:
        x = self.tensor(self.node.input[0])
        zero = attribute(self.node, "x_zero_point", 0)
        rh = te.reduce_axis((0, x.shape[2]), name="rh")
        rw = te.reduce_axis((0, x.shape[3]), name="rw")
        acc_dtype = _accumulator(int(x.shape[2]) * int(x.shape[3]), x.dtype, None)
        acc = te.compute(self.out_shape, lambda n, c, _h, _w: te.sum(
            x[n, c, rh, rw].astype(acc_dtype) - tirx.const(zero, acc_dtype), axis=[rh, rw]), name="acc")
        return te.compute(self.out_shape, lambda *i: self.requant(acc[i].astype("int64")), name="y")

    def op_QSoftmax(self) -> te.Tensor:
        node = self.node
        x = self.tensor(node.input[0])
        values = np.asarray(attribute(node, "exp_table"), dtype=np.int32)
        table = self.constant("exp_table", values)
        out = self.out_shape
        rows, width = out[:-1], out[-1]
        (multiplier,), (shift,) = attribute(node, "multiplier"), attribute(node, "shift")
        k = te.reduce_axis((0, width), name="k")
        peak = te.compute(rows, lambda *r: te.max(x[(*r, k)].astype("int32"), axis=k), name="peak")

        def exp(*i):  # read from the table twice rather than kept: no row-sized int64 buffer on an MCU's stack
            distance = tirx.min(peak[i[:-1]] - x[i].astype("int32"), len(values) - 1)
            return table[distance].astype("int64")

        j = te.reduce_axis((0, width), name="j")
        total = te.compute(rows, lambda *r: te.sum(exp(*r, j), axis=j), name="total")

        def probability(*i):
            denominator = total[i[:-1]] * _i64(2 ** (shift + 1))  # round half up in the division
            numerator = exp(*i) * _i64(2 * multiplier) + tirx.floordiv(denominator, _i64(2))
            return clamp_cast(tirx.floordiv(numerator, denominator), node)

        return te.compute(out, probability, name="y")

    def op_QLookup(self) -> te.Tensor:
        node = self.node
        x = self.tensor(node.input[0])
        dtype = _str(attribute(node, "y_dtype"))
        table = self.constant("table", np.asarray(attribute(node, "table"), dtype=dtype))  # one entry per level
        x_min = int(attribute(node, "x_min"))
        return te.compute(self.out_shape, lambda *i: table[x[i].astype("int32") - x_min], name="y")

    def op_MaxPool(self) -> te.Tensor:
        x = self.tensor(self.node.input[0])
        if attribute(self.node, "ceil_mode", 0):
            raise EdgeqError(f"MaxPool '{self.node.name}': ceil_mode=1 is not supported")
        window, axes = self._pool_windows(x, int(np.iinfo(np.dtype(str(x.dtype))).min))
        return te.compute(self.out_shape, lambda *i: te.max(window(*i), axis=axes), name="y")

    # float edges
    def op_Quantize(self) -> te.Tensor:
        x = self.tensor(self.node.input[0])
        scale = tirx.const(float(np.float32(attribute(self.node, "scale"))), "float32")
        zero = tirx.const(float(attribute(self.node, "y_zero_point", 0)), "float32")
        low = tirx.const(float(attribute(self.node, "y_min")), "float32")
        high = tirx.const(float(attribute(self.node, "y_max")), "float32")
        dtype = _str(attribute(self.node, "y_dtype"))
        return te.compute(self.out_shape, lambda *i: tirx.max(tirx.min(
            tirx.nearbyint(x[i] / scale) + zero, high), low).astype(dtype), name="y")

    def op_Dequantize(self) -> te.Tensor:
        x = self.tensor(self.node.input[0])
        scale = tirx.const(float(np.float32(attribute(self.node, "scale"))), "float32")
        zero = _i64(attribute(self.node, "zero_point", 0))
        return te.compute(self.out_shape, lambda *i: (x[i].astype("int64") - zero).astype("float32")
                          * scale, name="y")

    # data movement
    def _reshape(self) -> te.Tensor:
        x = self.tensor(self.node.input[0])
        return topi.reshape(x, self.out_shape)

    op_Reshape = op_Flatten = op_Squeeze = op_Unsqueeze = _reshape

    def op_Identity(self) -> te.Tensor:
        x = self.tensor(self.node.input[0])
        return te.compute(self.out_shape, lambda *i: x[i], name="y")

    def op_Transpose(self) -> te.Tensor:
        x = self.tensor(self.node.input[0])
        perm = attribute(self.node, "perm") or list(reversed(range(len(x.shape))))
        return topi.transpose(x, list(perm))

    def op_Concat(self) -> te.Tensor:
        inputs = [self.tensor(name) for name in self.node.input]
        axis = attribute(self.node, "axis")
        return topi.concatenate(inputs, axis % len(self.out_shape))

    def op_Pad(self) -> te.Tensor:
        node = self.node
        x = self.tensor(node.input[0])
        mode = _str(attribute(node, "mode", "constant"))
        if mode != "constant":
            raise EdgeqError(f"Pad '{node.name}': mode {mode} has no TVM lowering")
        axes = self.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        widths = pad_widths(len(x.shape), self.const(node.input[1]), axes)
        value = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
        return topi.nn.pad(x, [w[0] for w in widths], [w[1] for w in widths],
                           pad_value=tirx.const(int(np.asarray(value).reshape(())), x.dtype), name="y")

    def op_Slice(self) -> te.Tensor:
        node = self.node
        x = self.tensor(node.input[0])
        consts = [None, *[self.const(name) if name else None for name in node.input[1:]]]
        ranges = slice_ranges(tuple(int(d) for d in x.shape), consts)
        return te.compute(self.out_shape, lambda *i: x[tuple(
            start + index * step for index, (start, _, step) in zip(i, ranges, strict=True))], name="y")

    def op_Gather(self) -> te.Tensor:
        node = self.node
        x = self.tensor(node.input[0])
        values = self.const(node.input[1]).astype(np.int64)
        axis = attribute(node, "axis", 0) % len(x.shape)
        values = np.where(values < 0, values + int(x.shape[axis]), values)
        indices = self.constant("indices", values)
        rank = values.ndim

        def gather(*i):
            position = indices[tuple(i[axis:axis + rank])] if rank else indices[()]
            return x[(*i[:axis], position, *i[axis + rank:])]

        return te.compute(self.out_shape, gather, name="y")


def fold_into_output(sch, on_attach: Callable[[object, int], None] | None = None) -> tuple[object, int]:
    """Fold every intermediate block of a TE PrimFunc's schedule ``sch`` into its output block.

    A block that can be inlined is (padding, casts); one that cannot (a reduction)
    is computed under the output's loop over the block's own last dimension: an
    accumulator shaped like the output under the innermost spatial loop (one
    scalar per output element), a per-row one -- Softmax's row maximum and sum --
    under the row loop, so it runs once per row and not once per element (under
    the innermost loop a 1000-class Softmax re-reduced its row 1000 times).
    ``on_attach(block, depth)`` is called after each such move. Returns the output
    block and how many of its leading loops still hold nothing else (the ones a
    schedule may fuse).
    """
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    output = blocks[-1]
    spatial = sum(1 for iter_var in sch.get(output).iter_vars if int(iter_var.iter_type) == 0)
    free = spatial
    for block in reversed(blocks[:-1]):
        try:
            sch.compute_inline(block)
            continue
        except Exception as inline_error:  # noqa: BLE001 -- TVM raises its own error types
            reason = str(inline_error).splitlines()[0] if str(inline_error) else type(inline_error).__name__
            log.debug("block %s is not inlinable (%s); computing it under the output's loops",
                      sch.get(block).name_hint, reason)
        depth = min(len(sch.get(block).writes[0].region), spatial) - 1
        if depth < 0:  # a scalar: left before the output's loops, computed once
            continue
        sch.compute_at(block, sch.get_loops(output)[depth])
        free = min(free, depth + 1)
        if on_attach is not None:
            on_attach(block, depth)
    return output, free


def _ident(name: str) -> str:
    """A C identifier for a placeholder name."""
    cleaned = "".join(ch if ch.isalnum() else "_" for ch in name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"t_{cleaned}"

