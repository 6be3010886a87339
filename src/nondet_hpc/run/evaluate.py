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

from ..rundir import DONE, RunRecord, is_done, list_runs, read_json, run_lock, write_npy
from ..config import ConfigError
from .views import VIEWS

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
        if (p / "runs").is_dir() and not (p / "config.yaml").exists():
            found = list_runs(p)
            if not found:
                raise EvaluateError(f"{p} is a sweep folder without runs (nothing under {p / 'runs'}).")
            for d in found:
                if is_done(d):
                    runs.append(d)
                else:
                    skipped.append((d, f"not DONE (state: {_state(d)})"))
        elif (p / "config.yaml").exists() or (p / "run.json").exists():
            if not is_done(p):
                raise EvaluateError(
                    f"{p} is not a finished run (no {DONE} marker; run.json state: {_state(p)}). Only DONE runs "
                    f"can be evaluated: finish it first by rerunning its sweep command (it resumes from the "
                    f"checkpoint), see python -m nondet_hpc.status {p.parent.parent}.")
            runs.append(p)
        elif not p.exists():
            raise EvaluateError(f"{p} does not exist.")
        else:
            raise EvaluateError(f"{p} is neither a run folder (config.yaml, run.json, DONE) nor a sweep folder "
                                f"(runs/<run id>/).")
    return list(dict.fromkeys(runs)), skipped


def _state(run: Path) -> str:
    try:
        return str(read_json(run / "run.json").get("state", "unknown"))
    except (OSError, ValueError):
        return "unknown (no readable run.json)"


def _locked(run: Path):
    """The lock task.run holds while training: never write into a run another process writes."""
    return run_lock(run, lambda: EvaluateError(f"{run} is being written by another process (training or "
                                               f"evaluate); try again when it has finished."))


def evaluate_run(run: str | os.PathLike, views: Sequence[str], *, features: bool = False, force: bool = False,
                 batch_size: int | None = None, device: str = "auto", threads: int | None = None,
                 data_root: str | None = None, echo: Callable[[str], None] = print) -> dict:
    """Evaluate ``views`` (and features) of one DONE run from its checkpoint; see the module doc.

    Existing logits/<view>.npy and features.npy are kept (and reported as skipped) unless ``force``.
    Returns {"run_id", "written": [...], "skipped": [...], "plain_max_abs_diff": float | None}.
    """
    import torch
    from omegaconf import OmegaConf

    from .sources import configure_precision, fp32_flag_of
    from .task import resolve_device

    rd = Path(run)
    views = _check_views(views)
    if not is_done(rd):
        raise EvaluateError(f"{rd} is not a finished run (no {DONE} marker; state: {_state(rd)}). Only DONE "
                            f"runs can be evaluated.")
    rid = rd.name
    skipped: list[str] = []
    todo: list[str] = []
    for v in views:
        if (rd / "logits" / f"{v}.npy").exists() and not force:
            skipped.append(v)
            echo(f"[evaluate] {rid}: skipped {v}: logits/{v}.npy exists (--force recomputes it)")
        else:
            todo.append(v)
    want_features = features and (force or not (rd / "features.npy").exists())
    if features and not want_features:
        skipped.append("features")
        echo(f"[evaluate] {rid}: skipped features: features.npy exists (--force recomputes it)")
    if not todo and not want_features:
        return {"run_id": rid, "written": [], "skipped": skipped, "plain_max_abs_diff": None}

    cfg = OmegaConf.load(rd / "config.yaml")
    record = RunRecord(rd / "run.json")
    info = record.data
    if data_root is not None:
        cfg.data.root = data_root
    dev = resolve_device(device)
    # the fp32 flag training used (IEEE unless train.precision=tf32): views added now must be
    # computed with the same numerics as those written at the end of training
    configure_precision(fp32_flag_of(cfg.train), dev)
    trained_on = (info.get("device") or {}).get("type")
    if trained_on and trained_on != dev.type:
        echo(f"[evaluate] {rid}: note: trained on {trained_on}, evaluating on {dev.type}; the logits can differ "
             f"from what training would have written in the last bits.")
    channels_last = bool(info.get("channels_last", dev.type == "cuda")) if trained_on == dev.type \
        else dev.type == "cuda"
    bs = int(batch_size or cfg.eval.batch_size)
    # CPU results depend on the thread count: default to the count training ran with (run.json)
    n_threads = threads or (cfg.train.threads if cfg.train.threads > 0 else None) or info.get("threads")
    old_threads = torch.get_num_threads()
    if dev.type == "cpu" and n_threads:
        torch.set_num_threads(int(n_threads))
    try:
        return _evaluate_locked(rd, rid, cfg, record, dev, channels_last, bs, todo, want_features, skipped,
                                force, echo)
    finally:
        torch.set_num_threads(old_threads)


def _evaluate_locked(rd, rid, cfg, record, dev, channels_last, bs, todo, want_features, skipped, force, echo):
    import torch

    from .data import load_dataset
    from .models import model_from_config
    from .train import load_checkpoint_file
    from .views import evaluate_test_set

    with _locked(rd):
        # re-read under the lock: another evaluate may have finished since we looked
        record = RunRecord(rd / "run.json")
        info = record.data
        for v in [v for v in todo if not force and (rd / "logits" / f"{v}.npy").exists()]:
            todo.remove(v)
            skipped.append(v)
            echo(f"[evaluate] {rid}: skipped {v}: logits/{v}.npy was written meanwhile (--force recomputes it)")
        if not force and want_features and (rd / "features.npy").exists():
            want_features = False
            skipped.append("features")
        if not todo and not want_features:
            return {"run_id": rid, "written": [], "skipped": skipped, "plain_max_abs_diff": None}
        ckpt_path = rd / "checkpoint.pt"
        if not ckpt_path.exists():
            raise EvaluateError(f"{rd} has no checkpoint.pt (deleted to save space?): the model cannot be rebuilt.")
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
        model = model_from_config(cfg)
        model.load_state_dict(state["model"])
        model.to(device=dev, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        model.eval()
        # The same function task.py calls at the end of training: plain first, then the views in order.
        order = ["plain"] + [v for v in todo if v != "plain"]
        t0 = time.time()
        logits, feats = evaluate_test_set(model, data, cfg.data, order, batch_size=bs, device=dev,
                                          channels_last=channels_last, with_features=want_features)
        labels_path = rd / "labels.npy"
        if labels_path.exists():
            labels = np.load(labels_path, allow_pickle=False)
            if not np.array_equal(labels, data.test_y.cpu().numpy()):
                raise EvaluateError(f"{labels_path} differs from the test labels loaded now: wrong data set.")
        diff = None
        plain_path = rd / "logits" / "plain.npy"
        if plain_path.exists():
            old = np.load(plain_path, allow_pickle=False)
            diff = float(np.max(np.abs(old.astype(np.float64) - logits["plain"]))) if old.shape == logits["plain"].shape \
                else float("inf")
            if diff != 0.0:
                echo(f"[evaluate] {rid}: warning: recomputed plain logits differ from logits/plain.npy (max abs diff "
                     f"{diff:.3g}): other device, thread count or torch build than training. The new views are "
                     f"consistent with this evaluation, not bit-identical to training's.")
        written = []
        for v in todo:
            write_npy(rd / "logits" / f"{v}.npy", logits[v])
            written.append(v)
        if want_features and feats is not None:
            write_npy(rd / "features.npy", feats)
            written.append("features")
        listed = [str(v) for v in info.get("views", []) or []]
        new_views = listed + [v for v in todo if v not in listed]
        history = list(info.get("evaluations", []) or [])
        history.append({"time": time.time(), "written": written, "forced": bool(force), "device": dev.type,
                        "threads": torch.get_num_threads(), "batch_size": bs, "channels_last": channels_last,
                        "torch": torch.__version__, "host": socket.gethostname(),
                        "plain_max_abs_diff": diff, "eval_s": round(time.time() - t0, 3)})
        fields = {"views": new_views, "evaluations": history}
        if "features" in written:
            fields["features"] = True
        record.update(**fields)
    echo(f"[evaluate] {rid}: wrote {', '.join(written)}" + (f" (skipped {', '.join(skipped)})" if skipped else ""))
    return {"run_id": rid, "written": written, "skipped": skipped, "plain_max_abs_diff": diff}


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
                   help="folder holding the CIFAR data, if not the run's data.root (relative paths are from here)")
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
                         device=a.device, threads=a.threads, data_root=a.data_root)
        except ConfigError as e:
            failed += 1
            print(f"nondet_hpc.evaluate: error: {rd.name}: {e}", file=sys.stderr)
    print(f"[evaluate] {len(runs) - failed} run(s) evaluated, {failed} failed, {len(skipped)} not DONE.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
