"""What the tests share that is not a fixture: where the repository is, the fast training config,
composing conf/ as the CLI does, the one way to run a command line, and stopping a run mid-way.

Fixtures live in conftest.py and build on these. Test modules import from here, from
slurm_fixtures.py and from synthetic_sweep.py, never from another test module or from conftest.

No helper measures time. A command that hangs is ended by pytest-timeout (``timeout`` in
pyproject.toml), so no test depends on how fast this machine is.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from nondet_hpc.config import conf_dir
from nondet_hpc.registry.options import register_configs

REPO = Path(__file__).resolve().parents[1]

# A run that trains in about a second on one CPU core: digits, 2 epochs, a 256-image subset.
FAST = ["train.epochs=2", "train.warmup_epochs=1", "data.train_subset=256", "data.test_subset=120",
        "train.batch_size=64", "train.threads=1"]


def make_cfg(out_dir: Path | str, *overrides: str, fast: bool = True) -> DictConfig:
    """A run's config composed from conf/ with Hydra's compose API, as the CLI composes it."""
    register_configs()
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        return compose("config", overrides=[f"out_dir={out_dir}", *(FAST if fast else []), *overrides])


def cli_env(extra: dict | None = None) -> dict:
    """The environment of a command-line run: this checkout's src/ first on PYTHONPATH, one OpenMP
    thread, Hydra's short error messages (a test that wants the traceback sets HYDRA_FULL_ERROR=1)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HYDRA_FULL_ERROR"] = "0"
    if extra:
        env.update(extra)
    return env


def run_cli(args: list[str], *, env: dict | None = None, cwd: Path | None = None, check: bool = True,
            timeout: float | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``cwd`` (default: the repository) with ``cli_env()``; stdin closed, output
    captured as text. ``check``: fail with the command's output unless it exits 0. ``timeout`` is
    for the real-cluster tests' commands only; elsewhere pytest-timeout ends a hung command."""
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                       env=env or cli_env(), cwd=cwd or REPO, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def interrupt_run(cfg: DictConfig, monkeypatch: pytest.MonkeyPatch, at_step: int) -> None:
    """Train ``cfg`` until optimizer step ``at_step``, then stop it as a SLURM signal would: the run
    checkpoints and raises Preempted. The trainer is restored afterwards."""
    from nondet_hpc.run import task, train

    real = train.Trainer.set_lr

    def set_lr(self, step):
        if step == at_step:
            train.request_stop()
        return real(self, step)
    monkeypatch.setattr(train.Trainer, "set_lr", set_lr)
    try:
        with pytest.raises(train.Preempted):
            task.run(cfg)
    finally:
        monkeypatch.setattr(train.Trainer, "set_lr", real)
