"""Imports an authors' PyTorch checkpoint: `python -m nbn_keras.import_torch`.

    python -m nbn_keras.import_torch --checkpoint=FILE --arch=ARCH \
        --num_classes=N --output=model.keras

See `nbn_keras.interop.torch_checkpoint`.
"""

from absl import app

from nbn_keras.interop import torch_checkpoint

if __name__ == "__main__":
    torch_checkpoint.define_flags()
    app.run(torch_checkpoint.main)
