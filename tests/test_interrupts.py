"""SIGINT and SIGTERM while a command starts (TensorFlow loading) end it with one line."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from nbn_keras import interrupts
from tests.helpers import REPO



@pytest.mark.parametrize("argv, expected", [
    (["python", "-m", "nbn_keras.train", "--flagfile=x.cfg"], True),
    (["python", "-X", "utf8", "-m", "nbn_keras.export", "--model=m.keras"], True),
    (["python", "-mnbn_keras.import_torch"], True),
    (["python", "-m", "nbn_keras.evaluate"], True),
    (["python", "-m", "pytest", "nbn_keras.train"], False),
    (["python", "-m", "nbn_keras"], False),
    (["python", "script.py", "-m", "nbn_keras.train"], False),
    (["python", "-c", "import nbn_keras"], False),
    (["python"], False),
])
def test_started_as_command_reads_the_interpreters_command_line(argv, expected):
    assert interrupts.started_as_command(argv) is expected


def catches(pid, signum):
    """Whether process `pid` has a handler for `signum` (its /proc SigCgt mask)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(mask >> (signum - 1) & 1)


def wait_until_it_catches_sigterm(process):
    """Waits, at most 30 s, until `process` has a SIGTERM handler."""
    deadline = time.monotonic() + 30
    while not catches(process.pid, signal.SIGTERM):
        assert process.poll() is None and time.monotonic() < deadline, "no handler installed"
        time.sleep(0.002)


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_tensorflow_loads_ends_the_command_with_one_line(signum, status):
    process = subprocess.Popen(
        [sys.executable, "-m", "nbn_keras.train", "--helpfull"], cwd=REPO,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    # The handler is in place as soon as the package starts to import, long
    # before TensorFlow has loaded and the flags could be listed. (Python
    # catches SIGINT from the start; SIGTERM shows the handler.)
    wait_until_it_catches_sigterm(process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr[-2000:]
    assert stderr.splitlines()[-1] == (
        f"Stopped by {signal.Signals(signum).name}: stopped while starting, before writing "
        "anything.")
    assert "Traceback" not in stderr


def test_a_signal_between_the_fork_and_the_childs_handler_waits_for_it():
    # The supervisor catches signals before the child does: a child slow to
    # take them must still end with its line, not by SIGTERM's default action.
    script = ("import time; from nbn_keras import interrupts; interrupts.supervise(); "
              "time.sleep(0.5); interrupts.exit_on_signals('the child was slow.'); "
              "time.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_until_it_catches_sigterm(process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr[-2000:]
    assert stderr.splitlines()[-1] == "Stopped by SIGTERM: the child was slow."


@pytest.fixture
def silent_peer():
    """A listening socket that accepts connections and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        connections = []

        def accept_forever():
            try:
                while True:
                    connections.append(server.accept()[0])
            except OSError:  # The server socket was closed.
                pass

        threading.Thread(target=accept_forever, daemon=True).start()
        yield f"127.0.0.1:{server.getsockname()[1]}"
        for connection in connections:
            connection.close()


@pytest.mark.slow
def test_sigterm_ends_a_worker_stuck_connecting_to_a_silent_peer(tmp_path, silent_peer):
    # The peer accepts TCP, so the wait for peers passes, and TensorFlow's
    # strategy then blocks in C++ (its own SIGTERM handler only logs).
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        me = f"127.0.0.1:{unused.getsockname()[1]}"
    env = dict(os.environ, TF_CONFIG=json.dumps(
        {"cluster": {"worker": [me, silent_peer]}, "task": {"type": "worker", "index": 0}}))
    process = subprocess.Popen(
        [sys.executable, "-m", "nbn_keras.train", f"--run_dir={tmp_path}/run", "--noexport",
         "--cluster_timeout=600"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == (
            f"Waiting up to 600 s for worker 1 at {silent_peer}.\n")
        time.sleep(5)  # Into the strategy's connection attempts.
        assert process.poll() is None
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()  # Its child dies with it.
    assert process.returncode == 143, stderr[-2000:]
    assert time.monotonic() - start < 10
    assert stderr.splitlines()[-1] == ("Stopped by SIGTERM: the run's files are kept; run "
                                       "the same command again to resume it.")
    assert "Traceback" not in stderr
    assert not (tmp_path / "run").exists()
