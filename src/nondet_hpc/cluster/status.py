"""`python -m nondet_hpc.status SWEEP_DIR`: what a SLURM sweep is doing.

Counts and a per-run table: pending, running (epoch k of N and an ETA from the run's heartbeat),
requeued, done (the run's DONE file), failed (SLURM state, exit code, log path and its last
lines), plus the barrier job and the reducer job. A run that starts from a parent run's
checkpoint (``source.from_epoch``) and has not started says that it waits for its parent, or that
it was not run because its parent failed. State comes from sacct, or from squeue and the run folders when
accounting is unavailable; every SLURM command has a timeout, so this never hangs.

    python -m nondet_hpc.status outputs/digits_resnet14            # table
    python -m nondet_hpc.status outputs/digits_resnet14 --json     # for scripts
    python -m nondet_hpc.status outputs/digits_resnet14 --watch    # refresh every 10 s until over
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from ..sweep import waves
from .cli import main_quietly
from .client import ACTIVE_STATES, DEFAULT_TIMEOUT_S
from .state import STATES, format_duration, sweep_status

ORDER = {"failed": 0, "running": 1, "requeued": 2, "pending": 3, "unknown": 4, "unsubmitted": 5, "done": 6}


def _progress(r: dict) -> str:
    if r["state"] == "running" or r.get("epoch") is not None:
        if r.get("epoch") is None:
            return "starting"
        pct = f" {100 * r['progress']:.0f}%" if r.get("progress") is not None else ""
        return f"epoch {r['epoch']}/{r['epochs']}{pct}"
    return ""


def _slurm_col(r: dict) -> str:
    s = r.get("slurm_state") or ""
    if r.get("reason") and r["reason"] not in ("None", "") and r["state"] in ("pending", "requeued"):
        s += f" ({r['reason']})"
    if r["state"] == "failed" and r.get("exit_code"):
        s += f" exit {r['exit_code']}"
    return s


def format_status(st: dict, *, show_done: bool = True, tail: bool = True) -> str:
    c = st["counts"]
    head = (f"sweep {st['sweep_dir']}   ({st['submissions']} submission(s); state from {st['accounting']}; "
            f"{st['time']})")
    counts = "  ".join(f"{k} {c[k]}" for k in STATES if c.get(k) or k in ("pending", "running", "done", "failed"))
    lines = [head, f"  {sum(c.values())} runs:  {counts}"]
    for cmd, err in st.get("errors", {}).items():
        lines.append(f"  note: {cmd} {err}" if cmd == "sweep.json" else f"  note: {cmd} unavailable: {err}")
    if st.get("study"):
        lines += ["  " + line for line in waves.describe(st["study"])]
    runs = sorted(st["runs"], key=lambda r: (ORDER.get(r["state"], 9), r["run_id"]))
    if not show_done:
        runs = [r for r in runs if r["state"] != "done"]
    if runs:
        w = max(len("RUN"), *(len(r["run_id"]) for r in runs))
        lines.append("")
        lines.append(f"  {'RUN':<{w}}  {'STATE':<11} {'JOB':<12} {'SLURM':<28} {'PROGRESS':<18} {'ETA':<8} NOTE")
        for r in runs:
            restarts = f" x{r['restarts']}" if r.get("restarts") else ""
            eta = format_duration(r["eta_s"]) if r.get("eta_s") is not None else ""
            lines.append(f"  {r['run_id']:<{w}}  {r['state'] + restarts:<11} {r['job_id'] or '-':<12} "
                         f"{_slurm_col(r):<28} {_progress(r):<18} {eta:<8} {r.get('note') or ''}".rstrip())
    failed = [r for r in runs if r["state"] == "failed"]
    if failed and tail:
        lines.append("")
        lines.append("  failed runs (rerun the same sweep command to submit exactly these again):")
        for r in failed:
            lines.append(f"  - {r['run_id']}: job {r['job_id']} {_slurm_col(r)}  {r.get('note') or ''}".rstrip())
            err = r.get("error")
            if err:
                msg = err if isinstance(err, str) else str(err)
                lines.append(f"      run.json error: {msg.splitlines()[0][:300] if msg else ''}")
            if r.get("log_out"):
                lines.append(f"      log: {r['log_err']}")
                lines.append(f"           {r['log_out']}")
            elif r.get("job_id"):
                lines.append("      no log: the task never started")
            for t in r.get("log_tail") or []:
                lines.append(f"      | {t[:200]}")
    for u in st.get("unanswered") or []:
        lines.append(f"  sbatch of the {u['kind']} of submission {u['submission']} never answered: whether it was "
                     f"queued is unknown (its job's comment holds {u['token']}); the next run of the sweep command "
                     "looks it up before it submits anything")
    bar = st.get("barriers")
    if bar:
        code = bar.get("exit_code") if bar["state"] not in ACTIVE_STATES else ""
        lines.append("")
        lines.append(f"  barrier job: {bar['job_id']} {bar['state']}{' exit ' + code if code else ''}; "
                     f"{bar.get('command', '')}; log {bar['log_out']}")
    red = st.get("reducer")
    if red:
        report = "written" if red["report_exists"] else "not written yet"
        lines.append("")
        code = red.get("exit_code") if red["state"] not in ACTIVE_STATES else ""
        lines.append(f"  reducer: job {red['job_id']} {red['state']}"
                     f"{' exit ' + code if code else ''}; report {red['report']} "
                     f"({report}); log {red['log_out']}")
    return "\n".join(lines)


def finished(st: dict) -> bool:
    c = st["counts"]
    busy = c.get("pending", 0) + c.get("running", 0) + c.get("requeued", 0) + c.get("unknown", 0)
    jobs_busy = any(job and job["state"] in ACTIVE_STATES for job in (st.get("reducer"), st.get("barriers")))
    return busy == 0 and not jobs_busy


def main(argv: list[str] | None = None) -> int:
    return main_quietly(_main, argv)  # `... | head` ends quietly


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nondet_hpc.status", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", help="the sweep folder (out_dir of the sweep; holds sweep.json)")
    ap.add_argument("--json", action="store_true", help="print the status as JSON")
    ap.add_argument("--watch", nargs="?", const=10.0, type=float, metavar="SECONDS",
                    help="refresh every SECONDS (default 10) until nothing is pending or running")
    ap.add_argument("--hide-done", action="store_true", help="leave finished runs out of the table")
    ap.add_argument("--tail", type=int, default=8, help="log lines shown per failed run (default 8)")
    ap.add_argument("--timeout", type=float, default=None,
                    help=f"seconds before a SLURM command is given up (default {DEFAULT_TIMEOUT_S:g})")
    args = ap.parse_args(argv)
    try:
        while True:
            try:
                st = sweep_status(args.sweep_dir, timeout=args.timeout, tail=args.tail)
            except (FileNotFoundError, ValueError) as e:
                print(f"nondet_hpc.status: {e}", file=sys.stderr)
                return 2
            if args.json:
                print(json.dumps(st, indent=1, default=str), flush=True)
            else:
                text = format_status(st, show_done=not args.hide_done)
                if args.watch and sys.stdout.isatty():
                    sys.stdout.write("\033[H\033[2J")
                print(text, flush=True)
            if not args.watch or finished(st):
                return 0
            time.sleep(max(1.0, args.watch))
            if not args.json and not sys.stdout.isatty():
                print("-" * min(100, shutil.get_terminal_size().columns), flush=True)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
