"""Trains, selects, evaluates and exports a run: `python -m nbn_keras.train`.

    python -m nbn_keras.train --flagfile=configs/cifar100_lt_if100_nbn.cfg

The phases are `nbn_keras.training.driver`; every flag is a field of
`nbn_keras.training.config.TrainConfig` (`--helpfull` lists them).
"""

from absl import app

from nbn_keras.training import driver

if __name__ == "__main__":
    app.run(driver.main)
