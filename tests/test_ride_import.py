"""The authors' RIDE checkpoints in Keras, against a PyTorch RIDE written here.

The PyTorch network below is written from the architecture of the authors'
`models/ensemble.py` and `models/ensemble_NBN.py`: a torchvision v1.5 stem,
`layer1`, `layer2` shared; per expert its own `layer3s.e` (or one shared
`layer3`) and `layer4s.e`, global pooling and `linears.e` (a linear layer,
or a linear layer then a BatchNorm1d without affine parameters); the output
is the mean of the experts' logits. With NBN, every BN of `layer4s.e` uses
`alpha * w / (|w| + 1e-6)` (and the same for its bias) with
`alpha = scale_factor[e]`, `scale_factor` having one entry per 2D BN.
Module names are theirs, so the state dict has their checkpoint's keys.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import nbn_keras
from nbn_keras import import_torch
from nbn_keras.conversion import leaf_layers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
SIZE = 64
NUM_CLASSES = 5


class ScalableBN(nn.BatchNorm2d):
    """BN2d that, when given an alpha, uses alpha * w / (|w| + 1e-6) (and b)."""

    def __init__(self, channels):
        super().__init__(channels)
        self.alpha_source = None

    def forward(self, x):
        weight, bias = self.weight, self.bias
        if self.alpha_source is not None:
            alpha = self.alpha_source()
            weight = alpha * weight / (weight.norm() + 1e-6)
            bias = alpha * bias / (bias.norm() + 1e-6)
        return F.batch_norm(x, self.running_mean, self.running_var, weight, bias,
                            self.training, self.momentum, self.eps)


class Bottleneck(nn.Module):
    def __init__(self, in_channels, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = ScalableBN(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = ScalableBN(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
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


def stage(in_channels, planes, blocks, stride):
    layers = [Bottleneck(in_channels, planes, stride)]
    layers += [Bottleneck(planes * 4, planes, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class NotAffineHead(nn.Module):
    def __init__(self, in_features, classes):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(classes, in_features))
        self.bias = nn.Parameter(torch.empty(classes))
        self.bn = nn.BatchNorm1d(classes, affine=False)

    def forward(self, x):
        return self.bn(F.linear(x, self.weight, self.bias))


class TorchRIDE(nn.Module):
    def __init__(self, experts, dim3, dim4, share_layer3, head, nbn):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = ScalableBN(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = stage(64, 64, 3, 1)
        self.layer2 = stage(256, 128, 4, 2)
        self.share_layer3 = share_layer3
        if share_layer3:
            self.layer3 = stage(512, dim3, 6, 2)
        else:
            self.layer3s = nn.ModuleList(stage(512, dim3, 6, 2) for _ in range(experts))
        self.layer4s = nn.ModuleList(stage(dim3 * 4, dim4, 3, 2) for _ in range(experts))
        make_head = nn.Linear if head == "Linear" else NotAffineHead
        self.linears = nn.ModuleList(make_head(dim4 * 4, NUM_CLASSES) for _ in range(experts))
        if nbn:
            count = sum(isinstance(m, ScalableBN) for m in self.modules())
            self.scale_factor = nn.Parameter(torch.ones(count))
            for e, layer4 in enumerate(self.layer4s):
                for module in layer4.modules():
                    if isinstance(module, ScalableBN):
                        module.alpha_source = (lambda e=e: self.scale_factor[e])

    def forward(self, x):
        x = self.layer2(self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x))))))
        if self.share_layer3:
            x = self.layer3(x)
        outs = []
        for e, (layer4, head) in enumerate(zip(self.layer4s, self.linears)):
            y = x if self.share_layer3 else self.layer3s[e](x)
            # Global average pooling: their AvgPool2d(7) at 224x224 inputs.
            y = torch.flatten(F.adaptive_avg_pool2d(layer4(y), 1), 1)
            outs.append(head(y))
        return torch.stack(outs, dim=1).mean(dim=1)


# arch: (experts, dim3, dim4, share_layer3, head, nbn). Their configs use 3
# experts and 256/512; narrower widths keep the test fast, and one case
# checks reduce_dimension's 192/384.
CASES = {
    "resnet50_ride": (3, 192, 384, False, "Linear", False),
    "resnet50_ride_nbn": (2, 32, 48, True, "Linear_fcbn_notaffine", True),
}


def randomized_torch_model(arch, seed=0):
    experts, dim3, dim4, share_layer3, head, nbn = CASES[arch]
    torch.manual_seed(seed)
    model = TorchRIDE(experts, dim3, dim4, share_layer3, head, nbn)
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
            elif isinstance(module, (nn.Linear, NotAffineHead)):
                module.weight.copy_(normal(module.weight.shape, 0.05))
                module.bias.copy_(normal(module.bias.shape, 0.1))
        if nbn:
            model.scale_factor.copy_(0.5 + 2 * torch.rand(model.scale_factor.shape,
                                                          generator=generator))
    return model.eval()


def torch_logits(model, x):
    nchw = ((x / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(nchw))).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(CASES))
def test_imported_ride_checkpoint_gives_the_authors_mean_logits(arch, tmp_path):
    theirs = randomized_torch_model(arch)
    checkpoint = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet50_ride_NBN" if CASES[arch][5] else arch,
                "state_dict": {"module." + k: v for k, v in theirs.state_dict().items()}},
               checkpoint)
    output = tmp_path / f"{arch}.keras"
    result = subprocess.run(
        [sys.executable, "-m", "nbn_keras.import_torch", f"--checkpoint={checkpoint}",
         f"--arch={arch}", f"--num_classes={NUM_CLASSES}", f"--output={output}",
         f"--image_size={SIZE}"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stderr[-3000:]

    ours = keras.models.load_model(output)
    x = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    expected = torch_logits(theirs, x)
    got = ours.predict(x, verbose=0)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert np.abs(expected).max() > 0.1

    experts, _, _, _, _, nbn = CASES[arch]
    scales = sorted((l.name, float(l.scales[0].numpy())) for l in leaf_layers(ours)
                    if isinstance(l, nbn_keras.NBNScale))
    if nbn:
        want = theirs.scale_factor.detach().numpy()[:experts]
        assert [name for name, _ in scales] == [f"nbn_scale_expert{e}" for e in range(experts)]
        np.testing.assert_allclose([value for _, value in scales], want, rtol=1e-6)
    else:
        assert scales == []
    # Trainable parameters: PyTorch's, less the scale_factor entries their
    # forward never reads (one alpha per expert remains).
    torch_trainable = sum(p.numel() for p in theirs.parameters())
    if nbn:
        torch_trainable -= theirs.scale_factor.numel() - experts
    assert sum(int(np.prod(w.shape)) for w in ours.trainable_weights) == torch_trainable
