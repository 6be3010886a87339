"""Seeds per source, stream isolation, the one-ulp bit change, kernel switches, GPU arch check."""

import numpy as np
import pytest
import torch

from helpers import cli_env, run_cli
from nondet_hpc.run.data import draw_augment, epoch_order
from nondet_hpc.run.models import build_model, init_weights
from nondet_hpc.config import ConfigError
from nondet_hpc.run.sources import (Seeds, Streams, apply_bitflip, configure_kernels,
                                make_generator, resolve_seeds)
from nondet_hpc.run.device import check_gpu_arch, resolve_device


@pytest.mark.parametrize("vary,expect", [
    ([], (1, 1, 1, None)),
    (["init"], (5, 1, 1, None)),
    (["shuffle"], (1, 5, 1, None)),
    (["augment"], (1, 1, 5, None)),
    (["bitflip"], (1, 1, 1, 5)),
    (["init", "shuffle", "augment"], (5, 5, 5, None)),
])
def test_studied_source_gets_the_replicate_seed_others_get_one(vary, expect):
    s = resolve_seeds(vary, 5, True)
    assert (s.init, s.shuffle, s.augment, s.bitflip) == expect


@pytest.mark.parametrize("seed", [0, -3, 1.5, True])
def test_seed_below_one_is_refused(seed):
    with pytest.raises(ConfigError, match="integer >= 1"):
        resolve_seeds(["init"], seed, True)


def test_unknown_stream_lists_valid_ones():
    with pytest.raises(ConfigError, match="valid: .*init.*shuffle.*augment.*bitflip"):
        resolve_seeds(["cudnn"], 1, True)


def test_streams_with_equal_seeds_are_still_different_streams():
    a = torch.rand(8, generator=make_generator("init", 1))
    b = torch.rand(8, generator=make_generator("shuffle", 1))
    assert not torch.equal(a, b)


def _draws(seeds: Seeds):
    """What each stream produces for a ResNet-14 run: initial weights, 3 epochs of orders and augs."""
    streams = Streams.from_seeds(seeds)
    model = build_model("resnet14", 10, 3)
    init_weights(model, streams.init)
    weights = torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])
    orders = torch.stack([epoch_order(100, streams.shuffle) for _ in range(3)])
    augs = [draw_augment(100, 4, True, streams.augment) for _ in range(3)]
    aug = torch.stack([torch.cat([a.dy, a.dx, a.flip.long()]) for a in augs])
    return weights, orders, aug


@pytest.mark.parametrize("source", ["init", "shuffle", "augment"])
def test_changing_one_seed_changes_only_its_own_stream(source):
    base = _draws(resolve_seeds([source], 1, True))
    other = _draws(resolve_seeds([source], 2, True))
    changed = [not torch.equal(x, y) for x, y in zip(base, other)]
    assert changed == [source == "init", source == "shuffle", source == "augment"]


def test_no_stream_touches_the_global_rng():
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    _draws(resolve_seeds(["init", "shuffle", "augment"], 3, True))
    w = torch.randn(16, 3, 3, 3)
    torch.manual_seed(1234)
    apply_bitflip(w, 9)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_bitflip_moves_exactly_one_element_by_exactly_one_ulp():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 3, 3, 3, generator=g)
    orig = w.clone()
    rec = apply_bitflip(w, 7)
    diff = (w != orig).flatten().nonzero().flatten().tolist()
    assert diff == [rec["index"]]
    old = np.float32(orig.flatten()[rec["index"]].item())
    new = np.float32(w.flatten()[rec["index"]].item())
    toward = np.float32(np.inf) if rec["direction"] == "up" else np.float32(-np.inf)
    assert new == np.nextafter(old, toward)  # numpy's nextafter, independent of torch's
    assert abs(int(np.array(new).view(np.int32)) - int(np.array(old).view(np.int32))) == 1
    assert (rec["old"], rec["new"]) == (float(old), float(new))


def test_bitflip_seed_picks_index_and_direction_reproducibly_and_covers_both_directions():
    w = torch.ones(432)
    recs = [apply_bitflip(w.clone(), s) for s in range(1, 41)]
    assert recs[0] == apply_bitflip(w.clone(), 1)
    assert {r["direction"] for r in recs} == {"up", "down"}
    assert len({r["index"] for r in recs}) > 20
    assert all(0 <= r["index"] < 432 for r in recs)


def test_kernel_switch_on_cpu_is_recorded_as_no_effect():
    try:
        rec = configure_kernels(False, torch.device("cpu"))
        assert rec["cudnn.benchmark"] is True and torch.backends.cudnn.benchmark is True
        assert "none at kernel level" in rec["effect"]
        rec = configure_kernels(True, torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        assert rec["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
    finally:
        torch.use_deterministic_algorithms(False)


CU13 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


def test_v100_with_a_cuda13_build_is_refused_with_the_build_to_install():
    with pytest.raises(ConfigError, match=r"sm_70.*CUDA 12\.6") as e:
        check_gpu_arch((7, 0), CU13, "Tesla V100-SXM2-32GB", "2.14.1+cu130", "13.0")
    assert "Tesla V100" in str(e.value) and "2.14.1+cu130" in str(e.value)


@pytest.mark.parametrize("cap,arch", [((7, 0), CU126), ((8, 0), CU13), ((8, 9), CU13),
                                      ((9, 0), CU13), ((12, 1), ["sm_80", "compute_90"])])
def test_supported_gpus_pass_the_arch_check(cap, arch):
    check_gpu_arch(cap, arch, "gpu", "2.x", "12.6")


def test_ptx_only_for_a_newer_arch_does_not_cover_an_older_gpu():
    with pytest.raises(ConfigError):
        check_gpu_arch((7, 0), ["compute_80"], "V100", "2.x", "13.0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_refused():
    with pytest.raises(ConfigError, match="train.device=cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="valid"):
        resolve_device("tpu")


def test_cublas_workspace_is_fixed_on_import_before_any_cuda_work():
    env = {k: v for k, v in cli_env().items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    out = run_cli(["-c", "import os, nondet_hpc; print(os.environ['CUBLAS_WORKSPACE_CONFIG'])"], env=env).stdout.strip()
    assert out == ":4096:8"


def test_every_valid_seed_gives_each_stream_its_own_generator_seeds():
    from nondet_hpc.registry.sources import MAX_SEED, STREAMS
    offset = {name: s.offset for name, s in STREAMS.items()}
    ranges = sorted((off + 1, off + MAX_SEED) for off in offset.values())
    assert all(hi < lo_next for (_, hi), (lo_next, _) in zip(ranges, ranges[1:])), ranges
    with pytest.raises(ConfigError, match=r"seed=1000001 is too large.*1\.\.1000000"):
        resolve_seeds(["init"], MAX_SEED + 1, True)
    # the collision that motivated the bound: init seed 1_000_004 would equal shuffle seed 1
    assert offset["init"] + 1_000_004 == offset["shuffle"] + 1
    with pytest.raises(ConfigError):
        resolve_seeds(["init"], 1_000_004, True)
    assert resolve_seeds(["init"], MAX_SEED, True).init == MAX_SEED
