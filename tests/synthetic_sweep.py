"""Synthetic sweeps for the reducer's tests: run folders written by the run-directory contract
(docs/contracts.md) with logits drawn here, and a sweep.json planning them as the SLURM launcher
records planned runs. Expected values in the tests are computed from these arrays with plain
numpy, not by the reducer's own code paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from nondet_hpc.sweep import manifest as MF

N_TEST, N_CLASSES = 120, 4
LABELS = np.random.default_rng(99).integers(0, N_CLASSES, N_TEST)
SIGNAL = np.random.default_rng(98).normal(size=(N_TEST, N_CLASSES)).astype(np.float32)
SIGNAL[np.arange(N_TEST), LABELS] += 1.5
LABEL_OF = {"none": "Determinism Control", "init": "Parameter Initialization", "shuffle": "Data Shuffling",
            "all": "All Nondeterminism Sources", "bitflip": "Random Bit Change"}


def logits_for(source: str, seed: int, salt: int = 0) -> np.ndarray:
    """Deterministic per (source, seed): the control gets the same array for every seed."""
    s = 0 if source == "none" else seed
    noise = np.random.default_rng([s, salt, len(source)]).normal(size=(N_TEST, N_CLASSES))
    return (SIGNAL + noise).astype(np.float32)


def write_run(sweep: Path, source: str, seed: int, *, epochs: int = 10, done: bool = True,
              views: dict[str, np.ndarray] | None = None, snapshots: int = 0, features: bool = False,
              labels: np.ndarray | None = None, group_label: str | None = None) -> Path:
    rid = f"{source}-s{seed:04d}-e{epochs}"
    d = sweep / "runs" / rid
    (d / "logits").mkdir(parents=True)
    if views is None:
        plain = logits_for(source, seed, epochs)
        views = {"plain": plain, "flip": (plain + SIGNAL) / 2}
        for k in range(1, snapshots + 1):
            views[f"snapshot-{k}"] = snap = logits_for(source, seed, 1000 * k + epochs)
            views[f"snapshot-{k}_flip"] = (snap + SIGNAL) / 2
    for name, arr in views.items():
        np.save(d / "logits" / f"{name}.npy", arr, allow_pickle=False)
    np.save(d / "labels.npy", (LABELS if labels is None else labels).astype(np.int64), allow_pickle=False)
    if features:
        f = np.random.default_rng([0 if source == "none" else seed, 7]).normal(size=(N_TEST, 6)) + np.arange(6)
        np.save(d / "features.npy", f.astype(np.float32), allow_pickle=False)
    plain = views.get("plain")
    acc = float(np.mean(plain.argmax(1) == LABELS)) if plain is not None and np.isfinite(plain).all() else None
    info = {"run_id": rid, "state": "done" if done else "running", "seed": seed,
            "group_key": f"{source}-e{epochs}", "group_label": group_label or LABEL_OF[source],
            "identity": {"source.name": source, "source.label": LABEL_OF[source], "train.epochs": epochs,
                         "data.name": "digits", "model.name": "resnet14"},
            "views": [v for v in views if not v.startswith("snapshot-")],
            "snapshots": [v for v in views if v.startswith("snapshot-") and "_" not in v],
            "result": {"test_acc": acc, "test_ce": 0.0}}
    (d / "run.json").write_text(json.dumps(info))
    if done:
        (d / "DONE").write_text("{}")
    return d


def row(df: pd.DataFrame, group: str) -> pd.Series:
    hits = df[df["group"] == group]
    assert len(hits) == 1, (group, list(df["group"]))
    return hits.iloc[0]


def excluded(sweep: Path) -> pd.DataFrame:
    return pd.read_csv(sweep / "report" / "excluded.csv", keep_default_na=False)



def run_id(source: str, seed: int, epochs: int = 10) -> str:
    return f"{source}-s{seed:04d}-e{epochs}"  # what write_run names its folders


def write_sweep_json(sweep: Path, planned: list[tuple[str, int]], array_job: str = "500") -> dict[str, str]:
    """A manifest planning ``planned`` (source, seed) runs as tasks of one array; run id -> job id."""
    m = MF.new_manifest(sweep)
    base = {"data.name": "digits", "model.name": "resnet14", "train.epochs": 10}
    values, jobs = {}, {}
    for i, (src, seed) in enumerate(planned):
        rid = run_id(src, seed)
        values[rid] = {"source.name": src, "source.label": LABEL_OF[src], "seed": seed}
        jobs[rid] = f"{array_job}_{i}"
        m["runs"][rid] = {"run_dir": str(sweep / "runs" / rid), "overrides": [], "config_hash": "h",
                          "jobs": [{"submission": 0, "job_id": jobs[rid], "array_job_id": array_job, "index": i}]}
    m["submissions"].append({"n": 0, "base_config": base, "varying_keys": ["seed", "source.label", "source.name"],
                             "runs": list(values), "run_values": values, "arrays": [{"job_id": array_job}],
                             "reducer": None})
    MF.write_manifest(sweep, m)
    return jobs


def set_env(d: Path, **fields) -> None:
    """Record an environment in a run's run.json as run/task.py's provenance() does."""
    p = d / "run.json"
    info = json.loads(p.read_text())
    info.update(fields)
    p.write_text(json.dumps(info))


CPU_ENV = {"threads": 1, "device": {"type": "cpu"}, "versions": {"torch": "2.9.0", "cuda": None, "cudnn": None},
           "fp32": {"fp32_precision": "ieee"}}
