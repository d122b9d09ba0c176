"""edgeq W8A8 vs onnxruntime.quantization.quantize_static, side by side, on the same data.

For each model both quantizers get the same calibration inputs; fidelity is
measured on held-out inputs (real photos for the image models, real sentences
for MiniLM, the Fashion-MNIST test subset for the bundled CNN). onnxruntime is
tried with each of its calibration methods (QDQ, per-channel int8 weights,
uint8 activations, after its own quant_pre_process) and, for MiniLM, with
every op quantized and with MatMul only; its best configuration is counted.
Batch-1 latency in onnxruntime of float, onnxruntime's best and edgeq's model
is measured in the same run.

    python tools/compare_ort.py                       # all models -> benchmarks/compare_ort.md
    python tools/compare_ort.py --models fashion_cnn mobilenetv2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compiler.fidelity import compare_outputs, run_model  # noqa: E402
from compiler.pipeline import CompileOptions, compile_model  # noqa: E402
from tools.ort_reference import ort_quantize  # noqa: E402


@dataclass
class Case:
    """A model with its calibration inputs, evaluation inputs and how to score it."""

    name: str
    model_path: Callable[[], Path]
    calib: Callable[[], dict[str, np.ndarray]]
    evaluation: Callable[[], tuple[dict[str, np.ndarray], np.ndarray | None]]
    kind: str  # "accuracy", "classifier", "embedding"
    ort_configs: tuple[tuple[str, tuple[str, ...] | None], ...] = (("all ops", None),)

    def prepare(self) -> Prepared:
        """Build the model, load its data and run the float model on the evaluation inputs."""
        model_path = self.model_path()
        calib = self.calib()
        eval_inputs, labels = self.evaluation()
        float_model = onnx.load(str(model_path))
        output = float_model.graph.output[0].name
        reference = run_model(float_model, eval_inputs)[output]
        return Prepared(model_path, float_model, calib, eval_inputs, labels, output, reference)


@dataclass
class Prepared:
    """A :class:`Case` ready to score: its float model, data and the float model's outputs."""

    model_path: Path
    float_model: onnx.ModelProto
    calib: dict[str, np.ndarray]
    eval_inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    output: str  # the scored output's name
    reference: np.ndarray  # the float model's output on eval_inputs


def _image_case(name: str, calib_samples: int) -> Case:
    from models import photos, zoo

    preprocessing = zoo.PREPROCESSING[name]  # EfficientNet-Lite takes (pixel - 127) / 128

    def calib():
        return {"input": photos.calibration_images(calib_samples, preprocessing)}

    def evaluation():
        return {"input": photos.evaluation_images(preprocessing)}, None

    return Case(name, lambda: zoo.build(name), calib, evaluation, "classifier")


def _minilm_case(calib_samples: int) -> Case:
    from models import sentences, zoo

    def calib():
        return sentences.tokenize(sentences.calibration_sentences()[:calib_samples])

    def evaluation():
        return sentences.tokenize(sentences.evaluation_sentences()), None

    return Case("minilm", lambda: zoo.build("minilm"), calib, evaluation, "embedding",
                ort_configs=(("all ops", None), ("MatMul only", ("MatMul",))))


def _bundled_case() -> Case:
    from models import bundled

    def evaluation():
        return bundled.test_data()

    return Case("fashion_cnn", bundled.model_path, bundled.calibration_data, evaluation, "accuracy")


def cases(names: list[str], calib_samples: int) -> list[Case]:
    factories = {
        "fashion_cnn": _bundled_case,
        "mobilenetv2": lambda: _image_case("mobilenetv2", calib_samples),
        "efficientnet_lite0": lambda: _image_case("efficientnet_lite0", calib_samples),
        "minilm": lambda: _minilm_case(calib_samples),
    }
    return [factories[name]() for name in names]


def score(case: Case, reference: np.ndarray, quantized: np.ndarray, labels: np.ndarray | None) -> dict:
    """The metrics of the issue for this model kind."""
    metrics = compare_outputs(reference, quantized)
    if case.kind == "accuracy":
        return {"accuracy": float(np.mean(quantized.argmax(1) == labels)),
                "top1_agreement": metrics["top1_agreement"]}
    if case.kind == "classifier":
        return {key: metrics[key] for key in ("top1_agreement", "top5_agreement", "kl")}
    return {"cosine": metrics["cosine"]}


def primary(case: Case) -> tuple[str, bool]:
    """The metric that ranks onnxruntime's configurations, and whether higher is better."""
    return {"accuracy": ("accuracy", True), "classifier": ("top1_agreement", True),
            "embedding": ("cosine", True)}[case.kind]


def latencies_ms(paths: dict[str, Path], sample: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    """Median batch-1 latency of each model, the models interleaved run by run.

    Interleaving makes background load hit every model alike, so the ratios
    stay meaningful on a shared machine.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in paths.items()}
    for session in sessions.values():
        for _ in range(10):
            session.run(None, sample)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, sample)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(values)) for name, values in times.items()}


def compare(case: Case, work: Path, runs: int) -> dict:
    print(f"== {case.name}", file=sys.stderr, flush=True)
    ready = case.prepare()
    model_path, calib, eval_inputs, labels = ready.model_path, ready.calib, ready.eval_inputs, ready.labels
    output, reference = ready.output, ready.reference
    result: dict = {"model": case.name, "calib_samples": int(next(iter(calib.values())).shape[0]),
                    "eval_samples": int(next(iter(eval_inputs.values())).shape[0])}
    if labels is not None:
        result["float"] = {"accuracy": float(np.mean(reference.argmax(1) == labels))}

    start = time.perf_counter()
    edgeq_out = work / f"{case.name}_edgeq"
    compile_model(CompileOptions(model=str(model_path), calib_data=calib, eval_inputs=eval_inputs,
                                 out_dir=str(edgeq_out), progress=False))
    result["edgeq_compile_s"] = time.perf_counter() - start
    edgeq_path = edgeq_out / "model.qdq.onnx"
    result["edgeq"] = score(case, reference, run_model(onnx.load(str(edgeq_path)), eval_inputs)[output], labels)

    key, _ = primary(case)
    ort_results = []
    for config, op_types in case.ort_configs:
        for method in ("MinMax", "Entropy", "Percentile", "Distribution"):
            path = work / f"{case.name}_ort_{method}_{config.replace(' ', '_')}.onnx"
            try:
                ort_quantize(model_path, calib, path, method=method, op_types=op_types)
                quantized = run_model(onnx.load(str(path)), eval_inputs)[output]
            except Exception as error:  # noqa: BLE001 - a failing configuration is reported, not fatal
                ort_results.append({"config": f"{method}, {config}", "error": str(error).splitlines()[0][:120]})
                continue
            ort_results.append({"config": f"{method}, {config}", "path": str(path),
                                **score(case, reference, quantized, labels)})
    scored = [entry for entry in ort_results if key in entry]
    best = max(scored, key=lambda entry: entry[key])
    result["ort_all"] = ort_results
    result["ort_best"] = best

    sample = {name: value[:1] for name, value in eval_inputs.items()}
    result["latency_ms"] = latencies_ms({"float": model_path, "ort_best": Path(best["path"]),
                                         "edgeq": edgeq_path}, sample, runs)
    print(json.dumps(result, indent=1), file=sys.stderr, flush=True)
    return result


def format_cell(value) -> str:
    """A metric as a table cell (floats to 4 decimals)."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_markdown(results: list[dict], path: Path, command: str) -> None:
    lines = ["## edgeq vs onnxruntime.quantization (W8A8, QDQ)", "",
             f"Command: `{command}`. Machine: {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores; onnxruntime {ort.__version__}. Latency: batch 1, median of the "
             "runs given (the three models interleaved run by run), default threads.", ""]
    for result in results:
        lines += [f"### {result['model']}", "",
                  f"Calibration samples: {result['calib_samples']}; evaluation samples: {result['eval_samples']}; "
                  f"edgeq compile time: {result['edgeq_compile_s']:.1f} s.", ""]
        metrics = [key for key in result["edgeq"]]
        lines += ["| quantizer | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        if "float" in result:
            lines.append("| float | " + " | ".join(format_cell(result["float"].get(k, "-")) for k in metrics) + " |")
        lines.append("| **edgeq** | " + " | ".join(format_cell(result["edgeq"][k]) for k in metrics) + " |")
        for entry in result["ort_all"]:
            best = " (best)" if entry is result["ort_best"] or entry.get("config") == result["ort_best"]["config"] else ""
            if "error" in entry:
                lines.append(f"| ort {entry['config']} | failed: {entry['error']} |" + " |" * (len(metrics) - 1))
            else:
                lines.append(f"| ort {entry['config']}{best} | " + " | ".join(format_cell(entry[k]) for k in metrics) + " |")
        latency = result["latency_ms"]
        lines += ["", f"Latency (ms): float {latency['float']:.3f}, onnxruntime best {latency['ort_best']:.3f}, "
                  f"edgeq {latency['edgeq']:.3f}.", ""]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fashion_cnn", "mobilenetv2", "efficientnet_lite0", "minilm"])
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/compare_ort.md"))
    args = parser.parse_args()
    command = "python tools/compare_ort.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        results = [compare(case, Path(tmp), args.runs) for case in cases(args.models, args.calib_samples)]
    write_markdown(results, Path(args.output), command.strip())
    for result in results:  # temporary paths mean nothing once the run is over
        for entry in result["ort_all"]:
            entry.pop("path", None)
    (Path(args.output).with_suffix(".json")).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
