"""What every reader returns, and the safe way every reader opens a file.

Data folders may be shared: a file there can be a symlink planted to make a reader open
something else, a FIFO that blocks forever, or far larger than any dataset. ``open_regular``
opens without following a final symlink and without blocking, then checks on the open
descriptor (not the name, which could be swapped between a check and the open) that it is a
regular file within the size limit (:mod:`nondet_hpc.safeio`, the one home of that check).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..config import ConfigError
from ..safeio import RefusedFile, RegularFile

#: Largest single file a reader opens by default (MNIST's biggest file is 47 MB unpacked).
MAX_FILE_BYTES = 4 << 30
_CHUNK = 1 << 20


@dataclass
class ImageArrays:
    """A dataset as arrays, in run/data.py's contract: uint8 [N, C, H, W] images, int64 labels."""

    train_x: np.ndarray  # uint8 [N, C, H, W]
    train_y: np.ndarray  # int64 [N], each in 0..num_classes-1
    test_x: np.ndarray  # uint8 [M, C, H, W], same C, H, W as train_x
    test_y: np.ndarray  # int64 [M]
    class_names: list[str]  # index = label
    info: dict = field(default_factory=dict)  # provenance for run.json: format, files' SHA-256, ...

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.train_x.shape[1:])  # type: ignore[return-value]


def open_regular(path: Path, max_bytes: int = MAX_FILE_BYTES) -> BinaryIO:
    """``path`` opened for reading if it is a regular file (not a symlink) of at most ``max_bytes``
    (checked by :class:`nondet_hpc.safeio.RegularFile`, on the open descriptor)."""
    try:
        with RegularFile(path, max_bytes) as f:
            return f.fileobj()
    except RefusedFile as e:
        if e.why == "file missing":
            raise ConfigError(f"{path} does not exist: check data.root (or the file name) and that the dataset "
                              f"was copied completely.") from None
        if e.why.startswith("is a symbolic link") or e.why.startswith("cannot be opened"):
            raise ConfigError(f"{path} could not be opened ({e.why}): a dataset file must be a regular file you "
                              f"can read, not a symlink; copy the real file there.") from None
        if e.why.startswith("is ") and "bytes, more than" in e.why:
            size = e.why.split(" bytes")[0][3:]
            raise ConfigError(f"{path} is {size} bytes, over the limit of {max_bytes:,} for one dataset file: "
                              f"check it is the right file, or raise the reader's size limit.") from None
        raise ConfigError(f"{path} is not a regular file ({e.why}): replace it with the dataset file.") from None


def sha256_of(f: BinaryIO) -> str:
    """SHA-256 of an open file's whole content; the position is left at the start."""
    f.seek(0)
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        h.update(chunk)
    f.seek(0)
    return h.hexdigest()


def read_bytes(path: Path, max_bytes: int = MAX_FILE_BYTES) -> tuple[bytes, str]:
    """(content, SHA-256) of a regular file, read once through ``open_regular``."""
    with open_regular(path, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew after the check
        raise ConfigError(f"{path} grew beyond {max_bytes:,} bytes while it was read: is something writing it?")
    return data, hashlib.sha256(data).hexdigest()


def check_labels(y: np.ndarray, num_classes: int, where: str, fix: str) -> np.ndarray:
    """``y`` as int64 after checking that every label lies in 0..num_classes-1."""
    y = np.asarray(y)
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        pos = int(np.flatnonzero((y < 0) | (y >= num_classes))[0])
        raise ConfigError(f"{where}: label {bad} (at position {pos}) is out of range: labels must lie in "
                          f"0..{num_classes - 1} for {num_classes} classes. {fix}")
    return y.astype(np.int64)


def check_two_classes(num_classes: int, where: str, fix: str) -> None:
    if num_classes < 2:
        raise ConfigError(f"{where}: {num_classes} class(es): a classifier needs at least two. {fix}")


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images [N, C, H, W] on the 0..1 scale (for data.mean/std)."""
    mean, std = [], []
    for c in range(x.shape[1]):
        v = x[:, c].astype(np.float64) / 255.0
        mean.append(round(float(v.mean()), 4) if v.size else 0.0)
        std.append(round(float(v.std()), 4) if v.size else 1.0)
    return mean, std
