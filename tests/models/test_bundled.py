"""The bundled default model and its data: they load, run in onnxruntime, and agree
with what the training script recorded in models/fashion_cnn.json."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import bundled


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(str(bundled.model_path()), providers=["CPUExecutionProvider"])


def test_model_file_is_a_small_valid_opset17_model():
    path = bundled.model_path()
    assert path.stat().st_size < 1_000_000
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert {op.domain: op.version for op in model.opset_import}[""] == 17
    assert model.ir_version <= 13  # onnxruntime 1.31 loads IR <= 13
    (graph_input,) = model.graph.input
    assert graph_input.name == "input"
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert [o.name for o in model.graph.output] == ["logits"]


def test_graph_has_the_ops_the_compiler_is_meant_to_meet():
    """BatchNormalization kept for canonicalize, a depthwise conv, a residual Add, ReLU6 as Clip."""
    model = onnx.load(str(bundled.model_path()))
    ops = Counter(node.op_type for node in model.graph.node)
    for op in ("Conv", "BatchNormalization", "Relu", "Clip", "MaxPool", "Add",
               "GlobalAveragePool", "Flatten", "Gemm"):  # fmt: skip
        assert ops[op] >= 1, op
    groups = [
        onnx.helper.get_attribute_value(attr)
        for node in model.graph.node
        if node.op_type == "Conv"
        for attr in node.attribute
        if attr.name == "group"
    ]
    assert max(groups) > 1


def test_accuracy_on_bundled_test_data_matches_the_record(session):
    inputs, labels = bundled.test_data()
    assert inputs["input"].dtype == np.float32 and inputs["input"].shape == (5000, 1, 28, 28)
    assert labels.dtype == np.int64 and labels.shape == (5000,)
    assert set(np.unique(labels)) == set(range(10))
    predictions = session.run(["logits"], inputs)[0].argmax(1)
    accuracy = float((predictions == labels).mean())
    record = bundled.record()
    # Another onnxruntime build may flip an image or two whose top logits nearly tie.
    assert accuracy == pytest.approx(record["bundled_test_accuracy"], abs=0.001)
    assert record["float_test_accuracy"] >= 0.89
    assert record["test_images"] == 10000


def test_calibration_data_is_preprocessed_like_the_test_data(session):
    calib = bundled.calibration_data()
    assert list(calib) == ["input"]
    images = calib["input"]
    assert images.dtype == np.float32 and images.shape == (256, 1, 28, 28)
    black, white = bundled.preprocess(np.array([0, 255], dtype=np.uint8))
    assert images.min() == pytest.approx(black) and images.max() == pytest.approx(white)
    test_inputs, _ = bundled.test_data()
    # Training images, not test images.
    test_rows = {row.tobytes() for row in test_inputs["input"]}
    assert not any(row.tobytes() in test_rows for row in images)
    logits = session.run(["logits"], calib)[0]
    assert np.isfinite(logits).all()


def test_dynamic_batch(session):
    inputs, _ = bundled.test_data()
    one = session.run(["logits"], {"input": inputs["input"][:1]})[0]
    many = session.run(["logits"], {"input": inputs["input"][:7]})[0]
    assert one.shape == (1, 10) and many.shape == (7, 10)
    np.testing.assert_allclose(one[0], many[0], rtol=1e-5, atol=1e-5)
