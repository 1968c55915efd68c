"""The networks: the authors' ResNets and RIDE, CIFAR ResNets, KerasCV's, and their heads.

`build_backbone` and `build_classifier` build any of them by name
(`BACKBONES`).
"""

from nbn_keras.models.registry import BACKBONES
from nbn_keras.models.registry import build_backbone
from nbn_keras.models.registry import build_classifier
from nbn_keras.models.registry import min_image_size
