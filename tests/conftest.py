"""The tests' fixtures, one of each kind. Plain helpers (configs, command lines, the fake SLURM
client, synthetic sweeps) are in helpers.py, slurm_fixtures.py and synthetic_sweep.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pytest
from omegaconf import DictConfig

from helpers import interrupt_run, make_cfg
from slurm_fixtures import FakeSlurm


@pytest.fixture
def cfg_factory(tmp_path) -> Callable[..., DictConfig]:
    """Configs composed from conf/ (fast by default) writing under ``tmp_path / out``."""
    def factory(*overrides: str, out: str = "sweep", fast: bool = True) -> DictConfig:
        return make_cfg(tmp_path / out, *overrides, fast=fast)
    return factory


@pytest.fixture(autouse=True, scope="session")
def _signing_key(tmp_path_factory):
    """The key that signs a study's recorded settings (nondet_hpc/sweep/trust.py): the test
    session's own, not the user's ~/.config/nondet_hpc/sweep.key. Commands the tests run, and the
    SLURM jobs those submit, inherit it through the environment."""
    path = tmp_path_factory.mktemp("signing-key") / "sweep.key"
    old = os.environ.get("NONDET_HPC_KEY_FILE")
    os.environ["NONDET_HPC_KEY_FILE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("NONDET_HPC_KEY_FILE", None)
    else:
        os.environ["NONDET_HPC_KEY_FILE"] = old


@pytest.fixture(autouse=True)
def _one_thread():
    # CPU results depend on the thread count: every test starts on one thread (runs it trains set
    # their own with train.threads), and whatever a test sets is undone after it.
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def fake(tmp_path, monkeypatch) -> FakeSlurm:
    """A fake SLURM client (slurm_fixtures.FakeSlurm) first on PATH, for this process and the
    commands it starts (helpers.cli_env copies the environment)."""
    f = FakeSlurm(tmp_path / "fake-slurm")
    monkeypatch.setenv("PATH", f"{f.bin}{os.pathsep}{os.environ['PATH']}")
    return f


@pytest.fixture
def bit_exact_resume(cfg_factory, monkeypatch) -> Callable[..., dict]:
    """``check(*overrides, stop_at_step=N)``: train the config straight through (in ``ref/``) and
    again (in ``interrupted/``) stopped at optimizer step N as a SLURM signal stops it, then
    resumed. The stopped run is left preempted without DONE; the resumed one is done on its second
    attempt, and every .npy file it wrote (each view's logits, labels, features), its trajectory and
    its final weights equal the straight run's byte for byte. Returns the resumed run's run.json."""
    from nondet_hpc.rundir import TRAJECTORY, WEIGHTS, run_dir
    from nondet_hpc.run import task

    def check(*overrides: str, stop_at_step: int) -> dict:
        ref = Path(task.run(cfg_factory(*overrides, out="ref"))["run_dir"])
        cfg = cfg_factory(*overrides, out="interrupted")
        interrupt_run(cfg, monkeypatch, stop_at_step)
        resumed = run_dir(cfg)
        stopped = json.loads((resumed / "run.json").read_text())
        assert stopped["state"] == "preempted" and not (resumed / "DONE").exists()
        assert task.run(cfg)["state"] == "done"
        rec = json.loads((resumed / "run.json").read_text())
        assert rec["attempts"] == 2 and rec["resumed_from"]
        files = sorted(str(p.relative_to(ref)) for p in ref.rglob("*.npy"))
        assert files == sorted(str(p.relative_to(resumed)) for p in resumed.rglob("*.npy"))
        assert "logits/plain.npy" in files
        for name in files:
            assert (resumed / name).read_bytes() == (ref / name).read_bytes(), name
        for name in (TRAJECTORY, WEIGHTS):  # the records of training too, byte for byte
            assert (resumed / name).read_bytes() == (ref / name).read_bytes(), name
        assert rec["record"]["complete"] is True
        return rec
    return check
