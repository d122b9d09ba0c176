"""compiler/atomic.py: outputs appear whole or not at all, and no temporary folder outlives a call."""

import os

import pytest

from compiler import atomic
from compiler.atomic import atomic_dir, check_output_dir, check_output_file
from compiler.errors import EdgeqError


def _leftovers(folder):
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def test_a_failing_final_move_leaves_no_temporary_folder(tmp_path, monkeypatch):
    def refuse(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "plan.json").write_text("{}")
    assert _leftovers(tmp_path) == []


def test_a_file_in_the_way_is_a_one_line_error_before_anything_is_written(tmp_path):
    (tmp_path / "notafile.txt").write_text("mine")
    for path in (tmp_path / "notafile.txt", tmp_path / "notafile.txt" / "sub"):
        with pytest.raises(EdgeqError, match="notafile.txt"):
            with atomic_dir(path) as tmp:
                (tmp / "plan.json").write_text("{}")
        with pytest.raises(EdgeqError, match="not a folder|is a file"):
            check_output_dir(path)
    assert _leftovers(tmp_path) == [] and (tmp_path / "notafile.txt").read_text() == "mine"
    with pytest.raises(EdgeqError, match="is a folder"):
        check_output_file(tmp_path)


def test_failed_body_removes_the_parent_folders_it_made(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "a" / "b" / "out"):
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with atomic_dir(tmp_path / "a" / "b" / "out") as tmp:
        (tmp / "plan.json").write_text("{}")
    assert (tmp_path / "a" / "b" / "out" / "plan.json").read_text() == "{}"


def test_output_dot_writes_into_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with atomic_dir(".") as tmp:
        (tmp / "plan.json").write_text("{}")
    assert sorted(os.listdir(tmp_path)) == ["plan.json"]


def _write_run(folder, names, **kwargs):
    with atomic_dir(folder, **kwargs) as tmp:
        for name in names:
            if name.endswith("/"):
                (tmp / name).mkdir()
                (tmp / name / "inner.c").write_text(name)
            else:
                (tmp / name).write_text(name)


def test_replacing_outputs_removes_what_the_last_run_wrote_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    _write_run(out, ["plan.json", "mcu/", "verify.json", "pareto.svg"], replaces_outputs=True)
    (out / "notes.txt").write_text("the user's")
    (out / "mine").mkdir()
    _write_run(out, ["plan.json", "model.qdq.onnx"], replaces_outputs=True)
    assert sorted(path.name for path in out.iterdir()) == sorted(
        [atomic.OUTPUTS_MANIFEST, "mine", "model.qdq.onnx", "notes.txt", "plan.json"])
    assert atomic.recorded_outputs(out) == ["model.qdq.onnx", "plan.json"]
    # a file where the new run writes a folder (and the other way round) is replaced
    _write_run(out, ["plan.json/", "model.qdq.onnx"], replaces_outputs=True)
    _write_run(out, ["plan.json"], replaces_outputs=True)
    assert (out / "plan.json").read_text() == "plan.json" and not (out / "model.qdq.onnx").exists()


def test_without_replacing_or_a_manifest_nothing_is_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pareto.svg").write_text("an older run's, unrecorded")
    _write_run(out, ["plan.json"], replaces_outputs=True)
    assert (out / "pareto.svg").exists()
    _write_run(out, ["report.md"])  # the default keeps what is there
    assert (out / "plan.json").exists() and (out / "report.md").exists()


def test_a_manifest_naming_paths_outside_the_folder_removes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "precious").write_text("keep")
    (out / "sub").mkdir()
    (out / "sub" / "keep.txt").write_text("keep")
    (out / atomic.OUTPUTS_MANIFEST).write_text(
        '{"outputs": ["..", "../precious", "sub/keep.txt", "/etc", ".", "", 3, ".edgeq-outputs.json"]}')
    _write_run(out, ["plan.json"], replaces_outputs=True)
    assert (tmp_path / "precious").read_text() == "keep" and (out / "sub" / "keep.txt").exists()
    (out / atomic.OUTPUTS_MANIFEST).write_text("not json")
    _write_run(out, ["plan.json"], replaces_outputs=True)
    assert atomic.recorded_outputs(out) == ["plan.json"]
