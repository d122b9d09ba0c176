"""tools/fit_cpu_cost.py: the NNLS fit recovers known coefficients from timings made with them (single layers,
chains of one layer, and block stacks of several kinds), and the context factor of whole models."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from targets.base import LayerShape
from tools.fit_cpu_cost import fit

# What the synthetic host charges (seconds): the fit must find these again.
TRUE = {"call": 1.2e-6, "layer": 0.3e-6, "byte": 1e-11, "quantize": 8e-11, "runner_in": 9e-6,
        "runner_in_elem": 8e-11, "runner_out": 1e-5, "runner_out_elem": 8e-10,
        "mac": {("conv", "8,8"): 3e-12, ("depthwise", "8,8"): 8e-12, ("conv", "8,16"): 6e-12},
        "out_elem": {("conv", "8,8"): 2e-11, ("depthwise", "8,8"): 0.0, ("conv", "8,16"): 5e-11},
        "channel": {("conv", "8,8"): 0.0, ("depthwise", "8,8"): 4e-8, ("conv", "8,16"): 1e-8}}


def measurement(kind: str, bits: str, macs: int, bytes_: int, input_elems: int, output_elems: int,
                channels: int, layers: int = 1, chain: bool = False) -> dict:
    key = (kind, bits)
    core = (TRUE["call"] + TRUE["layer"] * layers + TRUE["byte"] * bytes_ + TRUE["quantize"] * input_elems
            + TRUE["mac"][key] * macs + TRUE["out_elem"][key] * output_elems * layers
            + TRUE["channel"][key] * channels * layers)
    runner_in = TRUE["runner_in"] + TRUE["runner_in_elem"] * input_elems
    runner_out = TRUE["runner_out"] + TRUE["runner_out_elem"] * output_elems
    w_bits, a_bits = (int(part) for part in bits.split(","))
    return {"kind": kind, "point": [kind, 0, channels], "bits": [w_bits, a_bits], "macs": macs, "bytes": bytes_,
            "input_elems": input_elems, "output_elems": output_elems, "layers": layers, "chain": chain,
            "core_median_s": core, "input_median_s": runner_in, "median_s": core + runner_in + runner_out}


def grid() -> list[dict]:
    rows = []
    for bits in ("8,8", "8,16"):
        scale = 2 if bits == "8,16" else 1
        rows += [measurement("conv", bits, 4_718_592, 53_760 * scale, 16_384, 32_768, 32),
                 measurement("conv", bits, 4_718_592, 80_000 * scale, 32_768, 16_384, 64),
                 measurement("conv", bits, 10_838_016, 500_000 * scale, 150_528, 401_408, 32),  # strided stem
                 measurement("conv", bits, 2_359_296, 70_000 * scale, 4_096, 4_096, 64),
                 measurement("conv", bits, 2_097_152, 90_000 * scale, 32_768, 65_536, 64),
                 measurement("conv", bits, 1_048_576, 30_000 * scale, 8_192, 8_192, 128)]
    # depthwise, stride 1 (MACs = 9 x input) and stride 2 (MACs = 9/4 x input)
    rows += [measurement("depthwise", "8,8", 294_912, 65_824, 32_768, 32_768, 32),
             measurement("depthwise", "8,8", 2_709_504, 602_976, 301_056, 301_056, 96),
             measurement("depthwise", "8,8", 2_709_504, 1_505_280, 1_204_224, 301_056, 96),
             measurement("depthwise", "8,8", 1_016_064, 564_480, 451_584, 112_896, 144),
             measurement("depthwise", "8,8", 254_016, 61_632, 28_224, 28_224, 576),
             measurement("depthwise", "8,8", 705_600, 100_000, 28_224, 28_224, 576)]  # 5x5
    rows += [measurement("conv", "8,8", 36_864 * n, 1_300 * n, 512, 512, 8, layers=n, chain=True) for n in (1, 4, 8)]
    rows += [stack(scale) for scale in (1, 2, 3)]
    return rows


def stack(scale: int) -> dict:
    """A block stack: layers of two kinds in one build, priced layer by layer (``per_layer``)."""
    per_layer = [["conv", 1_000_000 * scale, 20_000, 64], ["depthwise", 200_000, 20_000 * scale, 96],
                 ["conv", 500_000, 10_000, 32 * scale]]
    core = TRUE["call"] + TRUE["layer"] * 3 + TRUE["byte"] * 90_000 + TRUE["quantize"] * 8_000
    for kind, macs, outputs, channels in per_layer:
        key = (kind, "8,8")
        core += TRUE["mac"][key] * macs + TRUE["out_elem"][key] * outputs + TRUE["channel"][key] * channels
    runner_in = TRUE["runner_in"] + TRUE["runner_in_elem"] * 8_000
    runner_out = TRUE["runner_out"] + TRUE["runner_out_elem"] * 10_000
    return {"kind": "conv", "point": ["stack", 0, 0, 0], "bits": [8, 8], "macs": sum(layer[1] for layer in per_layer),
            "bytes": 90_000, "input_elems": 8_000, "output_elems": 10_000, "layers": 3, "chain": False,
            "per_layer": per_layer, "core_median_s": core, "input_median_s": runner_in,
            "median_s": core + runner_in + runner_out}


def test_fit_recovers_the_per_call_quantize_term_and_the_per_layer_terms() -> None:
    table = fit(grid())
    terms = table["fit_terms"]
    assert terms["library_quantize_per_elem_s"] == pytest.approx(TRUE["quantize"], rel=0.02)
    assert table["seconds_per_input_elem"] == pytest.approx(TRUE["quantize"] + TRUE["runner_in_elem"], rel=0.02)
    for name, truth in (("seconds_per_mac", "mac"), ("seconds_per_layer_output_elem", "out_elem"),
                        ("seconds_per_channel", "channel")):
        for (kind, pair), value in TRUE[truth].items():
            assert table[name][kind][pair] == pytest.approx(value, rel=0.02, abs=1e-15), (name, kind, pair)
    assert table["seconds_per_mac"]["conv"]["4,8"] == table["seconds_per_mac"]["conv"]["8,8"]  # int4 runs int8
    assert table["overhead_s"] == pytest.approx(TRUE["layer"], rel=0.05)
    assert table["call_overhead_s"] == pytest.approx(TRUE["call"] + TRUE["runner_in"] + TRUE["runner_out"], rel=0.02)
    assert table["fit_relative_error"]["max"] < 0.01


def whole_model(a_bits_of_layers: list[int], table: dict, factor: dict[int, float],
                projection_slowdown: float = 1.0) -> dict:
    """A whole-model measurement whose layers run ``factor[a_bits]`` times slower than ``table`` prices them, as
    compile's latency check times it (``settled_s``; the burst median, cache-cold, is slower), every other layer a
    1x1 projection; ``in_place_s``: each layer timed in place, projections ``projection_slowdown`` times slower
    than the rest (relative to ``factor``, which stays the model's overall slowdown)."""
    from targets.cpu.cost import CpuCostModel, coefficients_from_table

    cost_model = CpuCostModel(coefficients_from_table(table))
    shapes = [LayerShape(f"l{i}", "Conv", "pointwise", 16 * 64 * 64 * 4, 64 * 64 * 4, 16 * 64 * 4, 16 * 64 * 4, 64)
              if i % 2 else LayerShape(f"l{i}", "Conv", "pointwise", 16 * 64 * 256, 256 * 64, 16 * 64, 16 * 256, 256)
              for i in range(len(a_bits_of_layers))]  # odd: 256 -> 64 channels; even: 64 -> 256
    predicted = [cost_model.layer_cost(shape, 8, a).latency_s for shape, a in zip(shapes, a_bits_of_layers, strict=True)]
    relative = [projection_slowdown if i % 2 else 1.0 for i in range(len(shapes))]
    for a in set(a_bits_of_layers):  # the model's total at each width stays factor[a] x predicted
        mask = [layer_a == a for layer_a in a_bits_of_layers]
        mean = (sum(r * p for r, p, m in zip(relative, predicted, mask, strict=True) if m)
                / sum(p for p, m in zip(predicted, mask, strict=True) if m))
        relative = [r / mean if m else r for r, m in zip(relative, mask, strict=True)]
    in_place = {shape.node: factor[a] * r * p
                for shape, a, r, p in zip(shapes, a_bits_of_layers, relative, predicted, strict=True)}
    seconds = cost_model.call_latency_s(shapes) + sum(in_place.values())
    return {"context_model": "net", "bits": [8, max(a_bits_of_layers)], "layers": len(shapes),
            "plan_layers": [{"shape": asdict(shape), "bits": [8, a]} for shape, a in zip(shapes, a_bits_of_layers,
                                                                                            strict=True)],
            "settled_s": seconds, "median_s": 1.3 * seconds, "core_median_s": seconds, "input_median_s": 0.0,
            "in_place_s": in_place}


def test_context_factor_per_width_from_whole_models_leaves_the_layer_terms_alone() -> None:
    layers_only = fit(grid())
    truth = {8: 1.08, 16: 1.2}
    # as compiled at --bits w8a8 and w8a16: the 16-bit build keeps its first layer at 8 bits
    models = [whole_model([8] * 6, layers_only, truth), whole_model([8] + [16] * 5, layers_only, truth)]
    table = fit(grid() + models)
    assert table["seconds_per_mac"] == layers_only["seconds_per_mac"]  # whole models stay out of the layer fit
    assert table["context_factor"]["8"] == pytest.approx(truth[8], rel=1e-6)
    assert table["context_factor"]["16"] == pytest.approx(truth[16], rel=1e-6)
    for entry in table["context_fit"]:
        assert entry["predicted_s"] == pytest.approx(entry["measured_s"], rel=1e-6)
        assert entry["predicted_without_factor_s"] < entry["measured_s"]
    assert "context_factor" not in layers_only


def test_context_group_factor_puts_the_slowdown_where_the_layers_timed_in_place_had_it() -> None:
    layers_only = fit(grid())
    truth = {8: 1.1, 16: 1.2}
    models = [whole_model([8] * 6, layers_only, truth, projection_slowdown=1.5),
              whole_model([16] * 6, layers_only, truth, projection_slowdown=1.5)]
    table = fit(grid() + models)
    for width in ("8", "16"):
        groups = table["context_group_factor"][width]
        assert groups["projection"] / groups["pointwise"] == pytest.approx(1.5, rel=1e-6)
        assert table["context_factor"][width] == pytest.approx(truth[int(width)], rel=1e-6)
    for entry in table["context_fit"]:  # the groups share the slowdown out; the model's total stays as measured
        assert entry["predicted_s"] == pytest.approx(entry["measured_s"], rel=1e-6)
