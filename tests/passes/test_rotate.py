"""Hadamard rotations keep the float function and spread outlier channels."""

import logging

import numpy as np
import pytest

from compiler.calibrate import collect_channel_stats
from compiler.linear_layers import applied_transforms, online_ops
from passes.rotate import find_value_output_heads, hadamard, rotate, rotation
from tests.passes.tiny_models import (
    attention_block,
    conv_data,
    conv_net,
    linear_pair,
    max_rel_error,
    mlp_block,
    mlp_data,
    run,
)


@pytest.mark.parametrize("size,kind", [(16, "hadamard"), (24, "hadamard"), (384, "hadamard"), (10, "random")])
def test_rotations_are_orthogonal(size, kind):
    q = rotation(size, kind)
    np.testing.assert_allclose(q @ q.T, np.eye(size), atol=1e-10)
    assert np.allclose(np.abs(hadamard(8)), 1 / np.sqrt(8))


def test_linear_pair_rotation_spreads_the_outlier():
    model = linear_pair()
    data = {"x": np.random.default_rng(0).normal(size=(64, 12)).astype(np.float32)}
    result = rotate(model)
    assert applied_transforms(result)[0]["pairs"] == 1
    assert max_rel_error(run(model, data), run(result, data)) <= 1e-4

    def peak_to_typical(m):
        absmax = collect_channel_stats(m, data, ["h"], axis=-1, progress=False)["h"].absmax
        return absmax.max() / np.median(absmax)

    assert peak_to_typical(result) < peak_to_typical(model) / 3


def test_conv_pair_rotation_preserves_function():
    model, data = conv_net(), conv_data()
    result = rotate(model, kind="random")
    assert applied_transforms(result)[0]["pairs"] >= 1  # project -> expand (1x1, nothing between)
    assert max_rel_error(run(model, data), run(result, data)) <= 1e-4


def test_attention_value_output_heads_are_rotated():
    model = attention_block()
    assert [(v.name, o.name, head) for v, o, head in find_value_output_heads(model)] == [("v_proj", "o_proj", 8)]
    data = mlp_data(count=8)
    result = rotate(model)
    assert applied_transforms(result)[0]["heads"] == 1
    assert max_rel_error(run(model, data), run(result, data)) <= 1e-4


def test_online_rotation_is_explicit_and_costed(caplog):
    model, data = mlp_block(), mlp_data(count=8)
    with caplog.at_level(logging.INFO, logger="passes.rotate"):
        result = rotate(model, online=True)
    assert "post-LN" in caplog.text  # the LN output also feeds the residual Add
    ops = online_ops(result)
    assert {entry["node"] for entry in ops} <= {node.name for node in result.graph.node}
    assert ops and all(entry["op_type"] == "MatMul" and entry["macs_per_row"] > 0 for entry in ops)
    assert max_rel_error(run(model, data), run(result, data)) <= 1e-4
    assert rotate(model) is not None and not online_ops(rotate(model))


def test_second_run_is_skipped(caplog):
    once = rotate(linear_pair())
    with caplog.at_level(logging.INFO, logger="passes.rotate"):
        rotate(once)
    assert "already rotated" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("name,expect", [("minilm", "heads"), ("mobilenetv2", "pairs")])
def test_real_models_keep_their_function(name, expect):
    from tests.passes.real_models import outputs, real_model

    model, data = real_model(name)
    result = rotate(model, online=True)
    assert applied_transforms(result)[0][expect] >= 1
    assert max_rel_error(outputs(model, data), outputs(result, data)) <= 1e-4
