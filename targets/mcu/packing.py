"""int4 weights packed two per byte in flash, unpacked inside the kernels.

The integer graph stores 4-bit weights one value per int8 element (``w_bits=4``
on the QConv/QGemm that reads them, :mod:`compiler.intgraph`). On the MCU that
would waste half the flash the mixed-precision plan paid for, so such weights
are stored as bytes of two values, one byte-aligned row per output channel in
the order the MAC loop reads them (QConv: ``w[o]`` flattened; QGemm: ``w[:, m]``);
element ``2j`` of a row sits in the low nibble of its byte ``j``, ``2j + 1`` in
the high nibble (two's complement). The kernel gets the packed bytes as its
weight parameter and a TE stage (``unpack_int4``) that rebuilds ``w[...]``;
the MCU schedule (:mod:`targets.mcu.codegen`) inlines it and steps the
reduction in unrolled pairs, so each byte is read once and split with constant
shifts. Results are the same integers as unpacked weights give.
"""

from __future__ import annotations

import numpy as np
import onnx
from tvm import te, tirx

from compiler.graph import attribute, initializer_array
from targets import tvm_ops

UNPACK_BLOCK = "unpack_int4"
INT4_MIN, INT4_MAX = -8, 7
WEIGHTED_OPS = frozenset({"QConv", "QGemm"})


def _row_major(op_type: str, shape: tuple[int, ...]) -> bool:
    """QConv weights [O, C/g, kh, kw] are already one row per output channel; QGemm's [K, M]
    are stored transposed ([M, K]) so each output's reduction is contiguous too."""
    if op_type not in WEIGHTED_OPS or (op_type == "QGemm" and len(shape) != 2):
        raise ValueError(f"no int4 weight layout for {op_type} weights of shape {list(shape)}")
    return op_type == "QConv"


def reduction_rows(op_type: str, values: np.ndarray) -> np.ndarray:
    """The weight as [outputs, reduction] in the order the kernels' MAC loops read it."""
    values = np.asarray(values)
    return values.reshape(values.shape[0], -1) if _row_major(op_type, values.shape) else values.T


def pack_int4(values: np.ndarray, op_type: str) -> np.ndarray:
    """int4 weights (in [-8, 7], any integer dtype) of a QConv/QGemm -> uint8 bytes: one row of
    ``ceil(K / 2)`` bytes per output (:func:`reduction_rows`), element ``2j`` of a row in the low
    nibble of its byte ``j``, ``2j + 1`` in the high nibble (an odd row ends with a 0 nibble)."""
    rows = reduction_rows(op_type, values).astype(np.int64)
    if rows.size and (rows.min() < INT4_MIN or rows.max() > INT4_MAX):
        raise ValueError(f"int4 packing needs values in [{INT4_MIN}, {INT4_MAX}], got [{rows.min()}, {rows.max()}]")
    nibbles = (rows & 0xF).astype(np.uint8)
    if nibbles.shape[1] % 2:
        nibbles = np.pad(nibbles, ((0, 0), (0, 1)))
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).astype(np.uint8).ravel()


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...], op_type: str) -> np.ndarray:
    """Inverse of :func:`pack_int4` (int8 of ``shape``)."""
    row_major = _row_major(op_type, shape)
    outputs = shape[0] if row_major else shape[1]
    depth = int(np.prod(shape, dtype=np.int64)) // max(outputs, 1)
    pairs = np.asarray(packed).reshape(outputs, -1)
    nibbles = np.stack([pairs & 0xF, pairs >> 4], axis=2).reshape(outputs, -1)[:, :depth].astype(np.int16)
    rows = ((nibbles ^ 8) - 8).astype(np.int8)
    return rows.reshape(shape) if row_major else np.ascontiguousarray(rows.T)


def packed_weight_names(int_model: onnx.ModelProto) -> frozenset[str]:
    """Weight initializers every reader of which is a QConv/QGemm with ``w_bits=4`` (and whose
    values fit int4): those are stored packed."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in int_model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    packed = set()
    for node in int_model.graph.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        name = node.input[1]
        if not all(r.op_type in WEIGHTED_OPS and list(r.input[1:2]) == [name] and attribute(r, "w_bits") == 4
                   for r in readers[name]):
            continue
        value = initializer_array(int_model, name)
        if value is not None and value.size and INT4_MIN <= value.min() and value.max() <= INT4_MAX:
            packed.add(name)
    return frozenset(packed)


def node_primfunc(int_model: onnx.ModelProto, node: onnx.NodeProto, types: dict, packed: frozenset[str]
                  ) -> tuple[object, list[str], dict[str, np.ndarray]]:
    """:func:`targets.tvm_ops.node_primfunc`, with the weights named in ``packed`` read from
    a packed uint8 parameter through an ``unpack_int4`` stage."""
    if not packed.intersection(node.input):
        return tvm_ops.node_primfunc(int_model, node, types)
    kernel = _PackedWeightBuilder(int_model, node, types, packed).build()
    return kernel.func, kernel.args, kernel.constants


class _PackedWeightBuilder(tvm_ops._Builder):  # noqa: SLF001 -- the same TE ops; only the weight parameter differs
    def __init__(self, int_model: onnx.ModelProto, node: onnx.NodeProto, types: dict, packed: frozenset[str]) -> None:
        super().__init__(int_model, node, types)
        self.packed = packed

    def tensor(self, name: str) -> te.Tensor:
        if name not in self.packed:
            return super().tensor(name)
        shape = tuple(int(d) for d in self.const(name).shape)
        row_major = _row_major(self.node.op_type, shape)
        outputs = shape[0] if row_major else shape[1]
        row_bytes = (int(np.prod(shape, dtype=np.int64)) // outputs + 1) // 2
        source = te.placeholder((outputs * row_bytes,), "uint8", name=tvm_ops._ident(name))  # noqa: SLF001
        self.params.append(source)
        self.args.append(name)
        inner = [int(np.prod(shape[axis + 1:], dtype=np.int64)) for axis in range(1, len(shape))]
        four, eight, low_bits = (tirx.const(v, "int32") for v in (4, 8, 15))

        def unpack(*index):
            if row_major:  # [O, C/g, kh, kw]: row o, position (c * kh + y) * kw + x
                row = index[0]
                k = sum((i * s for i, s in zip(index[1:], inner, strict=True)), tirx.const(0, "int32"))
            else:  # [K, M]: row m, position k
                row, k = index[1], index[0]
            byte = source[row * row_bytes + k // 2].astype("int32")
            nibble = tirx.bitwise_and(tirx.shift_right(byte, (k % 2) * four), low_bits)
            return (tirx.bitwise_xor(nibble, eight) - eight).astype("int8")  # sign-extend the nibble

        return te.compute(shape, unpack, name=UNPACK_BLOCK)
