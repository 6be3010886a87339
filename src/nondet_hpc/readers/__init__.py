"""Torch-free readers of image datasets on disk: MNIST's IDX files, ``.npz`` archives, image folders.

Each reader returns an ``ImageArrays`` (numpy only): uint8 images [N, C, H, W] and int64 labels
for a training and a test split, the class names, and provenance for run.json (every file's
SHA-256, or one manifest digest for a folder of many files). Nothing read executes code (no
pickle: IDX headers are parsed here, ``.npz`` is read with ``allow_pickle=False``, images are
decoded by Pillow), only regular files of bounded size are opened, and nothing is ever written.
A bad file is refused with one ``ConfigError`` saying what is wrong, where, and what to do.

The torch side (run/data.py) turns an ``ImageArrays`` into its ``Dataset`` of tensors.
"""

from .common import ImageArrays
from .folder import folder_fingerprint, read_folder
from .idx import find_mnist_folder, parse_idx, read_mnist
from .npz import npz_fingerprint, read_npz

__all__ = ["ImageArrays", "find_mnist_folder", "folder_fingerprint", "npz_fingerprint", "parse_idx", "read_folder",
           "read_mnist", "read_npz"]
