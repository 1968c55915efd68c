"""The version directories of a served model: `<base_dir>/<model_name>/<version>/`.

TF Serving polls a model's directory and loads its integer-named entries.
A version is written to a temporary directory beside them (a name TF
Serving ignores), made world-readable (directories 0755, files 0644), synced
to disk and renamed to its number, so a version never appears half-written
(`write_version`). Concurrent exports to one model name each get their own
version: a rename onto a version another exporter took fails and the next
number is tried (`claim_version`). Temporary directories left by exporters
that died are removed by the next export.
"""

import errno
import json
import os

from nbn_keras import files

# Written into each version's `assets.extra/`, which TF Serving ignores.
RUN_ID_FILENAME = "nbn_keras_run.json"
# Temporary export directories: `.tmp-export-<pid>-<token>-<host>`.
TEMP_KIND = "export"
DIR_MODE = 0o755
FILE_MODE = 0o644


def next_version(model_dir):
    """Returns 1 + the largest integer-named entry of `model_dir` (or 1).

    Entries whose names are not plain integers (temporary directories, a
    README, ...) are ignored, as TF Serving ignores them.
    """
    if not os.path.isdir(model_dir):
        return 1
    versions = [int(n) for n in os.listdir(model_dir) if n.isdigit()]
    return max(versions, default=0) + 1


def foreign_entries(model_dir):
    """Entries of a model directory that are not model versions.

    A model directory (`<base_dir>/<model_name>`) of this project holds
    integer-named version directories and temporary export directories
    (`.tmp-*`) only; anything else is someone else's, and TF Serving would
    serve our versions next to it.

    Args:
        model_dir: The directory, which may not exist.

    Returns:
        The sorted names of the other entries (`[]` when there are none).
    """
    if not os.path.isdir(model_dir):
        return []
    return sorted(
        name for name in os.listdir(model_dir)
        if not ((name.isdigit() or files.is_temporary(name))
                and os.path.isdir(os.path.join(model_dir, name))))


def foreign_model_dir_error(model_dir, flag_name):
    """The message refusing `model_dir`, or `None` when it holds only versions.

    Args:
        model_dir: `<base_dir>/<model_name>`.
        flag_name: How the caller lifts the refusal (a flag or an argument).
    """
    foreign = foreign_entries(model_dir)
    if not foreign:
        return None
    listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
    entries = "1 entry that is not a model version" if len(foreign) == 1 else (
        f"{len(foreign)} entries that are not model versions")
    return (f"{model_dir} holds {entries} "
            f"({listed}); an export would put a version next to them. Choose "
            f"another model name or directory, or pass {flag_name} to export there anyway.")


def find_run_version(model_dir, run_id):
    """The version directory of `model_dir` exported by run `run_id`, or `None`."""
    if not os.path.isdir(model_dir):
        return None
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name, "assets.extra", RUN_ID_FILENAME)
        if name.isdigit() and files.read_json(path, {}).get("run_id") == run_id:
            return os.path.join(model_dir, name)
    return None


def check_model_name(model_name):
    """Raises `ValueError` unless `model_name` can name a model directory."""
    if (not model_name or os.sep in model_name or model_name in (".", "..")
            or files.is_temporary(model_name)):
        raise ValueError(f"Invalid model_name {model_name!r}.")


def check_version(version):
    """Raises `ValueError` unless `version` is `None` or a non-negative int."""
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 0
    ):
        raise ValueError(f"version must be a non-negative int, got {version!r}.")


def choose_version(model_dir, model_name, version):
    """The version to write and whether it was asked for.

    Args:
        model_dir: `<base_dir>/<model_name>`.
        model_name: The model's name, for the error.
        version: The version asked for, or `None` for the next free one.

    Returns:
        `(version, fixed)`: `fixed` is whether `version` was given (then
        `claim_version` does not take another).

    Raises:
        FileExistsError: The version asked for exists.
    """
    if version is None:
        return next_version(model_dir), False
    target = os.path.join(model_dir, str(version))
    if os.path.lexists(target):
        raise _exists_error(model_name, version, target)
    return version, True


def _makedirs(path):
    """`os.makedirs` whose new directories get mode 0755 whatever the umask."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            continue
        os.chmod(directory, DIR_MODE)


def _exists_error(model_name, version, target):
    return FileExistsError(
        f"Version {version} of '{model_name}' already exists at {target}; "
        "pick another version or leave version=None for the next one."
    )


def claim_version(tmp_dir, model_dir, model_name, version, fixed):
    """Renames `tmp_dir` to a free version of `model_dir`; returns the path.

    A rename onto a version that another exporter took meanwhile fails
    (EEXIST/ENOTEMPTY); with `fixed=False` the next number is tried.
    """
    while True:
        target = os.path.join(model_dir, str(version))
        if fixed and os.path.lexists(target):
            raise _exists_error(model_name, version, target)
        try:
            os.rename(tmp_dir, target)
            return target
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise
            if fixed:
                raise _exists_error(model_name, version, target) from None
            version = max(version + 1, next_version(model_dir))


def write_version(write_out, model_dir, model_name, version, fixed, run_id=None):
    """Writes a new version of `model_dir` whole or not at all; returns its path.

    Args:
        write_out: `fn(path)` writing the SavedModel into the existing
            directory `path`.
        model_dir: `<base_dir>/<model_name>`, created (0755) if needed.
        model_name: The model's name, for errors.
        version: The version to take (see `choose_version`).
        fixed: Refuse another version when `version` is taken.
        run_id: Recorded in the version's `assets.extra/` when not `None`
            (see `find_run_version`).

    Returns:
        The path of the version directory.
    """
    _makedirs(model_dir)
    files.remove_stale_temporaries(model_dir, directories=True,
                                   is_stale=files.is_stale_temporary)
    with files.staged_directory(model_dir, TEMP_KIND) as staged:
        write_out(staged)
        if run_id is not None:
            _record_run_id(staged, run_id)
        files.sync_tree(staged, DIR_MODE, FILE_MODE)
        files.kill_point("export")
        return claim_version(staged, model_dir, model_name, version, fixed)


def _record_run_id(version_dir, run_id):
    extra = os.path.join(version_dir, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    with open(os.path.join(extra, RUN_ID_FILENAME), "w") as f:
        json.dump({"run_id": run_id}, f)
