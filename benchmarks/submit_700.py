"""Submission time of a 700-run sweep (2 sources x 350 seeds) with hydra/launcher=slurm.

Measures what a user waits for: the wall time of the whole command
``python -m nondet_hpc -m source=init,shuffle seed='range(1,351)' hydra/launcher=slurm`` until it
returns (Python start, Hydra composing 700 configs, sweep.json, pickles, sbatch). The jobs are
submitted held (``hydra.launcher.hold=true``), checked in squeue, and cancelled with
``python -m nondet_hpc.cancel``; nothing trains. Also times the identical second command (it
finds all 700 queued and submits nothing) and `python -m nondet_hpc.status`.

    bash launch/start_slurm.sh              # a local cluster, if you have none
    python benchmarks/submit_700.py [--repeats 3] [--max-array-size 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=600, stdin=subprocess.DEVNULL)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(args)}\n{p.stdout}\n{p.stderr}")
    return dt, p


def queued_tasks(job_ids: set[str]) -> int:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%F %T"], capture_output=True, text=True,
                         timeout=60).stdout
    return sum(1 for line in out.splitlines() if line.split()[0] in job_ids)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=350, help="seeds per source (2 sources)")
    ap.add_argument("--max-array-size", type=int, default=None, help="override MaxArraySize (chunking)")
    ap.add_argument("--out", type=Path, default=None, help="parent folder of the sweep folders")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    if shutil.which("sbatch") is None:
        sys.exit("no sbatch on PATH: start a cluster first (bash launch/start_slurm.sh)")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    parent = args.out or Path(tempfile.mkdtemp(prefix="submit700-"))
    n = 2 * args.seeds
    rows = []
    for rep in range(args.repeats):
        sweep = parent / f"sweep{rep}"
        cmd = ["-m", "nondet_hpc", "-m", "source=init,shuffle", f"seed=range(1,{args.seeds + 1})",
               f"out_dir={sweep}", "hydra/launcher=slurm", "hydra.launcher.hold=true"]
        if args.max_array_size:
            cmd.append(f"hydra.launcher.max_array_size={args.max_array_size}")
        try:
            submit_s, p = run(cmd, env)
            m = json.loads((sweep / "sweep.json").read_text())
            sub = m["submissions"][0]
            ids = {a["job_id"] for a in sub["arrays"]}
            assert len(m["runs"]) == n and sum(a["size"] for a in sub["arrays"]) == n, "not all runs submitted"
            queued = queued_tasks(ids)
            assert queued == n, f"{queued} of {n} tasks in squeue"
            compose = re.search(r"composed \d+ job configs in ([\d.]+) s", p.stdout + p.stderr)
            rerun_s, p2 = run(cmd, env)
            assert f"{n} queued/running, 0 submitted now" in p2.stdout, p2.stdout
            status_s, _ = run(["-m", "nondet_hpc.status", str(sweep), "--json"], env)
        finally:
            if (sweep / "sweep.json").exists():
                run(["-m", "nondet_hpc.cancel", str(sweep)], env)
        row = {"runs": n, "arrays": len(sub["arrays"]), "submit_s": round(submit_s, 2),
               "compose_s_in_launcher": float(compose.group(1)) if compose else None,
               "rerun_s": round(rerun_s, 2), "status_s": round(status_s, 2)}
        rows.append(row)
        print(f"repeat {rep}: {row}", flush=True)
    result = {
        "benchmark": "submit_700", "runs": n, "repeats": args.repeats,
        "submit_s_median": statistics.median(r["submit_s"] for r in rows),
        "rerun_s_median": statistics.median(r["rerun_s"] for r in rows),
        "status_s_median": statistics.median(r["status_s"] for r in rows),
        "rows": rows, "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "sbatch": subprocess.run(["sbatch", "--version"], capture_output=True, text=True).stdout.strip(),
    }
    print(f"\n{n}-run sweep: submission {result['submit_s_median']:.1f} s (median of {args.repeats}; whole "
          f"command, held jobs), identical rerun {result['rerun_s_median']:.1f} s, status "
          f"{result['status_s_median']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
