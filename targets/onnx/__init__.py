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
    needs_integer_graph = False

    def lower(self, ctx: CompileContext) -> list[Path]:
        return [ctx.qdq_model_path]

    def run(self, out_dir: Path, inputs: dict[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
        sess = session(out_dir, options.get("threads"))
        names = [output.name for output in sess.get_outputs()]
        return dict(zip(names, sess.run(names, inputs), strict=True))

    def benchmark(self, out_dir: Path, inputs: dict[str, np.ndarray], repeat: int = 50,
                  **options: Any) -> dict[str, Any]:
        sess = session(out_dir, options.get("threads"))
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
