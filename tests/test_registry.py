"""Sources and models as Hydra options: the composed configs, and so the run ids, never change.

Run ids hash the resolved config's identity keys (config.identity_items), so a source or model
option that composed one key differently would orphan every run folder written before. The ids
below were computed with the code of version 0.1.0, when the options were YAML files under
conf/source/ and conf/model/; the legacy run folders are real runs of that version.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nondet_hpc.rundir import run_id

LEGACY_RUNS = Path(__file__).parent / "data" / "legacy_0_1_0" / "runs"
MODELS = ("resnet14", "resnet18", "resnet34")

#: source -> the hash part of its run id with resnet14, resnet18, resnet34 (digits, seed 3, one thread)
RUN_ID_HASHES = {
    "none": ("49bb07168c", "8134364685", "84e3c790b7"),
    "init": ("bb23d20f2f", "82348df4e7", "6680a6f5ac"),
    "shuffle": ("deed35ea5a", "25404d5dc8", "65a4b72589"),
    "augment": ("9c19c44be0", "e7e29df123", "c0a4b266d2"),
    "cudnn": ("c44ede74cc", "2109c663b8", "b5421c096c"),
    "init+shuffle": ("806c5a8344", "14648ab34d", "bda92427d1"),
    "shuffle+cudnn": ("55e3eccbd9", "8c27a0ab77", "561ea4b94d"),
    "shuffle+augment+cudnn": ("9c11263ac1", "70abba3938", "b2e6ba2666"),
    "all": ("a650cb6fb8", "c72302eb59", "a477968411"),
    "bitflip": ("a4a697ee94", "ad1dfe6644", "94bfcbf0d7"),
}

#: presets override /data and /model from their own defaults list (seed 2, source=all, one thread)
PRESET_RUN_IDS = {
    "sources": "all-s0002-cifar10-resnet14-e500-0b1a9879f7",
    "bitflip": "all-s0002-cifar10-resnet14-e500-0b1a9879f7",
    "cifar100": "all-s0002-cifar100-resnet34-e200-795ec2d740",
    "cifar100_quick": "all-s0002-digits-resnet34-e2-2bef247a4d",
    "sources_quick": "all-s0002-digits-resnet14-e4-80253f7b4c",
    "tta_quick": "all-s0002-digits-resnet14-e4-b2ab191531",
    "sources_clean": "all-s0002-cifar10-resnet14-e500-4d8594eb95",
}


@pytest.mark.parametrize("source", sorted(RUN_ID_HASHES))
def test_every_source_and_model_composes_the_run_ids_of_version_0_1_0(cfg_factory, source):
    for model, digest in zip(MODELS, RUN_ID_HASHES[source]):
        cfg = cfg_factory("data=digits", f"model={model}", f"source={source}", "seed=3", "train.threads=1",
                          fast=False)
        assert run_id(cfg) == f"{source}-s0003-digits-{model}-e40-{digest}"


@pytest.mark.parametrize("preset", sorted(PRESET_RUN_IDS))
def test_presets_compose_the_run_ids_of_version_0_1_0(cfg_factory, preset):
    cfg = cfg_factory(f"experiment={preset}", "source=all", "seed=2", "train.threads=1", fast=False)
    assert run_id(cfg) == PRESET_RUN_IDS[preset]


@pytest.mark.parametrize("run", sorted(p.name for p in LEGACY_RUNS.iterdir()))
def test_a_legacy_run_is_composed_again_key_for_key(cfg_factory, run):
    """The command that trained a legacy run composes its config.yaml exactly, and its run id."""
    folder = LEGACY_RUNS / run
    old = OmegaConf.load(folder / "config.yaml")
    views = ",".join(old.eval.views)
    cfg = cfg_factory(f"source={old.source.name}", f"seed={old.seed}", f"train.epochs={old.train.epochs}",
                      f"eval.views=[{views}]", f"eval.features={str(old.eval.features).lower()}",
                      f"out_dir={old.out_dir}", fast=False)
    assert OmegaConf.to_container(cfg, resolve=True) == OmegaConf.to_container(old, resolve=True)
    assert run_id(cfg) == json.loads((folder / "run.json").read_text())["run_id"] == run
