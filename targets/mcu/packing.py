"""int4 weights packed two per byte in flash, unpacked inside the kernels.

The integer graph stores 4-bit weights one value per int8 element (``w_bits=4``
on the QConv/QGemm that reads them, :mod:`compiler.intgraph`). On the MCU that
would waste half the flash the mixed-precision plan paid for, so such weights
are stored as bytes of two values: element ``2k`` in the low nibble of byte
``k``, element ``2k + 1`` in the high nibble (row-major order of the weight,
two's complement nibbles). The kernel gets the packed byte array as its weight
parameter and a TE stage (``unpack_int4``, inlined by the MCU schedule) that
rebuilds ``w[i]`` from it, so the MAC loops read flash directly; results are
the same integers as unpacked weights give.
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


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Row-major int4 values (in [-8, 7], any integer dtype) -> uint8 [ceil(n / 2)]."""
    flat = np.asarray(values).astype(np.int64).ravel()
    if flat.size and (flat.min() < INT4_MIN or flat.max() > INT4_MAX):
        raise ValueError(f"int4 packing needs values in [{INT4_MIN}, {INT4_MAX}], got [{flat.min()}, {flat.max()}]")
    nibbles = (flat & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_int4` (int8 of ``shape``)."""
    size = int(np.prod(shape, dtype=np.int64))
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=1).ravel()[:size].astype(np.int16)
    return ((nibbles ^ 8) - 8).astype(np.int8).reshape(shape)


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
        size = int(np.prod(shape, dtype=np.int64))
        source = te.placeholder(((size + 1) // 2,), "uint8", name=tvm_ops._ident(name))  # noqa: SLF001
        self.params.append(source)
        self.args.append(name)
        strides = [int(np.prod(shape[axis + 1:], dtype=np.int64)) for axis in range(len(shape))]
        four, eight, low_bits = (tirx.const(v, "int32") for v in (4, 8, 15))

        def unpack(*index):
            flat = sum((i * s for i, s in zip(index, strides, strict=True)), tirx.const(0, "int32"))
            byte = source[flat // 2].astype("int32")
            nibble = tirx.bitwise_and(tirx.shift_right(byte, (flat % 2) * four), low_bits)
            return (tirx.bitwise_xor(nibble, eight) - eight).astype("int8")  # sign-extend the nibble

        return te.compute(shape, unpack, name=UNPACK_BLOCK)
