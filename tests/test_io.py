"""io.py: an atomic write that fails midway leaves the old file (or folder) exactly as it was."""

from __future__ import annotations

import os

import pytest

from xtc_lightning.io import atomic_folder, atomic_path, write_text_atomic


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_text_atomic_replaces_and_creates_parents(tmp_path):
    path = tmp_path / "a" / "results.json"
    write_text_atomic(path, "one\n")
    write_text_atomic(path, "two\n")
    assert path.read_text() == "two\n" and leftovers(path.parent) == []


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name == f".results.json.tmp{os.getpid()}"
        tmp.write_text("half of the new con")
        raise RuntimeError("disk full")
    assert path.read_text() == "old\n" and leftovers(tmp_path) == []


def test_suffix_is_kept_for_writers_that_need_it(tmp_path):
    import numpy as np

    path = tmp_path / "split.npz"
    with atomic_path(path, suffix=".npz") as tmp:
        assert tmp.name.endswith(".npz")
        np.savez(tmp, x=np.arange(3))  # would append .npz to a name without it
    with np.load(path) as f:
        assert f["x"].tolist() == [0, 1, 2]
    assert leftovers(tmp_path) == []


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "old.bin").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(folder) as tmp:
        (tmp / "new.bin").write_text("new")
        raise RuntimeError("killed")
    assert sorted(p.name for p in folder.iterdir()) == ["old.bin"] and leftovers(tmp_path) == []
    with atomic_folder(folder) as tmp:
        (tmp / "new.bin").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["new.bin"] and leftovers(tmp_path) == []


def test_keep_existing_lets_the_first_publisher_win(tmp_path):
    cache = tmp_path / "teacher-abc"
    with atomic_folder(cache, keep_existing=True) as tmp:
        (tmp / "result.json").write_text("first")
    with atomic_folder(cache, keep_existing=True) as tmp:
        (tmp / "result.json").write_text("second")
    assert (cache / "result.json").read_text() == "first" and leftovers(tmp_path) == []
