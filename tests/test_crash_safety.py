"""Fault injection: the training command killed at chosen moments, hostile disks.

Every test runs the real command as a subprocess. A run killed with SIGKILL
at any of the kill points of `nbn_keras.training.run_files`, then rerun with the same
command, must end with the test figures and weights of the uninterrupted
run and exactly one exported version.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

from nbn_keras import files
from nbn_keras.training import run_files

from tests.helpers import REPO
from tests.helpers import shared_training_run

# The smallest network and images that still make every file of a run.
RUN = [f"--flagfile={REPO}/configs/digits_lt_nbn.cfg", "--backbone=resnet8", "--image_size=16",
       "--epochs=2", "--steps_per_epoch=2", "--verbose=0", "--nopictures",
       "--model_name=digits"]
MAX_RERUNS = 3

pytestmark = pytest.mark.slow


def train_command(run_dir, export_dir, *extra, kill_at=None):
    env = {key: value for key, value in os.environ.items()
           if key != files.KILL_AT_VARIABLE}
    if kill_at:
        env[files.KILL_AT_VARIABLE] = kill_at
    return subprocess.run(
        [sys.executable, "-m", "nbn_keras.train", *RUN, f"--run_dir={run_dir}",
         f"--export_dir={export_dir}", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def run_until_done(run_dir, export_dir):
    """Reruns the command until it exits 0; returns the number of reruns."""
    for attempt in range(1, MAX_RERUNS + 1):
        result = train_command(run_dir, export_dir)
        if result.returncode == 0:
            return attempt
    raise AssertionError(f"not finished after {MAX_RERUNS} reruns:\n{result.stderr[-3000:]}")


def weights(path):
    return keras.models.load_model(path, compile=False).get_weights()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run the killed runs must end as (`<root>/run`, `<root>/exports`)."""
    return shared_training_run(tmp_path_factory, "uninterrupted", *RUN)


@pytest.mark.parametrize("kill_at", [
    "batch:3",     # mid-epoch (first batch of the second epoch)
    "backup:2",    # backup of the last epoch complete but not yet renamed
    "best:1",      # best.keras of the first epoch complete but not yet renamed
    "evaluate",    # the final evaluation
    "export",      # the SavedModel written, not yet renamed into its version
    "exported",    # the version renamed into place, the phase not yet recorded
])
def test_a_killed_run_ends_as_the_uninterrupted_one(uninterrupted, tmp_path, kill_at):
    run_dir, export_dir = tmp_path / "run", tmp_path / "export"
    killed = train_command(run_dir, export_dir, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # One rerun finishes the run: nothing was lost that needs another.
    assert run_until_done(run_dir, export_dir) == 1

    expected = json.loads((uninterrupted / "run" / "test_metrics.json").read_text())
    assert json.loads((run_dir / "test_metrics.json").read_text()) == expected
    for got, want in zip(weights(run_dir / "model.keras"),
                         weights(uninterrupted / "run" / "model.keras")):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    history = (run_dir / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == ["0", "1"]
    assert sorted(os.listdir(export_dir / "digits")) == ["1"]
    assert not [name for name in os.listdir(run_dir) if name.startswith(".tmp-")]
    assert not (run_dir / "backup").exists()


def test_sigint_and_sigterm_end_the_run_with_one_line_and_it_resumes(uninterrupted, tmp_path):
    run_dir, export_dir = tmp_path / "run", tmp_path / "export"
    for kill_at, status in (("batch:3:SIGINT", 130), ("export:1:SIGTERM", 143)):
        stopped = train_command(run_dir, export_dir, kill_at=kill_at)
        assert stopped.returncode == status, stopped.stderr[-3000:]
        name = kill_at.split(":")[-1]
        assert stopped.stderr.splitlines()[-1] == (
            f"Stopped by {name}: the run's files are kept; run the same command again to "
            "resume it.")
        assert "Traceback" not in stopped.stderr
    # Stopped in the export: the SavedModel was written, not yet renamed.
    assert [n for n in os.listdir(export_dir / "digits") if not n.startswith(".tmp-")] == []
    assert run_until_done(run_dir, export_dir) == 1
    expected = json.loads((uninterrupted / "run" / "test_metrics.json").read_text())
    assert json.loads((run_dir / "test_metrics.json").read_text()) == expected
    assert sorted(os.listdir(export_dir / "digits")) == ["1"]


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    run_dir = tmp_path / "run"
    os.makedirs(run_dir)
    with run_files.RunLock(str(run_dir)):
        result = train_command(run_dir, tmp_path / "export")
    assert result.returncode == 1
    assert f"is in use by process {os.getpid()}" in result.stderr
    assert sorted(os.listdir(run_dir)) == [".lock"]


def test_changed_flags_are_refused_and_flags_cfg_is_kept(tmp_path):
    run_dir = tmp_path / "run"
    killed = train_command(run_dir, tmp_path / "export", kill_at="batch:1")
    assert killed.returncode == -signal.SIGKILL
    original = (run_dir / "flags.cfg").read_text()
    result = train_command(run_dir, tmp_path / "export", "--backbone=resnet32",
                           "--momentum=0.8")
    assert result.returncode == 1
    assert "--backbone: 'resnet8' in the run, 'resnet32' now" in result.stderr
    assert "--momentum: 0.9 in the run, 0.8 now" in result.stderr
    assert "--allow_changed_flags" in result.stderr
    assert (run_dir / "flags.cfg").read_text() == original


def test_bad_values_are_refused_before_any_file(tmp_path):
    result = train_command(tmp_path / "run", tmp_path / "export", "--momentum=nan",
                           "--weight_decay=nan", "--learning_rate=inf", "--model_name=../x")
    assert result.returncode == 1
    # One message names every bad value.
    for message in ("--momentum=nan is not a finite number",
                    "--weight_decay=nan is not a finite number",
                    "--learning_rate=inf is not a finite number",
                    "--model_name='../x' is not usable as a directory name"):
        assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.listdir(tmp_path)


@contextlib.contextmanager
def tmpfs(path, options):
    os.makedirs(path)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("which", ["run_dir", "export_dir"])
def test_a_read_only_directory_is_named_before_any_work(tmp_path, which):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as read_only:
        dirs = {"run_dir": tmp_path / "run", "export_dir": tmp_path / "export"}
        dirs[which] = read_only / "x"
        result = train_command(dirs["run_dir"], dirs["export_dir"])
    assert result.returncode == 1
    assert f"--{which}={read_only}/x: {read_only} is not writable" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_full_disk_keeps_the_last_backup_and_the_run_resumes(uninterrupted, tmp_path):
    # Room for the first epoch's files (two 0.75 MB .keras files) but not for
    # every later one.
    with tmpfs(tmp_path / "disk", "size=2m") as disk:
        result = train_command(disk / "run", tmp_path / "export")
        assert result.returncode == 1, result.stderr[-3000:]
        assert "No space left on device" in result.stderr
        assert "Traceback" not in result.stderr
        state = files.read_json(disk / "run" / "backup" / "state.json")
        if state is not None:  # The kept backup is complete and loads.
            weights(disk / "run" / "backup" / state["checkpoint"])
        subprocess.run(["mount", "-o", "remount,size=200m", str(disk)], check=True)
        run_until_done(disk / "run", tmp_path / "export")
        expected = json.loads((uninterrupted / "run" / "test_metrics.json").read_text())
        assert json.loads((disk / "run" / "test_metrics.json").read_text()) == expected
