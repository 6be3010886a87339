"""The sbatch scripts of a sweep: launcher config -> ``#SBATCH`` options -> script text.

We render the script ourselves (no submitit internals), in the layout submitit's own scripts
have, because the job side is submitit's: the script exports ``SUBMITIT_EXECUTOR=slurm`` and runs
``python -u -m submitit.core._submit FOLDER``, which loads ``FOLDER/<job id>_submitted.pkl``
(``A_i`` for array task i of array A) and writes the result pickle and logs beside it. The log
names follow submitit's ``JobPaths`` (``%j_%t_log.out`` / ``%A_%a_%t_log.out`` for arrays), so
``status`` finds them through that public class.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import fields

# job-side contract with submitit (see the module docstring)
SUBMIT_MODULE = "submitit.core._submit"
EXECUTOR_ENV = "export SUBMITIT_EXECUTOR=slurm"
#: the reducer's place: its own where set, else the training job's
REDUCER_PLACE = ("partition", "account", "qos")


def _drop_none(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def reducer_options(params: Mapping[str, Any]) -> dict[str, Any]:
    """``#SBATCH`` options of the reducer job: its own resources, the training job's place unless set."""
    r = dict(params.get("reducer") or {})
    out = fields.sbatch_options(r, reducer=True)
    for key in REDUCER_PLACE:
        out.pop(key, None)
    out.update(_drop_none({key: r.get(key) or params.get(key) for key in REDUCER_PLACE}))
    out["job_name"] = f"{params.get('job_name') or fields.DEFAULT_JOB_NAME}-reduce"
    out["nodes"] = 1
    # no --signal: the reducer has no checkpoint to write, a warning signal would be ignored
    out.update(dict(fields.value(r, "additional_parameters", reducer=True) or {}))
    if params.get("hold"):
        out["hold"] = True
    return out


def array_options(params: Mapping[str, Any]) -> dict[str, Any]:
    """``#SBATCH`` options of a training array (one task = one run, or runs_per_task runs)."""
    p = params
    out = fields.sbatch_options(p)
    out["nodes"] = 1  # cluster.params refuses any other value of nodes / tasks_per_node
    # the job requeues itself at the time limit (scontrol requeue): it must be requeueable
    out["requeue"] = True
    if not fields.value(p, "use_srun"):
        # without srun the run is the batch shell's child: `--signal` without B: reaches job steps
        # only, so signal the batch shell, which `exec`s python (python_command)
        out["signal"] = "B:" + out["signal"]
    out.update(dict(fields.value(p, "additional_parameters") or {}))
    if p.get("hold"):
        out["hold"] = True
    return out


def python_command(params: Mapping[str, Any], folder: Path) -> str:
    """The job's command line: submitit's job-side entry point on the pickles in ``folder``."""
    python = params.get("python") or shlex.quote(sys.executable)
    exec_ = "" if fields.value(params, "use_srun") else "exec "
    return f"{exec_}{python} -u -m {SUBMIT_MODULE} {shlex.quote(str(folder))}"


def sbatch_line(key: str, value: Any) -> str:
    """One option as an ``#SBATCH`` line: ``cpus_per_task=4`` -> ``#SBATCH --cpus-per-task=4``."""
    flag = key.replace("_", "-")
    return f"#SBATCH --{flag}" if value is True else f"#SBATCH --{flag}={shlex.quote(str(value))}"


def render_script(options: Mapping[str, Any], *, folder: Path, command: str, setup: Sequence[str] = (),
                  use_srun: bool = True, srun_args: Sequence[str] = (), array: tuple[int, int] | None = None,
                  stderr_to_stdout: bool = False) -> str:
    """The script text: sorted ``#SBATCH`` lines, the setup lines, then the command.

    ``array = (size, parallelism)`` makes an array job ``--array=0-(size-1)%parallelism``, whose
    logs are per task (``%A_%a``). ``options`` may override the log options as well.
    ``stderr_to_stdout``: no ``--error`` (sbatch and srun then write both streams to ``.out``).
    """
    folder = Path(folder).expanduser().absolute()
    job = "%A_%a" if array else "%j"
    out, err = str(folder / f"{job}_%t_log.out"), str(folder / f"{job}_%t_log.err")
    opts: dict[str, Any] = dict(options)
    if array:
        size, parallelism = array
        opts["array"] = f"0-{size - 1}%{min(size, parallelism)}"
    # SLURM's own %-patterns have no task number: task 0 (submitit's names) for the batch step
    opts["output"] = out.replace("%t", "0")
    if not stderr_to_stdout:
        opts["error"] = err.replace("%t", "0")
    opts["open-mode"] = "append"  # a requeued job appends to its logs
    # an option the user set (additional_parameters) wins over ours, as for every other option
    opts.update({k: v for k, v in options.items() if k in ("array", "output", "error", "open-mode")})
    # the setup section is always written (empty when there is nothing to set up): scripts of
    # earlier versions had it, and a diff between two submissions' scripts should show only changes
    lines = ["#!/bin/bash", "", "# Parameters", *(sbatch_line(k, opts[k]) for k in sorted(opts)),
             "", "# setup", *setup]
    if use_srun:
        # srun's --output/--error take %t: one log pair per task, as submitit reads them
        srun = ["srun", "--unbuffered", "--output", out, *([] if stderr_to_stdout else ["--error", err]), *srun_args]
        command = f"{shlex.join(srun)} {command}"
    lines += ["", "# command", EXECUTOR_ENV, command]
    return "\n".join(lines) + "\n"


def sbatch_script(params: Mapping[str, Any], folder: Path, *, array_size: int | None = None,
                  parallelism: int | None = None, reducer: bool = False,
                  dependency: str | None = None, token: str | None = None, kill_on_invalid_dep: bool = False) -> str:
    """The sbatch script of a training array (``array_size`` tasks) or of the reducer job.

    ``kill_on_invalid_dep``: SLURM cancels the job when its dependency can never be satisfied (the
    arrays of runs that start from a parent run, ``afterok`` on the parent's job), instead of
    leaving it pending with reason DependencyNeverSatisfied.

    ``token``: the submission token (:mod:`.tokens`), added to the job's comment (after the user's
    own, from ``comment`` or ``additional_parameters``), so the job can be found by it when sbatch
    answers too late."""
    options = reducer_options(params) if reducer else array_options(params)
    if dependency:
        options.setdefault("dependency", dependency)  # additional_parameters win, as for any option
    if kill_on_invalid_dep:
        options.setdefault("kill_on_invalid_dep", "yes")
    if token:
        options["comment"] = f"{options['comment']} {token}" if options.get("comment") else token
    array = (int(array_size), int(parallelism or array_size)) if array_size is not None else None
    return render_script(options, folder=folder, command=python_command(params, folder),
                         setup=list(params.get("setup") or []), use_srun=fields.value(params, "use_srun"),
                         srun_args=list(params.get("srun_args") or []), array=array,
                         stderr_to_stdout=bool(fields.value(params, "stderr_to_stdout")))
