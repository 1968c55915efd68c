import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINED_MODEL_NAME = "digits_lt_nbn"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """The files one short run of the training command writes.

    `python -m nbn_keras.train --flagfile=configs/digits_lt_nbn.cfg` for 2
    steps, once per test session: pytest-xdist workers share it through a
    lock. Returns `{"run_dir", "export_dir", "model_name", "version_dir"}`.
    Tests must not modify these files (copy them first).
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # The directory all workers of this session share.
    root = root / "trained_run"
    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / "done.json"
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            result = subprocess.run(
                [sys.executable, "-m", "nbn_keras.train",
                 "--flagfile=configs/digits_lt_nbn.cfg", "--epochs=1",
                 "--steps_per_epoch=2", "--verbose=0", "--nopictures",
                 f"--run_dir={root / 'run'}", f"--export_dir={root / 'exports'}",
                 f"--model_name={TRAINED_MODEL_NAME}"],
                cwd=REPO, capture_output=True, text=True, timeout=900,
            )
            assert result.returncode == 0, result.stderr[-4000:]
            done.write_text(json.dumps({"returncode": result.returncode}))
    return {
        "run_dir": root / "run",
        "export_dir": root / "exports",
        "model_name": TRAINED_MODEL_NAME,
        "version_dir": root / "exports" / TRAINED_MODEL_NAME / "1",
    }
