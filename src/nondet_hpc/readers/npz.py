"""Your own images as one ``.npz`` archive: ``x_train``, ``y_train``, ``x_test``, ``y_test``.

Images are uint8 (0..255), one of [N, H, W] (grey), [N, H, W, C] (channels last, as most
libraries save them) or [N, C, H, W], with C = 1 or 3; ``layout`` says which when the shape alone
cannot (``auto`` decides when exactly one reading puts 1 or 3 channels in its channel axis).
Labels are integers 0..K-1, one per image. An optional ``class_names`` entry (an array of
strings, K of them) names the classes; without it they are "0".."K-1".

Read with ``allow_pickle=False``: an archive holding an object array (what ``np.savez`` writes
for a list of differently shaped arrays, or anything that is not plain numbers and strings) is
refused, since loading it would run pickle. The zip's members are size-checked before anything
is unpacked.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from ..config import ConfigError
from .common import MAX_FILE_BYTES, ImageArrays, channel_stats, check_labels, check_two_classes, open_regular, sha256_of

KEYS = ("x_train", "y_train", "x_test", "y_test")
LAYOUTS = ("auto", "NHWC", "NCHW")
_FIX = "Write the archive with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...) (docs: data=npz)."


_FINGERPRINTS: dict[tuple, str] = {}


def npz_fingerprint(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> str:
    """SHA-256 of the archive (what ``read_npz(path).info["files"][name]["sha256"]`` will be),
    cached in this process by the file's (path, size, mtime, inode)."""
    path = Path(path).expanduser()
    with open_regular(path, max_bytes) as f:
        st = os.fstat(f.fileno())
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
        if key not in _FINGERPRINTS:
            _FINGERPRINTS[key] = sha256_of(f)
    return _FINGERPRINTS[key]


def _to_nchw(x: np.ndarray, layout: str, where: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim != 4:
        raise ConfigError(f"{where}: images are {x.ndim}-D {x.shape}; expected [N, H, W], [N, H, W, C] or "
                          f"[N, C, H, W]. {_FIX}")
    if layout == "auto":
        last, first = x.shape[3] in (1, 3), x.shape[1] in (1, 3)
        if last == first:
            raise ConfigError(f"{where}: images {x.shape} could be channels-last or channels-first; say which "
                              f"with data.layout=NHWC or data.layout=NCHW.")
        layout = "NHWC" if last else "NCHW"
    out = np.transpose(x, (0, 3, 1, 2)) if layout == "NHWC" else x
    if out.shape[1] not in (1, 3):
        raise ConfigError(f"{where}: images {x.shape} read as {layout} have {out.shape[1]} channels; 1 (grey) or 3 "
                          f"(RGB) are supported. Check data.layout.")
    return np.ascontiguousarray(out)


def _load_members(path: Path, max_bytes: int) -> tuple[dict, str]:
    """Every array in the archive (allow_pickle=False), and the file's SHA-256."""
    with open_regular(path, max_bytes) as f:
        sha = sha256_of(f)
        try:
            with zipfile.ZipFile(f) as z:
                unpacked = sum(i.file_size for i in z.infolist())
        except zipfile.BadZipFile as e:
            raise ConfigError(f"{path} is not an .npz archive ({e}). {_FIX}") from None
        if unpacked > max_bytes:
            raise ConfigError(f"{path} unpacks to {unpacked:,} bytes, over the limit of {max_bytes:,}: check it is "
                              f"the right file, or raise the reader's size limit.")
        f.seek(0)
        arrays = {}
        with np.load(f, allow_pickle=False) as z:
            for key in z.files:
                try:
                    arrays[key] = z[key]
                except ValueError as e:
                    if "allow_pickle" not in str(e):
                        raise ConfigError(f"{path}: entry {key!r} cannot be read ({e}). {_FIX}") from None
                    raise ConfigError(f"{path}: entry {key!r} is an object array, which only pickle can load, and "
                                      f"pickle is never used on data files. Save plain arrays: uint8 images, "
                                      f"integer labels, class names as a str array (np.array(names, dtype=str)); "
                                      f"images of different sizes must be resized to one size first.") from None
    return arrays, sha


def _labels(y: np.ndarray, n: int, key: str, where: str) -> np.ndarray:
    if y.ndim != 1 or len(y) != n or not (np.issubdtype(y.dtype, np.integer) and y.dtype != np.bool_):
        raise ConfigError(f"{where}: {key} is {y.dtype} {y.shape}; expected one integer label per image "
                          f"({n} of them). {_FIX}")
    return y


def read_npz(path: str | Path, num_classes: int | None = None, layout: str = "auto",
             max_bytes: int = MAX_FILE_BYTES) -> ImageArrays:
    """The archive's two splits; ``num_classes`` (if given) bounds the labels, else class_names or max + 1."""
    path = Path(path).expanduser()
    if layout not in LAYOUTS:
        raise ConfigError(f"data.layout={layout!r}: valid values are {list(LAYOUTS)}.")
    arrays, sha = _load_members(path, max_bytes)
    missing = [k for k in KEYS if k not in arrays]
    if missing:
        raise ConfigError(f"{path} has no {', '.join(missing)} (it holds {sorted(arrays)}). {_FIX}")
    xs = {}
    for split in ("train", "test"):
        x = arrays[f"x_{split}"]
        if x.dtype != np.uint8:
            raise ConfigError(f"{path}: x_{split} is {x.dtype}; images must be uint8 0..255 "
                              f"(e.g. np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) for 0..1 floats).")
        xs[split] = _to_nchw(x, layout, f"{path}: x_{split}")
    if xs["train"].shape[1:] != xs["test"].shape[1:]:
        raise ConfigError(f"{path}: training images are [C, H, W] = {list(xs['train'].shape[1:])} but test images "
                          f"{list(xs['test'].shape[1:])}: both splits need one image shape.")
    ys = {s: _labels(arrays[f"y_{s}"], len(xs[s]), f"y_{s}", str(path)) for s in ("train", "test")}
    names = _class_names(arrays, ys, num_classes, path)
    for s in ys:
        ys[s] = check_labels(ys[s], len(names), f"{path}: y_{s}",
                             "Relabel to 0..K-1, or set data.num_classes / class_names to the real number of classes.")
    mean, std = channel_stats(xs["train"])
    info = {"format": "npz", "file": str(path.resolve()), "files": {path.name: {"sha256": sha}},
            "layout": layout, "mean": mean, "std": std}
    return ImageArrays(xs["train"], ys["train"], xs["test"], ys["test"], class_names=names, info=info)


def _class_names(arrays: dict, ys: dict, num_classes: int | None, path: Path) -> list[str]:
    """The class names (index = label): the archive's ``class_names``, else "0".."K-1"."""
    if "class_names" in arrays:
        c = arrays["class_names"]
        if c.ndim != 1 or c.dtype.kind != "U":
            raise ConfigError(f"{path}: class_names is {c.dtype} {c.shape}; expected a 1-D str array "
                              f"(np.array(names, dtype=str)).")
        names = [str(v) for v in c]
        if num_classes is not None and num_classes != len(names):
            raise ConfigError(f"{path}: class_names lists {len(names)} classes but data.num_classes={num_classes}.")
    else:
        k = num_classes if num_classes is not None else max(int(y.max()) + 1 if y.size else 0 for y in ys.values())
        names = [str(i) for i in range(k)]
    check_two_classes(len(names), str(path), "Check the labels (y_train, y_test).")
    return names
