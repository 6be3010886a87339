"""The barrier job of a SLURM sweep (issue 21, part 2): its sbatch script and its callable, without a cluster."""

from __future__ import annotations

import pickle
import subprocess

import pytest

from nondet_hpc.cluster import barrier_job
from nondet_hpc.cluster.barrier_job import BarrierJob, barrier_script
from nondet_hpc.cluster.pickles import pickle_job
from nondet_hpc.run.barriers import _parser
from slurm_fixtures import launcher_params, sbatch_flags as flag_lines


def sbatch_flags(text: str) -> dict[str, str]:
    """{option: value} of a script's #SBATCH lines (a flag without value: "")."""
    return dict((line[2:].split("=", 1) + [""])[:2] for line in flag_lines(text))


def test_script_runs_where_training_runs_with_its_own_time_and_after_the_arrays(tmp_path):
    params = launcher_params("slurm_v100", "hydra.launcher.account=proj42", "hydra.launcher.array_parallelism=16")
    params["barriers"] = {"timeout_min": 30}
    text = barrier_script(params, tmp_path, dependency="afterany:101:102")
    flags = sbatch_flags(text)
    assert flags["partition"] == "gpu" and flags["gres"] == "gpu:v100:1" and flags["account"] == "proj42"
    assert flags["time"] == "30" and flags["mem"] == "32GB" and flags["dependency"] == "afterany:101:102"
    assert flags["job-name"].endswith("-barriers")
    assert not {"signal", "requeue", "array"} & set(flags)
    assert "submitit.core._submit" in text and "export OMP_NUM_THREADS" in text  # the training job's setup
    assert sbatch_flags(barrier_script({**params, "barriers": {}}, tmp_path))["time"] == "120"


def test_job_pickles_plain_data_runs_the_command_and_fails_loudly(tmp_path, monkeypatch):
    job = BarrierJob(str(tmp_path / "sweep"), pairs=12, points=7, bn_images=300, device="cuda")
    assert all(isinstance(v, (str, int)) for v in vars(job).values())
    args = _parser().parse_args(job.command()[3:])  # the command line the entry point accepts
    assert (args.pairs, args.points, args.bn_images, args.device) == (12, 7, 300, "cuda")
    tmp = pickle_job(tmp_path, job, 10, 0)
    assert type(pickle.loads(tmp.read_bytes()).function) is BarrierJob
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert job() == 0 and calls == [job.command()]
    monkeypatch.setattr(subprocess, "call", lambda cmd: 1)
    with pytest.raises(RuntimeError, match="exited with 1.*computed are kept"):
        job()
    assert barrier_job.barrier_value({}, "timeout_min") == 120


def test_barrier_fields_are_launcher_fields_checked_like_the_others():
    from nondet_hpc.cluster import fields, params
    from nondet_hpc.config import ConfigError

    p = launcher_params("slurm", "hydra.launcher.barriers.timeout_min=30", "hydra.launcher.barriers.mem_gb=0.5")
    assert p["barriers"] == {"timeout_min": 30, "mem_gb": 0.5, "additional_parameters": {}}
    assert sbatch_flags(barrier_script(p, "/sweep/slurm"))["mem"] == "512MB"
    assert fields.is_field("barriers.timeout_min") and not fields.is_field("barriers.partition")
    with pytest.raises(ConfigError, match="did you mean hydra.launcher.barriers.timeout_min"):
        params.normalize({**p, "barriers": {"timout_min": 3}}, "/sweep")
    with pytest.raises(ConfigError, match="hydra.launcher.barriers.timeout_min=0 is invalid"):
        params.normalize({**p, "barriers": {"timeout_min": 0}}, "/sweep")
    # the one declaration: no copy of it in barrier_job
    assert not hasattr(barrier_job, "BARRIER_FIELDS")
    assert barrier_job.barrier_value({}, "mem_gb") is fields.default("mem_gb", node="barriers") is None
