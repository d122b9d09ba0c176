"""compiler.mixed: the allocator as the pipeline runs it -- sensitivities, candidates, re-ranking, record."""

from __future__ import annotations

import numpy as np
import pytest

from compiler.errors import EdgeqError
from compiler.mixed import AllocatorOptions, allocate_bits
from passes.canonicalize import canonicalize
from passes.select_layers import select_layers
from targets.base import get_target
from tests.qdq_fixtures import conv_block_model


def _setup(samples: int = 48):
    model = canonicalize(conv_block_model())
    plan = select_layers(model)
    calib = {"x": np.random.default_rng(0).uniform(-1, 1, (samples, 3, 16, 16)).astype(np.float32)}
    return model, plan, calib


def test_default_allocation_reranks_held_out_and_records_how():
    model, plan, calib = _setup()
    mixed = allocate_bits(model, plan, calib, get_target("onnx"), None, "size=0.7", integer_only=False)
    record = plan.totals["allocation"]["allocator"]
    assert record["sensitivity"] == "in-context" and record["context"] == [8, 8]
    assert record["held_out"] is True and record["rerank_samples"] == 16 and record["sensitivity_samples"] == 32
    assert [tuple(pair) for pair in record["candidates"]] == list(get_target("onnx").cost_model().bit_pairs)
    assert record["refine"] == 2
    candidates = plan.totals["allocation"]["candidates"]
    ranked = [c for c in candidates if "rank" in c]
    refined = [c for c in candidates if "step" in c]
    assert 1 < len(ranked) <= 8 and refined[0]["step"] == 0 and len(refined) >= 1
    assert refined[0]["measured"] == min(c["measured"] for c in ranked)  # refinement starts at the re-ranked best
    assert sum(c["chosen"] for c in candidates) == 1
    chosen = next(c for c in candidates if c["chosen"])
    assert chosen["measured"] == min(c["measured"] for c in candidates)
    assert mixed.allocation.totals["size_fraction"] <= 0.7
    # the chosen plan is the one measured best: measuring it again gives the recorded distance
    again = mixed.distance(mixed.allocation.choices)
    assert again == pytest.approx(chosen["measured"], rel=1e-6)
    section = plan.totals["report_sections"]["Bit allocation"]
    assert "ILP rank 1" in section and "refine step 0" in section and "in-context" in section
    for name, layer in plan.layers.items():
        assert (layer.w_bits, layer.a_bits) == mixed.allocation.choices[name]


def test_single_layer_without_reranking_is_the_plain_ilp_optimum():
    model, plan, calib = _setup(24)  # fewer samples than the sensitivity wants: nothing held out
    options = AllocatorOptions(sensitivity="single-layer", rerank=0, refine=0, pairs=((4, 8), (8, 8)))
    mixed = allocate_bits(model, plan, calib, get_target("onnx"), None, "size=0.7", integer_only=False,
                          options=options)
    assert mixed.distance is None and mixed.allocation.method == "ilp-cbc"
    assert "candidates" not in plan.totals["allocation"]
    assert all(layer.a_bits == 8 for layer in plan.layers.values())


def test_bad_allocator_options_are_user_errors():
    with pytest.raises(EdgeqError, match="sensitivity mode"):
        AllocatorOptions(sensitivity="guess")
    with pytest.raises(EdgeqError, match="rerank"):
        AllocatorOptions(rerank=-1)
    with pytest.raises(EdgeqError, match="refine"):
        AllocatorOptions(refine=-1)
