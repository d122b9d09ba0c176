"""The MCU C project: generation, arm-none-eabi build, qemu and host runs.

These tests make their one PrimFunc themselves (a QGemm-like int8 matmul with a
requantizing epilogue, checked against numpy), so they exercise the C build and
the qemu path independently of ``targets.tvm_ops``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from targets.mcu import TARGET, codegen, write_and_build
from targets.mcu.memory import plan_memory

needs_arm = pytest.mark.skipif(
    shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
    reason="gcc-arm-none-eabi / qemu-system-arm not installed",
)

K, M = 24, 10
MULTIPLIER, SHIFT = 1 << 30, 36  # requant by 2**-6


def _model(weights: np.ndarray, bias: np.ndarray):
    nodes = [
        helper.make_node("Quantize", ["x"], ["xq"], name="quant", domain="edgeq", scale=0.05,
                         y_zero_point=3, y_min=-128, y_max=127, y_dtype="int8"),
        helper.make_node("QGemm", ["xq", "w", "b"], ["yq"], name="fc", domain="edgeq"),
        helper.make_node("Dequantize", ["yq"], ["y"], name="dequant", domain="edgeq", scale=0.1,
                         zero_point=-2),
    ]
    graph = helper.make_graph(
        nodes, "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", M])],
        initializer=[numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")],
        value_info=[helper.make_tensor_value_info("xq", TensorProto.INT8, [1, K]),
                    helper.make_tensor_value_info("yq", TensorProto.INT8, [1, M])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgeq", 1)])


def _gemm_primfunc():
    import tvm
    from tvm import te

    x = te.placeholder((1, K), "int8", name="x")
    w = te.placeholder((K, M), "int8", name="w")
    b = te.placeholder((M,), "int32", name="b")
    k = te.reduce_axis((0, K), "k")
    acc = te.compute((1, M), lambda i, j: te.sum(x[i, k].astype("int32") * w[k, j].astype("int32"), axis=k), name="acc")

    def epilogue(i, j):
        value = (acc[i, j] + b[j]).astype("int64") * MULTIPLIER + (1 << (SHIFT - 1))
        return tvm.tirx.max(tvm.tirx.min(value >> SHIFT, 127), -128).astype("int8")

    y = te.compute((1, M), epilogue, name="y")
    return te.create_prim_func([x, w, b, y])


def _numpy_reference(xq: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    acc = xq.astype(np.int64) @ weights.astype(np.int64) + bias
    return np.clip((acc * MULTIPLIER + (1 << (SHIFT - 1))) >> SHIFT, -128, 127).astype(np.int8)


@pytest.fixture(scope="module")
def built_project(tmp_path_factory):
    rng = np.random.default_rng(0)
    weights = rng.integers(-127, 128, (K, M), dtype=np.int8)
    bias = rng.integers(-3000, 3000, M).astype(np.int32)
    model = _model(weights, bias)
    plan = plan_memory(model)
    kernel = codegen.Kernel("k0_qgemm", _gemm_primfunc(), ["xq", "w", "b", "yq"])
    out_dir = tmp_path_factory.mktemp("mcu_out")
    types = {"xq": ((1, K), "int8"), "yq": ((1, M), "int8")}
    write_and_build(out_dir / "mcu", model, plan, types, [kernel], build=shutil.which("arm-none-eabi-gcc") is not None)
    return out_dir, weights, bias


def test_generated_kernels_need_no_workspace(built_project) -> None:
    out_dir, _, _ = built_project
    source = (out_dir / "mcu" / "kernels.c").read_text()
    assert "TVMBackendAllocWorkspace" not in source
    assert "__tvm_ffi_k0_qgemm" in source
    model_c = (out_dir / "mcu" / "model.c").read_text()
    assert "malloc" not in model_c
    assert "static uint8_t edgeq_arena[" in model_c
    for header in ("tvm/ffi/c_api.h", "dlpack/dlpack.h", "tvm/runtime/c_backend_api.h"):
        assert (out_dir / "mcu" / "include" / header).exists()


@needs_arm
@pytest.mark.parametrize("on", ["qemu", "host"])
def test_runs_bit_exact(built_project, on: str) -> None:
    out_dir, weights, bias = built_project
    x = np.random.default_rng(1).normal(0, 3, (5, K)).astype(np.float32)
    io = json.loads((out_dir / "mcu" / "io.json").read_text())
    raw = TARGET.run_raw(out_dir, {"x": x}, on=on)
    xq = np.clip(np.rint(x / np.float32(0.05)) + 3, -128, 127).astype(np.int8)
    np.testing.assert_array_equal(raw, _numpy_reference(xq, weights, bias))
    floats = TARGET.run(out_dir, {"x": x}, on=on)["y"]
    assert io["output"]["name"] == "y"
    np.testing.assert_allclose(floats, (raw.astype(np.float32) + 2) * np.float32(0.1), rtol=1e-6)


@needs_arm
def test_memory_report(built_project) -> None:
    out_dir, weights, bias = built_project
    report = json.loads((out_dir / "mcu" / "memory.json").read_text())
    # input and output both live during the one kernel; buffers are rounded to 4 bytes
    assert report["arena_bytes"] == 4 * ((K + 3) // 4) + 4 * ((M + 3) // 4)
    assert report["weight_bytes"] == weights.nbytes + bias.nbytes
    assert report["flash_bytes_model_only"] >= report["weight_bytes"]
    assert report["flash_bytes"] > report["flash_bytes_model_only"]
    assert report["stack_bytes_model_run"] > 0


@needs_arm
def test_instruction_counts_agree(built_project) -> None:
    """The timer-based count (-icount) matches the translation-block trace: the trace's extra
    instructions per sample are the harness's (semihosting calls, timer reads)."""
    from targets.mcu import input_bytes, qemu

    out_dir, _, _ = built_project
    x = np.random.default_rng(2).normal(0, 3, (2, K)).astype(np.float32)
    project = out_dir / "mcu"
    per_sample = qemu.instructions_per_sample(project, input_bytes(out_dir, {"x": x}))
    assert len(per_sample) == 2 and per_sample[0] > K * M  # at least one instruction per MAC
    traced_one = qemu.count_instructions_traced(project, input_bytes(out_dir, {"x": x[:1]}))
    traced_two = qemu.count_instructions_traced(project, input_bytes(out_dir, {"x": x}))
    harness = traced_two - traced_one - per_sample[1]
    assert 0 <= harness + qemu.TIMER_NS_PER_TICK and harness < 200, (traced_one, traced_two, per_sample)
