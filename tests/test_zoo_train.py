"""Every model of the authors' list trains one epoch on its dataset through the package's trainer.

Tiny data of each model's dataset shape (CIFAR-10 3x32x32, MNIST 1x28x28, 64x64 image folders for
the ImageNet ResNets; 8 training images, batches of 4 or 8), the registry's init from the init
stream, the authors' learning-rate groups by name, one epoch of run/train.py's Trainer (the same
loop task.py runs: schedule, augmentation, checkpoint), then evaluation. Each model's parameter
count is checked on its dataset against the registry's, which tests/test_zoo_models.py checks
against a re-implementation of the authors' definitions.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from helpers import make_cfg
from nondet_hpc.registry.models import MODELS
from nondet_hpc.run.data import Dataset, settings
from nondet_hpc.run.models import model_for_run
from nondet_hpc.run.sources import Streams, resolve_seeds
from nondet_hpc.run.train import Trainer, small_lr_names
from nondet_hpc.run.views import evaluate_test_set

AUTHORS = [n for n, e in MODELS.items() if n not in ("resnet18b", "resnet34", "custom")]
DATA = {"cifar10": "cifar10", "mnist": "mnist", "imagenet": "folder"}


def _tiny(shape, classes: int, n: int = 8, m: int = 4) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n + m, *shape), generator=g, dtype=torch.uint8)
    y = torch.arange(n + m) % min(classes, 5)
    stats = {"mean": [0.5] * shape[0], "std": [0.25] * shape[0]}  # what a reader gives data=folder
    return Dataset(x[:n], y[:n], x[n:], y[n:], classes, {"name": "tiny", "data_stats": stats})


@pytest.mark.parametrize("name", AUTHORS)
def test_every_authors_model_trains_one_epoch_on_its_dataset(name, tmp_path, monkeypatch):
    e = MODELS[name]
    big = sum(e.in_shape[1:]) * e.params > 64 * 5_000_000  # ResNet-1202, the ImageNet and wide nets
    n = 2 if name == "resnet1202" else 4 if big else 8  # 600 blocks: ~10 s a step on one loaded core
    data = _tiny(e.in_shape, e.num_classes, n=n, m=min(n, 4))
    cfg = make_cfg(tmp_path, f"data={DATA[e.dataset]}", f"model={name}", "source=init", "seed=2", "train.epochs=1",
                   f"train.batch_size={min(n, 4)}", "train.warmup_epochs=0", "data.root=unused")
    dcfg = settings(cfg.data, data)
    seeds = resolve_seeds(list(cfg.source.vary), cfg.seed, cfg.source.deterministic_kernels)
    streams = Streams.from_seeds(seeds)
    model = model_for_run(cfg, e.in_shape, e.num_classes, streams.init)
    assert sum(p.numel() for p in model.parameters()) == e.params  # on the authors' dataset: their count
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setattr(Trainer, "save_checkpoint", lambda self, keep=False: None)  # 1 epoch: nothing to resume from
    trainer = Trainer(model, data, streams, cfg.train, dcfg, torch.device("cpu"), tmp_path / "ckpt.pt")
    small = small_lr_names(model, "authors")
    assert trainer.groups_record["groups"][1]["tensors"] == len(small) > 0  # every model has a bias or BN
    trainer.fit()
    assert (trainer.progress.epoch, trainer.progress.step) == (1, 1 if big else 2)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    logits, feats = evaluate_test_set(model, data, dcfg, ["plain", "flip"], batch_size=4, device=torch.device("cpu"),
                                      channels_last=False, with_features=True)
    m = len(data.test_y)
    assert logits["plain"].shape == logits["flip"].shape == (m, e.num_classes)
    assert feats.shape == (m, model.feature_dim) and OmegaConf.select(cfg, "model.name") == name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", [n for n in AUTHORS if n != "resnet1202"])
def test_gpu_every_authors_model_trains_deterministically_on_cuda(name, tmp_path, monkeypatch):
    """Under the control's switches (deterministic algorithms, cuDNN deterministic) every model
    trains on CUDA (no op without a deterministic kernel), and twice gives the same bits."""
    from nondet_hpc.run.sources import configure_kernels

    e = MODELS[name]
    dev = torch.device("cuda")
    old = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
           torch.backends.cudnn.benchmark)
    configure_kernels(True, dev)
    monkeypatch.setattr(Trainer, "save_checkpoint", lambda self, keep=False: None)
    weights = []
    try:
        for _ in range(2):
            data = _tiny(e.in_shape, e.num_classes).to(dev)
            cfg = make_cfg(tmp_path, f"data={DATA[e.dataset]}", f"model={name}", "source=none", "train.epochs=1",
                           "train.batch_size=4", "train.warmup_epochs=0", "train.device=cuda", "data.root=unused")
            streams = Streams.from_seeds(resolve_seeds([], 1, True))
            model = model_for_run(cfg, e.in_shape, e.num_classes, streams.init)
            Trainer(model, data, streams, cfg.train, settings(cfg.data, data), dev, tmp_path / "c.pt").fit()
            weights.append([p.detach().cpu() for p in model.parameters()])
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old[1], old[2]
    assert all(torch.equal(a, b) for a, b in zip(*weights))
