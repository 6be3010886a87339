"""SLURM sweeps with runs perturbed from epoch k (issue 21) against the fake SLURM client: the
parents' array first, the children's arrays behind it (afterok, kill-on-invalid-dep), no job and
no dependency for a parent that is DONE with its checkpoints, a clear refusal when it is DONE
without them, the barrier job behind the arrays and the reducer behind the barrier job, what
sweep.json records (roles, each child's parent), status and cancel."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from nondet_hpc import rundir
from nondet_hpc.cluster import cancel, jobs, state, status, submit
from nondet_hpc.cluster.barrier_job import BarrierJob
from nondet_hpc.cluster.client import SubmissionError
from nondet_hpc.sweep import identity, schema
from nondet_hpc.sweep.parents import parent_config
from helpers import run_cli
from slurm_fixtures import job_cfgs, params_for, sbatch_flags


def stability_plan(out: Path, *extra: str, ks=(1,), seeds=(1, 2), control=False):
    """The planned runs of a bitflip sweep perturbed from epochs ``ks`` (+ the control seed 1 when
    ``control``), 3 epochs, as the launcher plans them."""
    cfgs = []
    for k in ks:
        cfgs += job_cfgs(out, ("bitflip",), seeds, "train.epochs=3", f"source.from_epoch={k}", *extra)
    if control:
        cfgs += job_cfgs(out, ("none",), (1,), "train.epochs=3", *extra)
    return [identity.plan_run(c, [f"source={c.source.name}", f"seed={c.seed}",
                                  f"source.from_epoch={c.source.from_epoch}"]) for c in cfgs]


def flags(fake, job: dict) -> dict[str, str]:
    """{option: value} of the #SBATCH lines sbatch got for a recorded job."""
    text = Path(job["script"]).read_text()
    return dict((f.removeprefix("--").split("=", 1) + [""])[:2] for f in sbatch_flags(text))


def pickled(folder: Path, job_id: str):
    with open(folder / f"{job_id}_submitted.pkl", "rb") as f:
        return pickle.load(f).function


def test_parents_first_children_afterok_and_roles(fake, tmp_path):
    sweep = tmp_path / "sw"
    runs = stability_plan(sweep, ks=(1, 2))
    res = submit.submit_sweep(sweep, runs, params_for(sweep), argv=["x"])
    queued = fake.state["jobs"]
    parents, children = queued[0], queued[1]
    # the parent made from the children's config: one task, no dependency, keeping epochs 1 and 2
    assert parents["array"] == 1 and parents["dependency"] is None
    parent_job = pickled(sweep / "slurm", f"{parents['id']}_0")
    assert isinstance(parent_job, jobs.RunJob)
    pcfg = parent_job.cfg
    assert pcfg["source"]["name"] == "none" and pcfg["seed"] == 1 and pcfg["source"]["from_epoch"] == 0
    assert pcfg["record"]["keep_checkpoints"] == [1, 2]
    # the children: afterok on the parents' array, killed by SLURM when it fails
    assert children["array"] == 4 and children["dependency"] == f"afterok:{parents['id']}"
    assert flags(fake, children)["kill-on-invalid-dep"] == "yes"
    assert "kill-on-invalid-dep" not in flags(fake, parents)
    m = json.loads((sweep / "sweep.json").read_text())
    assert schema.problems(m) == []
    sub = m["submissions"][0]
    assert [a.get("role") for a in sub["arrays"]] == ["parents", "children"]
    parent_id = parent_job.run_id
    assert sub["arrays"][0]["tasks"] == [[parent_id]] and sub["runs"][0] == parent_id
    assert {r.run_id for r in runs} == {rid for t in sub["arrays"][1]["tasks"] for rid in t}
    for r, (i, task) in zip(runs, enumerate(sub["arrays"][1]["tasks"])):
        assert m["runs"][r.run_id]["parent"] == parent_id
        # the parent the child's job looks for on its node (run/parent.py) is the one queued first
        child = pickled(sweep / "slurm", f"{children['id']}_{i}")
        assert child.run_id == task[0] and rundir.run_id(parent_config(jobs.as_config(child.cfg))) == parent_id
    assert m["runs"][parent_id]["keep_checkpoints"] == [1, 2] and "parent" not in m["runs"][parent_id]
    # the script names stay unique across the two arrays; the reducer waits for both
    assert len({j["script"] for j in queued}) == len(queued)
    assert queued[-1]["dependency"] == f"afterany:{parents['id']}:{children['id']}"
    assert res.parents == {r.run_id: parent_id for r in runs}
    text = submit.describe_submission(res, params_for(sweep))
    assert "the parent runs, first" in text and f"after afterok:{parents['id']}" in text


def test_the_sweeps_own_control_is_the_parent_and_others_need_no_dependency(fake, tmp_path):
    sweep = tmp_path / "sw"
    children = stability_plan(sweep)
    at0 = stability_plan(sweep, ks=(0,), seeds=(1, 2))  # today's runs: no parent
    control = stability_plan(sweep, ks=(), control=True)
    res = submit.submit_sweep(sweep, children + at0 + control, params_for(sweep), argv=["x"])
    queued = fake.state["jobs"]
    assert [j["array"] for j in queued[:3]] == [1, 2, 2]
    assert [j["dependency"] for j in queued[:3]] == [None, None, f"afterok:{queued[0]['id']}"]
    # the parent is the sweep's own control run (same run id), keeping the epoch its children need
    job = pickled(sweep / "slurm", f"{queued[0]['id']}_0")
    assert job.run_id == control[0].run_id and job.cfg["record"]["keep_checkpoints"] == [1]
    assert len(res.submitted) == 5  # no parent made here
    m = json.loads((sweep / "sweep.json").read_text())
    assert [a.get("role") for a in m["submissions"][0]["arrays"]] == ["parents", None, "children"]
    assert all(m["runs"][r.run_id]["parent"] == control[0].run_id for r in children)
    assert all("parent" not in m["runs"][r.run_id] for r in at0)


def _finish(run: identity.PlannedRun, keep=()) -> None:
    """A DONE run folder (and the kept checkpoints ``keep``)."""
    run.run_dir.mkdir(parents=True)
    for k in keep:
        p = rundir.kept_checkpoint(run.run_dir, k)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"state")
    (run.run_dir / rundir.DONE).write_text("{}")


def test_a_done_parent_needs_no_job_and_its_children_no_dependency(fake, tmp_path):
    sweep = tmp_path / "sw"
    control = stability_plan(sweep, ks=(), control=True)
    _finish(control[0], keep=[1])
    res = submit.submit_sweep(sweep, stability_plan(sweep) + control, params_for(sweep), argv=["x"])
    queued = fake.state["jobs"]
    assert len(queued) == 2 and queued[0]["array"] == 2 and queued[0]["dependency"] is None
    assert "kill-on-invalid-dep" in flags(fake, queued[0])  # a children array, whose parent is done
    assert res.done == [control[0].run_id]


def test_a_done_parent_without_the_checkpoint_is_refused_with_the_fix(fake, tmp_path):
    sweep = tmp_path / "sw"
    control = stability_plan(sweep, ks=(), control=True)
    _finish(control[0], keep=[1])  # epoch 2 was never asked for
    with pytest.raises(SubmissionError) as e:
        submit.submit_sweep(sweep, stability_plan(sweep, ks=(1, 2)) + control, params_for(sweep), argv=["x"])
    msg = str(e.value)
    assert control[0].run_id in msg and "epoch(s) [2]" in msg and "record.keep_checkpoints=[1,2]" in msg
    assert "force=true" in msg and "Nothing was submitted" in msg
    assert fake.state["jobs"] == []
    assert (control[0].run_dir / rundir.DONE).exists()  # the completed run is left as it is


def test_a_parent_queued_earlier_is_waited_for_by_its_task(fake, tmp_path):
    sweep = tmp_path / "sw"
    submit.submit_sweep(sweep, stability_plan(sweep, seeds=(1,)), params_for(sweep), argv=["x"])
    parent_array = fake.state["jobs"][0]["id"]  # the parent (keeping epoch 1) and seed 1, still queued
    res = submit.submit_sweep(sweep, stability_plan(sweep, seeds=(1, 2)), params_for(sweep), argv=["x"])
    assert len(res.submitted) == 1 and len(res.active) == 2  # seed 2 only; the parent (queued) is not planned twice
    new = fake.state["jobs"][-2]
    assert new["array"] == 1 and new["dependency"] == f"afterok:{parent_array}_0"


def test_a_parent_queued_without_the_checkpoint_is_refused(fake, tmp_path):
    sweep = tmp_path / "sw"
    control = stability_plan(sweep, ks=(), control=True)
    submit.submit_sweep(sweep, control, params_for(sweep), argv=["x"])  # the control alone, keeping nothing
    first = fake.state["jobs"][0]["id"]
    with pytest.raises(SubmissionError) as e:
        submit.submit_sweep(sweep, stability_plan(sweep) + control, params_for(sweep), argv=["x"])
    assert f"scancel {first}_0" in str(e.value) and "epoch(s) [1]" in str(e.value)
    assert len(fake.state["jobs"]) == 2  # the first submission's array and reducer, nothing more


def test_children_of_a_parent_over_the_submit_limit_wait_too(fake, tmp_path):
    sweep = tmp_path / "sw"
    runs = stability_plan(sweep)
    res = submit.submit_sweep(sweep, runs, params_for(sweep, max_submit=3), argv=["x"])
    # room = 3 - 0 queued - 1 reducer = 2: the parent and one child would fit; the child waits with it
    assert len(res.submitted) == 2 and len(res.over_limit) == 1
    assert fake.state["jobs"][1]["dependency"] == f"afterok:{fake.state['jobs'][0]['id']}"
    # the barrier job takes its place under the limit too: room = 3 - 1 - 1 = 1, the parent alone
    sweep2 = tmp_path / "sw2"
    fake.update(queue={})  # the first sweep's jobs ended
    res = submit.submit_sweep(sweep2, stability_plan(sweep2, "barriers.pairs=1"), params_for(sweep2, max_submit=3),
                              argv=["x"])
    assert len(res.submitted) == 1 and len(res.over_limit) == 2 and res.barriers is not None


def test_barrier_job_after_the_arrays_and_the_reducer_after_it(fake, tmp_path):
    sweep = tmp_path / "sw"
    runs = stability_plan(sweep, "barriers.pairs=1", "barriers.bn_images=64", "barriers.points=5")
    params = params_for(sweep, barriers={"timeout_min": 15})
    res = submit.submit_sweep(sweep, runs, params, argv=["x"])
    queued = fake.state["jobs"]
    assert len(queued) == 4
    parents, children, barrier, reducer = queued
    assert barrier["array"] is None and barrier["dependency"] == f"afterany:{parents['id']}:{children['id']}"
    f = flags(fake, barrier)
    assert f["time"] == "15" and f["job-name"].endswith("-barriers") and "requeue" not in f
    job = pickled(sweep / "slurm", barrier["id"])
    assert isinstance(job, BarrierJob) and (job.pairs, job.points, job.bn_images) == (1, 5, 64)
    assert job.sweep_dir == str(sweep.absolute())
    assert reducer["dependency"] == f"afterany:{parents['id']}:{children['id']}:{barrier['id']}"
    m = json.loads((sweep / "sweep.json").read_text())
    entry = m["submissions"][0]["barriers"]
    assert entry["job_id"] == barrier["id"] and entry["command"].startswith("python -m nondet_hpc.barriers ")
    assert "--pairs 1" in entry["command"] and schema.problems(m) == []
    assert res.job_ids() == [parents["id"], children["id"], barrier["id"], reducer["id"]]
    assert f"barrier job {barrier['id']}" in submit.describe_submission(res, params)
    # status lists it; cancel cancels it (and --keep-reducer keeps it, with the reducer)
    st = state.sweep_status(sweep)
    assert st["barriers"]["job_id"] == barrier["id"] and st["barriers"]["state"] == "PENDING"
    assert f"barrier job: {barrier['id']} PENDING" in status.format_status(st)
    assert barrier["id"] not in cancel.cancel_sweep(sweep, dry_run=True, keep_reducer=True)
    assert barrier["id"] in cancel.cancel_sweep(sweep)
    # an earlier barrier job still queued: the next one waits for it (never two at once)
    sweep2 = tmp_path / "sw2"
    submit.submit_sweep(sweep2, stability_plan(sweep2, "barriers.pairs=1", seeds=(1,)), params, argv=["x"])
    b1 = fake.state["jobs"][-2]["id"]
    submit.submit_sweep(sweep2, stability_plan(sweep2, "barriers.pairs=1", seeds=(1, 2)), params, argv=["x"])
    b2 = fake.state["jobs"][-2]
    assert b2["dependency"].startswith("afterany:") and b1 in b2["dependency"].split(":")


def test_no_barrier_job_without_pairs(fake, tmp_path):
    sweep = tmp_path / "sw"
    res = submit.submit_sweep(sweep, stability_plan(sweep), params_for(sweep), argv=["x"])
    assert res.barriers is None and len(fake.state["jobs"]) == 3
    assert "barriers" not in json.loads((sweep / "sweep.json").read_text())["submissions"][0]


def test_status_names_the_parent_children_wait_for_or_lost(fake, tmp_path):
    sweep = tmp_path / "sw"
    runs = stability_plan(sweep)
    submit.submit_sweep(sweep, runs, params_for(sweep), argv=["x"])
    parents, children = fake.state["jobs"][:2]
    fake.set_task(f"{parents['id']}_0", "RUNNING")
    for i in range(2):
        fake.set_task(f"{children['id']}_{i}", "PENDING", reason="Dependency")
    st = state.sweep_status(sweep)
    kids = [r for r in st["runs"] if r["run_id"] in {x.run_id for x in runs}]
    parent_id = pickled(sweep / "slurm", f"{parents['id']}_0").run_id
    assert all(r["state"] == "pending" and r["note"] == f"waiting for its parent run {parent_id} (running)"
               for r in kids)
    # SLURM says the dependency can never be met (a parent's job that ended badly): not run
    fake.set_task(f"{children['id']}_0", "PENDING", reason="DependencyNeverSatisfied")
    st = state.sweep_status(sweep)
    kid = next(r for r in st["runs"] if r["job_id"] == f"{children['id']}_0")
    assert kid["state"] == "failed" and kid["note"].startswith(f"not run: its parent run {parent_id} did not succeed")
    # the parent fails: SLURM kills its children (kill-on-invalid-dep); status says why they did not run
    fake.set_task(f"{parents['id']}_0", "FAILED", queue=False, exit="1:0")
    for i in range(2):
        fake.set_task(f"{children['id']}_{i}", "CANCELLED", queue=False)
    st = state.sweep_status(sweep)
    kids = [r for r in st["runs"] if r["run_id"] in {x.run_id for x in runs}]
    assert all(r["state"] == "failed" and r["note"].startswith(f"not run: its parent run {parent_id} failed (job "
                                                                  f"{parents['id']}_0)") for r in kids)
    assert "not run: its parent run" in status.format_status(st)


def test_schema_reads_the_new_entries_and_salvages_a_damaged_barrier_record():
    good = {"version": 2, "runs": {"a": {"parent": "p", "jobs": []}, "p": {"keep_checkpoints": [1, 2]}},
            "submissions": [{"n": 0, "arrays": [{"job_id": "7", "role": "parents"}], "barriers": {"job_id": "9"}}]}
    assert schema.problems(good) == []
    bad = json.loads(json.dumps(good))
    bad["submissions"][0]["barriers"] = {"job": 3}
    bad["runs"]["a"]["parent"] = 5
    assert "submissions[0].barriers: an object, not null or an object" in " ".join(schema.problems(bad))
    out, lost = schema.salvage(bad)
    assert out["submissions"][0]["barriers"] is None and "a" not in out["runs"] and len(lost) == 2


def test_each_family_has_its_own_parent(fake, tmp_path):
    """Two learning rates: two parents in the parents' array, each child the one its node looks for."""
    sweep = tmp_path / "sw"
    runs = stability_plan(sweep, "train.lr=0.05", ks=(1, 2)) + stability_plan(sweep, "train.lr=0.1")
    submit.submit_sweep(sweep, runs, params_for(sweep), argv=["x"])
    m = json.loads((sweep / "sweep.json").read_text())
    parents_arr, children_arr = m["submissions"][0]["arrays"]
    assert parents_arr["role"] == "parents" and len(parents_arr["tasks"]) == 2
    by_lr = {}
    for i, (pid,) in enumerate(parents_arr["tasks"]):
        cfg = pickled(sweep / "slurm", f"{parents_arr['job_id']}_{i}").cfg
        by_lr[cfg["train"]["lr"]] = (pid, cfg["record"]["keep_checkpoints"])
    assert by_lr == {0.05: (by_lr[0.05][0], [1, 2]), 0.1: (by_lr[0.1][0], [1])}
    for r in runs:
        expected = rundir.run_id(parent_config(r.cfg))
        assert m["runs"][r.run_id]["parent"] == expected == by_lr[r.cfg.train.lr][0]


def test_cli_refuses_a_done_parent_without_the_checkpoint_cleanly(fake, tmp_path):
    sweep = tmp_path / "sw"
    args = ["-m", "nondet_hpc", "-m", "source=bitflip", "seed=1,2", "source.from_epoch=1", f"out_dir={sweep}",
            "train.epochs=3", "hydra/launcher=slurm"]
    p = run_cli(args)
    assert "the parent runs, first" in p.stdout and "after afterok:100" in p.stdout
    m = json.loads((sweep / "sweep.json").read_text())
    parent = next(rid for rid, rec in m["runs"].items() if rec.get("keep_checkpoints") == [1])
    fake.update(queue={})  # every job ended; the parent DONE without its epoch-1 checkpoint (say, retrained)
    (Path(m["runs"][parent]["run_dir"]) / rundir.DONE).parent.mkdir(parents=True)
    (Path(m["runs"][parent]["run_dir"]) / rundir.DONE).write_text("{}")
    p = run_cli(args, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"parent run {parent}" in p.stderr and "epoch(s) [1]" in p.stderr and "force=true" in p.stderr
    assert "Nothing was submitted." in p.stderr and len(fake.state["jobs"]) == 3


def test_chained_children_chunks_wait_for_the_parent_and_the_chunk_before(fake, tmp_path):
    sweep = tmp_path / "sw"
    runs = stability_plan(sweep, seeds=(1, 2, 3, 4))
    submit.submit_sweep(sweep, runs, params_for(sweep, max_array_size=2, array_parallelism=1), argv=["x"])
    parents, first, second = fake.state["jobs"][:3]
    assert (first["array"], second["array"]) == (2, 2)
    assert first["dependency"] == f"afterok:{parents['id']}"
    assert second["dependency"] == f"afterok:{parents['id']},afterany:{first['id']}"  # both must hold
    assert all(flags(fake, j)["kill-on-invalid-dep"] == "yes" for j in (first, second))
