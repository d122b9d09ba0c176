"""Cross-layer equalization keeps the float function and evens out channel ranges."""

import logging

import numpy as np
import pytest

from compiler.calibrate import collect_channel_stats
from compiler.graph import initializer_array
from compiler.linear_layers import applied_transforms
from passes.equalize import equalize, find_pairs
from tests.passes.tiny_models import conv_data, conv_net, max_rel_error, run


def _range_spread(model, name, axis):
    weight = initializer_array(model, name)
    ranges = np.max(np.abs(np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)), axis=1)
    return ranges.max() / ranges.min()


def test_equalize_preserves_function_and_evens_ranges():
    model = conv_net()
    data = conv_data()
    before = run(model, data)
    result = equalize(model, data=data)
    assert max_rel_error(before, run(result, data)) <= 1e-4
    # project's output channels were spread over ~3 decades; equalizing with expand evens them.
    assert _range_spread(result, "w2", 0) < _range_spread(model, "w2", 0) / 3
    # the caller's model is untouched
    np.testing.assert_array_equal(initializer_array(model, "w2"), initializer_array(conv_net(), "w2"))


def test_relu6_blocks_unless_asked_and_reasons_are_logged(caplog):
    model = conv_net()
    with caplog.at_level(logging.DEBUG, logger="passes.equalize"):
        pairs = find_pairs(model)
    names = {(a.name, b.name) for a, _, b in pairs}
    assert ("conv1", "dw") in names and ("project", "expand") in names
    assert ("dw", "project") not in names
    assert "Clip" in caplog.text
    relu6_pairs = {(a.name, b.name) for a, _, b in find_pairs(model, relu6="relu")}
    assert ("dw", "project") in relu6_pairs
    changed = equalize(model, relu6="relu")
    assert "Clip" not in {node.op_type for node in changed.graph.node}
    assert applied_transforms(changed)[0]["function_preserved"] is False


def test_bias_absorption_centres_the_linear_intermediate():
    model = conv_net()
    data = conv_data()
    plain = equalize(model, bias_absorption=False)
    shifted = equalize(model, data=data)

    def width(m):
        stats = collect_channel_stats(m, data, ["c2"], progress=False)["c2"]
        return stats.max.max() - stats.min.min()

    assert max_rel_error(run(model, data), run(shifted, data)) <= 1e-4
    assert width(shifted) < width(plain)
    assert "expand_bias_absorbed" in {init.name for init in shifted.graph.initializer}


def test_second_run_is_skipped(caplog):
    once = equalize(conv_net())
    with caplog.at_level(logging.INFO, logger="passes.equalize"):
        twice = equalize(once)
    assert "already equalized" in caplog.text
    assert len(applied_transforms(twice)) == 1


def test_bad_option_is_rejected():
    with pytest.raises(ValueError):
        equalize(conv_net(), relu6="maybe")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv2", "efficientnet_lite0"])
def test_real_models_keep_their_function(name):
    from tests.passes.real_models import outputs, real_model

    model, data = real_model(name)
    result = equalize(model, data=data)
    assert applied_transforms(result)[0]["pairs"] >= 1
    assert max_rel_error(outputs(model, data), outputs(result, data)) <= 1e-4
