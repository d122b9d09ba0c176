"""Cost model of the ``gpu`` target: a roofline over tensor-core rate and memory bandwidth.

A layer takes ``max(ops / rate(w_bits, a_bits), bytes moved / bandwidth)`` plus a
kernel launch. The rate depends on the widest operand: 4-bit (and 2-bit,
unpacked to 4) uses the int4 tensor-core rate where the chip has one, 8-bit the
int8 rate, 16-bit activations the fp16 rate (there is no int16 tensor-core
MMA). Hopper has no int4 MMA, so on an H100 4-bit weights only save bandwidth
and bytes -- at batch 1 most edge layers are bandwidth-bound, which is where
they pay off. Energy is board power x time, an upper bound.

Numbers are dense (no 2:4 sparsity) peak rates from NVIDIA's datasheets:
T4 (Turing): INT8 130 TOPS, INT4 260 TOPS, 320 GB/s, 70 W.
A100 SXM 80 GB (Ampere): INT8 624 TOPS, INT4 1248 TOPS, FP16 312 TFLOPS, 2039 GB/s, 400 W.
H100 SXM (Hopper): INT8 1979 TOPS, FP16 989 TFLOPS, no INT4, 3.35 TB/s, 700 W.
Jetson AGX Orin 64 GB (Ampere iGPU): INT8 ~85 TOPS dense (170 sparse), INT4 twice
that, 204.8 GB/s, 60 W module.

``h100-measured`` replaces the datasheet with what tools/measure_gpu_roofline.py
measured on an H100 80GB HBM3 (measured_h100.json next to this file, torch 2.11
eager): int8 GEMMs (torch._int_mm) reach only ~132 TOPS -- below fp16's
~738 TFLOPS, the library's int8 path does not use Hopper's int8 tensor-core
instructions -- a 1 GiB device copy moves ~2.98 TB/s, and one tiny kernel costs
~18 us launch to completion. Those rates are achieved rates, so its compute
efficiency is 1. Small-M int8 GEMMs are slower still than its roofline says
(M=32, 1280x1000: 57 us measured, ~19 us predicted): tile inefficiency the
roofline does not model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from compiler.errors import EdgeqError
from targets.base import CostModel, LayerCost, LayerShape
from targets.cost_common import base_layer_cost, traffic_bytes

# Launching one kernel costs a few microseconds on the host/driver path (CUDA
# launch latency is commonly measured at 3-5 us without CUDA graphs).
KERNEL_LAUNCH_S = 4e-6
# Batch-1 edge layers rarely fill a GPU: a GEMM reaches a fraction of peak. This
# is the fraction assumed for the datasheet presets' compute roof.
COMPUTE_EFFICIENCY = 0.35
MEASURED_H100 = Path(__file__).with_name("measured_h100.json")


@dataclass(frozen=True)
class GpuPreset:
    name: str
    int8_ops: float  # ops/s (1 MAC = 2 ops)
    int4_ops: float | None  # None: no int4 tensor-core MMA
    fp16_ops: float
    bandwidth: float  # bytes/s
    power_w: float
    compute_efficiency: float = COMPUTE_EFFICIENCY
    launch_s: float = KERNEL_LAUNCH_S


PRESETS: dict[str, GpuPreset] = {
    "t4": GpuPreset("t4", 130e12, 260e12, 65e12, 320e9, 70.0),
    "a100": GpuPreset("a100", 624e12, 1248e12, 312e12, 2039e9, 400.0),
    "h100": GpuPreset("h100", 1979e12, None, 989e12, 3.35e12, 700.0),
    "orin": GpuPreset("orin", 85e12, 170e12, 42.5e12, 204.8e9, 60.0),
}
DEFAULT_DEVICE = "h100"


def _measured_h100() -> GpuPreset:
    """The H100 preset from tools/measure_gpu_roofline.py's run (largest GEMM = the compute roof)."""
    data = json.loads(MEASURED_H100.read_text())
    largest = max(data["gemms"], key=lambda gemm: gemm["m"] * gemm["k"] * gemm["n"])
    return GpuPreset("h100-measured", largest["int8_tops"] * 1e12, None, largest["fp16_tflops"] * 1e12,
                     data["copy_bandwidth_gbps"] * 1e9, 700.0, compute_efficiency=1.0,
                     launch_s=data["tiny_kernel_s"])


if MEASURED_H100.exists():
    PRESETS["h100-measured"] = _measured_h100()


class GpuCostModel(CostModel):
    # 16-bit activations run on the fp16 path (compute_rate), so they are priced.
    bit_pairs = ((4, 8), (8, 8), (4, 16), (8, 16))

    def __init__(self, preset: GpuPreset) -> None:
        self.preset = preset
        self.name = f"gpu:{preset.name}"

    def compute_rate(self, w_bits: int | None, a_bits: int) -> float:
        """Tensor-core ops/s for the widest operand."""
        widest = max(w_bits or a_bits, a_bits)
        preset = self.preset
        if widest > 8:
            return preset.fp16_ops
        if widest <= 4 and preset.int4_ops:
            return preset.int4_ops
        return preset.int8_ops

    def layer_cost(self, layer: LayerShape, w_bits: int | None, a_bits: int) -> LayerCost:
        cost = base_layer_cost(layer, w_bits, a_bits)
        compute_s = 2 * layer.macs / (self.compute_rate(w_bits, a_bits) * self.preset.compute_efficiency)
        memory_s = traffic_bytes(layer, w_bits, a_bits) / self.preset.bandwidth
        cost.latency_s = max(compute_s, memory_s) + self.preset.launch_s
        cost.energy_j = cost.latency_s * self.preset.power_w
        cost.resources = {"compute_s": compute_s, "memory_s": memory_s}
        return cost


def cost_model(device: str | None = None) -> GpuCostModel:
    name = (device or DEFAULT_DEVICE).lower()
    if name not in PRESETS:
        raise EdgeqError(f"unknown GPU device '{device}' (choose from {', '.join(PRESETS)})")
    return GpuCostModel(PRESETS[name])
