"""Per-target cost models: properties that follow from the hardware each one describes."""

from __future__ import annotations

import pytest

from compiler.errors import EdgeqError
from targets.base import CostModel, LayerShape
from targets.cpu import cost as cpu_cost
from targets.fpga import cost as fpga_cost
from targets.gpu import cost as gpu_cost
from targets.mcu import cost as mcu_cost
from targets.onnx import cost as onnx_cost

CONV = LayerShape("conv", "Conv", "conv", macs=64 * 32 * 16 * 16 * 9, weight_params=64 * 32 * 9,
                  input_elems=32 * 16 * 16, output_elems=64 * 16 * 16, output_channels=64)
DEPTHWISE = LayerShape("dw", "Conv", "depthwise", macs=64 * 16 * 16 * 9, weight_params=64 * 9,
                       input_elems=64 * 16 * 16, output_elems=64 * 16 * 16, output_channels=64)
ADD = LayerShape("add", "Add", "eltwise", macs=4096, weight_params=0, input_elems=8192, output_elems=4096)
# A batch-1 classifier layer: 1.3 M weights read once for 1.3 M MACs -- memory-bound on any GPU.
FC = LayerShape("fc", "Gemm", "gemm", macs=1280 * 1000, weight_params=1280 * 1000, input_elems=1280,
                output_elems=1000, output_channels=1000)
# A large batch GEMM: compute-bound.
BIG = LayerShape("big", "MatMul", "matmul", macs=4096 * 4096 * 4096, weight_params=4096 * 4096,
                 input_elems=4096 * 4096, output_elems=4096 * 4096, output_channels=4096)

ALL_MODELS = [
    onnx_cost.cost_model(), cpu_cost.cost_model(),
    *(gpu_cost.cost_model(name) for name in gpu_cost.PRESETS),
    *(mcu_cost.cost_model(name) for name in mcu_cost.PRESETS),
    *(fpga_cost.cost_model(name) for name in fpga_cost.PRESETS),
]


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.name)
def test_bytes_and_bitops_are_the_same_on_every_target(model):
    assert isinstance(model, CostModel)
    w8, w4, w2 = (model.layer_cost(CONV, w, 8) for w in (8, 4, 2))
    assert w8.weight_bytes == CONV.weight_params
    assert w4.weight_bytes == (CONV.weight_params + 1) // 2  # two int4 per byte
    assert w2.weight_bytes == (CONV.weight_params + 3) // 4
    assert w8.bitops == CONV.macs * 64 and w4.bitops == CONV.macs * 32
    assert model.layer_cost(CONV, 8, 16).activation_bytes == 2 * w8.activation_bytes
    weightless = model.layer_cost(ADD, None, 8)
    assert weightless.weight_bytes == 0 and weightless.bitops == ADD.macs * 64


def test_onnx_target_has_no_latency():
    assert onnx_cost.cost_model().layer_cost(CONV, 8, 8).latency_s is None


@pytest.mark.parametrize("device", list(mcu_cost.PRESETS))
def test_mcu_presets(device):
    model = mcu_cost.cost_model(device)
    limits = model.resources()
    assert limits["flash_bytes"] >= 512 * 1024 and limits["sram_bytes"] >= 128 * 1024
    cost = model.layer_cost(CONV, 8, 8)
    # latency is cycles at the preset clock, energy cycles at the run-mode energy per cycle
    assert cost.latency_s == pytest.approx(cost.resources["cycles"] / model.preset.clock_hz)
    assert cost.energy_j == pytest.approx(cost.resources["cycles"] * model.preset.joules_per_cycle)
    # flash holds the weights and per-channel bias/requantization constants
    assert cost.resources["flash_bytes"] > cost.weight_bytes
    # depthwise convs cost more cycles per MAC than dense ones
    dw = model.layer_cost(DEPTHWISE, 8, 8).resources["cycles"] / DEPTHWISE.macs
    dense = cost.resources["cycles"] / CONV.macs
    assert dw > dense
    assert model.fixed_costs([CONV, DEPTHWISE])["flash_bytes"] > model.fixed_costs([CONV])["flash_bytes"]


def test_mcu_sub_byte_weights_trade_flash_for_cycles_on_dsp_extension_cores():
    for device in ("cortex-m4", "cortex-m7"):
        model = mcu_cost.cost_model(device)
        w8, w4 = model.layer_cost(CONV, 8, 8), model.layer_cost(CONV, 4, 8)
        assert w4.resources["flash_bytes"] < w8.resources["flash_bytes"]
        assert w4.latency_s > w8.latency_s  # unpacking before SMLAD costs cycles
    m4, m55 = mcu_cost.cost_model("cortex-m4"), mcu_cost.cost_model("cortex-m55")
    assert m55.cycles(CONV, 8, 8) < m4.cycles(CONV, 8, 8) / 3  # Helium vs SMLAD


def test_unknown_devices_are_user_errors():
    for module in (mcu_cost, gpu_cost, fpga_cost):
        with pytest.raises(EdgeqError, match="unknown"):
            module.cost_model("no-such-device")


def test_gpu_roofline():
    h100, a100 = gpu_cost.cost_model("h100"), gpu_cost.cost_model("a100")
    # memory-bound batch-1 layer: 4-bit weights move half the bytes
    fc8, fc4 = h100.layer_cost(FC, 8, 8), h100.layer_cost(FC, 4, 8)
    assert fc8.resources["memory_s"] > fc8.resources["compute_s"]
    assert fc4.resources["memory_s"] < 0.6 * fc8.resources["memory_s"]
    assert fc4.latency_s < fc8.latency_s
    # compute-bound: Ampere has int4 tensor cores (twice int8), Hopper does not
    assert a100.layer_cost(BIG, 4, 4).resources["compute_s"] == pytest.approx(
        a100.layer_cost(BIG, 8, 8).resources["compute_s"] / 2)
    assert h100.layer_cost(BIG, 4, 4).resources["compute_s"] == pytest.approx(
        h100.layer_cost(BIG, 8, 8).resources["compute_s"])
    # 16-bit activations fall back to the fp16 rate
    assert h100.layer_cost(BIG, 8, 16).resources["compute_s"] > h100.layer_cost(BIG, 8, 8).resources["compute_s"]


def test_fpga_resources_by_bit_pair():
    zcu, pynq = fpga_cost.cost_model("zcu104"), fpga_cost.cost_model("pynq-z2")
    w4a4, w8a8, w8a16 = (zcu.layer_cost(CONV, w, a) for w, a in ((4, 4), (8, 8), (8, 16)))
    assert w4a4.resources["dsp"] == 0 and w4a4.resources["lut"] > 0  # LUT multipliers
    lanes = zcu.parallelism
    assert w8a8.resources["dsp"] == pytest.approx(lanes / 2)  # two int8 products per DSP48E2
    assert pynq.layer_cost(CONV, 8, 8).resources["dsp"] == pytest.approx(lanes)  # DSP48E1: one
    assert w8a16.resources["dsp"] == pytest.approx(lanes)
    assert w8a8.resources["bram"] == pytest.approx(2 * zcu.layer_cost(CONV, 4, 8).resources["bram"])
    assert set(zcu.resources()) == {"lut", "dsp", "bram"}


def test_cpu_model_grows_with_work_and_width(tmp_path):
    model = cpu_cost.cost_model()
    small = LayerShape("s", "Conv", "conv", CONV.macs // 4, CONV.weight_params, CONV.input_elems // 4,
                       CONV.output_elems // 4, 64)
    assert model.layer_cost(CONV, 8, 8).latency_s > model.layer_cost(small, 8, 8).latency_s
    assert model.layer_cost(CONV, 8, 16).latency_s > model.layer_cost(CONV, 8, 8).latency_s
    assert model.coefficients.source  # says where its numbers come from


def test_cpu_model_reads_a_fitted_table(tmp_path):
    table = tmp_path / "table.json"
    table.write_text('{"seconds_per_mac": {"default": {"8,8": 1e-9, "4,8": 1e-9, "8,16": 2e-9}},'
                     ' "seconds_per_byte": 0.0, "overhead_s": 0.0, "source": "test"}')
    model = cpu_cost.CpuCostModel(cpu_cost.load_coefficients(table))
    assert model.layer_cost(CONV, 8, 8).latency_s == pytest.approx(CONV.macs * 1e-9)
    assert model.layer_cost(CONV, 8, 16).latency_s == pytest.approx(CONV.macs * 2e-9)
