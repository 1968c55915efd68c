r"""Trains, selects, evaluates and exports a run: `python -m nbn_keras.train`.

Usage:

    python -m nbn_keras.train --flagfile=configs/digits_lt_nbn.cfg \
        [--flag=value ...]

Every flag is a field of `nbn_keras.training.config.TrainConfig` (the
hyperparameters) or `RunOptions` (the run's place and how it runs);
`--helpfull` lists them. The run itself is
`nbn_keras.training.driver.train_and_evaluate`: killed at any instant, it is
completed by running the same command again, and a resumed run must have
the hyperparameters in its `flags.cfg` (`--allow_changed_flags` overrides).
Bad options or data end the command with one line on stderr (status 1; the
traceback with `--verbosity=1`), SIGINT or SIGTERM with one line (status
130 or 143).
"""

import sys

import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

from nbn_keras import interrupts
from nbn_keras.data import transforms
from nbn_keras.training import config as config_lib
from nbn_keras.training import driver
from nbn_keras.training import run_files

config_lib.define_flags(flags.FLAGS)
FLAGS = flags.FLAGS

# What refuses a run: bad options or data found once loading starts.
REFUSALS = (ValueError, FileNotFoundError, driver.RunError, run_files.RunDirectoryLocked)


def main(argv):
    interrupts.start_command(argv, "the run's files are kept; run the same command again "
                                   "to resume it.")
    try:
        run(config_lib.from_flags(FLAGS), config_lib.options_from_flags(FLAGS))
    except REFUSALS as error:
        logging.debug("Traceback:", exc_info=True)
        print(f"Error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # Read-only or full disk: name the path.
        logging.debug("Traceback:", exc_info=True)
        where = f": {error.filename}" if error.filename else ""
        print(f"Error: {error.strerror or error}{where}. The last complete checkpoint "
              "is kept; run the same command again once this is fixed.", file=sys.stderr)
        return 1
    return 0


def run(config, options):
    """`driver.train_and_evaluate`, an image that fails to decode as `UnreadableImageError`.

    Args:
        config: The run's `TrainConfig`.
        options: The run's `RunOptions`.

    Returns:
        The test figures, or `None` on a non-chief worker.

    Raises:
        transforms.UnreadableImageError: A data set's image could not be read
            or decoded during the run (TensorFlow's wrapping removed).
    """
    try:
        return driver.train_and_evaluate(config, options)
    except tf.errors.InvalidArgumentError as error:
        unreadable = transforms.unreadable_image_error(error)
        if unreadable is None:
            raise
        raise unreadable from None


if __name__ == "__main__":
    app.run(main)
