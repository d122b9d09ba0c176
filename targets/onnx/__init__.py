"""The ``onnx`` target: the QDQ model itself, for onnxruntime, TensorRT, OpenVINO.

Lowering adds nothing to what the pipeline writes (model.qdq.onnx); running
uses onnxruntime on the CPU.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from compiler.data import padded_batches
from compiler.errors import EdgeqError
from targets.base import CompileContext, Target, latency_summary

MODEL_FILE = "model.qdq.onnx"


def session(out_dir: Path, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session over the QDQ model in ``out_dir``."""
    path = Path(out_dir) / MODEL_FILE
    if not path.exists():
        raise EdgeqError(f"{out_dir} has no {MODEL_FILE}: run 'edgeq compile ... -o {out_dir}' first")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxTarget(Target):
    name = "onnx"
    run_options = frozenset({"threads"})
    needs_integer_graph = False

    def lower(self, ctx: CompileContext) -> list[Path]:
        return [ctx.qdq_model_path]

    def run(self, out_dir: Path, inputs: dict[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
        sess = session(out_dir, options.get("threads"))
        inputs = self.check_inputs(out_dir, inputs)
        names = [output.name for output in sess.get_outputs()]
        fixed = min((shape[0] for shape in (value.shape for value in sess.get_inputs())
                     if shape and isinstance(shape[0], int) and shape[0] > 0), default=None)
        if fixed is None:
            return dict(zip(names, sess.run(names, inputs), strict=True))
        # A model with a fixed batch (often 1 at the edge) runs in batches of that size, the last padded.
        parts = [[output[:count] for output in sess.run(names, batch)]
                 for batch, count in padded_batches(inputs, fixed, fixed)]
        return {name: np.concatenate([part[i] for part in parts]) for i, name in enumerate(names)}

    def benchmark(self, out_dir: Path, inputs: dict[str, np.ndarray], repeat: int = 50,
                  **options: Any) -> dict[str, Any]:
        sess = session(out_dir, options.get("threads"))
        inputs = self.check_inputs(out_dir, inputs)
        sample = {name: value[:1] for name, value in inputs.items()}
        for _ in range(5):
            sess.run(None, sample)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            sess.run(None, sample)
            times.append(time.perf_counter() - start)
        return latency_summary(times, runtime=f"onnxruntime {ort.__version__}")


TARGET = OnnxTarget()
