import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# oneDNN's kernels (TensorFlow's default on Intel CPUs, not on every AMD
# one) change results: the suite forces them on, and the README's test
# command runs the tests marked `onednn` again with them off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from tests import helpers  # noqa: E402 (imports TensorFlow: after the settings above)

# Tests whose outcome has been seen to depend on oneDNN: the layer's
# numerics and the serving signatures (an empty batch through a
# convolution).
ONEDNN_DEPENDENT = (
    "tests/test_layers.py::",
    "tests/test_serving_inputs.py::test_bad_serving_input[",
    "tests/test_export.py::test_fresh_process_without_nbn_keras_gives_same_predictions",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(ONEDNN_DEPENDENT):
            item.add_marker(pytest.mark.onednn)

TRAINED_MODEL_NAME = "digits_lt_nbn"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """The files one short run of the training command writes.

    `python -m nbn_keras.train --flagfile=configs/digits_lt_nbn.cfg` with
    ResNet-8 for 2 steps, once per test session. Returns `{"run_dir", "export_dir",
    "model_name", "version_dir"}`.
    """
    root = helpers.shared_training_run(
        tmp_path_factory, "trained_run", "--flagfile=configs/digits_lt_nbn.cfg",
        "--backbone=resnet8", "--epochs=1", "--steps_per_epoch=2",
        "--verbose=0", "--nopictures",
        f"--model_name={TRAINED_MODEL_NAME}")
    return {
        "run_dir": root / "run",
        "export_dir": root / "exports",
        "model_name": TRAINED_MODEL_NAME,
        "version_dir": root / "exports" / TRAINED_MODEL_NAME / "1",
    }


@pytest.fixture(scope="session")
def user(tmp_path_factory):
    """A user's files: a checkpoint, a backup and export version 1 of `m`.

    `run/best.keras`, `run/backup/latest.weights.h5` and
    `saved_models/m/1/` of `helpers.users_classifier()`. Bad-input cases run
    next to them and check (`user_files`) that they stay as they are.
    """
    import nbn_keras
    from nbn_keras.serving import export

    root = tmp_path_factory.mktemp("user")
    model = helpers.users_classifier()
    model.compile(optimizer=nbn_keras.training.optimizers.CoupledSGD(0.1, momentum=0.9),
                  loss=nbn_keras.training.losses.cross_entropy())
    (root / "run" / "backup").mkdir(parents=True)
    model.save(root / "run" / "best.keras")
    model.save_weights(root / "run" / "backup" / "latest.weights.h5")
    export.export_for_serving(model, str(root / "saved_models"), "m")
    return root


@pytest.fixture
def user_files(request, tmp_path, user):
    """The user's files and the test's directory, to check nothing changed.

    Returns a `helpers.UserFiles`; `helpers.check_bad_input` runs a case and
    asserts that nothing under `user` or `tmp_path` was changed.
    """
    return helpers.UserFiles(request, tmp_path, user)
