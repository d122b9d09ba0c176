"""tools/profile_cpu.py: every kernel of a compiled library is timed in place and matched to its plan layer."""

from __future__ import annotations

import onnx
import pytest

from tests.tiny_models import tiny_cnn
from tools.profile_cpu import layer_of, profile, table


def test_layer_of_takes_the_longest_matching_layer_name():
    layers = ["/conv", "/conv/inner", "fc"]
    assert layer_of("/conv/inner_1", layers) == "/conv/inner"
    assert layer_of("/conv_2", layers) == "/conv"
    assert layer_of("fc", layers) == "fc"
    assert layer_of("Quantize_input", layers) is None


def test_profile_prices_every_layer_kernel(tmp_path):
    from compiler.pipeline import CompileOptions, compile_model

    onnx.save(tiny_cnn(), tmp_path / "model.onnx")
    out = tmp_path / "out"
    compile_model(CompileOptions(model=str(tmp_path / "model.onnx"), random_calib=8, target="cpu",
                                 out_dir=str(out), progress=False))
    result = profile(out, runs=5)
    layer_rows = [row for row in result["rows"] if row["node"] and row["node"].startswith(("conv", "fc"))]
    assert {row["layer"] for row in layer_rows} == {"conv1", "conv2", "conv3", "fc"}
    assert all(row["predicted_s"] > 0 and row["bits"] == "w8a8" for row in layer_rows)
    assert all(row["measured_s"] >= 0 for row in result["rows"]) and result["library_call_s"] > 0
    assert "| conv1 | w8a8 |" in table(result, None)
    # The runtime allocates each intermediate tensor: one symbol, many calls, each paying the hook.
    assert all(row["calls"] == 1 for row in layer_rows)
    assert next(row for row in result["rows"] if row["kernel"] == "vm.builtin.alloc_tensor")["calls"] > 1


def test_the_hook_is_taken_off_each_call_not_each_symbol(tmp_path, monkeypatch):
    import tools.profile_cpu as profile_cpu

    # A 5 us library call (a 3 us kernel, 4 allocations of 0.5 us); the hook adds 1 us to each of the 5 calls
    monkeypatch.setattr(profile_cpu, "time_in_place",
                        lambda out_dir, runs: ({"k0_qconv": (4e-6, 1.0), "vm.builtin.alloc_tensor": (6e-6, 4.0)},
                                               10e-6 - 5e-6))
    monkeypatch.setattr(profile_cpu, "kernel_layers", lambda out_dir: {})
    monkeypatch.setattr(profile_cpu, "predictions", lambda out_dir, model_path: {})
    rows = {row["kernel"]: row for row in profile(tmp_path, runs=3)["rows"]}
    assert rows["k0_qconv"]["measured_s"] == pytest.approx(3e-6)
    assert rows["vm.builtin.alloc_tensor"]["measured_s"] == pytest.approx(2e-6)
