"""Runs perturbed from epoch k (``source.from_epoch=k``) and the parent run whose first k epochs they share.

A run with ``source.from_epoch = k > 0`` trains its first k epochs exactly as the determinism
control of the same config does (every seed 1, deterministic kernels, no bit change), then applies
its source from epoch k on (docs/experiments/stability.md). Those k epochs are trained once: the
*parent* of every such run is that control run itself (``source=none``, ``seed=1``,
``source.from_epoch=0``, the same everything else), trained to the end and keeping its full
training state at the end of each epoch k its children start from (``record.keep_checkpoints``,
bookkeeping: the parent's run id is the control's). One parent serves every source and every k of
a config. Each child loads the parent's checkpoint of epoch k (run/parent.py) after checking it
against the parent's trajectory.

This module is the one place that says which config is whose parent: the local launcher (the
parents first), the SLURM launcher (the children's arrays wait for their parent's job), the trainer
(which checkpoint a child loads) and the preset planner all call it. Torch- and SLURM-free.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..config import IDENTITY_ROOTS, ConfigError, identity_items
from ..registry.sources import CONTROL, SOURCES

#: the source of every parent run: the determinism control
PARENT_SOURCE = CONTROL


def from_epoch(cfg: Any) -> int:
    """``source.from_epoch`` of a config (DictConfig, or a plain dict as pickled jobs hold), 0 when absent."""
    if isinstance(cfg, dict):
        value = (cfg.get("source") or {}).get("from_epoch")
    else:
        from omegaconf import OmegaConf

        value = OmegaConf.select(cfg, "source.from_epoch", default=0, throw_on_missing=False)
    return int(value or 0)


def row_label(label: str, k: int) -> str:
    """The report's row of a group perturbed from epoch k: today's label at k = 0 (today's runs),
    "Random Bit Change at epoch 5" otherwise."""
    return label if int(k) == 0 else f"{label} at epoch {int(k)}"


def check_from_epoch(cfg: Any) -> None:
    """Refuse ``source.from_epoch`` values that cannot mean anything (one message per case)."""
    k = from_epoch(cfg)
    if k == 0:
        return
    epochs, name = int(cfg.train.epochs), str(cfg.source.name)
    vary = list(cfg.source.vary)
    if k < 0 or k >= epochs:
        raise ConfigError(f"source.from_epoch={k} is invalid: the epoch from which the source applies must be 0 "
                          f"(from the start) .. {epochs - 1} (train.epochs={epochs} - 1).")
    if "init" in vary:
        raise ConfigError(f"source.from_epoch={k} with source={name}, which varies the initialisation: the "
                          f"weights are initialised once, before epoch 0, so there is nothing to initialise at epoch "
                          f"{k}. Perturb later with source=bitflip (one ulp of one weight at epoch {k}) or "
                          f"source=shuffle / augment (a new data order / augmentation from epoch {k} on); init "
                          f"takes source.from_epoch=0 only.")
    if not vary and bool(cfg.source.deterministic_kernels):
        raise ConfigError(f"source.from_epoch={k} with source={name}, which varies nothing: every replicate would "
                          f"be the parent run itself. Choose a source that varies something (bitflip, shuffle, "
                          f"augment, cudnn, ...) or leave source.from_epoch=0.")
    if int(cfg.train.snapshots) > 1:
        raise ConfigError(f"source.from_epoch={k} with train.snapshots={cfg.train.snapshots}: a run perturbed later "
                          f"is a single model (train.snapshots=1); accelerated ensembles start from the beginning.")


def parent_config(cfg: Any, keep: Sequence[int] = ()) -> Any:
    """The parent of ``cfg`` (a copy; ``cfg`` is not changed): the same config as the determinism
    control, seed 1, from epoch 0, keeping full checkpoints at the end of epochs ``keep`` (added to
    its own ``record.keep_checkpoints``). ``cfg`` may hold Hydra's node (the local launcher's job
    configs): it is kept, so the parent runs as any job of the sweep."""
    from omegaconf import OmegaConf, open_dict

    from ..registry.options import source_node

    parent = copy.deepcopy(cfg)
    with open_dict(parent):
        parent.source = OmegaConf.structured(source_node(SOURCES[PARENT_SOURCE]))
        parent.seed = 1
        parent.force = False
        kept = list(OmegaConf.select(parent, "record.keep_checkpoints", default=None) or [])
        if "record" not in parent:
            parent.record = {}
        parent.record.keep_checkpoints = sorted({int(e) for e in [*kept, *keep]})
    return parent


def _identity(cfg: Any) -> str:
    """The config's identity items as one string (the Hydra node, if any, is not read)."""
    from omegaconf import OmegaConf

    plain = {}
    for root in IDENTITY_ROOTS:
        node = cfg.get(root) if isinstance(cfg, dict) else OmegaConf.select(cfg, root)
        plain[root] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return json.dumps(identity_items(plain), sort_keys=True, default=str)


def parent_key(cfg: Any) -> str:
    """Equal for the configs that share a parent (and for that parent's own config)."""
    return _identity(parent_config(cfg))


@dataclass
class ParentPlan:
    """One parent of a sweep: its config, the epochs it keeps, the sweep's configs that start from it
    (indices) and the sweep's own config of it, if the sweep has that run (the control, seed 1)."""

    key: str
    config: Any
    keep: list[int] = field(default_factory=list)
    children: list[int] = field(default_factory=list)
    own: int | None = None


def plan_parents(configs: Sequence[Any]) -> list[ParentPlan]:
    """The parents the configs of a sweep need, in the order of their first child; each parent's
    ``config`` keeps checkpoints at every k its children start from (the sweep's own config of the
    control, where it has one, with those checkpoints added: ``configs[own]`` is not changed)."""
    plans: dict[str, ParentPlan] = {}
    for i, cfg in enumerate(configs):
        k = from_epoch(cfg)
        if k > 0:
            key = parent_key(cfg)
            plan = plans.setdefault(key, ParentPlan(key, cfg))
            plan.keep = sorted({*plan.keep, k})
            plan.children.append(i)
    if not plans:
        return []
    for i, cfg in enumerate(configs):
        if from_epoch(cfg) == 0:
            plan = plans.get(_identity(cfg))
            if plan is not None and plan.own is None:
                plan.own, plan.config = i, cfg
    for plan in plans.values():
        plan.config = parent_config(plan.config, plan.keep) if plan.own is None else \
            _keeping(configs[plan.own], plan.keep)
    return list(plans.values())


def _keeping(cfg: Any, keep: Sequence[int]) -> Any:
    """A copy of ``cfg`` that also keeps full checkpoints at ``keep`` (bookkeeping: same run id)."""
    from omegaconf import OmegaConf, open_dict

    out = copy.deepcopy(cfg)
    with open_dict(out):
        kept = list(OmegaConf.select(out, "record.keep_checkpoints", default=None) or [])
        if "record" not in out:
            out.record = {}
        out.record.keep_checkpoints = sorted({int(e) for e in [*kept, *keep]})
    return out


def parent_overrides(plan: ParentPlan) -> list[str]:
    """How the launchers show a parent job (it has no command-line overrides of its own)."""
    return [f"source={PARENT_SOURCE}", "seed=1", f"record.keep_checkpoints=[{','.join(map(str, plan.keep))}]",
            f"(parent of {len(plan.children)} run(s) perturbed from epoch {', '.join(map(str, plan.keep))})"]
