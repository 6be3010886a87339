"""Datasets as uint8 tensors on the training device, and the batched shuffle/augment pipeline.

No PIL per image and no DataLoader workers (each with seeds of its own): the whole training set
is one uint8 tensor [N, C, H, W]; each epoch's order comes from the shuffle stream and N crop
offsets and flips from the augment stream (docs/study.md "Sources and seeds"). ``data.augment_draw``
says which image gets the k-th of those N draws (``epoch_augment``):

- ``by_position`` (default, the authors' pipeline): the k-th sample visited. Their per-sample
  transforms consume random numbers in visiting order, so a new shuffle seed also hands every
  image another crop and flip: the "Data Shuffling" source includes augmentation assignment.
- ``by_image``: image k. A new shuffle seed moves an image to another batch but leaves its crop
  and flip in every epoch unchanged: shuffling is order only.

Either way the draws come from the augment stream alone and their number (N per epoch) does not
depend on the order, so no source consumes another's stream.

Datasets (registry/datasets.py): digits (scikit-learn), cifar10/cifar100 (their batch files, read
without unpickling code), and through nondet_hpc/readers mnist (IDX files), npz (an archive of
arrays) and folder (class subfolders of small images). The last two take their shape, class
count and normalisation from the data where the config leaves them null; ``settings`` gives the
config with those values filled in, which training and evaluation use (run.json records them).
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError

CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
READERS = ("mnist", "npz", "folder")  # nondet_hpc/readers
DATASETS = ("digits", "cifar10", "cifar100", *READERS)


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


# Globals a CIFAR batch file may name: numpy's array reconstruction and nothing else. The files
# are pickles (the format the dataset ships in); a full unpickler would run whatever code a
# planted file names, so everything outside this list is refused (data folders are shared).
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D102 - pickle API
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch never contains")
        with warnings.catch_warnings():  # numpy 2 warns about the numpy.core alias old pickles name
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _cifar_files(name: str) -> tuple[str, list[tuple[str, str]], list[tuple[str, str]]]:
    """(folder name, [(train file, published md5)], [(test file, md5)]) from torchvision's tables."""
    import torchvision

    base = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    return base.base_folder, [tuple(x) for x in base.train_list], [tuple(x) for x in base.test_list]


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """One batch file -> (uint8 [n, 3072] rows, labels), read without executing anything."""
    if not path.is_file():
        raise ConfigError(f"{path} is missing or not a regular file: the CIFAR folder is incomplete; "
                          f"extract the official archive again into data.root.")
    try:
        with open(path, "rb") as f:
            entry = _ArraysOnlyUnpickler(f, encoding="latin1").load()
        if not isinstance(entry, dict):
            raise pickle.UnpicklingError(f"it holds a {type(entry).__name__}, not a dict")
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
        labels = entry.get("labels", entry.get("fine_labels"))
        data = np.asarray(entry["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels is None \
                or len(labels) != len(data):
            raise pickle.UnpicklingError("its 'data' is not uint8 [n, 3072] with one label per row")
        return data, [int(v) for v in labels]
    except (pickle.UnpicklingError, EOFError, KeyError, AttributeError, ValueError, TypeError, IndexError,
            OSError) as e:
        raise ConfigError(f"{path} is not a CIFAR batch file ({type(e).__name__}: {e}). Replace the folder with "
                          f"the extracted official archive (or data.download=true where there is internet).") from e


def _cifar(name: str, root: str, download: bool, verify_md5: bool) -> tuple:
    from torchvision.datasets.utils import check_integrity

    folder_name, train_files, test_files = _cifar_files(name)
    root_path = Path(root).expanduser()
    folder = root_path / folder_name
    if download and not folder.is_dir():
        import torchvision  # its public dataset class downloads and checks the archive

        base = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        base(root=str(root_path), train=True, download=True)
    if not folder.is_dir():
        raise ConfigError(
            f"{name} not found in {folder.resolve()}. Put the extracted '{folder_name}' folder under "
            f"data.root (now {root!r}), e.g. data.root=/path/to/datasets, or let torchvision fetch it with "
            f"data.download=true (needs internet).")
    md5 = {f: check_integrity(str(folder / f), digest) for f, digest in train_files + test_files}
    if verify_md5 and not all(md5.values()):
        bad = [f for f, ok in md5.items() if not ok]
        raise ConfigError(
            f"{name} in {folder.resolve()}: {', '.join(bad)} differ from the published files (md5). Extract the "
            f"official archive again; only for a deliberately reduced copy (e.g. test data) set "
            f"data.verify_md5=false, which run.json records.")

    def read(files: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        parts = [_read_cifar_batch(folder / f) for f, _ in files]
        rows = np.concatenate([d for d, _ in parts])
        # rows are 1024 R, then G, then B values, row-major
        return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32)), np.asarray([y for _, ys in parts for y in ys])

    (xtr, ytr), (xte, yte) = read(train_files), read(test_files)
    return xtr, ytr, xte, yte, {"md5_ok": all(md5.values()), "verify_md5": bool(verify_md5),
                                "folder": str(folder.resolve())}


def _read_files(cfg) -> tuple:
    """mnist / npz / folder through nondet_hpc/readers; the content checked against the fingerprint
    the run id was made with (registry/inputs.py), so a run never trains on data its id does not name."""
    from .. import readers

    if cfg.name == "mnist":
        arrays = readers.read_mnist(cfg.root, cfg.verify_md5)
    elif cfg.name == "npz":
        arrays = readers.read_npz(cfg.root, cfg.num_classes, cfg.layout, cfg.max_bytes)
    else:
        arrays = readers.read_folder(cfg.root, cfg.max_side, cfg.max_bytes)
    info = dict(arrays.info)
    found = info.get("manifest_sha256") or next(iter(info.get("files", {}).values()), {}).get("sha256")
    want = cfg.get("fingerprint")
    if want is not None and cfg.name != "mnist" and found != want:
        raise ConfigError(f"data.root={cfg.root}: the data changed after this run's id was made (fingerprint "
                          f"{want[:12]}... planned, {str(found)[:12]}... now). Run the command again: the changed "
                          f"data get runs of their own.")
    stats = {k: info.pop(k) for k in ("mean", "std") if k in info}
    extra = {"reader": info, "class_names": list(arrays.class_names), "data_stats": stats}
    if cfg.name != "mnist":
        extra["fingerprint"] = found
    return arrays.train_x, arrays.train_y, arrays.test_x, arrays.test_y, extra


def load_dataset(cfg) -> Dataset:
    """Load ``cfg.data`` (a DataConfig) as CPU tensors, subset as configured. A bad file is refused
    with one ConfigError (what is wrong, where, what to do); nothing is written."""
    name = cfg.name
    if name == "digits":
        xtr, ytr, xte, yte, extra = _digits(cfg.test_size)
    elif name in CIFAR_FOLDERS:
        xtr, ytr, xte, yte, extra = _cifar(name, cfg.root, cfg.download, cfg.verify_md5)
    elif name in READERS:
        xtr, ytr, xte, yte, extra = _read_files(cfg)
    else:
        raise ConfigError(f"data.name={name!r} is unknown; valid: {list(DATASETS)} (choose with data=NAME).")
    if cfg.train_subset:
        xtr, ytr = xtr[: cfg.train_subset], ytr[: cfg.train_subset]
    if cfg.test_subset:
        xte, yte = xte[: cfg.test_subset], yte[: cfg.test_subset]
    shape = tuple(int(v) for v in xtr.shape[1:])
    expect = (cfg.channels, cfg.image_size, cfg.image_size)
    if any(e is not None and e != v for e, v in zip(expect, shape)):
        raise ConfigError(f"data.{name}: images are [C, H, W] = {list(shape)} but data.channels/image_size say "
                          f"{[e if e is not None else 'any' for e in expect]}; fix them (or set them to null to take "
                          f"them from the data).")
    num_classes = cfg.num_classes if cfg.num_classes is not None else len(extra.get("class_names") or [])
    n_classes = int(max(ytr.max(), yte.max())) + 1
    if n_classes > num_classes:
        raise ConfigError(f"data.{name}: labels go up to {n_classes - 1} but data.num_classes={num_classes}.")
    digest = hashlib.sha256()
    for a in (xtr, ytr, xte, yte):
        digest.update(np.ascontiguousarray(a).tobytes())
    info = {"name": name, "n_train": len(xtr), "n_test": len(xte), "num_classes": num_classes,
            "image_shape": list(shape), "sha256": digest.hexdigest(), **extra}
    return Dataset(torch.from_numpy(np.ascontiguousarray(xtr)), torch.from_numpy(ytr.astype(np.int64)),
                   torch.from_numpy(np.ascontiguousarray(xte)), torch.from_numpy(yte.astype(np.int64)),
                   num_classes, info)


def settings(dcfg, data: Dataset) -> DictConfig:
    """``cfg.data`` with what the data decide filled in: num_classes, channels, image_size (None
    for non-square images) and, where null, mean and std (the training split's, per channel).
    Training and evaluation read this; config.yaml keeps what was asked, run.json what was used."""
    out = OmegaConf.create(OmegaConf.to_container(dcfg, resolve=True) if OmegaConf.is_config(dcfg) else dict(dcfg))
    c, h, w = (int(v) for v in data.train_x.shape[1:])
    stats = data.info.get("data_stats", {})
    out.num_classes, out.channels, out.image_size = int(data.num_classes), c, h if h == w else None
    for key in ("mean", "std"):
        if out.get(key) is None:
            if key not in stats:
                raise ConfigError(f"data.{key} is null but the {data.info.get('name')} data give no {key}; set "
                                  f"data.{key}=[...] (one value per channel on the 0..1 scale).")
            out[key] = list(stats[key])
        if len(out[key]) != c:
            raise ConfigError(f"data.{key}={list(out[key])} has {len(out[key])} value(s) but the images have {c} "
                              f"channel(s): one value per channel (or null for the training split's).")
    return out


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


def pad_images(x_u8: torch.Tensor, pad: int) -> torch.Tensor:
    """uint8 [N, C, H, W] -> zero-padded [N, H+2p, W+2p, C] (channels last: one gather reads whole pixels)."""
    padded = torch.nn.functional.pad(x_u8, (pad, pad, pad, pad))  # uint8 zeros = black
    return padded.permute(0, 2, 3, 1).contiguous()


def crop_flip(padded_hwc: torch.Tensor, index: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
              flip: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Crop/flip images ``index`` of a ``pad_images`` tensor: entry k gets (dy[k], dx[k], flip[k]).

    One gather for all k; the result is an [K, C, H, W] view of channels-last storage.
    """
    dev = padded_hwc.device
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = dy.to(dev)[:, None] + ar_h[None, :]  # [K, H]
    cols = torch.where(flip.to(dev)[:, None], (w - 1) - ar_w[None, :], ar_w[None, :]) + dx.to(dev)[:, None]
    out = padded_hwc[index.to(dev)[:, None, None], rows[:, :, None], cols[:, None, :]]  # [K, H, W, C]
    return out.permute(0, 3, 1, 2)


class EpochImages:
    """The training set padded once; each epoch's augmented images in visiting order, made at once.

    ``epoch(order, aug)`` returns the uint8 images of all N positions of the epoch (entry k is image
    ``order[k]`` with draw k of ``aug``) and their labels, so a batch is a slice: no per-batch pad,
    gather or index. Pixel for pixel what torchvision's RandomCrop(size, padding=pad) (zero fill) and
    RandomHorizontalFlip give each image with its draw (integer copies only; tests/test_models_data.py
    checks one image at a time, tests/test_train_step.py the per-batch gather it replaced, both
    augment_draw rules).
    """

    def __init__(self, x_u8: torch.Tensor, y: torch.Tensor, pad: int, memory_format: torch.memory_format):
        self.h, self.w = x_u8.shape[2], x_u8.shape[3]
        self.padded = pad_images(x_u8, pad)
        self.y, self.memory_format = y, memory_format

    def epoch(self, order: torch.Tensor, aug: "EpochAugment") -> tuple[torch.Tensor, torch.Tensor]:
        x = crop_flip(self.padded, order, aug.dy, aug.dx, aug.flip, self.h, self.w)
        return x.contiguous(memory_format=self.memory_format), self.y[order.to(self.y.device)]


def training_batches(n: int, batch_size: int):
    """(start, stop) of each batch of an epoch; the last batch keeps the remainder (no drop_last)."""
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


# --- preprocessing (train and test) ---------------------------------------------------------
class Normalize:
    """``normalize`` with its per-channel mean/std tensors made once, on one device.

    The Trainer calls it every batch: building the tensors from Python lists there would copy
    them host-to-device (a blocking copy on CUDA) twice per step.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"):
        c = len(mean)
        if len(std) != c:
            raise ValueError(f"mean/std need one value per channel, got {len(mean)}/{len(std)}")
        self.channels = c
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, c, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, c, 1, 1)

    def __call__(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> float32 ``(x/255 - mean_c) / std_c`` (docs/study.md, Training: test
        images are only normalised).

        Same float32 operations, in the same order, as torchvision's ToTensor + Normalize, so test
        inputs match the training pipeline bit for bit.
        """
        if images_u8.dtype != torch.uint8 or images_u8.dim() != 4:
            raise ValueError(
                f"expected uint8 images [B, C, H, W], got {images_u8.dtype} {tuple(images_u8.shape)}"
            )
        if images_u8.shape[1] != self.channels:
            raise ValueError(f"mean/std need {images_u8.shape[1]} values (one per channel), got {self.channels}")
        return images_u8.to(torch.float32).div(255).sub(self.mean).div(self.std)


def normalize(
    images_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 ``(x/255 - mean_c) / std_c``, mean/std made for this call
    (see ``Normalize`` for the exact operations; loops use a ``Normalize`` made once)."""
    if images_u8.dtype != torch.uint8 or images_u8.dim() != 4:
        raise ValueError(
            f"expected uint8 images [B, C, H, W], got {images_u8.dtype} {tuple(images_u8.shape)}"
        )
    c = images_u8.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std need {c} values (one per channel), got {len(mean)}/{len(std)}")
    return Normalize(mean, std, images_u8.device)(images_u8)
