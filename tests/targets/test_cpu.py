"""targets/cpu: the TVM-compiled integer graph against the reference interpreter, bit for bit."""

import json
import shutil
import time

import numpy as np
import onnx
import pytest
import tvm

from compiler.interpreter import run_all, run_integer_graph, run_integer_graph_raw
from passes.integerize import integerize
from targets.base import CompileContext
from targets.cpu import TARGET, compare_raw
from targets.cpu.lower import lower_to_dir
from targets.cpu.runner import load
from targets.tvm_ops import node_primfunc, tensor_types
from tests.qdq_fixtures import (
    QDQBuilder,
    conv_block_model,
    matmul_model,
    mobilenet_v2_like_model,
    quantize_qdq,
    random_inputs,
    softmax_model,
)


def batch(samples):
    return {name: np.concatenate([s[name] for s in samples]) for name in samples[0]}


def assert_library_matches_interpreter(int_model, inputs, cpu_dir, use_schedules=False):
    manifest = lower_to_dir(int_model, cpu_dir, use_schedules=use_schedules)
    got = load(cpu_dir.parent).run_raw(inputs)
    expected = run_integer_graph_raw(int_model, inputs)
    report = compare_raw(got, expected)
    assert report["bit_exact"], report
    for name, value in expected.items():
        assert np.array_equal(got[name], value) and got[name].dtype == value.dtype
    return manifest


def ops_model() -> onnx.ModelProto:
    """int8 activations; QMul, Slice, Gather, Identity, a standalone clamp, per-tensor weights."""
    b = QDQBuilder(seed=4)
    x = b.input("x", [1, 6, 5], scale=0.04, zero_point=-3, dtype=np.int8)
    y = b.qdq(b.node("Relu", [x]), 0.04, -3, np.int8)
    prod = b.qdq(b.node("Mul", [x, y]), 0.02, 7, np.int8)
    sliced = b.node("Slice", [prod, b.const(np.array([1, 4], np.int64)), b.const(np.array([6, 0], np.int64)),
                              b.const(np.array([1, 2], np.int64)), b.const(np.array([2, -2], np.int64))])
    gathered = b.node("Gather", [sliced, b.const(np.array([2, 0, -1], np.int64))], axis=1)
    same = b.node("Identity", [gathered])
    w = b.node("DequantizeLinear", [b.const(np.random.default_rng(0).integers(-128, 128, (2, 4)).astype(np.int8)),
                                    b.const(np.array(0.01, np.float32)), b.const(np.array(0, np.int8))])
    mm = b.qdq(b.node("MatMul", [same, w]), 0.05, 0, np.int8)
    return b.model(mm)


def softmax_16_bit_model() -> onnx.ModelProto:
    return softmax_model(np.int16)


def lookup_model() -> onnx.ModelProto:
    """HardSwish on int8, then Sigmoid into uint8: two QLookup tables."""
    b = QDQBuilder(seed=6)
    x = b.input("x", [1, 6, 5], scale=0.04, zero_point=-3, dtype=np.int8)
    swished = b.qdq(b.node("HardSwish", [x]), 0.03, -20, np.int8)
    return b.model(b.qdq(b.node("Sigmoid", [swished]), 1 / 256, 0, np.uint8))


@pytest.mark.parametrize("builder", [conv_block_model, matmul_model, ops_model, softmax_model, softmax_16_bit_model,
                                     lookup_model],
                         ids=["conv_block", "matmul", "ops", "softmax", "softmax_16_bit", "lookup"])
def test_every_op_is_bit_exact_on_random_inputs(builder, tmp_path):
    model = builder()
    hand_written = builder in (ops_model, softmax_model, softmax_16_bit_model, lookup_model)  # already QDQ
    qdq = model if hand_written else quantize_qdq(model, random_inputs(model, 16))
    int_model = integerize(qdq)
    inputs = batch(random_inputs(model, 3, seed=21))
    inputs = {k: v * 2.5 for k, v in inputs.items()}  # saturate some values too
    manifest = assert_library_matches_interpreter(int_model, inputs, tmp_path / "cpu")
    kinds = {kind.removeprefix("generic_") for kind in manifest["kernels"]}
    emitted = {n.op_type for n in int_model.graph.node} - {"Quantize", "Dequantize"}
    assert kinds == emitted


def test_a_library_rebuilt_in_place_loads_as_rebuilt(tmp_path):
    """A second build written where the first one's library was (a compile that re-plans, a script
    compiling twice into one folder) runs its own code in the same process, not the first's that
    dlopen already holds under that path."""
    model = conv_block_model()
    calib = random_inputs(model, 16)
    inputs = batch(random_inputs(model, 2, seed=5))
    first = integerize(quantize_qdq(model, calib))
    assert_library_matches_interpreter(first, inputs, tmp_path / "cpu")
    # other ranges: other scales, other integer outputs
    second = integerize(quantize_qdq(model, [{k: 4 * v for k, v in sample.items()} for sample in calib]))
    assert not np.array_equal(*(next(iter(run_integer_graph_raw(m, inputs).values())) for m in (first, second)))
    shutil.rmtree(tmp_path / "cpu")
    assert_library_matches_interpreter(second, inputs, tmp_path / "cpu")


def test_threads_loading_one_library_at_once_all_get_it(tmp_path):
    """load_library's temporary copy is per content and process: threads loading the same library at
    the same moment must not remove it from under each other."""
    from concurrent.futures import ThreadPoolExecutor

    model = conv_block_model()
    int_model = integerize(quantize_qdq(model, random_inputs(model, 16)))
    inputs = batch(random_inputs(model, 1, seed=5))
    assert_library_matches_interpreter(int_model, inputs, tmp_path / "cpu")
    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(lambda _: load(tmp_path).run_raw(inputs), range(16)))
    expected = run_integer_graph_raw(int_model, inputs)
    assert all(np.array_equal(got[name], expected[name]) for got in outputs for name in expected)


def test_a_library_that_differs_from_the_interpreter_is_warned_about(tmp_path, monkeypatch, capsys):
    from targets.cpu import CpuTarget

    model = conv_block_model()
    onnx.save(quantize_qdq(model, random_inputs(model, 16)), tmp_path / "model.qdq.onnx")
    calib = batch(random_inputs(model, 3, seed=8))
    honest = CpuTarget.run_raw
    monkeypatch.setattr(CpuTarget, "run_raw", lambda self, out_dir, inputs: {
        name: value + (value < 100).astype(value.dtype) for name, value in honest(self, out_dir, inputs).items()})
    TARGET.lower(CompileContext(out_dir=tmp_path, qdq_model_path=tmp_path / "model.qdq.onnx", plan=None,
                                calib_inputs=calib))
    assert not json.loads((tmp_path / "verify.json").read_text())["bit_exact"]
    err = capsys.readouterr().err
    assert "cpu library differs from the reference interpreter on 3 calibration samples (y: " in err
    assert "see verify.json" in err


def test_requantization_extremes_are_bit_exact(tmp_path):
    """Huge and tiny rescales, int16 activations, clamps at both ends."""
    model = conv_block_model(seed=3)
    qdq = quantize_qdq(model, random_inputs(model, 16), activation_type="QInt16")
    int_model = integerize(qdq)
    inputs = batch(random_inputs(model, 2, seed=5))
    inputs["x"][0] *= 50.0
    assert_library_matches_interpreter(int_model, inputs, tmp_path / "cpu")


def test_float_edges_as_standalone_primfuncs_match_numpy():
    """Quantize/Dequantize kernels (used by targets that take float input) vs compiler.requant."""
    b = QDQBuilder()
    x = b.input("x", [4, 64], scale=0.5, zero_point=3)
    int_model = integerize(b.model(x))
    types = tensor_types(int_model, batch=4)
    values = np.concatenate([np.arange(-70, 70, 0.25, dtype=np.float32)[:192],  # ties at .25/.75 x 2
                             np.random.default_rng(0).standard_normal(64).astype(np.float32) * 100])
    sample = {"x": values.reshape(4, 64)}
    env = run_all(int_model, sample)
    for node in int_model.graph.node:
        func, args, constants = node_primfunc(int_model, node, types)
        assert not constants
        built = tvm.tirx.build(func.with_attr("global_symbol", "edge"), target={"kind": "llvm"})
        src, dst = (tvm.runtime.tensor(env[args[0]]),
                    tvm.runtime.tensor(np.zeros(types[args[-1]][0], types[args[-1]][1])))
        built(src, dst)
        assert np.array_equal(dst.numpy(), env[args[-1]]), node.op_type


def test_compile_verify_run_and_cross_compile(tmp_path):
    model = conv_block_model()
    qdq = quantize_qdq(model, random_inputs(model, 16))
    onnx.save(qdq, tmp_path / "model.qdq.onnx")
    calib = batch(random_inputs(model, 4, seed=8))
    triple = "aarch64-linux-gnu"
    paths = TARGET.lower(CompileContext(out_dir=tmp_path, qdq_model_path=tmp_path / "model.qdq.onnx", plan=None,
                                        calib_inputs=calib, options={"target_triple": triple}))
    assert {p.name for p in paths} == {"cpu", "model.int.onnx", "verify.json"}
    verify = json.loads((tmp_path / "verify.json").read_text())
    assert verify["bit_exact"] and verify["samples"] == 4
    manifest = json.loads((tmp_path / "cpu" / "manifest.json").read_text())
    assert manifest["tvm_target"]["mcpu"] == tvm.target.codegen.llvm_get_system_cpu()
    cross = tmp_path / "cpu" / manifest["cross"][0]["library"]
    # the portable hand-written kernels only: no x86 VNNI conv for aarch64
    assert {"maxpool", "quantize"} <= set(manifest["cross"][0]["kernels"])
    assert "conv_dense" not in manifest["cross"][0]["kernels"]
    header = cross.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" or cross.suffix == ".tar"
    if shutil.which(f"{triple}-gcc"):
        assert int.from_bytes(header[18:20], "little") == 183  # e_machine = EM_AARCH64
    int_model = onnx.load(tmp_path / "model.int.onnx")
    outputs = TARGET.run(tmp_path, calib)
    assert np.array_equal(outputs["y"], run_integer_graph(int_model, calib)["y"])
    timing = TARGET.benchmark(tmp_path, calib, repeat=5)
    assert timing["median_ms"] > 0 and timing["runs"] == 5 and "settled_ms" not in timing
    blocked = TARGET.benchmark(tmp_path, calib, repeat=12, blocks=3, pause_s=0.0)
    assert blocked["runs"] == 12 and len(blocked["block_medians_ms"]) == 3
    assert blocked["settled_ms"] == min(blocked["block_medians_ms"]) <= blocked["median_ms"] * 1.0001


def test_vnni_schedules_plug_in_bit_exact(tmp_path):
    """The hand-written kernels of targets/cpu/schedules.py, through the lowering's seam."""
    schedules = pytest.importorskip("targets.cpu.schedules")
    if not schedules.host_has_vnni():
        pytest.skip("no AVX-512 VNNI on this CPU")
    model = conv_block_model()
    int_model = integerize(quantize_qdq(model, random_inputs(model, 16)))
    manifest = assert_library_matches_interpreter(int_model, batch(random_inputs(model, 3, seed=2)),
                                                  tmp_path / "cpu", use_schedules=True)
    # bit exact above with the hand-written kernels in use, MaxPool's too (Relax's passes used
    # to abort on its block-less PrimFunc)
    kinds = {kind.removesuffix("_vnni") for kind in manifest["kernels"]}
    assert {"conv_dense", "conv_depthwise", "maxpool", "quantize"} <= kinds, manifest["kernels"]
    assert manifest["inputs"][0]["library_dtype"] == "float32"  # the library quantizes its input itself


def _conv_writing_16_bits(seed: int):
    """A QDQ builder whose graph so far is an 8-bit-input 3x3 conv writing uint16 activations (skips
    without AVX-512 VNNI, which the kernels under test need); the builder and that tensor."""
    schedules = pytest.importorskip("targets.cpu.schedules")
    if not schedules.host_has_vnni():
        pytest.skip("no AVX-512 VNNI on this CPU")
    b = QDQBuilder(seed=seed, opset=21)
    x = b.input("x", [1, 8, 10, 10], scale=0.02, zero_point=120)
    wide = b.qdq(b.node("Conv", [x, b.weight((16, 8, 3, 3)), b.bias(16, 0.0004)], pads=[1, 1, 1, 1]),
                 0.0005, 30000, np.uint16)
    return b, wide


def test_layer_feeding_16_bit_activations_keeps_its_vnni_kernel(tmp_path):
    """An 8-bit-input conv whose reader takes 16-bit activations writes 16-bit output from the VNNI
    kernel (mixed plans paid the generic kernel's 16-bit cost here before); the 16-bit-input conv
    after it runs the VNNI kernel too (its input as two byte planes), bit-exact in the whole library."""
    b, wide = _conv_writing_16_bits(seed=7)
    y = b.qdq(b.node("Conv", [wide, b.weight((8, 16, 1, 1))]), 0.0008, 0, np.int16)
    int_model = integerize(b.model(y))
    inputs = {"x": np.random.default_rng(3).normal(0, 1.0, (2, 8, 10, 10)).astype(np.float32)}
    manifest = assert_library_matches_interpreter(int_model, inputs, tmp_path / "cpu", use_schedules=True)
    assert manifest["kernels"].get("conv_dense") == 2, manifest["kernels"]
    assert "generic_QConv" not in manifest["kernels"], manifest["kernels"]


def test_residual_add_of_16_bit_activations_runs_the_qadd_kernel(tmp_path):
    """A residual Add between 16-bit activations (a16 plans of MobileNetV2) ran the generic kernel;
    the vectorized QAdd reads 16-bit operands too, bit-exact in the whole library."""
    b, wide = _conv_writing_16_bits(seed=11)
    branch = b.qdq(b.node("Conv", [wide, b.weight((16, 16, 1, 1))]), 0.0004, 32000, np.uint16)
    summed = b.qdq(b.node("Add", [wide, branch]), 0.0009, 31000, np.uint16)
    y = b.qdq(b.node("Conv", [summed, b.weight((8, 16, 1, 1))]), 0.0008, 0, np.int16)
    int_model = integerize(b.model(y))
    assert any(node.op_type == "QAdd" for node in int_model.graph.node)
    inputs = {"x": np.random.default_rng(5).normal(0, 1.0, (2, 8, 10, 10)).astype(np.float32)}
    manifest = assert_library_matches_interpreter(int_model, inputs, tmp_path / "cpu", use_schedules=True)
    assert manifest["kernels"].get("qadd") == 1 and "generic_QAdd" not in manifest["kernels"], manifest["kernels"]


def test_reshape_by_the_batch_size_compiles_integer_only(tmp_path):
    """``x.view(x.size(0), -1)`` before the classifier (EfficientNet-Lite0's head) once failed with
    "Shape node would stay in float"; canonicalize gives the Reshape a constant target."""
    from compiler.pipeline import CompileOptions, compile_model
    from tests.tiny_models import flatten_by_batch_model

    onnx.save(flatten_by_batch_model(), tmp_path / "model.onnx")
    compile_model(CompileOptions(model=str(tmp_path / "model.onnx"), random_calib=8, target="cpu",
                                 out_dir=str(tmp_path / "out"), progress=False))
    assert json.loads((tmp_path / "out" / "verify.json").read_text())["bit_exact"]
    int_ops = {node.op_type for node in onnx.load(tmp_path / "out" / "model.int.onnx").graph.node}
    assert "Shape" not in int_ops and "Reshape" in int_ops


@pytest.mark.slow
def test_mobilenet_v2_compiles_in_minutes_and_is_bit_exact(tmp_path):
    model = mobilenet_v2_like_model()
    int_model = integerize(quantize_qdq(model, random_inputs(model, 4)))
    start = time.perf_counter()
    manifest = assert_library_matches_interpreter(int_model, batch(random_inputs(model, 2, seed=6)),
                                                  tmp_path / "cpu", use_schedules=True)
    assert time.perf_counter() - start < 180, manifest["compile_seconds"]


@pytest.mark.slow
def test_bundled_fashion_cnn_is_bit_exact_on_real_images(tmp_path):
    from models import bundled

    if not bundled.model_path().exists():
        pytest.skip("models/fashion_cnn.onnx is not built yet")
    from passes.canonicalize import canonicalize

    model = canonicalize(onnx.load(bundled.model_path()))  # folds BatchNormalization, as the pipeline does
    calib = bundled.calibration_data()["input"]
    qdq = quantize_qdq(model, [{"input": calib[i:i + 1]} for i in range(0, 256, 8)])
    test_images = {"input": bundled.test_data()[0]["input"][:32]}
    assert_library_matches_interpreter(integerize(qdq), test_images, tmp_path / "cpu", use_schedules=True)


def test_thread_count_defaults_to_every_usable_cpu(monkeypatch):
    """TVM alone would take half the CPUs on x86 (one thread on a 2-core machine)."""
    import os

    from compiler.errors import EdgeqError
    from targets.cpu.runner import configure_threads

    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    assert configure_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    assert configure_threads() == 1  # the user's setting stays
    assert configure_threads(3) == 3 and os.environ["TVM_NUM_THREADS"] == "3"
    with pytest.raises(EdgeqError, match="threads"):
        configure_threads(0)


@pytest.mark.parametrize("target", ["cpu", "mcu"])
def test_softmax_reduces_each_row_once(target):
    """The row's maximum and sum are computed under the row loop, not under the output's
    innermost loop: there they were recomputed for every element (1000 classes: 320 us on
    the CPU instead of 3 us)."""
    from targets.cpu.lower import parallelize
    from targets.mcu.codegen import schedule_for_mcu

    int_model = integerize(softmax_model())  # probabilities of shape [1, 3, 10]: rows [1, 3]
    types = tensor_types(int_model)
    node = next(node for node in int_model.graph.node if node.op_type == "QSoftmax")
    func, _, _ = node_primfunc(int_model, node, types)
    scheduled = (parallelize if target == "cpu" else schedule_for_mcu)(func)
    sch = tvm.s_tir.Schedule(scheduled)
    element_loop = sch.get(sch.get_loops(sch.get_sblock("y"))[-1])
    assert element_loop.extent == 10
    for name in ("peak", "total"):
        *outer, reduction = (sch.get(loop) for loop in sch.get_loops(sch.get_sblock(name)))
        assert reduction.extent == 10
        assert not any(loop.same_as(element_loop) for loop in outer), f"{name} is computed per element"
