"""Checks across the whole sweep before any statistic: one test set, one data set, one environment.

A group's statistics are only meaningful if its models were scored on the same labels, trained on
the same data and computed by the same numerics. Labels and data are compared across the whole
sweep (not only inside a group: two groups scored on different labels would still be compared in
one table); the environment (thread count, CPU model and vector ISA, device, GPU model,
torch/CUDA/cuDNN versions, the resolved step on GPU, fp32 precision settings as run.json records
them) is compared inside each group, since that is where numbers are averaged. docs/metrics.md, "What the reducer checks first".
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .. import metrics as M
from ..rundir import RUNS
from .scan import Run

# identity keys that decide which test examples (and so which labels) a run is scored on
TEST_SET_KEYS: tuple[str, ...] = ("data.name", "data.test_subset", "data.test_size")
NOT_RECORDED = "<not recorded>"
NOT_APPLICABLE = "<n/a>"


def _canon(v: object) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _key_text(ident_part: dict) -> str:
    return ", ".join(f"{k}={_canon(v)}" for k, v in sorted(ident_part.items())) or "(no data keys recorded)"


def _outliers(runs: Iterable[Run], key: Callable[[Run], dict], value: Callable[[Run], str | None],
              what: str) -> dict[str, str]:
    """run id -> reason, for runs whose ``value`` differs from the majority of runs with equal ``key``.

    Without a strict majority there is no reference, so every run of that key is named.
    """
    by_key: dict[str, list[tuple[Run, str]]] = {}
    parts: dict[str, dict] = {}
    for r in runs:
        v = value(r)
        if v is None:
            continue
        k = key(r)
        by_key.setdefault(_canon(k), []).append((r, v))
        parts[_canon(k)] = k
    out: dict[str, str] = {}
    for k, rv in by_key.items():
        counts = Counter(v for _, v in rv).most_common()
        if len(counts) < 2:
            continue
        where = _key_text(parts[k])
        if counts[0][1] > counts[1][1]:
            top = counts[0][0]
            example = next(r for r, v in rv if v == top)
            for r, v in rv:
                if v != top:
                    out[r.run_id] = (f"{what}: not the same as in {counts[0][1]} other run(s) of the sweep with "
                                     f"the same data ({where}; e.g. {RUNS}/{example.run_id})")
        else:
            for r, _ in rv:
                out[r.run_id] = (f"the sweep's {len(rv)} runs with the same data ({where}) disagree on {what} "
                                 f"with no majority ({len(counts)} variants)")
    return out


@dataclass
class Outlier:
    category: str  # labels | data
    reason: str


def data_outliers(runs: list[Run]) -> dict[str, Outlier]:
    """Runs whose test labels or recorded data hash disagree with the rest of the sweep.

    Labels are compared among runs of the same test set (TEST_SET_KEYS); run.json ``data.sha256``
    (train and test arrays) among runs of the same data config (every ``data.*`` identity key).
    """
    def test_set(r: Run) -> dict:
        return {k: r.identity.get(k) for k in TEST_SET_KEYS if k in r.identity}

    def data_cfg(r: Run) -> dict:
        return {k: v for k, v in r.identity.items() if k.startswith("data.")}

    def data_hash(r: Run) -> str | None:
        d = r.info.get("data")
        h = d.get("sha256") if isinstance(d, dict) else None
        return str(h) if h else None

    labels = _outliers(runs, test_set, lambda r: M.array_digest(r.labels) if r.labels is not None else None,
                       "the test labels (labels.npy)")
    data = _outliers(runs, data_cfg, data_hash, "the data hash (run.json data.sha256)")
    out = {rid: Outlier("data", why) for rid, why in data.items()}
    out.update({rid: Outlier("labels", why) for rid, why in labels.items()})
    return out


# ------------------------------------------------------------------------------ environments
def environment(r: Run) -> dict[str, str]:
    """What decides a run's numerics besides its config, as run.json records it (run/task.py).

    On CPU: the thread count, the CPU model and the vector instruction set its kernels dispatch to
    (``cpu``: torch's capability and oneDNN's ISA, with any pinning variables), as the GPU model
    is on GPU; on GPU: the GPU model, CUDA/cuDNN versions and the resolved step (CUDA graph or
    not, optimizer kernel); torch version, fp32 settings and any recorded ``precision`` always.
    Runs of 0.1.0 have no ``cpu`` record: "<not recorded>", which no recorded value matches.
    """
    info = r.info
    dev = info.get("device") if isinstance(info.get("device"), dict) else {}
    ver = info.get("versions") if isinstance(info.get("versions"), dict) else {}
    cpu = info.get("cpu") if isinstance(info.get("cpu"), dict) else {}
    step = info.get("step") if isinstance(info.get("step"), dict) else {}

    def got(v: object) -> str:
        return NOT_RECORDED if v is None else (v if isinstance(v, str) else _canon(v))

    kind = dev.get("type")
    on_cpu, on_gpu = kind in ("cpu", None), kind in ("cuda", None)
    env = {"device": got(kind)}
    env["threads"] = got(info.get("threads")) if on_cpu else NOT_APPLICABLE
    env["cpu"] = got(cpu.get("model")) if on_cpu else NOT_APPLICABLE
    isa = {k: cpu[k] for k in ("capability", "onednn_isa", "pins") if cpu.get(k) not in (None, {})}
    env["cpu ISA"] = (got(isa) if isa else NOT_RECORDED) if on_cpu else NOT_APPLICABLE
    for field, v in (("gpu", dev.get("name")), ("cuda", ver.get("cuda")), ("cudnn", ver.get("cudnn"))):
        env[field] = got(v) if on_gpu else NOT_APPLICABLE
    graph = {k: step[k] for k in ("cuda_graph", "optimizer_kernel") if k in step}
    env["step"] = (got(graph) if graph else NOT_RECORDED) if on_gpu else NOT_APPLICABLE
    env["torch"] = got(ver.get("torch"))
    fp32 = info.get("fp32")
    if isinstance(fp32, dict):  # the GPU's name is in "gpu" already
        fp32 = {k: v for k, v in fp32.items() if k != "gpu"}
    env["fp32"] = got(fp32)
    if "precision" in info:
        env["precision"] = got(info.get("precision"))
    return env


@dataclass
class Mix:
    """A group whose runs come from more than one environment."""

    group_key: str
    label: str
    fields: dict[str, dict[str, list[str]]]  # field -> value -> run ids

    def describe(self, limit: int = 6) -> list[str]:
        lines = [f"group {self.label!r} ({self.group_key}) mixes environments:"]
        for field, by_value in self.fields.items():
            vals = "; ".join(f"{v} ({', '.join(ids[:limit])}{f' and {len(ids) - limit} more' if len(ids) > limit else ''})"
                             for v, ids in by_value.items())
            lines.append(f"  {field}: {vals}")
        return lines

    def summary(self) -> str:
        return "mixed environments: " + "; ".join(
            f"{f} " + ", ".join(f"{v} x{len(ids)}" for v, ids in by.items()) for f, by in self.fields.items())


def mixed_groups(runs: list[Run]) -> list[Mix]:
    """Every group whose runs disagree on a field of :func:`environment`, with the runs per value."""
    by_group: dict[str, list[Run]] = {}
    for r in runs:
        by_group.setdefault(r.group_key, []).append(r)
    out = []
    for gkey, members in by_group.items():
        envs = [(r, environment(r)) for r in members]
        fields: dict[str, dict[str, list[str]]] = {}
        for field in dict.fromkeys(f for _, e in envs for f in e):
            by_value: dict[str, list[str]] = {}
            for r, e in envs:
                by_value.setdefault(e.get(field, NOT_RECORDED), []).append(r.run_id)
            if len(by_value) > 1:
                fields[field] = by_value
        if fields:
            out.append(Mix(gkey, members[0].label, fields))
    return out


MIXED_HINT = ("  Numbers differ between environments, so the reducer does not average over them. Move the runs "
              "of the other environment out of runs/ (or rerun them in this one) and reduce again, or pass "
              "--allow-mixed to reduce them together (the report then states the mix).")
