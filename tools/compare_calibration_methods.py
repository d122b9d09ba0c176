"""Which activation calibration method keeps MobileNetV2 closest to float?

Usage:
    python tools/compare_calibration_methods.py [--percentiles 99.9,99.99,99.999] [--out FILE]

One calibration pass over the real photo crops (models.photos, 128 calibration
crops) feeds every observer at once; then for each method a W8A8 QDQ model is
built with the same plan (passes.select_layers, per-channel min-max int8
weights, uint8 activations, no equivalence transforms and no weight rounding
recipe, so only the activation ranges differ) and compared with the float
model on the evaluation crops (disjoint photos): top-1 / top-5 agreement and
mean KL(float || quantized) of the softmax. It also reports, per method, on how
many tensors the method's range gives the lowest quantization MSE of the tensor
itself (on the calibration data), to separate "good for the tensor" from "good
for the network". Appends its section to benchmarks/calibration.md (or --out).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compiler.calibrate import observer_range, run_batches  # noqa: E402
from compiler.fidelity import run_model  # noqa: E402
from compiler.observers import fake_quantize, make_observer, quant_params  # noqa: E402


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def agreement(reference: np.ndarray, quantized: np.ndarray) -> tuple[float, float, float]:
    top1_ref = reference.argmax(axis=1)
    top5 = np.argsort(-quantized, axis=1)[:, :5]
    p, q = softmax(reference.astype(np.float64)), softmax(quantized.astype(np.float64))
    kl = np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)
    return (
        float(np.mean(top1_ref == quantized.argmax(axis=1))),
        float(np.mean(np.any(top5 == top1_ref[:, None], axis=1))),
        float(np.mean(kl)),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--percentiles", default="99.9,99.99,99.999")
    parser.add_argument("--out", default="benchmarks/calibration.md")
    args = parser.parse_args()

    import onnx

    from models import photos, zoo
    from passes.canonicalize import canonicalize
    from passes.insert_qdq import quantize_model, tensors_to_calibrate
    from passes.select_layers import select_layers

    model = canonicalize(onnx.load(zoo.build("mobilenetv2")))
    preprocessing = zoo.PREPROCESSING["mobilenetv2"]
    calib = {"input": np.ascontiguousarray(photos.calibration_images(None, preprocessing))}
    evaluation = {"input": np.ascontiguousarray(photos.evaluation_images(preprocessing))}
    names = tensors_to_calibrate(model, select_layers(model, w_bits=8, a_bits=8))

    methods: dict[str, dict] = {"minmax": {}, "entropy": {}, "mse": {}}
    for value in args.percentiles.split(","):
        methods[f"percentile {value}"] = {"percentile": float(value)}
    observers = {
        (label, name): make_observer(label.split()[0], **options)
        for label, options in methods.items()
        for name in names
    }
    # a strided sample of every tensor (1/17 of the values) to score each range on the tensor
    # itself; 17 divides no MobileNetV2 dim, so the sample does not alias onto a few columns
    samples: dict[str, list[np.ndarray]] = {name: [] for name in names}

    def update(batch):
        for (_, name), observer in observers.items():
            observer.update(batch[name])
        for name in names:
            samples[name].append(batch[name].reshape(-1)[::17].copy())

    start = time.perf_counter()
    run_batches(model, calib, names, update, progress=False)
    seconds = time.perf_counter() - start
    ranges = {
        label: {name: observer_range(observers[(label, name)], 8, False, False) for name in names}
        for label in methods
    }

    tensor_wins = dict.fromkeys(methods, 0)
    for name in names:
        values = np.concatenate(samples[name]).astype(np.float64)
        errors = {}
        for label in methods:
            scale, zero_point = quant_params(*ranges[label][name], 8, False, False)
            errors[label] = np.mean((fake_quantize(values, scale, zero_point, 8, False) - values) ** 2)
        tensor_wins[min(errors, key=errors.get)] += 1

    reference = run_model(model, evaluation)["logits"]
    rows = []
    for label in methods:
        qdq = quantize_model(model, select_layers(model, w_bits=8, a_bits=8), ranges[label])
        rows.append((label, *agreement(reference, run_model(qdq, evaluation)["logits"]), tensor_wins[label]))
        print(rows[-1], flush=True)

    lines = [
        "",
        "## Activation calibration methods on MobileNetV2 (tools/compare_calibration_methods.py)",
        "",
        f"W8A8 (uint8 activations per tensor, int8 per-channel min-max weights, no transforms), "
        f"{len(calib['input'])} calibration crops, {len(evaluation['input'])} evaluation crops of "
        f"other photos; {len(names)} activation tensors; all observers fed in one pass "
        f"({seconds:.1f} s, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores). "
        "Agreement is with the float model; 'lowest tensor MSE' counts the tensors on which the "
        "method's range has the smallest quantization MSE of the tensor itself.",
        "",
        "| activation ranges | top-1 agreement | top-5 agreement | mean KL | lowest tensor MSE on |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {label} | {top1:.3f} | {top5:.3f} | {kl:.4f} | {wins} / {len(names)} |"
        for label, top1, top5, kl, wins in rows
    ]
    with open(args.out, "a") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
