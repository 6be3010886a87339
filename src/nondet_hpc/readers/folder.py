"""Your own images as class subfolders: ``ROOT/train/<class>/...`` and ``ROOT/test/<class>/...``.

The layout torchvision's ImageFolder reads: each class is a subfolder (sorted names give the labels
0..K-1, taken from the training split; the test split may lack a class but may not add one), and
every file below it (at any depth) with an image extension is one image; other files are skipped
and counted. The test split is ``test`` or, if there is none, ``val``. ImageNet at full scale is
not this reader's job: images must already share one small size (e.g. 64x64, Tiny ImageNet's
size); nothing is resized or cropped here.

Every image is decoded once, by Pillow, into one uint8 array [N, C, H, W]: grey (C = 1) when every
image is greyscale, else RGB (C = 3: palette images are expanded, an alpha channel is dropped).
Limits keep a wrong ROOT (a photo collection, a whole disk) from filling memory: each image's side
at most ``max_side`` pixels (checked from the header before decoding), all images together at
most ``max_bytes``. Symlinks inside ROOT are refused, not followed.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import numpy as np

from ..config import ConfigError
from .common import ImageArrays, channel_stats, check_two_classes, read_bytes

#: Image file extensions (torchvision ImageFolder's list), compared in lower case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
GREY_MODES = ("1", "L", "LA")
#: Modes whose values do not fit 8 bits: converting them would clip silently, so they are refused.
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "F")
MAX_SIDE = 256
MAX_BYTES = 2 << 30
MAX_IMAGE_FILE = 64 << 20
_LAYOUT = "ROOT/train/<class>/<images> and ROOT/test/<class>/<images> (or ROOT/val/...)"


def _entries(folder: Path) -> list[os.DirEntry]:
    """Non-hidden entries of ``folder``, sorted by name; a symlink is refused."""
    with os.scandir(folder) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    for e in entries:
        if e.is_symlink():
            raise ConfigError(f"{e.path} is a symlink; links inside a data folder are not followed. Replace it "
                              f"with the real file or folder.")
    return entries


def _image_files(class_dir: Path) -> tuple[list[Path], int]:
    """Image files below ``class_dir`` (any depth, sorted by relative path) and the count skipped."""
    files, skipped, stack = [], 0, [class_dir]
    while stack:
        for e in _entries(stack.pop()):
            if e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
            elif e.is_file(follow_symlinks=False) and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                files.append(Path(e.path))
            else:
                skipped += 1
    return sorted(files, key=lambda p: p.relative_to(class_dir).as_posix()), skipped


def _split_dirs(root: Path) -> tuple[Path, Path]:
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder: data.root must hold {_LAYOUT}.")
    train = root / "train"
    test = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not train.is_dir() or test is None:
        raise ConfigError(f"{root} needs a 'train' and a 'test' (or 'val') subfolder: {_LAYOUT}.")
    for d in (train, test):
        if stat.S_ISLNK(os.lstat(d).st_mode):
            raise ConfigError(f"{d} is a symlink; links inside a data folder are not followed. Point data.root at "
                              f"the real folder.")
    return train, test


def _classes(split_dir: Path) -> list[str]:
    return [e.name for e in _entries(split_dir) if e.is_dir(follow_symlinks=False)]


def _listing(root: Path) -> tuple[list[str], dict, int]:
    """(class names, split -> [(file, label)], files skipped), with the class checks."""
    train_dir, test_dir = _split_dirs(root)
    names = _classes(train_dir)
    check_two_classes(len(names), f"{train_dir} (classes found: {names})",
                      f"Put one subfolder per class there: {_LAYOUT}.")
    extra = sorted(set(_classes(test_dir)) - set(names))
    if extra:
        raise ConfigError(f"{test_dir} has class folder(s) {extra} that {train_dir} lacks: a test label the model "
                          f"never trained on would be out of range. Add them to train or remove them from "
                          f"{test_dir.name}.")
    listing, skipped = {}, 0
    for split, d in (("train", train_dir), ("test", test_dir)):
        items = []
        for label, name in enumerate(names):
            if (d / name).is_dir():
                files, n_skip = _image_files(d / name)
                items += [(f, label) for f in files]
                skipped += n_skip
        if not items:
            raise ConfigError(f"{d} holds no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class folders.")
        listing[split] = items
    return names, listing, skipped


def _open_image(path: Path):
    """(bytes, SHA-256, Pillow image with only its header read)."""
    from PIL import Image, UnidentifiedImageError

    data, sha = read_bytes(path, MAX_IMAGE_FILE)
    try:
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ConfigError(f"{path} is not an image Pillow can read ({type(e).__name__}): remove it or replace "
                          f"it with a valid image.") from None
    return sha, im


def _survey(listing: dict, max_side: int) -> tuple[tuple[int, int], int]:
    """One pass over the headers: the common (width, height) and the channel count (1 or 3)."""
    size, first, grey = None, None, True
    for items in listing.values():
        for path, _ in items:
            _, im = _open_image(path)
            if max(im.size) > max_side:
                raise ConfigError(f"{path} is {im.size[0]}x{im.size[1]} pixels, over data.max_side={max_side}: "
                                  f"this reader is for small images; resize the dataset (e.g. to 64x64) first.")
            if im.mode in WIDE_MODES:
                raise ConfigError(f"{path} has mode {im.mode} (more than 8 bits per pixel): convert the dataset "
                                  f"to 8-bit PNG/JPEG first; values would otherwise be clipped silently.")
            if size is None:
                size, first = im.size, path
            elif im.size != size:
                raise ConfigError(f"{path} is {im.size[0]}x{im.size[1]} pixels but {first} is {size[0]}x{size[1]}: "
                                  f"all images must share one size; resize them first (nothing is resized here).")
            grey = grey and im.mode in GREY_MODES
    return size, 1 if grey else 3  # type: ignore[return-value]


def _decode(items: list, size: tuple[int, int], channels: int, hashes: list) -> tuple[np.ndarray, np.ndarray]:
    w, h = size
    x = np.empty((len(items), channels, h, w), dtype=np.uint8)
    for i, (path, _) in enumerate(items):
        sha, im = _open_image(path)
        px = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
        if px.shape[:2] != (h, w):  # the header changed between the passes
            raise ConfigError(f"{path} changed while the dataset was read: is something writing the folder?")
        x[i] = px[None] if channels == 1 else px.transpose(2, 0, 1)
        hashes.append((path, sha))
    return x, np.array([label for _, label in items], dtype=np.int64)


def _manifest(root: Path, hashes: list) -> str:
    """The folder's identity: SHA-256 over each file's path (relative to ROOT) and SHA-256."""
    lines = "".join(f"{p.relative_to(root).as_posix()}\t{sha}\n" for p, sha in hashes)
    return hashlib.sha256(lines.encode()).hexdigest()


_FINGERPRINTS: dict[tuple, str] = {}


def folder_fingerprint(root: str | Path) -> str:
    """What ``read_folder(root).info["manifest_sha256"]`` will be, without decoding an image: the
    layout is checked (classes, splits, links) and every listed file hashed. Cached in this process
    by each file's (path, size, mtime), so a sweep of many runs hashes the folder once."""
    root = Path(root).expanduser().resolve()
    _, listing, _ = _listing(root)
    files = [path for items in listing.values() for path, _ in items]
    key = (str(root), *((str(p), st.st_size, st.st_mtime_ns) for p in files for st in [os.stat(p)]))
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = _manifest(root, [(p, read_bytes(p, MAX_IMAGE_FILE)[1]) for p in files])
    return _FINGERPRINTS[key]


def read_folder(root: str | Path, max_side: int = MAX_SIDE, max_bytes: int = MAX_BYTES) -> ImageArrays:
    """The folder's training and test images (see the module docstring for layout and limits)."""
    root = Path(root).expanduser().resolve()
    names, listing, skipped = _listing(root)
    size, channels = _survey(listing, max_side)
    n = sum(len(v) for v in listing.values())
    total = n * channels * size[0] * size[1]
    if total > max_bytes:
        raise ConfigError(f"{root}: {n:,} images of {channels}x{size[1]}x{size[0]} take {total:,} bytes, over "
                          f"data.max_bytes={max_bytes:,}: use fewer or smaller images, or raise the limit if the "
                          f"machine has the memory.")
    hashes: list = []
    (xtr, ytr), (xte, yte) = (_decode(listing[s], size, channels, hashes) for s in ("train", "test"))
    mean, std = channel_stats(xtr)
    info = {"format": "folder", "folder": str(root), "n_files": len(hashes), "skipped_files": skipped,
            "manifest_sha256": _manifest(root, hashes), "mean": mean, "std": std}
    return ImageArrays(xtr, ytr, xte, yte, class_names=names, info=info)
