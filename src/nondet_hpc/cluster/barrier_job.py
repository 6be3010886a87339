"""The barrier job of a SLURM sweep: ``python -m nondet_hpc.barriers SWEEP_DIR --pairs N`` on a GPU.

Loss barriers need the data and, at CIFAR scale, a GPU, so the job runs where the training ran:
the training job's partition, account, qos, constraint and GPU request, with a time limit of its
own. It is queued ``afterany`` behind the sweep's training arrays, like the reducer, and the
reducer then waits for it (``afterany`` on the barrier job too), so the report it writes includes
the barriers. The job runs the command as a subprocess (as :class:`.jobs.ReduceJob` does), so
its pickle holds only strings and numbers; each pair is written as soon as it is computed, so a
job stopped by its time limit keeps what it finished and the next run of the command (or of the
sweep command, which queues a new barrier job) computes only what is missing.

Not queued by :mod:`.submit` yet. The hooks it needs, in that module: ``want_barriers`` from the
sweep's ``barriers.pairs`` > 0; after ``_submit_arrays``, ``_submit_barriers`` writes
:func:`barrier_script` with the arrays' dependency (``_reducer_dependency``'s first value),
pickles :class:`BarrierJob`, sbatches it and records ``{"job_id", "dependency", "script",
"command"}`` as the submission's ``barriers`` entry (sweep.json; ``SubmissionResult.job_ids``,
status and cancel list it); ``_submit_reducer`` appends ``:<barrier job id>`` to its dependency.
The fields below become ``hydra.launcher.barriers.*`` in :mod:`.fields` (one declaration, the
launcher's schema and docs/slurm.md read it there).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from . import fields
from .joblog import log
from .script import python_command, render_script

#: ``hydra.launcher.barriers.*``: the barrier job's own settings (the place and the GPU are the training job's)
BARRIER_FIELDS: tuple[fields.Field, ...] = (
    fields.Field("timeout_min", int, 120, "sbatch --time in minutes (a pair of ResNet-14/CIFAR-10 models: about "
                                          "10 s on a V100)", sbatch="time", render=int),
    fields.Field("mem_gb", Optional[float], None, "sbatch --mem in GB; null: the training job's", sbatch="mem",
                 render=fields.mem),
    fields.Field("additional_parameters", dict, {}, "any other sbatch option for the barrier job only"),
)
_BARRIER = {f.name: f for f in BARRIER_FIELDS}
#: training options the barrier job does not take: it has no checkpoint to write at a warning signal,
#: is not requeued, and is no array
_NOT_TAKEN = ("signal", "requeue", "array")


def barrier_value(b: Mapping[str, Any], name: str) -> Any:
    """A barrier field's value in ``hydra.launcher.barriers`` (``b``), its default when unset."""
    return b[name] if name in b else _BARRIER[name].default


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


def barrier_script(params: Mapping[str, Any], folder: Path, dependency: str | None = None) -> str:
    """The sbatch script of the barrier job (submitit's job side runs its pickle, as for every job)."""
    options = barrier_options(params)
    if dependency:
        options.setdefault("dependency", dependency)  # additional_parameters win, as for any option
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
