"""The CPU target: integer-only code for the host CPU (and cross-compiled for Arm) via TVM.

* cost model: :mod:`targets.cpu.cost` (imported lazily).
* lowering: :mod:`targets.cpu.lower` -- the integer graph as one Relax module,
  exported as ``out_dir/cpu/lib.so`` + ``manifest.json`` (and
  ``out_dir/cpu/<triple>/lib.so`` with the ``target_triple`` option); the
  integer graph as ``out_dir/model.int.onnx``; ``out_dir/verify.json``: the
  library against the reference interpreter, bit for bit, on the calibration
  inputs (at most ``verify_samples`` of them, default 16).
* runner: :mod:`targets.cpu.runner` -- :meth:`CpuTarget.run` (float outputs),
  :meth:`CpuTarget.run_raw` (integer outputs), :meth:`CpuTarget.benchmark`
  (median latency per sample as JSON), :meth:`CpuTarget.measure_latency` (the
  same at one thread in a fresh process: what the cost model prices).

Options read from ``CompileContext.options``: ``target_triple`` (e.g.
``aarch64-linux-gnu``), ``mcpu`` (for the cross target), ``cpu_schedules``
(default True: use :mod:`targets.cpu.schedules`' hand-written kernels where they
apply), ``verify_samples``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compiler.atomic import atomic_dir, atomic_write_bytes, atomic_write_text
from compiler.console import warn
from targets.base import CompileContext, Target, compare_integer_outputs

INT_MODEL_FILE = "model.int.onnx"
VERIFY_FILE = "verify.json"
CPU_DIR = "cpu"
DEFAULT_VERIFY_SAMPLES = 16
MEASURE_REPEAT = 200  # runs of one sample (a 20 ms model: 4 s); a median of many steadies it on a busy host
MEASURE_BLOCKS = 4  # ... and the lowest of 4 block medians, 0.25 s apart, is steadier still (runner.benchmark)
# Run in a fresh process: TVM's thread pool is sized by a process's first run, and compile has run
# the library already (verification) at the default thread count.
_MEASURE = ("import json, sys\n"
            "from pathlib import Path\n"
            "import numpy as np\n"
            "from targets.cpu import TARGET\n"
            "inputs = dict(np.load(sys.argv[2]))\n"
            "print(json.dumps(TARGET.benchmark(Path(sys.argv[1]), inputs, repeat=int(sys.argv[3]), threads=1,\n"
            "                                  blocks=int(sys.argv[4]))))\n")


# The cpu target's name for the shared comparison (tests and tools import it from here).
compare_raw = compare_integer_outputs


class CpuTarget(Target):
    name = "cpu"
    run_options = frozenset({"threads"})
    cross_compiles = True
    needs_integer_graph = True

    def lower(self, ctx: CompileContext) -> list[Path]:
        from targets.cpu.lower import lower_to_dir

        out_dir = Path(ctx.out_dir)
        int_model = ctx.int_model
        if int_model is None:
            from passes.integerize import integerize

            int_model = integerize(onnx.load(str(ctx.qdq_model_path)))
        options = ctx.options or {}
        with atomic_dir(out_dir / CPU_DIR) as tmp:
            lower_to_dir(int_model, tmp, target_triple=options.get("target_triple"),
                         use_schedules=options.get("cpu_schedules", True), mcpu=options.get("mcpu"))
        atomic_write_bytes(out_dir / INT_MODEL_FILE, int_model.SerializeToString())
        paths = [out_dir / CPU_DIR, out_dir / INT_MODEL_FILE]
        if ctx.calib_inputs:
            count = int(options.get("verify_samples", DEFAULT_VERIFY_SAMPLES))
            sample = {name: np.asarray(value)[:count] for name, value in ctx.calib_inputs.items()}
            report = self.verify(out_dir, sample, int_model)
            if not report["bit_exact"]:  # a lowering bug: say so, the library is written all the same
                differing = "; ".join(
                    f"{name}: {entry['mismatched_values']} of {entry['values']} values, by up to {entry['max_abs_diff']}"
                    if "values" in entry else f"{name}: shape {entry['shape']}, expected {entry['expected_shape']}"
                    for name, entry in report["outputs"].items() if not entry["bit_exact"])
                warn(f"cpu library differs from the reference interpreter on {report['samples']} calibration samples "
                     f"({differing}; see verify.json)")
            paths.append(out_dir / VERIFY_FILE)
        return paths

    def verify(self, out_dir: Path, inputs: dict[str, np.ndarray],
               int_model: onnx.ModelProto | None = None) -> dict[str, Any]:
        """The library's integer outputs against the interpreter's; writes ``verify.json``."""
        from compiler.interpreter import run_integer_graph_raw

        out_dir = Path(out_dir)
        if int_model is None:
            int_model = onnx.load(str(out_dir / INT_MODEL_FILE))
        got = self.run_raw(out_dir, inputs)
        expected = run_integer_graph_raw(int_model, inputs)
        report = {"target": self.name, "samples": int(len(next(iter(inputs.values())))),
                  **compare_raw(got, expected)}
        atomic_write_text(out_dir / VERIFY_FILE, json.dumps(report, indent=1) + "\n")
        return report

    def run(self, out_dir: Path, inputs: dict[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
        from targets.cpu import runner

        runner.configure_threads(options.get("threads"))
        return runner.run(Path(out_dir), self.check_inputs(out_dir, inputs))

    def run_raw(self, out_dir: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from targets.cpu import runner

        return runner.run_raw(Path(out_dir), inputs)

    def measure_latency(self, out_dir: Path, inputs: dict[str, np.ndarray]) -> dict[str, Any] | None:
        """:meth:`benchmark` of the first sample at one thread (the cost model's setting), in a fresh
        Python process; its JSON. An EdgeqError names what failed."""
        from compiler.errors import EdgeqError

        root = str(Path(__file__).resolve().parents[2])  # where the targets package is importable from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        with tempfile.TemporaryDirectory(prefix="edgeq_measure_") as tmp:
            sample = Path(tmp) / "sample.npz"
            np.savez(sample, **{name: np.asarray(value)[:1] for name, value in inputs.items()})
            done = subprocess.run([sys.executable, "-c", _MEASURE, str(out_dir), str(sample), str(MEASURE_REPEAT),
                                   str(MEASURE_BLOCKS)],
                                  capture_output=True, text=True, env=env)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise EdgeqError(f"timing the compiled library failed: {last}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def benchmark(self, out_dir: Path, inputs: dict[str, np.ndarray], repeat: int = 50,
                  **options: Any) -> dict[str, Any]:
        from targets.cpu import runner

        threads = runner.configure_threads(options.get("threads"))
        result = runner.benchmark(Path(out_dir), self.check_inputs(out_dir, inputs), repeat=repeat,
                                  warmup=int(options.get("warmup", 5)), blocks=int(options.get("blocks", 1)),
                                  pause_s=float(options.get("pause_s", 0.25)))
        return {**result, "threads": threads}


TARGET = CpuTarget()
