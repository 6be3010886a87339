"""The README demo's wall time: serial (hydra.launcher.n_jobs=1) against n_jobs=2, same results.

Runs the README's sweep (``source=none,init,shuffle,augment,bitflip,all seed='range(1,9)'``, digits,
40 epochs, one thread per run) through the real CLI, alternating serial and parallel in this one
script run, into fresh folders; then checks that both gave the same report (metrics.csv) and
bit-identical logits for every run. ``--baseline`` also times the demo as it ran before the local
launcher had n_jobs (torch's default thread count, one job at a time: different run ids and
logits, so only its time is compared). ``--records`` instead times the demo (n_jobs) without the
weights and trajectory files (``record.trajectory=false record.weights=false``, so the report has no
Instability section either) against the demo as shipped, and checks that recording changed no logits.

    python benchmarks/demo_wall.py                          # the whole demo (minutes)
    python benchmarks/demo_wall.py --seeds 3 --epochs 10    # quick
    python benchmarks/demo_wall.py --records                # what recording adds to the demo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SOURCES = "none,init,shuffle,augment,bitflip,all"


def run_demo(out: Path, seeds: int, epochs: int, extra: list[str]) -> float:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "nondet_hpc", "-m", f"source={SOURCES}", f"seed=range(1,{seeds + 1})",
           f"train.epochs={epochs}", f"out_dir={out}", *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return wall


def same_results(a: Path, b: Path, report: bool = True) -> tuple[bool, str]:
    if report and (a / "report" / "metrics.csv").read_bytes() != (b / "report" / "metrics.csv").read_bytes():
        return False, "report/metrics.csv differs"
    runs_a = sorted(p.name for p in (a / "runs").iterdir() if not p.name.startswith("."))
    runs_b = sorted(p.name for p in (b / "runs").iterdir() if not p.name.startswith("."))
    if runs_a != runs_b:
        return False, "different run ids"
    for name in runs_a:
        for f in sorted((a / "runs" / name / "logits").glob("*.npy")):
            g = b / "runs" / name / "logits" / f.name
            if np.load(f, allow_pickle=False).tobytes() != np.load(g, allow_pickle=False).tobytes():
                return False, f"{name}/logits/{f.name} differs"
    return True, ("metrics.csv and " if report else "") + f"the logits of all {len(runs_a)} runs identical"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=8, help="seeds per source (README: 8)")
    p.add_argument("--epochs", type=int, default=40, help="epochs per run (README: 40, digits' default)")
    p.add_argument("--repeats", type=int, default=1, help="alternating rounds; the median is reported")
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--baseline", action="store_true", help="also time the demo as before (train.threads=0, serial)")
    p.add_argument("--records", action="store_true", help="time the demo without recording against it as shipped")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="nondet-demo-"))
    first = ["hydra.launcher.n_jobs=1"] if not a.records else \
        [f"hydra.launcher.n_jobs={a.n_jobs}", "record.trajectory=false", "record.weights=false"]
    base = "without records" if a.records else "serial"
    modes = {base: first, f"n_jobs={a.n_jobs}": [f"hydra.launcher.n_jobs={a.n_jobs}"]}
    if a.baseline:
        modes["before (threads=0, serial)"] = ["train.threads=0", "hydra.launcher.n_jobs=1"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    par = f"n_jobs={a.n_jobs}"
    print(f"demo: {6 * a.seeds} runs of {a.epochs} epochs, {len(os.sched_getaffinity(0))} cores, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    identical, detail = True, ""
    try:
        for r in range(a.repeats):
            order = list(modes) if r % 2 == 0 else list(reversed(modes))  # alternate against load drifts
            for m in order:
                out = root / ("serial" if m == base else f"n_jobs{a.n_jobs}" if m == par else "before") / str(r)
                times[m].append(run_demo(out, a.seeds, a.epochs, modes[m]))
                print(f"  round {r + 1}: {m}: {times[m][-1]:.1f} s", flush=True)
            ok, detail = same_results(root / "serial" / str(r), root / f"n_jobs{a.n_jobs}" / str(r), not a.records)
            identical &= ok
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {m: statistics.median(t) for m, t in times.items()}
    res = {"runs": 6 * a.seeds, "epochs": a.epochs, "wall_s": med, "speedup_vs_serial": med[base] / med[par],
           "identical": identical, "detail": detail, "load_avg_at_end": os.getloadavg()}
    line = f"{base} {med[base]:.1f} s, {par} {med[par]:.1f} s: {res['speedup_vs_serial']:.2f}x"
    if a.records:
        line = f"without records {med[base]:.1f} s, with (as shipped) {med[par]:.1f} s: {med[par] / med[base]:.3f}x"
    if a.baseline:
        res["speedup_vs_before"] = med["before (threads=0, serial)"] / med[par]
        line += f"; before {med['before (threads=0, serial)']:.1f} s: {res['speedup_vs_before']:.2f}x"
    print(f"{line}; same results: {identical} ({detail})")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
