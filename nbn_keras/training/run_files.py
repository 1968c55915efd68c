"""Crash-safe files of a training run: atomic writes and the run-directory lock.

Every file a run writes goes through `atomic_write` (or a helper built on
it): the content is written to a temporary file in the same directory,
flushed and fsynced, then renamed over the target, and the directory is
fsynced. A reader (or a rerun after `kill -9`) sees either the previous
complete file or the new complete file, never a partial one.

Fault injection for tests: when the environment variable
`NBN_KERAS_KILL_AT` names a point (`"batch"`, `"best"`, `"backup"`,
`"evaluate"`, `"export"`, `"exported"`), optionally with a count (`"batch:5"` = the fifth time)
and a signal (`"export:1:SIGTERM"`; default SIGKILL), the process sends
itself that signal when it reaches that point, so a test can interrupt a run
exactly there. Unset, `kill_point` does nothing.
"""

import contextlib
import errno
import fcntl
import json
import os
import signal
import tempfile
import time

KILL_AT_VARIABLE = "NBN_KERAS_KILL_AT"
FLAGS_FILENAME = "flags.cfg"
STATE_FILENAME = "run_state.json"
# What a run directory holds before its flags.cfg: the lock, temporary files
# of an interrupted write, the directories of a cluster's other workers.
_RUN_SCAFFOLDING = (".lock", "workers")
_kill_point_counts = {}


def kill_point(name):
    """Signals this process if `NBN_KERAS_KILL_AT` names `name` (tests only)."""
    spec = os.environ.get(KILL_AT_VARIABLE)
    if not spec:
        return
    point, count, signal_name = (spec.split(":") + ["", ""])[:3]
    if point != name:
        return
    _kill_point_counts[name] = _kill_point_counts.get(name, 0) + 1
    if _kill_point_counts[name] >= int(count or 1):
        os.kill(os.getpid(), getattr(signal, signal_name or "SIGKILL"))
        # A catchable signal ends the process from another thread
        # (`nbn_keras.interrupts`): stay at this point until it does.
        time.sleep(30)


def fsync_directory(path):
    """Makes a rename or creation inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, kill_point_name=None):
    """Yields a temporary path to write; renames it to `path` when complete.

    The temporary file sits next to `path` (same file system, so the rename is
    atomic) and is removed if the block raises. The previous `path`, if any,
    stays intact until the new one is complete.

    Args:
        path: The destination file.
        kill_point_name: A `kill_point` reached after the temporary file is
            written and before the rename (tests only).

    Example:

    >>> with atomic_write("run/best.keras") as tmp:
    ...     model.save(tmp)
    """
    directory = os.path.dirname(os.path.abspath(path))
    base, extension = _split_extension(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{base}-", suffix=extension, dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if kill_point_name:
            kill_point(kill_point_name)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_directory(directory)


def _split_extension(name):
    # Keras checks the extension of the path it saves to (".keras",
    # ".weights.h5"), so the temporary file keeps it.
    for extension in (".weights.h5", ".keras", ".json", ".csv", ".cfg"):
        if name.endswith(extension):
            return name[: -len(extension)], extension
    return name, ""


def write_text(path, text):
    """Writes `text` to `path` atomically."""
    with atomic_write(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def write_json(path, value, allow_nan=True):
    """Writes `value` as indented JSON to `path` atomically.

    `allow_nan=False` refuses NaN and infinities (strict JSON) with a
    `ValueError`, before anything is written.
    """
    write_text(path, json.dumps(value, indent=2, allow_nan=allow_nan) + "\n")


def read_json(path, default=None):
    """The JSON value in `path`, or `default` when the file does not exist."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def remove_stale_temporaries(directory):
    """Removes temporary files a killed process left in `directory`."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.startswith(".tmp-"):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                os.remove(path)


def foreign_entries(run_dir):
    """What a run would overwrite in `run_dir`: `[]` for a run or an empty directory.

    A directory holding `flags.cfg` or `run_state.json` is a run of this
    project (resumed, not overwritten). Otherwise every entry but the lock,
    temporary files (`.tmp-*`) and the `workers/` directory is the user's.

    Args:
        run_dir: A run directory, which may not exist.

    Returns:
        The sorted names of the entries that are not the project's.
    """
    if not os.path.isdir(run_dir):
        return []
    names = os.listdir(run_dir)
    if FLAGS_FILENAME in names or STATE_FILENAME in names:
        return []
    return sorted(name for name in names
                  if name not in _RUN_SCAFFOLDING and not name.startswith(".tmp-"))


class RunDirectoryLocked(RuntimeError):
    """Another process is using the run directory."""


class RunLock:
    """An exclusive lock on a run directory, held while the process lives.

    Uses `fcntl.flock` on `<run_dir>/.lock`, so the operating system releases
    it when the holder exits or is killed; a stale lock file is harmless. The
    file records the holder's process id for the error message.

    Args:
        run_dir: The run directory (created if needed).

    Example:

    >>> with RunLock("runs/x"):
    ...     train()
    """

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, ".lock")
        self._fd = None

    def __enter__(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirectoryLocked(
                f"{os.path.dirname(self.path)} is in use by process {holder}: "
                "one run per run directory. Wait for it, stop it, or choose "
                "another --run_dir.") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc_info):
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
