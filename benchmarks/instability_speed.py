"""Time and memory of the Instability section's computations for N runs (torch-free).

Writes N planted runs to a temporary folder (a trajectory file on the default grid of digits'
40-epoch schedule, and a weights file of a digits ResNet-14's size, 172,314 parameters, or
--params), then times, each from the files: the group's divergence curve streamed over the N
trajectories (analysis.divergence.group_curve), the exact N x N final distances streamed over the
N weights files (analysis.instability.final_distance_matrix), and N/2 bit-change/twin pair
results (pair_result). Prints seconds and the peak of Python-allocated memory (tracemalloc) of
each step.

With ``--section`` it plants a whole sweep instead (run folders with run.json, labels, logits,
trajectory and weights: four groups of N/4 runs, the determinism control, init, all sources and the
bit change) and times what the reducer adds for the Instability section: the final parameter
distance metric of each group (its pair matrix, from the weights files) and the section itself
(analysis.instab_report.instability_section: curves, exact final distances, every bit-change run
against its twin, saturation), with the peak of Python-allocated memory.

    python benchmarks/instability_speed.py                  # 100 runs
    python benchmarks/instability_speed.py --runs 20 --params 11000000
    python benchmarks/instability_speed.py --section        # the report's section for 100 runs
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from nondet_hpc.analysis.divergence import group_curve
from nondet_hpc.analysis.instability import final_distance_matrix, pair_result
from nondet_hpc.records.projection import SKETCH_KEY, CountSketch, Layout, fingerprint, tensor_digests, tensor_norms
from nondet_hpc.records.schedule import Grid, probe_indices
from nondet_hpc.records.trajectory import Trajectory, read_trajectory, write_trajectory
from nondet_hpc.records.weights import WeightsFile, write_weights


def plant(folder: Path, runs: int, params: int, dim: int, probe: int, classes: int) -> None:
    """N runs drifting apart from one start; a small trajectory stride keeps planting quick."""
    layout = Layout.of([("a.weight", (params - params // 2,)), ("b.weight", (params // 2,))])
    steps = np.array(Grid().steps(11, 40))
    sketch = CountSketch(params, dim)
    rng = np.random.default_rng(0)
    base = rng.standard_normal(params).astype(np.float32)
    idx = probe_indices(497, probe)
    for r in range(runs):
        noise = rng.standard_normal(params).astype(np.float32)
        flats = [base + np.float32(1e-3 * np.sqrt(s)) * noise for s in steps]
        t = Trajectory(run_id=f"run-{r:03d}", complete=True, steps_per_epoch=11, step=steps,
                       fingerprint=np.stack([np.frombuffer(fingerprint(layout, f), np.uint8) for f in flats]),
                       tensor_digest=np.stack([tensor_digests(layout, f) for f in flats]),
                       tensor_name=np.array(layout.names), tensor_size=layout.sizes,
                       tensor_norm=np.stack([tensor_norms(layout, f) for f in flats]), sketch_key=SKETCH_KEY,
                       sketch=np.stack([sketch.apply(f) for f in flats]), probe_index=idx,
                       probe_label=np.zeros(len(idx), np.int64),
                       probe_logits=rng.standard_normal((len(steps), len(idx), classes)).astype(np.float32))
        write_trajectory(folder / f"run-{r:03d}.npz", t)
        half = params - params // 2
        write_weights(folder / f"run-{r:03d}.safetensors", {"a.weight": flats[-1][:half], "b.weight": flats[-1][half:]},
                      {}, run_id=t.run_id, step=int(steps[-1]))


def timed(label: str, fn):
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"{label:>44}: {dt:7.2f} s, peak {peak / 2**20:7.1f} MiB")
    return out


SOURCES = {"none": "Determinism Control", "init": "Parameter Initialization", "all": "All Nondeterminism Sources",
           "bitflip": "Random Bit Change"}


def _record(folder: Path, rid: str, source: str, seed: int, layout: Layout, flats: list, steps: np.ndarray,
            sketch: CountSketch, logits: np.ndarray, labels: np.ndarray, flip: dict | None) -> None:
    """One run folder as a finished run writes it (the files the reducer reads)."""
    import json

    d = folder / "runs" / rid
    (d / "logits").mkdir(parents=True)
    np.save(d / "logits" / "plain.npy", logits[-1, :, :])
    np.save(d / "labels.npy", labels)
    t = Trajectory(run_id=rid, complete=True, steps_per_epoch=11, step=steps,
                   fingerprint=np.stack([np.frombuffer(fingerprint(layout, f), np.uint8) for f in flats]),
                   tensor_digest=np.stack([tensor_digests(layout, f) for f in flats]),
                   tensor_name=np.array(layout.names), tensor_size=layout.sizes,
                   tensor_norm=np.stack([tensor_norms(layout, f) for f in flats]), sketch_key=SKETCH_KEY,
                   sketch=np.stack([sketch.apply(f) for f in flats]), probe_index=np.arange(logits.shape[1]),
                   probe_label=labels[:logits.shape[1]], probe_logits=logits)
    write_trajectory(d / "trajectory.npz", t)
    half = layout.sizes[0]
    write_weights(d / "weights.safetensors", {"a.weight": flats[-1][:half], "b.weight": flats[-1][half:]}, {},
                  run_id=rid, step=int(steps[-1]))
    vary = {"none": [], "init": ["init"], "all": ["init", "shuffle", "augment"], "bitflip": ["bitflip"]}[source]
    seeds = {k: (seed if k in vary else 1) for k in ("init", "shuffle", "augment")}
    seeds["bitflip"] = seed if source == "bitflip" else None
    info = {"run_id": rid, "state": "done", "seed": seed, "group_key": source, "group_label": SOURCES[source],
            "identity": {"source.name": source, "source.label": SOURCES[source], "source.vary": vary,
                         "data.name": "digits", "model.name": "resnet14", "train.epochs": 40},
            "seeds": seeds, "bitflip": flip, "views": ["plain"], "snapshots": [],
            "result": {"test_acc": float(np.mean(logits[-1].argmax(1) == labels)), "test_ce": 0.0}}
    (d / "run.json").write_text(json.dumps(info))
    (d / "DONE").write_text("{}")


def plant_sweep(folder: Path, runs: int, params: int, dim: int, classes: int) -> None:
    """Four groups of runs // 4: control (identical), init and all sources (each its own start), bit
    change (the control's start moved by one ulp, drifting apart exponentially)."""
    layout = Layout.of([("a.weight", (params - params // 2,)), ("b.weight", (params // 2,))])
    steps = np.array(Grid().steps(11, 40))
    sketch = CountSketch(params, dim)
    rng = np.random.default_rng(0)
    base = rng.standard_normal(params).astype(np.float32)
    labels = rng.integers(0, classes, 497)
    drift = rng.standard_normal(params).astype(np.float32)
    for source in SOURCES:
        for seed in range(1, runs // len(SOURCES) + 1):
            r = np.random.default_rng([seed, len(source)])
            start, flip = base, None
            if source in ("init", "all"):
                start = r.standard_normal(params).astype(np.float32)
            if source == "bitflip":
                start = base.copy()
                old = start[seed]
                start[seed] = np.nextafter(old, np.float32(np.inf))
                flip = {"index": int(seed), "shape": [params - params // 2], "old": float(old),
                        "new": float(start[seed])}
            noise = r.standard_normal(params).astype(np.float32) if source != "none" else np.zeros(params, np.float32)
            scale = [min(1.0, 1e-8 * np.exp(s / 20.0)) if source == "bitflip" else 1e-2 for s in steps]
            flats = [(start + drift * np.float32(1e-3 * s) + np.float32(c) * noise).astype(np.float32)
                     if s else start for s, c in zip(steps, scale)]
            logits = np.stack([np.eye(classes, dtype=np.float32)[labels] + r.normal(size=(497, classes)).astype(
                np.float32) * (0 if source == "none" else 1) for _ in steps])
            _record(folder, f"{source}-s{seed:04d}", source, seed, layout, flats, steps, sketch, logits, labels, flip)


def section(folder: Path) -> None:
    from nondet_hpc.analysis.groups import build_groups
    from nondet_hpc.analysis.inputs import add_pairs, open_inputs
    from nondet_hpc.analysis.instab_report import instability_section
    from nondet_hpc.analysis.scan import scan_sweep
    from nondet_hpc import metrics as M

    warnings: list[str] = []
    runs, _ = scan_sweep(folder, warnings)
    groups = build_groups(runs)
    for g in groups:  # what reduce_group does for the logits, cheaply: stats of the plain logits
        g.used = list(g.members)
        g.stats = M.pairwise_stats([np.load(r.path / "logits" / "plain.npy") for r in g.used], g.used[0].labels)

    def metric():
        for g in groups:
            add_pairs(g.stats, {k: v for k, v in open_inputs(g, g.used, [], folder, warnings).items()
                                if k == "param_distance"}, M.DEFAULT_BLOCK_BYTES)

    timed("final parameter distance metric (4 groups)", metric)
    sec = timed("Instability section", lambda: instability_section(groups, folder, warnings))
    f = sec.families[0]
    print(f"{'':>44}  ({sum(gd.curve.n_runs for gd in sec.curves)} runs, {len(sec.curves)} groups, "
          f"{len(f.pairs)} twin pairs, kappa median {f.kappa['median']:.3g}; warnings: {len(warnings)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--params", type=int, default=172_314)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--probe", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--section", action="store_true", help="time the reducer's Instability section instead")
    args = ap.parse_args()
    if args.section:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            plant_sweep(Path(tmp), args.runs, args.params, args.dim, args.classes)
            print(f"planted a sweep of {args.runs} runs of {args.params:,} parameters in "
                  f"{time.perf_counter() - t0:.1f} s")
            section(Path(tmp))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        plant(folder, args.runs, args.params, args.dim, args.probe, args.classes)
        print(f"planted {args.runs} runs of {args.params:,} parameters in {time.perf_counter() - t0:.1f} s")
        names = [f"run-{r:03d}" for r in range(args.runs)]
        curve = timed("divergence curve (streamed trajectories)",
                      lambda: group_curve(read_trajectory(folder / f"{n}.npz") for n in names))
        files = [WeightsFile(folder / f"{n}.safetensors") for n in names]
        try:
            timed("exact final distances (streamed weights)", lambda: final_distance_matrix(files))
            timed(f"{args.runs // 2} pair results (bit change vs twin)", lambda: [
                pair_result(read_trajectory(folder / f"{a}.npz"), read_trajectory(folder / f"{b}.npz"), fa, fb, 1e-9)
                for a, b, fa, fb in zip(names[::2], names[1::2], files[::2], files[1::2])])
        finally:
            for f in files:
                f.close()
        print(f"{'':>44}  ({curve.n_runs} runs, {len(curve.step)} points)")


if __name__ == "__main__":
    main()
