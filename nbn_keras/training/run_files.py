"""The files of a training run: its flags and state files, its lock, foreign entries.

Every file a run writes goes through `nbn_keras.files.atomic_write` (or a
helper built on it), so a reader or a rerun after `kill -9` sees either the
previous complete file or the new complete one.
"""

import errno
import fcntl
import os

from nbn_keras import files


FLAGS_FILENAME = "flags.cfg"
STATE_FILENAME = "run_state.json"
# What a run directory holds before its flags.cfg: the lock, temporary files
# of an interrupted write, the directories of a cluster's other workers.
_RUN_SCAFFOLDING = (".lock", "workers")


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
                  if name not in _RUN_SCAFFOLDING and not files.is_temporary(name))


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
