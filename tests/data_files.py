"""Tiny dataset files in each real on-disk format, written by the tests that read them
(test_readers.py, test_datasets.py): MNIST's IDX files, PNG class folders, and a listing of a
folder to check that nothing was written. A plain helper module, as helpers.py.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from nondet_hpc.readers.idx import MNIST_FILES


def file_tree(root: Path) -> list:
    """Every path below ``root`` with its size and mtime: to check that nothing was written."""
    return sorted((str(p.relative_to(root)), p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*"))


def idx_bytes(a: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0, 0, type 0x08, ndim, big-endian uint32 dims, data."""
    return bytes([0, 0, 0x08, a.ndim]) + b"".join(struct.pack(">I", d) for d in a.shape) + a.tobytes()


def write_mnist(folder, n_train=6, n_test=4, packed=True, side=28, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        img, lab = MNIST_FILES[split]
        x = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        for name, a in ((img, x), (lab, y)):
            data = idx_bytes(a)
            if packed:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        arrays[split] = (x, y)
    return arrays


def write_png(path, size=(8, 8), mode="RGB", value=0):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


def write_folder(root, classes=("cat", "dog"), per_class=2, size=(8, 8), mode="RGB", test="test"):
    for split, n in (("train", per_class), (test, 1)):
        for c in classes:
            for i in range(n):
                write_png(root / split / c / f"{i}.png", size, mode, value=zlib.crc32(f"{split}/{c}/{i}".encode()) % 1000)
    return root
