"""The zoo (src/nondet_hpc/run/zoo, registry/models.py) against the authors' definitions.

The ``Ref*`` classes below re-state, in our own code, the architectures of the authors' repository
(ceciliaresearch/nondeterminism_instability): resnet_cifar.py (ResNet, BasicBlock, LinearNet,
HiddenNet1, HiddenNet2), vgg.py (VGG), shufflenetv2.py (ShuffleNetV2, BasicBlock, DownBlock),
mnist_models.py (MnistNet, MnistLinearNet, MnistHiddenNet1, MnistHiddenNet2) and
imagenet_models.py (torchvision's resnet18/34/50). They keep the authors' module structure, names,
hard-coded sizes and operations (AvgPool2d(1, stride) shortcuts concatenating zeros, adaptive
average pooling, avg_pool2d(4)), so that:

- each zoo model's parameter count equals the number in the registry AND the reference's count;
- each zoo model's state_dict has exactly the reference's names and shapes (the authors'
  parameter-group rule and bit change go by name; ``resnet14``, this package's class, has the same
  shapes in the same order under its own names), and a forward pass with the weights copied
  across agrees to float tolerance;
- every model trains one step on tiny data of its dataset's shape, and its init draws from the
  given generator only.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from nondet_hpc.config import ConfigError
from nondet_hpc.registry.models import MODELS as REGISTERED
from nondet_hpc.run.models import build_model, init_weights
from nondet_hpc.run.train import small_lr_names
from nondet_hpc.run.zoo import authors_small_lr_names, bitflip_target, build, default_bitflip_param
from nondet_hpc.run.zoo.cifar_resnet import CifarResNet, build_cifar_resnet

#: The authors' list (their models.py): every registered model but this package's option-B ResNets
#: (resnet18b, resnet34) and the researcher's own.
MODELS = {n: e for n, e in REGISTERED.items() if n not in ("resnet18b", "resnet34", "custom")}


# --- references: the authors' definitions, restated ----------------------------------------------
class RefResBlock(nn.Module):  # resnet_cifar.py BasicBlock
    def __init__(self, cin, cout, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        skip = x
        if self.downsample is not None:
            skip = self.downsample(x)
            skip = torch.cat((skip, torch.zeros_like(skip)), 1)
        return self.relu(y + skip)


class RefResNet(nn.Module):  # resnet_cifar.py ResNet (stem input channels: 3 there)
    def __init__(self, blocks, widths, num_classes=10, cin=3):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.stages = []
        planes = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            down = nn.Sequential(nn.AvgPool2d(1, stride=stride), nn.BatchNorm2d(planes)) if stride != 1 else None
            seq = nn.Sequential(RefResBlock(planes, w, stride, down), *[RefResBlock(w, w) for _ in range(n - 1)])
            planes = w
            self.stages.append(seq)
            self.add_module(f"layer{i}", seq)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for s in self.stages:
            x = s(x)
        return self.fc(self.avgpool(x).view(x.size(0), -1))


class RefLinear(nn.Module):  # resnet_cifar.py LinearNet (32*32*3), mnist_models.py MnistLinearNet (28*28)
    def __init__(self, n_in, k=10):
        super().__init__()
        self.fc = nn.Linear(n_in, k)

    def forward(self, x):
        return self.fc(x.view(x.size(0), -1))


class RefHidden1(nn.Module):  # HiddenNet1 / MnistHiddenNet1
    def __init__(self, n_in, k=10):
        super().__init__()
        self.fc1, self.fc2, self.relu = nn.Linear(n_in, 512), nn.Linear(512, k), nn.ReLU()

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x.view(x.size(0), -1))))


class RefHidden2(nn.Module):  # HiddenNet2 (16*16*64) / MnistHiddenNet2 (14*14*64)
    def __init__(self, cin, side_out, k=10):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, 64, kernel_size=5, stride=2, padding=2, bias=True)
        self.fc1 = nn.Linear(side_out * side_out * 64, k)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.fc1(self.relu(self.conv1(x)).view(x.size(0), -1))


class RefMnistNet(nn.Module):  # mnist_models.py MnistNet
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


REF_VGG = {11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
           13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
           16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]}


class RefVGG(nn.Module):  # vgg.py VGG (classifier 512 -> 10)
    def __init__(self, depth):
        super().__init__()
        mods, c = [], 3
        for v in REF_VGG[depth]:
            if v == "M":
                mods.append(nn.MaxPool2d(2, 2))
            else:
                mods += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*mods, nn.AvgPool2d(1, 1))
        self.classifier = nn.Linear(512, 10)

    def forward(self, x):
        return self.classifier(self.features(x).view(x.size(0), -1))


def _ref_shuffle(x):
    n, c, h, w = x.size()
    return x.view(n, 2, c // 2, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class RefShuffleBasic(nn.Module):  # shufflenetv2.py BasicBlock (split ratio 0.5)
    def __init__(self, cin):
        super().__init__()
        c = int(cin * 0.5)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        c = int(x.size(1) * 0.5)
        a, b = x[:, :c], x[:, c:]
        b = F.relu(self.bn1(self.conv1(b)))
        b = self.bn2(self.conv2(b))
        b = F.relu(self.bn3(self.conv3(b)))
        return _ref_shuffle(torch.cat([a, b], 1))


class RefShuffleDown(nn.Module):  # shufflenetv2.py DownBlock
    def __init__(self, cin, cout):
        super().__init__()
        m = cout // 2
        self.conv1, self.bn1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False), nn.BatchNorm2d(cin)
        self.conv2, self.bn2 = nn.Conv2d(cin, m, 1, bias=False), nn.BatchNorm2d(m)
        self.conv3, self.bn3 = nn.Conv2d(cin, m, 1, bias=False), nn.BatchNorm2d(m)
        self.conv4, self.bn4 = nn.Conv2d(m, m, 3, 2, 1, groups=m, bias=False), nn.BatchNorm2d(m)
        self.conv5, self.bn5 = nn.Conv2d(m, m, 1, bias=False), nn.BatchNorm2d(m)

    def forward(self, x):
        a = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        b = F.relu(self.bn3(self.conv3(x)))
        b = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(b)))))
        return _ref_shuffle(torch.cat([a, b], 1))


REF_SHUFFLE = {0.5: (48, 96, 192, 1024), 1.0: (116, 232, 464, 1024)}  # blocks (3, 7, 3) for both


class RefShuffleNet(nn.Module):  # shufflenetv2.py ShuffleNetV2 (linear -> 10)
    def __init__(self, size):
        super().__init__()
        out = REF_SHUFFLE[size]
        self.conv1, self.bn1 = nn.Conv2d(3, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24)
        c = 24
        for i, n in zip((1, 2, 3), (3, 7, 3)):
            setattr(self, f"layer{i}", nn.Sequential(RefShuffleDown(c, out[i - 1]),
                                                      *[RefShuffleBasic(out[i - 1]) for _ in range(n)]))
            c = out[i - 1]
        self.conv2, self.bn2 = nn.Conv2d(c, out[3], 1, bias=False), nn.BatchNorm2d(out[3])
        self.linear = nn.Linear(out[3], 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.avg_pool2d(F.relu(self.bn2(self.conv2(x))), 4)
        return self.linear(x.view(x.size(0), -1))


def reference(name: str) -> nn.Module:
    """The authors' definition of zoo model ``name``, for its own dataset."""
    e = MODELS[name]
    if e.family in ("cifar_resnet", "resnet"):
        return RefResNet(list(e.options["blocks"]), list(e.options["widths"]))
    table = {
        "linearnet": lambda: RefLinear(32 * 32 * 3), "mnistlinearnet": lambda: RefLinear(28 * 28),
        "hiddennet1": lambda: RefHidden1(32 * 32 * 3), "mnisthiddennet1": lambda: RefHidden1(28 * 28),
        "hiddennet2": lambda: RefHidden2(3, 16), "mnisthiddennet2": lambda: RefHidden2(1, 14),
        "mnistnet": RefMnistNet,
        "vgg11": lambda: RefVGG(11), "vgg13": lambda: RefVGG(13), "vgg16": lambda: RefVGG(16),
        "shufflenet05": lambda: RefShuffleNet(0.5), "shufflenet1": lambda: RefShuffleNet(1.0),
        # imagenet_models.py: torchvision's constructors with their defaults (1000 classes)
        "imagenet_resnet18": torchvision.models.resnet18, "imagenet_resnet34": torchvision.models.resnet34,
        "imagenet_resnet50": torchvision.models.resnet50,
    }
    return table[name]()


def _g(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _ours(name: str, seed: int = 1) -> nn.Module:
    e = MODELS[name]
    return build(name, e.in_shape, e.num_classes, _g(seed))


ALL = sorted(MODELS)
BIG = {"resnet1202"}  # 600 blocks: counted and compared on the meta device, trained in tests/test_zoo_train.py


# --- shapes, names, counts ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_parameter_count_names_and_shapes_are_the_authors(name):
    e = MODELS[name]
    with torch.device("meta"):
        ref = reference(name)
        ours = (CifarResNet(e.options["widths"], e.options["blocks"], e.num_classes, e.in_shape[0])
                if name in BIG else None)
    if ours is None:
        ours = _ours(name)
    assert _count(ours) == _count(ref) == e.params
    if e.family == "resnet":  # this package's class: the authors' tensors in their order, its own names
        assert [tuple(v.shape) for v in ours.state_dict().values()] == [tuple(v.shape) for v in ref.state_dict().values()]
        return
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_resnet18_is_option_a_with_11001034_parameters():
    m = _ours("resnet18")
    assert _count(m) == 11_001_034
    assert not any(isinstance(x, nn.Conv2d) and x.kernel_size == (1, 1) for x in m.modules())  # no 1x1 shortcut conv


# --- forward agreement after copying the weights --------------------------------------------------
def _scramble(model: nn.Module, seed: int) -> None:
    """Random values in every float tensor (incl. BN scales a zero-init would hide, running stats)."""
    g = _g(seed)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5 if t.ndim == 1 else
                        torch.randn(t.shape, generator=g) * 0.1)


FORWARD = ["linearnet", "hiddennet1", "hiddennet2", "resnet6", "resnet14", "resnet14_0125", "resnet14_2", "resnet20",
           "resnet18", "vgg11", "shufflenet05", "mnistlinearnet", "mnisthiddennet1", "mnisthiddennet2", "mnistnet",
           "imagenet_resnet18"]


@pytest.mark.parametrize("name", FORWARD)
def test_forward_agrees_with_the_authors_definition(name):
    e = MODELS[name]
    ours = _ours(name)
    _scramble(ours, 7)
    ref = reference(name)
    state = ours.state_dict()
    if e.family == "resnet":  # same tensors in the same order under this package's names
        state = dict(zip(ref.state_dict(), state.values()))
    ref.load_state_dict(state, strict=True)
    x = torch.randn(4, *e.in_shape, generator=_g(3))
    for mode in ("eval", "train"):
        getattr(ours, mode)(), getattr(ref, mode)()
        with torch.no_grad():
            a, b = ours(x), ref(x)
        assert a.shape == (4, e.num_classes)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_torchvision_resnet_starts_from_torchvisions_own_weights():
    """Built in the init fork, our subclass draws exactly what torchvision.models.resnet18() draws."""
    from nondet_hpc.run.zoo.rng import forked_rng, seed_from
    from nondet_hpc.run.zoo.tv_resnet import TorchvisionResNet

    seed = seed_from(_g(5))
    with forked_rng(seed):
        ours = TorchvisionResNet(18, 3, 1000)
    with forked_rng(seed):
        theirs = torchvision.models.resnet18()
    for (k, a), (k2, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert ours.forward_features(torch.zeros(2, 3, 64, 64)).shape == (2, 512)


def test_zoo_resnet14_is_todays_resnet14_bit_for_bit():
    """The authors' layout (cifar_resnet, their names) at ResNet-14's widths and this package's
    resnet14: same init draws in the same order, same outputs, same learning-rate groups (their
    name rule on their names = train.small_lr_names' module rule on ours); only names differ."""
    zoo = build_cifar_resnet([16, 32, 64], [2, 2, 2], 10, 3, _g(4))
    today = build_model("resnet14", 10, 3)
    init_weights(today, _g(4))
    za, ta = list(zoo.state_dict().values()), list(today.state_dict().values())
    assert len(za) == len(ta) and all(torch.equal(a, b) for a, b in zip(za, ta))
    x = torch.randn(8, 3, 32, 32, generator=_g(9))
    assert torch.equal(zoo(x), today(x))
    zoo_small = [n in authors_small_lr_names(zoo) for n, _ in zoo.named_parameters()]
    today_small = [n in small_lr_names(today, "authors") for n, _ in today.named_parameters()]
    assert zoo_small == today_small


# --- the authors' name rules ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_bitflip_param_is_the_first_layers_float32_weight(name):
    e = MODELS[name]
    with torch.device("meta"):
        ref = reference(name)
    first = next(n for n, _ in ref.named_parameters())
    assert e.bitflip == first
    if name not in BIG:
        m = _ours(name)
        assert bitflip_target(m, e.bitflip) is dict(m.named_parameters())[first]
        assert default_bitflip_param(m) == first


def test_bitflip_target_refuses_an_unknown_or_non_float32_name_with_the_list():
    m = _ours("hiddennet2")
    with pytest.raises(ConfigError, match=r"'fc\.weight' does not exist.*conv1\.weight, conv1\.bias, fc1\.weight"):
        bitflip_target(m, "fc.weight")
    m.fc1.bias.data = m.fc1.bias.data.double()
    with pytest.raises(ConfigError, match="is torch.float64, not float32"):
        bitflip_target(m, "fc1.bias")


def test_authors_learning_rate_groups_by_name():
    res = authors_small_lr_names(_ours("resnet10"))
    assert "bn1.weight" in res and "layer0.1.bn2.weight" in res and "fc.bias" in res
    assert "layer1.0.downsample.1.bias" in res and "layer1.0.downsample.1.weight" not in res  # no "bn" in it
    assert "conv1.weight" not in res and "fc.weight" not in res
    vgg = authors_small_lr_names(_ours("vgg11"))
    assert "features.0.bias" in vgg and "features.1.bias" in vgg and "classifier.bias" in vgg
    assert "features.1.weight" not in vgg  # a BN scale, named without "bn": full learning rate
    shuffle = authors_small_lr_names(_ours("shufflenet05"))
    assert "layer1.0.bn5.weight" in shuffle and "layer1.0.conv5.weight" not in shuffle
    tv = authors_small_lr_names(_ours("imagenet_resnet18"))
    assert "layer2.0.bn1.weight" in tv and "layer2.0.downsample.1.weight" not in tv
    assert authors_small_lr_names(_ours("mnistnet")) == {"conv1.bias", "conv2.bias", "fc1.bias", "fc2.bias"}


# --- init draws from the init stream only ---------------------------------------------------------
def _state(m: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for t in m.state_dict().values()]


@pytest.mark.parametrize("name", [n for n in ALL if n not in BIG])
def test_init_draws_only_from_the_given_generator(name):
    e = MODELS[name]
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    a = _state(build(name, e.in_shape, e.num_classes, _g(1)))
    after = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    torch.manual_seed(999)  # another global state: the weights must not notice
    b = _state(build(name, e.in_shape, e.num_classes, _g(1)))
    c = _state(build(name, e.in_shape, e.num_classes, _g(2)))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, c) if x.is_floating_point())


# --- one training step on tiny data of each dataset's shape ----------------------------------------


def _train_step(model: nn.Module, shape, k: int) -> None:
    small = authors_small_lr_names(model)
    groups = [{"params": [p for n, p in model.named_parameters() if n not in small], "lr": 0.1},
              {"params": [p for n, p in model.named_parameters() if n in small], "lr": 0.01}]
    opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(4, *shape, generator=_g(2))
    y = torch.arange(4) % k
    before = _state(model)
    model.train()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    changed = [not torch.equal(a, b) for a, b in zip(before, model.state_dict().values()) if a.is_floating_point()]
    assert all(p.grad is not None for p in model.parameters()) and any(changed)


# Every model trains an epoch on its own dataset's shape through the trainer: tests/test_zoo_train.py.
@pytest.mark.parametrize("name", ["linearnet", "hiddennet1", "hiddennet2", "resnet14", "resnet6", "mnistlinearnet",
                                  "mnisthiddennet1", "mnisthiddennet2", "mnistnet"])
def test_cifar_and_mnist_models_take_digits_input(name):
    m = build(name, (1, 8, 8), 10, _g(1))
    _train_step(m, (1, 8, 8), 10)


def test_every_entry_names_a_family_and_the_init_rule_it_implements():
    from nondet_hpc.run.zoo.build import FAMILY_INIT, entry

    for name, e in REGISTERED.items():
        assert entry(name).init == FAMILY_INIT[e.family] and e.doc and (e.params > 0 or name == "custom")


@pytest.mark.parametrize("name", ["linearnet", "hiddennet2", "mnistnet", "resnet10", "vgg11", "shufflenet05",
                                  "imagenet_resnet18"])
def test_one_step_under_deterministic_algorithms(name):
    """No op without a deterministic implementation (checked on CPU here; the CUDA-only alerts are
    avoided by construction: no adaptive pooling, no 3-D pooling, no index_add)."""
    from nondet_hpc.run.zoo.tv_resnet import GlobalMean

    e = MODELS[name]
    m = build(name, e.in_shape, 5, _g())
    assert not any(isinstance(x, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) for x in m.modules())
    assert name != "imagenet_resnet18" or isinstance(m.avgpool, GlobalMean)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _train_step(m, e.in_shape, 5)
    finally:
        torch.use_deterministic_algorithms(old)


def test_shapes_a_family_cannot_take_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"model=vgg11 on images \[1, 8, 8\].*at least 32 pixels"):
        build("vgg11", (1, 8, 8), 10, _g())
    with pytest.raises(ConfigError, match="not a registered model"):
        build("resnet15", (3, 32, 32), 10, _g())
