"""Cost model of the ``mcu`` target: Cortex-M class microcontrollers.

Per layer and (w_bits, a_bits): packed weight bytes plus per-channel constants
(they live in flash), output activation bytes (they live in the SRAM arena),
cycles, latency at the preset's clock and energy at its run-mode power.

Cycles price the firmware edgeq generates (TVM's C, built for the Cortex-M4 by the
project's Makefile), not a hand-written kernel library: tools/fit_mcu_cost.py
compiles one- and two-layer models, runs each build in qemu-system-arm and fits the
instructions one ``model_run`` executes per MAC (by layer kind and bit pair), per
output element and per layer; the fit is cost_table.json next to this file, with
its measurements and a validation on whole models it did not see. That code
(-O3 -funroll-loops) runs 3.5-8 instructions per MAC at w8a8, and 4-bit weights,
unpacked in the MAC loop, cost 20-50% more -- the CMSIS-NN-class estimates this
model used before (~1.2 cycles per MAC on the M4) were 3.3-4.1x under what the
firmware executes.

qemu counts instructions, not cycles. On the Cortex-M4 most data-processing
instructions take one cycle, loads two unless pipelined and taken branches two to
four (Arm Cortex-M4 TRM, DDI 0439B, table 3-1), so cycles = instructions is a lower
bound there. The other presets run the same code faster per MHz, by Arm's
CoreMark/MHz: Cortex-M4 3.40, Cortex-M7 5.01 (D. Ibrahim, "ARM-Based
Microcontroller Projects Using mbed", 2019, table 3.2) and Cortex-M55 4.2, 18.6%
above the M4 (Arm's figure, as WikiChip's Cortex-M55 page gives it). CoreMark is
scalar C too, so the ratio carries the M7's dual issue; the M55's Helium vectors
go unused by edgeq's C as by CoreMark.

Presets (``--device``): cortex-m4, cortex-m7, cortex-m55. Each names one
representative part so flash, SRAM and clock are real numbers from its datasheet.

Code size is estimated (a fixed runtime plus a per-layer kernel size) and
returned by :meth:`McuCostModel.fixed_costs` so the flash budget covers it, with
the per-call instructions of ``model_run``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.errors import EdgeqError
from targets.base import FLOAT_BITS, CostModel, LayerCost, LayerShape
from targets.cost_common import base_layer_cost, constant_bytes

TABLE = Path(__file__).with_name("cost_table.json")


@dataclass(frozen=True)
class McuPreset:
    name: str
    part: str
    flash_bytes: int
    sram_bytes: int
    clock_hz: float
    # Energy per clock cycle in run mode (J): datasheet run current per MHz x supply
    # voltage; order-of-magnitude only.
    joules_per_cycle: float
    # Instructions of edgeq's (Cortex-M4) code per cycle on this core: CoreMark/MHz over the M4's.
    speed_vs_m4: float = 1.0

    def seconds(self, instructions: float) -> float:
        """Time for ``instructions`` of edgeq's code on this part (cycles = instructions on the M4: a lower bound)."""
        return instructions / self.speed_vs_m4 / self.clock_hz


M4_COREMARK_PER_MHZ = 3.40
# A float32 op (an online rotation) loops like its integer kernel, but VFMA.F32 issues in
# 3 cycles where MLA takes 1 (Arm Cortex-M4 TRM, DDI 0439B, tables 3-1 and 7-1).
FLOAT_MAC_EXTRA_CYCLES = 2.0

PRESETS: dict[str, McuPreset] = {
    # STM32F446RE (ST DS10693): 512 KB flash, 128 KB SRAM, 180 MHz, run mode roughly
    # 100 uA/MHz at 3.3 V -> ~0.33 nJ/cycle.
    "cortex-m4": McuPreset("cortex-m4", "STM32F446RE", 512 * 1024, 128 * 1024, 180e6, 0.33e-9),
    # STM32F746NG (ST DS10916): 1 MB flash, 320 KB SRAM, 216 MHz, ~0.45 nJ/cycle.
    "cortex-m7": McuPreset("cortex-m7", "STM32F746NG", 1024 * 1024, 320 * 1024, 216e6, 0.45e-9,
                           speed_vs_m4=round(5.01 / M4_COREMARK_PER_MHZ, 3)),
    # Class representative: Alif Ensemble E3 high-performance core: 400 MHz; flash and
    # SRAM sized 2 MB / 1 MB here; ~0.1 nJ/cycle (22 nm part).
    "cortex-m55": McuPreset("cortex-m55", "Alif Ensemble E3 (HP core), memory sized for the class",
                            2 * 1024 * 1024, 1024 * 1024, 400e6, 0.1e-9, speed_vs_m4=1.186),
}
DEFAULT_DEVICE = "cortex-m4"

# Code size: the generated runner, three runtime functions and libc pieces (fixed),
# plus one generated kernel per layer. Estimates; the MCU target can replace them
# with arm-none-eabi-size of a real build.
RUNTIME_CODE_BYTES = 6 * 1024
CODE_BYTES_PER_LAYER = 1536
# A MatMul runs the Gemm kernel; what the fit has no kind for costs per output element only.
KIND_AS = {"matmul": "gemm"}


@functools.lru_cache(maxsize=1)
def _committed_table() -> dict[str, Any]:
    if not TABLE.exists():
        raise EdgeqError(f"the MCU cost table {TABLE} is missing: run python tools/fit_mcu_cost.py")
    return json.loads(TABLE.read_text())


class McuCostModel(CostModel):
    # 8-bit activations only: the MCU lowering of 16-bit activations is not tested in qemu
    # yet. No 2-bit weights either: the integer-only graph the MCU code is generated from
    # holds int4/int8 weights only.
    bit_pairs = ((4, 8), (8, 8))

    def __init__(self, preset: McuPreset, table: dict[str, Any] | None = None) -> None:
        self.preset = preset
        self.name = f"mcu:{preset.name}"
        self._table = table

    @property
    def table(self) -> dict[str, Any]:
        """The fit prices come from, read when first needed (the fit's own builds construct the model)."""
        return self._table if self._table is not None else _committed_table()

    def _per_mac(self, kind: str, w_bits: int | None, a_bits: int) -> float:
        """Fitted instructions per MAC; a bit pair the fit lacks takes the kind's w8a8 entry, scaled by
        the activation width (a 16-bit activation is two bytes to load)."""
        entry = self.table["instructions_per_mac"].get(KIND_AS.get(kind, kind))
        if entry is None:
            return 0.0
        if not isinstance(entry, dict):  # weightless kinds: one number
            return float(entry) * max(a_bits, 8) / 8
        key = f"w{w_bits}a{a_bits}"
        if key in entry:
            return float(entry[key])
        base = entry.get("w8a8", max(entry.values()))
        return float(base) * max(a_bits, 8) / 8

    def instructions(self, layer: LayerShape, w_bits: int | None, a_bits: int) -> float:
        """Instructions edgeq's Cortex-M4 code executes for ``layer`` (cost_table.json's fit)."""
        w_bits = w_bits if layer.weight_params else None
        # a weightless kind the fit priced is priced per MAC alone; a weighted one adds its
        # requantizing epilogue per output, as does a kind the fit has no price for (e.g. Concat)
        priced_alone = not w_bits and KIND_AS.get(layer.kind, layer.kind) in self.table["instructions_per_mac"]
        epilogue = 0.0 if priced_alone else layer.output_elems * self.table["instructions_per_output_elem"]
        return layer.macs * self._per_mac(layer.kind, w_bits, a_bits) + epilogue + self.table["instructions_per_layer"]

    def cycles(self, layer: LayerShape, w_bits: int | None, a_bits: int) -> float:
        return self.instructions(layer, w_bits, a_bits) / self.preset.speed_vs_m4

    def call_cycles(self) -> float:
        """Cycles of one ``model_run`` besides its layers (argument and arena set-up)."""
        return self.table["instructions_per_call"] / self.preset.speed_vs_m4

    def layer_cost(self, layer: LayerShape, w_bits: int | None, a_bits: int) -> LayerCost:
        cost = base_layer_cost(layer, w_bits, a_bits)
        cycles = self.cycles(layer, w_bits, a_bits)
        cost.latency_s = cycles / self.preset.clock_hz
        cost.energy_j = cycles * self.preset.joules_per_cycle
        cost.resources = {
            "cycles": cycles,
            "flash_bytes": cost.weight_bytes + constant_bytes(layer),
        }
        return cost

    def online_op_cost(self, op: LayerShape) -> LayerCost:
        """A float op (online rotation): float32 weights in flash, its integer loop's instructions plus
        the FPU's slower multiply-accumulate."""
        cost = base_layer_cost(op, FLOAT_BITS, FLOAT_BITS)
        cycles = self.cycles(op, 8, 8) + op.macs * FLOAT_MAC_EXTRA_CYCLES / self.preset.speed_vs_m4
        cost.latency_s = cycles / self.preset.clock_hz
        cost.energy_j = cycles * self.preset.joules_per_cycle
        cost.resources = {"cycles": cycles, "flash_bytes": cost.weight_bytes}
        return cost

    def fixed_costs(self, layers: list[LayerShape], online_ops: list[LayerShape] = ()) -> dict[str, float]:
        """Costs that do not depend on the bits: the code's flash bytes, and the online ops' costs."""
        totals = super().fixed_costs(layers, online_ops)
        code = RUNTIME_CODE_BYTES + CODE_BYTES_PER_LAYER * (len(layers) + len(online_ops))
        totals["flash_bytes"] = totals.get("flash_bytes", 0.0) + code
        call = self.call_cycles()
        for metric, value in (("cycles", call), ("latency_s", call / self.preset.clock_hz),
                              ("energy_j", call * self.preset.joules_per_cycle)):
            totals[metric] = totals.get(metric, 0.0) + value
        return totals

    def resources(self) -> dict[str, float]:
        return {"flash_bytes": self.preset.flash_bytes, "sram_bytes": self.preset.sram_bytes}


def cost_model(device: str | None = None, table: dict[str, Any] | None = None) -> McuCostModel:
    """The preset's cost model, priced by ``table`` (tools/fit_mcu_cost.py's fit; default: the committed one)."""
    name = (device or DEFAULT_DEVICE).lower()
    if name not in PRESETS:
        raise EdgeqError(f"unknown MCU device '{device}' (choose from {', '.join(PRESETS)})")
    return McuCostModel(PRESETS[name], table)
