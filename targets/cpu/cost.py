"""Cost model of the ``cpu`` target: latency of the code edgeq itself generates.

``latency = overhead + seconds_per_mac[kind][(w_bits, a_bits)] * macs
+ seconds_per_byte * bytes moved``, per sample on the host this runs on.

The coefficients come from ``cost_table.json`` next to this file when it exists:
tools/fit_cpu_cost.py times the kernels targets/cpu lowers (real TVM builds, a
grid of layer shapes and bit pairs, each verified bit-exact) and fits the
coefficients by non-negative least squares, recording the host, the date, the
measurements and the fit error in the file. On the host it was measured on,
16-bit activations cost 7-60x the time of 8-bit ones (the hand-written VNNI
schedules are 8-bit only), and 4-bit weights run the 8-bit kernels. Without a table the
model falls back to an analytic estimate anchored on one measurement in
DESIGN.md (untuned Relax int8 MobileNetV2, ~300 M MACs in ~80 ms on one thread
of this host: ~2.7e-10 s/MAC); only the ratios between bit pairs matter to the
allocator, and the analytic ratios are: 4-bit/2-bit weights are unpacked to int8
before the int8 dot products (same MAC time, fewer bytes), 16-bit activations
run the 16-bit multiply path at half the int8 lanes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from targets.base import CostModel, LayerCost, LayerShape
from targets.cost_common import base_layer_cost, nearest_supported, traffic_bytes

TABLE_PATH = Path(__file__).with_name("cost_table.json")
_WIDTHS = (4, 8, 16)


@dataclass
class CpuCoefficients:
    seconds_per_mac: dict[str, dict[str, float]]  # kind -> "w,a" -> s/MAC
    seconds_per_byte: float
    overhead_s: float
    source: str
    info: dict = field(default_factory=dict)


def _analytic() -> CpuCoefficients:
    int8 = 2.7e-10
    pairs = {}
    for w in (4, 8, 16):
        for a in (4, 8, 16):
            pairs[f"{w},{a}"] = int8 * (2.0 if max(w, a) > 8 else 1.0)
    return CpuCoefficients(
        seconds_per_mac={"default": pairs},
        seconds_per_byte=1.0 / 10e9,  # ~10 GB/s streaming on one core
        overhead_s=5e-6,  # packed-function call + output allocation
        source="analytic (DESIGN.md: untuned Relax int8 MobileNetV2 ~80 ms / ~300 M MACs)",
    )


def load_coefficients(path: Path = TABLE_PATH) -> CpuCoefficients:
    if not path.exists():
        return _analytic()
    data = json.loads(path.read_text())
    return CpuCoefficients(
        seconds_per_mac=data["seconds_per_mac"],
        seconds_per_byte=data["seconds_per_byte"],
        overhead_s=data["overhead_s"],
        source=data.get("source", str(path)),
        info=data.get("info", {}),
    )


class CpuCostModel(CostModel):
    name = "cpu"
    # The pairs cost_table.json was measured on (compiled, run and verified bit-exact).
    bit_pairs = ((4, 8), (8, 8), (4, 16), (8, 16))

    def __init__(self, coefficients: CpuCoefficients | None = None) -> None:
        self.coefficients = coefficients or load_coefficients()

    def seconds_per_mac(self, kind: str, w_bits: int | None, a_bits: int) -> float:
        table = self.coefficients.seconds_per_mac
        pairs = table.get(kind) or table["default"]
        a = nearest_supported(a_bits, _WIDTHS)
        w = nearest_supported(w_bits, _WIDTHS) if w_bits else a
        key = f"{w},{a}"
        if key not in pairs:  # a pair the fit did not cover: same activations, widest weights measured
            same_activations = [k for k in pairs if k.endswith(f",{a}")] or list(pairs)
            key = max(same_activations, key=lambda k: int(k.split(",")[0]))
        return pairs[key]

    def layer_cost(self, layer: LayerShape, w_bits: int | None, a_bits: int) -> LayerCost:
        cost = base_layer_cost(layer, w_bits, a_bits)
        coefficients = self.coefficients
        cost.latency_s = (
            coefficients.overhead_s
            + self.seconds_per_mac(layer.kind, w_bits if layer.weight_params else None, a_bits) * layer.macs
            + coefficients.seconds_per_byte * traffic_bytes(layer, w_bits, a_bits)
        )
        return cost


def cost_model(device: str | None = None) -> CpuCostModel:
    return CpuCostModel()
