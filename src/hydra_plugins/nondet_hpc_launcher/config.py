"""Structured config of the nondet_hpc SLURM launcher (``hydra/launcher=slurm`` and presets).

Registered in Hydra's ConfigStore as ``hydra/launcher/nondet_slurm_schema``; the YAML presets in
conf/hydra/launcher/ extend it, so a misspelt field (``hydra.launcher.partiton=gpu``) fails at
composition instead of being ignored. docs/slurm.md describes every field for users.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ReducerConf:
    """The job that runs ``python -m nondet_hpc.reduce SWEEP_DIR`` after the arrays (afterany)."""

    enabled: bool = True
    partition: Optional[str] = None  # null: the training partition
    account: Optional[str] = None  # null: the training account
    qos: Optional[str] = None  # null: the training qos
    cpus_per_task: int = 1
    mem_gb: Optional[float] = 8
    timeout_min: int = 60
    additional_parameters: Dict[str, Any] = field(default_factory=dict)


@dataclass
class NondetSlurmLauncherConf:
    _target_: str = "hydra_plugins.nondet_hpc_launcher.launcher.NondetSlurmLauncher"

    # where submitit keeps sbatch scripts, pickled jobs and the SLURM logs of this sweep
    submitit_folder: str = "${hydra.sweep.dir}/slurm"
    # sbatch --job-name; null: "nondet-<sweep folder name>", so squeue tells sweeps apart
    job_name: Optional[str] = None

    # --- where the jobs run (null: cluster default / not passed to sbatch)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    gres: Optional[str] = None  # e.g. "gpu:v100:1"
    gpus_per_node: Optional[int] = None
    exclude: Optional[str] = None
    nodelist: Optional[str] = None
    gpus_per_task: Optional[int] = None  # sbatch --gpus-per-task
    cpus_per_gpu: Optional[int] = None  # sbatch --cpus-per-gpu
    comment: Optional[str] = None  # sbatch --comment (shown by squeue -o %k and sacct)

    # --- resources of one training run (one array task)
    cpus_per_task: int = 1
    mem_gb: Optional[float] = None  # null: the cluster's DefMemPerCPU x cpus
    mem_per_cpu: Optional[str] = None  # sbatch --mem-per-cpu, e.g. 4G (instead of mem_gb)
    mem_per_gpu: Optional[str] = None  # sbatch --mem-per-gpu, e.g. 16G (instead of mem_gb)
    timeout_min: int = 60
    # one run = one process on one node: 1 is the only value (hydra-submitit's fields, kept so
    # their configs compose; any other value is refused with an explanation)
    nodes: int = 1
    tasks_per_node: int = 1

    # --- preemption / time limit: SLURM sends USR2 signal_delay_s before the limit; the run
    # checkpoints at the next iteration boundary and requeues itself (at most max_requeue times)
    signal_delay_s: int = 120
    max_requeue: int = 20

    # --- arrays
    array_parallelism: Optional[int] = None  # at most this many tasks of the sweep at once (K runs each)
    max_array_size: Optional[int] = None  # null: MaxArraySize of `scontrol show config`
    max_submit: Optional[int] = None  # null: your MaxSubmitJobs (sacctmgr); 0: no limit
    hold: bool = False  # submit held (release with `scontrol release JOBID`)

    # --- job environment
    setup: List[str] = field(default_factory=list)  # shell lines run before the job
    python: Optional[str] = None  # null: the interpreter that submits
    use_srun: bool = True
    srun_args: List[str] = field(default_factory=list)
    additional_parameters: Dict[str, Any] = field(default_factory=dict)  # any other #SBATCH
    stderr_to_stdout: bool = False  # one log per task (.out) instead of .out + .err

    # --- hydra-submitit-launcher names (SlurmQueueConf), same meaning: null = not set.
    # name = job_name, max_num_timeout = max_requeue; setting both to different values is refused
    name: Optional[str] = None
    max_num_timeout: Optional[int] = None

    # --- several runs per array task: K processes on the task's one allocation (GPU and CPUs,
    # which they split), each run bit-identical to its solo run; the array has ceil(n / K) tasks.
    # Raise K for small models that leave a GPU idle (docs/slurm.md, "Several runs per task").
    runs_per_task: int = 1
    # CUDA MPS daemon for a task with K > 1 on a GPU: auto = where nvidia-cuda-mps-control exists
    # and a GPU is visible; true = required (the task fails without it); false = never
    mps: str = "auto"

    # --- sweep folder consistency: the identity keys of a run (nondet_hpc.config.identity_items)
    # must match earlier submissions of the folder, except those a sweep varies, run_keys and
    # ignore_keys. Bookkeeping keys (nondet_hpc.config.BOOKKEEPING_KEYS: out_dir, force, eval,
    # checkpoint interval, data.root, ...) are never part of the identity, so never compared.
    run_keys: List[str] = field(default_factory=lambda: ["seed", "source", "train.epochs"])
    ignore_keys: List[str] = field(default_factory=list)  # more keys never compared

    # --- compose a sweep's job configs once per group choice + value overrides (checked
    # against Hydra's own composition), and find an identical rerun's runs by their plan keys in
    # sweep.json without composing; false = Hydra's composition for every job (slower)
    fast_compose: bool = True

    # --- SLURM commands (sbatch, squeue, sacct, scontrol) give up after this many seconds
    command_timeout_s: int = 60

    reducer: ReducerConf = field(default_factory=ReducerConf)


def register() -> None:
    ConfigStore.instance().store(
        group="hydra/launcher",
        name="nondet_slurm_schema",
        node=NondetSlurmLauncherConf,
        provider="nondet_hpc",
    )
