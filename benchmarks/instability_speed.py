"""Time and memory of the Instability section's computations for N runs (torch-free).

Writes N planted runs to a temporary folder (a trajectory file on the default grid of digits'
40-epoch schedule, and a weights file of a digits ResNet-14's size, 172,314 parameters, or
--params), then times, each from the files: the group's divergence curve streamed over the N
trajectories (analysis.divergence.group_curve), the exact N x N final distances streamed over the
N weights files (analysis.instability.final_distance_matrix), and N/2 bit-change/twin pair
results (pair_result). Prints seconds and the peak of Python-allocated memory (tracemalloc) of
each step.

    python benchmarks/instability_speed.py                  # 100 runs
    python benchmarks/instability_speed.py --runs 20 --params 11000000
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--params", type=int, default=172_314)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--probe", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10)
    args = ap.parse_args()
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
