"""A run's configuration as a sweep folder compares it, and the rule that a folder never mixes
runs of two configurations.

``PlannedRun`` is one composed job of a sweep (its run id, folder, flattened identity and config
hash), made by :func:`plan_run` exactly as the trainer names its run; :func:`check_compatible`
refuses a launch whose runs differ from those recorded in sweep.json (or, without one, in the
run folders' run.json) beyond the keys a sweep may vary. Used by the SLURM launcher, the reducer
job's next wave (:mod:`.waves`) and the local launcher's waves. Torch- and SLURM-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .. import rundir
from ..config import identity_items, key_matches


class SweepConfigMismatch(ValueError):
    """The sweep folder holds runs of another configuration."""


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def config_hash(flat: Mapping[str, Any], ignore: Iterable[str] = ()) -> str:
    ignore = list(ignore)
    items = {k: v for k, v in flat.items() if not key_matches(k, ignore)}
    return hashlib.sha256(_canonical(items).encode()).hexdigest()[:16]


def varying_keys(flats: Sequence[Mapping[str, Any]]) -> list[str]:
    """Leaf keys whose value differs between runs (or that only some runs have)."""
    if not flats:
        return []
    keys = set().union(*[set(f) for f in flats])
    out = []
    for k in sorted(keys):
        vals = {_canonical(f.get(k, "<absent>")) for f in flats}
        if len(vals) > 1:
            out.append(k)
    return out


def _explain_diff(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 12) -> str:
    lines = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if _canonical(a) != _canonical(b):
            lines.append(f"    {k}: {_canonical(a)} (recorded) != {_canonical(b)} (now)")
    more = f"\n    ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


@dataclasses.dataclass
class PlannedRun:
    """One composed job of a sweep: what the launcher hands to ``submit.submit_sweep``.

    ``flat`` is the run's configuration as compared between submissions of one sweep folder: the
    trainer's identity items (``nondet_hpc.config.identity_items``), flattened to dotted keys.
    """

    run_id: str
    run_dir: Path
    overrides: list[str]
    cfg: Any  # resolved job config (DictConfig or dict) without the hydra node
    flat: dict[str, Any]  # flattened plain config (for identity checks)
    config_hash: str = ""
    force: bool = False
    # digest of what decides this job's config (the launcher's composer.plan_key + its own
    # settings); recorded so an identical rerun finds the run without composing it. None: unknown
    plan_key: str | None = None
    # the resolved config as plain data: what the job pickle carries (~100x faster to pickle)
    container: dict | None = None

    @property
    def config(self) -> Any:
        """The run's config as the job gets it: the plain container where there is one, else ``cfg``."""
        return self.container if self.container is not None else self.cfg


class _Fields(dict):
    """A resolved container read the way ``rundir.run_id`` reads a config (``cfg.source.name``):
    the run id from the one ``to_container`` a job needs, not from a second one."""

    def __getattr__(self, key: str) -> Any:
        try:
            value = self[key]
        except KeyError:
            raise AttributeError(key) from None
        return _Fields(value) if isinstance(value, dict) else value


def plan_run(cfg: Any, overrides: Sequence[str], ignore_keys: Sequence[str] = (),
             plan_key: str | None = None) -> PlannedRun:
    """Build a PlannedRun from a resolved job config (DictConfig or dict).

    ``ignore_keys``: more keys left out of the config hash; the bookkeeping keys
    (config.BOOKKEEPING_KEYS) are never in a run's identity to begin with.
    """
    from omegaconf import DictConfig, OmegaConf

    dcfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    container = OmegaConf.to_container(dcfg, resolve=True)
    flat = dict(identity_items(container))
    run_id = rundir.run_id(_Fields(container))
    return PlannedRun(run_id=run_id, run_dir=(Path(str(container["out_dir"])) / rundir.RUNS / run_id).absolute(),
                      overrides=list(overrides), cfg=dcfg, flat=flat,
                      config_hash=config_hash(flat, ignore_keys), force=bool(container.get("force", False)),
                      plan_key=plan_key, container=container)


def manifest_from_runs(out_dirs: Iterable[Path], ignore_keys: Sequence[str] = ()) -> dict | None:
    """What run folders written without sweep.json (the local launcher) say, in sweep.json's shape.

    Each run's identity comes from its run.json (``identity`` + ``seed``, as ``task.run`` writes
    them); the runs form one earlier "submission" for :func:`check_compatible`, so a SLURM sweep
    into a local folder follows the same rules as one into a SLURM folder. None: no such run.
    """
    runs: dict[str, dict] = {}
    flats: dict[str, dict] = {}
    folders = []
    for out_dir in dict.fromkeys(Path(d) for d in out_dirs):
        if not (out_dir / rundir.RUNS).is_dir():
            continue
        folders.append(str(out_dir))
        for run in rundir.list_runs(out_dir):
            data, _why = rundir.read_run_json(run)
            if not data or not isinstance(data.get("identity"), dict) or "seed" not in data:
                continue  # never started, or not ours: nothing to compare
            flat = {**data["identity"], "seed": data["seed"]}
            flats[run.name] = flat
            runs[run.name] = {"run_dir": str(run), "config_hash": config_hash(flat, ignore_keys),
                              "jobs": [{"local": True}]}
    if not runs:
        return None
    vary = varying_keys(list(flats.values()))
    first = next(iter(flats.values()))
    label = f"the runs in {', '.join(f + '/runs' for f in folders)} (their run.json; no sweep.json)"
    return {"sweep_dir": ", ".join(folders), "runs": runs, "submissions": [{
        "n": 0, "label": label, "base_config": {k: v for k, v in first.items() if k not in set(vary)},
        "varying_keys": vary, "arrays": [{"local": True}],
        "run_values": {rid: {k: f[k] for k in vary if k in f} for rid, f in flats.items()}}]}


def _threads_hint(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """The thread count is part of a run's identity on CPU (it changes results): say how to match."""
    was, now = old.get("train.threads"), new.get("train.threads")
    if was == now or was is None:
        return ""
    if was == 0:
        return ("\n  These runs were made when train.threads=0 was not resolved; it is now resolved to the count "
                "the run uses (on SLURM: cpus_per_task), so they keep their old ids. See docs/troubleshooting.md, "
                "\"train.threads\".")
    return (f"\n  The recorded runs used {was} CPU thread(s): pass train.threads={was} (and, on SLURM, "
            f"hydra.launcher.cpus_per_task={was}) to add runs with the same numerics.")


_HINT = ("  Use another out_dir for a different configuration (e.g. out_dir=outputs/<name>), or "
         "delete the folder to start afresh.")


def _check_run_hashes(manifest: Mapping, planned: Sequence[PlannedRun]) -> None:
    """A run id already recorded (with jobs) must come with the same config hash."""
    for run in planned:
        rec = manifest["runs"].get(run.run_id)
        if not (rec and rec.get("jobs") and rec.get("config_hash")) or rec["config_hash"] == run.config_hash:
            continue
        old: dict = {}
        for sub in reversed(manifest["submissions"]):
            if run.run_id in sub.get("run_values", {}):
                old = {**sub.get("base_config", {}), **sub["run_values"][run.run_id]}
                break
        detail = _explain_diff(old, run.flat) if old else "    (the recorded config hash differs)"
        raise SweepConfigMismatch(
            f"sweep folder {manifest.get('sweep_dir', '')} already has run {run.run_id} with another "
            f"configuration:\n{detail}\n{_HINT}")


def check_compatible(manifest: Mapping, planned: Sequence[PlannedRun], run_keys: Sequence[str],
                     ignore_keys: Sequence[str]) -> None:
    """Refuse to mix runs of two configurations in one sweep folder.

    Two checks: (1) a run id already recorded must come with the same config hash; (2) the
    base config (everything but the keys this sweep or an earlier one varied, ``run_keys`` and
    ``ignore_keys``) must equal the one recorded by earlier submissions.
    """
    _check_run_hashes(manifest, planned)
    # only submissions that queued something constrain later ones (a refused sbatch ran nothing)
    earlier = [s for s in manifest["submissions"] if s.get("base_config") is not None and s.get("arrays")]
    if not earlier or not planned:
        return
    skip = set(varying_keys([r.flat for r in planned])) | set(ignore_keys) | set(run_keys)
    for s in earlier:
        skip |= set(s.get("varying_keys", []))
    skip_list = sorted(skip)
    new_base = {k: v for k, v in planned[0].flat.items() if not key_matches(k, skip_list)}
    for s in earlier:
        old_base = {k: v for k, v in s["base_config"].items() if not key_matches(k, skip_list)}
        if _canonical(old_base) != _canonical(new_base):
            where = s.get("label") or f"submission {s.get('n')} of {s.get('time')}"
            raise SweepConfigMismatch(
                f"sweep folder {manifest.get('sweep_dir', '')} holds runs of another configuration "
                f"({where}):\n{_explain_diff(old_base, new_base)}{_threads_hint(old_base, new_base)}\n"
                f"  Keys allowed to differ between runs of one sweep folder: {', '.join(run_keys)} "
                f"(hydra.launcher.run_keys) and the keys a sweep varies.\n{_HINT}")
