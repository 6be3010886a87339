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
import hashlib
import json
import logging
import pickle
import re
from typing import Any, Callable, Hashable, Iterator

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

#: an interpolation through a resolver (``${hydra:...}``, ``${oc.env:...}``, ``${now:...}``): its
#: value is not decided by the config text, so such a config gets no plan key
_RESOLVER = re.compile(r"\$\{\s*[\w.]+\s*:")


def _hydra_private() -> tuple[Callable[[list, DictConfig], None], Callable[..., str]] | None:
    """(apply parsed overrides to a config, the override_dirname builder), or None when missing."""
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname

        return ConfigLoaderImpl._apply_overrides_to_config, get_overrides_dirname
    except (ImportError, AttributeError):
        return None


def _copy_job(cfg: DictConfig) -> DictConfig:
    """A job part's copy: a pickle round trip (OmegaConf pickles its flags and types) is ~2.5x faster
    than deepcopy; deepcopy where something in the config does not pickle."""
    try:
        return pickle.loads(pickle.dumps(cfg, protocol=pickle.HIGHEST_PROTOCOL))
    except (pickle.PicklingError, TypeError, AttributeError):
        return copy.deepcopy(cfg)


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

    ``job_only`` (the SLURM launcher's mode): return each job's config WITHOUT its ``hydra`` node.
    Copying Hydra's node costs ~3 ms a job, more than everything else the launcher does with a
    job; the sweeper's batch validation discards what it gets, and the launcher only needs the
    job part. Hydra overrides (``hydra.*``) then count as group overrides (composed in full), and
    a job config that reads ``${hydra:...}`` turns the mode off (it needs its own hydra node).
    ``known``: plan keys (:meth:`plan_key`) of jobs composed and planned by an earlier launch of
    this sweep folder; the validation does not compose those again (same key, same config), and
    gets the group set's shared, unmodified config instead. The launcher empties ``known`` once
    the validation is over and it needs the jobs' real configs.
    ``salt``: goes into every plan key (what decides a run besides its config, e.g. launcher settings).
    """

    def __init__(self, config_loader: Any, *, job_only: bool = False, known: Any = (), salt: str = "") -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self.loader = config_loader
        self.slow = config_loader.load_sweep_config
        self.parser = OverridesParser.create()
        self.private = _hydra_private()
        self.enabled = self.private is not None
        self.job_only = job_only
        self.known = known
        self.salt = salt  # what else decides a run besides its config (the launcher's settings)
        self.master: DictConfig | None = None
        self.bases = GroupedComposer(self._compose_base)
        self.job_bases: GroupedComposer = GroupedComposer(self._job_part, copy_config=_copy_job)
        self.parsed: dict[str, Any] = {}  # override line -> Hydra's parsed override (parsing is ~1 ms)
        self.kinds: dict[tuple[str, bool], bool] = {}  # (line, job_only) -> is it a group override
        self.fingerprints: dict[tuple[str, ...], str | None] = {}
        self.checked: set[tuple[str, ...]] = set()  # group sets whose first job was compared with Hydra's
        self.cache: dict[tuple[str, ...], DictConfig] = {}
        # slow: Hydra's own compositions; fast: job configs made by copy + value overrides
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

    def _compose_base(self, groups: tuple[str, ...]) -> DictConfig:
        self.stats["slow"] += 1
        return self.slow(self.master, list(groups))

    def _job_part(self, groups: tuple[str, ...]) -> DictConfig:
        """The group set's composition without its hydra node (what job_only mode copies)."""
        cfg = self.bases.get(groups)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    def _is_group(self, override: Any) -> bool:
        if override.package is not None or override.is_delete() or override.is_add() or override.is_force_add():
            return True  # anything that may change the defaults tree: the slow path decides
        if self.job_only and override.is_hydra_override():
            return True  # no hydra node in job_only configs: compose it with the group set
        try:
            return bool(self.loader.repository.group_exists(override.key_or_group))
        except Exception:  # noqa: BLE001 - unknown: be safe
            return True

    def _split(self, overrides: list[str]) -> tuple[tuple[str, ...], list[Any], list[Any]]:
        """(group override lines, parsed value overrides, every parsed override)."""
        for line in overrides:
            if line not in self.parsed:
                self.parsed[line] = self.parser.parse_overrides([line])[0]
        parsed = [self.parsed[line] for line in overrides]
        kinds = []
        for line, o in zip(overrides, parsed):
            if (line, self.job_only) not in self.kinds:
                self.kinds[(line, self.job_only)] = self._is_group(o)
            kinds.append(self.kinds[(line, self.job_only)])
        groups = tuple(o.input_line for o, g in zip(parsed, kinds) if g)
        return groups, [o for o, g in zip(parsed, kinds) if not g], parsed

    def plan_key(self, master_config: DictConfig, overrides: list[str]) -> str | None:
        """A digest that decides the job's config: its group set's composition + its value overrides.

        Equal keys give equal configs (value overrides are applied to the group set's composition,
        nothing else goes in), so a launcher may look a job up by key instead of composing it.
        None when that does not hold: the fast path is off, or the config reads a resolver
        (``${oc.env:...}``, ``${hydra:...}``), whose value the text does not fix.
        """
        if not self.enabled:
            return None
        self.master = master_config
        groups, values, _ = self._split(list(overrides))
        if groups not in self.fingerprints:
            text = json.dumps(OmegaConf.to_container(self.job_bases.get(groups), resolve=False),
                              sort_keys=True, default=str)
            self.fingerprints[groups] = None if _RESOLVER.search(text) else hashlib.sha256(text.encode()).hexdigest()
        base = self.fingerprints[groups]
        if base is None:
            return None
        return hashlib.sha256("\n".join([self.salt, base, *(o.input_line for o in values)]).encode()).hexdigest()[:32]

    def __call__(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        key = tuple(sweep_overrides)
        if key in self.cache:
            return self.cache.pop(key)  # the launcher's call: hand over the validated config
        if self.known and self.job_only and self.enabled:
            pk = self.plan_key(master_config, list(sweep_overrides))
            if pk is not None and pk in self.known:
                # composed and planned by an earlier launch: the sweeper's validation reads
                # nothing of it, and the launcher asks again only when it has to compose
                return self.job_bases.bases[self._split(list(sweep_overrides))[0]]
        cfg = self._compose(master_config, list(sweep_overrides))
        self.cache[key] = cfg  # the sweeper's validation only reads it
        return cfg

    def _compose(self, master_config: DictConfig, overrides: list[str]) -> DictConfig:
        if not self.enabled or self.private is None:
            self.stats["slow"] += 1
            return self.slow(master_config, overrides)
        apply_overrides, overrides_dirname = self.private
        self.master = master_config
        groups, values, parsed = self._split(overrides)
        first = groups not in self.checked  # (its base may exist already: plan_key composes it)
        self.checked.add(groups)
        if self.job_only and first and "${hydra:" in json.dumps(
                OmegaConf.to_container(self.job_bases.get(groups), resolve=False), default=str):
            self.job_only = False  # the job reads its own hydra node: give it one
        if self.job_only:
            cfg = self.job_bases.get(groups)
            apply_overrides(values, cfg)
        else:
            cfg = self.bases.get(groups)
            apply_overrides(values, cfg)
            task = [o for o in parsed if not o.is_hydra_override()]
            with open_dict(cfg.hydra):
                cfg.hydra.overrides.task = [o.input_line for o in task]
                dn = cfg.hydra.job.config.override_dirname
                cfg.hydra.job.override_dirname = overrides_dirname(
                    overrides=task, kv_sep=dn.kv_sep, item_sep=dn.item_sep, exclude_keys=dn.exclude_keys)
        if first:
            slow = self.slow(master_config, overrides)
            self.stats["slow"] += 1
            want = OmegaConf.to_container(slow, resolve=False)
            if self.job_only:
                want.pop("hydra", None)
            if want != OmegaConf.to_container(cfg, resolve=False):
                log.warning("fast sweep composition differs from Hydra's for %s: composing every job "
                            "the slow way", overrides)
                self.enabled = False
                return slow
        self.stats["fast"] += 1
        return cfg
