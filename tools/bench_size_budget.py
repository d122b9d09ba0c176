"""`edgeq compile --target onnx --budget size=F` end to end, with each sensitivity mode.

What a user gets from the whole CLI (default recipe: GPTQ below 8 bits, bias
correction; the onnx target's candidates w2a8 / w4a8 / w8a8, 2-bit weights
stored as INT2 where onnxruntime runs it) on MobileNetV2 and EfficientNet-Lite0
(and the bundled Fashion-MNIST CNN, whose 5000 test images can separate close plans):
for each size fraction and each ``--sensitivity`` mode, one compile on the
first ``--calib-samples`` calibration crops, then the exported QDQ model
against the float model in onnxruntime on the evaluation photos (disjoint
from the calibration photos): top-1 / top-5 agreement and softmax KL; also
the compile's own fidelity on the calibration crops (plan.json) and the
compile time. ``--solvers ilp,greedy`` also runs the greedy baseline
(``--solver greedy``: the same measured table, the same recipe and export) at
each point, and ``--uniform`` a uniform w4a8 compile (``--bits w4a8``, about
half the int8 bytes), so the ILP is compared with both through everything a
user runs; the comparison table gives the images only one of the two plans
keeps at float's top-1 and a sign-flip test over the evaluation photos.
Plans and models stay under ``--work`` (``--reuse`` keeps the rows of
compiles already there).

    python tools/bench_size_budget.py --write benchmarks/size_budget.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler.fidelity import classifier_agreement, run_model  # noqa: E402
from tools.bench_mixed import (  # noqa: E402
    discordant,
    evaluation_groups,
    load_case,
    pooled_by_evaluation_set,
    top1_hits,
)

TITLE = "# Size budgets through the CLI"
METRICS = ("top1_agreement", "top5_agreement", "kl")


def only_output(model: onnx.ModelProto | str | Path, data: dict[str, np.ndarray]) -> np.ndarray:
    loaded = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    return next(iter(run_model(loaded, data).values()))


def compile_once(model_path: Path, calib_dir: Path, out: Path, options: list[str]) -> float:
    """Run the CLI with ``options``; returns its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compiler.cli", "compile", str(model_path), "--calib", str(calib_dir),
                    "--target", "onnx", *options, "-o", str(out), "-q"], cwd=ROOT, check=True)
    return time.perf_counter() - started


def run_point(name: str, model_path: Path, calib_dir: Path, out: Path, options: list[str], row: dict,
              reference: np.ndarray, evaluation: dict[str, np.ndarray], reuse: bool) -> dict:
    """One compile (or its saved row with ``reuse``), scored on the evaluation photos."""
    saved = out / "bench_row.json"
    if reuse and saved.exists():
        stored = json.loads(saved.read_text())
        if "top1_hits" not in stored:  # rows saved before the comparison existed
            stored["top1_hits"] = top1_hits(reference, only_output(out / "model.qdq.onnx", evaluation))
            saved.write_text(json.dumps(stored))
        return {"solver": "ilp", **stored}
    seconds = compile_once(model_path, calib_dir, out, options)
    plan = json.loads((out / "plan.json").read_text())
    on_calib = next(iter(plan["fidelity"]["outputs"].values()))
    weighted = [layer["w_bits"] for layer in plan["layers"] if layer.get("w_bits")]
    outputs = only_output(out / "model.qdq.onnx", evaluation)
    allocation = plan["totals"].get("allocation", {}).get("totals")
    row = {"model": name, **row, "seconds": round(seconds, 1),
           "size_fraction": allocation["size_fraction"] if allocation else weight_fraction(plan),
           "bits": {bits: weighted.count(bits) for bits in sorted(set(weighted))},
           "calib": {metric: on_calib[metric] for metric in METRICS},
           "eval": classifier_agreement(reference, outputs), "top1_hits": top1_hits(reference, outputs)}
    print(json.dumps({key: value for key, value in row.items() if key != "top1_hits"}), flush=True)
    saved.write_text(json.dumps(row))
    return row


def weight_fraction(plan: dict) -> float:
    """Packed weight bytes of a plan without an allocation, as a fraction of its int8 weight bytes."""
    return plan["totals"]["weight_bytes"] / plan["totals"]["int8_weight_bytes"]


def bench_model(name: str, args) -> list[dict]:
    model_path, calib, evaluation, _ = load_case(name, args.calib_samples)
    calib_dir = args.work / f"calib_{name}"
    calib_dir.mkdir(parents=True, exist_ok=True)
    for key, value in calib.items():
        np.save(calib_dir / f"{key}.npy", value)
    reference = only_output(model_path, evaluation)
    rows = []

    def point(out_name: str, options: list[str], row: dict) -> None:
        rows.append(run_point(name, model_path, calib_dir, args.work / out_name, options, row, reference,
                              evaluation, args.reuse))

    if args.uniform:
        point(f"{name}_uniform_w4a8", ["--bits", "w4a8"], {"fraction": None, "sensitivity": "-", "solver": "uniform w4a8"})
    for fraction in args.fractions:
        for sensitivity in args.sensitivity:
            for solver in args.solvers:
                suffix = "" if solver == "ilp" else f"_{solver}"  # ILP rows keep the folder names of earlier runs
                point(f"{name}_{fraction}_{sensitivity}{suffix}",
                      ["--budget", f"size={fraction}", "--sensitivity", sensitivity, "--solver", solver],
                      {"fraction": fraction, "sensitivity": sensitivity, "solver": solver})
    return rows


def comparison(rows: list[dict]) -> list[str]:
    """ILP against greedy (same table) and against uniform w4a8, per model and budget."""
    lines = ["| model | size | sensitivity | ILP top-1 / KL | greedy top-1 / KL | ILP >= greedy (top-1, KL) "
             "| images only ILP / only greedy keeps (p) | ILP >= uniform w4a8 (top-1, KL) |",
             "|---|---|---|---|---|---|---|---|"]
    pooled: dict[str, list] = {}  # sensitivity table -> (model, ILP row, greedy row) at every budget
    for ilp in rows:
        if ilp["solver"] != "ilp":
            continue
        greedy = next((row for row in rows if row["solver"] == "greedy" and row["model"] == ilp["model"]
                       and row["fraction"] == ilp["fraction"] and row["sensitivity"] == ilp["sensitivity"]), None)
        uniform = next((row for row in rows if row["solver"] == "uniform w4a8" and row["model"] == ilp["model"]), None)

        def versus(other: dict | None, ilp: dict = ilp) -> str:
            if other is None:
                return "-"
            top1 = ilp["eval"]["top1_agreement"] >= other["eval"]["top1_agreement"]
            kl = ilp["eval"]["kl"] <= other["eval"]["kl"]
            return f"{'yes' if top1 else '**no**'}, {'yes' if kl else '**no**'}"

        if greedy:
            pooled.setdefault(ilp["sensitivity"], []).append((ilp["model"], ilp, greedy))
        groups = evaluation_groups(ilp["model"], len(ilp["top1_hits"]))
        lines.append(f"| {ilp['model']} | {ilp['fraction']} | {ilp['sensitivity']} | "
                     f"{ilp['eval']['top1_agreement']:.3f} / {ilp['eval']['kl']:.3f} | "
                     + (f"{greedy['eval']['top1_agreement']:.3f} / {greedy['eval']['kl']:.3f}" if greedy else "-")
                     + f" | {versus(greedy)} | {discordant(ilp, greedy, groups) if greedy else '-'} | "
                     + (f"{versus(uniform)} |" if uniform and uniform["size_fraction"] <= ilp["fraction"] + 1e-9
                        else "- |"))
    if pooled:
        lines += ["", "All budgets pooled: images only the ILP's / only greedy's plans keep at float's top-1 (p: the "
                  "sign-flip test with each source's differences summed over the budgets, which reuse the images)."]
    for sensitivity, points in pooled.items():
        lines += ["", f"{sensitivity} table:", *pooled_by_evaluation_set(points)]
    return lines


def markdown(rows: list[dict], command: str) -> str:
    lines = [TITLE, "", f"`{command}` ({time.strftime('%Y-%m-%d')}). Each row is one `edgeq compile --target onnx "
             "--budget size=F --sensitivity S` (default recipe) on the first calibration crops, its QDQ model "
             "then run in onnxruntime on the evaluation set -- the photo models: 248 crops of 31 photos, disjoint "
             "from the calibration photos (one image = 0.004 of top-1 agreement); the bundled Fashion-MNIST CNN: "
             "the 5000 test images -- and on the calibration samples (*calib*, from "
             "plan.json). *bits*: how many weighted layers at each weight width. *solver*: the ILP (default), "
             "the greedy baseline on the same table (`--solver greedy`), or a uniform w4a8 compile (`--bits "
             "w4a8`, no budget).", "",
             "| model | size | sensitivity | solver | top-1 | top-5 | KL | calib top-1 | calib KL | bits | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        bits = ", ".join(f"w{bits}: {count}" for bits, count in row["bits"].items())
        size = f"{row['fraction']} ({row['size_fraction']:.4f})" if row["fraction"] else f"{row['size_fraction']:.4f}"
        lines.append(f"| {row['model']} | {size} | {row['sensitivity']} | {row['solver']} | "
                     f"{row['eval']['top1_agreement']:.3f} | {row['eval']['top5_agreement']:.3f} | "
                     f"{row['eval']['kl']:.3f} | {row['calib']['top1_agreement']:.3f} | {row['calib']['kl']:.4f} | "
                     f"{bits} | {row['seconds']:.0f} |")
    if any(row["solver"] != "ilp" for row in rows):
        lines += ["", "## ILP against greedy and uniform", "",
                  "Per budget, on the evaluation photos: the ILP's plan against greedy's on the same table, the "
                  "images only one of them keeps at float's top-1 (p: two-sided sign-flip test over the 31 source "
                  "photos, as crops of one photo are not independent; over the images for the Fashion CNN), and "
                  "against uniform w4a8 wherever that fits "
                  "the budget.", ""] + comparison(rows)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mobilenetv2,efficientnet_lite0")
    parser.add_argument("--fractions", type=lambda text: [float(f) for f in text.split(",")], default=[0.5, 0.6])
    parser.add_argument("--sensitivity", type=lambda text: text.split(","), default=["single-layer", "in-context"])
    parser.add_argument("--solvers", type=lambda text: text.split(","), default=["ilp"],
                        help="ilp and/or greedy (compiles with --solver greedy)")
    parser.add_argument("--uniform", action="store_true", help="also a uniform w4a8 compile per model")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeq_bench_size_budget"))
    parser.add_argument("--reuse", action="store_true", help="keep the rows of compiles already in --work")
    parser.add_argument("--write", type=Path, help="write the markdown table here (benchmarks/size_budget.md)")
    args = parser.parse_args()
    rows = [row for name in args.models.split(",") for row in bench_model(name, args)]
    text = markdown(rows, "python tools/bench_size_budget.py " + " ".join(sys.argv[1:]))
    print(text)
    if args.write:
        args.write.write_text(text)


if __name__ == "__main__":
    main()
