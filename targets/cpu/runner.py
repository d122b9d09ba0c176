"""Load and run the CPU library of ``out_dir/cpu/`` (TVM runtime + Relax VM).

Inputs are float arrays keyed by graph input name with the sample axis first;
each sample is quantized -- by the library itself where the manifest's input entry
has ``library_dtype`` (the input edge compiled in, bit-exact with the interpreter's
:func:`compiler.requant.quantize_linear`), else with that numpy function -- run
through the library at batch 1, and the integer outputs are dequantized with
:func:`compiler.requant.dequantize_linear`.

* :func:`run` -- float outputs, like the QDQ model's.
* :func:`run_raw` -- integer outputs (what ``verify.json`` compares).
* :func:`benchmark` -- median latency per sample (quantize + library +
  dequantize of one sample, after warm-up; loading excluded), as
  :func:`targets.base.latency_summary` JSON.

Threads: TVM's pool reads ``TVM_NUM_THREADS`` once, at the first parallel run in
the process; unset, TVM takes half the CPUs on x86 (it assumes hyper-threading),
which is one thread on a 2-core machine. :func:`configure_threads` sets it first.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import EdgeqError
from compiler.requant import dequantize_linear, quantize_linear
from targets.base import latency_summary
from targets.cpu.lower import MANIFEST


def configure_threads(threads: int | None = None) -> int:
    """Threads for TVM's pool: ``threads`` when given, else ``TVM_NUM_THREADS`` as set, else
    every CPU this process may use. Takes effect only before the first run in the process."""
    if threads is not None:
        if threads < 1:
            raise EdgeqError(f"--threads must be >= 1, not {threads}")
        os.environ["TVM_NUM_THREADS"] = str(threads)
    else:
        os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    return int(os.environ["TVM_NUM_THREADS"])


_LOADING = threading.Lock()  # one copy per content and process: threads must not remove it under each other


def load_library(path: Path) -> Any:
    """``tvm.runtime.load_module`` of the library as it is on disk now.

    dlopen hands back the library already loaded under the same path name, even once the file
    has been replaced: a compile that re-plans writes its second build's lib.so where the first
    one's was, and verifying it in the same process ran the first build's code (and a script that
    compiles twice into one folder would run the old library). So the library is loaded from a
    copy named by its content (a replaced file gets a new name; the same content may share the
    loaded one), removed once loaded."""
    import tvm

    content = path.read_bytes()
    digest = hashlib.sha256(content).hexdigest()[:20]
    copy = Path(tempfile.gettempdir()) / f"edgeq-lib-{os.getpid()}-{digest}{path.suffix}"
    with _LOADING:
        copy.write_bytes(content)
        try:
            return tvm.runtime.load_module(str(copy))
        finally:
            copy.unlink(missing_ok=True)


class CpuModule:
    """A loaded library with its manifest."""

    def __init__(self, cpu_dir: Path) -> None:
        import tvm
        from tvm import relax

        manifest_path = cpu_dir / MANIFEST
        if not manifest_path.exists():
            raise EdgeqError(f"{cpu_dir} has no {MANIFEST}: compile with --target cpu first")
        self.manifest = json.loads(manifest_path.read_text())
        library = load_library(cpu_dir / self.manifest["library"])
        self.device = tvm.cpu()
        self.vm = relax.VirtualMachine(library, self.device)
        self.main = self.vm["main"]
        self._tensor = tvm.runtime.tensor
        self._inputs: dict[str, Any] = {}

    def samples(self, inputs: dict[str, np.ndarray]) -> int:
        counts = set()
        for entry in self.manifest["inputs"]:
            if entry["name"] not in inputs:
                raise EdgeqError(f"inputs lack '{entry['name']}' (the model's input)")
            value = np.asarray(inputs[entry["name"]])
            if list(value.shape[1:]) != entry["shape"][1:]:
                raise EdgeqError(f"input '{entry['name']}' has shape {list(value.shape)}; expected "
                                 f"[N, {', '.join(map(str, entry['shape'][1:]))}]")
            counts.add(value.shape[0])
        if len(counts) != 1:
            raise EdgeqError(f"inputs disagree on the number of samples: {sorted(counts)}")
        return counts.pop()

    def quantize(self, inputs: dict[str, np.ndarray], index: int) -> list:
        """The library's arguments for sample ``index``: the float input where the library
        quantizes it itself (``library_dtype`` in the manifest), else the quantized input."""
        tensors = []
        for entry in self.manifest["inputs"]:
            q = entry["quant"]
            value = np.asarray(inputs[entry["name"]])[index:index + 1]
            if "library_dtype" in entry:
                value = value.astype(entry["library_dtype"], copy=False)
            else:
                value = quantize_linear(value, q["scale"], q["zero_point"], q["qmin"], q["qmax"], q["dtype"])
            tensors.append(self._input_tensor(entry["name"], np.ascontiguousarray(value)))
        return tensors

    def _input_tensor(self, name: str, value: np.ndarray):
        """``value`` in this input's TVM tensor, allocated once: a fresh one per call costs an
        allocation (an mmap for a 224x224 image) and its page faults on every run."""
        tensor = self._inputs.get(name)
        if tensor is None or tuple(tensor.shape) != value.shape or tensor.dtype != str(value.dtype):
            tensor = self._inputs[name] = self._tensor(value, self.device)
        else:
            tensor.copyfrom(value)
        return tensor

    def run_sample_raw(self, inputs: dict[str, np.ndarray], index: int) -> list[np.ndarray]:
        outputs = self.main(*self.quantize(inputs, index))
        return [outputs[i].numpy() for i in range(len(self.manifest["outputs"]))]

    def run_raw(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = self.samples(inputs)
        per_sample = [self.run_sample_raw(inputs, index) for index in range(count)]
        return {entry["name"]: np.concatenate([sample[i] for sample in per_sample])
                for i, entry in enumerate(self.manifest["outputs"])}

    def run_sample(self, inputs: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
        """Float outputs of sample ``index`` (quantize, library, dequantize)."""
        names = [entry["name"] for entry in self.manifest["outputs"]]
        return self.dequantize(dict(zip(names, self.run_sample_raw(inputs, index), strict=True)))

    def dequantize(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = {}
        for entry in self.manifest["outputs"]:
            q = entry.get("quant")
            value = raw[entry["name"]]
            result[entry["name"]] = dequantize_linear(value, q["scale"], q["zero_point"]) if q else value
        return result


def load(out_dir: Path) -> CpuModule:
    return CpuModule(Path(out_dir) / "cpu")


def run(out_dir: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    module = load(out_dir)
    return module.dequantize(module.run_raw(inputs))


def run_raw(out_dir: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return load(out_dir).run_raw(inputs)


def benchmark(out_dir: Path, inputs: dict[str, np.ndarray], repeat: int = 50, warmup: int = 5,
              blocks: int = 1, pause_s: float = 0.25) -> dict[str, Any]:
    """Median per-sample latency of the first sample (loading excluded).

    With ``blocks`` > 1 the runs are split into that many blocks ``pause_s`` apart,
    and ``settled_ms`` is the lowest of the blocks' medians: on a shared host a
    burst of other work slows some blocks, not all (in 15 back-to-back timings of
    MobileNetV2 its spread was 0.5% against 1.3% for one median of 200 runs;
    benchmarks/cpu.md).
    """
    module = load(out_dir)
    module.samples(inputs)
    sample = {name: np.asarray(value)[:1] for name, value in inputs.items()}
    for _ in range(warmup):
        module.run_sample(sample, 0)
    per_block = -(-max(repeat, 1) // max(blocks, 1))
    times, block_medians = [], []
    for block in range(max(blocks, 1)):
        if block:
            time.sleep(pause_s)
        block_times = []
        for _ in range(per_block):
            start = time.perf_counter()
            module.run_sample(sample, 0)
            block_times.append(time.perf_counter() - start)
        times += block_times
        block_medians.append(1e3 * float(np.median(block_times)))
    extra = {"settled_ms": min(block_medians), "block_medians_ms": block_medians} if blocks > 1 else {}
    return latency_summary(times, includes_loading=False, batch=1,
                           tvm_target=module.manifest.get("tvm_target"), **extra)
