"""RIDE, the authors' multi-expert ResNet-50: the network, its NBN selection and its losses."""

from nbn_keras.models.ride.loss import RIDEBalancedSoftmaxLoss
from nbn_keras.models.ride.loss import RIDEEpochHook
from nbn_keras.models.ride.loss import RIDELoss
from nbn_keras.models.ride.loss import ride_balanced_softmax_loss
from nbn_keras.models.ride.network import ARCHITECTURES
from nbn_keras.models.ride.network import ExpertAverage
from nbn_keras.models.ride.network import build_ride_classifier
from nbn_keras.models.ride.selection import SELECTION
from nbn_keras.models.ride.trainer import ExpertLogitsTrainer
