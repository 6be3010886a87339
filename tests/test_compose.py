"""nondet_hpc.compose: the fast sweep composer gives Hydra's own job configs, with and without
Hydra's private override functions, and hands the config loader back when the sweep is over."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from nondet_hpc import compose as fast
from nondet_hpc.config import conf_dir, register_configs

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
    # per group set (3): Hydra composes its base once and its first job once (the check); every
    # job config is then a copy + value overrides
    assert composer.enabled and composer.stats == {"fast": len(JOBS), "slow": 2 * 3}
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


def _job_part(cfg):
    out = _plain(cfg)
    out.pop("hydra", None)
    return out


def test_job_only_mode_gives_hydras_job_configs_without_the_hydra_node(loader_and_master):
    loader, master = loader_and_master
    hydra_cfgs = [_job_part(loader.load_sweep_config(master, job)) for job in JOBS]
    composer = fast.FastSweepComposer(loader, job_only=True)
    with composer.installed():
        got = [loader.load_sweep_config(master, job) for job in JOBS]
    assert [_plain(c) for c in got] == hydra_cfgs and all("hydra" not in c for c in got)
    assert composer.enabled and composer.stats == {"fast": len(JOBS), "slow": 2 * 3}
    # the copies keep the schema: a misspelt key still fails as in Hydra
    with composer.installed(), pytest.raises(Exception, match="epoch"):
        loader.load_sweep_config(master, ["source=init", "train.epoch=3"])


def test_plan_keys_decide_the_config(loader_and_master):
    loader, master = loader_and_master
    composer = fast.FastSweepComposer(loader, job_only=True, salt="a")
    keys = [composer.plan_key(master, job) for job in JOBS]
    assert len(set(keys)) == len(JOBS) and all(keys)
    assert composer.plan_key(master, ["source=init", "seed=1"]) == keys[0]
    assert fast.FastSweepComposer(loader, job_only=True, salt="b").plan_key(master, JOBS[0]) != keys[0]
    # a job's config comes from the master's hydra overrides + the job's overrides (Hydra's
    # load_sweep_config), so a new launch with the same ones finds the same keys
    again = fast.FastSweepComposer(loader, job_only=True, salt="a")
    assert [again.plan_key(master, job) for job in JOBS] == keys
    # known keys: the sweeper's validation composes nothing for them
    known = fast.FastSweepComposer(loader, job_only=True, salt="a", known=set(keys))
    with known.installed():
        for job in JOBS:
            loader.load_sweep_config(master, job)
    assert known.stats["fast"] == 0 and known.stats["slow"] == 3  # one base per group set, for its key


def test_no_plan_key_for_configs_read_through_a_resolver(loader_and_master):
    loader, master = loader_and_master
    composer = fast.FastSweepComposer(loader, job_only=True)
    assert composer.plan_key(master, ["source=init", "out_dir=${oc.env:HOME}/x"]) is not None  # a value override
    assert fast._RESOLVER.search('{"out_dir": "${oc.env:HOME}/x"}') and not fast._RESOLVER.search('"${data.name}"')
