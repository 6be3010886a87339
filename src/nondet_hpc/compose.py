"""Composing the configs of a large sweep fast: the ONE module that touches Hydra's private names.

Hydra composes every job from scratch (~0.07 s each; a sweep's jobs are composed twice, by the
sweeper's batch validation and by the launcher): 700 runs would wait ~100 s for the first sbatch.
A sweep's jobs differ mostly in value overrides (``seed=7``), which Hydra applies after building
the defaults tree anyway. So compose once per distinct set of *group* overrides (``source=init``)
and apply the value overrides to a copy (:class:`GroupedComposer`, used by the launcher and by
``nondet_hpc.experiments``).

Applying overrides exactly as Hydra does needs ``ConfigLoaderImpl._apply_overrides_to_config``
and ``get_overrides_dirname`` (private). :func:`_hydra_private` looks them up; when a Hydra
release renames them, :class:`FastSweepComposer` composes every job with Hydra's public
``load_sweep_config`` instead (slower, same configs). tests/test_compose.py checks both paths
against Hydra's own composition.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Callable, Hashable, Iterator

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


def _hydra_private() -> tuple[Callable[[list, DictConfig], None], Callable[..., str]] | None:
    """(apply parsed overrides to a config, the override_dirname builder), or None when missing."""
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname

        return ConfigLoaderImpl._apply_overrides_to_config, get_overrides_dirname
    except (ImportError, AttributeError):
        return None


class GroupedComposer:
    """One full composition per distinct key of group choices; every caller gets its own copy."""

    def __init__(self, compose: Callable[[Any], DictConfig],
                 copy_config: Callable[[DictConfig], DictConfig] = copy.deepcopy) -> None:
        self.compose = compose
        self.copy_config = copy_config
        self.bases: dict[Hashable, DictConfig] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self.bases

    def get(self, key: Hashable) -> DictConfig:
        if key not in self.bases:
            self.bases[key] = self.compose(key)
        return self.copy_config(self.bases[key])


class FastSweepComposer:
    """A stand-in for the config loader's ``load_sweep_config`` during one sweep.

    Group overrides (and anything that may change the defaults tree: ``+``/``~``/``++``, a package)
    go through Hydra's composition once per distinct set; value overrides are applied to a copy
    with Hydra's own function, and the override metadata is set as Hydra sets it. The first job
    of every group set is also composed the slow way and compared; any difference switches the
    fast path off for the whole sweep. A config composed for the sweeper's validation is kept
    until the launcher asks for the same job.
    """

    def __init__(self, config_loader: Any) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self.loader = config_loader
        self.slow = config_loader.load_sweep_config
        self.parser = OverridesParser.create()
        self.private = _hydra_private()
        self.enabled = self.private is not None
        self.master: DictConfig | None = None
        self.bases = GroupedComposer(lambda groups: self.slow(self.master, list(groups)))
        self.cache: dict[tuple[str, ...], DictConfig] = {}
        self.stats = {"fast": 0, "slow": 0}

    @contextlib.contextmanager
    def installed(self) -> Iterator["FastSweepComposer"]:
        """Replace the loader's ``load_sweep_config`` for the ``with`` block, restore it after."""
        self.loader.load_sweep_config = self
        try:
            yield self
        finally:
            if self.loader.load_sweep_config is self:
                self.loader.load_sweep_config = self.slow
            self.cache.clear()

    def _is_group(self, override: Any) -> bool:
        if override.package is not None or override.is_delete() or override.is_add() or override.is_force_add():
            return True  # anything that may change the defaults tree: the slow path decides
        try:
            return bool(self.loader.repository.group_exists(override.key_or_group))
        except Exception:  # noqa: BLE001 - unknown: be safe
            return True

    def __call__(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        key = tuple(sweep_overrides)
        if key in self.cache:
            return self.cache.pop(key)  # the launcher's call: hand over the validated config
        cfg = self._compose(master_config, list(sweep_overrides))
        self.cache[key] = cfg  # the sweeper's validation only reads it
        return cfg

    def _compose(self, master_config: DictConfig, overrides: list[str]) -> DictConfig:
        if not self.enabled or self.private is None:
            self.stats["slow"] += 1
            return self.slow(master_config, overrides)
        apply_overrides, overrides_dirname = self.private
        parsed = self.parser.parse_overrides(overrides)
        groups = tuple(o.input_line for o in parsed if self._is_group(o))
        first = groups not in self.bases
        self.master = master_config
        cfg = self.bases.get(groups)
        apply_overrides([o for o in parsed if not self._is_group(o)], cfg)
        task = [o for o in parsed if not o.is_hydra_override()]
        with open_dict(cfg.hydra):
            cfg.hydra.overrides.task = [o.input_line for o in task]
            dn = cfg.hydra.job.config.override_dirname
            cfg.hydra.job.override_dirname = overrides_dirname(
                overrides=task, kv_sep=dn.kv_sep, item_sep=dn.item_sep, exclude_keys=dn.exclude_keys)
        if first:
            slow = self.slow(master_config, overrides)
            self.stats["slow"] += 1
            if OmegaConf.to_container(slow, resolve=False) != OmegaConf.to_container(cfg, resolve=False):
                log.warning("fast sweep composition differs from Hydra's for %s: composing every job "
                            "the slow way", overrides)
                self.enabled = False
                return slow
        self.stats["fast"] += 1
        return cfg
