"""Cost model of the ``onnx`` target (a QDQ model for any ONNX runtime).

The device is unknown, so only device-independent costs are given: packed
weight bytes, activation bytes, MACs and bit-operations. Latency and energy
stay None; a latency or energy budget for this target is refused by the
allocator with a message naming the metric.

Weight bytes are those of the element type the QDQ export stores: 2-bit
weights are INT2 (0.25 byte each) where onnxruntime runs an INT2
DequantizeLinear for the layer (per-channel Gemm weights written as one
block per channel included), else int4 containers (0.5 byte each) --
:func:`stored_weight_bits`.
"""

from __future__ import annotations

from passes.insert_qdq import INT2_CONTAINER, INT2_CONTAINER_BITS, int2_weight_form
from targets.base import CostModel, LayerCost, LayerShape, packed_bytes
from targets.cost_common import base_layer_cost, refuse_device


def stored_weight_bits(op_type: str, w_bits: int, a_bits: int) -> int:
    """Width of the element type ``passes/insert_qdq`` stores a ``w_bits`` weight of ``op_type`` in.

    The cost model sees neither the weight's granularity nor whether the
    layer's output is quantized, so it assumes the usual context: per-channel
    weights between an input and an output quantized at ``a_bits``. Where the
    export can do better (e.g. a last Conv with a float output: INT2) the cost
    is an upper bound.
    """
    if w_bits != 2:
        return w_bits
    form = int2_weight_form(op_type, False, a_bits, a_bits)
    return INT2_CONTAINER_BITS if form == INT2_CONTAINER else 2


class OnnxCostModel(CostModel):
    name = "onnx"
    # onnxruntime runs 16-bit activation Q/DQ (INT16/UINT16, opset 21; benchmarks/mixed.md,
    # tests/targets/test_cost_models.py exports and runs a w4a16 plan) and 2-bit weights (INT2
    # at opset 25 or int4 containers: tests/passes/test_insert_qdq_int2.py). No w2a16: its
    # weights are smaller than w2a8's (INT2 instead of a container), so a size budget, which
    # does not charge for activation width, would buy 16-bit activations to store INT2.
    bit_pairs = ((2, 8), (4, 8), (8, 8), (4, 16), (8, 16))

    def layer_cost(self, layer: LayerShape, w_bits: int | None, a_bits: int) -> LayerCost:
        cost = base_layer_cost(layer, w_bits, a_bits)
        if layer.weight_params and w_bits:
            cost.weight_bytes = packed_bytes(layer.weight_params, stored_weight_bits(layer.op_type, w_bits, a_bits))
        return cost


def cost_model(device: str | None = None) -> OnnxCostModel:
    refuse_device("onnx", device, "the runtime's hardware is unknown")
    return OnnxCostModel()
