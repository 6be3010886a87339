"""K runs per allocation (hydra.launcher.runs_per_task=K) against K runs one after another.

Each measurement is what an array task does: ``cluster.pack.PackJob`` trains its runs as
processes (K=1: one process per run, one after another). For every K it times, alternating in
this one script run:

  sequential  K runs one after another, each with the allocation's whole thread count (CPU) --
              today's one-model-per-task way
  packed      the K runs at once, the CPUs split (threads = cores // K each on CPU; on CUDA the
              K runs share the GPU, with and without MPS where nvidia-cuda-mps-control exists)
  solo        K runs one after another with the packed runs' thread count: the bit-identity
              reference (a packed run must equal its solo run) and a second ratio

and prints aggregate training images/s (K x epochs x training images / wall seconds, process
start-up included, as a task pays it) and the ratios, as text and optionally JSON.

    python benchmarks/packing.py                                  # digits on this CPU, K = 1, 2, 4
    python benchmarks/packing.py --device cuda --data cifar10 --epochs 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def compose_cfg(out: Path, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from nondet_hpc.config import conf_dir
    from nondet_hpc.registry.options import register_configs

    register_configs()
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        return compose("config", overrides=[f"out_dir={out}", *overrides])


def make_jobs(out: Path, k: int, threads: int, common: list[str]):
    from nondet_hpc.cluster.jobs import RunJob
    from nondet_hpc.rundir import run_dir

    jobs = []
    for seed in range(1, k + 1):
        cfg = compose_cfg(out, [*common, "source=init", f"seed={seed}", f"train.threads={threads}"])
        jobs.append(RunJob(cfg, run_dir(cfg).name, str(run_dir(cfg))))
    return jobs


def timed(jobs, packed: bool, mps: str) -> float:
    from nondet_hpc.cluster.pack import PackJob

    t0 = time.perf_counter()
    if packed:
        PackJob(jobs, mps=mps)()
    else:
        for j in jobs:
            PackJob([j], mps="false")()
    return time.perf_counter() - t0


def logits(jobs) -> list[bytes]:
    from nondet_hpc.rundir import logits_path

    return [np.load(logits_path(Path(j.run_dir), "plain")).tobytes() for j in jobs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--data", default="digits", help="digits | cifar10 (cifar needs data.root with the files)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--ks", default="1,2,4", help="runs per allocation to measure")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds; the median is reported")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--json", help="also write the results here")
    p.add_argument("overrides", nargs="*", help="more KEY=VALUE config overrides, e.g. data.root=/data")
    a = p.parse_args(argv)
    common = [f"data={a.data}", f"train.epochs={a.epochs}", f"train.device={a.device}", *a.overrides]
    if a.data != "digits":
        common.append("data.verify_md5=false")
    n_train = compose_cfg(Path("/tmp"), common).data.get("train_subset") or (1300 if a.data == "digits" else 50_000)
    mps_modes = ["false"] + (["true"] if a.device.startswith("cuda") and shutil.which("nvidia-cuda-mps-control") else [])
    root = Path(tempfile.mkdtemp(prefix="nondet-packing-"))
    results = {"device": a.device, "data": a.data, "epochs": a.epochs, "cores": a.cores,
               "load_avg_at_start": os.getloadavg(), "rows": []}
    print(f"packing benchmark: {a.data}, {a.epochs} epochs, {a.device}, {a.cores} cores, load {os.getloadavg()[0]:.2f}")
    try:
        for k in [int(x) for x in a.ks.split(",")]:
            whole = a.cores if a.device == "cpu" else 1
            split = max(1, a.cores // k) if a.device == "cpu" else 1
            times: dict[str, list[float]] = {}
            identical = True
            for r in range(a.repeats):
                modes = [("sequential", whole, False, "false")] + \
                        [(f"packed mps={m}", split, True, m) for m in mps_modes] + [("solo", split, False, "false")]
                if r % 2:
                    modes.reverse()  # alternate the order: a load change on a shared machine hits both
                outs = {}
                for name, threads, packed, mps in modes:
                    jobs = make_jobs(root / f"k{k}-{name.replace(' ', '_').replace('=', '-')}-{r}", k, threads, common)
                    times.setdefault(name, []).append(timed(jobs, packed, mps))
                    outs[name] = logits(jobs)
                for name in outs:
                    if name.startswith("packed"):
                        identical &= outs[name] == outs["solo"]
            images = k * a.epochs * n_train
            med = {n: statistics.median(t) for n, t in times.items()}
            row = {"k": k, "threads_sequential": whole, "threads_packed": split,
                   "wall_s": med, "images_per_s": {n: images / t for n, t in med.items()},
                   "bit_identical_to_solo": identical}
            for n in med:
                if n.startswith("packed"):
                    row[f"ratio {n} / sequential"] = med["sequential"] / med[n]
                    row[f"ratio {n} / solo"] = med["solo"] / med[n]
            results["rows"].append(row)
            ips = ", ".join(f"{n} {v:,.0f}" for n, v in row["images_per_s"].items())
            ratios = ", ".join(f"{n.split('ratio ')[1]} {v:.2f}x" for n, v in row.items() if n.startswith("ratio"))
            print(f"K={k}: images/s {ips}; {ratios}; bit-identical to solo: {identical}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["load_avg_at_end"] = os.getloadavg()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(r["bit_identical_to_solo"] for r in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
