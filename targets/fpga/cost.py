"""Cost model of the ``fpga`` target: LUT / DSP / BRAM per multiplier, by bit pair.

The architecture assumed is a layer-per-engine dataflow design (as FINN and
hls4ml build): every layer gets its own engine of ``parallelism`` multipliers,
so resources add up over layers and a layer takes ``macs / parallelism`` cycles.

Per multiplier, by (weight bits, activation bits):

* a partial-product array of at most 16 bits (``w * a <= 16``: 4x4, and 2x8 --
  a 2-bit weight times an 8-bit activation is a select of 0, +-a, -2a and one
  add): built from LUTs, about ``w * a`` LUT6 for the product plus one LUT per
  accumulator bit (carry chain); no DSP. (Small multipliers map to LUTs in
  FINN; Umuroglu et al., "FINN-R", ACM TRETS 2018, whose LUT cost grows with
  ``w * a``.) A dataflow engine stores its weights at their own width, so
  2-bit weights take 2 bits of BRAM each.
* both <= 8 bits on a DSP48E2 (UltraScale+): two int8 products share one DSP
  (Xilinx WP486, "Deep Learning with INT8 Optimization on Xilinx Devices") ->
  0.5 DSP; on a 7-series DSP48E1 (25x18, no 27-bit pre-adder) one per DSP.
* wider (16-bit activations): one DSP per product (27x18 / 25x18 multiplier).

Weights stay on chip in BRAM36 blocks of 36 Kbit (fractional blocks summed).
Device limits are datasheet values: Zynq-7000 DS190 (XC7Z020), Zynq UltraScale+
DS891 (XCZU3EG, XCZU7EV).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compiler.errors import EdgeqError
from targets.base import CostModel, LayerCost, LayerShape
from targets.cost_common import base_layer_cost

BRAM36_BITS = 36 * 1024
# LUTs of glue per DSP-based multiplier (operand muxing, accumulator control).
DSP_GLUE_LUTS = 8
# Accumulator width beyond w + a bits: log2 of a typical reduction length (~1k).
ACCUMULATOR_HEADROOM_BITS = 10
# Largest partial-product array (w_bits * a_bits) built from LUTs rather than a DSP slice.
LUT_MULTIPLIER_MAX_PRODUCT_BITS = 16


@dataclass(frozen=True)
class FpgaPreset:
    name: str
    part: str
    lut: int
    dsp: int
    bram: int  # BRAM36 blocks
    clock_hz: float
    int8_per_dsp: int  # int8 products one DSP slice computes per cycle


PRESETS: dict[str, FpgaPreset] = {
    "pynq-z2": FpgaPreset("pynq-z2", "XC7Z020", 53_200, 220, 140, 100e6, 1),
    "ultra96": FpgaPreset("ultra96", "XCZU3EG", 70_560, 360, 216, 200e6, 2),
    "zcu104": FpgaPreset("zcu104", "XCZU7EV", 230_400, 1_728, 312, 200e6, 2),
}
DEFAULT_DEVICE = "zcu104"


def multiplier_resources(w_bits: int, a_bits: int, int8_per_dsp: int) -> dict[str, float]:
    """LUTs and DSPs of one w_bits x a_bits multiply-accumulate unit."""
    accumulator_luts = w_bits + a_bits + ACCUMULATOR_HEADROOM_BITS
    if w_bits * a_bits <= LUT_MULTIPLIER_MAX_PRODUCT_BITS:
        return {"lut": w_bits * a_bits + accumulator_luts, "dsp": 0.0}
    if w_bits <= 8 and a_bits <= 8:
        return {"lut": DSP_GLUE_LUTS, "dsp": 1.0 / int8_per_dsp}
    return {"lut": DSP_GLUE_LUTS, "dsp": 1.0}


class FpgaCostModel(CostModel):
    # A 16-bit operand takes a whole DSP per multiplier, a 2x8 one only LUTs (multiplier_resources).
    bit_pairs = ((2, 8), (4, 8), (8, 8), (4, 16), (8, 16))

    def __init__(self, preset: FpgaPreset, parallelism: int = 32) -> None:
        self.preset = preset
        self.parallelism = parallelism
        self.name = f"fpga:{preset.name}"

    def layer_cost(self, layer: LayerShape, w_bits: int | None, a_bits: int) -> LayerCost:
        cost = base_layer_cost(layer, w_bits, a_bits)
        operand_bits = w_bits if (layer.weight_params and w_bits) else a_bits
        lanes = min(self.parallelism, max(layer.macs, 1))
        unit = multiplier_resources(operand_bits, a_bits, self.preset.int8_per_dsp)
        cycles = math.ceil(layer.macs / lanes) if layer.macs else layer.output_elems
        cost.latency_s = cycles / self.preset.clock_hz
        cost.resources = {
            "lut": unit["lut"] * lanes,
            "dsp": unit["dsp"] * lanes,
            "bram": cost.weight_bytes * 8 / BRAM36_BITS,
            "cycles": float(cycles),
        }
        return cost

    def resources(self) -> dict[str, float]:
        return {"lut": self.preset.lut, "dsp": self.preset.dsp, "bram": self.preset.bram}


def cost_model(device: str | None = None, parallelism: int = 32) -> FpgaCostModel:
    name = (device or DEFAULT_DEVICE).lower()
    if name not in PRESETS:
        raise EdgeqError(f"unknown FPGA device '{device}' (choose from {', '.join(PRESETS)})")
    return FpgaCostModel(PRESETS[name], parallelism)
