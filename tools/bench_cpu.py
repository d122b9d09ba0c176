"""Batch-1 CPU latency: onnxruntime (float, its own u8s8 QDQ, edgeq's QDQ) vs the edgeq CPU library.

For each model (MobileNetV2 and EfficientNet-Lite0 from models/zoo, a ResNet-18-shaped network built
here with random weights, the bundled Fashion-MNIST CNN when present) this
tool

1. quantizes it with ``onnxruntime.quantization.quantize_static`` (QDQ,
   per-channel, uint8 activations, int8 weights) -- onnxruntime's own u8s8 model;
2. compiles it with edgeq (``compile_model(target="cpu")``, w8a8, uint8
   activations) and records the compile time;
3. measures, at 1 and 2 threads, in a fresh process per thread count
   (``TVM_NUM_THREADS`` is read once per process): (a) onnxruntime float,
   (b) onnxruntime on its u8s8 QDQ model, (c) onnxruntime on edgeq's QDQ model,
   (d) the edgeq library (float in, float out: the library quantizes its input
   itself, the runner dequantizes the output), and the library call alone on an
   input already in a TVM tensor; at 1 thread also each kernel of the library alone.

Timing: each engine runs alone in a process of its own (as a deployment
runs it; one process per engine and thread count, all alive together, 20
warm-up runs each). The parent takes turns: a burst of 10 runs (after 3
untimed ones that wake the pool) of each engine on each model, the engine
order reversed every round, until ``--runs`` runs per engine. This host's
slow phases last seconds (seen: the same library at 1.3 ms for 250 calls,
then 2.4 ms; no steal or run-queue wait shows inside the VM), so engines timed one after the other
(the earlier method: two processes per engine, A..E E..A) caught different
phases and the ratios moved by up to 50% between runs; in turns, every
engine samples the same phases. Not interleaved in one process: with 2
threads on 2 cores, one engine's thread pool still spinning slows the next.
The median per run is reported together with the minimum. Calibration uses random
normal data (timing does not depend on it); random calibration is noted.

    python tools/bench_cpu.py                      # all models, writes benchmarks/cpu.md
    python tools/bench_cpu.py --models resnet18 --runs 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = ("mobilenetv2", "efficientnet_lite0", "resnet18", "fashion_cnn")
THREADS = (1, 2)
ENGINES = ("ort_float", "ort_u8s8_qdq", "ort_edgeq_qdq", "edgeq_cpu", "edgeq_core")


# ---------------------------------------------------------------- models


def resnet18_model(seed: int = 0) -> onnx.ModelProto:
    """ResNet-18 shapes (224x224, 1000 classes) with He-initialised random weights and biases."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    counter = [0]

    def name(prefix: str) -> str:
        counter[0] += 1
        return f"{prefix}{counter[0]}"

    def conv(x: str, cin: int, cout: int, k: int, stride: int, relu: bool) -> str:
        w, b, y = name("w"), name("b"), name("conv")
        std = np.sqrt(2.0 / (cin * k * k))
        inits.append(numpy_helper.from_array((rng.standard_normal((cout, cin, k, k)) * std).astype(np.float32), w))
        inits.append(numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), b))
        nodes.append(helper.make_node("Conv", [x, w, b], [y], kernel_shape=[k, k], strides=[stride, stride],
                                      pads=[k // 2] * 4))
        if not relu:
            return y
        r = name("relu")
        nodes.append(helper.make_node("Relu", [y], [r]))
        return r

    def block(x: str, cin: int, cout: int, stride: int) -> str:
        h = conv(x, cin, cout, 3, stride, relu=True)
        h = conv(h, cout, cout, 3, 1, relu=False)
        skip = x if stride == 1 and cin == cout else conv(x, cin, cout, 1, stride, relu=False)
        s, r = name("add"), name("relu")
        nodes.append(helper.make_node("Add", [h, skip], [s]))
        nodes.append(helper.make_node("Relu", [s], [r]))
        return r

    x = conv("input", 3, 64, 7, 2, relu=True)
    pooled = name("pool")
    nodes.append(helper.make_node("MaxPool", [x], [pooled], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, cin = pooled, 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        x = block(x, cin, cout, stride)
        x = block(x, cout, cout, 1)
        cin = cout
    gap, flat = name("gap"), name("flat")
    nodes.append(helper.make_node("GlobalAveragePool", [x], [gap]))
    nodes.append(helper.make_node("Flatten", [gap], [flat], axis=1))
    inits.append(numpy_helper.from_array((rng.standard_normal((1000, 512)) * np.sqrt(1 / 512)).astype(np.float32), "fc_w"))
    inits.append(numpy_helper.from_array(np.zeros(1000, np.float32), "fc_b"))
    nodes.append(helper.make_node("Gemm", [flat, "fc_w", "fc_b"], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes, "resnet18_shaped",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def model_path(name: str, work: Path) -> Path | None:
    """The float ONNX file of ``name`` (built on demand), or None when it is not available."""
    if name in ("mobilenetv2", "efficientnet_lite0"):
        from models import zoo

        return Path(zoo.build(name))
    if name == "resnet18":
        path = work / "resnet18.onnx"
        if not path.exists():
            onnx.save(resnet18_model(), str(path))
        return path
    if name == "fashion_cnn":
        path = REPO / "models" / "fashion_cnn.onnx"
        return path if path.exists() else None
    raise ValueError(name)


def random_inputs(path: Path, samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random normal data for every graph input, batch axis = samples (static dims elsewhere)."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(seed)
    out = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        out[value.name] = rng.standard_normal([samples, *dims[1:]]).astype(np.float32)
    return out


# ---------------------------------------------------------------- preparation (parent process)


def ort_u8s8_qdq(float_path: Path, out_path: Path, calib: dict[str, np.ndarray]) -> None:
    from tools.ort_reference import ort_quantize

    ort_quantize(float_path, calib, out_path)


def edgeq_compile(float_path: Path, out_dir: Path, calib: dict[str, np.ndarray]) -> dict:
    """edgeq's QDQ model + CPU library; returns timings or the reason it could not run."""
    try:
        from compiler.pipeline import CompileOptions, compile_model
    except ImportError as exc:
        return {"error": f"edgeq pipeline not importable: {exc}"}
    started = time.perf_counter()
    try:
        result = compile_model(CompileOptions(model=str(float_path), calib_data=calib, target="cpu",
                                              out_dir=str(out_dir), progress=False))
    except Exception as exc:  # noqa: BLE001 -- reported in the table, the other engines still run
        return {"error": f"edgeq compile failed: {type(exc).__name__}: {exc}"}
    total = time.perf_counter() - started
    manifest = json.loads((out_dir / "cpu" / "manifest.json").read_text())
    verify = json.loads((out_dir / "verify.json").read_text()) if (out_dir / "verify.json").exists() else {}
    return {"compile_s": round(total, 1), "lower_s": round(result.timings.get("lower", 0.0), 1),
            "kernels": manifest.get("kernels"), "bit_exact": verify.get("bit_exact")}


# ---------------------------------------------------------------- timing (child process)


def _ort_runner(path: Path, threads: int, feed: dict[str, np.ndarray]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, feed)


def _edgeq_runners(out_dir: Path, feed: dict[str, np.ndarray]):
    """(whole: float in -> float out, core: the library call alone, its arguments already in TVM
    tensors -- the float input where the library quantizes it, else the quantized input)."""
    from targets.cpu import runner

    module = runner.load(out_dir)
    module.samples(feed)
    quantized = module.quantize(feed, 0)
    return (lambda: module.run_sample(feed, 0)), (lambda: module.main(*quantized))


def kernel_breakdown(int_model_path: Path, repeat: int = 15) -> dict[str, float]:
    """Microseconds per kernel family of the integer graph, each kernel timed alone (min of
    ``repeat``), built exactly as targets/cpu/lower.py builds it."""
    import tvm

    from compiler.graph import initializer_array
    from targets.cpu import lower, schedules
    from targets.tvm_ops import node_kernels, tensor_types

    model = onnx.load(str(int_model_path))
    types = tensor_types(model)
    inits = {init.name for init in model.graph.initializer}
    rng = np.random.default_rng(0)
    device = tvm.cpu()
    totals: dict[str, float] = {}
    edges = [node for node in model.graph.node if node.op_type == "Quantize"]
    for kernel in [*edges, *node_kernels(model, types)]:
        node = kernel if isinstance(kernel, onnx.NodeProto) else kernel.node
        scheduled = lower.scheduled_kernel(node, types, model)
        if scheduled is None and kernel is node:
            continue  # an input edge the library does not compile in
        if scheduled is not None:
            func, family = scheduled.func, scheduled.variant
            arrays = []
            for name in node.input[:scheduled.inputs]:
                shape, dtype = types[name]
                sample = rng.standard_normal(shape) if dtype.startswith("float") else rng.integers(0, 100, shape)
                arrays.append(sample.astype(dtype))
            arrays += scheduled.constants
        else:
            func, family = lower.parallelize(kernel.func), f"generic_{node.op_type}"
            arrays = []
            for name in kernel.args[:-1]:
                if name in inits:
                    arrays.append(initializer_array(model, name))
                elif name in types:
                    arrays.append(rng.integers(0, 100, types[name][0]).astype(types[name][1]))
                else:
                    arrays.append(kernel.constants[name])
        out_shape, out_dtype = types[node.output[0]]
        module = tvm.tirx.build(func.with_attr("global_symbol", "kernel"), target=schedules.host_target())
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in arrays]
        args.append(tvm.runtime.tensor(np.zeros(out_shape, out_dtype), device))
        timer = module.time_evaluator("kernel", device, number=3, repeat=repeat)
        totals[family] = totals.get(family, 0.0) + float(np.min(timer(*args).results) * 1e6)
    return totals


ENGINES = ("ort_float", "ort_u8s8_qdq", "ort_edgeq_qdq", "edgeq_cpu", "edgeq_core")


def _runner(engine: str, entry: dict, threads: int):
    """A callable running one batch-1 inference of ``engine`` on one model, or None."""
    feed = {k: np.load(v) for k, v in entry["feed"].items()}
    if engine.startswith("edgeq"):
        if not entry.get("edgeq_out"):
            return None
        whole, core = _edgeq_runners(Path(entry["edgeq_out"]), feed)
        return whole if engine == "edgeq_cpu" else core
    path = entry.get({"ort_float": "float", "ort_u8s8_qdq": "ort_qdq", "ort_edgeq_qdq": "edgeq_qdq"}[engine])
    return _ort_runner(Path(path), threads, feed) if path else None


def serve(spec_path: Path, engine: str, threads: int) -> None:
    """Child process: hold ``engine``'s sessions of every model and time bursts on request.

    Reads ``run MODEL N`` (3 untimed runs -- the pool wakes from its idle sleep -- then N timed
    ones: prints their seconds as JSON), ``breakdown MODEL`` (kernel families, JSON) or ``quit``
    on stdin. The engine is alone in this process, as a deployment runs it; the parent keeps every
    engine's process alive and takes turns, so that all engines sample the same machine states.
    """
    spec = json.loads(spec_path.read_text())
    runners = {name: _runner(engine, entry, threads) for name, entry in spec.items()}
    for run in runners.values():
        for _ in range(20 if run else 0):  # warm-up: thread pools started, caches and predictors warm
            run()
    print(json.dumps(sorted(name for name, run in runners.items() if run)), flush=True)
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "quit":
            return
        if command == "breakdown":
            print(json.dumps(kernel_breakdown(Path(spec[rest[0]]["edgeq_out"]) / "model.int.onnx")), flush=True)
            continue
        run, times = runners[rest[0]], []
        for _ in range(3):
            run()
        for _ in range(int(rest[1])):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        print(json.dumps(times), flush=True)


class EngineProcess:
    """The parent's handle on one :func:`serve` child."""

    def __init__(self, spec_path: Path, engine: str, threads: int, env: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", str(spec_path), "--threads", str(threads),
                                      "--engine", engine], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.models = self._reply()

    def _reply(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"engine process exited with {self.proc.wait()}")
        return json.loads(line)

    def ask(self, command: str):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()


def _summary(times: list[float]) -> dict:
    return {"median_ms": float(np.median(times) * 1e3), "p10_ms": float(np.percentile(times, 10) * 1e3),
            "min_ms": float(np.min(times) * 1e3), "runs": len(times)}


# ---------------------------------------------------------------- report


def _ratio(numerator: dict | None, denominator: dict | None) -> str:
    if not numerator or not denominator:
        return "n/a"
    return (f"{numerator['median_ms'] / denominator['median_ms']:.2f}x "
            f"({numerator['min_ms'] / denominator['min_ms']:.2f}x)")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def write_report(path: Path, prep: dict, timings: dict, runs: int, load: str) -> None:
    import onnxruntime
    import tvm

    lines = [
        "## CPU latency (tools/bench_cpu.py)",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores visible, LLVM mcpu "
        f"`{tvm.target.codegen.llvm_get_system_cpu()}`; onnxruntime {onnxruntime.__version__}, "
        f"apache-tvm {tvm.__version__}. Batch 1, float input to float output for every engine "
        f"(edgeq: the library, which quantizes its input itself, + numpy dequantize of the output). "
        f"Median of >= {runs} "
        f"runs after warm-up, each engine alone in its own process, the engines taking turns in bursts of 10 runs; the minimum in brackets. "
        f"Load average while timing: {load} on {os.cpu_count()} cores (a shared machine: the medians "
        "measure the contention as much as the code; the minimum is the closest to the quiet "
        "speed). Calibration on random data (timing only).",
        "",
        "| model | threads | ORT float | ORT u8s8 QDQ | ORT on edgeq QDQ | edgeq CPU | edgeq core | "
        "edgeq / ORT u8s8 | ORT float / edgeq |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(entry: dict | None) -> str:
        return "n/a" if not entry else f"{entry['median_ms']:.2f} ms ({entry['min_ms']:.2f})"

    for model_name in prep:
        for threads in THREADS:
            row = timings.get(str(threads), {}).get(model_name, {})
            edgeq, ort_q, ort_f = row.get("edgeq_cpu"), row.get("ort_u8s8_qdq"), row.get("ort_float")
            ratio = _ratio(edgeq, ort_q)
            speedup = _ratio(ort_f, edgeq)
            lines.append(f"| {model_name} | {threads} | {cell(ort_f)} | {cell(ort_q)} | "
                         f"{cell(row.get('ort_edgeq_qdq'))} | {cell(edgeq)} | {cell(row.get('edgeq_core'))} | "
                         f"{ratio} | {speedup} |")
    lines += ["", "Ratios: by median (by minimum in brackets). edgeq core = the library call alone, its input "
              "already in a TVM tensor (no dequantize of the output, no Python around it).",
              "", "Time per kernel family, each kernel of the integer graph timed alone at 1 thread "
              "(min of 15, microseconds; sums, so caches are warmer than in the whole network):", ""]
    for model_name in prep:
        kernels_us = timings.get("1", {}).get(model_name, {}).get("kernels_us")
        if kernels_us:
            parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(kernels_us.items(), key=lambda kv: -kv[1]))
            lines.append(f"- {model_name}: total {sum(kernels_us.values()):.0f} us -- {parts}")
    lines += ["", "Compile (edgeq compile --target cpu, whole pipeline incl. calibration and verification):", ""]
    for model_name, entry in prep.items():
        info = entry.get("edgeq", {})
        if "error" in info:
            lines.append(f"- {model_name}: not compiled -- {info['error']}")
        else:
            lines.append(f"- {model_name}: {info.get('compile_s')} s total, lowering {info.get('lower_s')} s; "
                         f"kernels {info.get('kernels')}; bit-exact vs interpreter: {info.get('bit_exact')}")
    for model_name, entry in prep.items():
        if entry.get("skipped"):
            lines.append(f"- {model_name}: skipped -- {entry['skipped']}")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--work", default=None, help="folder for models and artifacts (default: a temp dir)")
    parser.add_argument("--report", default=str(REPO / "benchmarks/cpu.md"))
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the models and edgeq artifacts already in --work (timing only)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        serve(Path(args.child), args.engine, args.threads)
        return 0

    work = Path(args.work or tempfile.mkdtemp(prefix="edgeq_bench_cpu_"))
    work.mkdir(parents=True, exist_ok=True)
    previous = json.loads((work / "prep.json").read_text()) if args.reuse and (work / "prep.json").exists() else {}
    prep: dict[str, dict] = {}
    spec: dict[str, dict] = {}
    for model_name in args.models:
        path = model_path(model_name, work)
        if path is None:
            prep[model_name] = {"skipped": "model file not present"}
            continue
        calib = random_inputs(path, 8)
        feed = {k: v[:1] for k, v in random_inputs(path, 1, seed=1).items()}
        feed_files = {}
        for key, value in feed.items():
            feed_files[key] = str(work / f"{model_name}_{key}.npy")
            np.save(feed_files[key], value)
        ort_qdq = work / f"{model_name}.ort_qdq.onnx"
        out_dir = work / f"{model_name}_edgeq"
        if model_name in previous and ort_qdq.exists():
            info = previous[model_name]["edgeq"]
        else:
            print(f"[{model_name}] onnxruntime quantize_static ...", flush=True)
            ort_u8s8_qdq(path, ort_qdq, calib)
            print(f"[{model_name}] edgeq compile --target cpu ...", flush=True)
            info = edgeq_compile(path, out_dir, calib)
        print(f"[{model_name}] {info}", flush=True)
        prep[model_name] = {"edgeq": info}
        spec[model_name] = {"feed": feed_files, "float": str(path), "ort_qdq": str(ort_qdq)}
        if "error" not in info:
            spec[model_name]["edgeq_qdq"] = str(out_dir / "model.qdq.onnx")
            spec[model_name]["edgeq_out"] = str(out_dir)
    (work / "prep.json").write_text(json.dumps(prep))
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    timings: dict[str, dict] = {}
    loads = []
    burst = 10
    for threads in THREADS:
        env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        print(f"timing at {threads} thread(s) ...", flush=True)
        engines = {engine: EngineProcess(spec_path, engine, threads, env) for engine in ENGINES}
        seconds: dict[str, dict[str, list[float]]] = {}
        try:
            for round_index in range(max(1, -(-args.runs // burst))):
                loads.append(os.getloadavg()[0])
                # Turns of `burst` runs, the order reversed every round: slow phases of a shared host
                # (they last seconds) fall on every engine alike.
                order = ENGINES if round_index % 2 == 0 else tuple(reversed(ENGINES))
                for model_name in spec:
                    for engine in order:
                        if model_name not in engines[engine].models:
                            continue
                        times = engines[engine].ask(f"run {model_name} {burst}")
                        seconds.setdefault(model_name, {}).setdefault(engine, []).extend(times)
                        # Let the last engine's pool go to sleep: TVM's workers spin for up to ~160 ms
                        # after a run (TVM_THREAD_POOL_SPIN_COUNT, default 300000), on the CPU the next
                        # engine's pinned worker needs.
                        time.sleep(0.25)
            for model_name, by_engine in seconds.items():
                row = timings.setdefault(str(threads), {}).setdefault(model_name, {})
                for engine, times in by_engine.items():
                    row[engine] = _summary(times)
                if threads == 1 and model_name in engines["edgeq_cpu"].models:
                    row["kernels_us"] = engines["edgeq_cpu"].ask(f"breakdown {model_name}")
        finally:
            for process in engines.values():
                process.close()
    (work / "timings.json").write_text(json.dumps({"prep": prep, "timings": timings}, indent=1))
    write_report(Path(args.report), prep, timings, args.runs, f"{min(loads):.1f}-{max(loads):.1f}")
    print(Path(args.report).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
