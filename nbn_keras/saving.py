"""Loading `.keras` files, with errors that name the file and what is wrong.

`keras.models.load_model` restores every `.keras` file nbn_keras writes once
`nbn_keras` is imported: importing the package registers its layers,
optimizer, schedules, losses and metrics with
`keras.saving.register_keras_serializable(package="nbn_keras")`.
`load_model` here does the same load after checking the file, and turns the
errors Keras gives for damaged files (a truncated archive, a member missing,
a class no imported package provides) into one message that names the file.

Keras itself cannot be taught to import nbn_keras: when deserializing, it
imports the module named in the file only for the packages `keras`,
`keras_hub`, `keras_cv` and `keras_nlp` (see `_retrieve_class_or_fn` in
`keras/src/saving/serialization_lib.py`). For any other package it raises
`TypeError: Could not locate class ...`, whose text we cannot change; the
package shows up there only as `'module': 'nbn_keras.layers'` and
`'registered_name': 'nbn_keras>...'` inside the quoted configuration.
"""

import json
import os
import re
import zipfile

import keras

# The members `keras.saving.save_model` writes into a `.keras` archive.
KERAS_FILE_MEMBERS = ("metadata.json", "config.json", "model.weights.h5")
# Keras' deserialization error quotes the whole configuration of every
# enclosing object (kilobytes) and ends with the innermost cause.
_CAUSE_MARK = "Exception encountered: "
_UNKNOWN_KEYS = re.compile(r"Unrecognized keyword arguments passed to (\w+): \{(.*)\}",
                           re.DOTALL)
_MAX_CAUSE = 300


def check_keras_file(filepath):
    """Raises unless `filepath` is a complete, readable `.keras` archive.

    Checks, without building the model: the file exists and ends in
    `.keras`; it is not empty; it is a zip archive holding `metadata.json`,
    `config.json` and `model.weights.h5`; every member matches its stored
    CRC-32 (a truncated or overwritten file does not); `config.json` is JSON.

    Args:
        filepath: Path of the file.

    Raises:
        FileNotFoundError: No file at `filepath`.
        ValueError: Anything else, with the file named.
    """
    filepath = os.fspath(filepath)
    if not os.path.exists(filepath):
        raise FileNotFoundError(f"No model file at '{filepath}'.")
    if not filepath.endswith(".keras"):
        hint = ""
        if filepath.endswith(".weights.h5"):
            hint = (" A .weights.h5 file holds weights only: build the model "
                    "and call model.load_weights(path).")
        elif os.path.isdir(filepath):
            hint = (" A directory may be a TF Serving export: load it with "
                    "tf.saved_model.load(path).")
        raise ValueError(f"'{filepath}' is not a .keras model file.{hint}")
    if os.path.isdir(filepath):
        return  # An unzipped Keras directory: Keras checks it.
    if os.path.getsize(filepath) == 0:
        raise ValueError(f"'{filepath}' is empty (0 bytes): not a .keras file.")
    try:
        with zipfile.ZipFile(filepath) as archive:
            names = set(archive.namelist())
            missing = [m for m in KERAS_FILE_MEMBERS if m not in names]
            if missing:
                raise ValueError(
                    f"'{filepath}' is not a complete .keras file: it has no "
                    f"{', '.join(missing)}."
                )
            damaged = archive.testzip()
            if damaged is not None:
                raise ValueError(
                    f"'{filepath}' is damaged: its member '{damaged}' does "
                    "not match its checksum."
                )
            config = archive.read("config.json")
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as error:
        raise ValueError(
            f"'{filepath}' is not a complete .keras file (truncated, or not "
            f"a Keras zip archive): {error}."
        ) from None
    try:
        json.loads(config)
    except ValueError as error:
        raise ValueError(
            f"'{filepath}' is damaged: its config.json is not JSON ({error})."
        ) from None


def _classes_in_config(config):
    """Yields every `(module, class_name, registered_name)` in a config."""
    if isinstance(config, dict):
        if "class_name" in config and "module" in config:
            yield (config.get("module"), config["class_name"],
                   config.get("registered_name"))
        for value in config.values():
            yield from _classes_in_config(value)
    elif isinstance(config, list):
        for value in config:
            yield from _classes_in_config(value)


def missing_classes(filepath, custom_objects=None):
    """Classes a `.keras` file needs that no imported package registered.

    Args:
        filepath: A `.keras` file that passes `check_keras_file`.
        custom_objects: The mapping that would be passed to `load_model`.

    Returns:
        A sorted list of `(module, registered_name)` pairs for the classes
        of the file's `config.json` that come from outside Keras and are
        neither registered with `keras.saving.register_keras_serializable`
        nor in `custom_objects`.
    """
    with zipfile.ZipFile(filepath) as archive:
        config = json.loads(archive.read("config.json"))
    custom_objects = custom_objects or {}
    registered = keras.saving.get_custom_objects()
    missing = set()
    for module, class_name, registered_name in _classes_in_config(config):
        if not module or module == "keras" or module.startswith("keras."):
            continue
        name = registered_name or class_name
        if name in registered or name in custom_objects:
            continue
        if class_name in custom_objects:
            continue
        missing.add((module, name))
    return sorted(missing)


def _layers_in_config(config):
    """Yields every `{"class_name", "config": {...}}` dict, in file order."""
    if isinstance(config, dict):
        if "class_name" in config and isinstance(config.get("config"), dict):
            yield config
        for value in config.values():
            yield from _layers_in_config(value)
    elif isinstance(config, list):
        for value in config:
            yield from _layers_in_config(value)


def deserialization_cause(filepath, error):
    """A short account of Keras' `TypeError` when rebuilding a model.

    Args:
        filepath: The `.keras` file that failed to load.
        error: The `TypeError` of `keras.saving.load_model`.

    Returns:
        One sentence naming the unknown config keys and their layer when
        that is the cause, otherwise the innermost cause Keras gives
        (its enclosing quoted configurations left out).
    """
    cause = str(error).rsplit(_CAUSE_MARK, 1)[-1].strip()
    unknown = _UNKNOWN_KEYS.search(cause)
    if unknown is None:
        if len(cause) > _MAX_CAUSE:
            cause = cause[:_MAX_CAUSE] + " ..."
        return cause
    class_name, keys = unknown[1], re.findall(r"'([^']*)':", unknown[2])
    with zipfile.ZipFile(filepath) as archive:
        config = json.loads(archive.read("config.json"))
    names = [layer["config"].get("name") for layer in _layers_in_config(config)
             if layer["class_name"] == class_name
             and all(key in layer["config"] for key in keys)]
    where = f"layer '{names[0]}' ({class_name})" if names else f"a {class_name} layer"
    if len(names) > 1:
        where += f" and {len(names) - 1} other layer(s)"
    listed = ", ".join(f"'{key}'" for key in keys)
    return (f"unknown config key(s) {listed} in {where}: this version of "
            f"{class_name} does not take them (a file from another version, or "
            "edited).")


def load_model(filepath, custom_objects=None, compile=True, safe_mode=True):
    """`keras.saving.load_model` with the file checked first.

    Loads any `.keras` file (the trainer's `best.keras` and `model.keras`
    included) with its optimizer, learning-rate schedule, loss and metrics.
    Equivalent to `keras.models.load_model(filepath, ...)` after
    `import nbn_keras`, but a damaged file or a class that no imported
    package provides raises one error naming the file and the cause.

    Args:
        filepath: Path of a `.keras` file.
        custom_objects: Extra `{name: class}` entries, as for Keras.
        compile: Whether to restore the training configuration.
        safe_mode: Refuse to deserialize Python lambdas (Keras' default).

    Returns:
        The Keras model.

    Raises:
        FileNotFoundError: No file at `filepath`.
        ValueError: The file is not a complete `.keras` archive, or Keras
            cannot rebuild the model from it (the message says why).
        TypeError: The file needs classes that are not registered; the
            message lists them with their Python modules.

    Example:

    >>> model = nbn_keras.load_model("runs/digits_lt_nbn/best.keras")
    """
    filepath = os.fspath(filepath)
    check_keras_file(filepath)
    try:
        return keras.saving.load_model(
            filepath, custom_objects=custom_objects, compile=compile,
            safe_mode=safe_mode,
        )
    except TypeError as error:
        missing = missing_classes(filepath, custom_objects)
        if not missing:
            raise TypeError(
                f"Could not load '{filepath}': {deserialization_cause(filepath, error)}"
            ) from None
        listed = ", ".join(f"{name} (module {module})" for module, name in missing)
        packages = sorted({module.split(".")[0] for module, _ in missing})
        raise TypeError(
            f"Could not load '{filepath}': it needs {listed}, which no "
            "imported package has registered. Import "
            f"{' and '.join(packages)} (a version that defines them) before "
            "loading, or pass custom_objects."
        ) from None
    except (ValueError, OSError, KeyError) as error:
        raise ValueError(f"Could not load '{filepath}': {error}") from error
