"""The bundled default model: a small edge CNN trained on Fashion-MNIST.

``edgeq compile`` with no model uses it, with its bundled calibration data, so
the default run needs nothing but this package. tools/train_fashion_cnn.py made
the files; models/fashion_cnn.json records the preprocessing, the float test
accuracy and the training command.

- fashion_cnn.onnx: input "input" float32 [N,1,28,28], output "logits" [N,10]
- data/fashion_calib.npz: "input", 256 preprocessed training images (ready to feed)
- data/fashion_test.npz: "pixels" uint8 [5000,1,28,28] (the first 5000 Fashion-MNIST
  test images) and "labels"; :func:`test_data` applies the preprocessing
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_FILE = PACKAGE_DIR / "fashion_cnn.onnx"
RECORD_FILE = PACKAGE_DIR / "fashion_cnn.json"
CALIBRATION_FILE = PACKAGE_DIR / "data" / "fashion_calib.npz"
TEST_FILE = PACKAGE_DIR / "data" / "fashion_test.npz"
# Mean and std of the Fashion-MNIST training pixels scaled to [0, 1]; the training
# script imports these, so model and data cannot disagree.
FASHION_MEAN = 0.2860
FASHION_STD = 0.3530


def model_path() -> Path:
    return MODEL_FILE


@functools.lru_cache(maxsize=1)
def record() -> dict[str, Any]:
    """fashion_cnn.json: preprocessing, class names, float accuracies, training command."""
    return json.loads(RECORD_FILE.read_text())


def preprocess(pixels: np.ndarray) -> np.ndarray:
    """uint8 Fashion-MNIST pixels [N,1,28,28] -> the model's float32 input."""
    scaled = pixels.astype(np.float32) / np.float32(255.0)
    return ((scaled - np.float32(FASHION_MEAN)) / np.float32(FASHION_STD)).astype(np.float32)


def calibration_data() -> dict[str, np.ndarray]:
    """{"input": float32 [256,1,28,28]}: training images, never test images."""
    with np.load(CALIBRATION_FILE, allow_pickle=False) as data:
        return {"input": data["input"]}


def test_data() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({"input": float32 [5000,1,28,28]}, int64 labels [5000])."""
    with np.load(TEST_FILE, allow_pickle=False) as data:
        return {"input": preprocess(data["pixels"])}, data["labels"].astype(np.int64)
