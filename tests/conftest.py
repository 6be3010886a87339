"""Shared fixtures: compose the real conf/ with Hydra's compose API, as the CLI does."""

from __future__ import annotations

import os
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
    register_configs()
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        return compose("config", overrides=[f"out_dir={out_dir}", *(FAST if fast else []), *overrides])


@pytest.fixture
def cfg_factory(tmp_path):
    def factory(*overrides: str, out: str = "sweep", fast: bool = True) -> DictConfig:
        return make_cfg(tmp_path / out, *overrides, fast=fast)
    return factory


@pytest.fixture(autouse=True)
def _one_thread():
    # CPU results depend on the thread count: every test starts on one thread (runs it trains set
    # their own with train.threads), and whatever a test sets is undone after it.
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def interrupt_run(cfg, monkeypatch, at_step: int) -> None:
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
