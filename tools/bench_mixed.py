"""Mixed precision: fidelity against weight bytes for ILP, greedy, uniform and onnxruntime int4 plans.

For each model (the bundled Fashion-MNIST CNN, MobileNetV2, EfficientNet-Lite0):

1. canonicalize, select layers (target ``onnx``), fit 8-bit activation ranges
   (MSE observers) on the calibration photos;
2. measure every layer's sensitivity at w4a8 and w8a8 (passes/sensitivity.py,
   KL of the softmax outputs on the first ``--sensitivity-samples`` calibration
   samples) two ways -- *single-layer* (that layer quantized alone) and
   *in-context* (that layer changed inside the all-w8a8 plan) -- and the
   second-moment proxy, and their Spearman rank correlations;
3. at weight budgets of 0.5 ... 0.9 x the int8 weight bytes, per sensitivity
   table: the ILP optimum (passes/allocate.py), the ILP's ``--rerank-k`` best
   plans re-ranked by the measured KL of each exported plan on the held-out
   calibration samples (the rest of ``--calib-samples``), that choice refined
   by ``--refine`` trust-region ILP steps on sensitivities re-measured around
   the plan (kept only when the held-out KL drops), and the greedy baseline;
   plus the ILP on the proxy, uniform w8a8 and w4a8;
4. export each plan with passes/insert_qdq (nearest rounding, per-channel
   symmetric weights, uint8 activations), run it in onnxruntime on the
   evaluation set and compare with the float model (top-1 agreement, top-5
   agreement, KL, and accuracy where labels exist);
5. onnxruntime.quantization.quantize_static with QInt4 per-channel weights and
   QUInt8 activations (QDQ, MinMax calibration on the same photos), scored the same way.

Weight bytes count the packed quantized weights of the quantized layers
(int4 = half a byte per weight). Results are written as a section of the
markdown file given to ``--write`` (benchmarks/mixed.md).

    python tools/bench_mixed.py --models mobilenetv2 --write benchmarks/mixed.md
"""

from __future__ import annotations

import argparse
import copy
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
DEFAULT_METHOD = "ilp, single-layer"  # compiler.mixed.AllocatorOptions' defaults


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


def bench_model(name: str, args, work: Path) -> dict:
    from compiler.loader import load_model
    from passes.canonicalize import canonicalize
    from passes.insert_qdq import quantize_model
    from passes.select_layers import select_layers

    model_path, calib, evaluation, labels = load_case(name, args.calib_samples)
    float_model = canonicalize(load_model(model_path))
    model = sn.with_opset_for(float_model, [4])
    plan = select_layers(model)
    reference = run_model(float_model, evaluation)
    output_name = float_model.graph.output[0].name
    reference = reference[output_name]
    timings = {}

    start = time.perf_counter()
    ranges = sn.activation_ranges(model, plan, calib, A_BITS)
    timings["ranges_s"] = time.perf_counter() - start
    choices = sn.candidate_choices(plan, W_BITS, A_BITS)
    proxy = _cached(work / f"{name}_proxy.json", args.fresh, timings, "proxy_sensitivity_s",
                    lambda: sn.proxy_sensitivity(model, plan, calib, choices, ranges=ranges,
                                                 max_samples=args.sensitivity_samples))
    measured = _cached(work / f"{name}_measured.json", args.fresh, timings, "measured_sensitivity_s",
                       lambda: sn.measured_sensitivity(model, plan, calib, choices, ranges=ranges,
                                                       max_samples=args.sensitivity_samples, workers=args.workers))
    in_context = _cached(work / f"{name}_context.json", args.fresh, timings, "context_sensitivity_s",
                         lambda: sn.measured_sensitivity(model, plan, calib, choices, ranges=ranges,
                                                         max_samples=args.sensitivity_samples, workers=args.workers,
                                                         context=CONTEXT))
    measured, proxy = sn.monotone(measured), sn.monotone(proxy)  # no-op on fresh tables; repairs old caches
    weighted = [n for n, layer in plan.layers.items() if layer.w_bits]
    agreement = {
        "all entries": sn.spearman(measured, proxy),
        "layers at w4a8": sn.spearman({n: measured[n] for n in weighted}, {n: proxy[n] for n in weighted}, (4, 8)),
        "layers at w8a8": sn.spearman({n: measured[n] for n in weighted}, {n: proxy[n] for n in weighted}, (8, 8)),
        "single-layer vs in-context, layers at w4a8": sn.spearman(
            {n: measured[n] for n in weighted}, {n: in_context[n] for n in weighted}, (4, 8)),
    }

    def problem_for(table):
        return al.problem_from_model(model, plan, cost_model(), sensitivity=table, w_bits=W_BITS, a_bits=A_BITS)

    problem, proxy_problem, context_problem = problem_for(measured), problem_for(proxy), problem_for(in_context)
    # Re-ranking measures whole candidate plans on calibration samples the sensitivities did not use.
    held_out = {key: value[args.sensitivity_samples:] for key, value in calib.items()}
    distance = sn.PlanDistance(model, plan, held_out, ranges)
    sensitivity_data = {key: value[:args.sensitivity_samples] for key, value in calib.items()}

    def around(center: dict) -> dict:
        start = time.perf_counter()
        table = sn.measured_sensitivity(model, plan, sensitivity_data, choices, ranges=ranges,
                                        max_samples=args.sensitivity_samples, workers=args.workers, context=center)
        timings["refine_tables"] = timings.get("refine_tables", 0) + 1
        timings["refine_tables_s"] = timings.get("refine_tables_s", 0.0) + time.perf_counter() - start
        return table

    def evaluate(allocation: al.Allocation, label: str | None = None) -> dict:
        chosen = copy.deepcopy(plan)
        al.apply_allocation(chosen, problem, allocation)
        qdq = quantize_model(model, chosen, sn.ranges_for_plan(model, chosen, ranges))
        outputs = run_model(qdq, evaluation)[output_name]
        row = {"method": label or allocation.method, "weight_bytes": int(allocation.totals["weight_bytes"]),
               "size_fraction": allocation.totals["size_fraction"], "objective": allocation.objective,
               "solve_s": allocation.solve_time_s, **score(reference, outputs, labels)}
        if allocation.candidates:
            row["candidates"] = allocation.candidates
        return row

    rows = [evaluate(al.uniform(problem, 8, 8)), evaluate(al.uniform(problem, 4, 8))]
    for fraction in FRACTIONS:
        budget = {"size_fraction": fraction}
        tables = {"single-layer": problem, "in-context": context_problem}
        for label, table_problem in ((label, tables[label]) for label in args.tables.split(",")):
            rows.append({**evaluate(al.allocate(table_problem, budget), f"ilp, {label}"), "budget": fraction})
            reranked = al.allocate_reranked(table_problem, budget, distance, k=args.rerank_k)
            rows.append({**evaluate(reranked, f"ilp top-{args.rerank_k} re-ranked, {label}"), "budget": fraction})
            if args.refine and len(reranked.candidates) > 1:  # else the budget leaves one plan only
                refined = al.allocate_refined(table_problem, budget, around, distance, steps=args.refine,
                                              start=reranked)
                rows.append({**evaluate(refined, f"ilp top-{args.rerank_k} re-ranked + refined, {label}"),
                             "budget": fraction})
            rows.append({**evaluate(al.greedy(table_problem, budget), f"greedy, {label}"), "budget": fraction})
        rows.append({**evaluate(al.allocate(proxy_problem, budget), "ilp, proxy"), "budget": fraction})
    ort_model = ort_int4(model_path, calib, work)
    ort_outputs = run_model(ort_model, evaluation)[output_name]
    ort_bytes = quantized_weight_bytes(ort_model)
    rows.append({"method": "onnxruntime int4 weights", "weight_bytes": ort_bytes,
                 "size_fraction": ort_bytes / problem.int8_weight_bytes(), **score(reference, ort_outputs, labels)})
    return {"model": name, "layers": len(plan.layers), "int8_weight_bytes": problem.int8_weight_bytes(),
            "eval_samples": int(reference.shape[0]), "calib_samples": args.calib_samples,
            "sensitivity_samples": args.sensitivity_samples, "rerank_k": args.rerank_k,
            "rerank_samples": int(len(next(iter(held_out.values())))), "spearman": agreement, "timings": timings,
            "rows": rows}


def _picked_rank(row: dict) -> str:
    """Which measured candidate was taken: ``#r`` = ILP rank r, ``s`` = refinement step s."""
    chosen = [f"#{c['rank'] + 1}" if "rank" in c else f"s{c['step']}"
              for c in row.get("candidates", []) if c["chosen"]]
    return f" ({chosen[0]})" if chosen else ""


def comparison(result: dict) -> list[str]:
    """Top-1 agreement per budget: each allocator next to greedy, and where the default falls short."""
    rows = [row for row in result["rows"] if "budget" in row]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    uniform4 = next(row for row in result["rows"] if row["method"] == "uniform-w4a8")
    default_method = DEFAULT_METHOD
    lines = ["Top-1 agreement by budget (in brackets: the measured candidate taken, #r = ILP rank r, "
             "sN = refinement step N). "
             f"*default* = `{default_method}` (compiler.mixed's default); it is compared with greedy on the same "
             "table, with the best greedy plan of either table, and with uniform w4a8 (the only uniform plan "
             "within these budgets).", "",
             "| budget | " + " | ".join(methods) + " | default >= greedy (same table) | default >= best greedy "
             "| default >= uniform w4a8 |",
             "|---|" + "---|" * (len(methods) + 3)]
    for fraction in sorted({row["budget"] for row in rows}):
        at = {row["method"]: row for row in rows if row["budget"] == fraction}
        cells = [f"{at[m]['top1_agreement']:.3f}{_picked_rank(at[m])}" if m in at else "-" for m in methods]
        default = at[default_method]["top1_agreement"]
        same = at[default_method.replace("ilp", "greedy")]["top1_agreement"]
        greedy = max(row["top1_agreement"] for method, row in at.items() if method.startswith("greedy"))
        for other in (same, greedy):
            cells.append("yes" if default >= other else f"**no** ({default:.3f} < {other:.3f})")
        cells.append("yes" if default >= uniform4["top1_agreement"] else "**no**")
        lines.append(f"| {fraction:.2f} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: list[dict], command: str) -> str:
    lines = ["## Mixed precision: fidelity vs weight bytes", "",
             f"`{command}`. Fidelity against the float model on the evaluation set (top-1/top-5 agreement, "
             "mean softmax KL, output SQNR). Weight bytes: packed quantized weights (int4 = 0.5 byte). "
             "ILP and greedy minimise the sum of measured sensitivities (KL; *single-layer*: that layer "
             "quantized alone, *in-context*: that layer changed inside the all-w8a8 plan) under "
             "`size=<fraction>` of the int8 weight bytes; *re-ranked*: of the ILP's 8 best plans the one with "
             "the lowest KL on the held-out calibration samples; *refined*: then trust-region ILP steps on "
             "sensitivities re-measured around the current plan, kept when the held-out KL drops; "
             "*ilp, proxy* solves the ILP on the second-moment proxy; choices w4a8 / w8a8 per weighted layer "
             "(16-bit activations are free under a size budget and not offered); nearest rounding, "
             "no transforms. The evaluation photos are disjoint from the calibration photos.", ""]
    for result in results:
        lines += [f"### {result['model']}", "",
                  f"{result['layers']} quantized layers, int8 weight bytes {result['int8_weight_bytes']}, "
                  f"{result['eval_samples']} evaluation samples, {result['calib_samples']} calibration samples "
                  f"({result['sensitivity_samples']} for sensitivity, the rest held out for re-ranking). Times (s): "
                  + ", ".join(f"{key} {value:.1f}" for key, value in result["timings"].items()) + ".", "",
                  "Spearman rank correlation, measured vs second-moment proxy: "
                  + ", ".join(f"{key} {value:.3f}" for key, value in result["spearman"].items()) + ".", ""]
        lines += comparison(result) + [""]
        has_accuracy = any("accuracy" in row for row in result["rows"])
        header = ["plan", "budget", "weight bytes", "x int8", "top-1 agr.", "top-5 agr.", "KL", "SQNR dB"]
        if has_accuracy:
            header.append("accuracy")
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in result["rows"]:
            cells = [row["method"], f"{row['budget']:.2f}" if "budget" in row else "-", str(row["weight_bytes"]),
                     f"{row['size_fraction']:.3f}", f"{row['top1_agreement']:.3f}", f"{row['top5_agreement']:.3f}",
                     f"{row['kl']:.4f}", f"{row['sqnr_db']:.2f}"]
            if has_accuracy:
                cells.append(f"{row['accuracy']:.4f}" if "accuracy" in row else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fashion_cnn,mobilenetv2,efficientnet_lite0")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--sensitivity-samples", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rerank-k", type=int, default=8, help="ILP plans re-ranked by measured fidelity")
    parser.add_argument("--refine", type=int, default=2, help="trust-region refinement steps after re-ranking")
    parser.add_argument("--tables", default="single-layer,in-context",
                        help="sensitivity tables the ILP / re-ranked / refined / greedy rows are run on")
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
        results.append(result)
        if args.json:  # after every model, so a long run leaves what it finished
            args.json.write_text(json.dumps(results, indent=1, default=str))
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}, default=str), flush=True)
        for row in result["rows"]:
            print(row, flush=True)
    command = "python tools/bench_mixed.py " + " ".join(sys.argv[1:])
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
