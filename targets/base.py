"""The one interface every target implements: a cost model, a lowering, a runner.

* ``cost_model(device)`` -> :class:`CostModel`: what a layer costs at given
  bit-widths. It is the only thing the bit allocator knows about hardware.
* ``lower(ctx)``: turn the compiled model (QDQ ONNX, integer graph, plan) into
  the target's artifact inside the output folder.
* ``run(out_dir, inputs)``: execute that artifact on inputs (dict of input
  name -> array with the sample axis first) and return float outputs,
  dequantized like the QDQ model's. Used by ``edgeq run`` and for verification.
"""

from __future__ import annotations

import functools
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LayerShape:
    """What a cost model may know about one quantizable layer (from the float graph)."""

    node: str
    op_type: str  # Conv, ConvTranspose, Gemm, MatMul, Add, ...
    kind: str  # "conv", "pointwise" (1x1, one group), "depthwise", "gemm", "matmul", "eltwise", "pool",
    # "softmax", "lookup" (an elementwise function as a table), "other"
    macs: int  # multiply-accumulates per sample
    weight_params: int  # weight elements (0 for weightless layers)
    input_elems: int  # activation elements read per sample
    output_elems: int  # activation elements written per sample
    output_channels: int = 1


@dataclass
class LayerCost:
    """Cost of one layer at one (w_bits, a_bits) choice. Unknown metrics stay None."""

    weight_bytes: int
    activation_bytes: int  # bytes of the layer's output activation
    macs: int
    bitops: int  # macs * w_bits * a_bits
    latency_s: float | None = None
    energy_j: float | None = None
    resources: dict[str, float] = field(default_factory=dict)  # e.g. lut, dsp, bram


    def metrics(self) -> dict[str, float]:
        """Every known metric by name (None left out); ``flash_bytes`` defaults to the weight bytes."""
        values = {"weight_bytes": self.weight_bytes, "activation_bytes": self.activation_bytes,
                  "macs": self.macs, "bitops": self.bitops, "latency_s": self.latency_s,
                  "energy_j": self.energy_j, "flash_bytes": self.weight_bytes, **self.resources}
        return {key: float(value) for key, value in values.items() if value is not None}


# Operand width a float op is charged at: an op that stays float computes at 32 bits.
FLOAT_BITS = 32


class CostModel(ABC):
    """Per-layer costs and whole-device resources of one target device."""

    name: str = "abstract"
    # The (w_bits, a_bits) pairs this target's lowering runs and the allocator may choose
    # from; a weightless layer (Add, pooling) takes any of their a_bits.
    bit_pairs: tuple[tuple[int, int], ...] = ((4, 8), (8, 8))

    @abstractmethod
    def layer_cost(self, layer: LayerShape, w_bits: int | None, a_bits: int) -> LayerCost: ...

    def resources(self) -> dict[str, float]:
        """Device limits (flash_bytes, sram_bytes, lut, dsp, ...); empty if unbounded."""
        return {}

    def online_op_cost(self, op: LayerShape) -> LayerCost:
        """Cost of a float op a transform inserted that runs at inference (an online rotation).

        It stays float (passes/select_layers keeps it so), so it is charged as a
        layer with 32-bit weights and activations; targets with a cheaper float
        path override this.
        """
        return self.layer_cost(op, FLOAT_BITS, FLOAT_BITS)

    def fixed_costs(self, layers: list[LayerShape], online_ops: list[LayerShape] = ()) -> dict[str, float]:
        """Costs no bit choice changes, by metric: here the online ops' (targets add e.g. code bytes)."""
        totals: dict[str, float] = {}
        for op in online_ops:
            for metric, value in self.online_op_cost(op).metrics().items():
                totals[metric] = totals.get(metric, 0.0) + value
        return totals


def packed_bytes(elements: int, bits: int | None) -> int:
    """Bytes to store ``elements`` values of ``bits`` each, sub-byte values packed."""
    if not bits:
        return 0
    return (elements * bits + 7) // 8


@dataclass
class CompileContext:
    """What a target's lowering gets from the pipeline."""

    out_dir: Path
    qdq_model_path: Path
    plan: Any  # compiler.plan.QuantPlan
    int_model: Any = None  # compiler.intgraph ModelProto, when the target needs it
    calib_inputs: dict[str, np.ndarray] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # device, target_triple, ...


class Target(ABC):
    """A kind of hardware edgeq compiles for."""

    name: str = "abstract"
    needs_integer_graph: bool = True
    # False for a target the allocator can plan for but whose lowering does not exist yet:
    # edgeq compile refuses it before any work (check_can_lower), edgeq allocate takes it.
    can_lower: bool = True
    # The options ``run``/``benchmark`` take (``edgeq run --threads`` / ``--on``): one given for a
    # target without it is refused, not ignored.
    run_options: frozenset[str] = frozenset()
    # Whether the lowering builds for another machine (``edgeq compile --target-triple``); a
    # triple given to a target that ignores it is refused.
    cross_compiles: bool = False

    def check_can_lower(self) -> None:
        """A one-line EdgeqError unless ``edgeq compile`` can produce this target's artifact."""
        if not self.can_lower:
            from compiler.errors import EdgeqError

            raise EdgeqError(f"target '{self.name}' lowering is not implemented yet "
                             f"(edgeq allocate --target {self.name} works)")

    def check_inputs(self, out_dir: Path, inputs: dict[str, np.ndarray], source: str = "inputs"
                     ) -> dict[str, np.ndarray]:
        """``inputs`` checked against the compiled model's inputs (:func:`check_run_inputs`); every
        runner calls this first, so all targets accept and refuse the same inputs."""
        return check_run_inputs(out_dir, inputs, source)

    def cost_model(self, device: str | None = None) -> CostModel:
        """The cost model in ``targets/<name>/cost.py`` (imported on demand: the allocator's only view)."""
        import importlib

        return importlib.import_module(f"targets.{self.name}.cost").cost_model(device)

    @abstractmethod
    def lower(self, ctx: CompileContext) -> list[Path]:
        """Write the artifact into ``ctx.out_dir``; return the paths written."""

    @abstractmethod
    def run(self, out_dir: Path, inputs: dict[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
        """Run the artifact in ``out_dir`` on ``inputs``; float outputs by output name."""

    def measure_latency(self, out_dir: Path, inputs: dict[str, np.ndarray]) -> dict[str, Any] | None:
        """One sample's latency on this machine, timed the way the cost model prices latency (the
        check of a latency budget after compiling: compiler.mixed.check_latency); ``None`` where this
        machine does not run the artifact as deployed (an emulator, another device)."""
        return None

    def benchmark(self, out_dir: Path, inputs: dict[str, np.ndarray], repeat: int = 50,
                  **options: Any) -> dict[str, Any]:
        """Median latency of one sample. Targets override this to exclude loading time."""
        sample = {name: value[:1] for name, value in inputs.items()}
        self.run(out_dir, sample, **options)  # warm-up
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            self.run(out_dir, sample, **options)
            times.append(time.perf_counter() - start)
        return latency_summary(times, includes_loading=True)


class CostModelOnlyTarget(Target):
    """A target the allocator can plan for whose lowering does not exist yet, and says so."""

    can_lower = False

    def lower(self, ctx: CompileContext) -> list[Path]:
        self.check_can_lower()
        return []

    def run(self, out_dir: Path, inputs: dict[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
        from compiler.errors import EdgeqError

        raise EdgeqError(f"target '{self.name}' has no runner yet: its lowering is not implemented")


# Every edgeq compile output folder has the QDQ model, whose graph inputs are the compiled model's.
QDQ_MODEL_FILE = "model.qdq.onnx"


def check_run_inputs(out_dir: Path, inputs: dict[str, np.ndarray], source: str = "inputs") -> dict[str, np.ndarray]:
    """``inputs`` for running the artifact in ``out_dir``, checked against its model's inputs: names,
    dtypes (a float of another width or a safe integer widening is cast; uint8 for a float input is a
    one-line EdgeqError naming the input and both dtypes) and per-sample shapes
    (:func:`compiler.data.check_run_inputs`). A folder without the QDQ model (a bare lowering)
    is left to the target's own checks."""
    from compiler.data import check_run_inputs as check

    path = Path(out_dir) / QDQ_MODEL_FILE
    if not path.is_file():
        return inputs
    stat = path.stat()
    return check(_input_specs(str(path.resolve()), stat.st_mtime_ns, stat.st_size), inputs, source)


@functools.lru_cache(maxsize=8)
def _input_specs(path: str, mtime_ns: int, size: int) -> list:
    """The graph inputs of the model at ``path`` (cached per file version: runners check every call)."""
    import onnx

    from compiler.data import model_inputs

    return model_inputs(onnx.load(path, load_external_data=False))


def compare_integer_outputs(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> dict[str, Any]:
    """Bit-for-bit comparison of integer outputs: counts, max abs diff, ``bit_exact`` (overall and per output)."""
    outputs = {}
    for name, want in expected.items():
        have = got[name]
        if have.shape != want.shape:
            outputs[name] = {"shape": list(have.shape), "expected_shape": list(want.shape),
                             "bit_exact": False}
            continue
        diff = np.abs(have.astype(np.int64) - want.astype(np.int64))
        outputs[name] = {"values": int(diff.size), "mismatched_values": int(np.count_nonzero(diff)),
                         "max_abs_diff": int(diff.max(initial=0)),
                         "bit_exact": bool(not diff.any() and have.dtype == want.dtype)}
    return {"bit_exact": all(entry["bit_exact"] for entry in outputs.values()), "outputs": outputs}


def latency_summary(seconds: list[float], **extra: Any) -> dict[str, Any]:
    """The JSON ``edgeq run --json`` prints: median (and spread) of per-sample latencies."""
    ordered = sorted(seconds)
    return {
        "median_ms": 1e3 * float(np.median(ordered)),
        "p10_ms": 1e3 * float(ordered[len(ordered) // 10]),
        "p90_ms": 1e3 * float(ordered[(9 * len(ordered)) // 10]),
        "runs": len(ordered),
        **extra,
    }


_REGISTRY: dict[str, str] = {
    "onnx": "targets.onnx",
    "cpu": "targets.cpu",
    "gpu": "targets.gpu",
    "mcu": "targets.mcu",
    "fpga": "targets.fpga",
}


def target_names() -> list[str]:
    return list(_REGISTRY)


def get_target(name: str) -> Target:
    """The target called ``name`` (each target package exposes ``TARGET``)."""
    import importlib

    from compiler.errors import EdgeqError

    if name not in _REGISTRY:
        raise EdgeqError(f"unknown target '{name}' (choose from {', '.join(_REGISTRY)})")
    module = importlib.import_module(_REGISTRY[name])
    target = getattr(module, "TARGET", None)
    if target is None:
        raise EdgeqError(f"target '{name}' is not available in this build")
    return target
