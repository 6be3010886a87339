"""MNIST from its four IDX files, parsed here (header, dimensions, sizes), gzip or raw.

IDX (the format MNIST is published in): two zero bytes, one byte naming the element type
(0x08 = unsigned byte), one byte with the number of dimensions, then each dimension as a
big-endian uint32, then the elements in row-major order. MNIST's image files therefore start
with the magic number 0x00000803 (2051: uint8, 3 dimensions [N, 28, 28]) and its label files with
0x00000801 (2049: uint8, 1 dimension [N]).

Checksums: the published files are the four ``.gz`` archives, whose MD5s are listed below (the
same table torchvision's MNIST class checks; tests/test_readers.py compares the two). A folder
holding only unpacked files cannot be compared with them: with ``verify_md5`` on, the reader asks
for the ``.gz`` files; ``verify_md5=False`` is for deliberately reduced copies (test data) and is
recorded in the provenance. The authors' MNIST loader applies no augmentation (no crop, no flip)
and normalises with mean 0.1307, std 0.3081.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from pathlib import Path

import numpy as np

from ..config import ConfigError
from .common import ImageArrays, check_labels, read_bytes

IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801

#: The four published files: split -> (images file, labels file), names without ``.gz``.
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

#: MD5 of each published ``.gz`` file.
MNIST_MD5 = {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}

MNIST_CLASSES = [str(d) for d in range(10)]
#: Largest unpacked IDX file accepted (MNIST's training images: 47,040,016 bytes).
MAX_IDX_BYTES = 1 << 30
_FIX = "Replace it with the published file (or extract the official archive again into data.root)."


def parse_idx(buf: bytes, where: str, magic: int) -> np.ndarray:
    """The uint8 array an IDX file holds, after checking its header against ``magic``.

    ``magic`` fixes the element type (uint8) and the number of dimensions; the dimensions in the
    header must account for every byte that follows it, no more and no less.
    """
    ndim = magic & 0xFF
    if len(buf) < 4:
        raise ConfigError(f"{where} is truncated: {len(buf)} bytes, not even the 4-byte IDX magic number. {_FIX}")
    found = int.from_bytes(buf[:4], "big")
    if found != magic:
        raise ConfigError(f"{where} has magic number 0x{found:08X} ({found}), not 0x{magic:08X} ({magic}) of an "
                          f"IDX file of uint8 with {ndim} dimension(s): it is not the file its name says "
                          f"(images and labels swapped, or not IDX at all). {_FIX}")
    head = 4 + 4 * ndim
    if len(buf) < head:
        raise ConfigError(f"{where} is truncated inside its header ({len(buf)} of {head} bytes). {_FIX}")
    dims = [int.from_bytes(buf[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expect = int(np.prod(dims, dtype=np.int64))
    body = len(buf) - head
    if body != expect:
        state = "truncated" if body < expect else "longer than its header says"
        raise ConfigError(f"{where} is {state}: its header says {' x '.join(map(str, dims))} = {expect:,} bytes "
                          f"of data, the file holds {body:,}. {_FIX}")
    return np.frombuffer(buf, dtype=np.uint8, offset=head).reshape(dims).copy()  # writable, own memory


def find_mnist_folder(root: str | Path) -> Path:
    """The folder holding MNIST's files under ``root``: torchvision's layout ``MNIST/raw``, then
    ``mnist``, then ``root`` itself (the first that holds the training images, packed or not)."""
    root = Path(root).expanduser()
    probe = MNIST_FILES["train"][0]
    for folder in (root / "MNIST" / "raw", root / "mnist", root):
        if (folder / f"{probe}.gz").exists() or (folder / probe).exists():
            return folder
    raise ConfigError(f"MNIST not found under {root.resolve()}: put the four published files "
                      f"({', '.join(MNIST_MD5)}) in {root / 'MNIST' / 'raw'} (torchvision's layout), "
                      f"{root / 'mnist'} or data.root itself.")


def _unpack(data: bytes, path: Path) -> bytes:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as z:
            out = z.read(MAX_IDX_BYTES + 1)
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ConfigError(f"{path} is not a complete gzip file ({type(e).__name__}: {e}). {_FIX}") from None
    if len(out) > MAX_IDX_BYTES:
        raise ConfigError(f"{path} unpacks to more than {MAX_IDX_BYTES:,} bytes: it is not an MNIST file. {_FIX}")
    return out


def _read_one(folder: Path, name: str, magic: int, verify_md5: bool, files: dict) -> np.ndarray:
    """One IDX array; records its file's SHA-256 (and MD5 check) in ``files``."""
    packed, raw = folder / f"{name}.gz", folder / name
    if packed.exists():
        data, sha = read_bytes(packed, MAX_IDX_BYTES)
        md5_ok = hashlib.md5(data).hexdigest() == MNIST_MD5[packed.name]
        if verify_md5 and not md5_ok:
            raise ConfigError(f"{packed} differs from the published file (md5). Download or copy it again; only for "
                              f"a deliberately reduced copy (e.g. test data) set data.verify_md5=false, which run.json "
                              f"records.")
        files[packed.name] = {"sha256": sha, "md5_ok": md5_ok}
        return parse_idx(_unpack(data, packed), str(packed), magic)
    if not raw.exists():
        raise ConfigError(f"{folder} has no {name}.gz or {name}: the MNIST folder is incomplete; it needs the four "
                          f"files {', '.join(MNIST_MD5)}.")
    if verify_md5:
        raise ConfigError(f"{folder} holds the unpacked {name} but not {name}.gz: only the published .gz files "
                          f"have checksums to verify. Put the .gz files there (torchvision keeps both), or set "
                          f"data.verify_md5=false for a copy you trust, which run.json records.")
    data, sha = read_bytes(raw, MAX_IDX_BYTES)
    files[raw.name] = {"sha256": sha, "md5_ok": None}
    return parse_idx(data, str(raw), magic)


def read_mnist(root: str | Path, verify_md5: bool = True) -> ImageArrays:
    """MNIST's training and test splits from the IDX files under ``root`` (see find_mnist_folder)."""
    folder = find_mnist_folder(root)
    files: dict = {}
    split = {}
    for part, (img_name, lab_name) in MNIST_FILES.items():
        x = _read_one(folder, img_name, IMAGES_MAGIC, verify_md5, files)
        y = _read_one(folder, lab_name, LABELS_MAGIC, verify_md5, files)
        if len(x) != len(y):
            raise ConfigError(f"{folder}: {img_name} holds {len(x):,} images but {lab_name} {len(y):,} labels: the "
                              f"two files come from different copies. {_FIX}")
        y = check_labels(y, len(MNIST_CLASSES), f"{folder / lab_name}", _FIX)
        split[part] = (np.ascontiguousarray(x[:, None, :, :]), y)
    if split["train"][0].shape[1:] != split["test"][0].shape[1:]:
        raise ConfigError(f"{folder}: training images are {split['train'][0].shape[2:]} but test images "
                          f"{split['test'][0].shape[2:]}: the files come from different datasets. {_FIX}")
    info = {"format": "idx", "folder": str(folder.resolve()), "files": files, "verify_md5": bool(verify_md5),
            "md5_ok": all(f["md5_ok"] is True for f in files.values())}
    return ImageArrays(*split["train"], *split["test"], class_names=list(MNIST_CLASSES), info=info)
