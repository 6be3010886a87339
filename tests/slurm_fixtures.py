"""Helpers of the SLURM tests: a fake SLURM client for unit tests, the launcher's settings and
planned runs as the launcher makes them, and what the real-cluster tests wait on.

The fake client (``FakeSlurm``; the ``fake`` fixture of conftest.py puts one on PATH) is a
directory of executables (sbatch, squeue, sacct, scontrol, sacctmgr, scancel) backed by one JSON
state file, so submission, status and cancel logic can be tested without a cluster. The
real-cluster tests use ``require_cluster()``: they skip with a reason when no cluster is
reachable, but FAIL when CI=true (CI starts one with launch/start_slurm.sh, so a missing cluster
there is a bug, not a reason to skip).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import run_cli
from nondet_hpc.cluster import params as launcher_settings
from nondet_hpc.sweep import identity
from nondet_hpc.config import conf_dir
from nondet_hpc.registry.options import register_configs

FAKE_TOOL = textwrap.dedent(r'''
    #!{python}
    import json, os, re, sys, time
    STATE = {state!r}
    name = os.path.basename(sys.argv[0])
    args = sys.argv[1:]
    with open(STATE) as f:
        st = json.load(f)
    st.setdefault("calls", []).append([name] + args)
    def save():
        with open(STATE + ".tmp", "w") as f:
            json.dump(st, f)
        os.replace(STATE + ".tmp", STATE)
    behave = st.get("behave", {{}}).get(name, {{}})
    n_call = sum(1 for c in st["calls"] if c[0] == name)
    if behave.get("only_calls") and n_call not in behave["only_calls"]:
        behave = {{}}  # this behaviour is for other calls of the tool (1 = its first call)
    if behave.get("sleep"):
        save(); time.sleep(behave["sleep"])
    if behave.get("fail"):
        save(); sys.stderr.write(behave["fail"] + "\n"); sys.exit(behave.get("rc", 1))
    out = ""
    if name == "sbatch":
        script = open(args[-1]).read()
        jid = st.get("next_id", 100)
        st["next_id"] = jid + 1
        m = re.search(r"^#SBATCH --array=0-(\d+)%(\d+)", script, re.M)
        dep = re.search(r"^#SBATCH --dependency=(\S+)", script, re.M)
        com = re.search(r"^#SBATCH --comment=(.*)$", script, re.M)
        comment = com.group(1).strip("'") if com else ""
        job = {{"id": str(jid), "script": args[-1], "array": int(m.group(1)) + 1 if m else None,
               "parallelism": int(m.group(2)) if m else None, "dependency": dep.group(1) if dep else None,
               "comment": comment}}
        st.setdefault("jobs", []).append(job)
        # queue every task as PENDING
        q = st.setdefault("queue", {{}})
        if m:
            for i in range(job["array"]):
                q[f"{{jid}}_{{i}}"] = {{"state": "PENDING", "reason": "Priority", "raw": str(jid), "restarts": 0,
                                    "comment": comment}}
        else:
            q[str(jid)] = {{"state": "PENDING", "reason": "Dependency" if dep else "Priority", "raw": str(jid), "restarts": 0,
                           "comment": comment}}
        out = f"{{jid}}\n" if "--parsable" in args else f"Submitted batch job {{jid}}\n"
        if behave.get("late"):  # queued, and the answer comes late (a busy controller)
            save(); time.sleep(behave["late"])
    elif name == "squeue":
        lines = []
        fmt = [f.split(":")[0] for f in args[args.index("-O") + 1].split(",")] if "-O" in args else []
        for k, v in st.get("queue", {{}}).items():
            arr = k.split("_")[0] if "_" in k else k
            cols = {{"JobArrayID": k, "JobID": v.get("raw", arr), "ArrayJobID": arr, "State": v["state"],
                    "Reason": v.get("reason", "None"), "RestartCnt": str(v.get("restarts", 0)), "TimeUsed": "0:05",
                    "NodeList": "vm", "Comment": v.get("comment") or "(null)", "STDOUT": v.get("stdout", "")}}
            lines.append("|".join(cols[f] for f in fmt) + "|")
        out = "\n".join(lines) + ("\n" if lines else "")
    elif name == "sacct":
        ids = set()
        if "-j" in args:
            ids = set(args[args.index("-j") + 1].split(","))
        lines = []
        for k, rows in st.get("acct", {{}}).items():
            if k.split("_")[0] in ids:
                for row in rows:
                    lines.append("|".join([k, row.get("raw", k.split("_")[0]), row["state"],
                                           row.get("exit", "0:0"), "00:00:05", "", "", "vm"]))
        out = "\n".join(lines) + ("\n" if lines else "")
    elif name == "scontrol":
        if args[:2] == ["show", "config"]:
            out = f"Configuration data as of now\nMaxArraySize            = {{st.get('max_array_size', 1001)}}\nMaxJobCount             = 10000\n"
    elif name == "sacctmgr":
        if "assoc" in args:
            lim = st.get("max_submit")
            out = f"{{lim if lim is not None else ''}}|normal|normal\n"
        elif "qos" in args:
            out = "normal|\n"
    elif name == "scancel":
        for a in args:
            if a.startswith("-"):
                continue
            for k in list(st.get("queue", {{}})):
                if k == a or k.split("_")[0] == a:
                    st["queue"].pop(k)
                    st.setdefault("acct", {{}}).setdefault(k, []).append({{"state": "CANCELLED by 0", "exit": "0:0"}})
    save()
    sys.stdout.write(out)
''').lstrip()

TOOLS = ("sbatch", "squeue", "sacct", "scontrol", "sacctmgr", "scancel", "srun")


class FakeSlurm:
    """A fake SLURM client on PATH. ``state`` is the JSON the tools read and write."""

    def __init__(self, root: Path, tools: tuple[str, ...] = TOOLS):
        self.bin = root / "fakebin"
        self.bin.mkdir(parents=True, exist_ok=True)
        self.state_path = root / "fake_slurm.json"
        self.state_path.write_text(json.dumps({"next_id": 100, "jobs": [], "queue": {}, "acct": {}}))
        for t in tools:
            p = self.bin / t
            p.write_text(FAKE_TOOL.format(python=sys.executable, state=str(self.state_path)))
            p.chmod(0o755)

    @property
    def state(self) -> dict:
        return json.loads(self.state_path.read_text())

    def update(self, **kw) -> None:
        st = self.state
        st.update(kw)
        self.state_path.write_text(json.dumps(st))

    def set_task(self, job_id: str, state: str, *, queue: bool = True, exit: str = "0:0", reason: str = "None",
                 restarts: int = 0) -> None:
        st = self.state
        if queue:
            raw = st["queue"].get(job_id, {}).get("raw", job_id.split("_")[0])
            st["queue"][job_id] = {"state": state, "reason": reason, "raw": raw, "restarts": restarts}
        else:
            st["queue"].pop(job_id, None)
        st["acct"].setdefault(job_id, []).append({"state": state, "exit": exit})
        self.state_path.write_text(json.dumps(st))

    def calls(self, name: str) -> list[list[str]]:
        return [c[1:] for c in self.state.get("calls", []) if c[0] == name]

    def env(self, path_prefix: bool = True) -> dict:
        env = dict(os.environ)
        env["PATH"] = f"{self.bin}{os.pathsep}{env['PATH']}" if path_prefix else str(self.bin)
        return env


# ------------------------------------------------------------------------------ the launcher's view
PY = "/opt/venv/bin/python"  # a fixed interpreter path makes the sbatch scripts comparable


def launcher_params(preset: str, *overrides: str, out_dir: str = "/sweep") -> dict:
    """The SLURM launcher's settings of ``hydra/launcher=PRESET``, normalized as its setup does."""
    register_configs()
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={preset}", f"out_dir={out_dir}", *overrides],
                      return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params["python"] = PY
    return launcher_settings.normalize(params, out_dir)


def params_for(sweep: Path, **kw) -> dict:
    p = launcher_params("slurm", out_dir=str(sweep))
    p.update(kw)
    return p


def job_cfgs(out_dir: Path, sources=("init", "shuffle"), seeds=(1, 2, 3), *extra: str):
    """One composed config per (source, seed), 2 epochs."""
    register_configs()
    cfgs = []
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        for src in sources:
            for seed in seeds:
                cfgs.append(compose("config", overrides=[f"out_dir={out_dir}", f"source={src}", f"seed={seed}",
                                                         "train.epochs=2", *extra]))
    return cfgs


def plan(out_dir: Path, *extra: str, sources=("init", "shuffle"), seeds=(1, 2, 3)):
    """The planned runs of a sweep over ``sources`` x ``seeds``, as the launcher plans them."""
    return [identity.plan_run(c, [f"source={c.source.name}", f"seed={c.seed}"])
            for c in job_cfgs(out_dir, sources, seeds, *extra)]


def sbatch_flags(text: str) -> list[str]:
    """The #SBATCH lines of a script as command-line flags (what sbatch will apply)."""
    return [line[len("#SBATCH "):].strip() for line in text.splitlines() if line.startswith("#SBATCH ")]


# ------------------------------------------------------------------------------ real cluster
def cluster_problem(timeout: float = 15.0) -> str | None:
    """None when a SLURM cluster answers here, else why not."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH (start a local cluster: bash launch/start_slurm.sh)"
    try:
        p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0 or "UP" not in p.stdout:
            return f"slurmctld not reachable: {p.stdout.strip()} {p.stderr.strip()}"
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=timeout)
        states = p.stdout.split()
        if not any(s.startswith(("idle", "mixed", "alloc", "completing")) for s in states):
            return f"no usable node (sinfo states: {states})"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"SLURM does not answer: {e}"
    return None


def require_cluster() -> None:
    problem = cluster_problem()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the SLURM cluster is not up: {problem}. .ci/run must run "
                    "launch/start_slurm.sh before the tests.", pytrace=False)
    pytest.skip(f"SLURM cluster not reachable: {problem}")


def sweep_status(sweep_dir: Path, env: dict | None = None) -> dict:
    p = run_cli(["-m", "nondet_hpc.status", str(sweep_dir), "--json"], env=env, timeout=120)
    return json.loads(p.stdout)


def wait_for(predicate, timeout: float, interval: float = 1.0, what: str = "condition"):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


def wait_progressing(predicate, progress, stall: float, interval: float = 1.0, what: str = "condition"):
    """Wait for ``predicate()`` while ``progress()`` keeps changing; fail only after ``stall`` s
    without a change. A slow or loaded machine makes progress slowly, not never, so no fixed
    deadline has to guess its speed (a hung job still fails, ``stall`` s after its last sign)."""
    last_change, seen = time.monotonic(), progress()
    while True:
        got = predicate()
        if got:
            return got
        now = progress()
        if now != seen:
            last_change, seen = time.monotonic(), now
        elif time.monotonic() - last_change > stall:
            raise AssertionError(f"no progress for {stall:g} s waiting for {what} (last progress: {seen!r}, "
                                 f"last: {got!r})")
        time.sleep(interval)


def heartbeat(run_dir: Path) -> dict:
    """run.json's heartbeat of a run (epoch, step, elapsed_s), {} before the first epoch ends."""
    try:
        info = json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return info.get("heartbeat") or {} if isinstance(info, dict) else {}


def measure_epoch_seconds(tmp: Path, epochs: int = 4) -> float:
    """Seconds per digits epoch on one thread, measured here by a short local run of the same
    training the SLURM tests submit (the mean over the first epochs, start-up included)."""
    out = Path(tmp) / "epoch-reference"
    run_cli(["-m", "nondet_hpc", "source=init", "seed=1", f"train.epochs={epochs}", "train.threads=1",
             f"out_dir={out}"], timeout=600)
    (run,) = (out / "runs").iterdir()
    hb = heartbeat(run)
    assert hb.get("epoch") == epochs, hb
    return max(hb["elapsed_s"] / epochs, 1e-3)
