"""SmoothQuant/OS+ keeps the float function and lowers the estimated quantization error."""

import logging

import numpy as np
import pytest

from compiler.linear_layers import applied_transforms, online_ops
from passes.smooth import choose_strength, smooth
from tests.passes.tiny_models import max_rel_error, mlp_block, mlp_data, run


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("residual", ["ln", "x"])
def test_smoothing_preserves_function(residual, shift):
    model, data = mlp_block(residual=residual), mlp_data(count=32)
    result = smooth(model, data, shift=shift)
    assert max_rel_error(run(model, data), run(result, data)) <= 1e-4
    report = {entry["tensor"]: entry for entry in applied_transforms(result)[0]["groups"]}
    assert "ln" in report and report["ln"]["error_after"] < 0.5 * report["ln"]["error_before"]
    ops = {node.op_type for node in result.graph.node}
    if residual == "x":
        assert report["ln"]["placement"] == "folded into LayerNorm"
        assert sum(op == "LayerNormalization" for op in (n.op_type for n in result.graph.node)) == 1
    else:
        assert report["ln"]["placement"] == "LayerNorm duplicated"
        assert any(entry["op_type"] == "LayerNormalization" for entry in online_ops(result))
    assert "Mul" in ops


def test_fixed_strength_and_explicit_ops_are_accounted():
    model, data = mlp_block(), mlp_data(count=32)
    result = smooth(model, data, alpha=0.5)
    for entry in applied_transforms(result)[0]["groups"]:
        assert entry["alpha"] == 0.5
    explicit = [entry for entry in online_ops(result) if entry["op_type"] in ("Mul", "Add")]
    assert explicit and all(entry["macs_per_row"] > 0 for entry in explicit)
    assert max_rel_error(run(model, data), run(result, data)) <= 1e-4


def test_strength_search_smooths_an_outlier_channel():
    rng = np.random.default_rng(0)
    rows = rng.uniform(-1, 1, size=(512, 8)).astype(np.float32)
    weights = [rng.normal(size=(8, 4)).astype(np.float32)]
    rows[:, 2] *= 100
    chosen_outlier, *_ = choose_strength(rows, rows.min(0), rows.max(0), weights, alphas=(0.5,), shift=False, a_bits=8, w_bits=8)
    assert chosen_outlier == 0.5


def test_second_run_is_skipped(caplog):
    model, data = mlp_block(), mlp_data(count=8)
    once = smooth(model, data)
    with caplog.at_level(logging.INFO, logger="passes.smooth"):
        twice = smooth(once, data)
    assert "already smoothed" in caplog.text
    assert len(twice.graph.node) == len(once.graph.node)


@pytest.mark.slow
def test_minilm_keeps_its_function():
    from tests.passes.real_models import outputs, real_model

    model, data = real_model("minilm")
    result = smooth(model, data)
    groups = applied_transforms(result)[0]["groups"]
    assert groups and all(entry["error_after"] < entry["error_before"] for entry in groups)
    assert max_rel_error(outputs(model, data), outputs(result, data)) <= 1e-4
