"""Dataset readers (src/nondet_hpc/readers): MNIST IDX files, .npz archives, image folders.

Every test writes tiny files in the real on-disk format, then reads them; every bad file is
refused with one ConfigError naming what, where and what to do, and no reader writes anything.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from nondet_hpc.config import ConfigError
from nondet_hpc.readers import find_mnist_folder, parse_idx, read_folder, read_mnist, read_npz
from nondet_hpc.readers.common import open_regular
from nondet_hpc.readers.idx import IMAGES_MAGIC, LABELS_MAGIC, MNIST_FILES, MNIST_MD5
from data_files import file_tree as _tree, idx_bytes, write_folder, write_mnist, write_png


# --- MNIST / IDX ---------------------------------------------------------------------------------
@pytest.mark.parametrize("packed", [True, False])
def test_mnist_reads_idx_files_gz_or_raw(tmp_path, packed):
    arrays = write_mnist(tmp_path / "MNIST" / "raw", packed=packed)
    before = _tree(tmp_path)
    d = read_mnist(tmp_path, verify_md5=False)
    assert d.train_x.dtype == np.uint8 and d.train_x.shape == (6, 1, 28, 28) and d.test_x.shape == (4, 1, 28, 28)
    assert np.array_equal(d.train_x[:, 0], arrays["train"][0]) and np.array_equal(d.test_y, arrays["test"][1])
    assert d.train_y.dtype == np.int64 and d.class_names == [str(i) for i in range(10)] and d.num_classes == 10
    assert d.train_x.flags.writeable and d.info["format"] == "idx" and d.info["verify_md5"] is False
    assert d.info["md5_ok"] is False and len(d.info["files"]) == 4
    assert all(len(f["sha256"]) == 64 for f in d.info["files"].values())
    assert _tree(tmp_path) == before


def test_mnist_checksums_are_torchvisions_table():
    torchvision = pytest.importorskip("torchvision")
    assert dict(torchvision.datasets.MNIST.resources) == MNIST_MD5


def test_mnist_folder_search_order(tmp_path):
    for sub in ("mnist", "."):
        write_mnist(tmp_path / sub)
    assert find_mnist_folder(tmp_path) == tmp_path / "mnist"
    with pytest.raises(ConfigError, match=r"MNIST not found under .*train-images-idx3-ubyte\.gz"):
        find_mnist_folder(tmp_path / "empty")


def test_mnist_verify_refuses_a_reduced_copy_and_unpacked_files(tmp_path):
    write_mnist(tmp_path / "a")
    with pytest.raises(ConfigError, match=r"train-images-idx3-ubyte\.gz differs from the published file \(md5\).*"
                                          r"data\.verify_md5=false"):
        read_mnist(tmp_path / "a")
    write_mnist(tmp_path / "b", packed=False)
    with pytest.raises(ConfigError, match="holds the unpacked train-images-idx3-ubyte but not "
                                          r"train-images-idx3-ubyte\.gz: only the published \.gz files"):
        read_mnist(tmp_path / "b")


def _rewrite(folder, name, data, packed=True):
    (folder / (f"{name}.gz" if packed else name)).write_bytes(gzip.compress(data) if packed else data)


@pytest.mark.parametrize("case,message", [
    ("truncated", r"t10k-images-idx3-ubyte\.gz is truncated: its header says 4 x 28 x 28 = 3,136 bytes of data, "
                  r"the file holds 3,000\. Replace it with the published file"),
    ("trailing", r"is longer than its header says"),
    ("header", r"is truncated inside its header \(10 of 16 bytes\)"),
    ("wrong_magic", r"t10k-images-idx3-ubyte\.gz has magic number 0x00000801 \(2049\), not 0x00000803 \(2051\).*"
                    r"images and labels swapped"),
    ("count", r"holds 4 images but t10k-labels-idx1-ubyte 3 labels"),
    ("label", r"t10k-labels-idx1-ubyte: label 12 \(at position 2\) is out of range: labels must lie in 0\.\.9"),
    ("bad_gzip", r"t10k-images-idx3-ubyte\.gz is not a complete gzip file"),
])
def test_bad_idx_files_get_one_clear_message(tmp_path, case, message):
    folder = tmp_path / "MNIST" / "raw"
    arrays = write_mnist(folder)
    x, y = arrays["test"]
    img, lab = MNIST_FILES["test"]
    good = idx_bytes(x)
    if case == "truncated":
        _rewrite(folder, img, good[:16 + 3000])
    elif case == "trailing":
        _rewrite(folder, img, good + b"\0")
    elif case == "header":
        _rewrite(folder, img, good[:10])
    elif case == "wrong_magic":
        _rewrite(folder, img, idx_bytes(y))
    elif case == "count":
        _rewrite(folder, lab, idx_bytes(y[:3]))
    elif case == "label":
        _rewrite(folder, lab, idx_bytes(np.array([1, 2, 12, 3], dtype=np.uint8)))
    elif case == "bad_gzip":
        (folder / f"{img}.gz").write_bytes(gzip.compress(good)[:-20])
    before = _tree(tmp_path)
    with pytest.raises(ConfigError, match=message):
        read_mnist(tmp_path, verify_md5=False)
    assert _tree(tmp_path) == before


def test_parse_idx_header_facts():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(idx_bytes(a), "x", IMAGES_MAGIC), a)
    assert parse_idx(idx_bytes(a[0, 0]), "y", LABELS_MAGIC).tolist() == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="not even the 4-byte IDX magic number"):
        parse_idx(b"\0\0", "x", IMAGES_MAGIC)


# --- npz -----------------------------------------------------------------------------------------
def _npz_arrays(layout="NHWC", n=6, m=4, c=3, side=5, classes=3):
    rng = np.random.default_rng(1)
    shape = {"NHWC": (side, side, c), "NCHW": (c, side, side), "NHW": (side, side)}[layout]
    return {"x_train": rng.integers(0, 256, (n, *shape), dtype=np.uint8), "y_train": np.arange(n) % classes,
            "x_test": rng.integers(0, 256, (m, *shape), dtype=np.uint8), "y_test": np.arange(m) % classes}


@pytest.mark.parametrize("layout,c", [("NHWC", 3), ("NCHW", 3), ("NHW", 1), ("NHWC", 1)])
def test_npz_reads_images_and_labels(tmp_path, layout, c):
    a = _npz_arrays("NHWC" if layout == "NHWC" else layout, c=c)
    np.savez(tmp_path / "d.npz", **a)
    d = read_npz(tmp_path / "d.npz")
    assert d.train_x.shape == (6, c, 5, 5) and d.test_x.shape == (4, c, 5, 5) and d.train_x.dtype == np.uint8
    x = a["x_train"]
    expect = x.transpose(0, 3, 1, 2) if layout == "NHWC" else x[:, None] if layout == "NHW" else x
    assert np.array_equal(d.train_x, expect) and d.train_y.dtype == np.int64
    assert d.class_names == ["0", "1", "2"] and len(d.info["files"]["d.npz"]["sha256"]) == 64
    assert len(d.info["mean"]) == c


def test_npz_class_names_compressed_and_num_classes(tmp_path):
    a = _npz_arrays()
    np.savez_compressed(tmp_path / "d.npz", class_names=np.array(["cat", "dog", "owl", "fox"]), **a)
    d = read_npz(tmp_path / "d.npz")
    assert d.class_names == ["cat", "dog", "owl", "fox"] and d.num_classes == 4
    assert read_npz(tmp_path / "d.npz", num_classes=4).num_classes == 4
    with pytest.raises(ConfigError, match="class_names lists 4 classes but data.num_classes=5"):
        read_npz(tmp_path / "d.npz", num_classes=5)
    np.savez(tmp_path / "e.npz", **_npz_arrays())
    assert read_npz(tmp_path / "e.npz", num_classes=7).class_names == [str(i) for i in range(7)]


def _bad_npz(path, case):
    a = _npz_arrays()
    if case == "object":
        a["x_train"] = np.array([np.zeros((5, 5), np.uint8), np.zeros((4, 4), np.uint8)], dtype=object)
    elif case == "missing":
        del a["y_test"]
    elif case == "float":
        a["x_test"] = a["x_test"].astype(np.float32)
    elif case == "label":
        a["y_train"] = np.array([0, 1, 2, 0, 1, -1])
    elif case == "one_class":
        a["y_train"], a["y_test"] = np.zeros(6, int), np.zeros(4, int)
    elif case == "ambiguous":
        a["x_train"] = np.zeros((6, 3, 5, 3), np.uint8)
        a["x_test"] = np.zeros((4, 3, 5, 3), np.uint8)
    elif case == "shapes":
        a["x_test"] = np.zeros((4, 6, 6, 3), np.uint8)
    elif case == "label_count":
        a["y_test"] = np.arange(3)
    elif case == "not_zip":
        path.write_bytes(b"just text")
        return
    np.savez(path, **a)


@pytest.mark.parametrize("case,message", [
    ("object", r"entry 'x_train' is an object array, which only pickle can load, and pickle is never used"),
    ("missing", r"has no y_test \(it holds \['x_test', 'x_train', 'y_train'\]\)"),
    ("float", r"x_test is float32; images must be uint8 0\.\.255"),
    ("label", r"y_train: label -1 \(at position 5\) is out of range: labels must lie in 0\.\.2"),
    ("one_class", r"1 class\(es\): a classifier needs at least two"),
    ("ambiguous", r"could be channels-last or channels-first; say which with data\.layout=NHWC"),
    ("shapes", r"training images are \[C, H, W\] = \[3, 5, 5\] but test images \[3, 6, 6\]"),
    ("label_count", r"y_test is int64 \(3,\); expected one integer label per image \(4 of them\)"),
    ("not_zip", r"is not an \.npz archive"),
])
def test_bad_npz_files_get_one_clear_message(tmp_path, case, message):
    _bad_npz(tmp_path / "d.npz", case)
    before = _tree(tmp_path)
    with pytest.raises(ConfigError, match=message):
        read_npz(tmp_path / "d.npz")
    assert _tree(tmp_path) == before


def test_npz_label_beyond_num_classes_and_size_limit(tmp_path):
    np.savez(tmp_path / "d.npz", **_npz_arrays(classes=3))
    with pytest.raises(ConfigError, match=r"label 2 \(at position 2\) is out of range: labels must lie in 0\.\.1"):
        read_npz(tmp_path / "d.npz", num_classes=2)
    with pytest.raises(ConfigError, match="over the limit of 100 for one dataset file"):
        read_npz(tmp_path / "d.npz", max_bytes=100)
    with pytest.raises(ConfigError, match=r"data\.layout='HWC'"):
        read_npz(tmp_path / "d.npz", layout="HWC")


# --- opening files safely --------------------------------------------------------------------------
def test_only_regular_files_are_opened(tmp_path):
    np.savez(tmp_path / "real.npz", **_npz_arrays())
    os.symlink(tmp_path / "real.npz", tmp_path / "link.npz")
    with pytest.raises(ConfigError, match="not a symlink"):
        read_npz(tmp_path / "link.npz")
    os.mkfifo(tmp_path / "fifo.npz")
    with pytest.raises(ConfigError, match="is not a regular file"):
        open_regular(tmp_path / "fifo.npz")  # returns at once: opened without blocking
    with pytest.raises(ConfigError, match="does not exist"):
        read_npz(tmp_path / "missing.npz")


# --- image folders -------------------------------------------------------------------------------
def test_folder_decodes_pngs_once_into_uint8_arrays(tmp_path):
    from PIL import Image

    root = write_folder(tmp_path / "data", classes=("dog", "cat", "owl"))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "owl" / "deeper").mkdir()
    write_png(root / "train" / "owl" / "deeper" / "x.png", value=5)
    before = _tree(tmp_path)
    d = read_folder(root)
    assert d.class_names == ["cat", "dog", "owl"]
    assert d.train_x.shape == (7, 3, 8, 8) and d.test_x.shape == (3, 3, 8, 8) and d.train_x.dtype == np.uint8
    assert d.train_y.tolist() == [0, 0, 1, 1, 2, 2, 2] and d.test_y.tolist() == [0, 1, 2]
    first = np.asarray(Image.open(root / "train" / "cat" / "0.png")).transpose(2, 0, 1)
    assert np.array_equal(d.train_x[0], first)
    assert d.info["skipped_files"] == 1 and d.info["n_files"] == 10 and len(d.info["manifest_sha256"]) == 64
    assert _tree(tmp_path) == before
    assert read_folder(root).info["manifest_sha256"] == d.info["manifest_sha256"]
    write_png(root / "test" / "owl" / "0.png", value=99)  # one changed image: a new manifest digest
    assert read_folder(root).info["manifest_sha256"] != d.info["manifest_sha256"]


def test_folder_grey_images_give_one_channel_and_val_is_the_test_split(tmp_path):
    root = write_folder(tmp_path / "g", mode="L", size=(64, 64), test="val")
    d = read_folder(root)
    assert d.train_x.shape == (4, 1, 64, 64) and d.test_x.shape == (2, 1, 64, 64)
    write_png(root / "train" / "cat" / "rgb.png", size=(64, 64), mode="RGB")
    assert read_folder(root).train_x.shape == (5, 3, 64, 64)  # one colour image: all RGB


def _bad_folder(root, case):
    if case == "one_class":
        write_folder(root, classes=("cat",))
    elif case == "mixed_sizes":
        write_folder(root)
        write_png(root / "train" / "dog" / "big.png", size=(9, 8))
    elif case == "too_big":
        write_folder(root, size=(300, 10))
    elif case == "test_extra_class":
        write_folder(root)
        write_png(root / "test" / "emu" / "0.png")
    elif case == "no_test":
        write_folder(root)
        (root / "test").rename(root / "holdout")
    elif case == "corrupt":
        write_folder(root)
        (root / "train" / "cat" / "0.png").write_bytes(b"\x89PNG not really")
    elif case == "symlink":
        write_folder(root)
        os.symlink(root / "train" / "cat" / "0.png", root / "train" / "dog" / "link.png")
    elif case == "wide":
        from PIL import Image

        write_folder(root)
        Image.fromarray(np.full((8, 8), 4000, np.uint16)).save(root / "train" / "cat" / "deep.png")
    elif case == "empty_test":
        write_folder(root)
        for p in (root / "test").rglob("*.png"):
            p.unlink()


@pytest.mark.parametrize("case,message", [
    ("one_class", r"train \(classes found: \['cat'\]\): 1 class\(es\): a classifier needs at least two"),
    ("mixed_sizes", r"big\.png is 9x8 pixels but .*0\.png is 8x8: all images must share one size"),
    ("too_big", r"is 300x10 pixels, over data\.max_side=256"),
    ("test_extra_class", r"has class folder\(s\) \['emu'\] that .*train lacks"),
    ("no_test", r"needs a 'train' and a 'test' \(or 'val'\) subfolder"),
    ("corrupt", r"0\.png is not an image Pillow can read"),
    ("symlink", r"link\.png is a symlink; links inside a data folder are not followed"),
    ("wide", r"deep\.png has mode I;16 \(more than 8 bits per pixel\)"),
    ("empty_test", r"test holds no image files"),
])
def test_bad_folders_get_one_clear_message(tmp_path, case, message):
    root = tmp_path / "data"
    _bad_folder(root, case)
    before = _tree(tmp_path)
    with pytest.raises(ConfigError, match=message):
        read_folder(root)
    assert _tree(tmp_path) == before


def test_folder_total_size_limit(tmp_path):
    root = write_folder(tmp_path / "d")
    with pytest.raises(ConfigError, match=r"6 images of 3x8x8 take 1,152 bytes, over data\.max_bytes=1,000"):
        read_folder(root, max_bytes=1000)


# --- declarations and the torch side ----------------------------------------------------------------
def test_dataset_declarations_name_real_readers_and_the_authors_mnist_facts():
    import nondet_hpc.readers as readers
    from nondet_hpc.registry.datasets import DATASETS

    assert all(callable(getattr(readers, d.reader)) for d in DATASETS.values() if d.reader)
    m = DATASETS["mnist"]  # the authors' data.py: ToTensor + Normalize((0.1307,), (0.3081,)), no augmentation
    assert (m.num_classes, m.channels, m.image_size, m.pad, m.flip, m.mean, m.std) == \
        (10, 1, 28, 0, False, (0.1307,), (0.3081,))


def test_mnist_arrays_feed_the_pipeline_and_train_mnistnet(tmp_path):
    import torch

    from nondet_hpc.run.data import Normalize
    from nondet_hpc.run.zoo import build

    write_mnist(tmp_path, n_train=8)
    d = read_mnist(tmp_path, verify_md5=False)
    x = Normalize([0.1307], [0.3081])(torch.from_numpy(d.train_x))
    model = build("mnistnet", d.image_shape, d.num_classes, torch.Generator().manual_seed(1))
    loss = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(d.train_y))
    loss.backward()
    assert torch.isfinite(loss) and model.conv1.weight.grad is not None
