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

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import nbn_keras
from nbn_keras.conversion import leaf_layers
from tests.torch_nets import NUM_CLASSES
from tests.torch_nets import Bottleneck
from tests.torch_nets import ScalableBN
from tests.torch_nets import import_and_check_logits
from tests.torch_nets import make_head
from tests.torch_nets import randomize


def stage(in_channels, planes, blocks, stride):
    layers = [Bottleneck(in_channels, planes, stride, all_scalable=True)]
    layers += [Bottleneck(planes * 4, planes, 1, all_scalable=True)
               for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


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
        self.linears = nn.ModuleList(make_head(head, dim4 * 4, NUM_CLASSES)
                                     for _ in range(experts))
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
    torch.manual_seed(seed)
    return randomize(TorchRIDE(*CASES[arch]), seed)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(CASES))
def test_imported_ride_checkpoint_gives_the_authors_mean_logits(arch, tmp_path):
    theirs = randomized_torch_model(arch)
    checkpoint = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 200, "arch": "resnet50_ride_NBN" if CASES[arch][5] else arch,
                "state_dict": {"module." + k: v for k, v in theirs.state_dict().items()}},
               checkpoint)
    ours = import_and_check_logits(theirs, checkpoint, arch, tmp_path / f"{arch}.keras")

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
