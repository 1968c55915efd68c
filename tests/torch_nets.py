"""PyTorch pieces of the authors' networks, for the checkpoint import tests.

Written from the architecture of the authors' `models/ResNet_NBN.py`,
`models/ResNext_NBN.py`, `models/ensemble.py` and `models/ensemble_NBN.py`
(torchvision v1.5 bottlenecks) with their module names, so that state dicts
have the keys of the authors' checkpoints. NBN's normalised BN is
`alpha * w / (|w| + 1e-6)` for the weight and the same for the bias.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
SIZE = 64
NUM_CLASSES = 5


class ScalableBN(nn.BatchNorm2d):
    """BN2d that, when given an alpha, uses alpha * w / (|w| + 1e-6) (and b)."""

    def __init__(self, channels):
        super().__init__(channels)
        self.alpha_source = None  # a callable returning alpha

    def forward(self, x):
        weight, bias = self.weight, self.bias
        if self.alpha_source is not None:
            alpha = self.alpha_source()
            weight = alpha * weight / (weight.norm() + 1e-6)
            bias = alpha * bias / (bias.norm() + 1e-6)
        return F.batch_norm(x, self.running_mean, self.running_var, weight, bias,
                            self.training, self.momentum, self.eps)


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck (stride on the 3x3 conv).

    `ScalableBN` for bn3 and the shortcut BN (the BNs NBN can convert in
    their ResNet/ResNeXt); with `all_scalable`, for bn1 and bn2 too (RIDE
    converts every BN of an expert's last stage).
    """

    def __init__(self, in_channels, planes, stride, groups=1, width_per_group=64,
                 all_scalable=False):
        super().__init__()
        width = int(planes * width_per_group / 64) * groups
        inner_bn = ScalableBN if all_scalable else nn.BatchNorm2d
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = inner_bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = inner_bn(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = ScalableBN(planes * 4)
        self.downsample = None
        if stride != 1 or in_channels != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, planes * 4, 1, stride, bias=False),
                ScalableBN(planes * 4))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class LinearFcbn(nn.Module):
    """Their `Linear_fcbn` (`affine=True`) / `Linear_fcbn_notaffine`: a linear
    layer, then a BatchNorm1d over the logits, as `models/LRClassifier.py`
    defines them (parameters `weight`, `bias` and the BN as `bn`)."""

    def __init__(self, in_features, classes, affine=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(classes, in_features))
        self.bias = nn.Parameter(torch.empty(classes))
        self.bn = nn.BatchNorm1d(classes, affine=affine)

    def forward(self, x):
        return self.bn(F.linear(x, self.weight, self.bias))


def make_head(fc_type, in_features, classes):
    """Their `fc` for an `fc_type`: `Linear`, `Linear_fcbn`, `Linear_fcbn_notaffine`."""
    if fc_type == "Linear":
        return nn.Linear(in_features, classes)
    return LinearFcbn(in_features, classes, affine=fc_type == "Linear_fcbn")


def randomize(model, seed=0, linear_types=(nn.Linear, LinearFcbn)):
    """Random weights and BN statistics (He-scaled convolutions, BN near 1/0).

    Every module of `linear_types` gets a random `weight` and `bias`; an NBN
    model's `scale_factor` is drawn in [0.5, 2.5). Returns the model in
    evaluation mode.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return mean + std * torch.randn(shape, generator=generator)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(normal(module.weight.shape, (2 / fan_in) ** 0.5))
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                c = module.num_features
                if module.affine:
                    module.weight.copy_(normal(c, 0.2, 1.0))
                    module.bias.copy_(normal(c, 0.2))
                module.running_mean.copy_(normal(c, 0.2))
                module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
                module.num_batches_tracked.fill_(1234)
            elif isinstance(module, linear_types):
                module.weight.copy_(normal(module.weight.shape, 0.05))
                module.bias.copy_(normal(module.bias.shape, 0.1))
        if hasattr(model, "scale_factor"):
            model.scale_factor.copy_(0.5 + 2 * torch.rand(model.scale_factor.shape,
                                                          generator=generator))
    return model.eval()


def images(n=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


def torch_logits(model, x):
    nchw = ((x / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(nchw))).numpy()


def run_importer(*flags):
    """`python -m nbn_keras.import_torch *flags` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "nbn_keras.import_torch", *flags],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO})


def import_and_check_logits(theirs, checkpoint, arch, output):
    """Imports `checkpoint` with the command; its logits must equal `theirs`.

    Returns:
        The imported Keras model, loaded from `output`.
    """
    result = run_importer(f"--checkpoint={checkpoint}", f"--arch={arch}",
                          f"--num_classes={NUM_CLASSES}", f"--output={output}",
                          f"--image_size={SIZE}")
    assert result.returncode == 0, result.stderr[-3000:]
    ours = keras.models.load_model(output)
    x = images()
    expected = torch_logits(theirs, x)
    got = ours.predict(x, verbose=0)
    # 1e-4 relative to the logits' scale (float32 through 50 layers).
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert np.abs(expected).max() > 0.1  # not a trivially small output
    return ours


def torch_ride_balanced_softmax(experts, labels, freq, factor=-0.2, temperature=1.0):
    """`experts` is `(experts, batch, classes)`, as their extra_info['logits']."""
    with torch.no_grad():
        target = F.softmax(experts.mean(0) / temperature, dim=1)
    loss = 0.0
    for logits in experts:
        loss = loss + F.cross_entropy(logits + torch.log(freq), labels)
        log_probs = F.log_softmax(logits / temperature, dim=1)
        loss = loss + factor * temperature ** 2 * F.kl_div(log_probs, target,
                                                           reduction="batchmean")
    return loss
