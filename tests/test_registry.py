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

from nondet_hpc.config import BOOKKEEPING_KEYS, key_matches
from nondet_hpc.rundir import run_id

LEGACY_RUNS = Path(__file__).parent / "data" / "legacy_0_1_0" / "runs"
MODELS = ("resnet14", "resnet18", "resnet34")
#: Models whose runs keep their ids. After version 0.1.0, model=resnet18 became the authors' option-A
#: ResNet-18 and this package's option-B one was renamed resnet18b: both runs changed model, so both
#: changed id (test_resnet18_is_now_the_authors_and_its_runs_changed_id).
KEPT = ("resnet14", "resnet34")

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
        if model not in KEPT:
            continue
        cfg = cfg_factory("data=digits", f"model={model}", f"source={source}", "seed=3", "train.threads=1",
                          fast=False)
        assert run_id(cfg) == f"{source}-s0003-digits-{model}-e40-{digest}"


def test_resnet18_is_now_the_authors_and_its_runs_changed_id(cfg_factory):
    """model=resnet18 composes the authors' option-A network (no shortcut key: another family), and
    resnet18b this package's option-B one under its new name; neither composes a 0.1.0 id."""
    old = {f"{source}-s0003-digits-resnet18-e40-{digests[1]}" for source, digests in RUN_ID_HASHES.items()}
    for model, node in (("resnet18", {"name": "resnet18", "widths": [64, 128, 256, 512], "blocks": [2, 2, 2, 2]}),
                        ("resnet18b", {"name": "resnet18b", "widths": [64, 128, 256, 512], "blocks": [2, 2, 2, 2],
                                       "shortcut": "B"})):
        cfg = cfg_factory("data=digits", f"model={model}", "source=init", "seed=3", "train.threads=1", fast=False)
        assert OmegaConf.to_container(cfg.model) == node
        assert run_id(cfg).startswith(f"init-s0003-digits-{model}-e40-") and run_id(cfg) not in old


@pytest.mark.parametrize("preset", sorted(PRESET_RUN_IDS))
def test_presets_compose_the_run_ids_of_version_0_1_0(cfg_factory, preset):
    cfg = cfg_factory(f"experiment={preset}", "source=all", "seed=2", "train.threads=1", fast=False)
    assert run_id(cfg) == PRESET_RUN_IDS[preset]


@pytest.mark.parametrize("run", sorted(p.name for p in LEGACY_RUNS.iterdir()))
def test_a_legacy_run_is_composed_again_key_for_key(cfg_factory, run):
    """The command that trained a legacy run composes its config.yaml exactly, and its run id.

    Exactly, but for keys added since: each must sit at its neutral default (config.NEUTRAL_DEFAULTS)
    or be bookkeeping, so it cannot change what the run computes."""
    from nondet_hpc.config import BOOKKEEPING_KEYS, NEUTRAL_DEFAULTS, key_matches

    folder = LEGACY_RUNS / run
    old = OmegaConf.load(folder / "config.yaml")
    views = ",".join(old.eval.views)
    cfg = cfg_factory(f"source={old.source.name}", f"seed={old.seed}", f"train.epochs={old.train.epochs}",
                      f"eval.views=[{views}]", f"eval.features={str(old.eval.features).lower()}",
                      f"out_dir={old.out_dir}", fast=False)
    new, was = OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(old, resolve=True)
    for section in set(new) - set(was):  # whole sections added since (record, barriers): bookkeeping only
        assert key_matches(section, BOOKKEEPING_KEYS), section
        del new[section]
    for section, node in new.items():
        for key in set(node) - set(was.get(section, {})) if isinstance(node, dict) else ():
            dotted = f"{section}.{key}"
            assert (dotted in NEUTRAL_DEFAULTS and node[key] == NEUTRAL_DEFAULTS[dotted]) or \
                key_matches(dotted, BOOKKEEPING_KEYS), dotted
            del node[key]
    assert new == was
    assert run_id(cfg) == json.loads((folder / "run.json").read_text())["run_id"] == run


# --- the registries are the one declaration of each source and model ----------------------------
def test_the_source_and_model_options_are_the_registries_and_nothing_else():
    from hydra.core.config_store import ConfigStore

    from nondet_hpc.config import conf_dir
    from nondet_hpc.registry.models import MODELS
    from nondet_hpc.registry.options import register_configs
    from nondet_hpc.registry.sources import SOURCES

    register_configs()
    store = ConfigStore.instance()
    assert sorted(store.list("source")) == sorted(f"{name}.yaml" for name in SOURCES)
    assert sorted(store.list("model")) == sorted(f"{name}.yaml" for name in MODELS)
    assert not (Path(conf_dir()) / "source").exists() and not (Path(conf_dir()) / "model").exists()


def test_every_source_names_declared_streams_and_a_distinct_table_row():
    from nondet_hpc.registry.sources import SOURCES, STREAMS

    for s in SOURCES.values():
        assert set(s.vary) <= set(STREAMS), s
    assert len({s.order for s in SOURCES.values()}) == len(SOURCES)
    assert len({s.label for s in SOURCES.values()}) == len(SOURCES)


@pytest.mark.parametrize("name", ("resnet14", "resnet18b", "resnet34"))
def test_every_model_builds_initialises_and_names_a_float32_bitflip_parameter(name):
    import dataclasses

    import torch

    from nondet_hpc.registry.models import FAMILIES, INIT_RULES, MODELS as REGISTERED, config_node
    from nondet_hpc.run.models import bitflip_target, build_model, init_weights
    from nondet_hpc.run.zoo import FAMILIES as BUILDERS

    entry = REGISTERED[name]
    assert entry.family in FAMILIES and entry.family in BUILDERS and entry.init in INIT_RULES
    node = config_node(entry)
    assert [f.name for f in dataclasses.fields(node)] == ["name", *entry.options]
    model = build_model(name, 10, 1)
    init_weights(model, torch.Generator().manual_seed(0))
    target = bitflip_target(model)
    assert target.dtype == torch.float32 and any(target is p for p in model.parameters())


def test_an_unregistered_model_name_is_refused_before_anything_is_written(cfg_factory, tmp_path):
    from nondet_hpc.config import ConfigError
    from nondet_hpc.run import task

    with pytest.raises(ConfigError, match=r"model.name='resnet99' is not a registered model; valid: resnet14, "
                                          r"resnet18b, resnet34, linearnet"):
        task.run(cfg_factory("model.name=resnet99"))
    assert not list((tmp_path / "sweep").glob("runs/*"))


def test_a_model_of_an_existing_family_is_one_registry_entry(cfg_factory, monkeypatch):
    """The extension point: one entry, and model=NAME composes, builds, initialises and has a
    bit-change target; its run id carries its name and keys."""
    import torch
    from hydra.core.config_store import ConfigStore

    from nondet_hpc.registry import models as registry
    from nondet_hpc.registry.options import register_configs
    from nondet_hpc.run.models import bitflip_target, init_weights, model_from_config

    entry = registry.Model("resnet8", "resnet", {"widths": (8, 16), "blocks": (1, 1), "shortcut": "A"},
                           "kaiming_zero_residual", "layers.0.conv1.weight", None, "a test's two-stage ResNet")
    monkeypatch.setitem(registry.MODELS, entry.name, entry)
    register_configs()
    try:
        cfg = cfg_factory("model=resnet8", "seed=4")
    finally:
        ConfigStore.instance().repo["model"].pop("resnet8.yaml")
    assert OmegaConf.to_container(cfg.model) == {"name": "resnet8", "widths": [8, 16], "blocks": [1, 1],
                                                 "shortcut": "A"}
    assert run_id(cfg).startswith("none-s0004-digits-resnet8-e2-")
    model = model_from_config(cfg)
    init_weights(model, torch.Generator().manual_seed(0))
    assert bitflip_target(model).shape == (8, 8, 3, 3)


def test_the_docs_list_every_source_and_model():
    from nondet_hpc.registry.models import MODELS as REGISTERED
    from nondet_hpc.registry.sources import SOURCES

    docs = Path(__file__).resolve().parents[1] / "docs"
    sources = (docs / "sources.md").read_text()
    for s in SOURCES.values():
        row = f"| `{s.name}` | {s.label} | {', '.join(s.vary) or '-'} | " \
              f"{'deterministic' if s.deterministic_kernels else 'nondeterministic'} |"
        assert row in sources, row
    configuration = (docs / "configuration.md").read_text()
    for name in [*SOURCES, *REGISTERED]:
        assert f"`{name}`" in configuration, name
