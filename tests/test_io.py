"""flatquant.io: files and folders appear whole under their final name, or not at all."""
import os

import pytest

from flatquant import io


def test_atomic_write_text_replaces_whole(tmp_path):
    p = io.atomic_write_text(tmp_path / "sub" / "a.json", "one\n")
    assert p.read_text() == "one\n" and oct(os.stat(p).st_mode & 0o777) == "0o644"
    io.atomic_write_text(p, "two\n")
    assert p.read_text() == "two\n"
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.json"]  # no temporary file left


def test_atomic_write_text_leaves_nothing_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    p.write_text("old")

    def fail(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write_text(p, "new")
    assert p.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]


def test_partial_folder_then_commit(tmp_path):
    out = tmp_path / "params"
    work = io.partial_folder(out)
    assert work.name == "params.partial"
    (work / "layers").mkdir(parents=True)
    (work / "meta.json").write_text("{}")
    io.commit_folder(out)
    assert not work.exists() and (out / "meta.json").is_file()
    (work).mkdir()  # a second calibration replaces the first
    (work / "new.json").write_text("{}")
    io.commit_folder(out)
    assert sorted(x.name for x in out.iterdir()) == ["new.json"]


def test_commit_into_empty_folder_and_discard(tmp_path):
    out = tmp_path / "params"
    out.mkdir()
    io.partial_folder(out).mkdir()
    io.commit_folder(out)
    assert out.is_dir() and not io.partial_folder(out).exists()
    io.partial_folder(out).mkdir()
    (io.partial_folder(out) / "x").write_text("")
    io.discard_partial(out)
    assert not io.partial_folder(out).exists()
    io.discard_partial(out)  # nothing to discard: no error
