"""Add test-time-augmentation views (and features) to finished runs, from their final checkpoint.

    python -m nondet_hpc.evaluate RUN_DIR|SWEEP_DIR [...] --views flip crop25 [--features]
                                  [--force] [--batch-size N] [--device D] [--threads N] [--data-root DIR]

A DONE run holds config.yaml and checkpoint.pt, the final model. This rebuilds the model from them,
evaluates the requested views exactly as training evaluates ``eval.views`` (same code, same view
order, same batch size and memory format), writes logits/<view>.npy atomically and adds the views to
run.json "views", so the reducer picks them up like views computed at the end of training. Bit for
bit equal to what training would have written when it runs on the same kind of device with the same
thread count and torch build; it recomputes logits/plain.npy first and says so when that differs.

Snapshot views (snapshot-k, snapshot-k_<view>: the models at the end of each accelerated-ensembling
cycle) cannot be made here: only the final model is kept.

A run of model=custom names its factory in config.yaml; rebuilding it imports that module, which
runs its code. A run folder may come from anyone, so such a run is evaluated only when the
command line names the same factory (``--allow-factory package.module:function``): the user's
explicit consent, never the folder's word. Its source file must still hash to the run's
``model.source_sha256`` (the code the run was trained with).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import safeio
from ..config import ConfigError
from ..rundir import (CHECKPOINT, CONFIG, DONE, FEATURES, LABELS, RUN_JSON, RUNS, RunRecord, is_done, list_runs,
                      logits_path, read_run_json, run_lock, write_npy)
from ..viewspec import VIEWS

__all__ = ["EvaluateError", "find_runs", "evaluate_run", "main"]


class EvaluateError(ConfigError):
    """A run that cannot be evaluated: the message says why and what to do."""


_SNAPSHOT_HELP = ("snapshot views (snapshot-k, snapshot-k_<view>) are the logits of the models at the end of "
                  "each accelerated-ensembling cycle, and only the final model is kept (checkpoint.pt), so they "
                  "cannot be recomputed: train with train.snapshots=k and eval.views=[...] set before training.")


def _check_views(views: Sequence[str]) -> list[str]:
    out = []
    for v in views:
        if v.startswith("snapshot"):
            raise EvaluateError(f"--views {v}: {_SNAPSHOT_HELP}")
        if v not in VIEWS:
            raise EvaluateError(f"--views {v}: unknown view; valid: {', '.join(VIEWS)}.")
        out.append(v)
    return list(dict.fromkeys(out))


def find_runs(paths: Sequence[str | os.PathLike]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand RUN_DIRs and SWEEP_DIRs into (runs to evaluate, [(run, why it is skipped)]).

    A sweep folder contributes its DONE runs (others are listed as skipped); a run folder given
    explicitly must be DONE, else EvaluateError (nothing is evaluated then).
    """
    runs: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if (p / RUNS).is_dir() and not (p / CONFIG).exists():
            found = list_runs(p)
            if not found:
                raise EvaluateError(f"{p} is a sweep folder without runs (nothing under {p / RUNS}).")
            for d in found:
                if not is_done(d):
                    skipped.append((d, f"not DONE (state: {_state(d)})"))
                elif not safeio.is_regular(d / CONFIG):
                    skipped.append((d, f"DONE but no {CONFIG} (a stray marker, or a folder this package did not "
                                       f"write): left alone"))
                else:
                    runs.append(d)
        elif (p / CONFIG).exists() or (p / RUN_JSON).exists():
            if not is_done(p):
                raise EvaluateError(
                    f"{p} is not a finished run (no {DONE} marker; {RUN_JSON} state: {_state(p)}). Only DONE runs "
                    f"can be evaluated: finish it first by rerunning its sweep command (it resumes from the "
                    f"checkpoint), see python -m nondet_hpc.status {p.parent.parent}.")
            runs.append(p)
        elif not p.exists():
            raise EvaluateError(f"{p} does not exist.")
        else:
            raise EvaluateError(f"{p} is neither a run folder ({CONFIG}, {RUN_JSON}, {DONE}) nor a sweep folder "
                                f"({RUNS}/<run id>/).")
    return list(dict.fromkeys(runs)), skipped


def _state(run: Path) -> str:
    info, _ = read_run_json(run)
    return str(info.get("state", "unknown")) if info is not None else f"unknown (no readable {RUN_JSON})"


def load_run_config(rd: Path):
    """A run's config.yaml as an OmegaConf config, read as data only: a regular file of bounded size,
    no YAML tags, few aliases (safeio.load_yaml), no interpolation (a run's config.yaml is written
    resolved; ``${oc.env:...}`` would read this machine's environment), and a mapping of sections."""
    from omegaconf import OmegaConf

    path = rd / CONFIG
    data = safeio.load_yaml(path)
    if not isinstance(data, dict):
        what = "list" if isinstance(data, list) else type(data).__name__
        raise EvaluateError(f"{path} holds a YAML {what}, not the mapping of config keys a run's {CONFIG} is (the job "
                            f"writes it); it was edited or replaced. Restore it, or retrain the run (force=true).")
    bad = _unresolved(data, "")
    if bad:
        raise EvaluateError(f"{path}: {bad[0]} holds {bad[1]!r}; a run's {CONFIG} is written with every value "
                            f"resolved, so this one was edited. Values are not resolved here (an interpolation "
                            f"would read this machine's environment): write the value itself.")
    missing = [k for k in ("data", "model", "source", "train", "eval") if not isinstance(data.get(k), dict)]
    if missing:
        raise EvaluateError(f"{path} lacks the section(s) {', '.join(missing)} every run's {CONFIG} has; it was "
                            f"edited or replaced. Restore it, or retrain the run (force=true).")
    return OmegaConf.create(data)


def _unresolved(node, where: str) -> tuple[str, str] | None:
    """(key, value) of the first interpolation or missing value ('???') in plain YAML data."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        key = f"{where}.{k}" if where else str(k)
        if isinstance(v, str) and ("${" in v or v == "???"):
            return key, v
        found = _unresolved(v, key)
        if found:
            return found
    return None


def _locked(run: Path):
    """The lock task.run holds while training: never write into a run another process writes."""
    return run_lock(run, lambda: EvaluateError(f"{run} is being written by another process (training or "
                                               f"evaluate); try again when it has finished."))


def evaluate_run(run: str | os.PathLike, views: Sequence[str], *, features: bool = False, force: bool = False,
                 batch_size: int | None = None, device: str = "auto", threads: int | None = None,
                 data_root: str | None = None, echo: Callable[[str], None] = print,
                 allow_factory: Sequence[str] = ()) -> dict:
    """Evaluate ``views`` (and features) of one DONE run from its checkpoint; see the module doc.

    Existing logits/<view>.npy and features.npy are kept (and reported as skipped) unless ``force``.
    ``allow_factory``: the model factories (package.module:function) the caller consents to import
    for model=custom runs; any other factory a run names is refused before anything is imported.
    Returns {"run_id", "written": [...], "skipped": [...], "plain_max_abs_diff": float | None}.
    """
    import torch

    from .device import resolve_device
    from .sources import configure_precision, fp32_flag_of

    rd = Path(run)
    views = _check_views(views)
    if not is_done(rd):
        raise EvaluateError(f"{rd} is not a finished run (no {DONE} marker; state: {_state(rd)}). Only DONE "
                            f"runs can be evaluated.")
    work = _Work(rd, force, echo)
    work.plan(views, features)
    if work.nothing_to_do():
        return work.result([], None)
    safeio.check_tree(rd)  # nothing is read or written through a link planted in the run folder
    cfg = load_run_config(rd)
    _check_factory_consent(cfg, allow_factory)
    info = RunRecord(rd / RUN_JSON).data
    if data_root is not None:
        cfg.data.root = data_root
    dev = resolve_device(device)
    # the fp32 flag training used (IEEE unless train.precision=tf32): views added now must be
    # computed with the same numerics as those written at the end of training
    configure_precision(fp32_flag_of(cfg.train), dev)
    trained_on = (info.get("device") or {}).get("type")
    if trained_on and trained_on != dev.type:
        echo(f"[evaluate] {work.rid}: note: trained on {trained_on}, evaluating on {dev.type}; the logits can "
             f"differ from what training would have written in the last bits.")
    channels_last = bool(info.get("channels_last", dev.type == "cuda")) if trained_on == dev.type \
        else dev.type == "cuda"
    bs = int(batch_size or cfg.eval.batch_size)
    # CPU results depend on the thread count: default to the count training ran with (run.json)
    n_threads = threads or (cfg.train.threads if cfg.train.threads > 0 else None) or info.get("threads")
    old_threads = torch.get_num_threads()
    if dev.type == "cpu" and n_threads:
        torch.set_num_threads(int(n_threads))
    try:
        with _locked(rd):
            return _evaluate_locked(work, cfg, dev, channels_last, bs)
    finally:
        torch.set_num_threads(old_threads)


def _check_factory_consent(cfg, allowed: Sequence[str]) -> None:
    """A custom model's factory is imported only when the command line names it (module doc)."""
    from ..registry.models import CUSTOM

    if str(cfg.model.get("name")) != CUSTOM:
        return
    spec = str(cfg.model.get("factory"))
    if spec not in {str(a).strip() for a in allowed}:
        raise EvaluateError(f"the run's model is model.factory={spec}, the researcher's own code: rebuilding it "
                            f"imports that module, which runs it. Evaluate it only if you trust that code: add "
                            f"--allow-factory {spec} (and run from the folder that holds the module, or put it on "
                            f"PYTHONPATH).")


class _Work:
    """What one evaluate call writes into run ``rd`` and what it skips (files that exist, unless ``force``)."""

    def __init__(self, rd: Path, force: bool, echo: Callable[[str], None]) -> None:
        self.rd, self.rid, self.force, self.echo = rd, rd.name, force, echo
        self.todo: list[str] = []
        self.skipped: list[str] = []
        self.features = False

    def plan(self, views: list[str], features: bool) -> None:
        for v in views:
            if logits_path(self.rd, v).exists() and not self.force:
                self.skipped.append(v)
                self.echo(f"[evaluate] {self.rid}: skipped {v}: {_rel(logits_path(self.rd, v))} exists (--force "
                          f"recomputes it)")
            else:
                self.todo.append(v)
        self.features = features and (self.force or not (self.rd / FEATURES).exists())
        if features and not self.features:
            self.skipped.append("features")
            self.echo(f"[evaluate] {self.rid}: skipped features: {FEATURES} exists (--force recomputes it)")

    def recheck(self) -> None:
        """Under the lock: another evaluate may have written some of it since ``plan`` looked."""
        for v in [v for v in self.todo if not self.force and logits_path(self.rd, v).exists()]:
            self.todo.remove(v)
            self.skipped.append(v)
            self.echo(f"[evaluate] {self.rid}: skipped {v}: {_rel(logits_path(self.rd, v))} was written meanwhile "
                      f"(--force recomputes it)")
        if not self.force and self.features and (self.rd / FEATURES).exists():
            self.features = False
            self.skipped.append("features")

    def nothing_to_do(self) -> bool:
        return not self.todo and not self.features

    def result(self, written: list[str], diff: float | None) -> dict:
        return {"run_id": self.rid, "written": written, "skipped": self.skipped, "plain_max_abs_diff": diff}


def _rel(path: Path) -> str:
    """A run file's name as the messages show it: relative to its run folder (logits/flip.npy)."""
    return f"{path.parent.name}/{path.name}"


def _evaluate_locked(work: _Work, cfg, dev, channels_last: bool, bs: int) -> dict:
    import torch

    from .data import settings
    from .views import evaluate_test_set

    rd, rid = work.rd, work.rid
    record = RunRecord(rd / RUN_JSON)  # re-read under the lock
    work.recheck()
    if work.nothing_to_do():
        return work.result([], None)
    model, data = _rebuild(rd, rid, cfg, record.data, dev, channels_last)
    # The same function task.py calls at the end of training: plain first, then the views in order.
    order = ["plain"] + [v for v in work.todo if v != "plain"]
    t0 = time.time()
    logits, feats = evaluate_test_set(model, data, settings(cfg.data, data), order, batch_size=bs, device=dev,
                                      channels_last=channels_last, with_features=work.features)
    diff = _compare_with_training(rd, rid, data, logits["plain"], work.echo)
    written = []
    for v in work.todo:
        write_npy(logits_path(rd, v), logits[v])
        written.append(v)
    if work.features and feats is not None:
        write_npy(rd / FEATURES, feats)
        written.append("features")
    info = record.data
    listed = [str(v) for v in info.get("views", []) or []]
    history = list(info.get("evaluations", []) or [])
    history.append({"time": time.time(), "written": written, "forced": bool(work.force), "device": dev.type,
                    "threads": torch.get_num_threads(), "batch_size": bs, "channels_last": channels_last,
                    "torch": torch.__version__, "host": socket.gethostname(),
                    "plain_max_abs_diff": diff, "eval_s": round(time.time() - t0, 3)})
    fields = {"views": listed + [v for v in work.todo if v not in listed], "evaluations": history}
    if "features" in written:
        fields["features"] = True
    record.update(**fields)
    work.echo(f"[evaluate] {rid}: wrote {', '.join(written)}"
              + (f" (skipped {', '.join(work.skipped)})" if work.skipped else ""))
    return work.result(written, diff)


def _rebuild(rd: Path, rid: str, cfg, info: dict, dev, channels_last: bool):
    """(the run's final model from its checkpoint, on ``dev`` in eval mode; the data it was trained on)."""
    import torch

    from .data import load_dataset
    from .models import model_for_run
    from .train import load_checkpoint_file

    ckpt_path = rd / CHECKPOINT
    if not os.path.lexists(ckpt_path):
        raise EvaluateError(f"{rd} has no {CHECKPOINT} (deleted to save space?): the model cannot be rebuilt.")
    state = load_checkpoint_file(ckpt_path, rid)
    epoch = (state.get("progress") or {}).get("epoch")
    if epoch != cfg.train.epochs:
        raise EvaluateError(f"{ckpt_path} is from epoch {epoch}, not the final epoch {cfg.train.epochs}: it is "
                            f"not the model this run's logits came from.")
    data = load_dataset(cfg.data)
    want_sha = (info.get("data") or {}).get("sha256")
    if want_sha and data.info.get("sha256") != want_sha:
        raise EvaluateError(f"the data loaded now (data.root={cfg.data.root!r}) differ from the data this run was "
                            f"trained on (sha256 {data.info.get('sha256', '?')[:12]} != {want_sha[:12]}); point "
                            f"--data-root at the same data set.")
    try:
        # the initial weights do not matter (the checkpoint replaces them); the generator only feeds the builder
        model = model_for_run(cfg, tuple(int(v) for v in data.train_x.shape[1:]), data.num_classes,  # type: ignore
                              torch.Generator().manual_seed(0))
        model.load_state_dict(state["model"])
    except ConfigError as e:
        raise EvaluateError(f"{rd / CONFIG}: {e}") from None
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise EvaluateError(f"{ckpt_path} does not fit the model {rd / CONFIG} describes (model.name="
                            f"{cfg.model.get('name', '?')}): {first}. One of the two was edited or copied from another "
                            f"run: restore them, or retrain the run (force=true).") from None
    model.to(device=dev, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    model.eval()
    return model, data


def _compare_with_training(rd: Path, rid: str, data, plain: np.ndarray, echo: Callable[[str], None]) -> float | None:
    """Check the labels, and how far the recomputed plain logits are from training's (None: no file)."""
    labels_path = rd / LABELS
    if labels_path.exists():
        labels = safeio.load_npy(labels_path)
        if not np.array_equal(labels, data.test_y.cpu().numpy()):
            raise EvaluateError(f"{labels_path} differs from the test labels loaded now: wrong data set.")
    plain_path = logits_path(rd, "plain")
    if not plain_path.exists():
        return None
    old = safeio.load_npy(plain_path)
    diff = float(np.max(np.abs(old.astype(np.float64) - plain))) if old.shape == plain.shape else float("inf")
    if diff != 0.0:
        echo(f"[evaluate] {rid}: warning: recomputed plain logits differ from {_rel(plain_path)} (max abs diff "
             f"{diff:.3g}): other device, thread count or torch build than training. The new views are "
             f"consistent with this evaluation, not bit-identical to training's.")
    return diff


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nondet_hpc.evaluate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Add test-time-augmentation views to finished runs without retraining: rebuild each run's final\n"
            "model from config.yaml + checkpoint.pt, evaluate the views as training does, write\n"
            "logits/<view>.npy and list them in run.json, so python -m nondet_hpc.reduce shows them as rows.\n"
            "\n"
            "Views (docs/study.md, test-time augmentation; the original image is always one of them):\n"
            "  plain 1, flip 2, crop25 26, crop81 82, flip-crop25 51, flip-crop81 163 views averaged as logits."),
        epilog=(
            "Only DONE runs: a run folder named explicitly that is not DONE is an error (nothing is evaluated);\n"
            "in a sweep folder the unfinished runs are listed and left alone.\n"
            "Existing files are never overwritten without --force: such a view is reported as skipped.\n"
            "\n"
            "Snapshot views cannot be recomputed: snapshot-k and snapshot-k_<view> are the models at the end of\n"
            "each accelerated-ensembling cycle (train.snapshots=k), and only the final model is kept. For a\n"
            "snapshot run, --views flip gives logits/flip.npy of the final model (= snapshot k), not the\n"
            "Acc.Ens/Flip row, which needs eval.views set before training.\n"
            "\n"
            "Exactness: on the same kind of device, thread count and torch build as training, with the run's\n"
            "eval.batch_size, the result is bit-identical to what training writes for the same eval.views\n"
            "list; plain.npy is recomputed first and a difference is reported.\n"
            "\n"
            "examples:\n"
            "  python -m nondet_hpc.evaluate outputs/sources --views flip crop25 crop81 flip-crop25 flip-crop81\n"
            "  python -m nondet_hpc.evaluate outputs/sources/runs/all-s0001-* --features --device cuda"))
    p.add_argument("paths", nargs="+", metavar="RUN_DIR|SWEEP_DIR",
                   help="run folders (SWEEP/runs/<run id>) or sweep folders (all their DONE runs)")
    p.add_argument("--views", nargs="+", default=[], metavar="VIEW",
                   help=f"views to add: {', '.join(VIEWS)} (not snapshot-k: see below)")
    p.add_argument("--features", action="store_true",
                   help="also write features.npy (penultimate features of the plain image, for CKA)")
    p.add_argument("--force", action="store_true", help="recompute and overwrite views / features.npy that exist")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="images per forward pass (default: the run's eval.batch_size, needed for bit-exactness)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda if available), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: the count the run was trained with, from run.json)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="where the run's data are (CIFAR/MNIST folder, .npz file, image folder), if not the run's "
                        "data.root (relative paths are from here)")
    p.add_argument("--allow-factory", action="append", default=[], metavar="PACKAGE.MODULE:FUNCTION",
                   help="import this model factory for model=custom runs that name it (it runs that code: only "
                        "for code you trust; a run folder alone never makes evaluate import anything)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if not a.views and not a.features:
        p.error("nothing to do: give --views VIEW [VIEW ...] and/or --features")
    if a.batch_size is not None and a.batch_size < 1:
        p.error("--batch-size must be >= 1")
    try:
        _check_views(a.views)
        runs, skipped = find_runs(a.paths)
    except EvaluateError as e:
        print(f"nondet_hpc.evaluate: error: {e}", file=sys.stderr)
        return 2
    for d, why in skipped:
        print(f"[evaluate] {d.name}: skipped: {why}")
    failed = 0
    for rd in runs:
        try:
            evaluate_run(rd, a.views, features=a.features, force=a.force, batch_size=a.batch_size,
                         device=a.device, threads=a.threads, data_root=a.data_root, allow_factory=a.allow_factory)
        except ConfigError as e:
            failed += 1
            print(f"nondet_hpc.evaluate: error: {rd.name}: {e}", file=sys.stderr)
    print(f"[evaluate] {len(runs) - failed} run(s) evaluated, {failed} failed, {len(skipped)} not DONE.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
