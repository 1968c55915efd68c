"""The crash-safe file helpers: atomic writes, staged directories, fsync, clean-up."""

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from nbn_keras import files
from tests.helpers import REPO



def test_a_kill_between_write_and_rename_keeps_the_old_file(tmp_path):
    target = tmp_path / "best.keras"
    target.write_text("old complete content")
    # The child loads only the module (no TensorFlow) and is killed at the
    # kill point, after the new content is written and synced.
    script = textwrap.dedent("""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("files", "nbn_keras/files.py")
        files = importlib.util.module_from_spec(spec); spec.loader.exec_module(files)
        with files.atomic_write(sys.argv[1], kill_point_name="best") as tmp:
            with open(tmp, "w") as f:
                f.write("new complete content")
    """)
    killed = subprocess.run(
        [sys.executable, "-c", script, str(target)], cwd=REPO, capture_output=True,
        text=True, timeout=60, env=dict(os.environ, NBN_KERAS_KILL_AT="best"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert target.read_text() == "old complete content"
    (leftover,) = [p for p in tmp_path.iterdir() if p.name != "best.keras"]
    assert leftover.name.startswith(".tmp-best-") and leftover.suffix == ".keras"
    assert leftover.read_text() == "new complete content"
    (tmp_path / "notes.txt").write_text("the user's")
    assert files.remove_stale_temporaries(str(tmp_path)) == [leftover.name]
    assert sorted(os.listdir(tmp_path)) == ["best.keras", "notes.txt"]
    assert target.read_text() == "old complete content"


@pytest.fixture
def synced(monkeypatch):
    """Records `("fsync", path)` and `("rename", dst)` in order of the calls."""
    events, opened = [], {}
    real_open, real_fsync = os.open, os.fsync
    real_replace, real_rename = os.replace, os.rename

    def record_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        opened[fd] = os.path.abspath(path)
        return fd

    def record_fsync(fd):
        events.append(("fsync", opened.get(fd, fd)))
        real_fsync(fd)

    def record_move(real):
        def move(src, dst, *args, **kwargs):
            real(src, dst, *args, **kwargs)
            events.append(("rename", os.path.abspath(dst)))
        return move

    monkeypatch.setattr(os, "open", record_open)
    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_move(real_replace))
    monkeypatch.setattr(os, "rename", record_move(real_rename))
    return events


def test_the_directory_is_synced_after_the_rename(tmp_path, synced):
    target = str(tmp_path / "state.json")
    files.write_json(target, {"epoch": 3})
    assert files.read_json(target) == {"epoch": 3}
    renamed = synced.index(("rename", target))
    assert ("fsync", str(tmp_path)) in synced[renamed + 1:]
    # The content was synced before it took the file's name.
    assert [kind for kind, _ in synced[:renamed]] == ["fsync"]


def test_a_staged_tree_is_synced_whole_then_its_parent(tmp_path, synced):
    parent = tmp_path / "m"
    parent.mkdir()
    with files.staged_directory(str(parent), "export") as staged:
        os.makedirs(os.path.join(staged, "variables"))
        for name in ("saved_model.pb", os.path.join("variables", "variables.index")):
            with open(os.path.join(staged, name), "w") as f:
                f.write("x")
        files.sync_tree(staged, dir_mode=0o750, file_mode=0o640)
        os.rename(staged, str(parent / "1"))
    assert os.path.basename(staged).startswith(f".tmp-export-{os.getpid()}-")
    synced_paths = [path for kind, path in synced if kind == "fsync"]
    expected = [os.path.join(staged, p) for p in (
        "variables/variables.index", "variables", "saved_model.pb", "")]
    assert synced_paths[:4] == [p.rstrip(os.sep) for p in expected]
    assert synced[-2:] == [("rename", str(parent / "1")), ("fsync", str(parent))]
    assert oct((parent / "1").stat().st_mode & 0o777) == oct(0o750)
    assert oct((parent / "1" / "saved_model.pb").stat().st_mode & 0o777) == oct(0o640)


def test_a_failed_staged_tree_leaves_nothing(tmp_path):
    with pytest.raises(OSError, match="disk full"):
        with files.staged_directory(str(tmp_path), "export") as staged:
            with open(os.path.join(staged, "saved_model.pb"), "w") as f:
                f.write("partial")
            raise OSError("disk full")
    assert os.listdir(tmp_path) == []


def test_fsync_of_a_directory_tolerates_only_file_systems_that_cannot(tmp_path, monkeypatch):
    def refuse(code):
        def fsync(fd):
            raise OSError(code, os.strerror(code))
        return fsync

    monkeypatch.setattr(os, "fsync", refuse(errno.EINVAL))
    files.fsync_directory(str(tmp_path))  # Not an error: nothing more to do.
    monkeypatch.setattr(os, "fsync", refuse(errno.EIO))
    with pytest.raises(OSError, match=os.strerror(errno.EIO)):
        files.fsync_directory(str(tmp_path))


def test_clean_up_removes_only_the_kind_asked_and_the_stale(tmp_path):
    (tmp_path / ".tmp-state-abc.json").write_text("{")
    (tmp_path / ".tmp-export-1-ab-h").mkdir()
    (tmp_path / ".tmp-export-2-ab-h").mkdir()
    (tmp_path / "1").mkdir()
    (tmp_path / "README").write_text("the user's")
    assert files.remove_stale_temporaries(str(tmp_path)) == [".tmp-state-abc.json"]
    removed = files.remove_stale_temporaries(
        str(tmp_path), directories=True, is_stale=lambda path: path.endswith("-2-ab-h"))
    assert removed == [".tmp-export-2-ab-h"]
    assert sorted(os.listdir(tmp_path)) == [".tmp-export-1-ab-h", "1", "README"]
    assert files.remove_stale_temporaries(str(tmp_path / "absent")) == []
