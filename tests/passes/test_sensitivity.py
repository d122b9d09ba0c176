"""Sensitivity: measured (one layer quantized, outputs compared) and the second-moment proxy."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes import sensitivity as sn
from passes.canonicalize import canonicalize
from passes.select_layers import select_layers


def _conv_setup():
    from tests.qdq_fixtures import conv_block_model

    model = canonicalize(conv_block_model())
    plan = select_layers(model)
    rng = np.random.default_rng(0)
    calib = {"x": rng.uniform(-1, 1, (24, 3, 16, 16)).astype(np.float32)}
    return model, plan, calib


def _matmul_model(seed: int = 0) -> onnx.ModelProto:
    """x [N, 4, 8] @ W [8, 6]: a 3-D output, so the measured distance is the relative MSE."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6])], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def test_measured_sensitivity_is_deterministic_across_workers_and_grows_as_bits_shrink():
    model, plan, calib = _conv_setup()
    choices = sn.candidate_choices(plan, (4, 8), (8, 16))
    ranges = sn.activation_ranges(model, plan, calib, (8, 16))
    serial = sn.measured_sensitivity(model, plan, calib, choices, ranges=ranges, workers=1)
    parallel = sn.measured_sensitivity(model, plan, calib, choices, ranges=ranges, workers=2)
    assert serial == parallel
    assert set(serial) == set(plan.layers)
    assert all(value >= 0 for table in serial.values() for value in table.values())
    weighted = [name for name, layer in plan.layers.items() if layer.w_bits]
    # 4-bit weights move the output more than 8-bit ones, summed over the layers
    assert sum(serial[n][(4, 8)] for n in weighted) > 2 * sum(serial[n][(8, 8)] for n in weighted)
    weightless = [name for name, layer in plan.layers.items() if not layer.w_bits]
    assert sum(serial[n][(None, 16)] for n in weightless) < sum(serial[n][(None, 8)] for n in weightless)


def test_activation_ranges_follow_the_plans_calibration_method():
    """Candidates are measured on the ranges the export will use: the plan's --calibrate-method, and
    for "auto" the export's rule (MSE clipping inside, min-max at the graph output y)."""
    model = _matmul_model()
    plan = select_layers(model)
    calib = {"x": np.random.default_rng(0).standard_t(2, (64, 4, 8)).astype(np.float32)}  # heavy tails
    minmax = sn.activation_ranges(model, plan, calib, (8,), method="minmax")[8]
    mse = sn.activation_ranges(model, plan, calib, (8,), method="mse")[8]
    assert mse["x"] != minmax["x"] and mse["y"] != minmax["y"]  # MSE clips these tails
    auto = sn.activation_ranges(model, plan, calib, (8,))[8]  # no method set: "auto"
    assert auto["x"] == mse["x"] and auto["y"] == minmax["y"]
    plan.recipe["calibrate_method"] = "minmax"
    assert sn.activation_ranges(model, plan, calib, (8,))[8] == minmax


def test_proxy_equals_the_measured_relative_error_of_a_linear_layer():
    """For y = x W alone, the proxy is E||dy||^2 / E||y||^2 exactly, up to activation noise."""
    model = _matmul_model()
    plan = select_layers(model)
    rng = np.random.default_rng(1)
    calib = {"x": (rng.standard_normal((64, 4, 8)) @ rng.standard_normal((8, 8))).astype(np.float32)}
    choices = {"mm": [(4, 16), (8, 16)]}
    ranges = sn.activation_ranges(model, plan, calib, (16,), method="minmax")
    measured = sn.measured_sensitivity(model, plan, calib, choices, ranges=ranges, workers=1)
    proxy = sn.proxy_sensitivity(model, plan, calib, choices, ranges=ranges)
    for choice in choices["mm"][:1]:  # at 8 bits both are tiny and float rounding matters
        assert proxy["mm"][choice] == pytest.approx(measured["mm"][choice], rel=0.05)
    assert proxy["mm"][(4, 16)] > proxy["mm"][(8, 16)]


def test_proxy_orders_bit_widths_on_a_cnn():
    model, plan, calib = _conv_setup()
    choices = sn.candidate_choices(plan, (4, 8), (8, 16))
    proxy = sn.proxy_sensitivity(model, plan, calib, choices)
    for name, layer in plan.layers.items():
        table = proxy[name]
        if layer.w_bits:
            assert table[(4, 8)] > table[(8, 8)] > table[(8, 16)]
        else:
            assert table[(None, 8)] > table[(None, 16)]


def test_spearman():
    first = {"a": {(8, 8): 1.0, (4, 8): 5.0}, "b": {(8, 8): 2.0, (4, 8): 9.0}}
    same_order = {"a": {(8, 8): 10.0, (4, 8): 50.0}, "b": {(8, 8): 20.0, (4, 8): 90.0}}
    reversed_order = {name: {c: -v for c, v in table.items()} for name, table in first.items()}
    assert sn.spearman(first, same_order) == pytest.approx(1.0)
    assert sn.spearman(first, reversed_order) == pytest.approx(-1.0)
    assert math.isnan(sn.spearman(first, same_order, (8, 8)))  # two points only


def test_monotone_repairs_inversions_and_prefers_wider_ties():
    table = {"a": {(4, 8): 1e-5, (8, 8): 2e-5, (4, 16): 3e-6, (8, 16): 1e-6}, "b": {(None, 8): 0.0, (None, 16): 0.0}}
    fixed = sn.monotone(table)
    a = fixed["a"]
    assert a[(8, 16)] == table["a"][(8, 16)]  # the widest keeps its value
    assert a[(4, 8)] > a[(8, 8)] >= 2e-5 and a[(4, 8)] > a[(4, 16)] > a[(8, 16)]
    assert fixed["b"][(None, 8)] > fixed["b"][(None, 16)] == 0.0


def test_in_context_sensitivity_is_the_growth_over_the_base_plan():
    """Each value = distance(base plan with that layer changed) - distance(base plan), measured directly."""
    model, plan, calib = _conv_setup()
    choices = sn.candidate_choices(plan, pairs=[(4, 8), (8, 8)])
    ranges = sn.activation_ranges(model, plan, calib, (8,))
    table = sn.measured_sensitivity(model, plan, calib, choices, ranges=ranges, workers=2, context=(8, 8))
    assert table == sn.measured_sensitivity(model, plan, calib, choices, ranges=ranges, workers=1, context=(8, 8))
    distance = sn.PlanDistance(model, plan, calib, ranges)
    base = {name: sn.base_choice(plan, name, (8, 8)) for name in plan.layers}
    base_distance = distance(base)
    assert base_distance > 0
    weighted = [name for name, layer in plan.layers.items() if layer.w_bits]
    step = 2e-6 * max(v for values in table.values() for v in values.values())  # monotone()'s tie-break
    for name in weighted:
        assert table[name][(8, 8)] == 0.0
        direct = distance({**base, name: (4, 8)}) - base_distance
        assert table[name][(4, 8)] == pytest.approx(max(direct, 0.0), rel=1e-6, abs=step)  # monotone: >= w8a8
    assert sum(table[name][(4, 8)] for name in weighted) > 0


def test_ranges_follow_each_quantizer_width():
    model, plan, calib = _conv_setup()
    ranges = sn.activation_ranges(model, plan, calib, (8, 16))
    first = next(name for name, layer in plan.layers.items() if layer.w_bits)
    mixed = sn.plan_with_choices(plan, {first: (8, 16)})
    fitted = sn.ranges_for_plan(model, mixed, ranges)
    tensor = plan.layers[first].inputs[0]
    assert fitted[tensor] == ranges[16][tensor]
    others = [t for name, layer in plan.layers.items() if name != first for t in layer.inputs if t != tensor]
    assert others and all(fitted[t] == ranges[8][t] for t in others if t in fitted)


def test_candidate_pairs_give_weightless_layers_their_activation_widths():
    _, plan, _ = _conv_setup()
    choices = sn.candidate_choices(plan, pairs=[(4, 8), (8, 8), (8, 16)])
    for name, layer in plan.layers.items():
        expected = [(4, 8), (8, 8), (8, 16)] if layer.w_bits else [(None, 8), (None, 16)]
        assert choices[name] == expected


def test_per_sample_distances_average_to_the_distance():
    rng = np.random.default_rng(2)
    logits = {"y": rng.standard_normal((12, 5))}
    noisy = {"y": logits["y"] + 0.3 * rng.standard_normal((12, 5))}
    per_sample = sn.sample_distances(logits, noisy)
    assert per_sample.shape == (12,) and np.all(per_sample >= 0)
    assert float(np.mean(per_sample)) == pytest.approx(sn.output_distance(logits, noisy))
    # a non-classifier output: per-sample squared error over the mean square of the whole output
    images = {"z": rng.standard_normal((6, 2, 3))}
    shifted = {"z": images["z"] + 0.1 * rng.standard_normal((6, 2, 3))}
    expected = np.mean((images["z"] - shifted["z"]) ** 2) / np.mean(images["z"] ** 2)
    assert float(np.mean(sn.sample_distances(images, shifted))) == pytest.approx(expected)


def test_per_sample_table_averages_to_the_measured_table():
    model, plan, calib = _conv_setup()
    choices = sn.candidate_choices(plan, pairs=[(4, 8), (8, 8)])
    ranges = sn.activation_ranges(model, plan, calib, (8,))
    samples = sn.measured_sample_sensitivity(model, plan, calib, choices, ranges=ranges, workers=1, max_samples=None)
    assert all(values.shape == (24,) for table in samples.values() for values in table.values())
    table = sn.measured_sensitivity(model, plan, calib, choices, ranges=ranges, workers=1, max_samples=None)
    assert sn.monotone(sn.mean_table(samples)) == table
    first_half = sn.mean_table(samples, slice(0, 12))
    assert first_half == sn.mean_table(sn.sample_rows(samples, np.arange(12)))
    direct = sn.measured_sensitivity(model, plan, {k: v[:12] for k, v in calib.items()}, choices, ranges=ranges,
                                     workers=1)
    for name, entries in sn.monotone(first_half).items():
        assert entries == pytest.approx(direct[name], rel=1e-9)


def test_bootstrap_resamples_whole_groups():
    """With two groups of constant values, every replicate is a mean of whole groups."""
    values = np.array([1.0, 1.0, 1.0, 5.0, 5.0, 5.0])
    samples = {"a": {(4, 8): values, (8, 8): values / 10}}
    tables = sn.bootstrap_tables(samples, 40, groups=[0, 0, 0, 1, 1, 1], seed=3)
    seen = {round(table["a"][(4, 8)], 9) for table in tables}
    assert seen <= {1.0, 3.0, 5.0} and len(seen) > 1
    assert all(table["a"][(8, 8)] == pytest.approx(table["a"][(4, 8)] / 10) for table in tables)  # same rows
    by_sample = {round(table["a"][(4, 8)], 9) for table in sn.bootstrap_tables(samples, 40, seed=3)}
    assert by_sample - {1.0, 3.0, 5.0}  # resampling single samples mixes the groups
    with pytest.raises(ValueError):
        sn.bootstrap_tables(samples, 2, groups=[0, 1])


def test_rounded_weights_are_measured_in_place_of_nearest_rounding():
    """With GPTQ's candidate weights the 4-bit entries are the distance of the GPTQ export, and lower."""
    from passes.gptq import gptq_candidates

    model, plan, calib = _conv_setup()
    before = model.SerializeToString()
    choices = sn.candidate_choices(plan, pairs=[(4, 8), (8, 8)])
    ranges = sn.activation_ranges(model, plan, calib, (8,))
    rounded = gptq_candidates(model, plan, calib, [4])
    nearest = sn.measured_sensitivity(model, plan, calib, choices, ranges=ranges, workers=1)
    with_gptq = sn.measured_sensitivity(model, plan, calib, choices, ranges=ranges, workers=2, rounded=rounded)
    assert model.SerializeToString() == before  # weights swapped in and restored
    weighted = [name for name, layer in plan.layers.items() if layer.w_bits]
    # GPTQ minimises each layer's output error on these samples: less than nearest rounding in total
    assert sum(with_gptq[n][(4, 8)] for n in weighted) < sum(nearest[n][(4, 8)] for n in weighted)


def test_cross_fitting_measures_each_sample_on_weights_rounded_without_it():
    model, plan, calib = _conv_setup()
    choices = sn.candidate_choices(plan, pairs=[(4, 8), (8, 8)])
    ranges = sn.activation_ranges(model, plan, calib, (8,))
    folds = sn.cross_fit_folds(len(calib["x"]), 2)
    # weights that round nothing: the table must be the plain one, sample for sample
    table = sn.cross_fitted_sensitivity(model, plan, calib, choices, [{}, {}], ranges=ranges, workers=1)
    plain = sn.measured_sensitivity(model, plan, calib, choices, ranges=ranges, workers=1, max_samples=None)
    assert table.keys() == plain.keys()
    for name, values in plain.items():
        assert table[name] == pytest.approx(values, rel=1e-9, abs=1e-12)
    # fold 0 (even samples) is measured on weights fitted to the odd ones, and the other way round
    assert len(folds) == 2
    np.testing.assert_array_equal(calib["x"][~folds[0]], calib["x"][1::2])
    np.testing.assert_array_equal(calib["x"][~folds[1]], calib["x"][0::2])


def _matmul_with_blocks(block: int | None):
    """The MatMul model, its plan with weight blocks of ``block`` (None: per channel), and data."""
    model = _matmul_model(seed=3)
    plan = select_layers(model)
    plan.weight_block_size = block
    return model, plan, {"x": np.random.default_rng(1).standard_normal((16, 4, 8)).astype(np.float32)}


def test_measured_sensitivity_uses_the_plans_block_wise_weights():
    """A plan with block-wise sub-8-bit weights is measured block-wise, as it will be exported."""
    def w4_distance(block: int | None) -> float:
        model, plan, calib = _matmul_with_blocks(block)
        return sn.measured_sensitivity(model, plan, calib, {"mm": [(4, 8)]}, max_samples=None)["mm"][(4, 8)]

    per_channel, blocks_of_4 = w4_distance(None), w4_distance(4)
    # one scale per 4 of the 8 inputs fits the weights more closely than one per output channel
    assert blocks_of_4 < per_channel


def test_proxy_sensitivity_prices_the_plans_block_wise_weights():
    """The second-moment proxy rounds weights onto the grid the export uses: blocks when the plan has them."""
    def w4_proxy(block: int | None) -> dict:
        model, plan, calib = _matmul_with_blocks(block)
        return sn.proxy_sensitivity(model, plan, calib, {"mm": [(4, 8), (8, 8)]}, max_samples=None)["mm"]

    per_channel, blocks_of_4 = w4_proxy(None), w4_proxy(4)
    assert blocks_of_4[(4, 8)] < per_channel[(4, 8)]
    assert blocks_of_4[(8, 8)] == per_channel[(8, 8)]  # 8-bit weights stay per channel


@pytest.mark.parametrize("pairs", [[(8, 8)], [(8, 8), (8, 16)]])
def test_measured_sensitivity_with_only_8_bit_candidates(pairs):
    """The single-layer models quantize outputs at OUTPUT_BITS (16): the opset must allow it even when
    no candidate is below or above 8 bits (opset 17 has no uint16 QuantizeLinear)."""
    model, plan, calib = _conv_setup()
    assert model.opset_import[0].version < 21
    choices = sn.candidate_choices(plan, pairs=pairs)
    table = sn.measured_sensitivity(model, plan, calib, choices, workers=1)
    assert set(table) == set(plan.layers)
    assert all(value >= 0 for values in table.values() for value in values.values())
    assert sn.measurement_bits(plan, choices, None) == sorted({8, sn.OUTPUT_BITS})
