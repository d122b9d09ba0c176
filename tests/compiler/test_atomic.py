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
