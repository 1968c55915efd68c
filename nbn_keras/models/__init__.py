"""The networks, one module per family, and the registry that names them.

`build_backbone` and `build_classifier` build any of them by name
(`BACKBONES`); `nbn_keras.models.registry.FAMILIES` lists the families
(`resnet`, `keras_cv`, `cifar_resnet`, `ride`), each declared by a
`nbn_keras.models.family.Family` in its own module.
"""

from nbn_keras.models.registry import BACKBONES
from nbn_keras.models.registry import build_backbone
from nbn_keras.models.registry import build_classifier
from nbn_keras.models.registry import min_image_size
