"""Real pretrained models (models/zoo.py) with a little real data, for the slow transform tests."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest

from compiler.fidelity import run_model


@functools.cache
def real_model(name: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """(canonical float model, calibration inputs) -- skips the test when the zoo cannot build it."""
    try:
        from models import photos, sentences, zoo
        from passes.canonicalize import canonicalize

        model = canonicalize(onnx.load(str(zoo.build(name))))
        if name == "minilm":
            data = sentences.tokenize(sentences.calibration_sentences()[:16])
        else:
            data = {"input": photos.calibration_images(8, zoo.PREPROCESSING[name])}
    except Exception as error:  # noqa: BLE001 - a missing weights package or torch skips, not fails
        pytest.skip(f"{name} not available: {error}")
    return model, data


def outputs(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> list[np.ndarray]:
    values = run_model(model, data)
    return [values[value.name] for value in model.graph.output]
