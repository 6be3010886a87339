"""The barrier job of a SLURM sweep: ``python -m nondet_hpc.barriers SWEEP_DIR --pairs N`` on a GPU.

Loss barriers need the data and, at CIFAR scale, a GPU, so the job runs where the training ran:
the training job's partition, account, qos, constraint and GPU request, with a time limit of its
own. It is queued ``afterany`` behind the sweep's training arrays, like the reducer, and the
reducer then waits for it (``afterany`` on the barrier job too), so the report it writes includes
the barriers. The job runs the command as a subprocess (as :class:`.jobs.ReduceJob` does), so
its pickle holds only strings and numbers; each pair is written as soon as it is computed, so a
job stopped by its time limit keeps what it finished and the next run of the command (or of the
sweep command, which queues a new barrier job) computes only what is missing.

Queued by :mod:`.arrays` (``submit_barriers``) when the sweep's ``barriers.pairs`` > 0, after the
training arrays, with their dependency; recorded as the submission's ``barriers`` entry of
sweep.json (``{"job_id", "token", "dependency", "script", "command", "pairs"}``), which
``SubmissionResult.job_ids``, status and cancel list. Its settings are ``hydra.launcher.barriers.*``
(:data:`.fields.BARRIER_FIELDS`, documented in docs/slurm.md).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import safeio
from . import fields
from .arrays import Launch, arrays_dependency, earlier_barrier_jobs, sbatch_recorded
from .joblog import log
from .pickles import pickle_job
from .script import python_command, render_script
from .tokens import new_token

#: training options the barrier job does not take: it has no checkpoint to write at a warning signal,
#: is not requeued, and is no array
_NOT_TAKEN = ("signal", "requeue", "array")


def barrier_value(b: Mapping[str, Any], name: str) -> Any:
    """A barrier field's value in ``hydra.launcher.barriers`` (``b``), its default when unset."""
    return fields.value(b, name, node="barriers")


def barrier_options(params: Mapping[str, Any]) -> dict[str, Any]:
    """``#SBATCH`` options of the barrier job: the training job's place and resources (GPU
    included), its own time limit and memory, its own job name; no signal, requeue or array."""
    b = dict(params.get("barriers") or {})
    out = {k: v for k, v in fields.sbatch_options(params).items() if k not in _NOT_TAKEN}
    out["time"] = int(barrier_value(b, "timeout_min"))
    mem = fields.mem(barrier_value(b, "mem_gb"))
    if mem is not None:
        out["mem"] = mem
    out["job_name"] = f"{params.get('job_name') or fields.DEFAULT_JOB_NAME}-barriers"
    out["nodes"] = 1
    out.update(dict(fields.value(params, "additional_parameters") or {}))
    out.update(dict(barrier_value(b, "additional_parameters") or {}))
    if params.get("hold"):
        out["hold"] = True
    return out


def barrier_script(params: Mapping[str, Any], folder: Path, dependency: str | None = None,
                   token: str | None = None) -> str:
    """The sbatch script of the barrier job (submitit's job side runs its pickle, as for every job);
    ``token``: its submission token, added to its comment (:mod:`.tokens`)."""
    options = barrier_options(params)
    if dependency:
        options.setdefault("dependency", dependency)  # additional_parameters win, as for any option
    if token:
        options["comment"] = f"{options['comment']} {token}" if options.get("comment") else token
    return render_script(options, folder=folder, command=python_command(params, folder),
                         setup=list(params.get("setup") or []), use_srun=fields.value(params, "use_srun"),
                         srun_args=list(params.get("srun_args") or []),
                         stderr_to_stdout=bool(fields.value(params, "stderr_to_stdout")))


class BarrierJob:
    """What the barrier job executes (pickled by submitit): the barriers command on the node."""

    def __init__(self, sweep_dir: str, pairs: int, points: int = 11, bn_images: int = 5000,
                 device: str = "auto") -> None:
        self.sweep_dir = str(sweep_dir)
        self.pairs, self.points, self.bn_images, self.device = int(pairs), int(points), int(bn_images), str(device)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "nondet_hpc.barriers", self.sweep_dir, "--pairs", str(self.pairs),
                "--points", str(self.points), "--bn-images", str(self.bn_images), "--device", self.device]

    def __call__(self) -> int:
        cmd = self.command()
        log(f"running {shlex.join(cmd)}")
        sys.stdout.flush()
        rc = subprocess.call(cmd)
        if rc != 0:
            raise RuntimeError(f"{shlex.join(cmd)} exited with {rc} (pairs that failed are named above; the ones "
                               f"computed are kept, and a rerun computes only what is missing)")
        return rc


def sweep_barriers(runs: Sequence[Any]) -> dict[str, int] | None:
    """The sweep's ``barriers`` settings (bookkeeping: the same for every run; the largest ``pairs``
    where they differ); None when no run asks for barriers (``barriers.pairs`` = 0)."""
    best: dict[str, int] | None = None
    for run in runs:
        cfg = run.config
        node = cfg.get("barriers") if hasattr(cfg, "get") else None
        pairs = int((node or {}).get("pairs") or 0)
        if pairs > 0 and (best is None or pairs > best["pairs"]):
            best = {"pairs": pairs, "points": int(node.get("points") or 11),
                    "bn_images": int(node.get("bn_images") or 5000)}
    return best


def submit_barriers(launch: Launch, settings: Mapping[str, int]) -> dict:
    """Queue the barrier job behind the arrays (``afterany`` on this submission's arrays, the
    still-queued arrays of earlier ones and their barrier jobs); record it as the submission's
    ``barriers`` entry. The reducer queued next waits for it (:func:`.arrays.reducer_dependency`)."""
    deps = [d for d in (arrays_dependency(launch).removeprefix("afterany:"), *earlier_barrier_jobs(launch)) if d]
    dependency = "afterany:" + ":".join(deps) if deps else None
    script_path = launch.folder / f"sub{launch.record['n']:03d}_barriers.sh"
    token = new_token()
    timeout_min = int(barrier_value(dict(launch.params.get("barriers") or {}), "timeout_min"))
    safeio.write_bytes(script_path, barrier_script(launch.params, launch.folder, dependency, token).encode(),
                       root=launch.folder)
    job = BarrierJob(str(launch.sweep_dir), settings["pairs"], settings["points"], settings["bn_images"])
    pickle_job(launch.folder, job, timeout_min, 0, name=token)
    entry = {"job_id": None, "token": token, "dependency": dependency or "", "script": str(script_path),
             "command": "python -m nondet_hpc.barriers " + shlex.join(job.command()[3:]), **dict(settings)}
    sbatch_recorded(launch, script_path, entry, "barriers", f"the barrier job of submission {launch.record['n']}",
                    "barrier job")
    launch.record["barriers"] = entry
    launch.save()
    return entry
