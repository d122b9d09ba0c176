"""Train the bundled default model: a small edge CNN on Fashion-MNIST.

Reads the Debian package dataset-fashion-mnist (idx files under
/usr/share/datasets/fashion-mnist), trains on CPU with fixed seeds and writes

- models/fashion_cnn.onnx        float model, opset 17, input "input" [N,1,28,28]
                                 float32, output "logits" [N,10]; dynamic batch
- models/data/fashion_calib.npz  "input": 256 training images, float32, preprocessed
- models/data/fashion_test.npz   "pixels": uint8 [5000,1,28,28] (the first 5000 test
                                 images), "labels": int64 [5000]
- models/fashion_cnn.json        preprocessing, float accuracies, training command

Preprocessing is models.bundled.preprocess: x = (pixel / 255 - mean) / std with the
Fashion-MNIST training-set mean and std.

The network is shaped to exercise the compiler like an edge model does: 3x3 convs
with BatchNormalization (kept in the export, the canonicalize pass folds it), ReLU
and ReLU6 (Clip), MaxPool, a MobileNet-style residual block (depthwise 3x3 +
pointwise 1x1 + Add), GlobalAveragePool, Flatten and Gemm.

    python tools/train_fashion_cnn.py            # about 3-5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

DATASET_DIR = Path("/usr/share/datasets/fashion-mnist")
REPO_ROOT = Path(__file__).resolve().parent.parent
# Runnable from a checkout without installing edgeq.
sys.path.insert(0, str(REPO_ROOT))

from compiler.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from models.bundled import FASHION_MEAN, FASHION_STD, preprocess  # noqa: E402

SEED = 0
CALIB_COUNT = 256
BUNDLED_TEST_COUNT = 5000


def read_idx(path: Path) -> np.ndarray:
    """Parse one gzip-compressed idx file (the MNIST container format)."""
    raw = gzip.decompress(path.read_bytes())
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(dataset_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (uint8 pixels [N,1,28,28], int64 labels [N]) of 'train' or 't10k'."""
    images = read_idx(dataset_dir / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(dataset_dir / f"{split}-labels-idx1-ubyte.gz")
    return images[:, None, :, :].copy(), labels.astype(np.int64)


def build_network():
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, kernel: int, groups: int = 1) -> list:
        return [
            nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]

    class InvertedResidual(nn.Module):
        """Depthwise 3x3 + ReLU6, pointwise 1x1, added to the block input."""

        def __init__(self, channels: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                *conv_bn(channels, channels, 3, groups=channels),
                nn.ReLU6(),
                *conv_bn(channels, channels, 1),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.body(x)

    return nn.Sequential(
        *conv_bn(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2),  # 16x14x14
        *conv_bn(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),  # 32x7x7
        *conv_bn(32, 64, 3), nn.ReLU6(),  # 64x7x7
        InvertedResidual(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )  # fmt: skip


def accuracy(net, images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
    import torch

    net.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch):
            logits = net(torch.from_numpy(images[start : start + batch]))
            correct += int((logits.argmax(1).numpy() == labels[start : start + batch]).sum())
    return correct / len(images)


def train(net, images: np.ndarray, labels: np.ndarray, epochs: int, batch: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(SEED)
    steps = epochs * (len(images) // batch)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    images_t = torch.from_numpy(images)
    labels_t = torch.from_numpy(labels)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(images), generator=generator)
        start_time, total_loss = time.time(), 0.0
        for step in range(len(images) // batch):
            index = order[step * batch : (step + 1) * batch]
            x = images_t[index]
            # Horizontal flips: clothes are roughly left-right symmetric.
            flip = torch.rand(len(index), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            loss = loss_fn(net(x), labels_t[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item()
        print(
            f"epoch {epoch + 1}/{epochs}: loss {total_loss / (step + 1):.4f} "
            f"({time.time() - start_time:.0f} s)",
            flush=True,
        )


def export_onnx(net) -> bytes:
    """Export with BatchNormalization kept (no constant folding) and a dynamic batch."""
    import torch

    net.eval()
    buffer = io.BytesIO()
    torch.onnx.export(
        net,
        torch.zeros(1, 1, 28, 28),
        buffer,
        dynamo=False,  # the TorchScript exporter needs no onnxscript
        opset_version=17,
        do_constant_folding=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    return buffer.getvalue()


def onnx_accuracy(model_bytes: bytes, images: np.ndarray, labels: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    predictions = np.concatenate(
        [
            session.run(["logits"], {"input": images[start : start + 1000]})[0].argmax(1)
            for start in range(0, len(images), 1000)
        ]
    )
    return float((predictions == labels).mean())


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dataset-dir", type=Path, default=DATASET_DIR)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "models")
    args = parser.parse_args(argv)

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    train_pixels, train_labels = load_split(args.dataset_dir, "train")
    test_pixels, test_labels = load_split(args.dataset_dir, "t10k")
    train_images, test_images = preprocess(train_pixels), preprocess(test_pixels)

    net = build_network()
    started = time.time()
    train(net, train_images, train_labels, args.epochs, args.batch)
    train_seconds = time.time() - started
    torch_accuracy = accuracy(net, test_images, test_labels)
    model_bytes = export_onnx(net)
    onnx_test_accuracy = onnx_accuracy(model_bytes, test_images, test_labels)
    bundled_accuracy = onnx_accuracy(
        model_bytes, test_images[:BUNDLED_TEST_COUNT], test_labels[:BUNDLED_TEST_COUNT]
    )
    print(f"float test accuracy: torch {torch_accuracy:.4f}, onnxruntime {onnx_test_accuracy:.4f}")

    # Calibration: a fixed random draw of training images (never test images).
    calib_index = np.sort(
        np.random.default_rng(SEED).choice(len(train_images), CALIB_COUNT, replace=False)
    )
    data_dir = args.out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    def npz_bytes(**arrays: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()

    atomic_write_bytes(args.out / "fashion_cnn.onnx", model_bytes)
    atomic_write_bytes(
        data_dir / "fashion_calib.npz", npz_bytes(input=train_images[calib_index])
    )
    atomic_write_bytes(
        data_dir / "fashion_test.npz",
        npz_bytes(
            pixels=test_pixels[:BUNDLED_TEST_COUNT], labels=test_labels[:BUNDLED_TEST_COUNT]
        ),
    )
    record = {
        "model": "fashion_cnn.onnx",
        "dataset": "Fashion-MNIST (Debian package dataset-fashion-mnist)",
        "input": {"name": "input", "shape": ["batch", 1, 28, 28], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", 10]},
        "preprocessing": {"formula": "(pixel / 255 - mean) / std", "mean": FASHION_MEAN, "std": FASHION_STD},
        "classes": [
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ],  # fmt: skip
        "float_test_accuracy": onnx_test_accuracy,
        "float_test_accuracy_torch": torch_accuracy,
        "test_images": len(test_labels),
        "bundled_test_accuracy": bundled_accuracy,
        "bundled_test_images": BUNDLED_TEST_COUNT,
        "calibration": f"{CALIB_COUNT} training images, numpy default_rng({SEED}) draw",
        "training": {
            "command": "python tools/train_fashion_cnn.py "
            + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                       (("epochs", args.epochs), ("batch", args.batch))),
            "seed": SEED,
            "torch": torch.__version__,
            "seconds": round(train_seconds),
        },
    }  # fmt: skip
    atomic_write_text(args.out / "fashion_cnn.json", json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out / 'fashion_cnn.onnx'} ({len(model_bytes)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
