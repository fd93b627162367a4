"""Atomic writes (t2t_mtl.core.files): content, no leftover temporary file, target kept on failure."""

from __future__ import annotations

import json

import pytest

from t2t_mtl.core.files import (
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    swap_folder,
    temp_folder_beside,
)


def test_text_bytes_and_json_are_written_as_plain_writes_would(tmp_path):
    text = "zeile ä\nline 2\n"
    atomic_write_text(tmp_path / "a.txt", text)
    (tmp_path / "ref.txt").write_text(text, encoding="utf-8")
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "ref.txt").read_bytes()

    atomic_write_bytes(tmp_path / "b.bin", b"\x00\xffdata")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xffdata"

    obj = {"b": [1, 2.5], "a": "é", "n": float("nan")}
    atomic_write_json(tmp_path / "c.json", obj, indent=2, ensure_ascii=False)
    assert (tmp_path / "c.json").read_text(encoding="utf-8") == json.dumps(
        obj, indent=2, ensure_ascii=False
    ) + "\n"
    atomic_write_json(tmp_path / "d.json", {"x": 1}, end="")
    assert (tmp_path / "d.json").read_text() == '{\n "x": 1\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.txt",
        "b.bin",
        "c.json",
        "d.json",
        "ref.txt",
    ]  # no *.tmp left behind


def test_overwrite_replaces_the_whole_file(tmp_path):
    f = tmp_path / "state.json"
    atomic_write_text(f, "x" * 1000)
    atomic_write_text(f, "short")
    assert f.read_text() == "short" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_failed_write_leaves_the_target_untouched_and_no_tmp(tmp_path):
    f = tmp_path / "keep.json"
    f.write_text("old", encoding="utf-8")
    with pytest.raises(TypeError):
        atomic_write_json(f, {"not serialisable": object()})
    with pytest.raises(RuntimeError), atomic_open(f) as out:
        out.write("half of the new conte")
        raise RuntimeError("writer crashed")
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["keep.json"]
    with pytest.raises(ValueError):
        with atomic_open(f, "a"):
            pass


def test_folder_swap_replaces_the_old_folder_and_cleans_up(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with temp_folder_beside(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".bundle.tmp-")
        (tmp / "new.txt").write_text("new")
        swap_folder(tmp, target)
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temp or .old folder left

    with pytest.raises(RuntimeError), temp_folder_beside(tmp_path / "sub" / "x") as tmp:
        (tmp / "part").write_text("partial")
        raise RuntimeError("build failed")
    assert list((tmp_path / "sub").iterdir()) == []  # the half-built folder is gone
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_failed_folder_swap_puts_the_old_folder_back(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(FileNotFoundError):
        swap_folder(tmp_path / "never-built", target)
    assert (target / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
