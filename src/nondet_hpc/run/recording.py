"""The ``record.*`` settings of a run: what it keeps of its training (task.py calls these).

- :func:`check_record`: the settings refused before anything is written (one message per case);
- :func:`make_recorder`: the run's :class:`~.recorder.Recorder` (None with ``record.trajectory=false``);
- :func:`write_records`: after training, before DONE: the trajectory file and the final weights
  (safetensors; not above ``record.weights_max_params``), and run.json's ``record`` entry.

Every key is bookkeeping (config.BOOKKEEPING_KEYS): recording changes no bit of training
(tests/test_recorder.py), so turning it on or off keeps the run id. A resumed run must keep the
settings it started with (its checkpoint's recorder state refuses others, naming the keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch.nn as nn
from omegaconf import OmegaConf

from ..config import ConfigError, RecordConfig
from ..records.projection import MAX_SKETCH_DIM, Layout, fingerprint
from ..records.schedule import Grid
from ..rundir import TRAJECTORY, WEIGHTS
from ..sweep.parents import from_epoch
from .data import Dataset, training_batches
from .recorder import Recorder, model_arrays, write_model_weights


def record_settings(cfg: Any) -> RecordConfig:
    """``cfg.record`` with the schema's defaults for keys it lacks (a config pickled by an older
    version has no ``record`` node and records with the defaults)."""
    node = OmegaConf.select(cfg, "record") if not isinstance(cfg, dict) else cfg.get("record")
    given = OmegaConf.to_container(node, resolve=True) if node is not None and not isinstance(node, dict) else \
        dict(node or {})
    known = {k: v for k, v in given.items() if k in RecordConfig.__dataclass_fields__}
    return RecordConfig(**known)


def grid_of(rec: RecordConfig, start_epoch: int = 0) -> Grid:
    """The recording grid of ``rec``; a run perturbed from epoch ``start_epoch`` also records the
    start of that epoch (its weights after the bit change, or where its streams part)."""
    extra = tuple(rec.extra_epochs) + tuple(rec.keep_checkpoints) + ((int(start_epoch),) if start_epoch else ())
    return Grid(rec.step_base, rec.epoch_base, extra)


def check_record(cfg: Any) -> None:
    """Refuse ``record.*`` values that cannot work, before the run folder is touched."""
    rec = record_settings(cfg)
    grid = grid_of(rec)  # refuses bad bases
    epochs = int(cfg.train.epochs)
    if epochs >= 1:
        grid.steps(1, epochs)  # refuses extra epochs / kept checkpoints outside 0..epochs
    bad = [e for e in rec.keep_checkpoints if not (isinstance(e, int) and 1 <= e <= epochs)]
    if bad:
        raise ConfigError(f"record.keep_checkpoints={list(rec.keep_checkpoints)}: {bad} outside 1..{epochs} "
                          f"(train.epochs); list the epochs at whose end the full checkpoint is kept.")
    if not 1 <= rec.sketch_dim <= MAX_SKETCH_DIM:
        raise ConfigError(f"record.sketch_dim={rec.sketch_dim} is invalid: buckets of the parameter projection, "
                          f"1..{MAX_SKETCH_DIM:,} (default 4096; its distance error is about 1/sqrt(2 D)).")
    if rec.probe < 0:
        raise ConfigError(f"record.probe={rec.probe} is invalid: test examples whose logits each point keeps, "
                          f">= 0 (default 512; 0 keeps none).")
    if rec.weights_max_params < 0:
        raise ConfigError(f"record.weights_max_params={rec.weights_max_params} is invalid: the largest model "
                          f"(parameters) whose final weights are kept, >= 0 (default 50,000,000).")


def make_recorder(cfg: Any, model: nn.Module, data: Dataset, *, data_cfg: Any, channels_last: bool, run_id: str
                  ) -> Optional[Recorder]:
    """The run's recorder on ``data``'s device (None when ``record.trajectory`` is off); ``data_cfg``:
    the data settings the run trains with (normalisation resolved from the data where it comes from it)."""
    rec = record_settings(cfg)
    if not rec.trajectory:
        return None
    steps_per_epoch = len(training_batches(len(data.train_x), int(cfg.train.batch_size)))
    return Recorder.for_run(model, data, data_cfg, grid=grid_of(rec, from_epoch(cfg)), steps_per_epoch=steps_per_epoch,
                            epochs=int(cfg.train.epochs), probe=rec.probe, sketch_dim=rec.sketch_dim,
                            channels_last=channels_last, batch_size=int(cfg.eval.batch_size), run_id=run_id)


def write_records(cfg: Any, rd: Path, rid: str, model: nn.Module, recorder: Optional[Recorder], step: int) -> dict:
    """Write the trajectory and the final weights of the finished run; return run.json's ``record``.

    The weights' fingerprint must equal the trajectory's last point (the model at the final
    step): both files describe the same model, and a later run that starts from these weights
    can check them against the trajectory.
    """
    rec = record_settings(cfg)
    out: dict = {"trajectory": None, "weights": None, "fingerprint": None}
    if recorder is not None:
        recorder.write(rd / TRAJECTORY)
        traj = recorder.trajectory()
        out.update(trajectory=TRAJECTORY, points=int(traj.n_points), steps=[int(s) for s in traj.step],
                   complete=bool(traj.complete), sketch_dim=int(recorder.sketch.dim), probe=len(recorder.probe_index),
                   grid={"step_base": rec.step_base, "epoch_base": rec.epoch_base,
                         "extra_epochs": list(rec.extra_epochs), "keep_checkpoints": list(rec.keep_checkpoints)},
                   fingerprint=traj.fingerprint[-1].tobytes().hex() if traj.n_points else None)
    n_params = sum(p.numel() for p in model.parameters())
    if not rec.weights:
        out["weights_skipped"] = "record.weights=false"
    elif n_params > rec.weights_max_params:
        out["weights_skipped"] = (f"{n_params:,} parameters > record.weights_max_params="
                                  f"{rec.weights_max_params:,}")
    else:
        digest = write_model_weights(rd / WEIGHTS, model, run_id=rid, step=step)
        if out["fingerprint"] is not None and digest != out["fingerprint"]:
            raise RuntimeError(f"the final weights (fingerprint {digest[:12]}) are not the model the trajectory "
                               f"recorded last ({out['fingerprint'][:12]}) at step {step}: the model changed "
                               f"after training; nothing is marked DONE")
        out.update(weights=WEIGHTS, fingerprint=digest)
    if out["fingerprint"] is None:  # neither file: the fingerprint still identifies the final model
        out["fingerprint"] = fingerprint_of(model)
    return out


def fingerprint_of(model: nn.Module) -> str:
    """Hex fingerprint of ``model``'s parameters (records/projection.py), from one host copy."""
    params, _ = model_arrays(model)
    order = [n for n, _ in model.named_parameters()]
    flat = np.concatenate([params[n].reshape(-1) for n in order]) if order else np.zeros(0, np.float32)
    return fingerprint(Layout.of((n, params[n].shape) for n in order), flat).hex()
