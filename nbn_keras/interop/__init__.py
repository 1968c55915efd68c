"""Interoperability with the authors' PyTorch code: their checkpoints as Keras models."""

from nbn_keras.interop.torch_checkpoint import import_checkpoint
