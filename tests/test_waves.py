"""A study grown in waves (sweep/waves.py, cluster/advance.py) against the fake SLURM client: the first wave and the
stop rule recorded before submission, which groups get a next wave, idempotence of a repeated
reducer run, the message of a refused submission, and the launcher's reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli
from nondet_hpc.cluster import advance, submit
from nondet_hpc.sweep import waves
from nondet_hpc.config import ConfigError
from slurm_fixtures import params_for, plan

RULE = {"targets": {"acc_sd_se": 0.5}, "wave": 3, "max_models": 7}


def _groups(runs):
    jobs: dict = {}
    for r in runs:
        rest, seed = waves.split_seed(r.overrides)
        jobs.setdefault(waves.group_label(rest), []).append((seed, r.overrides))
    return jobs


def _start(sweep: Path, params: dict):
    """What the launcher does for a new study: wave 1 (seeds 1-3 of 1-8, max 7) of init and shuffle."""
    runs = plan(sweep, seeds=range(1, 9))
    groups = _groups(runs)
    wanted = waves.seeds_to_plan(RULE, groups, None)
    first = [r for r in runs if waves.split_seed(r.overrides)[1] in wanted[waves.group_label(
        waves.split_seed(r.overrides)[0])]]
    by_label: dict = {}
    for r in first:
        by_label.setdefault(waves.group_label(waves.split_seed(r.overrides)[0]), []).append(r)
    waves.record_first_waves(sweep, RULE, groups, by_label, params, [], sign=True)  # as the SLURM launcher
    res = submit.submit_sweep(sweep, first, params, argv=["test"], echo=lambda s: None)
    waves.mark_submitted(sweep, res.submission)
    return res


def _finish_all(sweep: Path) -> None:
    m = json.loads((sweep / "sweep.json").read_text())
    for rec in m["runs"].values():
        Path(rec["run_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(rec["run_dir"]) / "DONE").write_text("")


def _study(sweep: Path) -> dict:
    return json.loads((sweep / "sweep.json").read_text())["study"]


def test_rule_is_validated():
    assert waves.rule_from_config({"target": {"acc_sd_se": None}}) is None  # off: today's behaviour
    with pytest.raises(ConfigError, match="study.wave=1"):
        waves.rule_from_config({"target": {"acc_sd_se": 0.02}, "wave": 1})
    with pytest.raises(ConfigError, match="below study.wave"):
        waves.rule_from_config({"target": {"acc_sd_se": 0.02}, "wave": 10, "max_models": 5})
    with pytest.raises(ConfigError, match="positive"):
        waves.rule_from_config({"target": {"acc_sd_se": -1}, "wave": 10})
    with pytest.raises(ConfigError, match="does not vary the seed"):
        waves.split_seed(["source=init"])


def test_first_wave_records_the_rule_before_submitting(fake, tmp_path):
    sweep = tmp_path / "sw"
    res = _start(sweep, params_for(sweep))
    assert len(res.submitted) == 6  # 3 seeds x 2 groups
    st = _study(sweep)
    assert st["rule"] == RULE and st["status"] == "running"
    assert st["groups"]["source=init"]["seeds"] == [1, 2, 3, 4, 5, 6, 7]  # max 7 of the 8 swept
    assert st["groups"]["source=init"]["submitted"] == [1, 2, 3]
    assert st["waves"][0]["status"] == "submitted" and st["waves"][0]["submission"] == res.submission
    # another stop rule for the same folder is refused: the rule is fixed before the first wave
    with pytest.raises(waves.StudyMismatch, match="fixed before its first wave"):
        waves.seeds_to_plan({**RULE, "wave": 4}, _groups(plan(sweep, seeds=range(1, 9))), st)


def test_next_wave_only_for_groups_below_target_and_idempotent(fake, tmp_path, monkeypatch):
    sweep = tmp_path / "sw"
    _start(sweep, params_for(sweep))
    _finish_all(sweep)
    monkeypatch.setattr(advance, "measure", lambda d, s: {"source=init": {"acc_sd_se": 0.1},
                                                        "source=shuffle": {"acc_sd_se": 0.9}})
    n_jobs = len(fake.state["jobs"])
    assert advance.advance(sweep, echo=lambda s: None) == 0
    st = _study(sweep)
    assert st["groups"]["source=init"]["state"] == "target met"
    assert st["waves"][1]["groups"] == {"source=shuffle": [4, 5, 6]}
    assert st["waves"][1]["status"] == "submitted"
    new = fake.state["jobs"][n_jobs:]
    assert len(new) == 2 and new[0]["array"] == 3  # one array of 3 seeds and its reducer
    m = json.loads((sweep / "sweep.json").read_text())
    seeds = sorted(int(r["overrides"][-1].split("=")[1]) for r in m["runs"].values()
                   if "source=shuffle" in r["overrides"])
    assert seeds == [1, 2, 3, 4, 5, 6]
    # the same reducer run again: the wave is decided, nothing is submitted
    n_jobs = len(fake.state["jobs"])
    assert advance.advance(sweep, echo=lambda s: None) == 0
    assert len(fake.state["jobs"]) == n_jobs
    # wave 2 done, still not met: the last wave is capped at max_models=7 (seed 7 only)
    _finish_all(sweep)
    assert advance.advance(sweep, echo=lambda s: None) == 0
    assert _study(sweep)["waves"][2]["groups"] == {"source=shuffle": [7]}
    _finish_all(sweep)
    assert advance.advance(sweep, echo=lambda s: None) == 0
    st = _study(sweep)
    assert st["status"] == "done" and "maximum reached (7 models)" in st["stop_reason"]
    assert "target met" in st["stop_reason"] and len(st["waves"]) == 3


def test_runs_not_done_stop_the_study(fake, tmp_path, monkeypatch):
    sweep = tmp_path / "sw"
    _start(sweep, params_for(sweep))
    out: list[str] = []
    assert advance.advance(sweep, echo=out.append) == 0 and "still has runs queued" in out[0]  # not yet over
    for job in list(fake.state["queue"]):
        fake.set_task(job, "FAILED", queue=False, exit="1:0")
    out.clear()
    assert advance.advance(sweep, echo=out.append) == 1
    st = _study(sweep)
    assert st["status"] == "stopped" and "6 run(s) not done" in st["stop_reason"] and "rerun" in out[0]


def test_refused_submission_stops_with_its_message(fake, tmp_path, monkeypatch):
    sweep = tmp_path / "sw"
    _start(sweep, params_for(sweep))
    _finish_all(sweep)
    monkeypatch.setattr(advance, "measure", lambda d, s: {g: {"acc_sd_se": 0.9} for g in s["groups"]})
    fake.update(behave={"sbatch": {"fail": "sbatch: error: QOSMaxSubmitJobPerUserLimit"}})
    out: list[str] = []
    assert advance.advance(sweep, echo=out.append) == 1
    st = _study(sweep)
    assert st["status"] == "stopped" and st["waves"][1]["status"] == "failed"
    assert "QOSMaxSubmitJobPerUserLimit" in st["stop_reason"] and "Rerun the same sweep command" in st["stop_reason"]
    assert any("QOSMaxSubmitJobPerUserLimit" in line for line in out)
    # a repeated reducer run does not retry behind the user's back
    fake.update(behave={})
    n_jobs = len(fake.state["jobs"])
    assert advance.advance(sweep, echo=lambda s: None) == 0 and len(fake.state["jobs"]) == n_jobs


def test_cli_first_wave_rerun_and_lost_reducer(tmp_path, fake):
    sweep = tmp_path / "sw"
    args = ["-m", "nondet_hpc", "-m", "source=init,shuffle", "seed=range(1,9)", f"out_dir={sweep}",
            "train.epochs=2", "hydra/launcher=slurm", "study.target.acc_sd_se=0.5", "study.wave=3",
            "study.max_models=7"]
    p = run_cli(args)
    assert "6 submitted now" in p.stdout and "stop rule: acc_sd_se <= 0.5, wave 3, max 7" in p.stdout
    st = _study(sweep)
    assert st["groups"]["source=shuffle"]["submitted"] == [1, 2, 3]
    # the run ids the reducer job will make from the recorded config are the launcher's
    again = waves.plan_next(st, {"source=shuffle": [2]})["source=shuffle"][0]
    assert again.run_id == st["groups"]["source=shuffle"]["run_ids"]["2"]
    # a second identical command while the wave is queued: nothing new
    n = len(fake.state["jobs"])
    p = run_cli(args)
    assert "0 submitted now" in p.stdout and len(fake.state["jobs"]) == n
    # the reducer is cancelled and the runs finish: the rerun queues only a reducer to decide the wave
    reducer = fake.state["jobs"][-1]["id"]
    run_cli(["-m", "nondet_hpc.cancel", str(sweep)])
    assert reducer not in fake.state["queue"]
    _finish_all(sweep)
    p = run_cli(args)
    new = fake.state["jobs"][n:]
    assert len(new) == 1 and new[0]["array"] is None and new[0]["dependency"] is None, new
    # the status command shows the study
    p = run_cli(["-m", "nondet_hpc.status", str(sweep)])
    assert "study: running after 1 wave(s)" in p.stdout and "group source=init: 3 seeds submitted" in p.stdout
    # a different stop rule is refused without a traceback
    p = run_cli(args[:-1] + ["study.max_models=8"], check=False)
    assert p.returncode == 1 and "fixed before its first wave" in p.stderr and "Traceback" not in p.stderr


def test_the_last_report_shows_the_final_state_and_why(fake, tmp_path, monkeypatch):
    """The reducer writes report.md before its wave is decided; the decision brings the report's study
    section up to date, so a finished study's last report says done (or stopped) and why."""
    sweep = tmp_path / "sw"
    _start(sweep, params_for(sweep))
    _finish_all(sweep)
    report = sweep / "report" / "report.md"
    report.parent.mkdir()
    # as the reducer leaves it: its sections, the study's (growing), and one after it
    report.write_text("# Report\n\ntext\n\n" + "\n".join(waves.report_section(sweep)) + "\n## Later\n\nmore\n")
    assert "**State: growing**" in report.read_text()
    monkeypatch.setattr(advance, "measure", lambda d, s: {g: {"acc_sd_se": 0.1} for g in s["groups"]})
    assert advance.advance(sweep, echo=lambda s: None) == 0
    text = report.read_text()
    section = text[text.index("## Study grown in waves"):text.index("## Later")]
    assert "**State: done**: after 1 wave(s): every group stopped (target met)" in section
    assert "growing" not in section and section.count("; target met") == 2
    assert text.startswith("# Report\n\ntext\n\n") and text.endswith("## Later\n\nmore\n")


def test_a_stopped_study_says_so_in_its_report(fake, tmp_path):
    sweep = tmp_path / "sw"
    _start(sweep, params_for(sweep))
    report = sweep / "report" / "report.md"
    report.parent.mkdir()
    report.write_text("# Report\n" + "\n".join(waves.report_section(sweep)))
    for job in list(fake.state["queue"]):
        fake.set_task(job, "FAILED", queue=False, exit="1:0")
    assert advance.advance(sweep, echo=lambda s: None) == 1
    assert "**State: stopped**: wave 1: 6 run(s) not done" in report.read_text()
    # a failed reducer stops it too, and says so
    waves.record_first_waves(sweep, RULE, {}, {}, params_for(sweep), [], sign=True)  # the rerun continues it
    advance.after_reduce(sweep, 2, echo=lambda s: None)
    assert "**State: stopped**: the reducer exited with 2 after wave 1" in report.read_text()
