"""report.md: what was quantized, how, and how faithful the result is, for a person to read."""

from __future__ import annotations

import math
from pathlib import Path

from compiler.atomic import atomic_write_text
from compiler.budget import format_metric
from compiler.plan import QuantPlan


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return str(value)


def _range(plan: QuantPlan, name: str | None) -> str:
    tq = plan.tensors.get(name) if name else None
    if tq is None or tq.range_min is None:
        return "-"
    return f"[{_fmt(tq.range_min)}, {_fmt(tq.range_max)}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _weight_granularity(plan: QuantPlan) -> str:
    blocks = sorted({tq.block_size for tq in plan.tensors.values() if tq.role == "weight" and tq.block_wise})
    if not blocks:
        return "weights per channel (symmetric)"
    sizes = "/".join(str(size) for size in blocks)
    return (f"sub-8-bit MatMul/Gemm weights in blocks of {sizes} along the reduction axis with a zero point "
            f"per block ({plan.recipe.get('weight_block_source', 'plan')}), the other weights per channel (symmetric)")


def render_report(plan: QuantPlan) -> str:
    """The markdown text of report.md."""
    lines = [f"# edgeq report: {Path(plan.model).name or 'model'}", ""]
    lines += [f"- target: `{plan.target}`",
              f"- default bits: w{plan.w_bits}a{plan.a_bits}, activations "
              f"{'int' if plan.activation_signed else 'uint'}{plan.a_bits} per tensor, {_weight_granularity(plan)}",
              f"- calibration: {plan.recipe.get('calibrate_method', '-')}"]
    if plan.recipe.get("passes"):
        lines.append(f"- recipe: {plan.recipe.get('name', '-')} ({', '.join(plan.recipe['passes'])})")
    totals = plan.totals
    lines.append(f"- weights: {totals.get('weight_bytes', 0):,} bytes packed "
                 f"(int8 everywhere would be {totals.get('int8_weight_bytes', 0):,})"
                 + (f" + {totals['weight_scale_bytes']:,} bytes of scales and zero points"
                    if "weight_scale_bytes" in totals else ""))
    if plan.budget:
        lines.append("- budget: " + ", ".join(f"{key}={format_metric(key, value)}" for key, value in plan.budget.items()))
    lines.append("")

    fidelity = plan.fidelity
    if fidelity:
        lines += ["## Fidelity", "",
                  f"Measured on {fidelity.get('samples', '?')} samples of {fidelity.get('data', '?')}.", ""]
        if "float_accuracy" in fidelity:
            lines += [f"- accuracy: float {fidelity['float_accuracy']:.4f}, quantized "
                      f"{fidelity['quantized_accuracy']:.4f} "
                      f"({100 * (fidelity['quantized_accuracy'] - fidelity['float_accuracy']):+.2f} points)", ""]
        metric_names = sorted({key for metrics in fidelity.get("outputs", {}).values() for key in metrics})
        rows = [[f"`{name}`"] + [_fmt(metrics.get(key)) for key in metric_names]
                for name, metrics in fidelity.get("outputs", {}).items()]
        lines += _table(["output"] + metric_names, rows) + [""]

    sqnr = fidelity.get("tensor_sqnr_db", {}) if fidelity else {}
    lines += ["## Layers", "",
              f"SQNR is of the layer's quantized output against float, accumulated over "
              f"{fidelity.get('tensor_sqnr_samples', 'the')} calibration samples (- where the output stays float).", ""]
    rows = []
    for layer in plan.layers.values():
        tensor_sqnr = sqnr.get(layer.info.get("output", layer.outputs[0]))
        weight_quant = plan.tensors.get(layer.weight) if layer.weight else None
        rows.append([f"`{layer.node}`", layer.op_type, _fmt(layer.w_bits), str(layer.a_bits),
                     weight_quant.granularity if weight_quant else "-",
                     _range(plan, layer.weight), _range(plan, layer.inputs[0] if layer.inputs else None),
                     f"{layer.weight_bytes:,}", _fmt(tensor_sqnr, 3),
                     layer.info.get("fused_activation", "")])
    lines += _table(["layer", "op", "w_bits", "a_bits", "weight scales", "weight range", "input range", "weight bytes",
                     "SQNR dB", "fused"], rows) + [""]

    if sqnr:
        lines += ["## Quantized tensors", ""]
        rows = [[f"`{name}`", plan.tensors[name].dtype, _range(plan, name),
                 _fmt(plan.tensors[name].scale[0]), str(plan.tensors[name].zero_point[0]), _fmt(value, 3)]
                for name, value in sqnr.items() if name in plan.tensors]
        lines += _table(["tensor", "type", "range", "scale", "zero point", "SQNR dB"], rows) + [""]

    kernels = plan.totals.get("onnxruntime_kernels")
    if kernels:
        used = ", ".join(f"{count} {op}" for op, count in kernels["integer"].items()) or "none"
        fallback = ", ".join(f"{count} {op}" for op, count in kernels["float"].items()) or "none"
        lines += ["## onnxruntime kernels", "",
                  f"In onnxruntime's optimized graph of model.qdq.onnx: integer kernels {used}; "
                  f"float compute ops {fallback}.", ""]

    lines += ["## Ops left in float", ""]
    if plan.float_nodes:
        lines += _table(["node", "op", "why"],
                        [[f"`{entry['node']}`", entry["op_type"], entry["reason"]] for entry in plan.float_nodes])
    else:
        lines.append("None: every compute op is quantized.")
    lines.append("")
    for title, text in plan.totals.get("report_sections", {}).items():
        lines += [f"## {title}", "", text, ""]
    return "\n".join(lines)


def write_report(path: str | Path, plan: QuantPlan) -> None:
    atomic_write_text(path, render_report(plan))
