"""nondet_hpc.compose: the fast sweep composer gives Hydra's own job configs, with and without
Hydra's private override functions, and hands the config loader back when the sweep is over."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from nondet_hpc import compose as fast
from nondet_hpc.__main__ import conf_dir
from nondet_hpc.config import register_configs

JOBS = [["source=init", "seed=1"], ["source=init", "seed=2"], ["source=shuffle", "seed=1"],
        ["source=shuffle", "seed=3", "train.lr=0.2"], ["seed=4", "train.epochs=3"], ["source=init", "seed=5"]]


@pytest.fixture
def loader_and_master():
    register_configs()
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        master = compose("config", overrides=["hydra/launcher=slurm", "out_dir=/sweep"], return_hydra_config=True)
        yield GlobalHydra.instance().config_loader(), master


def _plain(cfg):
    return OmegaConf.to_container(cfg, resolve=False)


def test_fast_path_equals_hydra_and_is_uninstalled(loader_and_master):
    loader, master = loader_and_master
    hydra_cfgs = [_plain(loader.load_sweep_config(master, job)) for job in JOBS]
    composer = fast.FastSweepComposer(loader)
    with composer.installed():
        assert loader.load_sweep_config is composer
        got = [_plain(loader.load_sweep_config(master, job)) for job in JOBS]
    assert got == hydra_cfgs
    # one full composition per group set checks the fast result; the others were fast
    assert composer.enabled and composer.stats == {"fast": len(JOBS), "slow": 3}
    assert loader.load_sweep_config is not composer and not composer.cache


def test_without_hydra_private_names_every_job_is_composed_by_hydra(loader_and_master, monkeypatch):
    loader, master = loader_and_master
    hydra_cfgs = [_plain(loader.load_sweep_config(master, job)) for job in JOBS]
    monkeypatch.setattr(fast, "_hydra_private", lambda: None)  # a Hydra release that renamed them
    composer = fast.FastSweepComposer(loader)
    with composer.installed():
        got = [_plain(loader.load_sweep_config(master, job)) for job in JOBS]
    assert got == hydra_cfgs
    assert not composer.enabled and composer.stats == {"fast": 0, "slow": len(JOBS)}


def test_uninstalled_after_an_error(loader_and_master):
    loader, master = loader_and_master
    composer = fast.FastSweepComposer(loader)
    with pytest.raises(RuntimeError):
        with composer.installed():
            raise RuntimeError("the launcher failed")
    assert loader.load_sweep_config is not composer


def test_grouped_composer_composes_once_per_key_and_copies():
    calls = []

    def build(key):
        calls.append(key)
        return OmegaConf.create({"g": key, "v": 0})

    bases = fast.GroupedComposer(build)
    a = bases.get("x")
    a.v = 7
    assert bases.get("x").v == 0 and bases.get("y").g == "y"
    assert calls == ["x", "y"]
