"""Mixed precision: fidelity against weight bytes for ILP, greedy, uniform and onnxruntime int4 plans.

For each model (the bundled Fashion-MNIST CNN, MobileNetV2, EfficientNet-Lite0):

1. canonicalize, select layers (target ``onnx``), fit 8-bit activation ranges
   (MSE observers) on all ``--calib-samples`` calibration samples;
2. measure every layer's single-layer sensitivity at w4a8 and w8a8
   (passes/sensitivity.py: that layer quantized alone, softmax KL against
   float) *per calibration sample*, so that tables over any subset and
   bootstrap resamples (by source photo: crops of one photo are not
   independent) come without re-running anything; report the bootstrap spread
   of the entries with the first ``--sensitivity-samples`` samples (the
   allocator's previous default) and with all, and of ILP-minus-greedy plan
   totals;
3. calibration only: over ``--splits`` random halvings of the calibration
   sources, choose plans on one half (ILP, the noise-aware ILP that minimises
   the CVaR of the plan total over bootstrap tables, greedy) and score them
   against float on the other half -- how a default is chosen without the
   evaluation photos;
4. at weight budgets of 0.5 ... 0.9 x the int8 weight bytes: the ILP
   (passes/allocate.py) and greedy on the small and on the full table, the
   noise-aware ILP on the full table; uniform w8a8 and w4a8;
5. export each plan with passes/insert_qdq (nearest rounding, per-channel
   symmetric weights, uint8 activations), run it in onnxruntime on the
   evaluation photos (disjoint from the calibration photos) and on the
   calibration samples, compare with the float model (top-1 / top-5
   agreement, KL, SQNR, accuracy where labels exist); for the default against
   greedy, the images only one of them keeps at float's top-1 and McNemar's
   exact p;
6. onnxruntime.quantization.quantize_static with QInt4 per-channel weights and
   QUInt8 activations (QDQ, MinMax calibration on the same photos), scored the same way.

Weight bytes count the packed quantized weights of the quantized layers
(int4 = half a byte per weight). Results are written as a section of the
markdown file given to ``--write`` (benchmarks/mixed.md). The in-context
table, re-ranking and refinement rows of earlier runs came from this tool at
commit 22f2575 (their findings are kept in the summary of benchmarks/mixed.md).

    python tools/bench_mixed.py --models mobilenetv2 --write benchmarks/mixed.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compiler.fidelity import compare_outputs, run_model  # noqa: E402
from passes import allocate as al  # noqa: E402
from passes import sensitivity as sn  # noqa: E402
from targets.onnx.cost import cost_model  # noqa: E402

FRACTIONS = (0.5, 0.55, 0.6, 0.7, 0.8, 0.9)
W_BITS = (4, 8)
A_BITS = (8,)
CONTEXT = (8, 8)  # the base plan in-context sensitivities are measured against
DEFAULT_METHOD = "ilp"  # compiler.mixed.AllocatorOptions' default, on the table of all calibration samples


def load_case(name: str, calib_samples: int):
    """(model path, calibration inputs, evaluation inputs, labels or None)."""
    if name == "fashion_cnn":
        from models import bundled

        evaluation, labels = bundled.test_data()
        calib = {key: value[:calib_samples] for key, value in bundled.calibration_data().items()}
        return bundled.model_path(), calib, evaluation, labels
    from models import photos, zoo

    preprocessing = zoo.PREPROCESSING.get(name, photos.IMAGENET)
    calib = {"input": photos.calibration_images(calib_samples, preprocessing)}
    evaluation = {"input": photos.evaluation_images(preprocessing)}
    return zoo.build(name), calib, evaluation, None


def top1_hits(reference: np.ndarray, outputs: np.ndarray) -> str:
    """'1' where the quantized model keeps float's top-1 class, per evaluation image (for :func:`discordant`)."""
    return "".join("1" if hit else "0" for hit in outputs.argmax(1) == reference.argmax(1))


def score(reference: np.ndarray, outputs: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    metrics = compare_outputs(reference, outputs)
    result = {key: metrics[key] for key in ("top1_agreement", "top5_agreement", "kl", "sqnr_db")}
    if labels is not None:
        result["accuracy"] = float(np.mean(outputs.argmax(1) == labels))
    return result


def ort_int4(model_path: Path, calib: dict[str, np.ndarray], work: Path) -> onnx.ModelProto:
    """onnxruntime's own int4-weight QDQ model (per-channel QInt4 weights, QUInt8 activations)."""
    from tools.ort_reference import ort_quantize

    return onnx.load(str(ort_quantize(model_path, calib, work / "ort_int4.onnx", weight_type="QInt4", opset=21)))


def quantized_weight_bytes(qdq: onnx.ModelProto) -> int:
    """Packed bytes of the integer weight initializers feeding DequantizeLinear (biases excluded)."""
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT8: 8,
            onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT2: 2, onnx.TensorProto.UINT2: 2}
    inits = {init.name: init for init in qdq.graph.initializer}
    total = 0
    for node in qdq.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        tensor = inits[node.input[0]]
        if tensor.data_type in bits and len(tensor.dims) >= 2:
            total += (int(np.prod(tensor.dims)) * bits[tensor.data_type] + 7) // 8
    return total


def _cached(path: Path, fresh: bool, timings: dict, key: str, compute) -> dict:
    """A sensitivity table from ``path`` when present (and not ``fresh``), else computed and stored."""
    if path.exists() and not fresh:
        stored = json.loads(path.read_text())
        timings[key] = stored["seconds"]
        return {layer: {tuple(json.loads(k)): v for k, v in table.items()} for layer, table in stored["table"].items()}
    start = time.perf_counter()
    table = compute()
    timings[key] = time.perf_counter() - start
    path.write_text(json.dumps({"seconds": timings[key], "table": {
        layer: {json.dumps(list(c)): v for c, v in t.items()} for layer, t in table.items()}}))
    return table


def _cached_samples(path: Path, fresh: bool, timings: dict, key: str, compute) -> sn.SampleSensitivity:
    """A per-sample sensitivity table (passes/sensitivity.measured_sample_sensitivity), cached like :func:`_cached`."""
    if path.exists() and not fresh:
        stored = json.loads(path.read_text())
        timings[key] = stored["seconds"]
        return {layer: {tuple(json.loads(k)): np.asarray(v) for k, v in table.items()}
                for layer, table in stored["table"].items()}
    start = time.perf_counter()
    table = compute()
    timings[key] = time.perf_counter() - start
    path.write_text(json.dumps({"seconds": timings[key], "table": {
        layer: {json.dumps(list(c)): v.tolist() for c, v in t.items()} for layer, t in table.items()}}))
    return table


def calibration_groups(name: str, count: int) -> np.ndarray:
    """Source label of each calibration sample: the photo of each crop (crops are round-robin over photos)."""
    if name == "fashion_cnn":
        return np.arange(count)  # independent training images
    from models import photos

    return np.arange(count) % len(photos.CALIBRATION_PHOTOS)


def calibration_folds(groups: np.ndarray, splits: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``splits`` random halvings of the sources, each giving two folds (rows to measure on, rows to score on)."""
    labels = np.unique(groups)
    rng = np.random.default_rng(seed)
    folds = []
    for _ in range(splits):
        first = np.isin(groups, rng.permutation(labels)[: len(labels) // 2])
        folds += [(np.flatnonzero(first), np.flatnonzero(~first)), (np.flatnonzero(~first), np.flatnonzero(first))]
    return folds


class Scorer:
    """Exports plans (cached by their choices) and scores them on the calibration or evaluation inputs."""

    def __init__(self, model, plan, ranges, inputs: dict[str, dict[str, np.ndarray]], output_name: str):
        self.model, self.plan, self.ranges = model, plan, ranges
        self.inputs, self.output_name = inputs, output_name
        self.reference = {key: run_model(model, data)[output_name] for key, data in inputs.items()}
        self._outputs: dict[tuple, np.ndarray] = {}

    def outputs(self, choices: dict, key: str) -> np.ndarray:
        from passes.insert_qdq import quantize_model

        cache_key = (key, tuple(sorted(choices.items(), key=lambda item: item[0])))
        if cache_key not in self._outputs:
            chosen = sn.plan_with_choices(self.plan, choices)
            qdq = quantize_model(self.model, chosen, sn.ranges_for_plan(self.model, chosen, self.ranges))
            self._outputs[cache_key] = run_model(qdq, self.inputs[key])[self.output_name]
        return self._outputs[cache_key]

    def per_sample(self, choices: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(softmax KL, top-1 agrees) per sample."""
        outputs, reference = self.outputs(choices, key), self.reference[key]
        kl = sn.sample_distances({"y": reference}, {"y": outputs})
        return kl, (outputs.argmax(1) == reference.argmax(1)).astype(float)


def allocators(args) -> dict:
    """Method label -> allocate(problem, budget, samples, groups): the ILP and greedy variants compared."""
    def ilp(problem, budget, samples, groups):
        return al.allocate(problem, budget)

    def cvar(problem, budget, samples, groups):
        scenarios = sn.bootstrap_tables(samples, args.replicates, groups=groups)
        return al.allocate(problem, budget, scenarios=[sn.monotone(table) for table in scenarios], tail=args.tail)

    def greedy(problem, budget, samples, groups):
        return al.greedy(problem, budget)

    return {"ilp": ilp, f"ilp cvar{args.tail:g}": cvar, "greedy": greedy}


def bench_model(name: str, args, work: Path) -> dict:
    from compiler.loader import load_model
    from passes.canonicalize import canonicalize
    from passes.select_layers import select_layers

    model_path, calib, evaluation, labels = load_case(name, args.calib_samples)
    float_model = canonicalize(load_model(model_path))
    model = sn.with_opset_for(float_model, [4])
    plan = select_layers(model)
    output_name = float_model.graph.output[0].name
    timings: dict = {}
    start = time.perf_counter()
    ranges = sn.activation_ranges(model, plan, calib, A_BITS)
    timings["ranges_s"] = time.perf_counter() - start
    choices = sn.candidate_choices(plan, W_BITS, A_BITS)
    samples = _cached_samples(work / f"{name}_samples{args.calib_samples}.json", args.fresh, timings,
                              "sample_sensitivity_s",
                              lambda: sn.measured_sample_sensitivity(model, plan, calib, choices, ranges=ranges,
                                                                     max_samples=None, workers=args.workers))
    count = len(next(iter(calib.values())))
    groups = calibration_groups(name, count)
    few = slice(0, args.sensitivity_samples)
    tables = {f"{args.sensitivity_samples} samples": (sn.sample_rows(samples, few), groups[few]),
              f"all {count} samples": (samples, groups)}

    def problem_for(table):
        return al.problem_from_model(model, plan, cost_model(), sensitivity=table, w_bits=W_BITS, a_bits=A_BITS)

    problems = {label: problem_for(sn.monotone(sn.mean_table(rows))) for label, (rows, _) in tables.items()}
    problem = problems[f"all {count} samples"]
    scorer = Scorer(model, plan, ranges, {"calib": calib, "eval": evaluation}, output_name)
    methods = allocators(args)
    noise = noise_report(samples, groups, few, args)

    # 1. calibration only: measure on half the calibration sources, score the plans on the other half
    cross = []
    folds = calibration_folds(groups, args.splits)
    for fraction in FRACTIONS[1:]:
        budget = {"size_fraction": fraction}
        scores: dict[str, dict[str, list[float]]] = {method: {"kl": [], "top1": []} for method in methods}
        for fit_rows, score_rows in folds:
            fit = sn.sample_rows(samples, fit_rows)
            fold_problem = problem_for(sn.monotone(sn.mean_table(fit)))
            for method, run in methods.items():
                kl, top1 = scorer.per_sample(run(fold_problem, budget, fit, groups[fit_rows]).choices, "calib")
                scores[method]["kl"].append(float(np.mean(kl[score_rows])))
                scores[method]["top1"].append(float(np.mean(top1[score_rows])))
        cross.append({"budget": fraction, **scores})
    print(json.dumps(cross), flush=True)

    def evaluate(allocation: al.Allocation, label: str, budget: float | None = None) -> dict:
        outputs = scorer.outputs(allocation.choices, "eval")
        kl_calib, top1_calib = scorer.per_sample(allocation.choices, "calib")
        row = {"method": label, "weight_bytes": int(allocation.totals["weight_bytes"]),
               "size_fraction": allocation.totals["size_fraction"], "objective": allocation.objective,
               "solve_s": allocation.solve_time_s, "calib_kl": float(np.mean(kl_calib)),
               "calib_top1": float(np.mean(top1_calib)),
               "choices": {layer: list(c) for layer, c in allocation.choices.items()},
               "top1_hits": top1_hits(scorer.reference["eval"], outputs),
               **score(scorer.reference["eval"], outputs, labels)}
        return {**row, "budget": budget} if budget is not None else row

    rows = [evaluate(al.uniform(problem, 8, 8), "uniform-w8a8"), evaluate(al.uniform(problem, 4, 8), "uniform-w4a8")]
    if args.cv_only:
        rows = []
    for fraction in FRACTIONS if not args.cv_only else ():
        budget = {"size_fraction": fraction}
        for label, (rows_table, table_groups) in tables.items():
            for method, run in methods.items():
                if "cvar" in method and label != f"all {count} samples":
                    continue  # the noise-aware ILP only on the table it would be the default for
                allocation = run(problems[label], budget, rows_table, table_groups)
                rows.append(evaluate(allocation, f"{method}, {label}", fraction))
                rows[-1]["totals_bootstrap"] = plan_spread(noise["replicates"], allocation.choices)
    if not args.cv_only:
        ort_model = ort_int4(model_path, calib, work)
        ort_outputs = run_model(ort_model, evaluation)[output_name]
        ort_bytes = quantized_weight_bytes(ort_model)
        rows.append({"method": "onnxruntime int4 weights", "weight_bytes": ort_bytes,
                     "size_fraction": ort_bytes / problem.int8_weight_bytes(),
                     **score(scorer.reference["eval"], ort_outputs, labels)})
    noise.pop("replicates")
    return {"model": name, "layers": len(plan.layers), "int8_weight_bytes": problem.int8_weight_bytes(),
            "eval_samples": int(scorer.reference["eval"].shape[0]), "calib_samples": count,
            "sensitivity_samples": args.sensitivity_samples, "calib_sources": int(len(np.unique(groups))),
            "replicates": args.replicates, "tail": args.tail, "timings": timings, "noise": noise,
            "eval_groups": evaluation_groups(name, int(scorer.reference["eval"].shape[0])),
            "cross_validation": cross, "rows": rows}


def noise_report(samples: sn.SampleSensitivity, groups: np.ndarray, few: slice, args) -> dict:
    """Bootstrap (by source photo) spread of the table entries, for the small and the full table."""
    replicates = {}
    report: dict = {}
    for label, rows in (("few", few), ("all", slice(None))):
        subset = sn.sample_rows(samples, rows)
        tables = sn.bootstrap_tables(subset, args.replicates, groups=groups[rows])
        replicates[label] = tables
        mean = sn.mean_table(subset)
        relative = [float(np.std([t[layer][(4, 8)] for t in tables]) / mean[layer][(4, 8)])
                    for layer in mean if (4, 8) in mean[layer] and mean[layer][(4, 8)] > 0]
        report[f"{label}_entry_rel_std_median"] = float(np.median(relative))
        report[f"{label}_entry_rel_std_p90"] = float(np.percentile(relative, 90))
    report["replicates"] = replicates["all"]
    return report


def plan_spread(replicates: list[sn.Sensitivity], choices: dict) -> list[float]:
    """A plan's total sensitivity on each bootstrap table (paired across plans: same resamples)."""
    return [float(sum(table[layer][choice] for layer, choice in choices.items())) for table in replicates]


def _method_label(row_method: str) -> tuple[str, str]:
    """("ilp", "all 128 samples") from "ilp, all 128 samples"."""
    method, _, table = row_method.partition(", ")
    return method, table


def default_label(result: dict) -> str:
    """The row label of compiler.mixed's default allocator in ``result``."""
    return f"{DEFAULT_METHOD}, all {result['calib_samples']} samples"


def previous_label(result: dict) -> str:
    return f"ilp, {result['sensitivity_samples']} samples"


def evaluation_groups(name: str, count: int) -> list[int] | None:
    """Source photo of each evaluation crop (None: independent samples)."""
    if name == "fashion_cnn":
        return None
    from models import photos

    return [photos.EVALUATION_PHOTOS.index(label.split("/")[0]) for label in photos.evaluation_image_names()][:count]


def discordant(first: dict, second: dict, groups: list[int] | None, draws: int = 20000) -> str:
    """Images only ``first`` / only ``second`` keeps at float's top-1, and a two-sided sign-flip test.

    The test flips the sign of each source photo's net difference at random
    (crops of one photo are not independent; McNemar's test would treat them so).
    """
    only_first, only_second, net = _net_by_source(first, second, groups)
    if only_first + only_second == 0:
        return "0 / 0"
    return f"{only_first} / {only_second} (p {sign_flip_p(net, draws):.2f})"


def pooled_discordant(points: list[tuple[dict, dict, list[int] | None]], draws: int = 20000) -> str:
    """:func:`discordant` over several points scored on one evaluation set.

    Each source's net difference is summed over the points before its sign is
    flipped: the points reuse the same images, so they are not independent
    either. Points where the two plans keep the same images add nothing.
    """
    only_first = only_second = differing = 0
    total = None
    for first, second, groups in points:
        a_only, b_only, net = _net_by_source(first, second, groups)
        only_first, only_second = only_first + a_only, only_second + b_only
        differing += bool(a_only + b_only)
        total = net if total is None else total + net
    if total is None or only_first + only_second == 0:
        return f"0 / 0 over {len(points)} point{'s' if len(points) != 1 else ''}"
    return (f"{only_first} / {only_second} (p {sign_flip_p(total, draws):.2f}; "
            f"{differing} of {len(points)} points differ)")


def pooled_by_evaluation_set(points: list[tuple[str, dict, dict]]) -> list[str]:
    """One :func:`pooled_discordant` per evaluation set, of (model, first, second) points.

    The photo models share the evaluation photos, so their points pool
    together; every other model has its own test images.
    """
    sets: dict[str, list] = {}
    for model, first, second in points:
        groups = evaluation_groups(model, len(first["top1_hits"]))
        sets.setdefault("photos" if groups is not None else model, []).append((model, first, second, groups))
    lines = []
    for key, members in sets.items():
        models = ", ".join(dict.fromkeys(model for model, *_ in members))
        where = "the evaluation photos" if key == "photos" else "its test images"
        lines.append(f"- {models} on {where}: "
                     + pooled_discordant([(first, second, groups) for _, first, second, groups in members]))
    return lines


def _net_by_source(first: dict, second: dict, groups: list[int] | None) -> tuple[int, int, np.ndarray]:
    """(images only first keeps, only second keeps, net difference per source photo or image)."""
    a, b = (np.frombuffer(row["top1_hits"].encode(), np.uint8) == ord("1") for row in (first, second))
    labels = np.arange(len(a)) if groups is None else np.asarray(groups)
    net = np.bincount(labels, weights=a.astype(float) - b.astype(float), minlength=int(labels.max()) + 1)
    return int(np.sum(a & ~b)), int(np.sum(~a & b)), net


def sign_flip_p(net: np.ndarray, draws: int = 20000) -> float:
    """Two-sided p of the summed ``net`` differences under random sign flips of each source."""
    net = net[net != 0]
    if not len(net):
        return 1.0
    signs = np.random.default_rng(0).choice([-1.0, 1.0], (draws, len(net)))
    return float(np.mean(np.abs(signs @ net) >= abs(net.sum()) - 1e-9))


def comparison(result: dict) -> list[str]:
    """Top-1 agreement on the evaluation photos per budget; the default next to greedy on the same table."""
    rows = [row for row in result["rows"] if "budget" in row]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    uniform4 = next(row for row in result["rows"] if row["method"] == "uniform-w4a8")
    default, previous = default_label(result), previous_label(result)
    lines = [f"Top-1 agreement with float on the evaluation photos by budget. *default* = `{default}` "
             f"(compiler.mixed's default); *previous* = `{previous}` (the default before). Each is compared "
             "with greedy on the same table; uniform w4a8 is the only uniform plan within these budgets.", "",
             "| budget | " + " | ".join(methods) + " | default >= greedy (same table) | default >= best greedy "
             "| default >= uniform w4a8 | previous >= greedy (same table) | default vs greedy: images only "
             "one of them keeps (p: sign-flip test over source photos) | on the calibration samples: default "
             "top-1 / greedy top-1 |",
             "|---|" + "---|" * (len(methods) + 6)]
    for fraction in sorted({row["budget"] for row in rows}):
        at = {row["method"]: row for row in rows if row["budget"] == fraction}
        cells = [f"{at[m]['top1_agreement']:.3f}" if m in at else "-" for m in methods]

        def versus(label: str, other: float, at: dict = at) -> str:
            value = at[label]["top1_agreement"]
            return "yes" if value >= other else f"**no** ({value:.3f} < {other:.3f})"

        best_greedy = max(row["top1_agreement"] for method, row in at.items() if method.startswith("greedy"))
        cells += [versus(default, at[default.replace(DEFAULT_METHOD, "greedy", 1)]["top1_agreement"]),
                  versus(default, best_greedy), versus(default, uniform4["top1_agreement"]),
                  versus(previous, at[previous.replace("ilp", "greedy", 1)]["top1_agreement"]),
                  discordant(at[default], at[default.replace(DEFAULT_METHOD, "greedy", 1)], result.get("eval_groups")),
                  f"{at[default]['calib_top1']:.3f} / {at[default.replace(DEFAULT_METHOD, 'greedy', 1)]['calib_top1']:.3f}"]
        lines.append(f"| {fraction:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "All budgets pooled, default vs greedy (each source's differences summed over the budgets): "
              + pooled_discordant(default_vs_greedy(result)) + "."]
    return lines


def default_vs_greedy(result: dict) -> list[tuple[dict, dict, list[int] | None]]:
    """(default's row, greedy's row on the same table, evaluation groups) at each budget."""
    default = default_label(result)
    greedy = default.replace(DEFAULT_METHOD, "greedy", 1)
    rows = {(row["method"], row["budget"]): row for row in result["rows"] if "budget" in row}
    return [(rows[(default, budget)], rows[(greedy, budget)], result.get("eval_groups"))
            for method, budget in rows if method == default and (greedy, budget) in rows]


def cross_validation(result: dict) -> list[str]:
    """Calibration-only check: plans chosen on half the calibration sources, scored on the other half."""
    methods = [key for key in result["cross_validation"][0] if key != "budget"]
    folds = len(result["cross_validation"][0][methods[0]]["top1"])
    lines = [f"Calibration only (no evaluation photo involved): the {result['calib_sources']} calibration sources "
             f"split at random into halves ({folds // 2} splits, {folds} folds); sensitivities measured on one "
             "half, each allocator's plan scored against float on the other. Mean over the folds of top-1 "
             "agreement and KL, and the share of folds where the ILP keeps at least greedy's top-1 agreement.", "",
             "| budget | " + " | ".join(f"{m} top-1 | {m} KL" for m in methods)
             + " | ilp >= greedy (mean top-1) | folds ilp >= greedy |",
             "|---|" + "---|" * (2 * len(methods) + 2)]
    for point in result["cross_validation"]:
        cells = [f"{np.mean(point[m]['top1']):.3f} | {np.mean(point[m]['kl']):.4f}" for m in methods]
        ilp, greedy = np.asarray(point["ilp"]["top1"]), np.asarray(point["greedy"]["top1"])
        cells.append("yes" if ilp.mean() >= greedy.mean() - 1e-12 else f"**no** ({ilp.mean():.3f} < {greedy.mean():.3f})")
        cells.append(f"{np.mean(ilp >= greedy - 1e-12):.2f}")
        lines.append(f"| {point['budget']:.2f} | " + " | ".join(cells) + " |")
    return lines


def bootstrap_lines(result: dict) -> list[str]:
    """Sampling noise: of the table entries, and of ILP-minus-greedy plan totals."""
    noise = result["noise"]
    lines = [f"Sampling noise (bootstrap over the calibration sources, {result['replicates']} resamples): relative "
             f"standard deviation of a layer's w4a8 sensitivity, median / 90th percentile over layers: "
             f"{noise['few_entry_rel_std_median']:.2f} / {noise['few_entry_rel_std_p90']:.2f} with "
             f"{result['sensitivity_samples']} samples, {noise['all_entry_rel_std_median']:.2f} / "
             f"{noise['all_entry_rel_std_p90']:.2f} with all {result['calib_samples']}.", "",
             "Plan totals on the resampled full tables (sum of the layers' sensitivities): ILP minus greedy, "
             "mean +- standard deviation, and the share of resamples where the ILP plan's total is not larger.", "",
             "| budget | table | ILP total - greedy total | share ILP <= greedy |", "|---|---|---|---|"]
    rows = [row for row in result["rows"] if "totals_bootstrap" in row]
    for fraction in sorted({row["budget"] for row in rows}):
        for table in dict.fromkeys(_method_label(row["method"])[1] for row in rows):
            at = {_method_label(row["method"])[0]: row for row in rows
                  if row["budget"] == fraction and _method_label(row["method"])[1] == table}
            if "ilp" not in at or "greedy" not in at:
                continue
            diff = np.asarray(at["ilp"]["totals_bootstrap"]) - np.asarray(at["greedy"]["totals_bootstrap"])
            lines.append(f"| {fraction:.2f} | {table} | {diff.mean():+.4f} +- {diff.std():.4f} | "
                         f"{np.mean(diff <= 1e-12):.2f} |")
    return lines


def markdown(results: list[dict], command: str) -> str:
    lines = ["## Mixed precision: fidelity vs weight bytes", "",
             f"{command}. Fidelity against the float model on the evaluation set (top-1/top-5 agreement, "
             "mean softmax KL, output SQNR) and, for reference, on the calibration samples themselves (*calib*). "
             "Weight bytes: packed quantized weights (int4 = 0.5 byte). Sensitivities: single-layer (that layer "
             "quantized alone, KL of the softmax outputs), measured per calibration sample, averaged over the "
             "first N samples (*N samples*) or all (*all*). *ilp*: the ILP optimum of the summed sensitivities "
             "under `size=<fraction>` of the int8 weight bytes; *ilp cvarT*: the ILP minimising the mean of the "
             "worst T fraction of the plan's totals over bootstrap resamples (by source photo) of the table; "
             "*greedy*: the baseline on the same table. Activation ranges fitted on all calibration samples "
             "(also in the calibration-only comparison); "
             "choices w4a8 / w8a8 per weighted layer; nearest rounding, no transforms. The evaluation photos are "
             "disjoint from the calibration photos.", ""]
    for result in results:
        lines += [f"### {result['model']}", "",
                  f"{result['layers']} quantized layers, int8 weight bytes {result['int8_weight_bytes']}, "
                  f"{result['eval_samples']} evaluation samples, {result['calib_samples']} calibration samples "
                  f"from {result['calib_sources']} sources. Times (s): "
                  + ", ".join(f"{key} {value:.1f}" for key, value in result["timings"].items()) + ".", ""]
        lines += bootstrap_lines(result) + [""] + cross_validation(result) + [""] + comparison(result) + [""]
        has_accuracy = any("accuracy" in row for row in result["rows"])
        header = ["plan", "budget", "weight bytes", "x int8", "calib top-1", "calib KL", "top-1 agr.", "top-5 agr.",
                  "KL", "SQNR dB"]
        if has_accuracy:
            header.append("accuracy")
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in result["rows"]:
            cells = [row["method"], f"{row['budget']:.2f}" if "budget" in row else "-", str(row["weight_bytes"]),
                     f"{row['size_fraction']:.3f}",
                     f"{row['calib_top1']:.3f}" if "calib_top1" in row else "-",
                     f"{row['calib_kl']:.4f}" if "calib_kl" in row else "-",
                     f"{row['top1_agreement']:.3f}", f"{row['top5_agreement']:.3f}",
                     f"{row['kl']:.4f}", f"{row['sqnr_db']:.2f}"]
            if has_accuracy:
                cells.append(f"{row['accuracy']:.4f}" if "accuracy" in row else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    photo_models = [result for result in results if result.get("eval_groups") is not None]
    if len(photo_models) > 1:
        lines += ["All budgets of " + ", ".join(result["model"] for result in photo_models) + " pooled on the "
                  "evaluation photos they share, default vs greedy: "
                  + pooled_discordant([point for result in photo_models for point in default_vs_greedy(result)])
                  + ".", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fashion_cnn,mobilenetv2,efficientnet_lite0")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--sensitivity-samples", type=int, default=32,
                        help="size of the small table (the first N samples): the allocator's previous default")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--replicates", type=int, default=64, help="bootstrap resamples of the calibration sources")
    parser.add_argument("--tail", type=float, default=0.2, help="CVaR tail of the noise-aware ILP")
    parser.add_argument("--splits", type=int, default=3,
                        help="random halvings of the calibration sources for the calibration-only comparison")
    parser.add_argument("--cv-only", action="store_true",
                        help="only the calibration-only cross-validation (no evaluation photo is run)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeq_bench_mixed"))
    parser.add_argument("--fresh", action="store_true", help="re-measure sensitivities even if cached")
    parser.add_argument("--write", type=Path)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--from-json", type=Path, nargs="+", help="only re-render results saved with --json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for path in args.from_json or []:
        results += json.loads(path.read_text())
    for name in args.models.split(",") if not args.from_json else []:
        print(f"== {name}", flush=True)
        result = bench_model(name, args, args.work)
        result["command"] = "python tools/bench_mixed.py " + " ".join(sys.argv[1:])
        results.append(result)
        if args.json:  # after every model, so a long run leaves what it finished
            args.json.write_text(json.dumps(results, indent=1, default=str))
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}, default=str), flush=True)
        for row in result["rows"]:
            print(row, flush=True)
    if args.cv_only:
        return
    command = "`python tools/bench_mixed.py " + " ".join(sys.argv[1:]) + "`"
    if args.from_json:  # say how the results were measured, then how rendered
        measured = dict.fromkeys(f"`{result['command']}`" for result in results if "command" in result)
        command = ", ".join(measured) + f" (rendered with {command})" if measured else command
    text = markdown(results, command)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_ilp import write_section

        write_section(args.write, text)
    print(text)


if __name__ == "__main__":
    main()
