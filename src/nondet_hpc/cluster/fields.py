"""The SLURM launcher's fields: each declared once (name, type, default, meaning, ``#SBATCH`` option).

Everything else reads these declarations: the Hydra plugin builds its structured config from them
(``hydra/launcher=nondet_slurm_schema``: a misspelt field fails at composition),
:mod:`.params` takes the hydra-submitit-launcher aliases from them, :mod:`.script` renders the
``#SBATCH`` lines of the fields that have one, and :mod:`.submit`, :mod:`.jobs` and :mod:`.pack`
take their defaults from :func:`value`. The presets in conf/hydra/launcher/ set only what they
change, and docs/slurm.md documents every field (a test checks). Adding a plain ``#SBATCH``
option is one entry here and its line in docs/slurm.md. The reducer job's fields
(``hydra.launcher.reducer.*``) and the barrier job's (``hydra.launcher.barriers.*``) are declared
here too (:data:`NODES`). Torch- and Hydra-free.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional

#: the SLURM launcher's class, as Hydra instantiates it (``_target_``); the end-of-sweep callback
#: tells a SLURM sweep (whose jobs have not run yet when it returns) by it
SLURM_LAUNCHER = "hydra_plugins.nondet_hpc_launcher.launcher.NondetSlurmLauncher"
DEFAULT_JOB_NAME = "nondet"  # sbatch's job name when none is set (the launcher sets nondet-<sweep folder>)


@dataclass(frozen=True)
class Field:
    """One launcher field (``hydra.launcher.<name>``)."""

    name: str
    type: Any  # its annotation in the structured config (typing form: Optional[int], List[str], ...)
    default: Any  # a list or dict default is copied for every config
    doc: str  # what it means, for the reader of this file (docs/slurm.md says it to users)
    sbatch: str | None = None  # the #SBATCH option it sets (cpus_per_task -> --cpus-per-task); None: none
    render: Callable[[Any], Any] | None = None  # its value as that option (mem_gb=8 -> 8GB); None: as it is
    alias_of: str | None = None  # hydra-submitit-launcher's name of one of our fields (same meaning)
    minimum: float | None = None  # the smallest valid value (params.normalize refuses less); None: no bound


def mem(mem_gb: Any) -> str | None:
    """``mem_gb`` as sbatch's --mem: whole GB as ``8GB``, a fraction in MB (``0.5`` -> ``512MB``)."""
    if mem_gb is None:
        return None
    mem_gb = float(mem_gb)
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def _job_name(name: Any) -> str:
    return name or DEFAULT_JOB_NAME


def _signal(delay_s: Any) -> str:
    return f"USR2@{int(delay_s)}"


# the annotations most fields have (null = not set)
_S, _I, _F, _B = Optional[str], Optional[int], Optional[float], bool

FIELDS: tuple[Field, ...] = (
    Field("submitit_folder", str, "${hydra.sweep.dir}/slurm",
          "where the sbatch scripts, job pickles and SLURM logs of this sweep go"),
    Field("job_name", _S, None, "sbatch --job-name; null: nondet-<sweep folder name>, so squeue tells sweeps apart",
          sbatch="job_name", render=_job_name),
    # --- where the jobs run (null: not passed to sbatch, the cluster's / the account's default)
    Field("partition", _S, None, "sbatch --partition, e.g. gpu", sbatch="partition"),
    Field("account", _S, None, "sbatch --account (the project charged)", sbatch="account"),
    Field("qos", _S, None, "sbatch --qos", sbatch="qos"),
    Field("constraint", _S, None, "sbatch --constraint (node features), e.g. v100|a100", sbatch="constraint"),
    Field("gres", _S, None, "sbatch --gres (generic resources), e.g. gpu:1 or gpu:v100:1", sbatch="gres"),
    Field("gpus_per_node", _I, None, "sbatch --gpus-per-node (instead of gres)", sbatch="gpus_per_node",
          minimum=0),
    Field("exclude", _S, None, "sbatch --exclude: nodes never to use", sbatch="exclude"),
    Field("nodelist", _S, None, "sbatch --nodelist: only these nodes", sbatch="nodelist"),
    Field("gpus_per_task", _I, None, "sbatch --gpus-per-task (another way to ask for a GPU)", sbatch="gpus_per_task",
          minimum=0),
    Field("cpus_per_gpu", _I, None, "sbatch --cpus-per-gpu", sbatch="cpus_per_gpu", minimum=1),
    Field("comment", _S, None, "sbatch --comment (shown by squeue -o %k and sacct)", sbatch="comment"),
    # --- resources of one array task (its runs_per_task runs share them)
    Field("cpus_per_task", int, 1, "sbatch --cpus-per-task; a run's thread count when train.threads=0",
          sbatch="cpus_per_task", minimum=1),
    Field("mem_gb", _F, None, "sbatch --mem in GB (0: all of the node's); null: the cluster's DefMemPerCPU x cpus",
          sbatch="mem", render=mem, minimum=0),
    Field("mem_per_cpu", _S, None, "sbatch --mem-per-cpu, e.g. 4G (instead of mem_gb)", sbatch="mem_per_cpu"),
    Field("mem_per_gpu", _S, None, "sbatch --mem-per-gpu, e.g. 16G (instead of mem_gb)", sbatch="mem_per_gpu"),
    Field("timeout_min", int, 60, "sbatch --time in minutes; a run reaching it checkpoints and requeues",
          sbatch="time", render=int, minimum=1),
    # one run = one process on one node: 1 is the only value (hydra-submitit's fields, kept so their
    # configs compose; params.normalize refuses any other value, the script always says --nodes=1)
    Field("nodes", int, 1, "sbatch --nodes: only 1"),
    Field("tasks_per_node", int, 1, "only 1 (hydra-submitit's name)"),
    # --- preemption / time limit: the run checkpoints at the next iteration boundary and requeues
    Field("signal_delay_s", int, 120, "sbatch --signal: USR2 this many seconds before the time limit",
          sbatch="signal", render=_signal, minimum=0),
    Field("max_requeue", int, 20, "restarts a run requeues itself for (then: rerun the sweep to resume)", minimum=0),
    # --- arrays
    Field("array_parallelism", _I, None, "at most this many tasks of the sweep at once (--array=...%N)", minimum=1),
    Field("max_array_size", _I, None, "tasks per array job; null: MaxArraySize of `scontrol show config`", minimum=1),
    Field("max_submit", _I, None, "your submit limit; null: MaxSubmitJobs from sacctmgr; 0: no limit", minimum=0),
    Field("hold", _B, False, "submit held (sbatch --hold); release with `scontrol release JOBID`"),
    # --- job environment
    Field("setup", List[str], [], "shell lines run on the node before the run (module loads, environments)"),
    Field("python", _S, None, "interpreter on the node; null: the one that submits"),
    Field("use_srun", _B, True, "run the job through srun (signals reach the run); false: in the batch script"),
    Field("srun_args", List[str], [], "extra srun arguments"),
    Field("additional_parameters", Dict[str, Any], {}, "any other sbatch option, e.g. {mail-type: FAIL}"),
    Field("stderr_to_stdout", _B, False, "one log per task (.out holds stderr too) instead of .out + .err"),
    # --- hydra-submitit-launcher's names (SlurmQueueConf), same meaning; null = not set
    Field("name", _S, None, "= job_name", alias_of="job_name"),
    Field("max_num_timeout", _I, None, "= max_requeue", alias_of="max_requeue"),
    # --- several runs per array task (docs/slurm.md, "Several runs per task")
    Field("runs_per_task", int, 1, "K runs at once per task, as K processes sharing its GPU/CPUs", minimum=1),
    Field("mps", str, "auto", "CUDA MPS daemon per task when K > 1 on a GPU: auto | true (required) | false"),
    # --- sweep folder consistency (never mix runs of two configurations in one out_dir)
    Field("run_keys", List[str], ["seed", "source", "train.epochs"],
          "identity keys that may differ between runs of one sweep folder"),
    Field("ignore_keys", List[str], [], "more keys never compared (bookkeeping keys never are)"),
    Field("fast_compose", _B, True, "compose job configs per group choice (checked against Hydra's composition) "
                                     "and find an identical rerun's runs in sweep.json; false: Hydra's way"),
    Field("command_timeout_s", int, 60, "sbatch/squeue/sacct/scontrol calls give up after this many seconds "
          "(an sbatch that answers late is looked up by its submission token)", minimum=1),
    # --- who may write the sweep folder (docs/slurm.md, "Sharing a sweep folder")
    Field("trust_group", _B, False, "the sweep folder, slurm/ and sweep.json may be writable by their group "
                                    "(every member can then run code as you); false: by you alone"),
)

#: ``hydra.launcher.reducer.*``: the job that runs ``python -m nondet_hpc.reduce SWEEP_DIR`` after the arrays
REDUCER_FIELDS: tuple[Field, ...] = (
    Field("enabled", _B, True, "false: no reducer job (run python -m nondet_hpc.reduce yourself)"),
    Field("partition", _S, None, "sbatch --partition, e.g. a CPU partition; null: the training partition",
          sbatch="partition"),
    Field("account", _S, None, "sbatch --account; null: the training account", sbatch="account"),
    Field("qos", _S, None, "sbatch --qos; null: the training qos", sbatch="qos"),
    Field("cpus_per_task", int, 1, "sbatch --cpus-per-task (numpy on logits)", sbatch="cpus_per_task", minimum=1),
    Field("mem_gb", _F, 8, "sbatch --mem in GB", sbatch="mem", render=mem, minimum=0),
    Field("timeout_min", int, 60, "sbatch --time in minutes", sbatch="time", render=int, minimum=1),
    Field("additional_parameters", Dict[str, Any], {}, "any other sbatch option for the reducer only"),
)

#: ``hydra.launcher.barriers.*``: the job that runs ``python -m nondet_hpc.barriers SWEEP_DIR`` after the arrays
#: (queued when the sweep's ``barriers.pairs`` > 0); its place and GPU are the training job's (cluster/barrier_job.py)
BARRIER_FIELDS: tuple[Field, ...] = (
    Field("timeout_min", int, 120, "sbatch --time in minutes (a pair of ResNet-14/CIFAR-10 models: about 10 s on a "
                                   "V100)", sbatch="time", render=int, minimum=1),
    Field("mem_gb", _F, None, "sbatch --mem in GB; null: the training job's", sbatch="mem", render=mem, minimum=0),
    Field("additional_parameters", Dict[str, Any], {}, "any other sbatch option for the barrier job only"),
)

_FIELDS = {f.name: f for f in FIELDS}
_REDUCER = {f.name: f for f in REDUCER_FIELDS}
_BARRIERS = {f.name: f for f in BARRIER_FIELDS}
#: the launcher's nodes of fields (``hydra.launcher.<node>.<field>``) and their declarations
NODES = {"reducer": _REDUCER, "barriers": _BARRIERS}
#: hydra-submitit-launcher name -> ours
ALIASES = {f.name: f.alias_of for f in FIELDS if f.alias_of}


def default(name: str, *, reducer: bool = False, node: str | None = None) -> Any:
    """The declared default of a field (a fresh copy of a list or dict); ``node``: a field of
    ``hydra.launcher.<node>`` (``reducer=True`` is ``node="reducer"``)."""
    declared = NODES[node] if node else _REDUCER if reducer else _FIELDS
    return copy.deepcopy(declared[name].default)


def value(params: Mapping[str, Any], name: str, *, reducer: bool = False, node: str | None = None) -> Any:
    """A field's value in a launcher config (``params``, or its ``reducer`` / ``node`` node), its default when unset."""
    return params[name] if name in params else default(name, reducer=reducer, node=node)


#: fields whose value is a mapping of the user's: any key below them is valid
MAPPINGS = ("additional_parameters",)


def is_field(path: str) -> bool:
    """Whether ``hydra.launcher.<path>`` names a field (``reducer.partition``, ``additional_parameters.x``)."""
    parts = path.split(".")
    if parts[0] in NODES and len(parts) > 1:
        return parts[1] in NODES[parts[0]] and (len(parts) == 2 or parts[1] in MAPPINGS)
    return parts[0] in _FIELDS or parts[0] in (*NODES, "_target_")


def unknown_field(path: str) -> str:
    """The refusal of ``hydra.launcher.<path>`` that names no field: the closest valid name, or all."""
    parts = path.split(".")
    node = parts[0] if parts[0] in NODES and len(parts) > 1 else None
    name = parts[1] if node else parts[0]
    names = list(NODES[node]) if node else [*_FIELDS, *NODES]
    prefix = "hydra.launcher." + (f"{node}." if node else "")
    guess = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = (f"did you mean {prefix}{guess[0]}?" if guess else
            f"the fields of {prefix.rstrip('.')} are: {', '.join(names)}.")
    return (f"hydra.launcher.{path} is not a field of the SLURM launcher: {hint} (every field: docs/slurm.md, "
            f"'Presets and fields'; any other sbatch option goes in {prefix}additional_parameters)")


def sbatch_options(params: Mapping[str, Any], *, reducer: bool = False) -> dict[str, Any]:
    """The ``#SBATCH`` options the fields with one set, null values left out."""
    out = {}
    for f in REDUCER_FIELDS if reducer else FIELDS:
        if f.sbatch is None:
            continue
        v = value(params, f.name, reducer=reducer)
        v = f.render(v) if f.render is not None else v
        if v is not None:
            out[f.sbatch] = v
    return out
