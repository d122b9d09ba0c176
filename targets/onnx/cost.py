"""Cost model of the ``onnx`` target (a QDQ model for any ONNX runtime).

The device is unknown, so only device-independent costs are given: packed
weight bytes, activation bytes, MACs and bit-operations. Latency and energy
stay None; a latency or energy budget for this target is refused by the
allocator with a message naming the metric.
"""

from __future__ import annotations

from targets.base import CostModel, LayerCost, LayerShape
from targets.cost_common import base_layer_cost


class OnnxCostModel(CostModel):
    name = "onnx"
    # onnxruntime runs 16-bit activation Q/DQ (INT16/UINT16, opset 21; benchmarks/mixed.md,
    # tests/targets/test_cost_models.py exports and runs a w4a16 plan).
    bit_pairs = ((4, 8), (8, 8), (4, 16), (8, 16))

    def layer_cost(self, layer: LayerShape, w_bits: int | None, a_bits: int) -> LayerCost:
        return base_layer_cost(layer, w_bits, a_bits)


def cost_model(device: str | None = None) -> OnnxCostModel:
    return OnnxCostModel()
