"""tools/ort_smoothquant.py: the parts that need no venv, no pip and no model (the run itself is a benchmark)."""

from __future__ import annotations

import pytest

from tools.ort_smoothquant import build_parser, jobs_for, weight_options, write_markdown


def test_parser_reads_alphas_and_rejects_out_of_range() -> None:
    args = build_parser().parse_args(["--alphas", "0.3", "auto", "--bits", "w4a8", "--no-edgeq"])
    assert args.alphas == [0.3, "auto"]
    assert args.bits == ["w4a8"]
    assert args.edgeq_recipes == []
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--alphas", "1.5"])
    for bad in ("w2a8", "w8a8b32", "w4a8b4"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--bits", bad])


def test_weight_options_map_bits_to_onnxruntime_settings() -> None:
    assert weight_options("w8a8") == ("QInt8", None, {})
    assert weight_options("w4a8") == ("QInt4", 21, {})  # int4 types need opset 21
    assert weight_options("w4a8b32") == ("QInt4", 21, {"BlockSize": 32})


def test_jobs_cover_every_combination_once() -> None:
    jobs = jobs_for([0.3, 0.5], [0.5], ["matmul", "all"], ["w8a8", "w4a8"])
    quantized = [job for job in jobs if job["bits"] != "float"]
    # per (bits, op set): one run without SmoothQuant, one per alpha unfolded, one per folding alpha
    assert len(quantized) == 2 * 2 * (1 + 2 + 1)
    assert len({job["name"] for job in jobs}) == len(jobs)  # the names become file names
    plain = [job for job in quantized if job["alpha"] is None]
    assert len(plain) == 4 and all(job["folding"] is None for job in plain)
    assert {job["alpha"] for job in jobs if job["bits"] == "float"} == {0.3, 0.5}


def test_markdown_reports_install_failure_instead_of_numbers(tmp_path) -> None:
    result = {"venv": "/v", "requirements": ["neural-compressor==2.6"],
              "project": {"onnxruntime": "1.31.1", "numpy": "2.4"},
              "install_error": "pip install failed: no matching distribution"}
    path = tmp_path / "section.md"
    write_markdown(result, path, "python tools/ort_smoothquant.py")
    text = path.read_text()
    assert "**Not run**: pip install failed: no matching distribution" in text
    assert "| onnxruntime |" not in text


def test_markdown_tables_show_failures_verbatim(tmp_path) -> None:
    rows = [{"bits": "w8a8", "op_set": "matmul", "alpha": None, "folding": None, "cosine": 0.9, "seconds": 1.0,
             "smooth_muls_left": 0},
            {"bits": "w8a8", "op_set": "matmul", "alpha": 0.5, "folding": True, "seconds": 2.0,
             "error": "ValueError: bad dims", "cause": "ValueError: bad dims"},
            {"bits": "float", "op_set": None, "alpha": 0.5, "folding": False, "cosine": 1.0, "seconds": 1.0,
             "max_rel_error": 1e-7, "smooth_muls_left": 3}]
    result = {"venv": "/v", "requirements": [], "project": {"onnxruntime": "1.31.1", "numpy": "2.4"},
              "versions": {"neural-compressor": "2.6"}, "eval_samples": 2, "calib_samples": 1, "ort": rows,
              "edgeq": [{"bits": "w8a8", "recipe": "transformer", "steps": ["smooth"], "cosine": 0.99,
                         "seconds": 3.0}]}
    path = tmp_path / "section.md"
    write_markdown(result, path, "cmd")
    lines = path.read_text().splitlines()
    assert any(line.startswith("| onnxruntime | MatMul only | alpha 0.5, folding on | failed: ValueError: bad dims")
               for line in lines)
    assert "- `ValueError: bad dims`" in lines
    assert any("`transformer` recipe (smooth)" in line and "0.9900" in line for line in lines)
    assert "| 0.5 | 1.000000 | 1.00e-07 |" in lines
