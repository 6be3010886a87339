"""Speed and memory of the reducer's pairwise metrics against a straightforward per-pair loop.

    python benchmarks/reduce_speed.py [--n-test 10000] [--classes 10] [--models 25 100]
                                      [--naive-pairs 300] [--no-end-to-end]

For each N: synthetic float32 logits of N models (correlated like real runs: a shared
per-example signal plus per-model noise, ~90% accuracy) are saved as .npy files and opened with
np.load(mmap_mode="r", allow_pickle=False), as the reducer does. "ours" is
metrics.summarize_model on each model + metrics.pairwise_stats (disagreement, correlation and
2-model ensemble for every pair, accuracy and CE for every model). "naive" is the textbook loop
over pairs i<j on in-memory arrays (argmax compare, np.corrcoef, argmax of the mean logits).
When N has more pairs than --naive-pairs, the naive loop runs on that many random pairs and its
time is extrapolated linearly to all pairs (each pair costs the same); the output says so. Both
are checked to agree on the pairs the naive loop computed. Peak memory: tracemalloc peak of
numpy/Python allocations during "ours" (BLAS scratch excluded), in a separate untimed run.
Finally (unless --no-end-to-end) reduce_sweep times a one-group sweep of the largest N end to end
(files, bootstrap SEs with 10,000 resamples, ablation, plots, report files).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from nondet_hpc import metrics as M


def make_logits(directory: Path, n_models: int, n_test: int, classes: int,
                seed: int = 0) -> tuple[list[Path], np.ndarray]:
    """Write n_models logits files one at a time (bounded memory) and return paths and labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n_test)
    signal = rng.normal(size=(n_test, classes)).astype(np.float32)
    signal[np.arange(n_test), labels] += 3.0
    paths = []
    for k in range(n_models):
        noise = np.random.default_rng([seed, k]).normal(scale=0.7, size=(n_test, classes)).astype(np.float32)
        p = directory / f"model{k:04d}.npy"
        np.save(p, signal + noise, allow_pickle=False)
        paths.append(p)
    return paths, labels


def ours(paths: list[Path], labels: np.ndarray) -> M.PairwiseStats:
    models = [np.load(p, mmap_mode="r", allow_pickle=False) for p in paths]
    summaries = [M.summarize_model(m, labels) for m in models]
    return M.pairwise_stats(models, labels, summaries=summaries)


def naive(arrays: list[np.ndarray], labels: np.ndarray,
          pairs: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[float, float, float]]:
    """The per-pair loop a first implementation would write; per-model accuracy computed once."""
    acc = [float(np.mean(a.argmax(axis=1) == labels)) * 100 for a in arrays]
    out = {}
    for i, j in pairs:
        a, b = arrays[i], arrays[j]
        dis = float(np.mean(a.argmax(axis=1) != b.argmax(axis=1))) * 100
        corr = float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])
        ens = float(np.mean(((a + b) / 2).argmax(axis=1) == labels)) * 100 - (acc[i] + acc[j]) / 2
        out[(i, j)] = (dis, corr, ens)
    return out


def bench(n_models: int, n_test: int, classes: int, naive_pairs: int, tmp: Path) -> dict:
    d = tmp / f"n{n_models}"
    d.mkdir()
    paths, labels = make_logits(d, n_models, n_test, classes)

    ours(paths[:2], labels)  # warm-up: imports, page cache
    t0 = time.perf_counter()
    st = ours(paths, labels)
    t_ours = time.perf_counter() - t0

    tracemalloc.start()
    ours(paths, labels)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    all_pairs = [(i, j) for i in range(n_models) for j in range(i + 1, n_models)]
    if len(all_pairs) > naive_pairs:
        rng = np.random.default_rng(1)
        pick = sorted(rng.choice(len(all_pairs), size=naive_pairs, replace=False))
        pairs = [all_pairs[k] for k in pick]
    else:
        pairs = all_pairs
    arrays = [np.load(p, allow_pickle=False) for p in paths]
    t0 = time.perf_counter()
    ref = naive(arrays, labels, pairs)
    t_naive_measured = time.perf_counter() - t0
    t_naive = t_naive_measured * len(all_pairs) / len(pairs)

    n = st.n_examples
    err = 0.0
    for (i, j), (dis, corr, ens) in ref.items():
        mine_dis = 100.0 * (n - st.agree[i, j]) / n
        mine_ens = 100.0 * (st.ens_correct[i, j] - (st.n_correct[i] + st.n_correct[j]) / 2) / n
        err = max(err, abs(mine_dis - dis), abs(st.corr[i, j] - corr), abs(mine_ens - ens))
    return {"N": n_models, "pairs": len(all_pairs), "naive_pairs": len(pairs), "ours_s": t_ours,
            "naive_s": t_naive, "naive_measured_s": t_naive_measured, "ratio": t_naive / t_ours,
            "peak_mib": peak / 2**20, "max_abs_diff": err}


def end_to_end(n_models: int, n_test: int, classes: int, tmp: Path) -> float:
    from nondet_hpc.analysis.reduce import reduce_sweep

    sweep = tmp / "sweep"
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, n_test)
    signal = rng.normal(size=(n_test, classes)).astype(np.float32)
    signal[np.arange(n_test), labels] += 3.0
    for k in range(n_models):
        d = sweep / "runs" / f"all-s{k + 1:04d}"
        (d / "logits").mkdir(parents=True)
        noise = np.random.default_rng([0, k]).normal(scale=0.7, size=(n_test, classes)).astype(np.float32)
        np.save(d / "logits" / "plain.npy", signal + noise, allow_pickle=False)
        np.save(d / "labels.npy", labels.astype(np.int64), allow_pickle=False)
        (d / "run.json").write_text(json.dumps({
            "run_id": d.name, "state": "done", "seed": k + 1, "group_key": "g",
            "group_label": "All Nondeterminism Sources", "identity": {"source.name": "all"}, "views": ["plain"]}))
        (d / "DONE").write_text("{}")
    t0 = time.perf_counter()
    reduce_sweep(sweep)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--models", type=int, nargs="+", default=[25, 100])
    p.add_argument("--naive-pairs", type=int, default=300,
                   help="pairs the naive loop really computes; more pairs are extrapolated (default 300)")
    p.add_argument("--no-end-to-end", action="store_true")
    args = p.parse_args(argv)

    print(f"pairwise metrics on {args.n_test} test examples x {args.classes} classes (float32 logits, mmap)")
    with tempfile.TemporaryDirectory(prefix="reduce_speed_") as t:
        tmp = Path(t)
        rows = [bench(n, args.n_test, args.classes, args.naive_pairs, tmp) for n in args.models]
        print(f"{'N':>5} {'pairs':>6} {'ours s':>8} {'naive s':>9} {'ratio':>7} {'peak MiB':>9} "
              f"{'max |diff|':>11}  note")
        for r in rows:
            note = "" if r["naive_pairs"] == r["pairs"] else \
                f"naive timed on {r['naive_pairs']} random pairs ({r['naive_measured_s']:.2f} s), extrapolated"
            print(f"{r['N']:>5} {r['pairs']:>6} {r['ours_s']:>8.2f} {r['naive_s']:>9.2f} {r['ratio']:>6.1f}x "
                  f"{r['peak_mib']:>9.1f} {r['max_abs_diff']:>11.1e}  {note}")
        if not args.no_end_to_end:
            n = max(args.models)
            t_e2e = end_to_end(n, args.n_test, args.classes, tmp)
            print(f"reduce_sweep end to end, one group of {n} runs (10,000 bootstrap resamples, ablation, plots): "
                  f"{t_e2e:.2f} s")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"process max RSS (whole script, incl. the naive loop's in-memory arrays): {rss:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
