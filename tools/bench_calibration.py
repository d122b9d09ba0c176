"""Calibration speed and memory on a real model: writes benchmarks/calibration.md.

Usage:
    python tools/bench_calibration.py                      # MobileNetV2 from models.zoo, real photo crops
    python tools/bench_calibration.py --model m.onnx --calib DIR [--preprocess SPEC]

For the model, it times (wall clock, this machine):

* the float model alone in onnxruntime (nothing exposed), as the floor;
* the calibration loop with every float activation exposed and a no-op callback
  (onnxruntime + handing out the tensors);
* ``collect_ranges`` with each observer method, over every float activation
  (the worst case; the pipeline exposes only the tensors it quantizes);

and, in fresh subprocesses, the peak resident memory of a min-max calibration
with N and 4N samples (memory must not grow with the sample count beyond the
data itself). The machine is shared: the load average is written next to the
numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compiler.calibrate import collect_ranges, run_batches  # noqa: E402
from compiler.data import load_calibration  # noqa: E402
from compiler.observers import METHODS  # noqa: E402


def float_activations(model: onnx.ModelProto) -> list[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {
        value.name
        for value in list(inferred.graph.value_info) + list(inferred.graph.output)
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    }
    return [out for node in model.graph.node for out in node.output if out in floats]


def load_model_and_data(args) -> tuple[Path, dict[str, np.ndarray], str]:
    if args.model:
        model_path = Path(args.model)
        model = onnx.load(model_path)
        if args.calib:
            data = load_calibration(args.calib, model, preprocess=args.preprocess)
            source = f"{args.calib}"
        else:
            data = load_calibration(None, model, random_samples=args.samples)
            source = "random N(0,1) data"
        return model_path, data, source
    from models import photos, zoo

    model_path = zoo.build("mobilenetv2")
    images = photos.calibration_images(min(args.samples, 128), zoo.PREPROCESSING["mobilenetv2"])
    return model_path, {"input": np.ascontiguousarray(images)}, "models.photos calibration crops"


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def peak_rss_child(model_path: Path, samples: int, batch_size: int) -> dict:
    """Peak RSS (MiB, Linux VmHWM) of a min-max calibration over every activation, in a fresh process."""
    code = f"""
import json, sys, numpy as np, onnx
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from compiler.calibrate import collect_ranges
from tools.bench_calibration import float_activations
model = onnx.load({str(model_path)!r})
shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
data = {{model.graph.input[0].name: np.random.default_rng(0).normal(size=[{samples}] + shape).astype(np.float32)}}
def peak():  # VmHWM restarts at exec (ru_maxrss would carry the parent's peak)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024
before = peak()
collect_ranges(model, data, float_activations(model), method="minmax", batch_size={batch_size}, progress=False)
after = peak()
print(json.dumps({{"data_mib": data[model.graph.input[0].name].nbytes / 2**20, "peak_before_mib": before, "peak_mib": after}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="float ONNX model (default: MobileNetV2 from models.zoo)")
    parser.add_argument("--calib", help="calibration data for --model (else random)")
    parser.add_argument("--preprocess")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", default="benchmarks/calibration.md")
    args = parser.parse_args()

    model_path, data, source = load_model_and_data(args)
    model = onnx.load(model_path)
    names = float_activations(model)
    samples = len(next(iter(data.values())))
    load_before = os.getloadavg()[0]
    output = model.graph.output[0].name
    rows = [
        ("float model only (1 output)", timed(lambda: run_batches(
            model, data, [output], lambda batch: None, batch_size=args.batch_size, progress=False))),
        (f"loop, {len(names)} activations exposed, no-op callback", timed(lambda: run_batches(
            model, data, names, lambda batch: None, batch_size=args.batch_size, progress=False))),
    ]
    for method in args.methods.split(","):
        rows.append((f"collect_ranges method={method}", timed(lambda method=method: collect_ranges(
            model, data, names, method=method, batch_size=args.batch_size, progress=False))))
    load_after = os.getloadavg()[0]
    memory = []
    if not args.no_memory:
        for count in (args.samples // 4, args.samples):
            memory.append((count, peak_rss_child(model_path, count, args.batch_size)))

    lines = [
        "## Calibration engine (tools/bench_calibration.py)",
        "",
        f"Model `{model_path.name}`, {samples} samples ({source}), batch {args.batch_size}, "
        f"{len(names)} float activations observed (every one: the worst case). "
        f"onnxruntime CPU, {os.cpu_count()} cores shared with other jobs: load average "
        f"{load_before:.1f} before, {load_after:.1f} after the timings.",
        "",
        "| run | seconds | ms / sample |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {seconds:.1f} | {1000 * seconds / samples:.1f} |" for label, seconds in rows]
    if memory:
        lines += [
            "",
            "Peak resident memory of a min-max calibration over every activation (fresh process):",
            "",
            "| samples | input data MiB | peak RSS before calibrating MiB | peak RSS MiB |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {count} | {m['data_mib']:.0f} | {m['peak_before_mib']:.0f} | {m['peak_mib']:.0f} |"
            for count, m in memory
        ]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
