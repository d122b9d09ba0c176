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
    if not isinstance(model, onnx_cost.OnnxCostModel):  # the QDQ export may store 2 bits in int4: below
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


def test_mcu_cycles_price_the_code_edgeq_generates():
    """cost_table.json is tools/fit_mcu_cost.py's fit of instructions in qemu: every build it used was
    bit-exact, the whole models it did not see are predicted within 10%, and on that code 4-bit weights
    save flash but cost time (the kernels unpack them in the MAC loop)."""
    import json

    table = json.loads(mcu_cost.TABLE.read_text())
    assert table["measurements"] and all(build["bit_exact"] for build in table["measurements"])
    assert {row["model"] for row in table["validation"]} >= {"fashion_cnn", "resnet8", "dscnn"}
    assert all(row["bit_exact"] and abs(row["error"]) < 0.1 for row in table["validation"]), table["validation"]
    m4 = mcu_cost.cost_model("cortex-m4")
    w8, w4 = m4.layer_cost(CONV, 8, 8), m4.layer_cost(CONV, 4, 8)
    assert w4.resources["flash_bytes"] < w8.resources["flash_bytes"]
    assert w8.latency_s < w4.latency_s < 2 * w8.latency_s
    assert m4.cycles(CONV, 8, 8) > 3 * CONV.macs  # TVM's C, not ~1.2 cycles per MAC
    # the same Cortex-M4 code on faster cores, by CoreMark/MHz
    cycles = {device: mcu_cost.cost_model(device).cycles(CONV, 8, 8) for device in mcu_cost.PRESETS}
    assert cycles["cortex-m7"] < cycles["cortex-m55"] < cycles["cortex-m4"]


def test_unknown_devices_are_user_errors():
    for module in (mcu_cost, gpu_cost, fpga_cost):
        with pytest.raises(EdgeqError, match="unknown"):
            module.cost_model("no-such-device")
    for module in (cpu_cost, onnx_cost):  # no presets: a device would be silently ignored
        with pytest.raises(EdgeqError, match="no device presets"):
            module.cost_model("cortex-m4")


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


def test_cpu_latency_of_4_bit_weights_is_that_of_8_bit():
    """The library holds 4-bit weights as int8 and runs the 8-bit kernels: the same time, bytes moved
    included (pricing their packed bytes once made w4 look faster, so latency budgets bought it)."""
    model = cpu_cost.cost_model()
    gemm = LayerShape("fc", "Gemm", "gemm", 1280 * 1000, 1280 * 1000, 1280, 1000, 1000)
    for layer in (CONV, gemm):
        for a_bits in (8, 16):
            assert model.layer_cost(layer, 4, a_bits).latency_s == model.layer_cost(layer, 8, a_bits).latency_s
    assert model.layer_cost(gemm, 4, 8).weight_bytes < model.layer_cost(gemm, 8, 8).weight_bytes


def test_cpu_model_reads_a_fitted_table(tmp_path):
    table = tmp_path / "table.json"
    table.write_text('{"seconds_per_mac": {"default": {"8,8": 1e-9, "4,8": 1e-9, "8,16": 2e-9}},'
                     ' "seconds_per_byte": 0.0, "overhead_s": 0.0, "source": "test"}')
    model = cpu_cost.CpuCostModel(cpu_cost.load_coefficients(table))
    assert model.layer_cost(CONV, 8, 8).latency_s == pytest.approx(CONV.macs * 1e-9)
    assert model.layer_cost(CONV, 8, 16).latency_s == pytest.approx(CONV.macs * 2e-9)
    # a table from before the per-call term: its overhead stays per layer, nothing per call
    assert model.fixed_costs([CONV]).get("latency_s", 0.0) == 0.0


def test_cpu_model_charges_output_elements_and_channels_by_kind(tmp_path):
    table = tmp_path / "table.json"
    table.write_text('{"seconds_per_mac": {"default": {"8,8": 1e-12, "8,16": 2e-12}}, "seconds_per_byte": 0.0,'
                     ' "overhead_s": 0.0, "source": "test",'
                     ' "seconds_per_layer_output_elem": {"default": {"8,8": 1e-11, "8,16": 1e-11},'
                     ' "depthwise": {"8,8": 3e-11, "8,16": 0.0}},'
                     ' "seconds_per_channel": {"default": {"8,8": 0.0, "8,16": 5e-8}}}')
    model = cpu_cost.CpuCostModel(cpu_cost.load_coefficients(table))
    assert model.layer_cost(CONV, 8, 8).latency_s == pytest.approx(CONV.macs * 1e-12 + CONV.output_elems * 1e-11)
    assert model.layer_cost(CONV, 8, 16).latency_s == pytest.approx(
        CONV.macs * 2e-12 + CONV.output_elems * 1e-11 + CONV.output_channels * 5e-8)
    depthwise = LayerShape("dw", "Conv", "depthwise", 9 * 4096, 9 * 64, 4096, 4096, 64)
    # its own kind's output term; the channel term falls back to "default" (not fitted for depthwise)
    assert model.layer_cost(depthwise, 8, 8).latency_s == pytest.approx(depthwise.macs * 1e-12 + 4096 * 3e-11)


def test_cpu_context_factor_scales_layers_by_their_width_not_the_call(tmp_path):
    """A table's context_factor (whole models run slower than their layers' terms) multiplies each
    layer's latency by the factor of its own activation width; the per-call cost stays as it is."""
    terms = ('"seconds_per_mac": {"default": {"8,8": 1e-12, "8,16": 2e-12}}, "seconds_per_byte": 1e-11,'
             ' "overhead_s": 3e-7, "call_overhead_s": 2e-5, "source": "test"')
    plain, scaled = tmp_path / "plain.json", tmp_path / "scaled.json"
    plain.write_text("{" + terms + "}")
    scaled.write_text("{" + terms + ', "context_factor": {"8": 1.1, "16": 1.25}}')
    before = cpu_cost.CpuCostModel(cpu_cost.load_coefficients(plain))
    after = cpu_cost.CpuCostModel(cpu_cost.load_coefficients(scaled))
    for a_bits, factor in ((8, 1.1), (16, 1.25)):
        assert after.layer_cost(CONV, 8, a_bits).latency_s == pytest.approx(
            factor * before.layer_cost(CONV, 8, a_bits).latency_s)
    assert after.fixed_costs([CONV])["latency_s"] == pytest.approx(before.fixed_costs([CONV])["latency_s"])
    assert before.context_factor(CONV, 16) == 1.0  # no factor in the table: layers as their terms say


def test_cpu_context_group_factor_prices_projections_apart_from_expansions(tmp_path):
    """1x1 convs that reduce channels slow down more in a model than those that widen them: the
    table's group factor multiplies the width's factor for the layer's group only."""
    table = tmp_path / "table.json"
    table.write_text('{"seconds_per_mac": {"default": {"8,8": 1e-12, "8,16": 2e-12}}, "seconds_per_byte": 0.0,'
                     ' "overhead_s": 0.0, "source": "test", "context_factor": {"8": 1.1},'
                     ' "context_group_factor": {"8": {"projection": 1.3, "pointwise": 0.9}}}')
    model = cpu_cost.CpuCostModel(cpu_cost.load_coefficients(table))
    projection = LayerShape("p", "Conv", "pointwise", 960 * 160 * 49, 960 * 160, 960 * 49, 160 * 49, 160)
    expansion = LayerShape("e", "Conv", "pointwise", 160 * 960 * 49, 160 * 960, 160 * 49, 960 * 49, 960)
    assert cpu_cost.context_group(projection) == "projection" and cpu_cost.context_group(expansion) == "pointwise"
    assert model.layer_cost(projection, 8, 8).latency_s == pytest.approx(projection.macs * 1e-12 * 1.1 * 1.3)
    assert model.layer_cost(expansion, 8, 8).latency_s == pytest.approx(expansion.macs * 1e-12 * 1.1 * 0.9)
    assert model.layer_cost(CONV, 8, 8).latency_s == pytest.approx(CONV.macs * 1e-12 * 1.1)  # no group factor
    assert model.layer_cost(projection, 8, 16).latency_s == pytest.approx(projection.macs * 2e-12)  # none at a16


def _chain(length: int) -> list[LayerShape]:
    return [LayerShape(f"c{i}", "Conv", "conv", macs=8 * 8 * 64 * 9, weight_params=8 * 8 * 9, input_elems=8 * 64,
                       output_elems=8 * 64, output_channels=8) for i in range(length)]


def _plan_latency(model, layers: list[LayerShape], a_bits: int = 8) -> float:
    """What the allocator adds up for a plan (passes/allocate.evaluate): layer costs + fixed costs."""
    return (sum(model.layer_cost(layer, 8, a_bits).latency_s for layer in layers)
            + model.fixed_costs(layers).get("latency_s", 0.0))


def test_cpu_call_overhead_is_charged_once_per_model(tmp_path):
    """The per-call cost (library call, Python runner) is a fixed cost, not part of every layer:
    an 8-layer plan costs one call plus 8 layers, not 8 times a one-layer model."""
    table = tmp_path / "table.json"
    table.write_text('{"seconds_per_mac": {"default": {"8,8": 1e-12, "8,16": 1e-10}}, "seconds_per_byte": 0.0,'
                     ' "overhead_s": 3e-7, "call_overhead_s": 2e-5, "seconds_per_input_elem": 1e-10,'
                     ' "seconds_per_output_elem": 1e-9, "source": "test"}')
    model = cpu_cost.CpuCostModel(cpu_cost.load_coefficients(table))
    one, eight = _chain(1), _chain(8)
    layer_s = model.layer_cost(one[0], 8, 8).latency_s
    assert layer_s == pytest.approx(3e-7 + one[0].macs * 1e-12)  # no per-call share in a layer
    call_s = 2e-5 + 1e-10 * one[0].input_elems + 1e-9 * one[0].output_elems
    assert model.fixed_costs(one)["latency_s"] == pytest.approx(call_s)
    assert model.fixed_costs(eight)["latency_s"] == pytest.approx(call_s)  # once, whatever the depth
    assert _plan_latency(model, eight) == pytest.approx(call_s + 8 * layer_s)
    assert _plan_latency(model, eight) < 2 * _plan_latency(model, one)  # the old per-layer fit said 8x


def test_cpu_fitted_table_separates_call_and_layer_overhead():
    """The fitted table prices one call well above one layer's overhead (measured: ~20 us vs
    ~0.3 us), so the bundled CNN's 8 layers are not charged 8 calls, and 16-bit activations
    cost more than 8-bit ones but not the generic kernels' 10-80x: the VNNI kernels read them as
    two byte planes (about twice the work) -- the difference the allocator trades."""
    if not cpu_cost.TABLE_PATH.exists():
        pytest.skip("no fitted table")
    model = cpu_cost.cost_model()
    coefficients = model.coefficients
    assert coefficients.call_overhead_s > 10 * coefficients.overhead_s > 0
    eight = _chain(8)
    a8, a16 = _plan_latency(model, eight, 8), _plan_latency(model, eight, 16)
    assert a8 < 3 * model.call_latency_s(eight)  # a small 8-layer int8 model is mostly its call
    ratio = model.layer_cost(CONV, 8, 16).latency_s / model.layer_cost(CONV, 8, 8).latency_s
    assert 1.3 < ratio < 4
    assert a16 > a8


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.name)
def test_every_declared_bit_pair_is_costed(model):
    assert (8, 8) in model.bit_pairs and (4, 8) in model.bit_pairs
    for w_bits, a_bits in model.bit_pairs:
        cost = model.layer_cost(CONV, w_bits, a_bits)
        stored = (onnx_cost.stored_weight_bits(CONV.op_type, w_bits, a_bits)
                  if isinstance(model, onnx_cost.OnnxCostModel) else w_bits)
        assert cost.weight_bytes == (CONV.weight_params * stored + 7) // 8
        assert cost.bitops == CONV.macs * w_bits * a_bits


def test_targets_declare_16_bit_activations_where_they_run():
    for model in (onnx_cost.cost_model(), cpu_cost.cost_model(), gpu_cost.cost_model(), fpga_cost.cost_model()):
        assert {(4, 16), (8, 16)} <= set(model.bit_pairs)
    assert all(a == 8 for _, a in mcu_cost.cost_model().bit_pairs)  # 16-bit MCU lowering untested
    # the CPU pairs are the ones its fitted table has measurements for
    fitted = cpu_cost.load_coefficients().seconds_per_mac
    if cpu_cost.TABLE_PATH.exists():
        for w_bits, a_bits in cpu_cost.cost_model().bit_pairs:
            assert f"{w_bits},{a_bits}" in fitted["conv"]


def test_a16_plan_exports_and_runs_in_onnxruntime():
    """A plan mixing w4a16, w8a16 and w8a8 layers loads in onnxruntime, with uint16 activations, close to float."""
    import numpy as np
    import onnx

    from compiler.fidelity import run_model
    from passes.canonicalize import canonicalize
    from passes.insert_qdq import quantize_model
    from passes.select_layers import select_layers
    from passes.sensitivity import activation_ranges, plan_with_choices, ranges_for_plan
    from tests.qdq_fixtures import conv_block_model

    model = canonicalize(conv_block_model())
    plan = select_layers(model)
    calib = {"x": np.random.default_rng(0).uniform(-1, 1, (16, 3, 16, 16)).astype(np.float32)}
    ranges = activation_ranges(model, plan, calib, (8, 16))
    pairs = onnx_cost.cost_model().bit_pairs
    assert (4, 16) in pairs
    weighted = [name for name, layer in plan.layers.items() if layer.w_bits]
    choices = {name: [(4, 16), (8, 16), (8, 8)][index % 3] if plan.layers[name].w_bits else (None, 16)
               for index, name in enumerate(plan.layers)}
    mixed = plan_with_choices(plan, choices)
    qdq = quantize_model(model, mixed, ranges_for_plan(model, mixed, ranges))
    types = {init.data_type for init in qdq.graph.initializer}
    assert onnx.TensorProto.UINT16 in types and onnx.TensorProto.INT4 in types  # zero points / weights
    reference = run_model(model, calib, batch_size=1)
    outputs = run_model(qdq, calib, batch_size=1)
    for name, ref in reference.items():
        error = float(np.sqrt(np.mean((outputs[name] - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))
        assert error < 0.1
    # 16 bits everywhere is much closer to float than 8 bits everywhere
    wide = plan_with_choices(plan, {n: ((8 if plan.layers[n].w_bits else None), 16) for n in plan.layers})
    narrow = plan_with_choices(plan, {n: ((8 if plan.layers[n].w_bits else None), 8) for n in plan.layers})
    errors = []
    for candidate in (wide, narrow):
        out = run_model(quantize_model(model, candidate, ranges_for_plan(model, candidate, ranges)), calib, batch_size=1)
        errors.append(sum(float(np.mean((out[n] - ref) ** 2)) for n, ref in reference.items()))
    assert errors[0] < errors[1] and len(weighted) >= 3


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.name)
def test_online_ops_are_fixed_costs(model):
    """A float op inserted to run online costs its float (32-bit) layer cost in every metric, bits aside."""
    rotation = LayerShape("rot", "MatMul", "matmul", macs=64 * 64 * 10, weight_params=64 * 64,
                          input_elems=640, output_elems=640, output_channels=64)
    cost = model.online_op_cost(rotation)
    assert cost.weight_bytes == 4 * 64 * 64 and cost.bitops == rotation.macs * 32 * 32
    without = model.fixed_costs([CONV])
    with_op = model.fixed_costs([CONV], [rotation])
    for metric, value in cost.metrics().items():
        assert with_op[metric] >= without.get(metric, 0.0) + value * (1 - 1e-12)
    if cost.latency_s is not None:
        assert with_op["latency_s"] == pytest.approx(without.get("latency_s", 0.0) + cost.latency_s)
        assert cost.latency_s >= model.layer_cost(rotation, 8, 8).latency_s


def test_two_bit_weights_are_offered_only_where_the_lowering_realises_them():
    """onnx exports them (INT2 or int4 containers) and an FPGA dataflow engine builds 2x8 multipliers;
    the integer-only graph behind cpu / gpu / mcu holds int4 and int8 weights only."""
    assert (2, 8) in onnx_cost.cost_model().bit_pairs
    assert (2, 8) in fpga_cost.cost_model().bit_pairs
    for model in (cpu_cost.cost_model(), gpu_cost.cost_model(), mcu_cost.cost_model()):
        assert all(w != 2 for w, _ in model.bit_pairs), model.name


def test_onnx_two_bit_bytes_are_the_stored_element_type():
    """0.5 byte per weight where the export needs an int4 container, 0.25 where it stores INT2."""
    model = onnx_cost.cost_model()
    deconv = LayerShape("up", "ConvTranspose", "conv", CONV.macs, CONV.weight_params, CONV.input_elems,
                        CONV.output_elems, 64)
    int4_bytes, int2_bytes = (CONV.weight_params + 1) // 2, (CONV.weight_params + 3) // 4
    assert model.layer_cost(CONV, 2, 8).weight_bytes == int4_bytes == model.layer_cost(CONV, 4, 8).weight_bytes
    assert model.layer_cost(FC, 2, 8).weight_bytes == (FC.weight_params + 3) // 4  # INT2 in one block per row
    assert model.layer_cost(CONV, 2, 16).weight_bytes == int2_bytes  # no 8-bit fusion: INT2
    assert model.layer_cost(deconv, 2, 8).weight_bytes == int2_bytes
    assert model.layer_cost(CONV, 2, 8).bitops == CONV.macs * 2 * 8  # the arithmetic is still 2-bit


@pytest.mark.parametrize("a_bits", [8, 16])
def test_onnx_weight_bytes_match_the_exported_model(a_bits):
    """The cost model's weight bytes of every layer are the bytes of its weight initializer in the QDQ model."""
    import numpy as np

    from compiler.calibrate import collect_ranges
    from compiler.layers import layer_shapes
    from passes.insert_qdq import quantize_model, tensors_to_calibrate
    from passes.select_layers import select_layers
    from tests.passes.test_insert_qdq_int2 import _all_ops_net, _weight_dequantizers

    model = _all_ops_net()
    plan = select_layers(model, w_bits=2, a_bits=a_bits)
    calib = {"x": np.random.default_rng(1).normal(size=(8, 3, 8, 8)).astype(np.float32)}
    qdq = quantize_model(model, plan, collect_ranges(model, calib, tensors_to_calibrate(model, plan), progress=False))
    shapes = layer_shapes(model, list(plan.layers))
    initializers = {init.name: init for init in qdq.graph.initializer}
    cost_model = onnx_cost.cost_model()
    stored = {name: len(initializers[node.input[0]].raw_data) for name, node in _weight_dequantizers(qdq, plan).items()}
    assert set(stored) == {"conv", "deconv", "fc", "mm"}
    for name, size in stored.items():
        assert cost_model.layer_cost(shapes[name], 2, a_bits).weight_bytes == size, name


def test_fpga_two_bit_weights_use_lut_multipliers_and_quarter_bram():
    zcu = fpga_cost.cost_model("zcu104")
    w2a8, w4a8, w4a4 = (zcu.layer_cost(CONV, w, a) for w, a in ((2, 8), (4, 8), (4, 4)))
    assert w2a8.resources["dsp"] == 0 and w4a8.resources["dsp"] > 0  # 2x8 products fit in LUTs, 4x8 do not
    lanes = zcu.parallelism
    # the same 16-bit partial-product array as 4x4, with a 2-bit wider accumulator (w + a = 10, not 8)
    assert w2a8.resources["lut"] == w4a4.resources["lut"] + 2 * lanes
    assert w2a8.resources["bram"] == pytest.approx(w4a8.resources["bram"] / 2)
