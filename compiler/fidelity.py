"""How faithful a quantized model is to the float one: model- and tensor-level metrics.

Metrics (all float vs quantized on the same inputs):
  * ``sqnr_db``: 10 log10(sum x^2 / sum (x - x_q)^2), per output and per tensor;
  * ``cosine``: mean cosine similarity of per-sample output vectors;
  * for classifier outputs ([N, C], C >= 2, rows not unit-norm): ``top1_agreement``,
    ``top5_agreement`` (float top-1 within quantized top-5) and ``kl`` (mean
    KL divergence of the softmax distributions, float || quantized).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx

from compiler.graph import graph_input_names, graph_output_names


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def sqnr_db(signal_power: float, noise_power: float) -> float:
    if noise_power <= 0:
        return float("inf")
    if signal_power <= 0:
        return float("-inf")
    return float(10.0 * np.log10(signal_power / noise_power))


def compare_outputs(reference: np.ndarray, quantized: np.ndarray) -> dict[str, float]:
    """Fidelity metrics of one output tensor (first axis = samples)."""
    reference = np.asarray(reference, dtype=np.float64)
    quantized = np.asarray(quantized, dtype=np.float64)
    flat_ref = reference.reshape(reference.shape[0], -1)
    flat_q = quantized.reshape(quantized.shape[0], -1)
    norms = np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_q, axis=1)
    cosine = np.where(norms > 0, np.sum(flat_ref * flat_q, axis=1) / np.maximum(norms, 1e-30), 1.0)
    metrics = {
        "sqnr_db": sqnr_db(float(np.sum(flat_ref**2)), float(np.sum((flat_ref - flat_q) ** 2))),
        "cosine": float(np.mean(cosine)),
        "max_abs_error": float(np.max(np.abs(flat_ref - flat_q))) if flat_ref.size else 0.0,
    }
    if looks_like_logits(reference):
        metrics.update(classifier_agreement(reference, quantized))
    return metrics


def looks_like_logits(output: np.ndarray) -> bool:
    """[N, C] scores, not unit-norm embedding vectors (where top-1 means nothing)."""
    if output.ndim != 2 or output.shape[1] < 2:
        return False
    norms = np.linalg.norm(output.reshape(output.shape[0], -1), axis=1)
    return not np.allclose(norms, 1.0, atol=1e-3)


def classifier_agreement(reference: np.ndarray, quantized: np.ndarray) -> dict[str, float]:
    """Top-1/top-5 agreement and mean softmax KL of two [N, C] logit arrays."""
    top1_ref = reference.argmax(axis=1)
    top5_q = np.argsort(-quantized, axis=1)[:, :5]
    p = softmax(reference)
    q = softmax(quantized)
    kl = np.sum(p * (np.log(np.maximum(p, 1e-12)) - np.log(np.maximum(q, 1e-12))), axis=1)
    return {
        "top1_agreement": float(np.mean(top1_ref == quantized.argmax(axis=1))),
        "top5_agreement": float(np.mean(np.any(top5_q == top1_ref[:, None], axis=1))),
        "kl": float(np.mean(kl)),
    }


def run_model(model: onnx.ModelProto, data: dict[str, np.ndarray], *, batch_size: int = 32,
              outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """All outputs (or ``outputs``) of ``model`` on ``data``, concatenated over batches.

    A model whose batch dimension is fixed runs in batches of that size (compiler.data.model_batches).
    """
    from compiler.calibrate import make_session
    from compiler.data import model_batches

    session = make_session(model, optimize=True)  # QDQ models run on onnxruntime's integer kernels
    names = outputs or graph_output_names(model)
    collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for batch, count in model_batches(model, data, batch_size):
        for name, value in zip(names, session.run(names, batch), strict=True):
            collected[name].append(value[:count])
    return {name: np.concatenate(values) for name, values in collected.items()}


def model_fidelity(float_model: onnx.ModelProto, quant_model: onnx.ModelProto,
                   data: dict[str, np.ndarray], *, batch_size: int = 32) -> dict[str, dict[str, float]]:
    """Fidelity of every graph output of ``quant_model`` against ``float_model``."""
    reference = run_model(float_model, data, batch_size=batch_size)
    quantized = run_model(quant_model, data, batch_size=batch_size)
    return {name: compare_outputs(reference[name], quantized[name]) for name in reference}


def dequantized_tensor_names(qdq_model: onnx.ModelProto) -> dict[str, str]:
    """Float tensor name -> the name of its dequantized copy in a QDQ model."""
    quantized_from = {}
    for node in qdq_model.graph.node:
        if node.op_type == "QuantizeLinear":
            source = node.input[0]
            quantized_from[node.output[0]] = source[: -len("_float")] if source.endswith("_float") else source
    mapping = {}
    for node in qdq_model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in quantized_from:
            mapping[quantized_from[node.input[0]]] = node.output[0]
    return mapping


def tensor_sqnr(float_model: onnx.ModelProto, qdq_model: onnx.ModelProto, data: dict[str, np.ndarray],
                tensors: Iterable[str], *, batch_size: int = 32) -> dict[str, float]:
    """SQNR (dB) of each quantized activation tensor against its float value, accumulated over ``data``."""
    from compiler.calibrate import expose_tensors, make_session
    from compiler.data import model_batches

    mapping = dequantized_tensor_names(qdq_model)
    names = [name for name in tensors if name in mapping]
    if not names:
        return {}
    graph_inputs = set(graph_input_names(float_model))
    computed = [name for name in names if name not in graph_inputs]
    float_session = make_session(expose_tensors(float_model, computed))
    quant_names = [mapping[name] for name in names]
    quant_session = make_session(expose_tensors(qdq_model, quant_names))
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    for batch, count in model_batches(float_model, data, batch_size):
        # onnxruntime's run([]) means every output, so a graph whose only quantized tensors are inputs runs nothing
        values = dict(zip(computed, float_session.run(computed, batch), strict=True)) if computed else {}
        reference = [batch[name] if name in graph_inputs else values[name] for name in names]
        quantized = quant_session.run(quant_names, batch)
        for name, ref, q in zip(names, reference, quantized, strict=True):
            ref, q = ref[:count].astype(np.float64), q[:count]
            signal[name] += float(np.sum(ref**2))
            noise[name] += float(np.sum((ref - q) ** 2))
    return {name: sqnr_db(signal[name], noise[name]) for name in names}
