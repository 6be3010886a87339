"""Loss barriers of a sweep: pairs of finished runs per group, each pair's record in SWEEP_DIR/barriers/.

    python -m nondet_hpc.barriers SWEEP_DIR [--pairs N] [--group G ...] [--points 11] [--bn-images M]
                                  [--device D] [--threads N] [--data-root DIR] [--force] [--self-check]

Groups are the reducer's: runs whose run.json ``group_key`` is equal (configs equal but for the
seed). A run takes part when it is DONE and has a readable weights file; the others are listed
with the reason. Per group at most ``--pairs`` pairs, all of them when the group has that few
(:func:`choose_pairs`: deterministic; the first pairs share no run). A pair whose record exists
for the same two weights (fingerprints) and the same settings is skipped, so the command can be
rerun (or the job requeued) and does only what is missing. The math is in :mod:`.barrier`, the
file format in :mod:`nondet_hpc.sweep.barriers`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import __version__
from ..config import ConfigError
from ..records.weights import Weights, WeightsFile, read_weights
from ..rundir import CONFIG, RUNS, file_lock, is_done, list_runs, read_run_json
from ..safeio import RefusedFile, read_regular
from ..sweep import barriers as records
from .barrier import DEFAULT_BN_IMAGES, WEIGHTS_FILE, BarrierInputError, PairEvaluator

DEFAULT_PAIRS = 45  # all pairs of 10 runs
MAX_CONFIG_BYTES = 1 << 20
LOCK = ".lock"  # SWEEP_DIR/barriers/.lock: one barrier command per sweep at a time


@dataclass
class Run:
    run_id: str
    path: Path
    info: dict
    fingerprint: str

    @property
    def label(self) -> str:
        return str(self.info.get("group_label") or (self.info.get("source") or {}).get("label") or "")

    @property
    def source(self) -> str:
        return str((self.info.get("identity") or {}).get("source.name") or
                   (self.info.get("source") or {}).get("name") or "")


@dataclass
class Group:
    key: str
    runs: list[Run] = field(default_factory=list)


def _weights_header(run: Path) -> str:
    """The fingerprint in the run's weights header (file checked, run id matched); RefusedFile else."""
    path = run / WEIGHTS_FILE
    with WeightsFile(path) as f:
        if f.run_id != run.name:
            raise RefusedFile(path, f"holds the weights of run {f.run_id or '(none recorded)'}, not of {run.name} "
                                    f"(copied from another folder?)")
        return f.fingerprint_hex


def sweep_groups(sweep_dir: Path) -> tuple[list[Group], list[tuple[str, str]]]:
    """The groups of the sweep's usable runs, and ``[(run id, why it takes no part)]``."""
    if not (sweep_dir / RUNS).is_dir():
        raise ConfigError(f"{sweep_dir} is not a sweep folder (no {RUNS}/ in it): give the out_dir of a sweep.")
    groups: dict[str, Group] = {}
    skipped = []
    for rd in list_runs(sweep_dir):
        if not is_done(rd):
            skipped.append((rd.name, "not DONE"))
            continue
        info, why = read_run_json(rd)
        if info is None or not info.get("group_key"):
            skipped.append((rd.name, why or "run.json has no group_key"))
            continue
        if not (rd / WEIGHTS_FILE).exists():
            skipped.append((rd.name, f"no {WEIGHTS_FILE} (trained before weights were kept, or with weights off)"))
            continue
        try:
            fp = _weights_header(rd)
        except RefusedFile as e:
            skipped.append((rd.name, f"{WEIGHTS_FILE} refused: {e.why}"))
            continue
        key = str(info["group_key"])
        groups.setdefault(key, Group(key)).runs.append(Run(rd.name, rd, info, fp))
    return [groups[k] for k in sorted(groups)], skipped


def choose_pairs(run_ids: Sequence[str], cap: int, key: str) -> list[tuple[str, str]]:
    """At most ``cap`` pairs of ``run_ids`` (all when there are that few), each sorted; the same
    runs and key always give the same pairs.

    The runs are put in an order drawn from a generator seeded by ``key`` (the group key), then
    paired by rounds of a round-robin tournament on that order: each round pairs every run with
    another once, so the first pairs share no run (independent pairs) and every run appears
    about equally often.
    """
    ids = sorted(set(run_ids))
    if len(ids) < 2 or cap < 1:
        return []
    seed = int.from_bytes(hashlib.sha256(f"barrier pairs:{key}".encode()).digest()[:8], "little")
    order: list[str | None] = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    if len(order) % 2:
        order.append(None)  # a bye: the run drawn against it sits the round out
    m, out = len(order), []
    for r in range(m - 1):
        rest = order[1:]
        ring = [order[0]] + rest[r:] + rest[:r]
        for i in range(m // 2):
            a, b = ring[i], ring[m - 1 - i]
            if a is not None and b is not None:
                out.append((min(a, b), max(a, b)))
    return out[:cap]


def load_config(run: Path):
    """A run's config.yaml (a regular file, parsed as data)."""
    from omegaconf import OmegaConf

    try:
        text = read_regular(run / CONFIG, MAX_CONFIG_BYTES).decode("utf-8")
        cfg = OmegaConf.create(text)
    except RefusedFile as e:
        raise ConfigError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - YAML and OmegaConf raise many kinds
        raise ConfigError(f"{run / CONFIG} is not a config this package wrote ({type(e).__name__}: {e})") from None
    if not all(k in cfg for k in ("data", "model", "train", "eval")):
        raise ConfigError(f"{run / CONFIG} lacks the data/model/train/eval nodes of a run's config")
    return cfg


@dataclass
class Settings:
    pairs: int = DEFAULT_PAIRS
    points: int = 11
    bn_images: int = DEFAULT_BN_IMAGES
    device: str = "auto"
    threads: int | None = None
    data_root: str | None = None
    force: bool = False
    self_check: bool = False

    def record(self, n_train: int | None = None) -> dict:
        """What a pair's record must match to be skipped: the points and the BN images actually
        used (all ``n_train`` training images when fewer than asked for)."""
        images = int(self.bn_images) if n_train is None else min(int(self.bn_images), int(n_train))
        return {"points": int(self.points), "bn_images": images}


class _GroupWork:
    """One group: its config, data and evaluator (built when the first pair needs them)."""

    def __init__(self, group: Group, settings: Settings, echo: Callable[[str], None]):
        self.group, self.s, self.echo = group, settings, echo
        self.evaluator: PairEvaluator | None = None
        self.weights: dict[str, Weights] = {}

    def _setup(self) -> PairEvaluator:
        import torch

        from .data import load_dataset
        from .device import resolve_device
        from .sources import configure_kernels, configure_precision, fp32_flag_of

        first = self.group.runs[0]
        cfg = load_config(first.path)
        for run in self.group.runs[1:]:
            other = load_config(run.path)
            if other.model != cfg.model or other.data != cfg.data:
                raise BarrierInputError(f"{run.run_id} and {first.run_id} share a group key but not their model "
                                        f"and data configs: their folders were edited.")
        if self.s.data_root is not None:
            cfg.data.root = self.s.data_root
        dev = resolve_device(self.s.device)
        configure_kernels(True, dev)  # deterministic evaluation: a model with itself gives 0 exactly
        configure_precision(fp32_flag_of(cfg.train), dev)
        threads = self.s.threads or (cfg.train.threads if int(cfg.train.threads or 0) > 0 else None) \
            or first.info.get("threads")
        if dev.type == "cpu" and threads:
            torch.set_num_threads(int(threads))
        data = load_dataset(cfg.data)
        want = (first.info.get("data") or {}).get("sha256")
        if want and data.info.get("sha256") != want:
            raise BarrierInputError(f"the data loaded now (data.root={cfg.data.root!r}) differ from the data the "
                                    f"runs were trained on (sha256 {str(data.info.get('sha256'))[:12]} != "
                                    f"{want[:12]}); point --data-root at the same data set.")
        self.evaluator = PairEvaluator(cfg, data.to(dev), dev, bn_images=self.s.bn_images,
                                       channels_last=dev.type == "cuda")
        return self.evaluator

    def load(self, run: Run) -> Weights:
        if run.run_id not in self.weights:
            w = read_weights(run.path / WEIGHTS_FILE)  # fingerprint verified against the data
            if w.meta.get("fingerprint") != run.fingerprint or w.meta.get("run_id") != run.run_id:
                raise RefusedFile(run.path / WEIGHTS_FILE, "changed while this command ran")
            assert self.evaluator is not None
            self.evaluator.check(w, str(run.path / WEIGHTS_FILE))
            self.weights[run.run_id] = w
        return self.weights[run.run_id]

    def pair(self, a: Run, b: Run) -> dict:
        """Compute one pair's record (not written)."""
        import torch

        ev = self.evaluator or self._setup()
        wa, wb = self.load(a), self.load(b)
        t0 = time.time()
        alpha = records.alphas(self.s.points)
        loss, error = ev.curve(wa, wb, alpha)
        return records.make_record(
            runs=[a.run_id, b.run_id], fingerprints=[a.fingerprint, b.fingerprint], alpha=alpha, test_loss=loss,
            test_error=error, group_key=self.group.key, group_label=a.label, source=a.source,
            settings=self.s.record(ev.subset.n_train), bn=ev.bn_record(), n_test=int(len(ev.test_y)),
            eval_batch_size=ev.eval_batch_size, device=ev.device.type, threads=torch.get_num_threads(),
            versions={"nondet_hpc": __version__, "torch": torch.__version__}, host=socket.gethostname(),
            seconds=round(time.time() - t0, 3), time=time.time())


def _done(sweep_dir: Path, a: Run, b: Run, settings: Settings) -> tuple[bool, str]:
    """Whether the pair's record exists for these weights and settings (and why not)."""
    path = records.record_path(sweep_dir, a.run_id, b.run_id)
    if not path.exists():
        return False, ""
    try:
        rec = records.read_record(path)
    except RefusedFile as e:
        return False, f"{path.name} refused ({e.why}): recomputed"
    order = {a.run_id: a.fingerprint, b.run_id: b.fingerprint}
    n_train = (a.info.get("data") or {}).get("n_train")
    if rec.matches([order[r] for r in rec.runs], settings.record(n_train if isinstance(n_train, int) else None)):
        return True, ""
    return False, f"{path.name} is of other weights or settings: recomputed"


def _self_check(work: _GroupWork) -> str:
    """The barrier of the group's first run with itself must be exactly 0 ("" = it is)."""
    run = work.group.runs[0]
    rec = work.pair(run, run)
    if rec["barrier_loss"] == 0.0 and rec["barrier_error"] == 0.0:
        return ""
    return (f"the barrier of {run.run_id} with itself is {rec['barrier_loss']!r} (loss), {rec['barrier_error']!r} "
            f"(error %), not 0: evaluation on this device is not deterministic; barriers from it are not exact.")


def group_barriers(sweep_dir: Path, group: Group, settings: Settings, echo: Callable[[str], None]) -> dict:
    """Compute the group's missing pairs; return its counts and the failures."""
    by_id = {r.run_id: r for r in group.runs}
    chosen = choose_pairs(list(by_id), settings.pairs, group.key)
    work = _GroupWork(group, settings, echo)
    out = {"group_key": group.key, "label": group.runs[0].label, "runs": len(group.runs), "pairs": len(chosen),
           "done_before": 0, "computed": 0, "failed": [], "self_check": None}
    if settings.self_check:
        try:
            problem = _self_check(work)
        except (ConfigError, RefusedFile) as e:
            problem = str(e)
        out["self_check"] = problem or "0 exactly"
        if problem:
            out["failed"].append(("self-check", problem))
            echo(f"[barriers] {group.key}: self-check failed: {problem}")
    for a_id, b_id in chosen:
        a, b = by_id[a_id], by_id[b_id]
        done, why = (False, "") if settings.force else _done(sweep_dir, a, b, settings)
        if done:
            out["done_before"] += 1
            continue
        if why:
            echo(f"[barriers] {why}")
        try:
            rec = work.pair(a, b)
        except (ConfigError, RefusedFile) as e:  # BarrierInputError is a ConfigError
            out["failed"].append((records.pair_name(a_id, b_id), str(e)))
            echo(f"[barriers] {a_id} x {b_id}: failed: {e}")
            if work.evaluator is None:  # the group's data or config is unusable: every pair would fail
                break
            continue
        records.write_record(sweep_dir, rec)
        out["computed"] += 1
        echo(f"[barriers] {a_id} x {b_id}: loss barrier {rec['barrier_loss']:.4g} at alpha "
             f"{rec['alpha_loss']:.2g}, error barrier {rec['barrier_error']:.3g} pp ({rec['seconds']:.1f} s)")
    return out


def _matches(group: Group, wanted: Sequence[str]) -> bool:
    """--group: a group key (or its start), a source name, or a row label."""
    if not wanted:
        return True
    run = group.runs[0]
    return any(group.key.startswith(w) or w == run.source or w == run.label for w in wanted)


def sweep_barriers(sweep_dir: str | Path, settings: Settings, groups: Sequence[str] = (),
                   echo: Callable[[str], None] = print) -> dict:
    """Every group's barriers (the command's work); returns what was done, per group."""
    import torch

    sweep = Path(sweep_dir)
    records.alphas(settings.points)  # refuses a bad --points before anything is read
    if settings.pairs < 1 or settings.bn_images < 1:
        raise ConfigError(f"--pairs {settings.pairs} / --bn-images {settings.bn_images}: both must be >= 1.")
    found, skipped = sweep_groups(sweep)
    chosen = [g for g in found if _matches(g, groups)]
    if groups and not chosen:
        names = sorted({f"{g.key} ({g.runs[0].source}, {g.runs[0].label})" for g in found})
        raise ConfigError(f"--group {' '.join(groups)} matches no group with usable runs; groups: "
                          f"{', '.join(names) or 'none'}.")
    _echo_skipped(skipped, echo)
    folder = sweep / records.FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    busy = lambda: ConfigError(f"another barrier command is working on {sweep} right now (it holds "  # noqa: E731
                               f"{folder / LOCK}); wait for it, then rerun: it skips what is done.")
    # the process's torch settings as they were: evaluation sets threads and deterministic kernels
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        with file_lock(folder / LOCK, busy):
            results = [group_barriers(sweep, g, settings, echo) for g in chosen]
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    return {"sweep": str(sweep), "settings": settings.record(), "groups": results,
            "skipped_runs": skipped}


def _echo_skipped(skipped: Sequence[tuple[str, str]], echo: Callable[[str], None], show: int = 5) -> None:
    """The runs that take no part, by reason: the count and the first few run ids of each."""
    by_why: dict[str, list[str]] = {}
    for rid, why in skipped:
        by_why.setdefault(why, []).append(rid)
    for why, rids in by_why.items():
        more = f" and {len(rids) - show} more" if len(rids) > show else ""
        echo(f"[barriers] {len(rids)} run(s) take no part: {why}: {', '.join(rids[:show])}{more}")


def _summary(res: dict) -> str:
    lines = []
    for g in res["groups"]:
        lines.append(f"[barriers] {g['label'] or g['group_key']} ({g['group_key']}): {g['runs']} runs, {g['pairs']} "
                     f"pairs: {g['done_before']} done before, {g['computed']} computed, {len(g['failed'])} failed")
    if not res["groups"]:
        lines.append("[barriers] no group has two runs with weights files: nothing to compute")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nondet_hpc.barriers", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Loss barriers between pairs of finished runs of each group of a sweep: the models on the\n"
            "straight line between two runs' final weights (weights.safetensors), BatchNorm statistics\n"
            "recomputed on a fixed subset of training images, test loss and error at each point; the\n"
            "barrier is the largest excess over the straight line between the end points. One record per\n"
            "pair in SWEEP_DIR/barriers/<run a>__<run b>.json; pairs already recorded for the same weights\n"
            "and settings are skipped, so rerunning does only what is missing."),
        epilog=("examples:\n"
                "  python -m nondet_hpc.barriers outputs/stability --pairs 45\n"
                "  python -m nondet_hpc.barriers outputs/sources_quick --group bitflip --device cpu --self-check"))
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep folder (out_dir) whose runs are paired")
    p.add_argument("--pairs", type=int, default=DEFAULT_PAIRS, metavar="N",
                   help=f"at most N pairs per group; all pairs of a group with that few (default {DEFAULT_PAIRS})")
    p.add_argument("--group", nargs="+", default=[], metavar="G",
                   help="only these groups: a group key (or its start), a source name, or a row label")
    p.add_argument("--points", type=int, default=11, metavar="K", help="points on the line, end points included "
                                                                       "(default 11)")
    p.add_argument("--bn-images", type=int, default=DEFAULT_BN_IMAGES, metavar="M",
                   help=f"training images BatchNorm statistics are recomputed on (default {DEFAULT_BN_IMAGES}; "
                        "all when fewer)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: the count the runs were trained with)")
    p.add_argument("--data-root", default=None, metavar="DIR", help="folder holding the CIFAR data, if not the "
                                                                     "runs' data.root")
    p.add_argument("--force", action="store_true", help="recompute pairs that are recorded already")
    p.add_argument("--self-check", action="store_true",
                   help="also evaluate each group's first run with itself; fails unless its barrier is exactly 0")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    s = Settings(pairs=a.pairs, points=a.points, bn_images=a.bn_images, device=a.device, threads=a.threads,
                 data_root=a.data_root, force=a.force, self_check=a.self_check)
    if a.threads is not None and a.threads < 1:
        print("nondet_hpc.barriers: error: --threads must be >= 1", file=sys.stderr)
        return 2
    try:
        res = sweep_barriers(a.sweep_dir, s, a.group, echo=(lambda _m: None) if a.json else print)
    except (ConfigError, records.BarrierError) as e:
        print(f"nondet_hpc.barriers: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1, default=str) if a.json else _summary(res))
    return 1 if any(g["failed"] for g in res["groups"]) else 0
