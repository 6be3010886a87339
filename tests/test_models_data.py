"""Architectures, weight init, the batched augmentation, the LR schedule and the CIFAR loader."""

import pickle
import math

import numpy as np
import pytest
import torch

from nondet_hpc.run.data import crop_flip, draw_augment, load_dataset, pad_images, training_batches
from nondet_hpc.run.models import BasicBlock, ShortcutA, build_model, init_weights
from nondet_hpc.config import ConfigError
from nondet_hpc.run.train import lr_factor, param_groups


def _resnet(name, widths, blocks, shortcut, classes=10, ch=3):
    m = build_model(name, classes, ch, widths=widths, blocks=blocks, shortcut=shortcut)
    init_weights(m, torch.Generator().manual_seed(0))
    return m


def test_resnet14_matches_the_protocol():
    m = _resnet("resnet14", [16, 32, 64], [2, 2, 2], "A")
    assert m.conv1.weight.shape == (16, 3, 3, 3) and m.conv1.weight.numel() == 432
    blocks = [b for b in m.modules() if isinstance(b, BasicBlock)]
    assert len(blocks) == 6
    assert [b.conv1.stride[0] for b in blocks] == [1, 1, 2, 1, 2, 1]
    assert sum(isinstance(b.shortcut, ShortcutA) for b in blocks) == 2
    assert all(float(b.bn2.weight.detach().abs().sum()) == 0 for b in blocks)  # zero-init residual BN
    assert all(float(b.bn1.weight.detach().min()) == 1 for b in blocks)
    assert m.fc.in_features == 64 and m.fc.out_features == 10
    # no conv has a bias; a 3x3 conv's kaiming fan_out std is sqrt(2 / (out * 9))
    w = blocks[-1].conv1.weight
    assert abs(float(w.std()) - math.sqrt(2 / (64 * 9))) < 0.01
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert m.forward_features(torch.zeros(2, 3, 32, 32)).shape == (2, 64)


def test_option_a_shortcut_subsamples_normalises_and_pads_zero_channels():
    sc = ShortcutA(16, 32, 2).eval()
    x = torch.randn(2, 16, 8, 8)
    y = sc(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 16:], torch.zeros(2, 16, 4, 4))
    # eval-mode BN with fresh stats: (x - 0) / sqrt(1 + eps)
    assert torch.allclose(y[:, :16], x[:, :, ::2, ::2] / math.sqrt(1 + 1e-5))


@pytest.mark.parametrize("name,blocks,params_m", [("resnet18b", [2, 2, 2, 2], 11.17), ("resnet34", [3, 4, 6, 3], 21.28)])
def test_resnet18_34_block_counts_and_size(name, blocks, params_m):
    m = _resnet(name, [64, 128, 256, 512], blocks, "B")
    assert len([b for b in m.modules() if isinstance(b, BasicBlock)]) == sum(blocks)
    assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - params_m) < 0.05


def test_digits_input_gives_a_1_channel_stem():
    m = _resnet("resnet14", [16, 32, 64], [2, 2, 2], "A", ch=1)
    assert m.conv1.weight.numel() == 144 and m(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_init_depends_on_the_generator_only():
    a = _resnet("resnet14", [16, 32, 64], [2, 2, 2], "A").state_dict()
    torch.manual_seed(99)  # the global RNG must not matter
    b = _resnet("resnet14", [16, 32, 64], [2, 2, 2], "A").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = build_model("resnet14", 10, 3)
    init_weights(c, torch.Generator().manual_seed(1))
    assert not torch.equal(a["conv1.weight"], c.state_dict()["conv1.weight"])


def test_crop_flip_equals_pad_crop_flip_per_image():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (6, 3, 5, 7), generator=g, dtype=torch.uint8)
    aug = draw_augment(6, 2, True, g)
    out = crop_flip(pad_images(x, 2), torch.arange(6), aug.dy, aug.dx, aug.flip, 5, 7)
    for i in range(6):
        padded = np.zeros((3, 9, 11), np.uint8)
        padded[:, 2:7, 2:9] = x[i].numpy()
        crop = padded[:, aug.dy[i]:aug.dy[i] + 5, aug.dx[i]:aug.dx[i] + 7]
        if aug.flip[i]:
            crop = crop[:, :, ::-1]
        assert np.array_equal(out[i].numpy(), crop)


def test_augment_without_flip_and_center_offset_is_identity():
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    c = torch.full((4,), 1)
    assert torch.equal(crop_flip(pad_images(x, 1), torch.arange(4), c, c, torch.zeros(4, dtype=torch.bool), 8, 8), x)
    aug = draw_augment(1000, 4, False, torch.Generator().manual_seed(0))
    assert not aug.flip.any() and aug.dy.min() == 0 and aug.dy.max() == 8


def test_last_batch_keeps_the_remainder():
    assert training_batches(10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 500, 1, 3) == 0
    assert lr_factor(1.5, 500, 1, 3) == pytest.approx(0.5)
    # the warm-up includes its last step (the authors' `epoch <= warmup`): exactly the peak there
    assert lr_factor(3, 500, 1, 3) == 1.0
    # right after warm-up the cosine is evaluated at the absolute epoch (not offset by warm-up)
    assert lr_factor(3.01, 500, 1, 3) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3.01 / 500)))
    assert lr_factor(250, 500, 1, 3) == pytest.approx(0.5)
    assert lr_factor(499.999, 500, 1, 3) == pytest.approx(0, abs=1e-9)


def test_snapshot_cycles_restart_warmup_and_decay_to_zero():
    for c in range(5):
        start = 100 * c
        assert lr_factor(start, 500, 5, 3) == 0  # each cycle starts from 0
        assert lr_factor(start + 3, 500, 5, 3) == 1.0  # inclusive warm-up in every cycle
        assert lr_factor(start + 3.01, 500, 5, 3) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3.01 / 100)))
        assert lr_factor(start + 99.9999, 500, 5, 3) == pytest.approx(0, abs=1e-8)
        assert lr_factor(start + 50, 500, 5, 3) == pytest.approx(0.5)


def test_param_groups_by_type_weights_at_peak_bias_and_bn_at_a_tenth():
    m = _resnet("resnet14", [16, 32, 64], [2, 2, 2], "A")
    g = param_groups(m, 0.4, 0.1, 5e-4, "by_type")
    main = {id(p) for p in g[0]["params"]}
    names = {n for n, p in m.named_parameters() if id(p) in main}
    assert all(n.endswith("weight") and ("conv" in n or "fc" in n or "shortcut.0" in n) for n in names)
    assert "fc.weight" in names and "fc.bias" not in names and "bn1.weight" not in names
    assert g[0]["peak_lr"] == 0.4 and g[1]["peak_lr"] == pytest.approx(0.04)
    assert len(g[0]["params"]) + len(g[1]["params"]) == len(list(m.parameters()))


# --- CIFAR in its real on-disk format ------------------------------------------------------------
def _write_cifar(root, name, n_train=20, n_test=10, classes=10):
    rng = np.random.default_rng(0)
    key = "labels" if name == "cifar10" else "fine_labels"

    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                key: rng.integers(0, classes, n).tolist(), "filenames": [f"{i}.png" for i in range(n)]}

    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        parts = {f"data_batch_{i}": batch(n_train // 5) for i in range(1, 6)}
        parts["test_batch"] = batch(n_test)
        parts["batches.meta"] = {"label_names": [f"c{i}" for i in range(10)]}
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        parts = {"train": batch(n_train), "test": batch(n_test),
                 "meta": {"fine_label_names": [f"c{i}" for i in range(100)]}}
    for fname, obj in parts.items():
        with open(folder / fname, "wb") as f:
            pickle.dump(obj, f)
    return parts


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_loader_reads_the_real_format(tmp_path, cfg_factory, name, classes):
    parts = _write_cifar(tmp_path / "data", name, classes=classes)
    cfg = cfg_factory(f"data={name}", f"data.root={tmp_path / 'data'}", "data.verify_md5=false", fast=False)
    ds = load_dataset(cfg.data)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (10, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    test = parts["test_batch" if name == "cifar10" else "test"]
    # CIFAR rows are 1024 R, then G, then B values, row-major: the first image's green (1,0,0) pixel
    assert int(ds.test_x[0, 1, 0, 0]) == int(test["data"][0, 1024])
    assert int(ds.test_x[3, 2, 31, 31]) == int(test["data"][3, 3071])
    key = "labels" if name == "cifar10" else "fine_labels"
    assert ds.test_y.tolist() == test[key]
    assert ds.info["md5_ok"] is False and ds.info["verify_md5"] is False and ds.info["n_train"] == 20


def test_cifar_files_that_differ_from_the_published_ones_are_refused_by_default(tmp_path, cfg_factory):
    _write_cifar(tmp_path / "data", "cifar10")
    cfg = cfg_factory("data=cifar10", f"data.root={tmp_path / 'data'}", fast=False)
    with pytest.raises(ConfigError, match=r"data_batch_1.*differ from the published files \(md5\).*"
                                          r"data.verify_md5=false"):
        load_dataset(cfg.data)


class _Payload:
    """Unpickling this calls os.system: what a planted data file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_cifar_file_does_not_run_its_payload(tmp_path, cfg_factory):
    _write_cifar(tmp_path / "data", "cifar10")
    marker = tmp_path / "pwned"
    with open(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": _Payload(marker), "labels": [0]}, f)
    cfg = cfg_factory("data=cifar10", f"data.root={tmp_path / 'data'}", "data.verify_md5=false", fast=False)
    with pytest.raises(ConfigError, match=r"data_batch_3 is not a CIFAR batch file.*posix.system|"
                                          r"data_batch_3 is not a CIFAR batch file.*os.system") as e:
        load_dataset(cfg.data)
    assert not marker.exists() and "official archive" in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "not-a-dict", "fifo"])
def test_a_damaged_cifar_file_is_named_in_a_config_error(tmp_path, cfg_factory, damage):
    import os
    _write_cifar(tmp_path / "data", "cifar10")
    path = tmp_path / "data" / "cifar-10-batches-py" / "test_batch"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "not-a-dict":
        path.write_bytes(pickle.dumps([1, 2, 3]))
    else:
        path.unlink()
        os.mkfifo(path)  # would block a plain open() forever
    cfg = cfg_factory("data=cifar10", f"data.root={tmp_path / 'data'}", "data.verify_md5=false", fast=False)
    with pytest.raises(ConfigError, match="test_batch"):
        load_dataset(cfg.data)


def test_missing_cifar_names_the_folder_and_the_options(tmp_path, cfg_factory):
    cfg = cfg_factory("data=cifar10", f"data.root={tmp_path / 'nowhere'}", fast=False)
    with pytest.raises(ConfigError) as e:
        load_dataset(cfg.data)
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg
    assert "data.root" in msg and "data.download=true" in msg


def test_digits_split_is_fixed_stratified_and_complete(cfg_factory):
    cfg = cfg_factory(fast=False)
    a, b = load_dataset(cfg.data), load_dataset(cfg.data)
    assert len(a.train_x) == 1300 and len(a.test_x) == 497
    assert torch.equal(a.test_x, b.test_x) and a.info["sha256"] == b.info["sha256"]
    counts = torch.bincount(a.test_y, minlength=10)
    assert counts.min() >= 48 and counts.max() <= 51  # stratified: ~497/10 per class
    assert a.train_x.max() == 255 and a.train_x.dtype == torch.uint8
