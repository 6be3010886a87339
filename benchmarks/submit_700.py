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
times: on a machine shared with other work they are the steadier measure; the load average before
and after each measurement is recorded and printed with the summary. A repetition that fails
(a command that exits non-zero or times out, e.g. an sbatch of the reference code that timed
out) is recorded with its error and left out of the medians; the summary says how many of the
repetitions each median is of, and is printed (and written) whatever failed.

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


class RepetitionFailed(RuntimeError):
    """One measurement could not be made (a command failed or timed out); the others go on."""


def run(args: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        p = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO,
                           timeout=600, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RepetitionFailed(f"no end within 600 s: {' '.join(args)}") from None
    dt = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    LAST_CPU_S[0] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-6:])
        raise RepetitionFailed(f"command failed ({p.returncode}): {' '.join(args)}\n{tail}")
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
        if len(m["runs"]) != n or sum(a["size"] for a in sub["arrays"]) != n:
            raise RepetitionFailed(f"not all {n} runs submitted")
        queued = queued_tasks(ids)
        if queued != n:
            raise RepetitionFailed(f"{queued} of {n} tasks in squeue")
        compose = re.search(r"composed \d+ job configs in ([\d.]+) s", p.stdout + p.stderr)
        rerun_s, p2 = run(cmd, env)
        rerun_cpu_s = LAST_CPU_S[0]
        if f"{n} queued/running, 0 submitted now" not in p2.stdout:
            raise RepetitionFailed(f"the identical rerun submitted something:\n{p2.stdout}")
        status_s = run(["-m", "nondet_hpc.status", str(sweep), "--json"], env)[0] if with_status else None
    finally:
        if (sweep / "sweep.json").exists():
            try:
                run(["-m", "nondet_hpc.cancel", str(sweep)], env)
            except RepetitionFailed as e:  # the jobs are held: cancel them by hand (squeue -u $USER)
                print(f"cancel failed: {e}", flush=True)
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
                load = os.getloadavg()[0]
                try:
                    row = {"code": name, **measure(src, parent / f"{name}-{n}-{rep}", n // 2, args.max_array_size,
                                                   with_status=name == "this")}
                except RepetitionFailed as e:
                    row = {"code": name, "runs": n, "failed": str(e)}
                row["load_before"], row["load_after"] = round(load, 2), round(os.getloadavg()[0], 2)
                rows.append(row)
                print(f"{n} runs, repeat {rep}, {name}: {row}", flush=True)
    summary = _summary(rows, sizes, list(paths))
    result = {
        "benchmark": "submit_700", "sizes": sizes, "repeats": args.repeats,
        "reference_rev": None if args.no_reference else args.reference_rev, "summary": summary,
        "rows": rows, "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "sbatch": subprocess.run(["sbatch", "--version"], capture_output=True, text=True).stdout.strip(),
    }
    print()
    print(_describe(summary, sizes, args.reference_rev if "reference" in paths else None, rows))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all("failed" not in r for r in rows) else 1


KEYS = ("submit_s", "rerun_s", "submit_cpu_s", "rerun_cpu_s", "status_s")


def _summary(rows: list[dict], sizes: list[int], codes: list[str]) -> dict:
    """Medians of the repetitions that worked, per code and size, with how many worked."""
    out = {}
    for n in sizes:
        for name in codes:
            sel = [r for r in rows if r["runs"] == n and r["code"] == name and "failed" not in r]
            med = {k: statistics.median(r[k] for r in sel) if sel and all(r.get(k) is not None for r in sel) else None
                   for k in KEYS}
            out[f"{name}_{n}"] = {**med, "repetitions": len(sel),
                                  "failed": len([r for r in rows if r["runs"] == n and r["code"] == name]) - len(sel)}
    return out


def _describe(summary: dict, sizes: list[int], reference: str | None, rows: list[dict]) -> str:
    loads = [x for r in rows for x in (r["load_before"], r["load_after"])]
    lines = [f"machine: {os.cpu_count()} CPUs, load average (1 min) during the runs {min(loads):.1f}-{max(loads):.1f}"]
    for n in sizes:
        this = summary[f"this_{n}"]
        if not this["repetitions"]:
            lines.append(f"{n}-run sweep: every repetition of this checkout failed (errors above)")
            continue
        line = (f"{n}-run sweep (median of {this['repetitions']}): submission {this['submit_s']:.1f} s, "
                f"identical rerun {this['rerun_s']:.1f} s" + (f", status {this['status_s']:.1f} s"
                                                                if this["status_s"] is not None else ""))
        ref = summary.get(f"reference_{n}")
        if ref and ref["repetitions"]:
            line += (f"; reference {reference} (median of {ref['repetitions']}): {ref['submit_s']:.1f} s / "
                     f"{ref['rerun_s']:.1f} s; ratio {this['submit_s'] / ref['submit_s']:.2f} (target < 0.33) / "
                     f"{this['rerun_s'] / ref['rerun_s']:.2f} (rerun target < 3 s)\n"
                     f"  CPU seconds (not stretched by other load): submission {this['submit_cpu_s']:.1f} vs "
                     f"{ref['submit_cpu_s']:.1f} (ratio {this['submit_cpu_s'] / ref['submit_cpu_s']:.2f}), "
                     f"rerun {this['rerun_cpu_s']:.1f} vs {ref['rerun_cpu_s']:.1f}")
        elif ref is not None:
            line += f"; every repetition of the reference {reference} failed: no ratio"
        failed = this["failed"] + (ref["failed"] if ref else 0)
        if failed:
            line += f"\n  {failed} repetition(s) failed and are left out (errors above and in the JSON)"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
