"""Cost model of the ``mcu`` target: Cortex-M class microcontrollers.

Per layer and (w_bits, a_bits): packed weight bytes plus per-channel constants
(they live in flash), output activation bytes (they live in the SRAM arena),
cycles, latency at the preset's clock and energy at its run-mode power.

Presets (``--device``): cortex-m4, cortex-m7, cortex-m55. Each names one
representative part so flash, SRAM and clock are real numbers from its
datasheet; cycles per MAC are *estimates* derived from instruction timings and
the structure of the CMSIS-NN inner loops (sources in the comments), not
measurements -- qemu-system-arm does not model timing, so edgeq cannot measure
them here. The allocator only needs them to be right relative to each other:
on a Cortex-M4/M7, 4-bit weights save flash but *cost* cycles (they must be
unpacked before SMLAD), which this model captures.

Code size is estimated (a fixed runtime plus a per-layer kernel size) and
returned by :meth:`McuCostModel.fixed_costs` so the flash budget covers it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compiler.errors import EdgeqError
from targets.base import FLOAT_BITS, CostModel, LayerCost, LayerShape
from targets.cost_common import base_layer_cost, constant_bytes, nearest_supported


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
    # Estimated cycles per MAC of a conv/gemm inner loop, by (weight bits, activation bits)
    # after rounding each up to a width the kernel handles (2/4/8/16).
    cycles_per_mac: dict[tuple[int, int], float] = field(default_factory=dict)
    depthwise_factor: float = 1.5  # depthwise convs reuse nothing: loads dominate
    cycles_per_elem: float = 4.0  # requantize / eltwise / pool, per output element
    layer_overhead_cycles: float = 2000.0  # call, pointer setup, per-channel loop heads
    # Cycles per float32 MAC (an online rotation stays float): see each preset's comment.
    float_cycles_per_mac: float = 4.0


# Cortex-M4 (ARMv7E-M with the DSP extension). SMLAD does two 16x16 MACs in one
# cycle (Arm Cortex-M4 TRM, DDI 0439B, table 3-1); int8 operands are widened with
# SXTB16 first. CMSIS-NN's s8 kernels (Lai, Suda, Chandra, "CMSIS-NN: Efficient
# Neural Network Kernels for Arm Cortex-M CPUs", arXiv:1801.06601) widen the
# activations into an int16 im2col buffer once and the weights 4 at a time in the
# 2x2 output-tile loop: ~18 cycles per 16 MACs including loads -> ~1.15 cycles/MAC.
# 4-bit weights add a shift/mask/sign-extend per pair of weights (~8 more cycles
# per 16 MACs); 2-bit weights roughly twice that. 16-bit activations skip the
# activation widening. Part: STM32F446RE (ST DS10693): 512 KB flash, 128 KB SRAM,
# 180 MHz, run mode roughly 100 uA/MHz at 3.3 V -> ~0.33 nJ/cycle.
_M4_CYCLES = {
    (8, 8): 1.15, (4, 8): 1.65, (2, 8): 2.1, (16, 8): 1.1,
    (8, 16): 1.1, (4, 16): 1.6, (2, 16): 2.05, (16, 16): 1.0,
    (8, 4): 1.35, (4, 4): 1.85, (2, 4): 2.3, (16, 4): 1.3,
}
# Cortex-M7: dual-issue pipeline (Arm Cortex-M7 TRM, DDI 0489): loads and SXTB16
# pair with SMLAD, ~1.8x the M4 per cycle on CMSIS-NN s8 kernels (Arm's CMSIS-NN
# benchmarks put M7 at 1.6-2x the M4 at equal clock). Part: STM32F746NG
# (ST DS10916): 1 MB flash, 320 KB SRAM, 216 MHz, ~0.45 nJ/cycle.
_M7_CYCLES = {key: round(value / 1.8, 3) for key, value in _M4_CYCLES.items()}
# Cortex-M55 with Helium (MVE). VMLADAVA.S8 reduces 16 int8 products; the M55 is a
# dual-beat implementation, so a 128-bit MVE instruction issues in 2 cycles (Arm
# Cortex-M55 TRM, DDI 0553): peak 8 int8 MACs/cycle, 4 int16 MACs/cycle. With
# loads and requantization in the loop CMSIS-NN's MVE kernels reach roughly half
# of peak -> ~0.25 cycles/MAC at 8x8, ~0.45 with 16-bit activations; 4-bit weights
# cost a VSHL/VAND unpack per 16 weights. Class representative: Alif Ensemble E3
# high-performance core: 400 MHz; flash and SRAM sized 2 MB / 1 MB here;
# ~0.1 nJ/cycle (22 nm part).
_M55_CYCLES = {
    (8, 8): 0.25, (4, 8): 0.32, (2, 8): 0.4, (16, 8): 0.45,
    (8, 16): 0.45, (4, 16): 0.55, (2, 16): 0.62, (16, 16): 0.5,
    (8, 4): 0.25, (4, 4): 0.32, (2, 4): 0.4, (16, 4): 0.45,
}

# Float32 MACs (online rotations stay float). Cortex-M4F: VFMA.F32 issues in 3 cycles
# and each VLDR.32 operand load takes 1-2 (Arm Cortex-M4 TRM, DDI 0439B, table 7-1):
# ~4 cycles per MAC in a scalar loop, about 3.5x an int8 MAC. Cortex-M7: the
# dual-issue FPU pairs the loads with the FMA, same 1.8x as for integers. Cortex-M55:
# Helium VFMA.F32 does 4 lanes per 128-bit beat pair, 2 float MACs/cycle at peak,
# about half of that with loads.
_M4_FLOAT_CYCLES = 4.0
_M55_FLOAT_CYCLES = 1.0

PRESETS: dict[str, McuPreset] = {
    "cortex-m4": McuPreset(
        "cortex-m4", "STM32F446RE", 512 * 1024, 128 * 1024, 180e6, 0.33e-9, _M4_CYCLES,
        cycles_per_elem=4.0, float_cycles_per_mac=_M4_FLOAT_CYCLES,
    ),
    "cortex-m7": McuPreset(
        "cortex-m7", "STM32F746NG", 1024 * 1024, 320 * 1024, 216e6, 0.45e-9, _M7_CYCLES,
        cycles_per_elem=2.5, float_cycles_per_mac=round(_M4_FLOAT_CYCLES / 1.8, 3),
    ),
    "cortex-m55": McuPreset(
        "cortex-m55", "Alif Ensemble E3 (HP core), memory sized for the class", 2 * 1024 * 1024,
        1024 * 1024, 400e6, 0.1e-9, _M55_CYCLES, depthwise_factor=1.8, cycles_per_elem=0.75,
        float_cycles_per_mac=_M55_FLOAT_CYCLES,
    ),
}
DEFAULT_DEVICE = "cortex-m4"

# Code size: the generated runner, three runtime functions and libc pieces (fixed),
# plus one generated kernel per layer. Estimates; the MCU target can replace them
# with arm-none-eabi-size of a real build.
RUNTIME_CODE_BYTES = 6 * 1024
CODE_BYTES_PER_LAYER = 1536

_WEIGHT_WIDTHS = (2, 4, 8, 16)
_ACTIVATION_WIDTHS = (4, 8, 16)


class McuCostModel(CostModel):
    # 8-bit activations only: the MCU lowering of 16-bit activations is not tested in qemu
    # yet (the cycle table above prices them for when it is). No 2-bit weights either: the
    # integer-only graph the MCU code is generated from holds int4/int8 weights only.
    bit_pairs = ((4, 8), (8, 8))

    def __init__(self, preset: McuPreset) -> None:
        self.preset = preset
        self.name = f"mcu:{preset.name}"

    def cycles(self, layer: LayerShape, w_bits: int | None, a_bits: int) -> float:
        preset = self.preset
        a_width = nearest_supported(a_bits, _ACTIVATION_WIDTHS)
        if layer.weight_params and w_bits:
            w_width = nearest_supported(w_bits, _WEIGHT_WIDTHS)
            per_mac = preset.cycles_per_mac[(w_width, a_width)]
            if layer.kind == "depthwise":
                per_mac *= preset.depthwise_factor
            mac_cycles = layer.macs * per_mac
        else:  # eltwise / pool: element work at a_bits (16-bit halves SIMD lanes)
            mac_cycles = layer.macs * preset.cycles_per_elem * (a_width / 8) * 0.5
        return mac_cycles + layer.output_elems * preset.cycles_per_elem + preset.layer_overhead_cycles

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
        """A float op (online rotation): float32 weights in flash, float MACs on the FPU."""
        cost = base_layer_cost(op, FLOAT_BITS, FLOAT_BITS)
        cycles = (op.macs * self.preset.float_cycles_per_mac + op.output_elems * self.preset.cycles_per_elem
                  + self.preset.layer_overhead_cycles)
        cost.latency_s = cycles / self.preset.clock_hz
        cost.energy_j = cycles * self.preset.joules_per_cycle
        cost.resources = {"cycles": cycles, "flash_bytes": cost.weight_bytes}
        return cost

    def fixed_costs(self, layers: list[LayerShape], online_ops: list[LayerShape] = ()) -> dict[str, float]:
        """Costs that do not depend on the bits: the code's flash bytes, and the online ops' costs."""
        totals = super().fixed_costs(layers, online_ops)
        code = RUNTIME_CODE_BYTES + CODE_BYTES_PER_LAYER * (len(layers) + len(online_ops))
        totals["flash_bytes"] = totals.get("flash_bytes", 0.0) + code
        return totals

    def resources(self) -> dict[str, float]:
        return {"flash_bytes": self.preset.flash_bytes, "sram_bytes": self.preset.sram_bytes}


def cost_model(device: str | None = None) -> McuCostModel:
    name = (device or DEFAULT_DEVICE).lower()
    if name not in PRESETS:
        raise EdgeqError(f"unknown MCU device '{device}' (choose from {', '.join(PRESETS)})")
    return McuCostModel(PRESETS[name])
