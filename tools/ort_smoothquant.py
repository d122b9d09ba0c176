"""onnxruntime.quantization's SmoothQuant option on MiniLM, beside edgeq (issue 5, part 6).

onnxruntime's ``quantize_static(extra_options={"SmoothQuant": True})`` calls
neural-compressor 2.x (``neural_compressor.adaptor.ox_utils.smooth_quant``),
which pins numpy<2 and so cannot live in the project's environment (numpy 2).
This tool therefore builds a throwaway virtual environment only for the
reference run (``~/.cache/edgeq/venv-ort-smoothquant``, created once and then
reused), quantizes there, and scores the results here:

1. here: the float MiniLM model (``models.zoo``) and the calibration /
   evaluation sentences, tokenized exactly as ``tools/compare_ort.py`` and
   ``tools/bench_transforms.py`` do, are written to a temporary directory;
2. in the venv (this file run with ``--worker``): ``tools/ort_reference.ort_quantize``
   -- the project's one onnxruntime configuration: QDQ, per-channel weights,
   uint8 activations, MinMax, after ``quant_pre_process`` -- with and without
   ``{"SmoothQuant": True, "SmoothQuantAlpha": alpha}``, MatMul only and all
   ops, int8 weights (W8A8) and int4 weights at opset 21 (W4A8);
3. here: each quantized model runs in the project's onnxruntime on the
   evaluation sentences and is scored with ``compare_ort.score`` (mean
   embedding cosine with the float model); edgeq's own recipe compiles on the
   same data for the side-by-side rows.

It pip-installs, so it is a benchmark tool only, never part of the test suite.

    python tools/ort_smoothquant.py                            # -> benchmarks/ort_smoothquant.md
    python tools/ort_smoothquant.py --alphas 0.5 --bits w8a8 --no-edgeq
    python tools/ort_smoothquant.py --bits w4a8b32 --alphas 0.5 auto    # onnxruntime's block-wise int4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = Path.home() / ".cache" / "edgeq" / "venv-ort-smoothquant"
# onnxruntime and onnx as in the project; neural-compressor 2.6 is the last release that still ships
# neural_compressor.adaptor.ox_utils (3.x moved ONNX support out); it pins numpy<2 and imports six
# without declaring it.
REQUIREMENTS = ("onnxruntime==1.31.1", "onnx==1.23.2", "numpy<2", "ml_dtypes", "setuptools", "six",
                "neural-compressor==2.6")
VERSIONED = ("onnxruntime", "onnx", "numpy", "neural-compressor", "setuptools")
SMOOTHQUANT_MODULE = "neural_compressor.adaptor.ox_utils.smooth_quant"
OP_SETS = {"matmul": ("MatMul",), "all": None}
OP_SET_LABELS = {"matmul": "MatMul only", "all": "all ops"}


def parse_alpha(text: str) -> float | str:
    """A SmoothQuant strength in [0, 1], or "auto" (neural-compressor's per-layer search over 0.3..0.7)."""
    if text == "auto":
        return text
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"alpha {text} is outside [0, 1]")
    return value


BITS_PATTERN = re.compile(r"^w(4|8)a8(?:b(\d+))?$")


def parse_bits(text: str) -> str:
    """w8a8, w4a8 (per-channel int4 weights) or w4a8b<N> (onnxruntime's block-wise int4, BlockSize N)."""
    match = BITS_PATTERN.match(text)
    if not match or (match.group(2) and (match.group(1) != "4" or int(match.group(2)) < 16)):
        raise argparse.ArgumentTypeError(f"bits {text}: onnxruntime's reference runs w8a8, w4a8 or w4a8b<N>, N >= 16")
    return text


def weight_options(bits: str) -> tuple[str, int | None, dict]:
    """(onnxruntime weight type, opset, extra options) for a --bits value."""
    match = BITS_PATTERN.match(bits)
    if match.group(1) == "8":
        return "QInt8", None, {}
    return "QInt4", 21, ({"BlockSize": int(match.group(2))} if match.group(2) else {})


def jobs_for(alphas: list[float | str], folding_alphas: list[float | str], op_sets: list[str],
             bits_list: list[str]) -> list[dict]:
    """One onnxruntime quantization per (bits, op set, alpha, folding); alpha None = without SmoothQuant.

    Every alpha runs with SmoothQuantFolding off (the smoothing Muls stay as float ops before the
    MatMuls); the ``folding_alphas`` run with it on as well (onnxruntime's default: each Mul folded
    into its producer where neural-compressor can).
    """
    jobs = []
    for bits in bits_list:
        for op_set in op_sets:
            variants = [(None, None)] + [(alpha, False) for alpha in alphas]
            variants += [(alpha, True) for alpha in folding_alphas]
            for alpha, folding in variants:
                label = "plain" if alpha is None else f"{alpha}{'_fold' if folding else ''}"
                jobs.append({"name": f"{bits}_{op_set}_{label}", "bits": bits, "op_set": op_set,
                             "alpha": alpha, "folding": folding})
    # neural-compressor's smoothing alone (float in, float out): is the function kept?
    jobs += [{"name": f"float_smoothed_{alpha}", "bits": "float", "op_set": None, "alpha": alpha, "folding": False}
             for alpha in alphas]
    return jobs


# ---------------------------------------------------------------- the venv side (numpy<2)


def smoothed_float_model(model_path: Path, calib: dict, alpha: float | str, out_path: Path) -> None:
    """neural-compressor's SmoothQuant transform alone, as quantize_static calls it, without folding.

    The calibration samples come from a generator, as in quantize_static: it is used up by the
    range collection, so alpha="auto" finds no data left for its per-layer loss and keeps the
    first candidate (0.3) everywhere -- which is what onnxruntime's "auto" does too.
    """
    from neural_compressor.adaptor.ox_utils.smooth_quant import ORTSmoothQuant

    count = next(iter(calib.values())).shape[0]
    samples = (({name: value[i:i + 1] for name, value in calib.items()}, None) for i in range(count))
    ORTSmoothQuant(str(model_path), samples, False).transform(alpha, False).save(str(out_path))


def worker(jobs_path: Path) -> int:
    """Run every job of ``jobs_path`` with the venv's onnxruntime + neural-compressor; write results.json."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from tools.ort_reference import ort_quantize

    spec = json.loads(jobs_path.read_text())
    work = jobs_path.parent
    calib = dict(np.load(work / "calib.npz"))
    results = []
    for job in spec["jobs"]:
        out_path = work / f"{job['name']}.onnx"
        weight_type, opset, extra = weight_options(job["bits"]) if job["bits"] != "float" else (None, None, {})
        if job["alpha"] is not None:
            extra.update({"SmoothQuant": True, "SmoothQuantAlpha": job["alpha"], "SmoothQuantFolding": job["folding"]})
        start = time.perf_counter()
        try:
            if job["bits"] == "float":
                smoothed_float_model(Path(spec["model"]), calib, job["alpha"], out_path)
            else:
                ort_quantize(Path(spec["model"]), calib, out_path, weight_type=weight_type, opset=opset,
                             op_types=OP_SETS[job["op_set"]], extra_options=extra)
            outcome = {"path": str(out_path)}
        except Exception as error:  # noqa: BLE001 - a configuration onnxruntime cannot do is reported
            cause = error.__cause__ or error
            outcome = {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:200]}",
                       "cause": f"{type(cause).__name__}: {str(cause).strip()[:300]}",
                       "traceback": traceback.format_exc()[-3000:]}
        outcome["seconds"] = round(time.perf_counter() - start, 1)
        results.append({**job, **outcome})
        print(f"   {job['name']}: {outcome.get('error', 'ok')} ({outcome['seconds']} s)", file=sys.stderr, flush=True)
        (work / "results.json").write_text(json.dumps(results, indent=1) + "\n")  # partial results survive
    return 0


# ---------------------------------------------------------------- the project side


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path) -> tuple[Path, str | None]:
    """Create (or reuse) the reference venv; (its python, None) or (its python, the install error)."""
    python = venv_python(venv)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", *REQUIREMENTS],
                             capture_output=True, text=True)
    if install.returncode != 0:
        lines = [line for line in install.stderr.splitlines() if line.strip() and "WARNING" not in line]
        return python, "pip install failed: " + " / ".join(lines[-3:])
    probe = subprocess.run([str(python), "-c", f"import {SMOOTHQUANT_MODULE}"], capture_output=True, text=True)
    if probe.returncode != 0:
        return python, f"import {SMOOTHQUANT_MODULE} failed: {probe.stderr.strip().splitlines()[-1]}"
    return python, None


def venv_versions(python: Path) -> dict[str, str]:
    script = ("import json, importlib.metadata as m; "
              f"print(json.dumps({{p: m.version(p) for p in {list(VERSIONED)!r}}}))")
    return json.loads(subprocess.run([str(python), "-c", script], capture_output=True, text=True,
                                     check=True).stdout)


def smooth_mul_count(path: Path) -> int:
    """SmoothQuant's Mul nodes left in the graph (the ones it could not fold into a producer)."""
    import onnx

    return sum(node.op_type == "Mul" and node.name.endswith("_smooth_mul") for node in onnx.load(str(path)).graph.node)


def edgeq_rows(case, model_path: Path, calib, eval_inputs, reference, output: str, bits_list: list[str],
               recipes: list[str], work: Path) -> list[dict]:
    """edgeq's pipeline on the same data, one row per (bits, recipe)."""
    from compare_ort import score

    from compiler.fidelity import run_model
    from compiler.pipeline import CompileOptions, compile_model

    rows = []
    for bits in dict.fromkeys(bits[:4] for bits in bits_list):  # edgeq's recipe picks its own granularity
        for recipe in recipes:
            start = time.perf_counter()
            try:
                compiled = compile_model(CompileOptions(
                    model=str(model_path), calib_data=calib, eval_inputs=eval_inputs, bits=bits, recipe=recipe,
                    out_dir=str(work / f"edgeq_{bits}_{recipe}"), progress=False))
            except Exception as error:  # noqa: BLE001 - reported in the table; the onnxruntime rows still count
                rows.append({"bits": bits, "recipe": recipe, "error": f"{type(error).__name__}: {error}"[:200]})
                continue
            quantized = run_model(compiled.qdq_model, eval_inputs)[output]
            w_bits = int(bits[1])
            steps = [step["pass"] for step in compiled.plan.recipe.get("steps", [])  # the steps that ran
                     if step.get("max_w_bits") is None or w_bits <= step["max_w_bits"]]
            row = {"bits": bits, "recipe": compiled.plan.recipe.get("name", recipe), "steps": steps,
                   "weight_block_size": compiled.plan.recipe.get("weight_block_size") if w_bits < 8 else None,
                   **score(case, reference, quantized, None), "seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
            print(f"   edgeq {json.dumps(row)}", file=sys.stderr, flush=True)
    return rows


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT / "tools"))
    sys.path.insert(0, str(ROOT))
    from compare_ort import cases, score

    from compiler.fidelity import run_model

    result: dict = {"project": {"onnxruntime": ort.__version__, "numpy": np.__version__, "onnx": onnx.__version__},
                    "requirements": list(REQUIREMENTS), "venv": str(args.venv)}
    print("== reference venv", file=sys.stderr, flush=True)
    python, install_error = ensure_venv(args.venv)
    if install_error:
        result["install_error"] = install_error
        return result
    result["versions"] = venv_versions(python)

    case = cases(["minilm"], args.calib_samples)[0]
    ready = case.prepare()
    model_path, calib, eval_inputs = ready.model_path, ready.calib, ready.eval_inputs
    output, reference = ready.output, ready.reference
    result["calib_samples"] = int(next(iter(calib.values())).shape[0])
    result["eval_samples"] = int(next(iter(eval_inputs.values())).shape[0])

    with tempfile.TemporaryDirectory(prefix="edgeq-ort-sq-") as tmp:
        work = Path(tmp)
        np.savez(work / "calib.npz", **calib)
        jobs = jobs_for(args.alphas, args.folding_alphas, args.op_sets, args.bits)
        (work / "jobs.json").write_text(json.dumps({"model": str(model_path), "jobs": jobs}, indent=1))
        print(f"== onnxruntime in the venv: {len(jobs)} quantizations", file=sys.stderr, flush=True)
        subprocess.run([str(python), str(Path(__file__).resolve()), "--worker", str(work / "jobs.json")],
                       check=True, cwd=str(ROOT))
        rows = json.loads((work / "results.json").read_text())
        for row in rows:
            if "path" in row:
                path = Path(row.pop("path"))
                outputs = run_model(onnx.load(str(path)), eval_inputs)[output]
                row.update(score(case, reference, outputs, None))
                if row["bits"] == "float":
                    row["max_rel_error"] = float(np.max(np.abs(outputs - reference)) / np.max(np.abs(reference)))
                row["smooth_muls_left"] = smooth_mul_count(path)
            print(f"   {json.dumps({k: v for k, v in row.items() if k != 'traceback'})}", file=sys.stderr, flush=True)
        result["ort"] = rows
        if args.edgeq_recipes:
            print("== edgeq on the same data", file=sys.stderr, flush=True)
            result["edgeq"] = edgeq_rows(case, model_path, calib, eval_inputs, reference, output, args.bits,
                                         args.edgeq_recipes, work)
    return result


def _smoothquant_label(row: dict) -> str:
    if row["alpha"] is None:
        return "off"
    return f"alpha {row['alpha']}, folding {'on' if row['folding'] else 'off'}"


def write_markdown(result: dict, path: Path, command: str) -> None:
    lines = ["## onnxruntime SmoothQuant on MiniLM (neural-compressor), beside edgeq", "",
             f"Command: `{command}`. Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores.",
             "onnxruntime's `quantize_static` with `extra_options={\"SmoothQuant\": True, \"SmoothQuantAlpha\": a}` "
             "runs neural-compressor 2.x, which needs numpy<2, so the quantization runs in a separate venv "
             f"(`{result['venv']}`, pip requirements `{' '.join(result['requirements'])}`); the models are "
             f"scored in the project's environment (onnxruntime {result['project']['onnxruntime']}, numpy "
             f"{result['project']['numpy']}).", ""]
    if "install_error" in result:
        lines += [f"**Not run**: {result['install_error']}", ""]
        path.write_text("\n".join(lines) + "\n")
        return
    versions = result["versions"]
    lines += [f"Venv versions: {', '.join(f'{name} {version}' for name, version in versions.items())}.",
              "Every onnxruntime row is `tools/ort_reference.ort_quantize` (QDQ, per-channel weights, uint8 "
              "activations, MinMax, after `quant_pre_process`); W4A8 = int4 weights (`QInt4`, model converted "
              "to opset 21), per channel; W4A8B<N> = onnxruntime's block-wise int4 (`BlockSize` N: its blocks run "
              "along the weight's output-channel axis, N output channels per input row). SmoothQuant's inserted Mul nodes are left in float (onnxruntime excludes them); "
              "\"Muls left\" counts the ones neural-compressor could not fold into a producer.",
              f"Metric: mean embedding cosine with the float model on {result['eval_samples']} held-out sentences; "
              f"calibration: {result['calib_samples']} sentences (both as in `tools/compare_ort.py`).", ""]
    rows = result["ort"]
    bits_list = list(dict.fromkeys(row["bits"] for row in rows if row["bits"] != "float"))
    for bits in bits_list:
        lines += [f"**{bits.upper()}**", "", "| quantizer | op set | SmoothQuant | cosine | Muls left | seconds |",
                  "|---|---|---|---|---|---|"]
        for row in (row for row in rows if row["bits"] == bits):
            head = f"| onnxruntime | {OP_SET_LABELS[row['op_set']]} | {_smoothquant_label(row)} |"
            if "error" in row:
                lines.append(f"{head} failed: {row['error']} | - | {row['seconds']} |")
            else:
                lines.append(f"{head} {row['cosine']:.4f} | {row['smooth_muls_left']} | {row['seconds']} |")
        for row in (row for row in result.get("edgeq", []) if row["bits"] == bits[:4]):
            if "error" in row:
                lines.append(f"| **edgeq** `{row['recipe']}` recipe | its own | - | failed: {row['error']} | - | - |")
                continue
            blocks = f", int4 blocks of {row['weight_block_size']}" if row.get("weight_block_size") else ""
            lines.append(f"| **edgeq** `{row['recipe']}` recipe ({' + '.join(row['steps']) or 'no passes'}{blocks}) "
                         f"| its own | - | {row['cosine']:.4f} | - | {row['seconds']} |")
        lines.append("")
    float_rows = [row for row in rows if row["bits"] == "float"]
    if float_rows:
        lines += ["neural-compressor's smoothing alone (float model, folding off), against the float model:", "",
                  "| SmoothQuant alpha | cosine | max abs error / max abs output |", "|---|---|---|"]
        for row in float_rows:
            lines.append(f"| {row['alpha']} | failed: {row['error']} | - |" if "error" in row else
                         f"| {row['alpha']} | {row['cosine']:.6f} | {row['max_rel_error']:.2e} |")
        lines.append("")
    failures = {row["cause"] for row in rows if "cause" in row}
    if failures:
        lines += ["Errors (first cause, verbatim):", ""] + [f"- `{cause}`" for cause in sorted(failures)] + [""]
    path.write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alphas", nargs="+", type=parse_alpha, default=[0.3, 0.5, 0.7, 0.8],
                        help="SmoothQuantAlpha values (0..1, or auto: minutes per run, and inside quantize_static "
                        "it ends up at 0.3, see smoothed_float_model); a run without SmoothQuant is always added")
    parser.add_argument("--folding-alphas", nargs="*", type=parse_alpha, default=[0.5],
                        help="alphas also run with SmoothQuantFolding on (onnxruntime's default)")
    parser.add_argument("--op-sets", nargs="+", choices=sorted(OP_SETS), default=["matmul", "all"])
    parser.add_argument("--bits", nargs="+", type=parse_bits, default=["w8a8", "w4a8"])
    parser.add_argument("--edgeq-recipes", nargs="*", default=["auto"],
                        help="edgeq recipes compiled on the same data (auto = the family default); none: skip")
    parser.add_argument("--no-edgeq", dest="edgeq_recipes", action="store_const", const=[])
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--venv", type=Path, default=VENV)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "ort_smoothquant.md")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args.worker)
    command = "python tools/ort_smoothquant.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = run(args)
    write_markdown(result, args.output, command.strip())
    for row in result.get("ort", []):  # kept out of the JSON: temporary paths, long tracebacks
        row.pop("traceback", None)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
