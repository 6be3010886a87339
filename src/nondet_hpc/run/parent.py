"""A run perturbed from epoch k starts from its parent's checkpoint (docs/experiments/stability.md).

Its first k epochs are the parent's (:mod:`nondet_hpc.sweep.parents`: the determinism control of
the same config, trained once). :func:`start_from_parent` finds the parent's folder, and loads
``checkpoints/epoch-K.pt`` only if everything agrees:

- the parent is DONE, and the checkpoint file is a regular file of bounded size, loaded with
  ``torch.load(weights_only=True)`` (tensors, numbers and strings only: nothing in it executes);
- the checkpoint's run id is the parent's (its identity: the run id hashes every key that decides
  what a run computes), its position is the end of epoch k (epoch k, batch 0, step k x steps per
  epoch);
- the parent's trajectory (``trajectory.npz``, read with ``allow_pickle=False``) is the parent's,
  recorded with this run's steps per epoch, and the fingerprint of the loaded parameters (SHA-256 of
  their bytes) equals the one it recorded at that step: a checkpoint replaced or edited since the
  parent wrote it is refused, naming the parent, and nothing trains from it.

Then the trainer goes on from that state: the varied shuffle/augment streams start anew with the
replicate seed, the bit change moves its weight at the start of epoch k, and the run's trajectory
begins with the parent's points before epoch k (they are this run's, bit for bit). run.json's
``parent`` records the parent's run id, folder, k, the step, the fingerprint and the checkpoint's
SHA-256.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .. import safeio
from ..config import ConfigError
from ..records.projection import FINGERPRINT_BYTES
from ..records.trajectory import Trajectory, read_trajectory
from ..rundir import DONE, TRAJECTORY, is_done, kept_checkpoint, read_run_json, run_dir, run_id
from ..sweep.parents import from_epoch, parent_config
from .models import bitflip_target
from .recorder import Recorder
from .recording import fingerprint_of
from .sources import Seeds, apply_bitflip, fresh_stream_states
from .train import Trainer, check_state


class ParentError(ConfigError):
    """The parent a run starts from is missing, unfinished, or does not match: the message names it."""


def _refuse(pid: str, pdir: Path, why: str, fix: str) -> ParentError:
    return ParentError(f"the parent run {pid} ({pdir}) {why}; nothing was trained from it. {fix}")


_RETRAIN = ("Retrain the parent with its checkpoints kept (rerun the sweep: its launcher runs the parent "
            "first), or move its folder away.")


def _parent_folder(cfg: Any, k: int) -> tuple[str, Path]:
    """The parent's run id and folder, checked to be a finished run with a kept checkpoint at k."""
    pcfg = parent_config(cfg)
    pid, pdir = run_id(pcfg), run_dir(pcfg)
    if not pdir.is_dir():
        raise _refuse(pid, pdir, f"does not exist, and this run's first {k} epochs are its",
                      "Run the sweep with its launcher (it trains the parent first), or the parent alone: python "
                      f"-m nondet_hpc {_parent_command(pcfg, k)}.")
    if not is_done(pdir):
        info, _ = read_run_json(pdir)
        state = (info or {}).get("state") or "no run.json"
        raise _refuse(pid, pdir, f"is not finished (no {DONE}; state: {state})",
                      "Wait for it or rerun it; this run starts once its parent is DONE.")
    if not safeio.is_regular(kept_checkpoint(pdir, k)):
        raise _refuse(pid, pdir, f"kept no full checkpoint at the end of epoch {k} "
                                 f"({kept_checkpoint(pdir, k).relative_to(pdir)} missing)",
                      f"Retrain it keeping that epoch: python -m nondet_hpc {_parent_command(pcfg, k)} force=true "
                      f"(its old folder is moved to runs/.replaced/), or run this sweep in another out_dir.")
    return pid, pdir


def _parent_command(pcfg: Any, k: int) -> str:
    return (f"source=none seed=1 out_dir={pcfg.out_dir} record.keep_checkpoints=[{k}] ... (the other keys of "
            f"this run)")


def _expected_fingerprint(traj: Trajectory, pid: str, pdir: Path, step: int, steps_per_epoch: int) -> bytes:
    if traj.run_id != pid:
        raise _refuse(pid, pdir, f"has the trajectory of run {traj.run_id} in its {TRAJECTORY}", _RETRAIN)
    if traj.steps_per_epoch != steps_per_epoch:
        raise _refuse(pid, pdir, f"trained {traj.steps_per_epoch} steps per epoch, this run {steps_per_epoch} (another "
                                 f"data set or batch size)", "Check the run's config against the parent's.")
    at = np.flatnonzero(traj.step == step)
    if not at.size:
        raise _refuse(pid, pdir, f"recorded no point at step {step} (the end of epoch {step // steps_per_epoch}) "
                                 f"in its {TRAJECTORY}, so its checkpoint there cannot be checked", _RETRAIN)
    return traj.fingerprint[int(at[0])].tobytes()


def _load(path: Path, pid: str, pdir: Path, device: torch.device) -> tuple[dict, str]:
    """The checkpoint's state (weights_only) and the SHA-256 of the bytes it was loaded from."""
    try:
        data = safeio.read_regular(path, safeio.MAX_CHECKPOINT)
    except safeio.RefusedFile as e:
        raise _refuse(pid, pdir, f"has a checkpoint that was refused ({e.why}: {path})", _RETRAIN) from None
    try:
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise _refuse(pid, pdir, f"has a checkpoint that is not one this package wrote ({path}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]})", _RETRAIN) from None
    try:
        return check_state(state, path, pid), hashlib.sha256(data).hexdigest()
    except ConfigError as e:
        raise _refuse(pid, pdir, f"has a checkpoint that does not match: {e}", _RETRAIN) from None


def start_from_parent(cfg: Any, trainer: Trainer, recorder: Optional[Recorder], fresh_streams: dict) -> dict:
    """Load the parent's checkpoint at epoch ``source.from_epoch`` into ``trainer`` after every check
    (module docstring); return run.json's ``parent`` record. The caller applies the bit change."""
    k = from_epoch(cfg)
    pid, pdir = _parent_folder(cfg, k)
    spe = len(trainer.batches)
    step = k * spe
    try:
        traj = read_trajectory(pdir / TRAJECTORY)
    except safeio.RefusedFile as e:
        raise _refuse(pid, pdir, f"has a trajectory file that was refused ({e.why})", _RETRAIN) from None
    expected = _expected_fingerprint(traj, pid, pdir, step, spe)
    path = kept_checkpoint(pdir, k)
    state, digest = _load(path, pid, pdir, trainer.device)
    progress = state["progress"]
    if (progress["epoch"], progress["batch"], progress["step"]) != (k, 0, step):
        raise _refuse(pid, pdir, f"has in {path.name} the state at epoch {progress['epoch']} batch {progress['batch']} "
                                 f"step {progress['step']}, not at the end of epoch {k} (step {step})", _RETRAIN)
    trainer.model.load_state_dict(state["model"])
    found = recorder.current_fingerprint() if recorder is not None else bytes.fromhex(fingerprint_of(trainer.model))
    if len(found) != FINGERPRINT_BYTES or found != expected:
        raise _refuse(pid, pdir, f"has in {path} weights whose fingerprint ({found.hex()[:16]}...) is not the one its "
                                 f"trajectory recorded at the end of epoch {k} ({expected.hex()[:16]}...): the "
                                 f"checkpoint was replaced or tampered with", _RETRAIN)
    trainer.start_from(state, fresh_streams)
    if recorder is not None:
        differ = recorder.adopt(traj, step)
        if differ:
            raise _refuse(pid, pdir, f"recorded its trajectory with other settings ({', '.join(differ)} differ)",
                          "Keep the record.* settings of the parent in its children.")
    return {"run_id": pid, "run_dir": str(pdir), "epoch": k, "step": step, "fingerprint": expected.hex(),
            "checkpoint": str(path.relative_to(pdir)), "checkpoint_sha256": digest}


def begin_child(cfg: Any, trainer: Trainer, recorder: Optional[Recorder], seeds: Seeds) -> dict:
    """Start a run perturbed from epoch k (no checkpoint of its own yet): its parent's state at the
    end of epoch k (:func:`start_from_parent`), its varied streams anew from there, and the bit
    change at the start of epoch k. Returns run.json's ``parent`` and ``bitflip`` entries."""
    parent = start_from_parent(cfg, trainer, recorder, fresh_stream_states(seeds, list(cfg.source.vary)))
    bitflip = None
    if seeds.bitflip is not None:  # the same rule as at initialisation: which weight, which direction
        target = bitflip_target(trainer.model, cfg)
        name = next(n for n, p in trainer.model.named_parameters() if p is target)
        bitflip = {**apply_bitflip(target, seeds.bitflip), "param": name, "epoch": parent["epoch"],
                   "step": parent["step"]}
    return {"parent": parent, "bitflip": bitflip}
