"""The authors' checkpoints in Keras, against a PyTorch definition of their nets.

The PyTorch networks below are written here from the architecture of the
authors' `models/ResNet_NBN.py` and `models/ResNext_NBN.py` (torchvision v1.5
bottlenecks, ResNeXt 32x4d, NBN on the last BN of every `layer4` block and
on its shortcut BN, one alpha = `scale_factor[0]`), with their module names,
so their state dicts have the keys of the authors' checkpoints.
"""

import io
import os
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import nbn_keras
from nbn_keras.interop import torch_checkpoint as import_torch
from nbn_keras.training import driver as train
from nbn_keras.data import make_eval_dataset
from nbn_keras.evaluate import evaluate_file
from nbn_keras.conversion import leaf_layers
from tests.torch_nets import NUM_CLASSES
from tests.torch_nets import SIZE
from tests.torch_nets import Bottleneck
from tests.torch_nets import ScalableBN
from tests.torch_nets import images
from tests.torch_nets import import_and_check_logits
from tests.torch_nets import make_head
from tests.torch_nets import randomize
from tests.torch_nets import run_importer
from tests.torch_nets import torch_logits
from tests.helpers import parse_config
from tests.helpers import write_jpeg_list_files

# arch: (groups, width per group, NBN, their fc_type). resnet50_nbn is the
# arch whose builder passes fc_type on: its case has the affine logit BN
# (RIDE's NBN case in test_ride_import.py has the non-affine one).
ARCHS = {
    "resnet50": (1, 64, False, "Linear"),
    "resnet50_nbn": (1, 64, True, "Linear_fcbn"),
    "resnext50": (32, 4, False, "Linear"),
    "resnext50_nbn": (32, 4, True, "Linear"),
}


class TorchResNet50(nn.Module):
    def __init__(self, num_classes, groups=1, width_per_group=64, nbn=False,
                 fc_type="Linear"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = 64
        for index, (planes, blocks) in enumerate(zip([64, 128, 256, 512], [3, 4, 6, 3])):
            stage = []
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                stage.append(Bottleneck(in_channels, planes, stride, groups, width_per_group))
                in_channels = planes * 4
            setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
        self.fc = make_head(fc_type, 2048, num_classes)
        if nbn:
            scalable = [m for m in self.modules() if isinstance(m, ScalableBN)]
            # One entry per scalable BN, as in the authors' code; only [0] is used.
            self.scale_factor = nn.Parameter(torch.ones(len(scalable)))
            for module in self.layer4.modules():
                if isinstance(module, ScalableBN):
                    module.alpha_source = lambda: self.scale_factor[0]

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
        # Global average pooling: their AvgPool2d(7) at 224x224 inputs.
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def randomized_torch_model(arch, seed=0):
    torch.manual_seed(seed)
    return randomize(TorchResNet50(NUM_CLASSES, *ARCHS[arch]), seed)


def save_authors_checkpoint(model, arch, path):
    """As the authors' `main.py` saves under DDP.

    The optimizer and scheduler entries are written as their state dicts
    look (creating `torch.optim.SGD` here would import torch._dynamo, which
    crashes in a process that has loaded TensorFlow).
    """
    parameters = list(range(len(list(model.parameters()))))
    torch.save({
        "epoch": 90,
        "arch": arch,
        "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
        "best_acc1": torch.tensor(42.0),
        "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                      "param_groups": [{"lr": 0.0, "momentum": 0.9,
                                        "weight_decay": 5e-4, "nesterov": False,
                                        "params": parameters}]},
        "scheduler": {"T_max": 90, "eta_min": 0, "base_lrs": [0.2],
                      "last_epoch": 90, "_last_lr": [0.0]},
    }, path)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_imported_checkpoint_gives_the_authors_logits(arch, tmp_path):
    theirs = randomized_torch_model(arch)
    checkpoint = tmp_path / "model_best.pth.tar"
    save_authors_checkpoint(theirs, arch, checkpoint)
    ours = import_and_check_logits(theirs, checkpoint, arch, tmp_path / f"{arch}.keras")

    # Trainable parameters: PyTorch's, less the 19 entries of scale_factor
    # their forward never reads (one shared alpha remains).
    torch_trainable = sum(p.numel() for p in theirs.parameters())
    if ARCHS[arch][2]:
        torch_trainable -= theirs.scale_factor.numel() - 1
    assert sum(int(np.prod(w.shape)) for w in ours.trainable_weights) == torch_trainable
    running = sum(b.numel() for n, b in theirs.named_buffers()
                  if not n.endswith("num_batches_tracked"))
    assert sum(int(np.prod(w.shape)) for w in ours.non_trainable_weights) == running
    nbn_layers = [l.name for l in leaf_layers(ours)
                  if isinstance(l, nbn_keras.NormalizedBatchNormalization)]
    assert len(nbn_layers) == (4 if ARCHS[arch][2] else 0)


@pytest.fixture(scope="module")
def nbn_state_dict():
    torch.manual_seed(1)
    model = randomize(TorchResNet50(NUM_CLASSES, nbn=True, fc_type="Linear"), seed=1)
    return model, {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def keras_models():
    return {arch: import_torch.build_model(arch, NUM_CLASSES, SIZE)
            for arch in ("resnet50", "resnet50_nbn")}


def test_bare_state_dict_without_prefix(nbn_state_dict, tmp_path):
    theirs, state_dict = nbn_state_dict
    torch.save(theirs.state_dict(), tmp_path / "bare.pth")
    read, arch = import_torch.read_checkpoint(str(tmp_path / "bare.pth"))
    assert arch is None
    assert sorted(read) == sorted(state_dict)
    np.testing.assert_array_equal(read["layer4.2.bn3.running_var"],
                                  state_dict["layer4.2.bn3.running_var"])


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("layer4.2.bn3.running_var"),
     r"missing keys: layer4\.2\.bn3\.running_var"),
    (lambda sd: sd.update({"layer5.0.conv1.weight": np.zeros(3)}),
     r"unexpected keys: layer5\.0\.conv1\.weight"),
    (lambda sd: sd.update({"layer2.0.conv2.weight": np.zeros((128, 128, 1, 3))}),
     r"mis-shaped keys: layer2\.0\.conv2\.weight \(128, 128, 1, 3\) "
     r"\(expected \(128, 128, 3, 3\)\)"),
    (lambda sd: sd.update({"scale_factor": np.ones(4)}),
     r"mis-shaped keys: scale_factor \(4,\) \(expected \(20,\)\)"),
    (lambda sd: sd.update({"fc.weight": np.zeros((7, 2048)), "fc.bias": np.zeros(7)}),
     r"with 5 classes: mis-shaped keys: fc\.bias \(7,\) \(expected \(5,\)\), "
     r"fc\.weight \(7, 2048\) \(expected \(5, 2048\)\)"),
])
def test_bad_keys_are_named_and_nothing_is_loaded(
        nbn_state_dict, keras_models, change, message):
    model = keras_models["resnet50_nbn"]
    before = [w.numpy() for w in model.weights]
    state_dict = dict(nbn_state_dict[1])
    change(state_dict)
    with pytest.raises(ValueError, match=message):
        import_torch.load_state_dict(model, state_dict)
    for old, new in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(old, new)


def test_nbn_and_plain_checkpoints_are_told_apart(nbn_state_dict, keras_models):
    state_dict = nbn_state_dict[1]
    with pytest.raises(ValueError, match=r"unexpected keys: scale_factor.*"
                                         r"is it arch 'resnet50_nbn'"):
        import_torch.load_state_dict(keras_models["resnet50"], state_dict)
    plain = {k: v for k, v in state_dict.items() if k != "scale_factor"}
    with pytest.raises(ValueError, match=r"missing keys: scale_factor.*"
                                         r"is it arch 'resnet50'"):
        import_torch.load_state_dict(keras_models["resnet50_nbn"], plain)


def logit_bn_keys(affine):
    keys = ["fc.bn.running_mean", "fc.bn.running_var", "fc.bn.num_batches_tracked"]
    return keys + (["fc.bn.weight", "fc.bn.bias"] if affine else [])


@pytest.mark.parametrize("arch, keys, head, found", [
    ("resnet50_nbn", [], "linear", "head Linear (no 'fc.bn.*' keys)"),
    ("resnet50_nbn", logit_bn_keys(True), "fcbn",
     "head Linear_fcbn ('fc.bn.*' with weight and bias)"),
    ("resnet50_nbn", logit_bn_keys(False), "fcbn_notaffine",
     "head Linear_fcbn_notaffine ('fc.bn.*' without weight and bias)"),
    ("resnet50_ride_nbn", ["linears.0.bn.running_mean", "linears.1.bn.running_mean"],
     "fcbn_notaffine", "head Linear_fcbn_notaffine ('linears.0.bn.*' without weight "
     "and bias)"),
])
def test_head_type_is_read_from_the_keys(nbn_state_dict, arch, keys, head, found):
    state_dict = {**nbn_state_dict[1], **{key: np.zeros(NUM_CLASSES) for key in keys}}
    assert import_torch.head_type(state_dict, arch) == (head, found)


@pytest.mark.parametrize("arch", ["resnet50", "resnext50", "resnext50_nbn"])
def test_a_logit_bn_their_builder_never_makes_is_refused(nbn_state_dict, arch):
    # Their resnet50, resnext50 and resnext50_nbn builders always build nn.Linear.
    state_dict = {**nbn_state_dict[1], **{k: np.zeros(NUM_CLASSES) for k in logit_bn_keys(True)}}
    with pytest.raises(ValueError, match=rf"has a head Linear_fcbn \('fc.bn.\*' with "
                                         rf"weight and bias\), which their arch '{arch}' "
                                         r"never builds \(it builds Linear\)"):
        import_torch.head_type(state_dict, arch)


def test_errors_keep_existing_files(nbn_state_dict, tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt.pth.tar"
    save_authors_checkpoint(nbn_state_dict[0], "resnet50_nbn", checkpoint)
    output = tmp_path / "out.keras"
    output.write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        import_torch.import_checkpoint(str(checkpoint), "resnet50_nbn",
                                       NUM_CLASSES, output=str(output))
    with pytest.raises(ValueError, match="trained as arch 'resnet50_nbn', not "
                                         "'resnext50_nbn'"):
        import_torch.import_checkpoint(str(checkpoint), "resnext50_nbn",
                                       NUM_CLASSES, output=str(tmp_path / "b.keras"))
    with pytest.raises(ValueError, match="must be a .keras file"):
        import_torch.import_checkpoint(str(checkpoint), "resnet50_nbn",
                                       NUM_CLASSES, output=str(tmp_path / "b.h5"))
    with pytest.raises(FileNotFoundError, match="No checkpoint file"):
        import_torch.import_checkpoint(str(tmp_path / "none.pth"), "resnet50_nbn",
                                       NUM_CLASSES)

    def half_save(path):
        with open(path, "w") as f:
            f.write("partial")
        raise OSError("disk full")

    # Even with overwrite, a save that fails leaves the previous file (the
    # model is not what is tested here: a stand-in keeps this cheap).
    monkeypatch.setattr(import_torch, "build_model", lambda *args: None)
    monkeypatch.setattr(import_torch, "load_state_dict",
                        lambda model, state_dict: SimpleNamespace(save=half_save))
    with pytest.raises(OSError, match="disk full"):
        import_torch.import_checkpoint(str(checkpoint), "resnet50_nbn", NUM_CLASSES,
                                       output=str(output), image_size=SIZE, overwrite=True)
    assert output.read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth.tar", "out.keras"]


def test_unreadable_checkpoints_say_what_is_wrong(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"state_dict": {"w": torch.arange(300.0)}, "arch": "resnet50"}, good)
    state_dict, arch = import_torch.read_checkpoint(str(good))
    np.testing.assert_array_equal(state_dict["w"], np.arange(300.0))
    assert arch == "resnet50"
    data = good.read_bytes()
    with zipfile.ZipFile(good) as archive:
        member = next(i for i in archive.infolist() if i.filename.endswith("data/0"))
    # The member's data follows its local header (30 bytes, name, extra field).
    header = data[member.header_offset: member.header_offset + 30]
    start = (member.header_offset + 30 + int.from_bytes(header[26:28], "little")
             + int.from_bytes(header[28:30], "little"))
    flipped = bytearray(data)
    flipped[start + member.file_size // 2] ^= 0xFF
    legacy = io.BytesIO()
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    cases = {
        b"": r"'\S*bad\.pth' is empty \(0 bytes\): it is not a PyTorch checkpoint\.",
        data[: len(data) // 2]: r"'\S*bad\.pth' is truncated or damaged: torch\.save "
                                r"writes a zip archive, and this one is incomplete",
        bytes(flipped): r"'\S*bad\.pth' is damaged: its member '\S*data/0' does not "
                        r"match its checksum\.",
        # The legacy (pickle) format: PyTorch's EOFError has no message.
        legacy.getvalue()[:20]: r"could not be read as a PyTorch checkpoint: the data "
                                r"ends early \(a truncated file\?\)$",
    }
    for content, message in cases.items():
        (tmp_path / "bad.pth").write_bytes(content)
        with pytest.raises(ValueError, match=message) as raised:
            import_torch.read_checkpoint(str(tmp_path / "bad.pth"))
        assert "noweights_only" not in str(raised.value)


@pytest.mark.slow
def test_command_line_reports_errors_without_a_traceback(tmp_path):
    output = tmp_path / "out.keras"
    output.write_text("precious")
    result = run_importer(f"--checkpoint={tmp_path / 'none.pth'}", "--arch=resnet50",
                          "--num_classes=5", f"--output={output}")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"nbn_keras.import_torch: error: '{output}' exists; pass "
        "overwrite=True (--overwrite) to replace it.")
    assert output.read_text() == "precious"


@pytest.mark.slow
def test_imported_model_exports_for_serving(nbn_state_dict, tmp_path):
    import tensorflow as tf

    from nbn_keras.serving.export import export_keras_file

    theirs = nbn_state_dict[0]
    checkpoint = tmp_path / "ckpt.pth.tar"
    save_authors_checkpoint(theirs, "resnet50_nbn", checkpoint)
    import_torch.import_checkpoint(str(checkpoint), "resnet50_nbn", NUM_CLASSES,
                                   output=str(tmp_path / "nbn.keras"), image_size=SIZE)
    path = export_keras_file(str(tmp_path / "nbn.keras"), str(tmp_path / "served"))
    served = tf.saved_model.load(path).signatures["serving_default"]
    x = images(seed=3)
    expected = torch_logits(theirs, x)
    got = served(images=tf.constant(x))["logits"].numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    # The evaluation command's code on the imported file scores what their
    # model predicts on the same (pipeline-decoded) images.
    lists = write_jpeg_list_files(str(tmp_path / "images"), num_classes=NUM_CLASSES)
    config = parse_config("--data=imagenet_lt", *lists, f"--image_size={SIZE}")
    figures, _ = evaluate_file(str(tmp_path / "nbn.keras"), config)
    data = train.load_data(config)
    pixels = np.concatenate([x for x, _ in make_eval_dataset(data, "test").as_numpy_iterator()])
    theirs_right = torch_logits(theirs, pixels).argmax(-1) == data.get_split("test").labels
    assert figures["top1"] == pytest.approx(100 * theirs_right.mean())
