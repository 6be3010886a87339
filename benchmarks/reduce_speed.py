"""Time and peak memory of metrics.pairwise_stats against the previous implementation, same run.

    python benchmarks/reduce_speed.py [--models 100 1000] [--n-test 10000] [--classes 10]
                                      [--ref-max 200] [--big] [--threads T]

For each N, synthetic float32 logits of N models (a shared per-example signal plus per-model
noise, ~80% accuracy, so ~20% of (model, example) entries need exact ensemble work; real CIFAR-10 runs at ~93% need less) are written as .npy files and opened with
np.load(mmap_mode="r", allow_pickle=False), as the reducer does. Each measurement runs in a fresh
subprocess so its max RSS is its own: "new" = summarize_model per model + pairwise_stats (all
pairwise metrics) + group_summary + the two bootstrap SEs + a 100-subset ablation, i.e. the
reducer's metric work for one group without files and plots. "old" = the same with
pairwise_stats of commit REF_COMMIT (the version before issue 14), loaded from git history at
run time. The old path is O(N^2) per-pair work; for N above --ref-max it is timed on N = --ref-max
models and extrapolated by (N/ref)^2 (clearly labelled "extrap"). Values of old and new are
compared on every N the old path ran on. --big adds N = 10,000 (takes about an hour at 10,000
test examples on 2 shared cores; --big-n-test runs it on fewer examples: memory is the same N^2
matrices, time scales with n_test). Each child first runs both paths on 2 models untimed (torch's
first calls cost a few seconds once per process; the warm-up time is printed).
Peak memory: tracemalloc peak (numpy/Python allocations; torch's own buffers are not traced)
and the subprocess's max RSS (everything, including interpreter and torch, ~300 MiB baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
import types
from pathlib import Path

import numpy as np

REF_COMMIT = "74ee5c4"  # last commit of metrics.py before the Gram/torch fast path (issue 14)
ROOT = Path(__file__).resolve().parents[1]


def make_logits(directory: Path, n_models: int, n_test: int, classes: int, seed: int = 0) -> np.ndarray:
    """Write n_models logits files one at a time (bounded memory); return the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n_test)
    signal = rng.normal(size=(n_test, classes)).astype(np.float32)
    signal[np.arange(n_test), labels] += 3.0
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(n_models):
        noise = np.random.default_rng([seed, k]).normal(scale=0.7, size=(n_test, classes)).astype(np.float32)
        np.save(directory / f"model{k:05d}.npy", signal + noise, allow_pickle=False)
    np.save(directory / "labels.npy", labels, allow_pickle=False)
    return labels


def reference_module() -> types.ModuleType:
    """metrics.py as of REF_COMMIT, imported from git history (today's algorithm before issue 14)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{REF_COMMIT}:src/nondet_hpc/metrics.py"],
                         check=True, capture_output=True, text=True).stdout
    mod = types.ModuleType("metrics_ref")
    sys.modules["metrics_ref"] = mod  # dataclasses look their module up there
    exec(compile(src, f"metrics.py@{REF_COMMIT}", "exec"), mod.__dict__)
    return mod


def work(M: types.ModuleType, directory: Path, n_models: int, threads: int | None) -> dict:
    """The reducer's metric work for one group of n_models (what the subprocess times)."""
    labels = np.load(directory / "labels.npy", allow_pickle=False)
    models = [np.load(directory / f"model{k:05d}.npy", mmap_mode="r", allow_pickle=False) for k in range(n_models)]
    summaries = [M.summarize_model(m, labels) for m in models]
    kw = {"threads": threads, "progress": M.progress_line("  pairwise")} if hasattr(M, "progress_line") else {}
    st = M.pairwise_stats(models, labels, summaries=summaries, **kw)
    out = M.group_summary(st)
    out["acc_sd_se"] = M.bootstrap_sd_se(st.accuracies, n_boot=10_000, seed=[0, 1])
    out["ce_sd_se"] = M.bootstrap_sd_se(st.ce, n_boot=10_000, seed=[0, 1, 1])
    k = max(2, n_models // 2)
    subsets = np.argsort(np.random.default_rng(0).random((100, n_models)), axis=1)[:, :k]
    abl = M.subset_metrics(st, subsets)
    out.update({f"abl_{key}": float(v.mean()) for key, v in abl.items() if key != "cka"})
    return out


def child(args: argparse.Namespace) -> None:
    M = reference_module() if args.child == "old" else __import__("nondet_hpc.metrics", fromlist=["x"])
    # warm-up on 2 models, untimed, for both paths: torch's first calls cost ~3 s once per process
    t0 = time.perf_counter()
    work(M, Path(args.dir), 2, args.threads)
    warm = time.perf_counter() - t0
    tracemalloc.start()
    t0 = time.perf_counter()
    vals = work(M, Path(args.dir), args.n, args.threads)
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"s": dt, "warm_s": warm, "traced": peak, "rss": rss, "vals": vals}))


def run_child(which: str, directory: Path, n: int, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--dir", str(directory), "--n", str(n)]
    if threads:
        cmd += ["--threads", str(threads)]
    res = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    return json.loads(res.stdout.strip().splitlines()[-1])


def max_rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float) and (np.isnan(x) and np.isnan(y)):
            continue
        worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-300))
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--models", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--big", action="store_true", help="also N = 10,000 (many minutes)")
    p.add_argument("--big-n-test", type=int, default=None,
                   help="test examples for the N = 10,000 case only (default: --n-test)")
    p.add_argument("--ref-max", type=int, default=200,
                   help="largest N the old implementation really runs on; larger N are extrapolated")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the new path (default 1, as pairwise_stats; 2 spin on a shared 2-core box)")
    p.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0

    Ns = sorted(set(args.models))
    print(f"metrics for one group: {args.n_test} test examples x {args.classes} classes, float32 logits, mmap; "
          f"{os.cpu_count()} CPUs (machine shared: times are noisy)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="reduce_speed_") as t:
        d = Path(t) / "logits"
        make_logits(d, max(Ns + [min(args.ref_max, max(Ns))]), args.n_test, args.classes)
        ref_cache: dict[int, dict] = {}
        for n in Ns:
            new = run_child("new", d, n, args.threads)
            n_ref = min(n, args.ref_max)
            if n_ref not in ref_cache:
                ref_cache[n_ref] = run_child("old", d, n_ref, None)
            old = ref_cache[n_ref]
            old_s = old["s"] * (n / n_ref) ** 2
            diff = f"{max_rel_diff(old['vals'], new['vals']):.1e}" if n_ref == n else "-"
            note = "" if n_ref == n else f"old timed on N={n_ref} ({old['s']:.1f} s) x (N/{n_ref})^2"
            note += f" (warm-up {new['warm_s']:.1f} s)"
            rows.append((n, new, old, old_s, diff, note))
            print(f"  N={n}: new {new['s']:.1f} s, old {old_s:.1f} s{' (extrap)' if n_ref != n else ''}", flush=True)
    if args.big:
        nt = args.big_n_test or args.n_test
        with tempfile.TemporaryDirectory(prefix="reduce_speed_big_") as t:
            d = Path(t) / "logits"
            make_logits(d, 10_000, nt, args.classes)
            new = run_child("new", d, 10_000, args.threads)
            old = run_child("old", d, args.ref_max, None)
        scale = args.n_test / nt
        old_s = old["s"] * (10_000 / args.ref_max) ** 2 * scale
        note = (f"n_test={nt}: times x{scale:g} (extrap to {args.n_test}); " if scale != 1 else "") + \
            f"old timed on N={args.ref_max} ({old['s']:.1f} s) x (N/{args.ref_max})^2"
        new = dict(new, s=new["s"] * scale, measured_s=new["s"])
        rows.append((10_000, new, old, old_s, "-", note + f"; new measured {new['measured_s']:.0f} s"))
    print(f"{'N':>6} {'new s':>8} {'old s':>9} {'ratio':>7} {'new traced MiB':>15} {'new RSS MiB':>12} "
          f"{'old RSS MiB':>12} {'max rel diff':>13}  note")
    for n, new, old, old_s, diff, note in rows:
        print(f"{n:>6} {new['s']:>8.1f} {old_s:>9.1f} {old_s / new['s']:>6.1f}x {new['traced'] / 2**20:>15.0f} "
              f"{new['rss'] / 2**20:>12.0f} {old['rss'] / 2**20:>12.0f} {diff:>13}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
