"""Every dataset a run can load (data=NAME), with its defaults; the readers in nondet_hpc/readers
add mnist, npz and folder to the built-in digits, cifar10 and cifar100 (run/data.py).

Torch-free declarations, one per dataset, in DataConfig's terms (nondet_hpc/config.py). ``None``
means "from the data": the shape and the class count are read from the files (and checked against
the config when it sets them), the normalisation is the training split's per-channel mean and
standard deviation (readers put them in ``info["mean"]``/``info["std"]``; run.json records them).

- mnist: the authors' MNIST loader (their data.py) converts to tensors and normalises with
  mean 0.1307, std 0.3081, and applies NO augmentation (no crop, no flip): pad 0, flip false.
  60,000 training and 10,000 test images, 10 classes, 1x28x28.
- npz, folder: the researcher's images. Augmentation as CIFAR's (a random crop of the image
  zero-padded by 4 pixels, random horizontal flip): our choice, the authors had no such data.
  Normalisation from the training split (grey or RGB alike). Their ImageNet pipeline (random
  resized crops to 224) is out of scope; for a folder of RGB photos, ImageNet's statistics
  (``IMAGENET_MEAN``/``IMAGENET_STD``, their ImageNet loader's) are the fixed alternative.

conf/data/<name>.yaml holds the same values as the option Hydra composes (tests/test_datasets.py
checks that they agree); ``--help``, README and docs/models.md list the datasets from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetDefaults:
    name: str  # data=NAME
    reader: Optional[str]  # nondet_hpc.readers function that loads it; None: built into run/data.py
    num_classes: Optional[int]  # None: from the data
    channels: Optional[int]  # None: from the data
    image_size: Optional[int]  # None: from the data (images are square or the config says otherwise)
    pad: int  # training crop: zero-pad by this many pixels, crop back (0 = no crop)
    flip: bool  # training augmentation: random horizontal flip with p = 0.5
    mean: Optional[tuple[float, ...]]  # per channel on the 0..1 scale; None: the training split's
    std: Optional[tuple[float, ...]]
    doc: str


DATASETS: dict[str, DatasetDefaults] = {d.name: d for d in (
    DatasetDefaults("digits", None, 10, 1, 8, 1, True, (0.3053,), (0.3759,),
                    "scikit-learn's 1,797 handwritten 8x8 digits, shipped in the wheel: the default, offline, CPU"),
    DatasetDefaults("cifar10", None, 10, 3, 32, 4, True, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                    "CIFAR-10 (cifar-10-batches-py under data.root, md5-checked): the paper's dataset"),
    DatasetDefaults("cifar100", None, 100, 3, 32, 4, True, (0.4914, 0.4822, 0.4465),
                    (0.2023, 0.1994, 0.2010), "CIFAR-100, fine labels (cifar-100-python under data.root)"),
    DatasetDefaults("mnist", "read_mnist", 10, 1, 28, 0, False, (0.1307,), (0.3081,),
                    "MNIST from its four IDX files under data.root (published .gz files, md5-checked)"),
    DatasetDefaults("npz", "read_npz", None, None, None, 4, True, None, None,
                    "your images: one .npz with x_train, y_train, x_test, y_test (uint8 images, integer labels)"),
    DatasetDefaults("folder", "read_folder", None, None, None, 4, True, None, None,
                    "your images: ROOT/train/<class>/*.png and ROOT/test/<class>/*.png, one small size"),
)}
