"""Atomic writes, the run lock and kill points, in real processes."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from nbn_keras import files
from nbn_keras.training import run_files
from tests.helpers import REPO



def python(script, *args, env=None):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def test_a_writer_killed_mid_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "backup.keras"
    target.write_text("previous complete content")
    # Importing only the module keeps the child light (no TensorFlow).
    killed = python("""
        import importlib.util, os, signal, sys
        spec = importlib.util.spec_from_file_location("files", "nbn_keras/files.py")
        files = importlib.util.module_from_spec(spec); spec.loader.exec_module(files)
        with files.atomic_write(sys.argv[1]) as tmp:
            with open(tmp, "w") as f:
                f.write("half of the new")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
    """, target)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert target.read_text() == "previous complete content"
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-backup-")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".keras")
    files.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["backup.keras"]


def test_an_error_inside_the_block_keeps_the_previous_file(tmp_path):
    target = tmp_path / "state.json"
    files.write_json(str(target), {"epoch": 1})
    with pytest.raises(RuntimeError):
        with files.atomic_write(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write("{broken")
            raise RuntimeError("disk gone")
    assert files.read_json(str(target)) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["state.json"]


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import importlib.util, sys, time, types
        def load(name, path):
            spec = importlib.util.spec_from_file_location(name, path)
            sys.modules[name] = module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        sys.modules["nbn_keras"] = types.ModuleType("nbn_keras")  # without TensorFlow
        load("nbn_keras.files", "nbn_keras/files.py")
        run_files = load("run_files", "nbn_keras/training/run_files.py")
        with run_files.RunLock(sys.argv[1]):
            print("locked", flush=True)
            time.sleep(120)
    """), str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(run_files.RunDirectoryLocked, match=f"in use by process {holder.pid}"):
            with run_files.RunLock(str(tmp_path)):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_files.RunLock(str(tmp_path)):  # Released by the holder's death.
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


def test_kill_point_counts_and_ignores_other_points():
    result = python("""
        import importlib.util, os
        spec = importlib.util.spec_from_file_location("files", "nbn_keras/files.py")
        files = importlib.util.module_from_spec(spec); spec.loader.exec_module(files)
        files.kill_point("best")
        for i in range(1, 4):
            print(i, flush=True)
            files.kill_point("batch")
    """, env=dict(os.environ, NBN_KERAS_KILL_AT="batch:2"))
    assert result.returncode == -signal.SIGKILL
    assert result.stdout.split() == ["1", "2"]
