"""The calibration loop on tiny graphs: intermediates equal numpy, batches stay small."""

import weakref

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler.calibrate import (
    ConvPatches,
    collect_channel_stats,
    collect_observers,
    collect_ranges,
    collect_second_moment,
    expose_tensors,
    im2col,
    run_batches,
)
from compiler.errors import EdgeqError
from compiler.observers import MinMaxObserver, make_observer

RNG = np.random.default_rng(0)
W1 = RNG.normal(size=(6, 8)).astype(np.float32)
B1 = RNG.normal(size=8).astype(np.float32)
W2 = RNG.normal(size=(8, 3)).astype(np.float32)


def mlp(batch_dim="N", typed_intermediates: bool = False) -> onnx.ModelProto:
    """x -> MatMul -> Add -> Relu -> MatMul -> y (no value_info unless asked)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["mm1"], name="mm1"),
        helper.make_node("Add", ["mm1", "b1"], ["pre"], name="add1"),
        helper.make_node("Relu", ["pre"], ["act"], name="relu1"),
        helper.make_node("MatMul", ["act", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 3])],
        [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(B1, "b1"), numpy_helper.from_array(W2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    if typed_intermediates:
        model = onnx.shape_inference.infer_shapes(model)
    return model


def numpy_mlp(x: np.ndarray) -> dict[str, np.ndarray]:
    mm1 = x @ W1
    pre = mm1 + B1
    act = np.maximum(pre, 0)
    return {"x": x, "mm1": mm1, "pre": pre, "act": act, "y": act @ W2}


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).normal(size=(70, 6)).astype(np.float32)}


@pytest.mark.parametrize("typed", [False, True])
def test_run_batches_intermediates_equal_numpy(data, typed):
    model = mlp(typed_intermediates=typed)
    before = model.SerializeToString()
    names = ["x", "mm1", "pre", "act", "y", "w2"]
    seen: list[dict[str, np.ndarray]] = []
    run_batches(model, data, names, seen.append, batch_size=32, progress=False)
    assert model.SerializeToString() == before  # the caller's model is untouched
    assert [len(batch["x"]) for batch in seen] == [32, 32, 6]  # never more than batch_size
    expected = numpy_mlp(data["x"])
    for name in ["x", "mm1", "pre", "act", "y"]:
        got = np.concatenate([batch[name] for batch in seen])
        np.testing.assert_allclose(got, expected[name], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(seen[0]["w2"], W2)  # initializers are served too


def test_callback_memory_does_not_grow_with_samples():
    """The callback sees batches of <= batch_size whatever the sample count."""
    for samples in (5, 200):
        x = np.random.default_rng(2).normal(size=(samples, 6)).astype(np.float32)
        sizes: list[int] = []

        def record(batch, sizes=sizes):
            sizes.append(batch["act"].shape[0])

        run_batches(mlp(), {"x": x}, ["act"], record, batch_size=16, progress=False)
        assert max(sizes) <= 16 and sum(sizes) == samples


def test_previous_batch_is_released_before_the_next_run(data):
    """run_batches holds no reference to a batch once its callback returned, so onnxruntime
    can reuse that memory for the next batch (peak = one batch of exposed tensors). Checked
    when the next input batch is sliced, i.e. before the next onnxruntime run."""
    previous: list[weakref.ref] = []
    alive_when_slicing = []

    class ProbedInput(np.ndarray):
        def __getitem__(self, index):
            if previous:
                alive_when_slicing.append(previous[-1]() is not None)
            return super().__getitem__(index)

    def callback(batch):
        previous.append(weakref.ref(batch["act"]))

    run_batches(mlp(), {"x": data["x"].view(ProbedInput)}, ["act"], callback, batch_size=8,
                progress=False)
    assert len(previous) == 9 and len(alive_when_slicing) >= 8 and not any(alive_when_slicing)


def test_expose_tensors_declares_types_and_keeps_original():
    model = mlp()
    exposed = expose_tensors(model, ["act", "x", "y", "w1"])
    outputs = {value.name: value for value in exposed.graph.output}
    assert set(outputs) == {"y", "act"}  # inputs/initializers are not outputs; y already was
    assert outputs["act"].type.tensor_type.elem_type == TensorProto.FLOAT  # via shape inference
    assert [value.name for value in model.graph.output] == ["y"]


def test_fixed_batch_model_runs_at_its_batch_size(data):
    sizes = []
    with pytest.warns(UserWarning, match="last 2 calibration samples are skipped"):
        run_batches(mlp(batch_dim=4), data, ["y"], lambda b: sizes.append(len(b["y"])),
                    batch_size=32, progress=False)
    assert set(sizes) == {4} and sum(sizes) == 68


def test_collect_ranges_minmax_equals_numpy(data):
    expected = numpy_mlp(data["x"])
    ranges = collect_ranges(mlp(), data, ["pre", "act"], method="minmax", batch_size=8, progress=False)
    assert ranges["pre"] == pytest.approx((expected["pre"].min(), expected["pre"].max()), rel=1e-5)
    assert ranges["act"] == pytest.approx((0.0, expected["act"].max()), rel=1e-5)


def test_collect_ranges_overrides_and_options(data):
    observers = collect_observers(
        mlp(), data, ["pre", "y"], method="percentile", method_overrides={"y": "minmax"},
        observer_options={"percentile": {"percentile": 90.0}}, progress=False,
    )
    assert isinstance(observers["y"], MinMaxObserver)
    assert observers["pre"].percentile == 90.0
    ranges = collect_ranges(mlp(), data, ["pre"], method="percentile", progress=False,
                            observer_options={"percentile": {"percentile": 90.0}})
    assert ranges["pre"][1] < numpy_mlp(data["x"])["pre"].max()


def test_collect_channel_stats_equals_numpy(data):
    expected = numpy_mlp(data["x"])["pre"]
    stats = collect_channel_stats(mlp(), data, ["pre"], axis=-1, batch_size=16, progress=False)["pre"]
    np.testing.assert_allclose(stats.max, expected.max(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats.min, expected.min(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats.absmax, np.abs(expected).max(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats.mean, expected.mean(axis=0), rtol=1e-4, atol=1e-6)
    assert stats.count == 70


def test_collect_second_moment_of_matmul_input(data):
    act = numpy_mlp(data["x"])["act"].astype(np.float64)
    moment = collect_second_moment(mlp(), data, ["act"], batch_size=16, progress=False)["act"]
    np.testing.assert_allclose(moment, act.T @ act / len(act), rtol=1e-5, atol=1e-7)


def conv_model(group: int, pads=(1, 0, 1, 2), strides=(2, 1)) -> tuple[onnx.ModelProto, np.ndarray]:
    weight = RNG.normal(size=(4, 4 // group, 3, 2)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=list(pads), strides=list(strides),
                            dilations=[1, 2], group=group)
    graph = helper.make_graph(
        [node], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 7, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model, weight


@pytest.mark.parametrize("group", [1, 2, 4])
def test_im2col_reproduces_onnx_conv(group):
    """Patches @ weight rows == onnxruntime's Conv: the column order matches the weight layout."""
    model, weight = conv_model(group)
    x = RNG.normal(size=(2, 4, 7, 6)).astype(np.float32)
    outputs = []
    run_batches(model, {"x": x}, ["y"], lambda b: outputs.append(b["y"]), progress=False)
    reference = outputs[0]  # [N, M, OH, OW]
    patches = ConvPatches(kernel=(3, 2), strides=(2, 1), pads=(1, 0, 1, 2), dilations=(1, 2), group=group)
    rows = im2col(x, patches)  # [G, N*OH*OW, C/G*KH*KW]
    per_group = weight.reshape(group, 4 // group, -1)  # [G, M/G, C/G*KH*KW]
    result = np.einsum("gpk,gmk->gmp", rows, per_group)  # [G, M/G, N*OH*OW]
    n, m, oh, ow = reference.shape
    result = result.reshape(m, n, oh, ow).transpose(1, 0, 2, 3)
    np.testing.assert_allclose(result, reference, rtol=1e-4, atol=1e-5)


def test_collect_second_moment_over_conv_patches():
    model, _ = conv_model(group=2)
    x = RNG.normal(size=(5, 4, 7, 6)).astype(np.float32)
    patches = ConvPatches(kernel=(3, 2), strides=(2, 1), pads=(1, 0, 1, 2), dilations=(1, 2), group=2)
    moments = collect_second_moment(model, {"x": x}, ["x"], conv_patches={"x": patches},
                                    batch_size=2, progress=False)
    rows = im2col(x, patches).astype(np.float64)
    expected = np.einsum("gpi,gpj->gij", rows, rows) / rows.shape[1]
    assert moments["x"].shape == (2, 12, 12)
    np.testing.assert_allclose(moments["x"], expected, rtol=1e-6)
    channel = collect_second_moment(model, {"x": x}, ["x"], axis=1, progress=False)["x"]
    flat = np.moveaxis(x, 1, -1).reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(channel, flat.T @ flat / len(flat), rtol=1e-6)


def test_onnxruntime_failure_is_a_user_error_with_its_first_line(data):
    with pytest.raises(EdgeqError, match="onnxruntime failed on the calibration data: .*"):
        run_batches(mlp(), {"x": data["x"].astype(np.float64)}, ["y"], lambda b: None, progress=False)
    broken = mlp()
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(EdgeqError, match="onnxruntime cannot load the model"):
        run_batches(broken, data, ["y"], lambda b: None, progress=False)


def test_missing_input_and_unknown_tensor(data):
    with pytest.raises(EdgeqError, match=r"no values for model input\(s\) \['x'\]"):
        run_batches(mlp(), {"z": data["x"]}, ["y"], lambda b: None, progress=False)
    with pytest.raises(ValueError, match="'nowhere'"):
        run_batches(mlp(), data, ["nowhere"], lambda b: None, progress=False)


def test_histogram_observer_through_the_loop_matches_direct_feed(data):
    """The loop hands observers exactly the tensor values (entropy range equal to feeding numpy)."""
    ranges = collect_ranges(mlp(), data, ["pre"], method="entropy", bits=8, signed=True,
                            symmetric=True, batch_size=70, progress=False)
    direct = make_observer("entropy")
    direct.update(numpy_mlp(data["x"])["pre"])
    assert ranges["pre"] == pytest.approx(direct.compute(8, True, True), rel=1e-4)
