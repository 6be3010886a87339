"""Datasets as uint8 tensors on the training device, and the batched shuffle/augment pipeline.

No PIL per image and no DataLoader workers (each with seeds of its own): the whole training set
is one uint8 tensor [N, C, H, W]; each epoch's order comes from the shuffle stream and N crop
offsets and flips from the augment stream (PROTOCOL "Sources and seeds"). ``data.augment_draw``
says which image gets the k-th of those N draws (``epoch_augment``):

- ``by_position`` (default, the authors' pipeline): the k-th sample visited. Their per-sample
  transforms consume random numbers in visiting order, so a new shuffle seed also hands every
  image another crop and flip: the "Data Shuffling" source includes augmentation assignment.
- ``by_image``: image k. A new shuffle seed moves an image to another batch but leaves its crop
  and flip in every epoch unchanged: shuffling is order only.

Either way the draws come from the augment stream alone and their number (N per epoch) does not
depend on the order, so no source consumes another's stream.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError

CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
DATASETS = ("digits", "cifar10", "cifar100")


@dataclass
class Dataset:
    train_x: torch.Tensor  # uint8 [N, C, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor  # uint8 [M, C, H, W]
    test_y: torch.Tensor  # int64 [M]
    num_classes: int
    info: dict = field(default_factory=dict)  # provenance for run.json

    def to(self, device: torch.device) -> "Dataset":
        return Dataset(self.train_x.to(device), self.train_y.to(device), self.test_x.to(device),
                       self.test_y.to(device), self.num_classes, self.info)


def _digits(test_size: int) -> tuple:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    # 0..16 grey levels -> 0..255, so every dataset enters the pipeline as uint8 pixels.
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    idx = np.arange(len(x))
    tr, te = train_test_split(idx, test_size=test_size, stratify=d.target, random_state=0)
    tr, te = np.sort(tr), np.sort(te)
    split = f"sklearn train_test_split(test_size={test_size}, stratify=target, random_state=0)"
    return x[tr], d.target[tr], x[te], d.target[te], {"split": split}


def _cifar_loader(name: str):
    """torchvision's CIFAR reader, with the md5 check moved out of the way of subsets.

    torchvision refuses any file whose md5 differs from the official archive, which would also
    refuse the tiny datasets the tests write in the same format; we accept files that parse,
    and record whether they are the official ones (``md5_ok`` in run.json).
    """
    import torchvision

    base = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100

    class Loader(base):  # type: ignore[misc, valid-type]
        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / f).is_file() for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:  # class names are not needed; labels are integers
            self.classes = []

        def md5_ok(self) -> bool:
            from torchvision.datasets.utils import check_integrity
            folder = Path(self.root) / self.base_folder
            return all(check_integrity(str(folder / f), md5) for f, md5 in self.train_list + self.test_list)

    return Loader


def _cifar(name: str, root: str, download: bool) -> tuple:
    loader = _cifar_loader(name)
    root_path = Path(root).expanduser()
    folder = root_path / CIFAR_FOLDERS[name]
    try:
        train = loader(root=str(root_path), train=True, download=download)
        test = loader(root=str(root_path), train=False, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise ConfigError(
            f"{name} not found in {folder.resolve()} ({e}). Put the extracted '{CIFAR_FOLDERS[name]}' "
            f"folder under data.root (now {root!r}), e.g. data.root=/path/to/datasets, or let "
            f"torchvision fetch it with data.download=true (needs internet).") from e
    # torchvision keeps CIFAR as HWC uint8 numpy; we want NCHW.
    to_nchw = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2))  # noqa: E731
    return (to_nchw(train.data), np.asarray(train.targets), to_nchw(test.data),
            np.asarray(test.targets), {"md5_ok": train.md5_ok(), "folder": str(folder.resolve())})


def load_dataset(cfg) -> Dataset:
    """Load ``cfg.data`` (a DataConfig) as CPU tensors, subset as configured."""
    name = cfg.name
    if name == "digits":
        xtr, ytr, xte, yte, extra = _digits(cfg.test_size)
    elif name in CIFAR_FOLDERS:
        xtr, ytr, xte, yte, extra = _cifar(name, cfg.root, cfg.download)
    else:
        raise ConfigError(f"data.name={name!r} is unknown; valid: {list(DATASETS)} (choose with data=NAME).")
    if cfg.train_subset:
        xtr, ytr = xtr[: cfg.train_subset], ytr[: cfg.train_subset]
    if cfg.test_subset:
        xte, yte = xte[: cfg.test_subset], yte[: cfg.test_subset]
    expect = (cfg.channels, cfg.image_size, cfg.image_size)
    if tuple(xtr.shape[1:]) != expect:
        raise ConfigError(f"data.{name}: images are {tuple(xtr.shape[1:])} but data.channels/image_size say "
                          f"{expect}; fix conf/data/{name}.yaml.")
    n_classes = int(max(ytr.max(), yte.max())) + 1
    if n_classes > cfg.num_classes:
        raise ConfigError(f"data.{name}: labels go up to {n_classes - 1} but data.num_classes={cfg.num_classes}.")
    digest = hashlib.sha256()
    for a in (xtr, ytr, xte, yte):
        digest.update(np.ascontiguousarray(a).tobytes())
    info = {"name": name, "n_train": len(xtr), "n_test": len(xte), "num_classes": cfg.num_classes,
            "image_shape": list(expect), "sha256": digest.hexdigest(), **extra}
    return Dataset(torch.from_numpy(np.ascontiguousarray(xtr)), torch.from_numpy(ytr.astype(np.int64)),
                   torch.from_numpy(np.ascontiguousarray(xte)), torch.from_numpy(yte.astype(np.int64)),
                   cfg.num_classes, info)


def epoch_order(n: int, g_shuffle: torch.Generator) -> torch.Tensor:
    """This epoch's permutation of the training set, from the shuffle stream only."""
    return torch.randperm(n, generator=g_shuffle)


@dataclass
class EpochAugment:
    """One epoch's augmentation draws: [N] tensors (indexed by image or by position, see epoch_augment)."""
    dy: torch.Tensor  # int64 [N] in 0..2*pad
    dx: torch.Tensor  # int64 [N] in 0..2*pad
    flip: torch.Tensor  # bool [N]


def draw_augment(n: int, pad: int, flip: bool, g_augment: torch.Generator) -> EpochAugment:
    """Crop offsets and flips for all N images of one epoch, from the augment stream only.

    Always draws the same amount, so the stream's position after an epoch does not depend on the
    config of flips.
    """
    off = torch.randint(0, 2 * pad + 1, (2, n), generator=g_augment)
    f = torch.rand(n, generator=g_augment) < 0.5
    return EpochAugment(dy=off[0], dx=off[1], flip=f if flip else torch.zeros_like(f))


AUGMENT_DRAWS = ("by_position", "by_image")


def epoch_augment(order: torch.Tensor, pad: int, flip: bool, augment_draw: str,
                  g_augment: torch.Generator) -> EpochAugment:
    """One epoch's crop/flip of each training position: entry k is applied to sample ``order[k]``.

    The N draws are the same for both rules (``draw_augment``, from the augment stream); the rule
    only decides who gets draw k. by_position: the k-th sample visited (the authors' coupling of
    shuffle and augmentation). by_image: image ``order[k]`` gets draw ``order[k]``, i.e. its own.
    """
    draws = draw_augment(len(order), pad, flip, g_augment)
    if augment_draw == "by_position":
        return draws
    if augment_draw == "by_image":
        return EpochAugment(dy=draws.dy[order], dx=draws.dx[order], flip=draws.flip[order])
    raise ConfigError(f"data.augment_draw={augment_draw!r}: valid values are {list(AUGMENT_DRAWS)}.")


def augment_batch(x_u8: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
                  pad: int) -> torch.Tensor:
    """Random crop of the zero-padded image plus horizontal flip, for a whole batch, as one gather.

    Equivalent to torchvision's RandomCrop(size, padding=pad) (zero fill) followed by
    RandomHorizontalFlip applied per image: output pixel (i, j) of image b is padded pixel
    (dy_b + i, dx_b + j), or (dy_b + i, dx_b + W-1-j) when flipped.
    """
    b, c, h, w = x_u8.shape
    padded = torch.nn.functional.pad(x_u8, (pad, pad, pad, pad))  # uint8 zeros = black
    dev = x_u8.device
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = dy.to(dev)[:, None] + ar_h[None, :]  # [B, H]
    cols = torch.where(flip.to(dev)[:, None], (w - 1) - ar_w[None, :], ar_w[None, :]) + dx.to(dev)[:, None]
    bi = torch.arange(b, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def training_batches(n: int, batch_size: int):
    """(start, stop) of each batch of an epoch; the last batch keeps the remainder (no drop_last)."""
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
