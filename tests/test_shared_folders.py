"""Issue 18: nothing a shared folder holds can redirect a write, block a job or skew a count; the
same run id always means the same numbers.

Each section is one item of the issue: writes never follow a planted link (1), files that would
block or explode are refused (2), a damaged sweep.json stops nothing but itself (3), a report is
never half old and half new (4), counts mean what they say (5), the CPU's instruction set is
recorded and never pooled (6), small messages (8). Stopping a local sweep (7) and the GPU check
(9) are in tests/test_local_launcher.py and tests/test_train_step.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import cli_env, run_cli
from slurm_fixtures import params_for, plan
from synthetic_sweep import CPU_ENV, excluded, logits_for, row, run_id, set_env, write_run, write_sweep_json

from nondet_hpc import safeio
from nondet_hpc.analysis import reduce as R
from nondet_hpc.analysis import tables
from nondet_hpc.analysis.planning import PlanError, plan_sweep
from nondet_hpc.config import ConfigError
from nondet_hpc.rundir import run_dir
from nondet_hpc.sweep import manifest as MF

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_0_1_0"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _small_sweep(sweep: Path, sources=("init", "shuffle"), seeds=(1, 2, 3)) -> None:
    for src in sources:
        for s in seeds:
            write_run(sweep, src, s)


# ================================================================= 1. writes never follow a link
def test_a_write_below_the_sweep_root_refuses_every_link_and_writes_nothing(tmp_path):
    sweep, outside = tmp_path / "sweep", tmp_path / "outside"
    (sweep / "runs" / "r1").mkdir(parents=True)
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious")
    os.symlink(outside, sweep / "runs" / "r1" / "logits")  # a linked folder inside a run
    with pytest.raises(safeio.UnsafePath, match=r"logits: is a symbolic link \(to .*outside\).*Nothing was written"):
        safeio.write_bytes(sweep / "runs" / "r1" / "logits" / "victim", b"overwritten")
    os.symlink(outside / "victim", sweep / "runs" / "r1" / "run.json")  # a linked file
    with pytest.raises(safeio.UnsafePath, match="run.json: is a symbolic link"):
        safeio.write_bytes(sweep / "runs" / "r1" / "run.json", b"{}")
    assert (outside / "victim").read_bytes() == b"precious" and sorted(os.listdir(outside)) == ["victim"]
    # a hard link planted under the name is replaced by the rename, never written through
    os.link(outside / "victim", sweep / "runs" / "r1" / "labels.npy")
    safeio.write_bytes(sweep / "runs" / "r1" / "labels.npy", b"new")
    assert (outside / "victim").read_bytes() == b"precious"
    assert (sweep / "runs" / "r1" / "labels.npy").read_bytes() == b"new"
    assert not [n for n in os.listdir(sweep / "runs" / "r1") if n.endswith(".tmp")]
    # the sweep root itself may be a link (the user's choice of path); below it nothing may be
    os.symlink(sweep, tmp_path / "alias")
    safeio.write_bytes(tmp_path / "alias" / "runs" / "r2" / "DONE", b"{}")
    assert (sweep / "runs" / "r2" / "DONE").read_bytes() == b"{}"


def test_an_unfinished_run_whose_logits_link_to_a_finished_run_is_refused_before_training(cfg_factory):
    from nondet_hpc.run import task

    done = Path(task.run(cfg_factory("source=init", "seed=1"))["run_dir"])
    before = {p.name: _digest(p) for p in (done / "logits").iterdir()}
    cfg = cfg_factory("source=init", "seed=2")
    victim = run_dir(cfg)
    victim.mkdir(parents=True)
    os.symlink(done / "logits", victim / "logits")
    with pytest.raises(ConfigError, match=r"logits: is a symbolic link \(to .*init-s0001.*\).*Nothing was written"):
        task.run(cfg)
    assert {p.name: _digest(p) for p in (done / "logits").iterdir()} == before
    assert not (victim / "run.json").exists() and not (victim / "checkpoint.pt").exists()


def test_the_report_folder_as_a_link_is_refused_and_the_linked_folder_untouched(tmp_path):
    sweep, other = tmp_path / "sweep", tmp_path / "other"
    _small_sweep(sweep)
    other.mkdir()
    for name in ("claims.csv", "published.csv", "notes.txt"):
        (other / name).write_text(name)
    os.symlink(other, sweep / "report")
    with pytest.raises(R.ReduceError, match=r"report is a symbolic link.*Nothing was written.*rm "):
        R.reduce_sweep(sweep, n_boot=20)
    assert sorted(os.listdir(other)) == ["claims.csv", "notes.txt", "published.csv"]
    assert all((other / n).read_text() == n for n in os.listdir(other))


def test_a_rerun_never_writes_job_logs_through_planted_links(tmp_path):
    """The default parallel local launcher: job.log links to another run's logits and to a file
    outside the sweep. The rerun refuses those two jobs, naming the links, writes nothing through
    them, and exits non-zero."""
    out, outside = tmp_path / "sw", tmp_path / "outside.txt"
    outside.write_text("not a log")
    args = ["-m", "nondet_hpc", "-m", "source=init", "seed=1,2", "train.epochs=1", "data.train_subset=64",
            "data.test_subset=40", "train.batch_size=64", "train.threads=1", "hydra.launcher.n_jobs=2",
            f"out_dir={out}"]
    run_cli(args)
    plain = sorted((out / "runs").glob("*/logits/plain.npy"))[0]
    before = plain.read_bytes()
    for job, target in (("job-0", plain), ("job-1", outside)):
        log = out / ".hydra" / job / "job.log"
        log.unlink(missing_ok=True)
        os.symlink(target, log)
    p = run_cli(args, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stdout + p.stderr
    assert "job.log: is a symbolic link" in p.stdout + p.stderr
    assert plain.read_bytes() == before and outside.read_text() == "not a log"


# ================================================================= 2. files that block or explode
def test_a_fifo_lock_or_checkpoint_is_refused_at_once(cfg_factory):
    from nondet_hpc.run import task
    from nondet_hpc.run.evaluate import evaluate_run

    cfg = cfg_factory("source=init", "seed=3")
    rd = run_dir(cfg)
    rd.mkdir(parents=True)
    os.mkfifo(rd / ".lock")
    with pytest.raises(ConfigError, match=r"\.lock: is a FIFO, not a regular lock file.*rm "):
        task.run(cfg)
    (rd / ".lock").unlink()
    os.mkfifo(rd / "checkpoint.pt")  # an unfinished run's checkpoint: the rerun would resume from it
    with pytest.raises(ConfigError, match=r"checkpoint.pt: is a FIFO, not a regular file.*move it away"):
        task.run(cfg)
    (rd / "checkpoint.pt").unlink()
    task.run(cfg)
    os.remove(rd / ".lock")
    os.mkfifo(rd / ".lock")
    with pytest.raises(ConfigError, match="is a FIFO"):
        evaluate_run(rd, ["flip"])


def test_config_yaml_is_read_as_data_only(cfg_factory, monkeypatch):
    from nondet_hpc.run import task
    from nondet_hpc.run.evaluate import EvaluateError, evaluate_run

    rd = Path(task.run(cfg_factory("source=init", "seed=4"))["run_dir"])
    good = (rd / "config.yaml").read_text()
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(20))
    (rd / "config.yaml").write_text(bomb)
    with pytest.raises(ConfigError, match="more than 100 YAML aliases"):
        evaluate_run(rd, ["flip"])
    monkeypatch.setenv("SECRET_OF_THE_READER", "the-reader-s-secret")
    (rd / "config.yaml").write_text(good.replace("root: data", "root: ${oc.env:SECRET_OF_THE_READER}"))
    with pytest.raises(EvaluateError, match=r"data.root holds '\$\{oc.env:SECRET_OF_THE_READER\}'") as e:
        evaluate_run(rd, ["flip"])
    assert "the-reader-s-secret" not in str(e.value)
    (rd / "config.yaml").write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        evaluate_run(rd, ["flip"])


def test_readers_open_only_bounded_regular_files(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(6, dtype=np.float32).reshape(2, 3), allow_pickle=False)
    assert safeio.load_npy(tmp_path / "a.npy").tolist() == [[0, 1, 2], [3, 4, 5]]
    assert safeio.load_npy(tmp_path / "a.npy", mmap=True)[1, 2] == 5
    os.mkfifo(tmp_path / "f.npy")
    with pytest.raises(safeio.RefusedFile, match="is a FIFO"):
        safeio.load_npy(tmp_path / "f.npy")
    with pytest.raises(safeio.RefusedFile, match="more than the 10 such a file may have"):
        safeio.read_regular(tmp_path / "a.npy", 10)
    (tmp_path / "big.json").write_text("[" + "1," * 100 + "1]")
    with pytest.raises(safeio.RefusedFile, match="bytes, more than"):
        safeio.load_json(tmp_path / "big.json", max_bytes=50)
    assert safeio.tail(tmp_path / "f.npy") == ""  # a log that is a FIFO: nothing, at once


# ================================================================= 3. a damaged sweep.json
DAMAGE = {
    "a run entry that is a number": lambda m: m["runs"].update({next(iter(m["runs"])): 7}),
    "a study without its rule": lambda m: m.update(study={"groups": {}, "waves": [], "status": "running"}),
    "a list where a mapping belongs": lambda m: m.update(runs=[1, 2]),
    "an array record without a job id": lambda m: m["submissions"][0]["arrays"][0].pop("job_id"),
}


def _damage(sweep: Path, how: str) -> None:
    m = json.loads((sweep / "sweep.json").read_text())
    DAMAGE[how](m)
    (sweep / "sweep.json").write_text(json.dumps(m))


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_sweep_json_makes_reduce_fall_back_to_the_run_folders(tmp_path, how):
    sweep = tmp_path / "sweep"
    _small_sweep(sweep)
    write_sweep_json(sweep, [(s, k) for s in ("init", "shuffle") for k in (1, 2, 3)])
    _damage(sweep, how)
    with pytest.raises(MF.ManifestError, match="sweep.json is damaged"):
        MF.load_manifest(sweep)
    df = R.reduce_sweep(sweep, n_boot=20)
    assert row(df, "Parameter Initialization")["n_models"] == 3
    warning = next(w for w in df.attrs["warnings"] if "sweep.json" in w)
    assert "damaged" in warning and "run folders alone" in warning
    assert "sweep.json" in (sweep / "report" / "report.md").read_text()


@pytest.mark.parametrize("how", list(DAMAGE))
def test_status_and_cancel_say_what_is_unreadable_and_what_they_did(tmp_path, fake, how):
    from nondet_hpc.cluster import state, submit

    sweep = tmp_path / "sw"
    res = submit.submit_sweep(sweep, plan(sweep), params_for(sweep))
    _damage(sweep, how)
    damaged = (sweep / "sweep.json").read_bytes()
    st = state.sweep_status(sweep)
    assert st["errors"]["sweep.json"].startswith("damaged (")
    p = run_cli(["-m", "nondet_hpc.status", str(sweep)], env=cli_env({"PATH": fake.env()["PATH"]}))
    assert "note: sweep.json damaged" in p.stdout and "Traceback" not in p.stderr
    p = run_cli(["-m", "nondet_hpc.cancel", str(sweep)], env=cli_env({"PATH": fake.env()["PATH"]}), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "is damaged" in p.stderr
    assert ("cancelled the" in p.stderr and "not recorded in the damaged file" in p.stderr) or \
        "nothing was cancelled" in p.stderr
    cancelled = [j for call in fake.calls("scancel") for j in call]
    if "nothing was cancelled" not in p.stderr:
        assert cancelled and set(cancelled) <= set(res.job_ids())
    assert (sweep / "sweep.json").read_bytes() == damaged  # left as it is


def test_sweep_json_versions(tmp_path):
    for kind in ("plain", "waves"):  # 0.1.0's files: no version field, still read
        data = json.loads((LEGACY / "sweeps" / kind / "sweep.json").read_text())
        assert "version" not in data and MF.schema.problems(data) == []
    sweep = tmp_path / "s"
    sweep.mkdir()
    shutil.copy(LEGACY / "sweeps" / "waves" / "sweep.json", sweep / "sweep.json")
    m = MF.load_manifest(sweep)
    MF.write_manifest(sweep, m)  # rewritten as this version
    assert json.loads((sweep / "sweep.json").read_text())["version"] == MF.schema.VERSION
    m["version"] = 99
    (sweep / "sweep.json").write_text(json.dumps(m))
    with pytest.raises(MF.ManifestError, match="version 99; this nondet_hpc reads versions 1, 2.*update this one"):
        MF.load_manifest(sweep)
    bad = dict(m, version=2, runs={"x": {"jobs": [{"submission": 0}]}})
    with pytest.raises(MF.ManifestError, match=r"refusing to write.*runs\[\"x\"\].jobs\[0\]: lacks 'job_id'"):
        MF.write_manifest(sweep, bad)


def test_one_garbage_heartbeat_names_its_run(tmp_path):
    from nondet_hpc.cluster import state
    from nondet_hpc.cluster.status import format_status

    sweep = tmp_path / "sweep"
    for k, hb in ((1, {"epoch": 1, "epochs": 4, "time": "soon", "elapsed_s": [1]}),
                  (2, {"epoch": 2, "epochs": 4, "time": time.time()})):
        d = write_run(sweep, "init", k, done=False)
        set_env(d, state="running", heartbeat=hb, updated=time.time())
    st = state.sweep_status(sweep)
    by = {r["run_id"]: r for r in st["runs"]}
    assert "heartbeat unreadable: time='soon', elapsed_s=[1]" in by[run_id("init", 1)]["note"]
    assert by[run_id("init", 2)]["epoch"] == 2
    assert "heartbeat unreadable" in format_status(st)


def test_a_failed_end_of_sweep_reduction_exits_non_zero(tmp_path):
    out = tmp_path / "sw"
    out.mkdir()
    (out / "report").write_text("a file where the report goes")
    p = run_cli(["-m", "nondet_hpc", "-m", "source=init", "seed=1", "train.epochs=1", "data.train_subset=64",
                 "data.test_subset=40", "train.threads=1", f"out_dir={out}"], check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "report was not made" in p.stdout + p.stderr and "exists and is not a folder" in p.stdout + p.stderr
    assert (out / "report").read_text() == "a file where the report goes"


# ================================================================= 4. reports never half old, half new
def test_a_reducer_killed_halfway_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    _small_sweep(sweep)
    R.reduce_sweep(sweep, n_boot=20)
    old = {p.name: p.read_bytes() for p in (sweep / "report").iterdir()}
    write_run(sweep, "init", 4)  # the next reduction has other numbers
    real, written = safeio.write_bytes, []

    def killed_after_two(path, data, root=None):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")  # kill -9 / a time limit, in the middle of the report
        written.append(Path(path).name)
        real(path, data, root)
    monkeypatch.setattr(safeio, "write_bytes", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        R.reduce_sweep(sweep, n_boot=20)
    monkeypatch.setattr(safeio, "write_bytes", real)
    assert {p.name: p.read_bytes() for p in (sweep / "report").iterdir()} == old
    assert plan_sweep(sweep, {"acc_sd_se": 0.5}, n_outer=20, n_inner=20, check=False)["groups"]
    R.reduce_sweep(sweep, n_boot=20)  # the next reduction cleans up and swaps in a whole report
    assert not [n for n in os.listdir(sweep) if n.startswith(".report.")]
    assert json.loads((sweep / "report" / "report.json").read_text())["files"]["metrics.csv"] == \
        _digest(sweep / "report" / "metrics.csv")


def test_plan_refuses_a_report_whose_parts_disagree(tmp_path):
    sweep = tmp_path / "sweep"
    _small_sweep(sweep)
    R.reduce_sweep(sweep, n_boot=20)
    first = (sweep / "report" / "per_model.csv").read_bytes()
    write_run(sweep, "init", 4)
    R.reduce_sweep(sweep, n_boot=20)
    (sweep / "report" / "per_model.csv").write_bytes(first)  # a part of the previous reduction
    with pytest.raises(PlanError, match=r"per_model.csv is not the file reduction .* wrote.*disagree.*reduce"):
        plan_sweep(sweep, {"acc_sd_se": 0.5}, check=False)
    (sweep / "report" / "report.json").unlink()  # a report of an older version: cannot be checked
    with pytest.raises(PlanError, match="report.json is missing.*older nondet_hpc"):
        plan_sweep(sweep, {"acc_sd_se": 0.5}, check=False)


# ================================================================= 5. counts that mean what they say
def _copy_run(sweep: Path, src: Path, seed: int) -> Path:
    """A hard-linked copy of run ``src`` with an edited run.json: a new seed and run id, same logits."""
    info = json.loads((src / "run.json").read_text())
    rid = info["run_id"].replace(f"s{info['seed']:04d}", f"s{seed:04d}")
    dest = sweep / "runs" / rid
    for f in src.rglob("*"):
        target = dest / f.relative_to(src)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif f.name != "run.json":
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, target)
    (dest / "run.json").write_text(json.dumps({**info, "run_id": rid, "seed": seed}))
    return dest


def test_a_planted_done_marker_is_not_a_finished_run(tmp_path):
    """DONE must be a regular file: a link to another run's DONE, a FIFO or a folder under that name
    makes the run incomplete (named, with what the marker is), never a model counted in a group."""
    from nondet_hpc.rundir import DONE, is_done

    sweep = tmp_path / "sweep"
    _small_sweep(sweep, sources=("init", "shuffle"), seeds=(1, 2, 3))
    runs = sweep / "runs"
    real = runs / run_id("init", 1) / DONE
    planted = {2: lambda p: p.symlink_to(real), 3: os.mkfifo}
    for seed, plant in planted.items():
        marker = runs / run_id("init", seed) / DONE
        marker.unlink()
        plant(marker)
        assert not is_done(marker.parent)
    assert is_done(real.parent)
    df = R.reduce_sweep(sweep, n_boot=20)
    assert row(df, "Parameter Initialization")["n_models"] == 1
    ex = excluded(sweep)
    why = {r: ex[ex["run_id"] == run_id("init", s)]["reason"].iloc[0] for s, r in [(2, "link"), (3, "fifo")]}
    assert "DONE is a symbolic link, not a regular file" in why["link"]
    assert "DONE is a FIFO, not a regular file" in why["fifo"]


def test_hard_linked_copies_of_a_run_are_one_model(tmp_path):
    sweep = tmp_path / "sweep"
    _small_sweep(sweep, sources=("init", "shuffle", "all"))
    src = sweep / "runs" / run_id("init", 1)
    for seed in range(10, 16):
        _copy_run(sweep, src, seed)
    df = R.reduce_sweep(sweep, n_boot=20)
    init = row(df, "Parameter Initialization")
    assert (init["n_models"], init["n_distinct"], init["n_duplicates"]) == (3, 3, 6)
    line = next(ln for ln in df.attrs["summary"].splitlines() if ln.startswith("Parameter Initialization "))
    assert " 3/9 " in line  # distinct models / runs
    ex = excluded(sweep)
    dups = ex[(ex["category"] == "duplicate") & (ex["view"] == "single model")]
    assert len(dups) == 6 and all(f"runs/{run_id('init', 1)}'s" in r for r in dups["reason"])


def test_a_varied_source_without_variation_is_said_first_and_is_no_evidence(tmp_path):
    sweep = tmp_path / "sweep"
    _small_sweep(sweep, sources=("none", "shuffle", "all"), seeds=(1, 2, 3, 4))
    for k in (1, 2, 3, 4):  # the cuDNN source on a CPU: every run is the control's model
        d = write_run(sweep, "init", k, views={"plain": logits_for("none", 1, 10)}, group_label="Cudnn")
        info = json.loads((d / "run.json").read_text())
        info["identity"]["source.name"] = "cudnn"
        set_env(d, identity=info["identity"], group_key="cudnn-e10")
    df = R.reduce_sweep(sweep, n_boot=20)
    top = df.attrs["summary"].split("\n\n")[1]
    assert "the Cudnn source made no difference: its 4 runs are bit-identical to the control" in top
    report = (sweep / "report" / "report.md").read_text()
    assert report.index("made no difference") < report.index("## Metrics")
    cud = row(df, "Cudnn")
    assert (cud["n_models"], cud["n_duplicates"]) == (1, 3)
    claims = pd.read_csv(sweep / "report" / "claims.csv", keep_default_na=False)
    assert "Cudnn" not in set(claims["group"]) | set(claims["reference"])
    control_line = next(ln for ln in df.attrs["summary"].splitlines() if ln.startswith("Determinism Control "))
    assert " 1/4 " in control_line  # 4 runs, one distinct model: what the control should show


def test_every_csv_escapes_cells_that_a_spreadsheet_would_run(tmp_path):
    sweep = tmp_path / "sweep"
    _small_sweep(sweep)
    evil = '=HYPERLINK("evil.example","y")'
    d = write_run(sweep, "init", 7)
    os.rename(d, sweep / "runs" / evil)
    R.reduce_sweep(sweep, n_boot=20)
    texts = {p.name: p.read_text() for p in (sweep / "report").glob("*.csv")}
    assert any("HYPERLINK" in t for t in texts.values())
    for name, text in texts.items():
        for cell in (c for line in text.splitlines() for c in line.split(",")):
            assert not cell.lstrip('"').startswith(("=", "+", "@")), (name, cell)
    ex = tables.read_csv((sweep / "report" / "excluded.csv").read_bytes(), keep_default_na=False)
    assert evil in set(ex["run_id"])  # read back, the name is exact
    assert tables.unescape_cell(tables.escape_cell("'=x")) == "'=x" and tables.escape_cell(-1.5) == -1.5


# ================================================================= 6. the CPU's instruction set
def test_run_json_records_the_cpu_and_its_instruction_set(cfg_factory):
    from nondet_hpc.run import task

    rd = Path(task.run(cfg_factory("source=init", "seed=5"))["run_dir"])
    rec = json.loads((rd / "run.json").read_text())
    cpu = rec["cpu"]
    assert cpu["model"] and cpu["capability"] and cpu["onednn_isa"] and isinstance(cpu["pins"], dict)
    effect = rec["kernels"]["effect"]
    assert "thread count" in effect and "vector instruction set" in effect and "'cpu'" in effect


def test_a_pinned_isa_is_recorded_as_such():
    import torch

    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        pytest.skip("needs a CPU above AVX2 to pin it lower")
    code = "import json; from nondet_hpc.run.cpuinfo import cpu_record; print(json.dumps(cpu_record()))"
    env = cli_env({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    rec = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout)
    assert rec["capability"] == "AVX2" and rec["onednn_isa"] == "Intel AVX2"
    assert rec["pins"] == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_a_group_never_silently_pools_two_instruction_sets(tmp_path):
    sweep = tmp_path / "sweep"
    _small_sweep(sweep)
    cpu = {"model": "AMD EPYC", "capability": "AVX512", "onednn_isa": "Intel AVX-512", "pins": {}}
    for src in ("init", "shuffle"):
        for k in (1, 2, 3):
            isa = dict(cpu, capability="AVX2", onednn_isa="Intel AVX2") if (src, k) == ("init", 2) else cpu
            set_env(sweep / "runs" / run_id(src, k), **CPU_ENV, cpu=isa)
    with pytest.raises(R.ReduceError, match=r"mixes environments:\n  cpu ISA: .*AVX512.*AVX2") as e:
        R.reduce_sweep(sweep, n_boot=20)
    assert run_id("init", 2) in str(e.value)
    df = R.reduce_sweep(sweep, n_boot=20, allow_mixed=True)
    assert "cpu ISA" in row(df, "Parameter Initialization")["note"]


# ================================================================= 8. small ones, one message each
def test_evaluate_names_a_malformed_config_and_skips_a_stray_done(cfg_factory, tmp_path):
    from nondet_hpc.run import task
    from nondet_hpc.run.evaluate import EvaluateError, evaluate_run

    rd = Path(task.run(cfg_factory("source=init", "seed=6"))["run_dir"])
    good = (rd / "config.yaml").read_text()
    (rd / "config.yaml").write_text("- a\n- list\n")
    with pytest.raises(EvaluateError, match="holds a YAML list, not the mapping of config keys"):
        evaluate_run(rd, ["flip"])
    (rd / "config.yaml").write_text(good.replace("- 16\n  - 32\n  - 64", "- 8\n  - 16\n  - 32"))
    with pytest.raises(EvaluateError, match=r"checkpoint.pt does not fit the model .*config.yaml describes"):
        evaluate_run(rd, ["flip"])
    (rd / "config.yaml").write_text(good)
    stray = rd.parent / "x"
    stray.mkdir()
    (stray / "DONE").write_text("{}")
    p = run_cli(["-m", "nondet_hpc.evaluate", str(rd.parent.parent), "--views", "flip"], check=False)
    assert p.returncode == 0 and "Traceback" not in p.stderr
    assert "x: skipped: DONE but no config.yaml" in p.stdout and "1 run(s) evaluated, 0 failed" in p.stdout


def test_a_checkpoint_with_an_unexpected_progress_record_is_named(cfg_factory):
    import torch

    from nondet_hpc.run import task
    from nondet_hpc.run.train import load_checkpoint_file

    rd = Path(task.run(cfg_factory("source=init", "seed=8"))["run_dir"])
    state = torch.load(rd / "checkpoint.pt", weights_only=True)
    state["progress"] = {"epoch": 2, "batch": 0, "steps_done": 8}
    torch.save(state, rd / "checkpoint.pt")
    with pytest.raises(ConfigError, match=r"checkpoint.pt: its progress record has \['batch', 'epoch', "
                                          r"'steps_done'\].*move it away"):
        load_checkpoint_file(rd / "checkpoint.pt", rd.name)


def test_an_out_dir_too_long_for_the_file_system_is_one_message(tmp_path):
    p = run_cli(["-m", "nondet_hpc", "source=init", "seed=1", f"out_dir={tmp_path / ('x' * 300)}"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "is 300 bytes, more than the 255 this file system allows in one name" in p.stderr


def test_plan_names_a_non_numeric_cell(tmp_path):
    sweep = tmp_path / "sweep"
    _small_sweep(sweep)
    R.reduce_sweep(sweep, n_boot=20)
    csv = sweep / "report" / "per_model.csv"
    df = pd.read_csv(csv)
    df["acc"] = df["acc"].astype(object)
    df.loc[2, "acc"] = "n/a"
    csv.write_bytes(tables.csv_bytes(df))
    rec = json.loads((sweep / "report" / "report.json").read_text())
    rec["files"]["per_model.csv"] = _digest(csv)  # as if the reducer had written it so
    (sweep / "report" / "report.json").write_text(json.dumps(rec))
    with pytest.raises(PlanError, match=r"per_model.csv: row 4 \(.*\) has acc='n/a', not a finite number"):
        plan_sweep(sweep, {"acc_sd_se": 0.5}, check=False)
