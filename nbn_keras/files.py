"""Crash-safe files: atomic writes, directories published by rename, fsync.

Run files, exports and imported checkpoints are all written here. A file
goes through `atomic_write`: the content is written to a temporary file in
the same directory, fsynced, then renamed over the target, and the directory
is fsynced. A directory tree (a SavedModel) goes through `staged_directory`
and `sync_tree`: written under a temporary name, synced, then renamed by the
caller. A reader (or a rerun after `kill -9`) sees either the previous
complete file or the new complete one, never a partial one; what a killed
writer left is a temporary (`.tmp-*`), removed by
`remove_stale_temporaries`.

This module uses the standard library only, so a process can load it
without TensorFlow.

Fault injection for tests: when the environment variable
`NBN_KERAS_KILL_AT` names a point (`"batch"`, `"best"`, `"backup"`,
`"evaluate"`, `"export"`, `"exported"`), optionally with a count (`"batch:5"` = the fifth time)
and a signal (`"export:1:SIGTERM"`; default SIGKILL), the process sends
itself that signal when it reaches that point, so a test can interrupt a run
exactly there. Unset, `kill_point` does nothing.
"""

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import time

KILL_AT_VARIABLE = "NBN_KERAS_KILL_AT"
# Every temporary starts so; TF Serving ignores it (it loads integer names).
TEMP_PREFIX = ".tmp-"
# A temporary directory of another host (or of an older naming) is taken
# for abandoned after this many seconds without change.
STALE_TEMP_SECONDS = 3600
# Temporary directories: `.tmp-<kind>-<pid>-<token>-<host>`.
_OWNED_TEMP_NAME = re.compile(r"\.tmp-[a-z]+-(\d+)-[0-9a-f]+-(.+)")
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


def fsync_file(path):
    """Flushes file `path`'s content to disk."""
    _fsync(path, os.O_RDONLY)


def fsync_directory(path):
    """Makes a rename or creation inside directory `path` durable.

    File systems that cannot sync a directory (`EINVAL`, `EBADF`,
    `ENOTSUP`) are left as they are.
    """
    _fsync(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path, open_flags):
    fd = os.open(path, open_flags)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def is_temporary(name):
    """Whether directory entry `name` is a temporary of this module's writers."""
    return name.startswith(TEMP_PREFIX)


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
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{base}-", suffix=extension,
                               dir=directory)
    os.close(fd)
    try:
        yield tmp
        fsync_file(tmp)
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


@contextlib.contextmanager
def staged_directory(parent, kind):
    """Yields a new temporary directory in `parent`, for a tree to publish.

    The block fills the directory and renames it into place (`os.rename`
    onto a name that does not exist is atomic). If the block raises, the
    directory is removed; when it ends, `parent` is fsynced so that the
    rename is durable. The name, `.tmp-<kind>-<pid>-<token>-<host>`, records
    its owner for `is_stale_temporary`.

    Args:
        parent: An existing directory.
        kind: Lower-case letters naming the writer (`"export"`).

    Example:

    >>> with staged_directory("saved_models/m", "export") as staged:
    ...     archive.write_out(staged)
    ...     sync_tree(staged)
    ...     os.rename(staged, "saved_models/m/1")
    """
    path = os.path.join(
        parent, f"{TEMP_PREFIX}{kind}-{os.getpid()}-{secrets.token_hex(4)}-"
                f"{socket.gethostname()}")
    os.mkdir(path)
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    fsync_directory(parent)


def sync_tree(root, dir_mode=0o755, file_mode=0o644):
    """Gives every entry under `root` its mode and syncs it to disk.

    Args:
        root: A directory.
        dir_mode: Mode of `root` and the directories below it, whatever the
            umask.
        file_mode: Mode of the files.
    """
    for directory, _, names in os.walk(root, topdown=False):
        for name in names:
            path = os.path.join(directory, name)
            os.chmod(path, file_mode)
            fsync_file(path)
        os.chmod(directory, dir_mode)
        fsync_directory(directory)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Another user's live process.
    return True


def is_stale_temporary(path, now=None):
    """Whether a temporary directory of `staged_directory` was abandoned.

    One of this host's is abandoned when the process named in it is gone;
    one of another host (a shared file system) or of an older naming when
    it has not changed for `STALE_TEMP_SECONDS`.

    Args:
        path: Path of a directory whose name starts with `.tmp-`.
        now: Current time (seconds since the epoch); defaults to now.

    Returns:
        A bool.
    """
    owner = _OWNED_TEMP_NAME.fullmatch(os.path.basename(path))
    if owner is not None and owner.group(2) == socket.gethostname():
        return not _pid_alive(int(owner.group(1)))
    now = time.time() if now is None else now
    try:
        return now - os.lstat(path).st_mtime > STALE_TEMP_SECONDS
    except FileNotFoundError:
        return False


def remove_stale_temporaries(directory, directories=False, is_stale=None):
    """Removes the temporaries that killed writers left in `directory`.

    Args:
        directory: A directory, which may not exist.
        directories: Remove temporary directories (of `staged_directory`)
            instead of temporary files (of `atomic_write`).
        is_stale: `fn(path) -> bool`, whether a temporary was abandoned
            (e.g. `is_stale_temporary`). Defaults to every one, for a
            directory that one process at a time writes (a locked run
            directory).

    Returns:
        The names removed, sorted.
    """
    removed = []
    if not os.path.isdir(directory):
        return removed
    is_kind = os.path.isdir if directories else os.path.isfile
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if is_temporary(name) and is_kind(path) and (is_stale is None or is_stale(path)):
            if directories:
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            removed.append(name)
    return removed
