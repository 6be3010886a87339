"""data=mnist | npz | folder through the package: load, verify, train, and refuse bad files.

The files are tiny and written here in each real on-disk format (IDX, .npz, PNG folders; the
writers are tests/test_readers.py's). Each bad file is refused by ``task.run`` with one message
and nothing is written: no run folder, no file in the data folder touched. The messages are the
ones docs/models.md quotes. A dataset's content is part of its runs' ids (data.fingerprint).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from nondet_hpc.config import ConfigError, conf_dir
from nondet_hpc.registry.datasets import DATASETS
from nondet_hpc.registry.inputs import resolve_inputs
from nondet_hpc.rundir import run_dir, run_id
from nondet_hpc.run import task
from nondet_hpc.run.data import load_dataset, settings
from data_files import file_tree as _tree, idx_bytes, write_folder, write_mnist, write_png

TINY = ("train.epochs=1", "train.batch_size=4", "train.warmup_epochs=0.5", "train.threads=1", "eval.batch_size=8")


def _npz(path: Path, n=8, m=4, shape=(8, 8, 3), classes=3, **extra) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (n, *shape), dtype=np.uint8), y_train=np.arange(n) % classes,
             x_test=rng.integers(0, 256, (m, *shape), dtype=np.uint8), y_test=np.arange(m) % classes, **extra)
    return path


def _run_json(out: dict) -> dict:
    return json.loads((Path(out["run_dir"]) / "run.json").read_text())


# --- the declarations and the data options agree ---------------------------------------------------
def test_every_data_option_is_declared_with_the_same_values():
    folder = Path(conf_dir()) / "data"
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(DATASETS)
    for name, d in DATASETS.items():
        y = OmegaConf.load(folder / f"{name}.yaml")
        y = y.data if "data" in y else y  # digits sets train keys too (@package _global_)
        assert y.name == name and (y.num_classes, y.channels, y.image_size, y.pad, y.flip) == \
            (d.num_classes, d.channels, d.image_size, d.pad, d.flip), name
        assert (None if y.mean is None else tuple(y.mean)) == d.mean and \
            (None if y.std is None else tuple(y.std)) == d.std, name


# --- load, verify, train -------------------------------------------------------------------------------
def test_mnist_loads_verifies_and_trains(cfg_factory, tmp_path):
    write_mnist(tmp_path / "d" / "MNIST" / "raw", n_train=8, n_test=4)
    cfg = cfg_factory("data=mnist", f"data.root={tmp_path / 'd'}", "model=mnistlinearnet", "source=bitflip", *TINY)
    with pytest.raises(ConfigError, match=r"differs from the published file \(md5\)"):
        task.run(cfg)  # a reduced copy is not MNIST: refused unless data.verify_md5=false
    assert not list((tmp_path / "sweep").glob("runs/*"))
    cfg.data.verify_md5 = False
    out = task.run(cfg)
    rec = _run_json(out)
    assert out["state"] == "done" and rec["data"]["class_names"] == [str(i) for i in range(10)]
    files = rec["data"]["reader"]["files"]
    assert sorted(files) == sorted(f"{n}.gz" for pair in (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                                                             ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
                                   for n in pair)
    assert all(len(f["sha256"]) == 64 and f["md5_ok"] is False for f in files.values())
    # the authors' MNIST pipeline: no augmentation, their normalisation
    assert rec["data"]["used"] == {"num_classes": 10, "channels": 1, "image_size": 28, "mean": [0.1307],
                                   "std": [0.3081], "pad": 0, "flip": False}
    assert rec["bitflip"]["param"] == "fc.weight" and rec["n_parameters"] == 7_850


def test_npz_loads_with_its_class_names_and_trains(cfg_factory, tmp_path):
    path = _npz(tmp_path / "shapes.npz", class_names=np.array(["circle", "square", "star"]))
    cfg = cfg_factory("data=npz", f"data.root={path}", "model=resnet6", "source=init", *TINY)
    out = task.run(cfg)
    rec = _run_json(out)
    data = rec["data"]
    assert data["class_names"] == ["circle", "square", "star"] and data["num_classes"] == 3
    assert data["reader"]["files"]["shapes.npz"]["sha256"] == data["fingerprint"] == cfg.data.fingerprint
    assert data["used"]["channels"] == 3 and data["used"]["image_size"] == 8 and len(data["used"]["mean"]) == 3
    assert data["used"]["pad"] == 4 and data["used"]["flip"] is True  # augmentation keys of data=npz
    saved = OmegaConf.load(Path(out["run_dir"]) / "config.yaml")
    assert saved.data.fingerprint == data["fingerprint"] and saved.data.mean is None  # asked / used


def test_folder_of_64px_images_loads_and_trains_an_imagenet_resnet(cfg_factory, tmp_path):
    root = write_folder(tmp_path / "tiny64", classes=("ant", "bee", "fly"), per_class=2, size=(64, 64))
    cfg = cfg_factory("data=folder", f"data.root={root}", "model=imagenet_resnet18", "source=none", *TINY)
    out = task.run(cfg)
    rec = _run_json(out)
    assert rec["data"]["class_names"] == ["ant", "bee", "fly"] and rec["data"]["image_shape"] == [3, 64, 64]
    assert rec["data"]["reader"]["n_files"] == 9 and rec["data"]["fingerprint"] == cfg.data.fingerprint
    assert np.load(Path(out["run_dir"]) / "logits" / "plain.npy").shape == (3, 3)


def test_the_content_of_npz_and_folder_data_is_part_of_the_run_id(cfg_factory, tmp_path):
    a, b = _npz(tmp_path / "a.npz"), _npz(tmp_path / "b.npz", n=9)
    ids = []
    for path in (a, b):
        cfg = cfg_factory("data=npz", f"data.root={path}")
        resolve_inputs(cfg)
        ids.append(run_id(cfg))
    assert ids[0] != ids[1]
    moved = tmp_path / "moved" / "a.npz"  # moving the data keeps the id (data.root is bookkeeping)
    moved.parent.mkdir()
    moved.write_bytes(a.read_bytes())
    cfg = cfg_factory("data=npz", f"data.root={moved}")
    resolve_inputs(cfg)
    assert run_id(cfg) == ids[0]
    # data changed after the id was made (a job planned by the launcher, run later): refused
    _npz(moved, n=10)
    with pytest.raises(ConfigError, match=r"the data at data.root=.* changed after this run's id was made"):
        task.run(cfg)


def test_settings_fill_what_the_data_decide(tmp_path):
    from omegaconf import OmegaConf

    from nondet_hpc.config import DataConfig

    dcfg = OmegaConf.structured(DataConfig(name="npz", root=str(_npz(tmp_path / "g.npz", shape=(6, 6))),
                                           num_classes=None, channels=None, image_size=None, mean=None, std=None))
    data = load_dataset(dcfg)
    used = settings(dcfg, data)
    assert (used.num_classes, used.channels, used.image_size) == (3, 1, 6) and len(used.mean) == 1
    dcfg.mean = [0.5, 0.5, 0.5]
    with pytest.raises(ConfigError, match=r"data.mean=\[0.5, 0.5, 0.5\] has 3 value\(s\) but the images have 1"):
        settings(dcfg, data)


# --- bad files: one message, nothing written ------------------------------------------------------------
def _truncated_idx(tmp_path):
    folder = tmp_path / "d" / "MNIST" / "raw"
    write_mnist(folder, packed=False)
    p = folder / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    return ["data=mnist", "data.verify_md5=false"], r"is truncated: its header says 6 x 28 x 28 = 4,704 bytes"


def _wrong_magic(tmp_path):
    folder = tmp_path / "d" / "MNIST" / "raw"
    write_mnist(folder, packed=False)
    (folder / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros(6, dtype=np.uint8)))
    return ["data=mnist", "data.verify_md5=false"], r"has magic number 0x00000801 \(2049\), not 0x00000803"


def _object_array(tmp_path):
    path = tmp_path / "d" / "o.npz"
    path.parent.mkdir()
    _npz(path)
    arrays = dict(np.load(path))
    arrays["x_train"] = np.array([np.zeros((8, 8)), np.zeros((4, 4))], dtype=object)
    np.savez(path, **arrays)
    return ["data=npz"], r"entry 'x_train' is an object array, which only pickle can load"


def _one_class(tmp_path):
    write_folder(tmp_path / "d", classes=("cat",))
    return ["data=folder"], r"1 class\(es\): a classifier needs at least two"


def _mixed_sizes(tmp_path):
    root = write_folder(tmp_path / "d")
    write_png(root / "train" / "dog" / "big.png", size=(16, 16))
    return ["data=folder"], r"is 16x16 pixels but .* is 8x8: all images must share one size"


def _label_out_of_range(tmp_path):
    path = tmp_path / "d" / "l.npz"
    path.parent.mkdir()
    _npz(path, class_names=np.array(["a", "b", "c"]))
    arrays = dict(np.load(path))
    arrays["y_train"][3] = 7
    np.savez(path, **arrays)
    return ["data=npz"], r"y_train: label 7 \(at position 3\) is out of range: labels must lie in 0..2 for 3 classes"


@pytest.mark.parametrize("bad", [_truncated_idx, _wrong_magic, _object_array, _one_class, _mixed_sizes,
                                 _label_out_of_range])
def test_bad_files_are_refused_with_one_message_and_nothing_written(cfg_factory, tmp_path, bad):
    overrides, message = bad(tmp_path)
    root = tmp_path / "d"
    data_root = next(root.rglob("*.npz"), root)
    before = _tree(tmp_path / "d")
    cfg = cfg_factory(*overrides, f"data.root={data_root}", "model=linearnet", *TINY)
    with pytest.raises(ConfigError, match=message) as e:
        task.run(cfg)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    assert not list((tmp_path / "sweep").glob("runs/*"))
    assert _tree(tmp_path / "d") == before


def test_npz_and_folder_need_a_root(cfg_factory):
    for name, what in (("npz", "the .npz file"), ("folder", "the folder holding train/<class>/")):
        with pytest.raises(ConfigError, match=f"data={name} needs data.root: {what}"):
            task.run(cfg_factory(f"data={name}"))


def test_run_dir_is_made_only_after_the_data_are_read(cfg_factory, tmp_path):
    """Refusing the data leaves no folder of that run id: not even an empty one."""
    write_folder(tmp_path / "d", classes=("cat",))
    cfg = cfg_factory("data=folder", f"data.root={tmp_path / 'd'}")
    with pytest.raises(ConfigError):
        task.run(cfg)
    with pytest.raises(ConfigError):
        resolve_inputs(cfg)  # the same check the SLURM launcher makes before it submits
    assert not list((tmp_path / "sweep").glob("runs/*"))
    assert cfg.data.fingerprint is None and not run_dir(cfg).exists()
