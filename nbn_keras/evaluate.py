r"""Evaluates a `.keras` classifier on a data set's test (or validation) split.

Usage:

    python -m nbn_keras.evaluate --model=runs/x/model.keras \
        --flagfile=configs/imagenet_lt_resnet50_nbn.cfg [--split=test] \
        [--output=metrics.json] [--flag=value ...]

The data set is described by the training command's flags (a config, or a
run's `flags.cfg`, which rebuilds its long-tailed subset exactly), loaded and
fed through the same evaluation pipeline, and scored by the same report code
(`nbn_keras.analysis.report.evaluate`): top-1, many / medium / few and balanced
accuracy, and per-class accuracy. The table is printed and written as JSON
(`--output`, default `<model>.<split>_metrics.json` next to the model; an
existing file is kept unless `--overwrite`). The model may be any `.keras`
file nbn_keras loads: a training run's, or `python -m nbn_keras.import_torch`
output.
"""

import os
import sys

from absl import app
from absl import flags

from nbn_keras import files
from nbn_keras import interrupts
from nbn_keras import saving
from nbn_keras.analysis import report
from nbn_keras.training import config as config_lib
from nbn_keras.training import driver as train

# The training command's flags describe the data set (a config or a run's
# flags.cfg, which sets every one of them).
config_lib.define_flags(flags.FLAGS)
flags.DEFINE_string("model", None, "The .keras file to evaluate.")
flags.DEFINE_enum("split", "test", ["test", "val"], "The split to evaluate.")
flags.DEFINE_string("output", None, "The JSON file to write (default: "
                    "<model>.<split>_metrics.json next to the model).")
flags.DEFINE_boolean("overwrite", False, "Replace an existing --output.")
flags.mark_flag_as_required("model")
FLAGS = flags.FLAGS


def default_output(model_path, split):
    return f"{os.path.splitext(model_path)[0]}.{split}_metrics.json"


def _check_fits(model, data, model_path):
    """Raises `ValueError` when `model` cannot score `data`'s images."""
    shape = tuple(model.inputs[0].shape[1:])
    if shape != tuple(data.image_shape):
        raise ValueError(
            f"--model={model_path} takes images of shape {shape}, but {data.name} "
            f"gives {tuple(data.image_shape)} (set --image_size for list files).")
    classes = model.outputs[0].shape[-1]
    if classes != data.num_classes:
        raise ValueError(f"--model={model_path} has {classes} classes, but {data.name} "
                         f"has {data.num_classes} (--num_classes).")


def evaluate_file(model_path, config, split="test", output=None, overwrite=False):
    """Scores the `.keras` file `model_path` on a split; writes the JSON.

    Args:
        model_path: Path of a `.keras` classifier.
        config: A `nbn_keras.training.config.TrainConfig` describing the data set
            (data flags, `many_threshold`, `few_threshold`).
        split: `"test"` or `"val"`.
        output: The JSON file to write; `None` for `default_output`.
        overwrite: Replace an existing `output`.

    Returns:
        `(figures, output)`: the figures of `nbn_keras.analysis.report.evaluate`
        plus `model`, and the path written.

    Example:

    >>> figures, path = evaluate_file(
    ...     "runs/digits_lt_nbn/model.keras",
    ...     config_lib.from_flagfile("runs/digits_lt_nbn/flags.cfg"))
    """
    output = output or default_output(model_path, split)
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"--output={output} exists; pass --overwrite to replace it.")
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"--model={model_path}: no such file.")
    model = saving.load_model(model_path, compile=False)
    data = train.load_data(config)
    _check_fits(model, data, model_path)
    figures = report.evaluate(model, data, config.many_threshold, config.few_threshold,
                              split=split)
    figures["model"] = os.path.abspath(model_path)
    files.write_json(output, figures)
    return figures, output


def main(argv):
    interrupts.start_command(argv, "the figures file is written whole or not at all; run "
                                   "the same command again.")
    try:
        figures, output = evaluate_file(
            FLAGS.model, config_lib.from_flags(FLAGS), FLAGS.split, FLAGS.output,
            FLAGS.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as error:
        print(f"nbn_keras.evaluate: error: {error}", file=sys.stderr)
        return 1
    print(report.table(figures))
    print(f"Wrote {output}")
    return 0


if __name__ == "__main__":
    app.run(main)
