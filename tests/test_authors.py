"""The authors' training behaviours and our variant (issue 11, sections 1 and 2).

- train.param_groups: which tensors train at which peak LR, under both rules, on ResNet-14/18/34,
  checked against the authors' name rule applied to their spelling of our names;
- data.augment_draw: a new shuffle seed re-assigns every image's crop/flip under by_position and
  none under by_image, in the draws and in what the training loop feeds the model; no source
  consumes another's stream; a mid-epoch resume stays bit-exact under both;
- the warm-up boundary is inclusive (the authors' `epoch <= warmup_epochs`), per cycle too;
- the defaults and every paper preset are the authors'; variant=clean and the _clean presets are ours;
  every setting is in run.json and in the run identity;
- train.precision's fp32 flag is applied (torch's flags read back) and recorded as not applicable on CPU;
  the retired train.fp32_precision is refused with the new key's name.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from helpers import make_cfg
from nondet_hpc.config import ConfigError
from nondet_hpc.rundir import group_key, run_dir, run_id
from nondet_hpc.run import data as data_mod, task, train
from nondet_hpc.run.data import Dataset, crop_flip, draw_augment, epoch_augment, epoch_order
from nondet_hpc.run.models import build_model, init_weights
from nondet_hpc.run.sources import FP32_PRECISIONS, Streams, configure_precision, resolve_seeds
from nondet_hpc.run.train import lr_factor, param_groups, small_lr_names

ARCHS = {  # name: (widths, blocks, shortcut, channels of each shortcut BN)
    "resnet14": ([16, 32, 64], [2, 2, 2], "A", [16, 32]),  # option A: BN of the input (16, 32 channels)
    "resnet18b": ([64, 128, 256, 512], [2, 2, 2, 2], "B", [128, 256, 512]),  # option B: BN after a 1x1 conv
    "resnet34": ([64, 128, 256, 512], [3, 4, 6, 3], "B", [128, 256, 512]),
}


def _model(name):
    widths, blocks, shortcut, _ = ARCHS[name]
    m = build_model(name, 10, 3, widths=widths, blocks=blocks, shortcut=shortcut)
    init_weights(m, torch.Generator().manual_seed(0))
    return m


def _authors_spelling(name: str) -> str:
    """Our parameter name as the authors' ResNets spell it: the shortcut is `downsample`, its BN
    `downsample.1` (after an AvgPool in their option A, after the 1x1 conv in torchvision's B)."""
    return name.replace("shortcut.bn.", "downsample.1.").replace("shortcut.", "downsample.")


def _authors_name_rule(name: str) -> bool:
    """The authors' test for the 0.1x group, on their spelling (docs/study.md "Training")."""
    return "bias" in name or ("bn" in name and "weight" in name)


def _peaks(model, rule):
    groups = param_groups(model, 0.4, 0.1, 5e-4, rule)
    peak = {id(p): g["peak_lr"] for g in groups for p in g["params"]}
    return {n: peak[id(p)] for n, p in model.named_parameters()}


# --- parameter groups -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHS))
def test_authors_rule_equals_their_name_rule_on_their_spelling(arch):
    m = _model(arch)
    peaks = _peaks(m, "authors")
    for n in peaks:
        assert peaks[n] == pytest.approx(0.04 if _authors_name_rule(_authors_spelling(n)) else 0.4), n


@pytest.mark.parametrize("arch", list(ARCHS))
def test_shortcut_bn_scales_at_full_peak_only_under_authors(arch):
    m = _model(arch)
    sc_bn = [(n, mod) for n, mod in m.named_modules() if ".shortcut" in n and isinstance(mod, nn.BatchNorm2d)]
    assert [mod.num_features for _, mod in sc_bn] == ARCHS[arch][3]
    authors, by_type = _peaks(m, "authors"), _peaks(m, "by_type")
    for n, _ in sc_bn:
        assert authors[f"{n}.weight"] == 0.4 and by_type[f"{n}.weight"] == pytest.approx(0.04)
        assert authors[f"{n}.bias"] == pytest.approx(0.04) == by_type[f"{n}.bias"]
    # the rules differ in exactly the shortcut BN scales
    differ = sorted(n for n in authors if authors[n] != by_type[n])
    assert differ == sorted(f"{n}.weight" for n, _ in sc_bn)
    values = dict(m.named_parameters())
    assert sum(values[n].numel() for n in differ) == sum(ARCHS[arch][3])  # ResNet-14: 16 + 32


@pytest.mark.parametrize("arch", list(ARCHS))
def test_membership_by_module_type_under_both_rules(arch):
    m = _model(arch)
    conv_linear_w, other_bn_w, biases = set(), set(), set()
    for mn, mod in m.named_modules():
        for pn, _ in mod.named_parameters(recurse=False):
            full = f"{mn}.{pn}"
            if pn == "bias":
                biases.add(full)
            elif isinstance(mod, (nn.Conv2d, nn.Linear)):
                conv_linear_w.add(full)
            elif ".shortcut" not in mn:
                other_bn_w.add(full)
    assert "fc.weight" in conv_linear_w and "fc.bias" in biases and "bn1.weight" in other_bn_w
    everything = set(_peaks(m, "authors"))
    shortcut_bn_w = everything - conv_linear_w - other_bn_w - biases
    assert all(".shortcut" in n and n.endswith(".weight") for n in shortcut_bn_w) and shortcut_bn_w
    assert small_lr_names(m, "authors") == other_bn_w | biases
    assert small_lr_names(m, "by_type") == other_bn_w | biases | shortcut_bn_w
    # tensor counts per group, and every parameter in exactly one group
    for rule, n_full in (("authors", len(conv_linear_w | shortcut_bn_w)), ("by_type", len(conv_linear_w))):
        g = param_groups(m, 0.4, 0.1, 5e-4, rule)
        assert (len(g[0]["params"]), len(g[1]["params"])) == (n_full, len(everything) - n_full)
        assert {id(p) for x in g for p in x["params"]} == {id(p) for p in m.parameters()}


def test_resnet14_values_per_peak():
    m = _model("resnet14")
    sizes = dict((n, p.numel()) for n, p in m.named_parameters())
    full = {rule: sum(v for n, v in sizes.items() if n not in small_lr_names(m, rule)) for rule in ("authors", "by_type")}
    assert full["authors"] - full["by_type"] == 16 + 32
    assert sizes["layers.2.shortcut.bn.weight"] == 16 and sizes["layers.4.shortcut.bn.weight"] == 32


def test_unknown_rule_is_refused():
    with pytest.raises(ConfigError, match="authors.*by_type"):
        small_lr_names(_model("resnet14"), "by_name")


# --- augmentation draws -----------------------------------------------------------------------
def _per_image(n, shuffle_seed, rule, epochs=3, augment_seed=1, pad=4):
    """[epochs, n, 3] crop/flip each IMAGE gets, through epoch_order + epoch_augment, and the streams."""
    streams = Streams.from_seeds(resolve_seeds([], 1, True))
    streams.shuffle.manual_seed(shuffle_seed)
    streams.augment.manual_seed(augment_seed)
    out = []
    for _ in range(epochs):
        order = epoch_order(n, streams.shuffle)
        a = epoch_augment(order, pad, True, rule, streams.augment)
        img = torch.empty(n, 3, dtype=torch.long)
        img[order] = torch.stack([a.dy, a.dx, a.flip.long()], 1)  # position k -> image order[k]
        out.append(img)
    return torch.stack(out), streams


def test_epoch_augment_hands_draw_k_to_position_k_or_to_image_k():
    order = torch.randperm(50, generator=torch.Generator().manual_seed(5))
    draws = draw_augment(50, 4, True, torch.Generator().manual_seed(6))
    pos = epoch_augment(order, 4, True, "by_position", torch.Generator().manual_seed(6))
    img = epoch_augment(order, 4, True, "by_image", torch.Generator().manual_seed(6))
    assert torch.equal(pos.dy, draws.dy) and torch.equal(pos.flip, draws.flip)
    assert torch.equal(img.dx, draws.dx[order]) and torch.equal(img.flip, draws.flip[order])
    with pytest.raises(ConfigError, match="by_position"):
        epoch_augment(order, 4, True, "per_batch", torch.Generator())


def test_a_new_shuffle_seed_reassigns_every_images_augmentation_only_by_position():
    n = 1000
    a, _ = _per_image(n, 1, "by_position")
    b, _ = _per_image(n, 2, "by_position")
    changed = (a != b).any(dim=2)  # [epochs, n]
    # An image keeps its crop/flip in an epoch only if its old and new positions hold equal draws:
    # 1 in 9*9*2 = 162 for pad 4 with flips, so about 6 of 1,000 per epoch; across 3 epochs none.
    assert (changed.sum(dim=1) >= n - 30).all()
    assert changed.any(dim=0).all()
    c, _ = _per_image(n, 1, "by_image")
    d, _ = _per_image(n, 2, "by_image")
    assert torch.equal(c, d)  # the order changed, no image's crop or flip did
    # the shuffle seed changed the order, so this is not a vacuous comparison
    assert not torch.equal(epoch_order(n, torch.Generator().manual_seed(1)),
                           epoch_order(n, torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("rule", ["by_position", "by_image"])
def test_no_source_consumes_another_sources_stream(rule):
    n = 300
    _, s1 = _per_image(n, 1, rule)
    _, s2 = _per_image(n, 2, rule)
    # the augment stream ends an epoch at the same place whatever the shuffle seed and the rule
    _, s_other_rule = _per_image(n, 2, "by_image" if rule == "by_position" else "by_position")
    assert torch.equal(s1.augment.get_state(), s2.augment.get_state())
    assert torch.equal(s1.augment.get_state(), s_other_rule.augment.get_state())
    # the shuffle stream is where three permutations alone leave it, whatever the augment seed
    ref = Streams.from_seeds(resolve_seeds([], 1, True))
    ref.shuffle.manual_seed(1)  # as _per_image seeds it
    for _ in range(3):
        epoch_order(n, ref.shuffle)
    _, s3 = _per_image(n, 1, rule, augment_seed=9)
    assert torch.equal(s1.shuffle.get_state(), ref.shuffle.get_state())
    assert torch.equal(s3.shuffle.get_state(), ref.shuffle.get_state())
    # and the init stream is never touched by data draws
    assert torch.equal(s1.init.get_state(), ref.init.get_state())


def _fed_to_model(monkeypatch, tmp_path, rule, shuffle_seed, n=96):
    """Train one epoch and return, per image, the (dy, dx, flip) the loop applied to it."""
    ids = torch.arange(n)
    x = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = ids // 256, ids % 256  # each image carries its index
    data = Dataset(x, ids % 10, x[:8], ids[:8] % 10, 10)
    seen = torch.full((n, 3), -1, dtype=torch.long)
    real = crop_flip  # not data_mod.crop_flip: that may be an earlier call's spy

    def spy(padded_hwc, index, dy, dx, flip, h, w):
        # the loop pads once (pad 1) and crops a whole epoch: entry k is image index[k]
        img = padded_hwc[index, 1:1 + h, 1:1 + w, 0]
        idx = img[:, 0, 0].long() * 256 + img[:, 0, 1].long()
        seen[idx] = torch.stack([dy, dx, flip.long()], 1)
        return real(padded_hwc, index, dy, dx, flip, h, w)

    monkeypatch.setattr(data_mod, "crop_flip", spy)
    cfg = make_cfg(tmp_path, f"data.augment_draw={rule}", "train.epochs=1", "train.batch_size=32")
    streams = Streams.from_seeds(resolve_seeds([], 1, True))
    streams.shuffle.manual_seed(shuffle_seed)
    model = build_model("resnet14", 10, 1)
    init_weights(model, streams.init)
    t = train.Trainer(model, data, streams, cfg.train, cfg.data, torch.device("cpu"),
                      tmp_path / f"{rule}-{shuffle_seed}.pt", False)
    t.fit()
    assert (seen >= 0).all()  # every image was trained on once
    return seen


def test_the_training_loop_applies_the_rule(monkeypatch, tmp_path):
    fed = lambda rule, seed: _fed_to_model(monkeypatch, tmp_path, rule, seed)  # noqa: E731
    # digits pad 1 with flips: 3*3*2 = 18 crop/flip values, so ~1/18 of images keep theirs by chance
    a, b = fed("by_position", 1), fed("by_position", 2)
    assert (a != b).any(dim=1).sum() >= 96 * 0.8
    c, d = fed("by_image", 1), fed("by_image", 2)
    assert torch.equal(c, d)


@pytest.mark.parametrize("variant", ["authors", "clean"])
def test_mid_epoch_resume_is_bit_exact_under_both_variants(bit_exact_resume, variant):
    rec = bit_exact_resume(f"variant={variant}", "source=all", "seed=3", "train.epochs=2", "train.checkpoint_every=1",
                           stop_at_step=6)  # 4 steps per epoch: mid-epoch 2
    assert rec["resumed_from"] == {**rec["resumed_from"], "epoch": 1, "batch": 3}


# --- warm-up boundary -------------------------------------------------------------------------
def _authors_lr(step, steps_per_epoch, epochs, warmup, snapshots):
    """The authors' schedule, restated from their description (fraction of the peak)."""
    epoch = step / steps_per_epoch
    cycle = epochs / snapshots
    start = min(math.floor(epoch / cycle), snapshots - 1) * cycle
    if epoch <= warmup + start:
        return (epoch - start) / warmup
    return 0.5 * (1 + math.cos(min((epoch - start) / cycle, 1.0) * math.pi))


@pytest.mark.parametrize("snapshots", [1, 5])
def test_warmup_boundary_is_inclusive_at_every_step(snapshots):
    spe, epochs, warmup = 7, 20, 3
    for step in range(spe * epochs):
        assert lr_factor(step / spe, epochs, snapshots, warmup) == pytest.approx(
            _authors_lr(step, spe, epochs, warmup, snapshots), abs=1e-15), step
    for start in range(0, epochs, epochs // snapshots):  # the step that ends each warm-up: the peak
        assert lr_factor((start + warmup) * spe / spe, epochs, snapshots, warmup) == 1.0  # as set_lr computes it
        assert lr_factor(start + warmup + 1 / spe, epochs, snapshots, warmup) < 1.0


# --- defaults, presets, identity, run.json ----------------------------------------------------
PAPER = ["sources", "bitflip", "tta", "nmodels", "epochs", "cifar100"]


@pytest.mark.parametrize("preset", [None] + PAPER + [f"{p}_quick" for p in PAPER])
def test_defaults_and_every_paper_preset_are_the_authors(preset):
    cfg = make_cfg("/tmp/x", *([f"experiment={preset}"] if preset else []), fast=False)
    assert (cfg.train.param_groups, cfg.data.augment_draw, cfg.train.precision) == \
        ("authors", "by_position", "fp32")


@pytest.mark.parametrize("clean,paper", [("sources_clean", "sources"), ("sources_clean_quick", "sources_quick")])
def test_clean_presets_differ_from_theirs_in_the_two_behaviours_only(clean, paper):
    a = OmegaConf.to_container(make_cfg("/tmp/x", f"experiment={clean}", fast=False), resolve=True)
    b = OmegaConf.to_container(make_cfg("/tmp/x", f"experiment={paper}", fast=False), resolve=True)
    assert (a["train"]["param_groups"], a["data"]["augment_draw"]) == ("by_type", "by_image")
    for c in (a, b):
        del c["train"]["param_groups"], c["data"]["augment_draw"], c["experiment"]
    assert a == b
    one = make_cfg("/tmp/x", f"experiment={paper}", "variant=clean", fast=False)
    assert (one.train.param_groups, one.data.augment_draw) == ("by_type", "by_image")


@pytest.mark.parametrize("override", ["train.param_groups=by_type", "data.augment_draw=by_image",
                                      "train.precision=tf32", "variant=clean"])
def test_each_setting_is_part_of_the_run_identity(override):
    base, other = make_cfg("/tmp/x"), make_cfg("/tmp/x", override)
    assert run_id(base) != run_id(other) and group_key(base) != group_key(other)


@pytest.mark.parametrize("override,match", [("train.param_groups=by_name", "train.param_groups"),
                                            ("data.augment_draw=per_batch", "data.augment_draw"),
                                            ("train.precision=bf16", "train.precision"),
                                            ("train.fp32_precision=tf32", "replaced by train.precision")])
def test_bad_values_are_refused_before_anything_is_written(cfg_factory, override, match):
    cfg = cfg_factory(override)
    with pytest.raises(ConfigError, match=match):
        task.run(cfg)
    assert not run_dir(cfg).exists()


def test_run_json_records_the_settings_and_fp32_not_applicable_on_cpu(cfg_factory):
    out = task.run(cfg_factory("variant=clean", "train.epochs=1", "train.device=cpu"))
    rec = json.load(open(os.path.join(out["run_dir"], "run.json")))
    assert rec["identity"]["train.param_groups"] == "by_type"
    assert rec["identity"]["data.augment_draw"] == "by_image" == rec["augment_draw"]
    assert rec["identity"]["train.precision"] == "fp32" == rec["precision"]["precision"]
    assert rec["precision"]["fp32_precision"] == "ieee" and "train.fp32_precision" not in rec["identity"]
    assert rec["precision"]["gpu"] is None and rec["precision"]["effective"].startswith("not applicable")
    groups = rec["param_groups"]
    assert groups["rule"] == "by_type" and [g["peak_lr"] for g in groups["groups"]] == pytest.approx([0.4, 0.04])
    n_params = sum(g["values"] for g in groups["groups"])
    assert n_params == rec["n_parameters"]


# --- fp32 precision -----------------------------------------------------------------------------
@pytest.fixture
def restore_precision():
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
              torch.backends.cudnn.rnn.fp32_precision)
    yield
    (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
     torch.backends.cudnn.rnn.fp32_precision) = before


@pytest.mark.parametrize("precision", FP32_PRECISIONS)
def test_fp32_precision_is_applied_and_read_back(restore_precision, precision):
    other = "tf32" if precision == "ieee" else "ieee"
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = other
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated API on this torch
        rec = configure_precision(precision, torch.device("cpu"))
    assert torch.backends.cuda.matmul.fp32_precision == precision
    assert torch.backends.cudnn.conv.fp32_precision == precision
    assert torch.backends.cudnn.rnn.fp32_precision == precision
    assert rec["cuda.matmul.fp32_precision"] == rec["cudnn.conv.fp32_precision"] == precision
    assert rec["gpu"] is None and "not applicable" in rec["effective"]
    with pytest.raises(ConfigError, match="ieee"):
        configure_precision("fp16", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp32_precision_on_gpu_records_the_gpu_and_the_effective_value(restore_precision):
    dev = torch.device("cuda")
    rec = configure_precision("ieee", dev)
    assert rec["gpu"] == torch.cuda.get_device_name(0) and rec["effective"] == "ieee"
    a = torch.randn(256, 256, device=dev, generator=torch.Generator(device=dev).manual_seed(0))
    exact = (a.double() @ a.double()).float()
    err_ieee = float((a @ a - exact).abs().max())
    rec = configure_precision("tf32", dev)
    err_tf32 = float((a @ a - exact).abs().max())
    if torch.cuda.get_device_capability(0)[0] >= 8:
        assert rec["effective"] == "tf32" and err_tf32 > 10 * err_ieee  # TF32 really is coarser
    else:
        assert rec["effective"].startswith("ieee") and err_tf32 == err_ieee
