"""Submission time of large sweeps with hydra/launcher=slurm, against the previous code in the same run.

Measures what a user waits for: the wall time of the whole command
``python -m nondet_hpc -m source=init,shuffle seed='range(1,K)' hydra/launcher=slurm`` until it
returns (Python start, Hydra composing the job configs, sweep.json, pickles, sbatch), for a
700-run and a 1000-run sweep (2 sources x 350 / 500 seeds). The jobs are submitted held
(``hydra.launcher.hold=true``), checked in squeue, and cancelled with ``python -m nondet_hpc.cancel``;
nothing trains. Also times the identical second command (it finds every run queued and submits
nothing) and ``python -m nondet_hpc.status``.

The reference is the code of ``--reference-rev`` (default: the last commit before issue 9's fast
submission), checked out with ``git archive`` (src/ and conf/) into a temporary folder and run the
same way, interleaved with this checkout's runs, so both see the same machine and load. The
ratios (this checkout / reference) are what to compare; targets: submission < 1/3 of the
reference, the identical rerun < 3 s. CPU seconds (user + sys) are reported beside the wall
times: on a machine shared with other work they are the steadier measure.

    bash launch/start_slurm.sh              # a local cluster, if you have none
    python benchmarks/submit_700.py [--runs 700,1000] [--repeats 3] [--reference-rev REV] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the last commit whose launcher composed every job with Hydra's node and had no plan keys
REFERENCE_REV = "2dac656"


#: CPU seconds (user + sys) of the last command: unlike the wall time, not stretched by other load
LAST_CPU_S = [0.0]


def run(args: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=600, stdin=subprocess.DEVNULL)
    dt = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    LAST_CPU_S[0] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(args)}\n{p.stdout}\n{p.stderr}")
    return dt, p


def queued_tasks(job_ids: set[str]) -> int:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%F %T"], capture_output=True, text=True,
                         timeout=60).stdout
    return sum(1 for line in out.splitlines() if line.split()[0] in job_ids)


def reference_src(rev: str, parent: Path) -> Path:
    """src/ and conf/ of commit ``rev`` under ``parent/reference`` (its src/ goes on PYTHONPATH)."""
    dest = parent / "reference"
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src", "conf"], capture_output=True,
                             timeout=120, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=120)
    return dest / "src"


def measure(src: Path, sweep: Path, seeds: int, max_array_size: int | None, with_status: bool) -> dict:
    """Submit (held), check squeue, time the identical rerun (and status), cancel."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    n = 2 * seeds
    cmd = ["-m", "nondet_hpc", "-m", "source=init,shuffle", f"seed=range(1,{seeds + 1})",
           f"out_dir={sweep}", "hydra/launcher=slurm", "hydra.launcher.hold=true"]
    if max_array_size:
        cmd.append(f"hydra.launcher.max_array_size={max_array_size}")
    try:
        submit_s, p = run(cmd, env)
        submit_cpu_s = LAST_CPU_S[0]
        m = json.loads((sweep / "sweep.json").read_text())
        sub = m["submissions"][0]
        ids = {a["job_id"] for a in sub["arrays"]}
        assert len(m["runs"]) == n and sum(a["size"] for a in sub["arrays"]) == n, "not all runs submitted"
        queued = queued_tasks(ids)
        assert queued == n, f"{queued} of {n} tasks in squeue"
        compose = re.search(r"composed \d+ job configs in ([\d.]+) s", p.stdout + p.stderr)
        rerun_s, p2 = run(cmd, env)
        rerun_cpu_s = LAST_CPU_S[0]
        assert f"{n} queued/running, 0 submitted now" in p2.stdout, p2.stdout
        status_s = run(["-m", "nondet_hpc.status", str(sweep), "--json"], env)[0] if with_status else None
    finally:
        if (sweep / "sweep.json").exists():
            run(["-m", "nondet_hpc.cancel", str(sweep)], env)
    return {"runs": n, "arrays": len(sub["arrays"]), "submit_s": round(submit_s, 2),
            "submit_cpu_s": round(submit_cpu_s, 2), "rerun_cpu_s": round(rerun_cpu_s, 2),
            "compose_s_in_launcher": float(compose.group(1)) if compose else None,
            "rerun_s": round(rerun_s, 2), "status_s": round(status_s, 2) if status_s is not None else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="700,1000", help="sweep sizes, comma-separated (even: 2 sources)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference-rev", default=REFERENCE_REV, help="git revision of the reference code")
    ap.add_argument("--no-reference", action="store_true", help="time this checkout only")
    ap.add_argument("--max-array-size", type=int, default=None, help="override MaxArraySize (chunking)")
    ap.add_argument("--out", type=Path, default=None, help="parent folder of the sweep folders")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    if shutil.which("sbatch") is None:
        sys.exit("no sbatch on PATH: start a cluster first (bash launch/start_slurm.sh)")
    parent = args.out or Path(tempfile.mkdtemp(prefix="submit700-"))
    paths = {"this": REPO / "src"}
    if not args.no_reference:
        paths["reference"] = reference_src(args.reference_rev, parent)
    sizes = [int(x) for x in args.runs.split(",")]
    rows = []
    for n in sizes:
        for rep in range(args.repeats):
            for name, src in paths.items():  # interleaved: both see the same load
                row = {"code": name, **measure(src, parent / f"{name}-{n}-{rep}", n // 2, args.max_array_size,
                                               with_status=name == "this")}
                rows.append(row)
                print(f"{n} runs, repeat {rep}, {name}: {row}", flush=True)
    summary = {}
    for n in sizes:
        for name in paths:
            sel = [r for r in rows if r["runs"] == n and r["code"] == name]
            summary[f"{name}_{n}"] = {k: statistics.median(r[k] for r in sel)
                                      for k in ("submit_s", "rerun_s", "submit_cpu_s", "rerun_cpu_s")}
    result = {
        "benchmark": "submit_700", "sizes": sizes, "repeats": args.repeats,
        "reference_rev": None if args.no_reference else args.reference_rev, "summary": summary,
        "rows": rows, "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "sbatch": subprocess.run(["sbatch", "--version"], capture_output=True, text=True).stdout.strip(),
    }
    print()
    for n in sizes:
        this = summary[f"this_{n}"]
        line = (f"{n}-run sweep (median of {args.repeats}): submission {this['submit_s']:.1f} s, "
                f"identical rerun {this['rerun_s']:.1f} s")
        if "reference" in paths:
            ref = summary[f"reference_{n}"]
            line += (f"; reference {args.reference_rev}: {ref['submit_s']:.1f} s / {ref['rerun_s']:.1f} s; "
                     f"ratio {this['submit_s'] / ref['submit_s']:.2f} (target < 0.33) / "
                     f"{this['rerun_s'] / ref['rerun_s']:.2f} (rerun target < 3 s)\n"
                     f"  CPU seconds (not stretched by other load): submission {this['submit_cpu_s']:.1f} vs "
                     f"{ref['submit_cpu_s']:.1f} (ratio {this['submit_cpu_s'] / ref['submit_cpu_s']:.2f}), "
                     f"rerun {this['rerun_cpu_s']:.1f} vs {ref['rerun_cpu_s']:.1f}")
        print(line)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
