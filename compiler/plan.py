"""The quantization plan: every quantization decision in one plain structure.

Passes read and write a :class:`QuantPlan`; nothing else carries hidden state.
It serialises to ``plan.json`` (see :meth:`QuantPlan.save`).

* :class:`TensorQuant` -- how one tensor of the float graph is quantized:
  bits, signedness, granularity (per tensor, per channel on ``axis``, or
  blocks of ``block_size`` along ``axis`` as in ONNX DequantizeLinear: one
  scale per block of ``block_size`` consecutive elements on ``axis``, separate
  for every index of the other axes; ``scale`` is then the flattened array of
  shape ``scale_shape``), scale and zero point.
* :class:`LayerPlan` -- one quantized layer (Conv, Gemm, MatMul, ...): the
  chosen ``w_bits``/``a_bits`` and the tensors it reads and writes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from compiler.atomic import atomic_write_text

ROLES = ("weight", "activation", "bias")


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """The representable integer range of a ``bits``-wide (un)signed integer."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def dtype_name(bits: int, signed: bool) -> str:
    """ONNX-style element type name, e.g. ``int8``, ``uint4``, ``int32``."""
    return f"{'' if signed else 'u'}int{bits}"


@dataclass
class TensorQuant:
    """Quantization parameters of one tensor: ``real = scale * (q - zero_point)``."""

    name: str
    role: str  # one of ROLES
    bits: int
    signed: bool
    scale: list[float]
    zero_point: list[int]
    axis: int | None = None  # None: per tensor; block-wise: the blocked (reduction) axis
    block_size: int | None = None  # blocks along ``axis`` (block-wise weights)
    scale_shape: list[int] | None = None  # block-wise: the scale array's shape (``scale`` is it flattened)
    # The float range the quantizer was fitted to (after clipping), for reports.
    range_min: float | None = None
    range_max: float | None = None

    @property
    def dtype(self) -> str:
        return dtype_name(self.bits, self.signed)

    @property
    def qmin(self) -> int:
        return int_range(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits, self.signed)[1]

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def block_wise(self) -> bool:
        return bool(self.block_size)

    @property
    def granularity(self) -> str:
        """``per-tensor``, ``per-channel`` or ``block B`` (for reports)."""
        if self.block_wise:
            return f"block {self.block_size}"
        return "per-channel" if self.per_channel and len(self.scale) > 1 else "per-tensor"

    def scale_array(self) -> np.ndarray:
        """The scales: 1-D per tensor / per channel, ``scale_shape`` when block-wise."""
        scale = np.asarray(self.scale, dtype=np.float32)
        return scale.reshape(self.scale_shape) if self.scale_shape is not None else scale

    def zero_point_array(self) -> np.ndarray:
        zero = np.asarray(self.zero_point, dtype=np.int64)
        return zero.reshape(self.scale_shape) if self.scale_shape is not None else zero


@dataclass
class LayerPlan:
    """The bits chosen for one quantizable layer and the tensors it touches."""

    node: str
    op_type: str
    w_bits: int | None  # None: the layer has no weight (Add, Concat, pooling)
    a_bits: int
    inputs: list[str] = field(default_factory=list)  # quantized activation inputs
    outputs: list[str] = field(default_factory=list)
    weight: str | None = None
    bias: str | None = None
    weight_params: int = 0  # number of weight elements
    # Free-form per-layer facts written by passes: sensitivity per candidate,
    # cost at the chosen bits, pinned, tie group, ...
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight as exported, sub-byte values packed: at ``w_bits``, or at the wider element
        type the QDQ export stored it in (``info["weight_storage_bits"]``: 2-bit values in an int4 container)."""
        if not self.w_bits:
            return 0
        return (self.weight_params * self.info.get("weight_storage_bits", self.w_bits) + 7) // 8


@dataclass
class QuantPlan:
    """Every quantization decision for one model; serialises to plan.json."""

    model: str = ""
    target: str = "onnx"
    w_bits: int = 8  # defaults for layers without an explicit choice
    a_bits: int = 8
    activation_signed: bool = False  # uint8 activations by default (faster in ORT on x86)
    # Block-wise weights: MatMul/Gemm weights below 8 bits get one scale per this many
    # reduction-axis elements per output channel (None: per output channel).
    weight_block_size: int | None = None
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    tensors: dict[str, TensorQuant] = field(default_factory=dict)
    float_nodes: list[dict[str, str]] = field(default_factory=list)  # node, op_type, reason
    recipe: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)

    # -- queries ---------------------------------------------------------------
    def weight_bytes(self) -> int:
        return sum(layer.weight_bytes for layer in self.layers.values())

    def weight_scale_bytes(self) -> int:
        """Bytes of the weights' quantization parameters as exported: fp32 scales (zero points
        are zero but stored too, at the weight's width, packed)."""
        total = 0
        for tq in self.tensors.values():
            if tq.role == "weight":
                total += 4 * len(tq.scale) + (len(tq.zero_point) * tq.bits + 7) // 8
        return total

    def keep_float(self, node: str, op_type: str, reason: str) -> None:
        """Record that ``node`` stays float, and why (listed in the report)."""
        if not any(entry["node"] == node for entry in self.float_nodes):
            self.float_nodes.append({"node": node, "op_type": op_type, "reason": reason})

    def update_totals(self) -> None:
        int8_bytes = sum(layer.weight_params for layer in self.layers.values() if layer.w_bits)
        self.totals.update(
            weight_bytes=self.weight_bytes(),
            weight_scale_bytes=self.weight_scale_bytes(),
            int8_weight_bytes=int8_bytes,
            quantized_layers=len(self.layers),
            float_nodes=len(self.float_nodes),
        )

    # -- serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = [asdict(layer) for layer in self.layers.values()]
        data["tensors"] = [asdict(tq) for tq in self.tensors.values()]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantPlan:
        data = dict(data)
        layers = {entry["node"]: LayerPlan(**entry) for entry in data.pop("layers", [])}
        tensors = {entry["name"]: TensorQuant(**entry) for entry in data.pop("tensors", [])}
        return cls(layers=layers, tensors=tensors, **data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False, default=_json_default) + "\n"

    def save(self, path: str) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str) -> QuantPlan:
        with open(path) as handle:
            return cls.from_dict(json.load(handle))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
