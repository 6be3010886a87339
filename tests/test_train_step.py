"""The training step (issue 12, section 1): same bits as before by default, no host work per batch,
each precision / memory format / graph setting resolved, refused or recorded as documented.

The reference of "before" is the loop as it was written until this change, restated here
(per-batch pad + gather with augment_batch, mean/std built from lists every batch, torch's SGD with
a float LR): the default Trainer must reproduce its weights and logits bit for bit. GPU-only
checks (graph vs eager, sync-free epoch under torch.cuda.set_sync_debug_mode) carry "gpu" in their
names and skip here; benchmarks/gpu_check.sh runs them on a lent GPU.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import REPO, cli_env, make_cfg
from nondet_hpc.config import ConfigError
from nondet_hpc.rundir import group_key, run_dir, run_id
from nondet_hpc.run import data as data_mod, task, train
from nondet_hpc.run.device import check_gpu_arch, resolve_device
from nondet_hpc.run.data import EpochImages, epoch_augment, epoch_order, load_dataset, training_batches
from nondet_hpc.run.models import init_weights, model_from_config
from nondet_hpc.run.sources import Streams, resolve_seeds
from nondet_hpc.run.step import StaticStep, StepPlan, plan_step
from nondet_hpc.run.train import lr_factor, param_groups

CUDA = torch.cuda.is_available()


def augment_batch(x_u8: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
                  pad: int) -> torch.Tensor:
    """The per-batch augmentation of the loop before EpochImages (the reference): random crop of the
    zero-padded image plus horizontal flip, as one gather. Output pixel (i, j) of image b is padded
    pixel (dy_b + i, dx_b + j), or (dy_b + i, dx_b + W-1-j) when flipped."""
    b, c, h, w = x_u8.shape
    padded = torch.nn.functional.pad(x_u8, (pad, pad, pad, pad))  # uint8 zeros = black
    dev = x_u8.device
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = dy.to(dev)[:, None] + ar_h[None, :]  # [B, H]
    cols = torch.where(flip.to(dev)[:, None], (w - 1) - ar_w[None, :], ar_w[None, :]) + dx.to(dev)[:, None]
    bi = torch.arange(b, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def _setup(cfg):
    data = load_dataset(cfg.data)
    streams = Streams.from_seeds(resolve_seeds(list(cfg.source.vary), cfg.seed, True))
    model = model_from_config(cfg)
    init_weights(model, streams.init)
    return data, streams, model


def _old_loop(cfg) -> torch.nn.Module:
    """The training loop as it was before issue 12 (train.py at the parent commit), restated."""
    t, d = cfg.train, cfg.data
    data, streams, model = _setup(cfg)
    groups = param_groups(model, t.lr, t.lr_scale_bias_bn, t.weight_decay, t.param_groups)
    opt = torch.optim.SGD(groups, lr=0.0, momentum=t.momentum)
    n = len(data.train_x)
    batches = training_batches(n, t.batch_size)
    model.train()
    step = 0
    for _ in range(t.epochs):
        order = epoch_order(n, streams.shuffle)
        aug = epoch_augment(order, d.pad, d.flip, d.augment_draw, streams.augment)
        for lo, hi in batches:
            idx = order[lo:hi]
            x = augment_batch(data.train_x[idx], aug.dy[lo:hi], aug.dx[lo:hi], aug.flip[lo:hi], d.pad)
            c = x.shape[1]
            m = torch.as_tensor(list(d.mean), dtype=torch.float32).view(1, c, 1, 1)
            s = torch.as_tensor(list(d.std), dtype=torch.float32).view(1, c, 1, 1)
            x = x.to(torch.float32).div(255).sub(m).div(s).contiguous()
            f = lr_factor(step / len(batches), t.epochs, t.snapshots, t.warmup_epochs)
            for g in opt.param_groups:
                g["lr"] = g["peak_lr"] * f
            loss = F.cross_entropy(model(x), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return model.eval()


@pytest.mark.parametrize("variant", ["authors", "clean"])
def test_default_step_is_bit_identical_to_the_loop_before_issue_12(tmp_path, variant):
    cfg = make_cfg(tmp_path, f"variant={variant}", "source=all", "seed=3", "train.batch_size=48")  # short last batch
    old = _old_loop(cfg)
    data, streams, model = _setup(cfg)
    tr = train.Trainer(model, data, streams, cfg.train, cfg.data, torch.device("cpu"), tmp_path / "c.pt")
    assert tr.plan == StepPlan("fp32", None, False, False, False, False)
    tr.fit()
    for (k, a), b in zip(old.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    x = data_mod.normalize(data.test_x, list(cfg.data.mean), list(cfg.data.std))
    with torch.no_grad():
        assert torch.equal(old(x), model(x))


@pytest.mark.parametrize("rule", ["by_position", "by_image"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_epoch_images_equal_augment_batch_for_random_draws(rule, fmt):
    g = torch.Generator().manual_seed(5)
    n, pad = 37, 3
    x = torch.randint(0, 256, (n, 3, 6, 9), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    images = EpochImages(x, y, pad, fmt)
    for _ in range(3):
        order = epoch_order(n, g)
        aug = epoch_augment(order, pad, True, rule, g)
        assert aug.flip.any() and not aug.flip.all()
        xe, ye = images.epoch(order, aug)
        assert xe.is_contiguous(memory_format=fmt)
        for lo, hi in training_batches(n, 8):
            idx = order[lo:hi]
            ref = augment_batch(x[idx], aug.dy[lo:hi], aug.dx[lo:hi], aug.flip[lo:hi], pad)
            assert torch.equal(xe[lo:hi], ref) and torch.equal(ye[lo:hi], y[idx])


class _PythonDataTensors:
    """Counts tensors made from Python data (torch.tensor / torch.as_tensor / Tensor.new_tensor)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for owner, name in ((torch, "tensor"), (torch, "as_tensor"), (torch.Tensor, "new_tensor")):
            real = getattr(owner, name)

            def counted(*a, _real=real, **k):
                self.calls += 1
                return _real(*a, **k)

            monkeypatch.setattr(owner, name, counted)


def _count_in_batches(monkeypatch, trainer) -> list[int]:
    counter = _PythonDataTensors(monkeypatch)
    per_epoch, real = [], train.Trainer._batches

    def counted(self, *a):
        before = counter.calls
        out = real(self, *a)
        per_epoch.append(counter.calls - before)
        return out

    monkeypatch.setattr(train.Trainer, "_batches", counted)
    trainer.fit()
    # the counter sees the old per-batch normalize, so a zero is not for want of looking
    before = counter.calls
    data_mod.normalize(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), [0.5], [0.5])
    assert counter.calls - before == 2
    return per_epoch


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16", "amp_fp16"])
def test_no_tensor_is_made_from_python_data_inside_an_epoch(tmp_path, monkeypatch, precision):
    cfg = make_cfg(tmp_path, f"train.precision={precision}")
    data, streams, model = _setup(cfg)
    tr = train.Trainer(model, data, streams, cfg.train, cfg.data, torch.device("cpu"), tmp_path / "c.pt")
    assert _count_in_batches(monkeypatch, tr) == [0, 0]  # 2 epochs of 4 batches


def test_the_static_step_makes_no_python_tensor_either(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path)
    data, streams, model = _setup(cfg)
    plan = StepPlan("fp32", None, False, False, cuda_graph=False, static=True)
    tr = train.Trainer(model, data, streams, cfg.train, cfg.data, torch.device("cpu"), tmp_path / "c.pt", plan=plan)
    assert _count_in_batches(monkeypatch, tr) == [0, 0]


# --- the plan ------------------------------------------------------------------------------------
def _plan(device, *overrides):
    return plan_step(make_cfg("/tmp/x", *overrides).train, torch.device(device))


@pytest.mark.parametrize("precision", ["fp32", "tf32", "amp_fp16", "amp_bf16"])
def test_auto_settings_per_device_and_precision(precision, monkeypatch):
    cpu, cuda = _plan("cpu", f"train.precision={precision}"), _plan("cuda", f"train.precision={precision}")
    assert not cpu.cuda_graph and not cpu.channels_last  # CPU: never a graph, NCHW
    assert cuda.channels_last == precision.startswith("amp_")  # until measured: NCHW for fp32/tf32
    # issue 18 section 9: cuda_graph=auto is off until a GPU measurement shows replay bit-identical and faster
    assert not cuda.cuda_graph and cuda.static == (precision == "amp_fp16")
    if precision != "amp_fp16":
        assert _plan("cuda", f"train.precision={precision}", "train.cuda_graph=true").cuda_graph
    from nondet_hpc.run import step as step_mod

    monkeypatch.setattr(step_mod, "AUTO_CUDA_GRAPH", True)  # the rule once measured: on for CUDA except amp_fp16
    assert _plan("cuda", f"train.precision={precision}").cuda_graph == (precision != "amp_fp16")
    assert not _plan("cpu", f"train.precision={precision}").cuda_graph
    assert cpu.static == (precision == "amp_fp16")
    assert cpu.grad_scaler == cuda.grad_scaler == (precision == "amp_fp16")
    assert _plan("cpu", f"train.precision={precision}", "train.channels_last=true").channels_last
    assert not _plan("cuda", f"train.precision={precision}", "train.channels_last=false", "train.cuda_graph=false").cuda_graph


@pytest.mark.parametrize("overrides,match", [
    (("train.cuda_graph=true", "train.device=cpu"), "CUDA graphs do not exist on CPU"),
    (("train.cuda_graph=maybe",), "train.cuda_graph"),
    (("train.channels_last=yes",), "train.channels_last"),
    (("train.precision=fp16",), "train.precision"),
])
def test_impossible_or_unknown_settings_are_refused_before_anything_is_written(cfg_factory, overrides, match):
    cfg = cfg_factory(*overrides)
    with pytest.raises(ConfigError, match=match):
        task.run(cfg)
    assert not run_dir(cfg).exists()


def test_graph_with_loss_scaling_is_refused_with_the_alternatives():
    with pytest.raises(ConfigError, match="amp_bf16"):
        _plan("cuda", "train.precision=amp_fp16", "train.cuda_graph=true")


def test_a_captured_step_is_refused_on_cpu(tmp_path):
    cfg = make_cfg(tmp_path)
    data, streams, model = _setup(cfg)
    plan = StepPlan("fp32", None, False, False, cuda_graph=True, static=True)
    tr = train.Trainer(model, data, streams, cfg.train, cfg.data, torch.device("cpu"), tmp_path / "c.pt", plan=plan)
    with pytest.raises(ConfigError, match="CUDA"):
        tr.fit()


@pytest.mark.parametrize("override", ["train.precision=amp_bf16", "train.cuda_graph=false", "train.channels_last=true"])
def test_step_settings_are_part_of_the_run_identity(override):
    base, other = make_cfg("/tmp/x"), make_cfg("/tmp/x", override)
    assert run_id(base) != run_id(other) and group_key(base) != group_key(other)


# --- the static step's Python side on CPU -----------------------------------------------------------
def test_static_step_feeds_the_fused_kernel_tensor_lrs_and_runs_the_short_batch_eagerly(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, "train.batch_size=48")  # 256 images: 5 full batches + 16
    data, streams, model = _setup(cfg)
    plan = StepPlan("fp32", None, False, False, cuda_graph=False, static=True)
    tr = train.Trainer(model, data, streams, cfg.train, cfg.data, torch.device("cpu"), tmp_path / "c.pt", plan=plan)
    seen = []
    real = StaticStep.__call__

    def spy(self, x, y, lrs):
        out = real(self, x, y, lrs)
        seen.append((x.shape[0], [float(t) for t in self.lr_t], list(lrs),
                     [g["lr"] is t for g, t in zip(self.opt.param_groups, self.lr_t)]))
        return out

    monkeypatch.setattr(StaticStep, "__call__", spy)
    tr.fit()
    assert tr.opt.defaults["fused"] and isinstance(tr.step, StaticStep) and tr.step.graph is None
    assert [s[0] for s in seen] == [48] * 5 + [16] + [48] * 5 + [16]
    for _, on_device, wanted, same in seen:
        assert on_device == pytest.approx(wanted, rel=1e-7) and all(same)  # float32 of the Python LR
    assert seen[-1][2][0] > 0 and seen[0][2] == [0.0, 0.0]


@pytest.mark.parametrize("overrides", [("train.precision=amp_fp16",), ("train.precision=amp_bf16",)])
def test_mid_epoch_resume_is_bit_exact_for_amp(bit_exact_resume, overrides):
    bit_exact_resume("source=all", "seed=2", "train.checkpoint_every=1", *overrides,
                     stop_at_step=6)  # mid-epoch 2 (4 batches per epoch)


def test_precisions_on_cpu_recorded_and_distinct(cfg_factory):
    runs = {p: task.run(cfg_factory(f"train.precision={p}", "train.device=cpu"))
            for p in ("fp32", "tf32", "amp_bf16", "amp_fp16")}
    logits = {p: np.load(os.path.join(o["run_dir"], "logits", "plain.npy")) for p, o in runs.items()}
    for p, o in runs.items():
        rec = json.load(open(os.path.join(o["run_dir"], "run.json")))
        assert rec["identity"]["train.precision"] == p == rec["precision"]["precision"] == rec["step"]["precision"]
        assert rec["precision"]["fp32_precision"] == ("tf32" if p == "tf32" else "ieee")
        assert rec["step"]["cuda_graph"] is False and rec["step"]["channels_last"] is False
    assert np.array_equal(logits["fp32"], logits["tf32"])  # the TF32 flags act on CUDA kernels only
    assert not np.array_equal(logits["fp32"], logits["amp_bf16"])
    assert not np.array_equal(logits["fp32"], logits["amp_fp16"])
    assert len({run_id(make_cfg("/tmp/x", f"train.precision={p}")) for p in runs}) == 4


def test_evaluate_reads_the_fp32_flag_of_new_and_old_run_configs():
    from omegaconf import OmegaConf

    from nondet_hpc.run.sources import fp32_flag_of

    assert fp32_flag_of(OmegaConf.create({"precision": "tf32"})) == "tf32"
    assert fp32_flag_of(OmegaConf.create({"precision": "amp_bf16"})) == "ieee"
    assert fp32_flag_of(OmegaConf.create({"fp32_precision": "tf32"})) == "tf32"  # a folder from before
    assert fp32_flag_of(OmegaConf.create({})) == "ieee"


# --- on a GPU (benchmarks/gpu_check.sh runs these with -k gpu) ------------------------------------
def _gpu_trainer(tmp_path, name, plan_kw, *overrides):
    cfg = make_cfg(tmp_path, "train.device=cuda", "train.batch_size=48", *overrides)  # 5 full batches + 16
    data, streams, model = _setup(cfg)
    dev = torch.device("cuda")
    plan = StepPlan(**{"precision": "fp32", "autocast_dtype": None, "grad_scaler": False, "channels_last": False,
                       "cuda_graph": False, "static": False, **plan_kw})
    return train.Trainer(model, data.to(dev), streams, cfg.train, cfg.data, dev, tmp_path / f"{name}.pt", plan=plan), data


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_graph_replay_is_bit_identical_to_the_same_step_eagerly(tmp_path, channels_last):
    from nondet_hpc.run.sources import configure_kernels

    configure_kernels(True, torch.device("cuda"))
    graph, data = _gpu_trainer(tmp_path, "graph", {"cuda_graph": True, "static": True, "channels_last": channels_last},
                               "train.epochs=3")
    eager, _ = _gpu_trainer(tmp_path, "eager", {"cuda_graph": False, "static": True, "channels_last": channels_last},
                            "train.epochs=3")
    graph.fit()
    eager.fit()
    assert graph.step.replays >= 10 and eager.step.graph is None
    for (k, a), b in zip(graph.model.state_dict().items(), eager.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("plan_kw", [{}, {"cuda_graph": True, "static": True},
                                     {"precision": "amp_fp16", "autocast_dtype": torch.float16, "grad_scaler": True,
                                      "static": True, "channels_last": True}], ids=["eager", "graph", "amp_fp16"])
def test_gpu_epochs_after_the_first_do_not_synchronise(tmp_path, monkeypatch, plan_kw):
    tr, _ = _gpu_trainer(tmp_path, "sync", plan_kw, "train.epochs=3")
    real, epochs = train.Trainer._batches, []

    def checked(self, *a):
        epochs.append(self.progress.epoch)
        if self.progress.epoch == 0:  # warm-up and capture synchronise once
            return real(self, *a)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(self, *a)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(train.Trainer, "_batches", checked)
    tr.fit()
    assert epochs == [0, 1, 2]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_cudnn_switch_sets_the_kernel_flags_both_ways(cfg_factory):
    for source, det in (("cudnn", False), ("none", True)):
        out = task.run(cfg_factory(f"source={source}", "train.device=cuda"))
        rec = json.load(open(os.path.join(out["run_dir"], "run.json")))
        assert rec["kernels"]["cudnn.benchmark"] is (not det) and rec["kernels"]["deterministic"] is det
        assert torch.backends.cudnn.benchmark is (not det) and torch.are_deterministic_algorithms_enabled() is det


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_arch_check_accepts_this_gpu_and_this_torch():
    assert resolve_device("cuda").type == "cuda"
    check_gpu_arch(torch.cuda.get_device_capability(0), torch.cuda.get_arch_list(),
                   torch.cuda.get_device_name(0), torch.__version__, torch.version.cuda)


# --- the GPU script ------------------------------------------------------------------------------
GPU_CHECK = REPO / "benchmarks" / "gpu_check.sh"


def test_gpu_check_script_parses_and_its_cpu_smoke_writes_every_cpu_mode(tmp_path):
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)
    # the smoke must not depend on this machine's speed: a `timeout` that always expires (as a
    # section limit does on a loaded machine) is first on PATH, and the smoke must not use it
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "timeout").write_text("#!/bin/sh\necho 'timeout expired (fake)' >&2\nexit 124\n")
    (fake / "timeout").chmod(0o755)
    env = {**cli_env(), "OUT": str(tmp_path), "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(GPU_CHECK), "--cpu-smoke"], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["mode"] == "cpu-smoke" and res["device"]["type"] == "cpu"
    modes = res["step_modes"]
    assert set(modes) == {"fp32_nchw", "fp32_nhwc", "tf32", "amp_fp16", "amp_bf16", "graph"}
    assert modes["graph"]["skipped"].startswith("needs CUDA")
    for name in ("fp32_nchw", "fp32_nhwc", "tf32", "amp_fp16", "amp_bf16"):
        assert modes[name]["steps"] == 2 and modes[name]["images_per_s"] > 0 and modes[name]["finite_loss"]
    assert res["gpu_tests"]["skipped"].startswith("cpu-smoke") and "sections" in res
    # the packing section: K = 1, 2 packed runs, each bit-identical to its solo run
    rows = res["packing"]["rows"]
    assert [r["k"] for r in rows] == [1, 2] and all(r["bit_identical_to_solo"] for r in rows)
    assert res["sections"]["packing"]["rc"] == 0
    # issue 18 section 9: the questions for the first GPU run, answered here on the CPU
    assert res["device"]["cpu"]["capability"] and res["device"]["cpu"]["onednn_isa"]
    rep = res["repeatability"]
    assert rep["cudnn"]["steps"] == 2 and rep["cudnn"]["differ"] is False  # a CPU has no cuDNN kernels to vary
    assert rep["control"]["processes"] == 2 and rep["control"]["same_run_id"] and rep["control"]["bit_identical"]
    # the recording overhead section: one point and one step timed, the default grid's overhead
    rec = res["record_overhead"]["results"][0]
    assert res["sections"]["record_overhead"]["rc"] == 0 and rec["point_s"] > 0 and rec["points"] == 12
    answers = res["answers"]
    assert answers["cudnn_runs_same_seed_differ"] is False and answers["control_runs_two_processes_bit_identical"]
    assert answers["record_overhead_pct"]["digits-resnet14"] > 0
    assert answers["turn_cuda_graph_auto_on"] is False  # no GPU measurement: auto stays off
