"""Ablation of edgeq's transforms and rounding passes, with onnxruntime.quantization beside them.

For each model and bit-width every configuration is a recipe (a list of
passes) given to the real pipeline (``compiler.pipeline.compile_model``) on the
same calibration data; fidelity to the float model is measured on held-out
inputs with the metrics of ``tools/compare_ort.py`` (top-1/top-5 agreement and
KL for the ImageNet models on real photos, mean embedding cosine for MiniLM on
real sentences, accuracy for the bundled Fashion-MNIST CNN).  onnxruntime's
``quantize_static`` (QDQ, per-channel weights, uint8 activations, MinMax) runs
on the same data (``tools/ort_reference.py``): int8 weights for W8A8, int4
weights for W4A8, and its SmoothQuant option for MiniLM when
neural-compressor can be imported.

    python tools/bench_transforms.py                                  # everything
    python tools/bench_transforms.py --models mobilenetv2 --bits w4a8 --configs none full
    python tools/bench_transforms.py --models minilm --bits w4a8 --weight-blocks channel 32 64 128 \
        --configs "full (transformer recipe)" --no-ort --output /tmp/blocks.md   # block-wise int4 weights

``--weight-blocks`` repeats every sub-8-bit configuration with each weight
granularity (``--weight-block`` of ``edgeq compile``: ``channel``, a block size,
or ``recipe`` for the recipe's own choice, the default); each row then also
reports the packed weight bytes and the bytes of the weight scales and zero
points (fp32 scales: one per output channel, or one per block).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from compare_ort import Case, cases, format_cell, score  # noqa: E402
from ort_reference import ort_quantize  # noqa: E402

from compiler.fidelity import run_model  # noqa: E402
from compiler.pipeline import CompileOptions, compile_model  # noqa: E402
from compiler.recipe import load_recipe, model_family  # noqa: E402

# Configurations per model family: name -> the recipe steps ("pass" or ("pass", {options})).
GPTQ = ("gptq", {"max_bits": 8})
CONFIGS = {
    "cnn": {
        "none": [],
        "equalize": ["equalize"],
        "equalize (ReLU6->ReLU)": [("equalize", {"relu6": "relu"})],
        "bias_correction": ["bias_correction"],
        "gptq": [GPTQ],
        "gptq + bias_correction": [GPTQ, "bias_correction"],
        "rotate": ["rotate"],
        "full (cnn recipe)": "cnn",
    },
    "transformer": {
        "none": [],
        "smooth": ["smooth"],
        "smooth + OS+ shift": [("smooth", {"shift": True})],
        "rotate": [("rotate", {"online": True})],
        "rotate (folded only)": ["rotate"],
        "rotate + smooth": [("rotate", {"online": True}), "smooth"],
        "gptq": [GPTQ],
        "smooth + gptq": ["smooth", GPTQ],
        "rotate + smooth + gptq": [("rotate", {"online": True}), "smooth", GPTQ],
        "full (transformer recipe)": "transformer",
        "full (transformer_rotate recipe)": "transformer_rotate",
    },
}


def recipe_text(name: str, steps) -> str:
    """A recipe TOML for ``steps`` (or the bundled recipe's text when ``steps`` is its name)."""
    if isinstance(steps, str):
        return (ROOT / "compiler" / "recipes" / f"{steps}.toml").read_text()
    lines = [f'name = "{name}"', 'family = "ablation"']
    if not steps:
        lines.append("steps = []")
    for step in steps:
        pass_name, options = (step, {}) if isinstance(step, str) else step
        rendered = ", ".join(f"{key} = {json.dumps(value)}" for key, value in options.items())
        lines += ["[[steps]]", f'pass = "{pass_name}"', f"options = {{ {rendered} }}"]
    return "\n".join(lines) + "\n"


def _ort_rows(case: Case, model_path: Path, calib, eval_inputs, labels, reference, output, bits: str,
              work: Path) -> list[dict]:
    weight_bits = 4 if bits.startswith("w4") else 8
    variants = [("onnxruntime (MinMax, all ops)", {})]
    if case.kind == "embedding":
        variants.append(("onnxruntime (MinMax, MatMul only)", {"op_types": ("MatMul",)}))
        # onnxruntime's SmoothQuant needs neural-compressor 2.x (numpy<2): tools/ort_smoothquant.py runs it
        # in its own environment.
    rows = []
    for label, options in variants:
        path = work / f"{case.name}_{bits}_ort_{len(rows)}.onnx"
        try:
            ort_quantize(model_path, calib, path, weight_type="QInt4" if weight_bits == 4 else "QInt8",
                         opset=21 if weight_bits == 4 else None, op_types=options.get("op_types"),
                         )
            quantized = run_model(onnx.load(str(path)), eval_inputs)[output]
        except Exception as error:  # noqa: BLE001 - a configuration onnxruntime cannot do is reported
            rows.append({"config": label, "error": str(error).strip().splitlines()[-1][:160]})
            continue
        rows.append({"config": label, **score(case, reference, quantized, labels)})
    return rows


def _ort_block_rows(case: Case, model_path: Path, eval_inputs, labels, reference, output, blocks: list[str],
                    work: Path) -> list[dict]:
    """onnxruntime's own block-wise int4 weights: MatMulNBits, round-to-nearest, asymmetric blocks,
    weight-only (activations stay float), one row per block size."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    except ImportError as error:  # needs the onnx-ir package
        return [{"config": "onnxruntime MatMulNBits (int4 blocks, weight-only)", "error": str(error)[:160]}]
    rows = []
    for block in (int(b) for b in blocks if b.isdigit()):
        label = f"onnxruntime MatMulNBits int4 block {block} (weight-only RTN, float activations)"
        try:
            quantizer = MatMulNBitsQuantizer(onnx.load(str(model_path)), bits=4, block_size=block, is_symmetric=False)
            quantizer.process()
            path = work / f"{case.name}_nbits_{block}.onnx"
            quantizer.model.save_model_to_file(str(path), use_external_data_format=False)
            quantized = run_model(onnx.load(str(path)), eval_inputs)[output]
        except Exception as error:  # noqa: BLE001 - a configuration onnxruntime cannot do is reported
            rows.append({"config": label, "error": str(error).strip().splitlines()[-1][:160]})
            continue
        rows.append({"config": label, **score(case, reference, quantized, labels)})
        print(f"   {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    return rows


def _granularities(bits: str, weight_blocks: list[str]) -> list[str]:
    """The ``--weight-block`` values to run at ``bits`` (blocks only matter below 8-bit weights)."""
    return weight_blocks if not bits.startswith("w8") else ["recipe"]


def _label(name: str, block: str, weight_blocks: list[str]) -> str:
    if weight_blocks == ["recipe"]:
        return name
    return f"{name} [{'recipe granularity' if block == 'recipe' else 'per channel' if block == 'channel' else f'block {block}'}]"


def bench_model(case: Case, bits_list: list[str], only: list[str] | None, work: Path, with_ort: bool,
                weight_blocks: list[str] | None = None) -> dict:
    print(f"== {case.name}", file=sys.stderr, flush=True)
    ready = case.prepare()
    model_path, calib, eval_inputs, labels = ready.model_path, ready.calib, ready.eval_inputs, ready.labels
    output, reference = ready.output, ready.reference
    family = model_family(ready.float_model)
    configs = CONFIGS["transformer" if family == "transformer" else "cnn"]
    result = {"model": case.name, "family": family, "calib_samples": int(next(iter(calib.values())).shape[0]),
              "eval_samples": int(next(iter(eval_inputs.values())).shape[0]), "bits": {}}
    if labels is not None:
        result["float"] = {"accuracy": float(np.mean(reference.argmax(1) == labels))}
    weight_blocks = weight_blocks or ["recipe"]
    for bits in bits_list:
        rows = []
        for name, steps in configs.items():
            if only and name not in only:
                continue
            for block in _granularities(bits, weight_blocks):
                rows.append(_bench_config(case, model_path, calib, eval_inputs, labels, reference, output, bits,
                                          _label(name, block, weight_blocks), name, steps, block, work, len(rows)))
        if with_ort and (not only or "onnxruntime" in only):
            rows += _ort_rows(case, model_path, calib, eval_inputs, labels, reference, output, bits, work)
            for row in rows[-3:]:
                print(f"   {bits} {json.dumps(row)}", file=sys.stderr, flush=True)
        if (with_ort or (only and "onnxruntime blocks" in only)) and bits.startswith("w4"):
            rows += _ort_block_rows(case, model_path, eval_inputs, labels, reference, output, weight_blocks, work)
        result["bits"][bits] = rows
    return result


def _bench_config(case: Case, model_path: Path, calib, eval_inputs, labels, reference, output, bits: str,
                  label: str, name: str, steps, block: str, work: Path, index: int) -> dict:
    """One row: compile with the recipe made of ``steps`` at ``bits`` / weight granularity ``block``."""
    recipe_path = work / f"{case.name}_{bits}_{index}.toml"
    recipe_path.write_text(recipe_text(name, steps))
    recipe = load_recipe(str(recipe_path))  # validate before spending minutes
    start = time.perf_counter()
    try:
        compiled = compile_model(CompileOptions(
            model=str(model_path), calib_data=calib, eval_inputs=eval_inputs, bits=bits,
            weight_block=None if block == "recipe" else block,
            recipe=str(recipe_path), out_dir=str(work / f"{case.name}_{bits}_{index}"), progress=False))
    except Exception as error:  # noqa: BLE001 - one failing configuration must not stop the table
        print(f"   {bits} {label}: FAILED {error}", file=sys.stderr, flush=True)
        return {"config": label, "error": f"{type(error).__name__}: {error}"[:200]}
    quantized = run_model(compiled.qdq_model, eval_inputs)[output]
    totals = compiled.plan.totals
    row = {"config": label, "steps": [step.pass_name for step in recipe.steps],
           **score(case, reference, quantized, labels),
           "weight_bytes": int(totals["weight_bytes"]), "scale_bytes": int(totals["weight_scale_bytes"]),
           "weight_block_size": compiled.plan.weight_block_size,
           "seconds": round(time.perf_counter() - start, 1),
           "transform_s": round(compiled.timings.get("transforms", 0.0), 1),
           "rounding_s": round(compiled.timings.get("rounding", 0.0), 1)}
    print(f"   {bits} {json.dumps(row)}", file=sys.stderr, flush=True)
    return row


def write_markdown(results: list[dict], path: Path, command: str) -> None:
    lines = ["## Transform ablation (equalization, smoothing, rotation, GPTQ, bias correction)", "",
             f"Command: `{command}`. onnxruntime {ort.__version__}. Every edgeq row is the full pipeline "
             "(`compile_model`) with a recipe holding just the passes named; \"none\" is nearest rounding "
             "with no transform. Per-channel symmetric weights, uint8 per-tensor activations. "
             "onnxruntime rows: `quantize_static`, QDQ, per-channel weights, MinMax calibration.", ""]
    for result in results:
        lines += [f"### {result['model']} ({result['family']})", "",
                  f"Calibration samples: {result['calib_samples']}; evaluation samples: {result['eval_samples']}."]
        if "float" in result:
            lines.append(f"Float accuracy: {result['float']['accuracy']:.4f}.")
        lines.append("")
        for bits, rows in result["bits"].items():
            metrics = next(([k for k in row if k not in ("config", "steps", "seconds", "transform_s", "rounding_s",
                                                         "weight_block_size")]
                            for row in rows if "error" not in row), [])
            lines += [f"**{bits.upper()}**", "", "| config | " + " | ".join(metrics) + " | compile s (transforms / rounding) |",
                      "|---|" + "---|" * (len(metrics) + 1)]
            for row in rows:
                if "error" in row:
                    lines.append(f"| {row['config']} | failed: {row['error']} |" + " |" * len(metrics))
                    continue
                timing = (f"{row['seconds']} ({row['transform_s']} / {row['rounding_s']})" if "seconds" in row else "-")
                lines.append(f"| {row['config']} | " + " | ".join(format_cell(row.get(k, "-")) for k in metrics) + f" | {timing} |")
            lines.append("")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fashion_cnn", "mobilenetv2", "efficientnet_lite0", "minilm"])
    parser.add_argument("--bits", nargs="+", default=["w8a8", "w4a8"])
    parser.add_argument("--configs", nargs="+", default=None, help="config names as in CONFIGS; "
                        "'onnxruntime' for the onnxruntime rows, 'onnxruntime blocks' for its MatMulNBits rows")
    parser.add_argument("--no-ort", action="store_true", help="skip the onnxruntime rows")
    parser.add_argument("--weight-blocks", nargs="+", default=["recipe"], metavar="B",
                        help="weight granularities for sub-8-bit weights: recipe, channel, or block sizes")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/transforms.md"))
    args = parser.parse_args()
    command = "python tools/bench_transforms.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_model(case, args.bits, args.configs, Path(tmp), not args.no_ort, args.weight_blocks)
                   for case in cases(args.models, args.calib_samples)]
    output = Path(args.output)
    write_markdown(results, output, command.strip())
    output.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
