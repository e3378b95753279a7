import os
import stat

import pytest

from classifier.atomic import atomic_path, write_json


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_directory_is_replaced_only_when_the_block_succeeds(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_path(out, directory=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists(), "the old output stays until the new one is whole"
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert siblings(out) == ["out"]


def test_failed_write_keeps_the_old_output_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "model.keras"
    out.write_text("good model")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        assert tmp.suffix == ".keras"
        tmp.write_text("half a mod")
        raise RuntimeError("disk full")
    assert out.read_text() == "good model"
    assert siblings(out) == ["model.keras"]


def test_failed_directory_write_keeps_the_old_directory(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "images.npy").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(out, directory=True) as tmp:
        (tmp / "images.npy").write_text("partial")
        raise KeyboardInterrupt
    assert (out / "images.npy").read_text() == "old"
    assert siblings(out) == ["data"]


def test_outputs_get_umask_permissions_not_private_temp_ones(tmp_path):
    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "metrics.json", {"accuracy": 1.0})
        with atomic_path(tmp_path / "dir", directory=True):
            pass
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "dir").stat().st_mode) == 0o755
