"""`edgeq compile --target onnx --budget size=F` end to end, with each sensitivity mode.

What a user gets from the whole CLI (default recipe: GPTQ below 8 bits, bias
correction; the onnx target's candidates w2a8 / w4a8 / w8a8, 2-bit weights
stored as INT2 where onnxruntime runs it) on MobileNetV2 and EfficientNet-Lite0:
for each size fraction and each ``--sensitivity`` mode, one compile on the
first ``--calib-samples`` calibration crops, then the exported QDQ model
against the float model in onnxruntime on the evaluation photos (disjoint
from the calibration photos): top-1 / top-5 agreement and softmax KL; also
the compile's own fidelity on the calibration crops (plan.json) and the
compile time. Plans and models stay under ``--work`` (``--reuse`` keeps
the rows of compiles already there).

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
from tools.bench_mixed import load_case  # noqa: E402

TITLE = "# Size budgets through the CLI"
METRICS = ("top1_agreement", "top5_agreement", "kl")


def only_output(model: onnx.ModelProto | str | Path, data: dict[str, np.ndarray]) -> np.ndarray:
    loaded = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    return next(iter(run_model(loaded, data).values()))


def compile_once(model_path: Path, calib_dir: Path, out: Path, fraction: float, sensitivity: str) -> float:
    """Run the CLI; returns its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compiler.cli", "compile", str(model_path), "--calib", str(calib_dir),
                    "--target", "onnx", "--budget", f"size={fraction}", "--sensitivity", sensitivity,
                    "-o", str(out), "-q"], cwd=ROOT, check=True)
    return time.perf_counter() - started


def bench_model(name: str, args) -> list[dict]:
    model_path, calib, evaluation, _ = load_case(name, args.calib_samples)
    calib_dir = args.work / f"calib_{name}"
    calib_dir.mkdir(parents=True, exist_ok=True)
    for key, value in calib.items():
        np.save(calib_dir / f"{key}.npy", value)
    reference = only_output(model_path, evaluation)
    rows = []
    for fraction in args.fractions:
        for sensitivity in args.sensitivity:
            out = args.work / f"{name}_{fraction}_{sensitivity}"
            saved = out / "bench_row.json"
            if args.reuse and saved.exists():
                rows.append(json.loads(saved.read_text()))
                continue
            seconds = compile_once(model_path, calib_dir, out, fraction, sensitivity)
            plan = json.loads((out / "plan.json").read_text())
            on_calib = next(iter(plan["fidelity"]["outputs"].values()))
            weighted = [layer["w_bits"] for layer in plan["layers"] if layer.get("w_bits")]
            row = {"model": name, "fraction": fraction, "sensitivity": sensitivity, "seconds": round(seconds, 1),
                   "size_fraction": plan["totals"]["allocation"]["totals"]["size_fraction"],
                   "bits": {bits: weighted.count(bits) for bits in sorted(set(weighted))},
                   "calib": {metric: on_calib[metric] for metric in METRICS},
                   "eval": classifier_agreement(reference, only_output(out / "model.qdq.onnx", evaluation))}
            print(json.dumps(row), flush=True)
            saved.write_text(json.dumps(row))
            rows.append(row)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = [TITLE, "", f"`{command}` ({time.strftime('%Y-%m-%d')}). Each row is one `edgeq compile --target onnx "
             "--budget size=F --sensitivity S` (default recipe) on the first calibration crops, its QDQ model "
             "then run in onnxruntime on the 248 evaluation crops (31 photos, disjoint from the calibration "
             "photos; one image = 0.004 of top-1 agreement) and on the calibration crops (*calib*, from "
             "plan.json). *bits*: how many weighted layers at each weight width.", "",
             "| model | size | sensitivity | top-1 | top-5 | KL | calib top-1 | calib KL | bits | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        bits = ", ".join(f"w{bits}: {count}" for bits, count in row["bits"].items())
        lines.append(f"| {row['model']} | {row['fraction']} ({row['size_fraction']:.4f}) | {row['sensitivity']} | "
                     f"{row['eval']['top1_agreement']:.3f} | {row['eval']['top5_agreement']:.3f} | "
                     f"{row['eval']['kl']:.3f} | {row['calib']['top1_agreement']:.3f} | {row['calib']['kl']:.4f} | "
                     f"{bits} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mobilenetv2,efficientnet_lite0")
    parser.add_argument("--fractions", type=lambda text: [float(f) for f in text.split(",")], default=[0.5, 0.6])
    parser.add_argument("--sensitivity", type=lambda text: text.split(","), default=["single-layer", "in-context"])
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
