"""compiler.mixed: the allocator as the pipeline runs it -- sensitivities, candidates, re-ranking, record."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from compiler.errors import EdgeqError
from compiler.mixed import AllocatorOptions, allocate_bits
from passes.allocate import greedy
from passes.canonicalize import canonicalize
from passes.select_layers import select_layers
from targets.base import get_target
from tests.qdq_fixtures import conv_block_model


def _setup(samples: int = 48):
    model = canonicalize(conv_block_model())
    plan = select_layers(model)
    calib = {"x": np.random.default_rng(0).uniform(-1, 1, (samples, 3, 16, 16)).astype(np.float32)}
    return model, plan, calib


def test_reranked_and_refined_allocation_measures_held_out_and_records_how():
    model, plan, calib = _setup()
    options = AllocatorOptions(sensitivity="in-context", rerank=8, refine=2, sensitivity_samples=32)
    mixed = allocate_bits(model, plan, calib, get_target("onnx"), None, "size=0.7", integer_only=False,
                          options=options)
    record = plan.totals["allocation"]["allocator"]
    assert record["sensitivity"] == "in-context" and record["context"] == [8, 8]
    assert record["held_out"] is True and record["rerank_samples"] == 16 and record["sensitivity_samples"] == 32
    # a size budget does not charge for activation width: 16-bit activations would be free, so not offered
    assert [tuple(pair) for pair in record["candidates"]] == [(2, 8), (4, 8), (8, 8)]  # onnx cost model bit_pairs, a8
    assert record["not_offered"]["pairs"] == [[4, 16], [8, 16]]
    # 2-bit conv weights go in int4 containers (as many bytes as 4-bit ones): not worth measuring
    convs = [name for name, layer in plan.layers.items() if layer.op_type == "Conv" and layer.w_bits]
    assert convs and record["not_measured"]["layers"] == record["not_measured"]["choices"] == len(convs)
    assert all((2, 8) not in mixed.problem.layer(name).choices for name in convs)
    assert record["refine"] == 2
    candidates = plan.totals["allocation"]["candidates"]
    ranked = [c for c in candidates if "rank" in c]
    reranking = [c for c in candidates if "step" not in c]  # the ILP's best and greedy's unless among them
    refined = [c for c in candidates if "step" in c]
    assert 1 < len(ranked) <= 8 and len(reranking) - len(ranked) <= 1
    assert refined[0]["step"] == 0 and len(refined) >= 1
    assert refined[0]["measured"] == min(c["measured"] for c in reranking)  # refinement starts at the re-ranked best
    greedys = greedy(mixed.problem, {"size_fraction": 0.7})
    assert any(c["objective"] == pytest.approx(greedys.objective, rel=1e-12) for c in reranking)
    assert sum(c["chosen"] for c in candidates) == 1
    chosen = next(c for c in candidates if c["chosen"])
    assert chosen["measured"] == min(c["measured"] for c in candidates)
    assert mixed.allocation.totals["size_fraction"] <= 0.7
    # the chosen plan is the one measured best: measuring it again gives the recorded distance
    again = mixed.distance(mixed.allocation.choices)
    assert again == pytest.approx(chosen["measured"], rel=1e-6)
    section = plan.totals["report_sections"]["Bit allocation"]
    assert "ILP rank 1" in section and "refine step 0" in section and "in-context" in section
    assert f"Not measured: {len(convs)} choices of {len(convs)} layers" in section
    for name, layer in plan.layers.items():
        assert (layer.w_bits, layer.a_bits) == mixed.allocation.choices[name]


def test_single_layer_without_reranking_is_the_plain_ilp_optimum():
    model, plan, calib = _setup(24)  # fewer samples than the sensitivity wants (128): nothing held out
    options = AllocatorOptions(sensitivity="single-layer", rerank=0, refine=0, pairs=((4, 8), (8, 8)))
    mixed = allocate_bits(model, plan, calib, get_target("onnx"), None, "size=0.7", integer_only=False,
                          options=options)
    assert mixed.distance is None and mixed.allocation.method == "ilp-cbc"
    assert "candidates" not in plan.totals["allocation"]
    assert all(layer.a_bits == 8 for layer in plan.layers.values())
    assert plan.totals["allocation"]["allocator"]["rounding"] == "nearest"  # no recipe given


def test_the_recipe_s_gptq_rounds_the_candidates_it_will_export():
    """cnn recipe: GPTQ rounds weights of <= 4 bits, so the 4-bit candidates are measured GPTQ-rounded."""
    from compiler.recipe import gptq_rounding, load_recipe

    cnn = load_recipe("cnn")
    assert gptq_rounding(cnn, [2, 4, 8])[0] == [2, 4]
    assert gptq_rounding(cnn, [8]) == ([], {})  # an all-8-bit plan is not GPTQ-rounded
    assert gptq_rounding(load_recipe("none"), [4, 8]) == ([], {})
    tables = {}
    for recipe in (None, cnn):
        model, plan, calib = _setup(24)
        options = AllocatorOptions(sensitivity="single-layer", pairs=((4, 8), (8, 8)))
        mixed = allocate_bits(model, plan, calib, get_target("onnx"), None, "size=0.7", integer_only=False,
                              options=options, recipe=recipe)
        tables[recipe is not None] = {layer.name: layer.sensitivity for layer in mixed.problem.layers}
    assert plan.totals["allocation"]["allocator"]["rounding"] == {"gptq": [4], "folds": 2}
    assert "4 bits GPTQ-rounded" in plan.totals["report_sections"]["Bit allocation"]
    weighted = [name for name, layer in plan.layers.items() if layer.w_bits]
    assert sum(tables[True][n][(4, 8)] for n in weighted) < sum(tables[False][n][(4, 8)] for n in weighted)


def test_reranking_measures_the_model_the_compiler_would_compile(tmp_path):
    """A candidate's measured distance is that of compile_model's QDQ model for the same bits, calibrated and
    rounded (cnn recipe: GPTQ for 4-bit weights, bias correction) on the sensitivity samples."""
    from compiler.fidelity import run_model
    from compiler.pipeline import CompileOptions, compile_model
    from compiler.recipe import load_recipe
    from passes.sensitivity import output_distance

    model, plan, calib = _setup(40)
    options = AllocatorOptions(rerank=2, sensitivity_samples=24, rerank_samples=16, pairs=((4, 8), (8, 8)))
    mixed = allocate_bits(model, plan, calib, get_target("onnx"), None, "size=0.7", integer_only=False,
                          options=options, recipe=load_recipe("cnn"))
    all_w4 = {layer.name: (4 if (4, 8) in layer.choices else None, 8) for layer in mixed.problem.layers}
    fitted = {name: value[:24] for name, value in calib.items()}
    held_out = {name: value[24:] for name, value in calib.items()}
    onnx.save(model, str(tmp_path / "conv_block.onnx"))
    compiled = compile_model(CompileOptions(model=str(tmp_path / "conv_block.onnx"), calib_data=fitted, bits="w4a8",
                                            recipe="cnn", out_dir=str(tmp_path / "out"), progress=False))
    assert compiled.plan.recipe["name"] == "cnn" and any(
        layer.info.get("rounding") == "gptq" for layer in compiled.plan.layers.values())
    expected = output_distance(run_model(model, held_out, batch_size=1),
                               run_model(compiled.qdq_model, held_out, batch_size=1))  # the model takes batch 1
    assert mixed.distance(all_w4) == pytest.approx(expected, rel=1e-6)


def test_bad_allocator_options_are_user_errors():
    with pytest.raises(EdgeqError, match="sensitivity mode"):
        AllocatorOptions(sensitivity="guess")
    with pytest.raises(EdgeqError, match="rerank"):
        AllocatorOptions(rerank=-1)
    with pytest.raises(EdgeqError, match="refine"):
        AllocatorOptions(refine=-1)
    with pytest.raises(EdgeqError, match="sensitivity samples must be >= 1"):
        AllocatorOptions(sensitivity_samples=0)
    with pytest.raises(EdgeqError, match="rerank samples must be >= 1"):
        AllocatorOptions(rerank_samples=0)
    with pytest.raises(EdgeqError, match="unknown solver"):
        AllocatorOptions(solver="anneal")
    with pytest.raises(EdgeqError, match="do not apply to --solver greedy"):
        AllocatorOptions(solver="greedy", rerank=4)


def test_greedy_solver_plans_on_the_same_table_and_never_beats_the_ilp_on_it():
    from passes.allocate import evaluate, greedy

    plans = {}
    for solver in ("ilp", "greedy"):
        model, plan, calib = _setup(24)
        options = AllocatorOptions(solver=solver, pairs=((2, 8), (4, 8), (8, 8)))
        plans[solver] = allocate_bits(model, plan, calib, get_target("onnx"), None, "size=0.6", integer_only=False,
                                      options=options)
        assert plan.totals["allocation"]["allocator"]["solver"] == solver
        for name, layer in plan.layers.items():
            assert (layer.w_bits, layer.a_bits) == plans[solver].allocation.choices[name]
    ilp, baseline = plans["ilp"], plans["greedy"]
    assert baseline.allocation.method == "greedy-demote" and baseline.allocation.totals["size_fraction"] <= 0.6
    # the same measured table (measurement is deterministic), so greedy's plan is what passes.allocate.greedy gives
    assert baseline.allocation.choices == greedy(ilp.problem, {"size_fraction": 0.6}).choices
    assert ilp.allocation.objective <= evaluate(ilp.problem, baseline.allocation.choices)["sensitivity"] + 1e-12


def test_cli_options_take_sensitivity_samples_when_the_cli_defines_it():
    import argparse

    from compiler.mixed import allocator_options

    base = {"sensitivity": "single-layer", "rerank": 0, "refine": 0}
    assert allocator_options(argparse.Namespace(**base)).sensitivity_samples == AllocatorOptions().sensitivity_samples
    assert allocator_options(argparse.Namespace(**base, sensitivity_samples=40)).sensitivity_samples == 40


def test_16_bit_activations_are_offered_where_the_budget_prices_them():
    model, plan, calib = _setup()
    options = AllocatorOptions(rerank=0, refine=0)
    full = allocate_bits(model, plan, calib, get_target("onnx"), None, "size=0.75", integer_only=False,
                         options=options)
    bitops_w8a8 = sum(layer.costs[(8, 8) if (8, 8) in layer.costs else (None, 8)].bitops
                      for layer in full.problem.layers)
    plan = select_layers(model)
    mixed = allocate_bits(model, plan, calib, get_target("onnx"), None, f"size=0.75,bitops={1.2 * bitops_w8a8:.0f}",
                          integer_only=False, options=options)
    record = plan.totals["allocation"]["allocator"]
    assert [tuple(pair) for pair in record["candidates"]] == list(get_target("onnx").cost_model().bit_pairs)
    assert "not_offered" not in record
    assert "not_measured" not in record  # 2-bit arithmetic is cheaper in bit-operations
    assert any(choice[1] == 16 for choice in mixed.allocation.choices.values())  # some room for a16 was used
    assert mixed.allocation.totals["bitops"] <= 1.2 * bitops_w8a8


def test_pins_name_each_layer_once_and_only_bits_it_has():
    from compiler.mixed import parse_pins

    _, plan, _ = _setup()
    weighted = next(name for name, layer in plan.layers.items() if layer.w_bits)
    weightless = next(name for name, layer in plan.layers.items() if not layer.w_bits)
    assert parse_pins([f"{weighted}=w4", f"{weightless}=a8"], plan) == {weighted: (4, None), weightless: (None, 8)}
    with pytest.raises(EdgeqError, match="twice"):  # the last one silently won before
        parse_pins([f"{weighted}=w8a8", f"{weighted}=w4a8"], plan)
    with pytest.raises(EdgeqError, match="has no weights"):  # a weight pin on an Add was silently a no-op
        parse_pins([f"{weightless}=w8a8"], plan)


def test_report_says_which_layers_were_pinned():
    model, plan, calib = _setup(16)
    allocate_bits(model, plan, calib, get_target("onnx"), None, "size=0.7", integer_only=False,
                  pins=["Conv_2=w8a8"], options=AllocatorOptions(sensitivity="proxy"))
    section = plan.totals["report_sections"]["Bit allocation"]
    assert "| `Conv_2` | w8a8 (pinned w8a8) |" in section
    assert "pinned" not in section.split("`Conv_4`")[1].splitlines()[0]


def test_device_overruns_name_budgets_and_totals_the_device_cannot_hold():
    from compiler.mixed import device_overruns

    limits = {"dsp": 220.0, "lut": 53200.0, "bram": 140.0}
    messages = device_overruns("fpga:pynq-z2", limits, {"dsp": 1000.0}, {"dsp": 256.0, "lut": 60000.0, "bram": 3.0})
    assert messages == ["budget dsp 1000 is more than fpga:pynq-z2 has (220)",
                        "the plan needs lut 60000, more than fpga:pynq-z2 has (53200); budget it to plan "
                        "within the device"]
    assert device_overruns("fpga:pynq-z2", limits, {"dsp": 200.0}, {"dsp": 180.0, "lut": 100.0}) == []


def test_a_budget_above_the_device_is_warned_about(capsys):
    model, plan, calib = _setup(16)
    allocate_bits(model, plan, calib, get_target("mcu"), "cortex-m4", "flash=2MB", integer_only=True,
                  options=AllocatorOptions(sensitivity="proxy"))
    assert "edgeq: warning: budget flash_bytes 2.000MB is more than mcu:cortex-m4 has (512.00KB)" \
        in capsys.readouterr().err


class _TimedTarget:
    """A target whose artifact 'runs' in a fixed time (check_latency's view of a target)."""

    def __init__(self, median_ms: float | None) -> None:
        self.median_ms = median_ms
        self.extra: dict = {}

    def measure_latency(self, out_dir, inputs):
        return None if self.median_ms is None else {"median_ms": self.median_ms, "runs": 50, "threads": 1,
                                                    **self.extra}


def _allocated_plan(budget_s: float | None, predicted_s: float):
    from compiler.plan import QuantPlan

    plan = QuantPlan(model="m.onnx")
    budget = {} if budget_s is None else {"latency_s": budget_s}
    plan.totals["allocation"] = {"budget": budget, "totals": {"latency_s": predicted_s}}
    plan.totals["report_sections"] = {"Bit allocation": "table"}
    return plan


def _timed_and_kept(plan, median_ms: float, fastest_s: float | None, tmp_path) -> dict:
    """``plan`` timed at ``median_ms`` and kept as the last build (what the user is warned of)."""
    from compiler.mixed import MixedPrecision, check_latency, record_latency_rounds

    record = check_latency(plan, _TimedTarget(median_ms), tmp_path, {})
    budget = plan.totals["allocation"]["budget"]
    record_latency_rounds(MixedPrecision(problem=None, budget=budget, fastest_latency_s=fastest_s), plan)
    return record


def test_a_plan_over_its_latency_budget_when_measured_is_warned_about(capsys, tmp_path):
    from compiler.mixed import check_latency

    plan = _allocated_plan(1.5e-3, 1.45e-3)
    record = _timed_and_kept(plan, 1.8, None, tmp_path)
    assert record["latency_s"] == pytest.approx(1.8e-3) and not record["within_budget"]
    assert plan.totals["allocation"]["measured"] is record
    assert "Measured on this machine: 1.8ms per sample" in plan.totals["report_sections"]["Bit allocation"]
    assert ("runs in 1.8ms per sample on this machine, over the latency budget 1.5ms (predicted 1.45ms); "
            "try --budget latency=1.208ms") in capsys.readouterr().err
    _timed_and_kept(_allocated_plan(1.5e-3, 1.45e-3), 1.8, 1.3e-3, tmp_path)  # above the scaled 1.208ms: name it
    assert ("; the cost model's fastest plan within the other budgets is predicted at 1.3ms: try --budget "
            "latency=1.3ms") in capsys.readouterr().err
    _timed_and_kept(_allocated_plan(1.5e-3, 1.45e-3), 1.8, 1.45e-3, tmp_path)  # it is the fastest plan
    assert "fastest plan within the other budgets, so no plan meets it here" in capsys.readouterr().err
    assert _timed_and_kept(_allocated_plan(1.5e-3, 1.45e-3), 1.2, None, tmp_path)["within_budget"]
    assert capsys.readouterr().err == ""
    # a target timing in blocks: the budget is held to the lowest block median
    blocked = _allocated_plan(1.5e-3, 1.45e-3)
    target = _TimedTarget(1.6)
    target.extra = {"settled_ms": 1.4, "block_medians_ms": [1.7, 1.4, 1.6, 1.5]}
    record = check_latency(blocked, target, tmp_path, {})
    assert record["latency_s"] == pytest.approx(1.4e-3) and record["median_latency_s"] == pytest.approx(1.6e-3)
    assert record["within_budget"] and record["blocks"] == 4
    assert "the lowest of 4 block medians of 50 runs" in blocked.totals["report_sections"]["Bit allocation"]
    # no latency budget, or a target that cannot time its artifact here: nothing to check
    assert check_latency(_allocated_plan(None, 1e-3), _TimedTarget(1.2), tmp_path, {}) is None
    assert check_latency(_allocated_plan(1e-3, 1e-3), _TimedTarget(None), tmp_path, {}) is None


def test_a_plan_measured_over_its_latency_budget_is_re_planned_from_the_measurement(capsys, tmp_path,
                                                                                      monkeypatch):
    """Every build 'runs' 1% over the budget: the second plan is held to budget / 1.01 (the first's
    measured/predicted ratio) less the margin, the last re-plan to the fastest plan; the builds are
    recorded and the user warned only of the one kept."""
    import copy

    import compiler.mixed
    from compiler.mixed import check_latency, next_latency_plan, record_latency_rounds

    monkeypatch.setattr(compiler.mixed, "REPLAN_MARGIN", 0.005)  # the tiny model's plans span only 2%
    model, plan, calib = _setup(16)
    cpu = get_target("cpu")
    probe = allocate_bits(model, copy.deepcopy(plan), calib, cpu, None, "latency=1s", integer_only=True,
                          options=AllocatorOptions(sensitivity="proxy"))
    slowest, fastest = probe.allocation.totals["latency_s"], probe.fastest_latency_s
    budget = slowest  # the first plan is the least sensitive one
    assert budget / 1.01 * (1 - 0.005) > fastest * 1.001  # room to re-plan in
    mixed = allocate_bits(model, plan, calib, cpu, None, f"latency={budget * 1e3}ms", integer_only=True,
                          options=AllocatorOptions(sensitivity="proxy", latency_rounds=2))
    builds, built = [], plan
    while built is not None:
        check_latency(built, _TimedTarget(1.01 * budget * 1e3), tmp_path, {})
        builds.append(built)
        built = next_latency_plan(mixed, built)
    assert len(builds) == 3 and [item["within_budget"] for item in mixed.latency_rounds] == [False, False, False]
    planned = [item["planned_latency_s"] for item in mixed.latency_rounds]
    assert planned[0] == pytest.approx(budget) and planned[1] == pytest.approx(budget / 1.01 * (1 - 0.005))
    assert planned[2] == pytest.approx(fastest)  # the last re-plan: the fastest plan
    for item in mixed.latency_rounds:
        assert item["predicted_latency_s"] <= item["planned_latency_s"] * (1 + 1e-6)
    kept = builds[-1].totals["allocation"]
    assert kept["budget"]["latency_s"] == pytest.approx(budget) == builds[-1].budget["latency_s"]  # the user's
    assert "re-planning to a predicted" in capsys.readouterr().err
    record_latency_rounds(mixed, builds[-1])
    assert len(kept["latency_rounds"]) == 3
    assert "| 3 | " in builds[-1].totals["report_sections"]["Bit allocation"]
    assert "it is the cost model's fastest plan" in capsys.readouterr().err
    # Within the budget at once: one build, nothing re-planned, nothing warned.
    model, plan, calib = _setup(16)
    mixed = allocate_bits(model, plan, calib, cpu, None, f"latency={budget * 1e3}ms", integer_only=True,
                          options=AllocatorOptions(sensitivity="proxy"))
    check_latency(plan, _TimedTarget(0.5 * budget * 1e3), tmp_path, {})
    assert next_latency_plan(mixed, plan) is None and len(mixed.latency_rounds) == 1
    record_latency_rounds(mixed, plan)
    assert "latency_rounds" not in plan.totals["allocation"] and capsys.readouterr().err == ""


def test_a_re_plan_that_finds_no_plan_keeps_the_build_and_says_why(capsys, tmp_path, monkeypatch):
    """greedy's demotions can get stuck under a tighter limit: the build already made is kept, not the
    whole compile failed."""
    import compiler.mixed
    from compiler.mixed import check_latency, next_latency_plan

    model, plan, calib = _setup(16)
    mixed = allocate_bits(model, plan, calib, get_target("cpu"), None, "latency=1s", integer_only=True,
                          options=AllocatorOptions(sensitivity="proxy"))
    mixed.budget["latency_s"] = plan.totals["allocation"]["budget"]["latency_s"] = 0.9 * mixed.allocation.totals[
        "latency_s"]  # as if the budget had been tighter than this build measured

    def stuck(*args, **kwargs):
        raise EdgeqError("greedy found no plan within the budget")

    monkeypatch.setattr(compiler.mixed, "solve", stuck)
    check_latency(plan, _TimedTarget(1e3), tmp_path, {})
    assert next_latency_plan(mixed, plan) is None
    assert "re-planning for the latency budget stopped: greedy found no plan" in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_compile_under_a_latency_budget_times_what_it_built(tmp_path):
    from compiler.pipeline import CompileOptions, compile_model
    from models import bundled
    from targets.cpu import MEASURE_BLOCKS, MEASURE_REPEAT

    result = compile_model(CompileOptions(model=str(bundled.model_path()), target="cpu", budget="latency=1ms",
                                          out_dir=str(tmp_path / "out"), progress=False))
    measured = result.plan.totals["allocation"]["measured"]
    assert 0 < measured["latency_s"] < 0.1 and measured["threads"] == 1 and measured["runs"] == MEASURE_REPEAT
    # the lowest of the blocks' medians, which is never above the median of all runs
    assert measured["blocks"] == MEASURE_BLOCKS and measured["latency_s"] <= measured["median_latency_s"] * 1.0001
    assert 0 < result.plan.totals["allocation"]["fastest_latency_s"] <= measured["predicted_latency_s"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Measured on this machine" in report and "- budget: latency_s=1ms\n" in report  # in the unit given


@pytest.mark.slow
def test_cpu_compile_re_plans_a_build_measured_over_its_latency_budget(tmp_path, monkeypatch, capsys):
    """The first build 'runs' 10% over the budget, the second within it: two builds, the second kept whole."""
    import json

    import compiler.mixed
    from compiler.pipeline import CompileOptions, compile_model
    from models import bundled
    from targets.cpu import CpuTarget

    times_ms = iter([1.1, 0.5])
    monkeypatch.setattr(CpuTarget, "measure_latency",
                        lambda self, out_dir, inputs: {"median_ms": next(times_ms), "runs": 3, "threads": 1})
    out = tmp_path / "out"
    result = compile_model(CompileOptions(model=str(bundled.model_path()), target="cpu", budget="latency=1ms",
                                          out_dir=str(out), progress=False))
    allocation = json.loads((out / "plan.json").read_text())["totals"]["allocation"]
    first, second = allocation["latency_rounds"]
    assert first["planned_latency_s"] == pytest.approx(1e-3) and not first["within_budget"]
    assert second["planned_latency_s"] == pytest.approx(
        1e-3 * first["predicted_latency_s"] / 1.1e-3 * (1 - compiler.mixed.REPLAN_MARGIN))
    assert second["planned_latency_s"] > allocation["fastest_latency_s"]  # not floored: the ratio was used
    assert second["within_budget"] and allocation["measured"]["latency_s"] == pytest.approx(0.5e-3)
    assert allocation["budget"]["latency_s"] == pytest.approx(1e-3)  # the user's budget, not the planned one
    assert allocation["totals"]["latency_s"] == pytest.approx(second["predicted_latency_s"])
    a_bits = {layer.a_bits for layer in result.plan.layers.values()}
    qdq = onnx.load(str(out / "model.qdq.onnx"))  # the kept build's model, not the first one's
    stored = {tensor.data_type for tensor in qdq.graph.initializer if tensor.name.endswith("zero_point")}
    assert 16 in a_bits and onnx.TensorProto.UINT16 in stored
    assert sorted(path.name for path in out.iterdir() if not path.name.startswith(".")) == \
        sorted(path.name for path in result.files)
    assert "| 2 | " in (out / "report.md").read_text()
    assert "re-planning to a predicted" in capsys.readouterr().err
    assert json.loads((out / "verify.json").read_text())["bit_exact"]  # the re-built library, checked against its own model
