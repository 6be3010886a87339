"""One job = one trained model: what every local job and every SLURM array task runs.

``run(cfg)`` checks the input, skips a finished run, resumes an interrupted one from its
checkpoint, trains, evaluates the configured views and writes the run directory of docs/contracts.md,
DONE last. It needs no Hydra runtime, so launchers can call it with a composed config.
"""

from __future__ import annotations

import errno
import os
import platform
import re
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .. import __version__, safeio
from ..config import RETIRED_KEYS, ConfigError, conf_dir, identity_items, threads_for
from ..registry.inputs import resolve_inputs
from ..registry.models import CUSTOM, MODELS, model_entry
from ..registry.sources import SOURCES
from ..rundir import (CHECKPOINT, CONFIG, DONE, FEATURES, LABELS, REPLACED, RUN_JSON, RUNS, TRAJECTORY, RunRecord,
                      group_key, is_done, logits_path, run_dir, run_id, run_lock, snapshot_view, write_json, write_npy,
                      write_text)
from ..sweep.parents import check_from_epoch, from_epoch, row_label
from ..viewspec import VIEWS
from .data import AUGMENT_DRAWS, DATASETS, Dataset, load_dataset, settings
from .cpuinfo import cpu_record
from .device import resolve_device
from .models import bitflip_target, model_for_run
from .parent import begin_child
from .recording import check_record, make_recorder, record_settings, write_records
from .sources import Streams, apply_bitflip, configure_kernels, precision_record, resolve_seeds
from .step import PRECISIONS, plan_step, tristate
from .train import PARAM_GROUP_RULES, Preempted, Trainer, clear_stop
from .views import evaluate_test_set

#: bytes the out_dir probe writes and syncs before training (a checkpoint of ResNet-14 is ~1 MiB)
PROBE_BYTES = 1 << 20

#: digits has 1,797 images of 10 classes; a stratified split needs each class on both sides.
DIGITS_TEST_SIZES = (10, 1787)

SLURM_ENV = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
             "SLURM_JOB_NODELIST", "SLURM_JOB_PARTITION", "SLURM_JOB_ACCOUNT")


# --- input checks ----------------------------------------------------------------------------
def check_groups_chosen(cfg) -> None:
    """``source=[]`` (an empty sweep list) leaves a config group unset: say so, not OmegaConf's
    'Missing mandatory value'."""
    registered = {"source": SOURCES, "model": MODELS}  # the other groups are folders of conf/
    for group, example in (("source", "source=init, or -m source=init,shuffle"), ("data", "data=digits"),
                           ("model", "model=resnet14")):
        missing = OmegaConf.is_missing(cfg, group) if isinstance(cfg, DictConfig) else cfg.get(group) == "???"
        if missing:
            names = registered[group] if group in registered else \
                [p.stem for p in (Path(conf_dir()) / group).glob("*.yaml")]
            options = ", ".join(sorted(names)) or f"the {group} options"
            raise ConfigError(f"no {group} chosen (an empty list such as {group}=[] selects none); choose one of "
                              f"{options}, e.g. {example}.")


def validate(cfg, *, check_device: bool = True) -> None:
    """Reject bad input before anything is written (messages name the key and the fix).

    ``check_device``: also check the device here (a GPU present, and kernels for it in this torch
    build), so a job on a wrong node fails before it creates its run folder. The SLURM launcher
    passes False: the submitting host is not the node the job will run on.
    """
    check_groups_chosen(cfg)
    model_entry(cfg.model.name)
    if cfg.data.name not in DATASETS:
        raise ConfigError(f"data.name={cfg.data.name!r} is unknown; valid: {list(DATASETS)} (choose with data=NAME).")
    resolve_seeds(list(cfg.source.vary), cfg.seed, cfg.source.deterministic_kernels)
    check_from_epoch(cfg)
    for key, new_key in RETIRED_KEYS.items():
        value = OmegaConf.select(cfg, key)
        if value is not None:
            raise ConfigError(f"{key}={value!r} was replaced by {new_key}: write e.g. train.precision=tf32 instead "
                              f"(docs/configuration.md).")
    if check_device:
        plan_step(cfg.train, resolve_device(cfg.train.device))  # refuses e.g. train.cuda_graph=true on a CPU
    _check_sizes(cfg)
    _check_choices(cfg)
    check_record(cfg)
    _probe_out_dir(cfg.out_dir)


def _check_sizes(cfg) -> None:
    """Counts and sizes: epochs, snapshot cycles, batches, threads, data subsets."""
    t = cfg.train
    if t.epochs < 1:
        raise ConfigError(f"train.epochs={t.epochs} is invalid: train for at least 1 epoch (paper: 500).")
    if t.snapshots < 1 or t.epochs % t.snapshots:
        raise ConfigError(f"train.snapshots={t.snapshots} must be >= 1 and divide train.epochs={t.epochs} "
                          f"(each snapshot cycle has the same length; paper: 5 cycles of 100 epochs).")
    if t.batch_size < 1 or t.checkpoint_every < 1:
        raise ConfigError("train.batch_size and train.checkpoint_every must be >= 1.")
    if cfg.eval.batch_size < 1:
        raise ConfigError(f"eval.batch_size={cfg.eval.batch_size} is invalid: images per forward pass must be "
                          f">= 1 (default 500).")
    threads_for(t.threads, local_default=torch.get_num_threads())  # refuses a negative count
    d = cfg.data
    for key in ("train_subset", "test_subset"):
        value = d.get(key)
        if value is not None and value < 1:
            raise ConfigError(f"data.{key}={value} is invalid: keep the first k >= 1 images, or null for all.")
    if d.name == "digits" and not DIGITS_TEST_SIZES[0] <= d.test_size <= DIGITS_TEST_SIZES[1]:
        raise ConfigError(f"data.test_size={d.test_size} is out of range for digits (1,797 images, 10 classes): "
                          f"choose {DIGITS_TEST_SIZES[0]}..{DIGITS_TEST_SIZES[1]} so both splits hold every class "
                          f"(default 497).")


def _check_choices(cfg) -> None:
    """Keys with a fixed set of values, and the evaluation views."""
    t = cfg.train
    for key, value, valid in (("train.param_groups", t.param_groups, PARAM_GROUP_RULES),
                              ("data.augment_draw", cfg.data.augment_draw, AUGMENT_DRAWS),
                              ("train.precision", t.precision, PRECISIONS)):
        if value not in valid:
            raise ConfigError(f"{key}={value!r}: valid values are {list(valid)} (docs/configuration.md).")
    tristate("train.channels_last", t.channels_last)
    tristate("train.cuda_graph", t.cuda_graph)
    bad = [v for v in cfg.eval.views if v not in VIEWS]
    if bad:
        raise ConfigError(f"eval.views has unknown view(s) {bad}; valid: {list(VIEWS)}.")


def _probe_out_dir(out_dir: str) -> None:
    """Write and sync real bytes under out_dir/runs/: an empty file can be created on a full disk.
    runs/ must be a real folder (safeio: a link there would send every run's files elsewhere)."""
    runs = Path(out_dir) / RUNS
    try:
        probe = safeio.make_dirs(runs, root=out_dir) / f".write-test-{os.getpid()}"
        try:
            with safeio.open_stream(probe, root=out_dir) as f:
                f.write(b"\0" * PROBE_BYTES)
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise ConfigError(f"out_dir={out_dir!r} is too long for the file system ({e.strerror}: a folder or "
                              f"file name below it would exceed the limit). Choose a shorter out_dir=PATH.") from None
        raise ConfigError(f"out_dir={out_dir!r} is not writable ({e.strerror}: {e.filename}). "
                          f"Choose a folder you can write with out_dir=PATH.") from e


# --- provenance ------------------------------------------------------------------------------
def _git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
                           capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def provenance(device: torch.device) -> dict:
    import torchvision

    info = {"host": socket.gethostname(), "pid": os.getpid(), "platform": platform.platform(),
            "threads": torch.get_num_threads(), "git_commit": _git_commit(),
            "cpu": cpu_record(),  # model and vector ISA: they decide CPU results with the thread count
            "versions": {"nondet_hpc": __version__, "python": sys.version.split()[0],
                         "torch": torch.__version__, "torchvision": torchvision.__version__,
                         "numpy": np.__version__, "cuda": torch.version.cuda,
                         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None},
            "device": {"type": device.type}}
    if device.type == "cuda":
        i = device.index or 0
        info["device"].update(name=torch.cuda.get_device_name(i),
                              capability=list(torch.cuda.get_device_capability(i)))
    slurm = {k: os.environ[k] for k in SLURM_ENV if k in os.environ}
    if slurm:
        info["slurm"] = slurm
    return info


# --- the job ---------------------------------------------------------------------------------
def _move_aside(path: Path) -> Path:
    """force=true: keep the finished run under runs/.replaced/ instead of deleting it."""
    dest = path.parent / REPLACED / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}"
    safeio.make_dirs(dest.parent)
    os.replace(path, dest)
    return dest


def _save_views(dest: Path, logits: dict[str, np.ndarray], snapshot: int | None = None) -> None:
    """logits/<view>.npy of each view; of snapshot cycle ``snapshot``'s model when given."""
    for view, arr in logits.items():
        write_npy(logits_path(dest, view if snapshot is None else snapshot_view(snapshot, view)), arr)


def _skipped(cfg: DictConfig, rd: Path, rid: str) -> dict:
    """A DONE run is never retrained; say which configured views it lacks and how to add them."""
    missing = [v for v in cfg.eval.views if not safeio.is_regular(logits_path(rd, v))]
    out = {"run_id": rid, "run_dir": str(rd), "state": "skipped (DONE)"}
    if missing:
        out["missing_views"] = missing
        print(f"[nondet_hpc] {rid} is DONE without the view(s) {', '.join(missing)}; it is not retrained. Add "
              f"them from its checkpoint with: python -m nondet_hpc.evaluate {rd} --views {' '.join(missing)}",
              flush=True)
    return out


def resolve_threads(cfg: DictConfig) -> None:
    """``train.threads=0`` -> the count torch uses in this process (its default, OMP_NUM_THREADS).

    On CPU the thread count changes results, so it is part of the run's identity: a run id never
    stands for two counts. The SLURM launcher resolves it with the same rule (config.threads_for)
    from cpus_per_task when it plans the sweep.
    """
    cfg.train.threads = threads_for(cfg.train.threads, local_default=torch.get_num_threads())


def run(cfg: DictConfig) -> dict:
    """Train (or skip, or resume) the run that ``cfg`` describes; return its id, folder and state."""
    clear_stop()  # a stop request from an earlier run of this process must not stop this one
    validate(cfg)
    resolve_threads(cfg)  # before the run id: the effective count is part of it
    resolve_inputs(cfg)  # so are a custom model's source and an npz/folder dataset's content
    rd = run_dir(cfg)
    rid = run_id(cfg)
    if is_done(rd) and not cfg.force:
        return _skipped(cfg, rd, rid)
    data = load_dataset(cfg.data)  # a bad data file is refused here, before anything is written
    if is_done(rd):
        moved = _move_aside(rd)
        print(f"[nondet_hpc] force=true: previous result of {rid} kept at {moved}", flush=True)
    safeio.make_dirs(rd)  # every folder below out_dir a real one, never a link (safeio)
    busy = lambda: ConfigError(f"{rd} is being trained by another process right now; wait for it "  # noqa: E731
                               f"(python -m nondet_hpc.status {rd.parent.parent}).")
    with run_lock(rd, busy):
        if is_done(rd):  # finished by another process while we waited for the lock
            return _skipped(cfg, rd, rid)
        # a link anywhere in the run folder (logits/ pointing at another run's) is refused before
        # training, not after minutes of it: nothing is written through it
        safeio.check_tree(rd)
        return _train(cfg, rd, rid, data)


#: PyTorch's message when an op has no deterministic implementation and determinism was asked for
_NONDET_OP = re.compile(r"^\s*(\S+) does not have a deterministic implementation")


def nondeterministic_op(e: BaseException) -> ConfigError | None:
    """PyTorch's error for an op without a deterministic implementation, as one message naming
    the op (None for any other error)."""
    m = _NONDET_OP.match(str(e)) if isinstance(e, RuntimeError) else None
    if m is None:
        return None
    return ConfigError(f"the model uses {m.group(1)}, which has no deterministic implementation on this device, so "
                       f"it cannot run with deterministic kernels (every source but cudnn, the control included). "
                       f"Replace that op in the model (docs/own_model.md names common ones and what to use instead), "
                       f"or study it with source=cudnn only.")


def _train(cfg: DictConfig, rd: Path, rid: str, data: Dataset) -> dict:
    """The run's record around the work: running, then done, preempted or failed (run.json)."""
    record = RunRecord(rd / RUN_JSON)
    try:
        try:
            return _train_recorded(cfg, rd, rid, record, data)
        except RuntimeError as e:
            clear = nondeterministic_op(e)
            if clear is None:
                raise
            raise clear from None
    except Preempted as e:
        record.update(state="preempted", preempted={"time": time.time(), "message": str(e)})
        raise
    except BaseException as e:
        record.update(state="failed", error={"type": type(e).__name__, "message": str(e),
                                             "traceback": traceback.format_exc(limit=20), "time": time.time()})
        raise


def _train_recorded(cfg: DictConfig, rd: Path, rid: str, record: RunRecord, data: Dataset) -> dict:
    """Set up, build, train (or resume), evaluate and write the run; ``record`` follows along."""
    t0 = time.time()
    device, seeds, plan = _start(cfg, rd, rid, record, t0)
    dcfg = settings(cfg.data, data)  # the data's shape, classes and normalisation where cfg.data leaves them
    used = OmegaConf.to_container(dcfg, resolve=True)
    record.update(data={**data.info, "used": {k: used[k] for k in ("num_classes", "channels", "image_size", "mean",
                                                                    "std", "pad", "flip")}})
    data = data.to(device)
    streams, model = _initial_model(cfg, seeds, record, data)
    views = ["plain"] + [v for v in cfg.eval.views if v != "plain"]

    def evaluate(with_features: bool):
        return evaluate_test_set(model, data, dcfg, views, batch_size=cfg.eval.batch_size, device=device,
                                 channels_last=plan.channels_last, with_features=with_features)

    last_snapshot: dict = {}

    def on_snapshot(k: int) -> None:
        if cfg.train.snapshots > 1:
            logits = evaluate(False)[0]
            _save_views(rd, logits, snapshot=k)
            if k == cfg.train.snapshots:  # the last cycle ends with the final model: reuse it
                last_snapshot.update(logits)

    recorder = make_recorder(cfg, model, data, data_cfg=dcfg, channels_last=plan.channels_last, run_id=rid)
    trainer = Trainer(model, data, streams, cfg.train, dcfg, device, rd / CHECKPOINT,
                      plan=plan, on_epoch=lambda hb: record.update(heartbeat=hb), on_snapshot=on_snapshot,
                      run_id=rid, recorder=recorder, trajectory_path=rd / TRAJECTORY,
                      keep_epochs=record_settings(cfg).keep_checkpoints)
    record.update(param_groups=trainer.groups_record)
    if trainer.load_checkpoint():
        record.update(resumed_from={"epoch": trainer.progress.epoch, "batch": trainer.progress.batch,
                                    "time": time.time()})
    elif from_epoch(cfg):  # the first k epochs are the parent's: its checkpoint, checked, then the bit change
        record.update(**begin_child(cfg, trainer, recorder, seeds))
    trainer.fit()
    t_eval = time.time()
    logits, features = (last_snapshot, None) if last_snapshot and not cfg.eval.features \
        else evaluate(cfg.eval.features)
    record.update(record=write_records(cfg, rd, rid, model, recorder, trainer.progress.step))
    return _finish(cfg, rd, rid, record, views, logits, features, data.test_y,
                   times=(t0, t_eval, trainer.elapsed))


def _start(cfg: DictConfig, rd: Path, rid: str, record: RunRecord, t0: float):
    """Set up the process (device, threads, kernels, precision), write config.yaml and the
    running record; return (device, seeds, step plan)."""
    attempts = record.data.get("attempts", 0) + 1
    device = resolve_device(cfg.train.device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    kernels = configure_kernels(cfg.source.deterministic_kernels, device)
    precision = precision_record(cfg.train.precision, device)
    seeds = resolve_seeds(list(cfg.source.vary), cfg.seed, cfg.source.deterministic_kernels)
    plan = plan_step(cfg.train, device)
    write_text(rd / CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    record.update(run_id=rid, state="running", attempts=attempts, seed=cfg.seed, experiment=cfg.experiment,
                  group_key=group_key(cfg), group_label=row_label(cfg.source.label, from_epoch(cfg)),
                  from_epoch=from_epoch(cfg), trained_epochs=int(cfg.train.epochs) - from_epoch(cfg),
                  identity={k: v for k, v in identity_items(cfg).items() if k != "seed"},
                  source=OmegaConf.to_container(cfg.source), seeds=seeds.as_dict(), kernels=kernels,
                  precision=precision, step=plan.record(), augment_draw=cfg.data.augment_draw,
                  channels_last=plan.channels_last, started=record.data.get("started", t0),
                  **provenance(device))
    return device, seeds, plan


def _initial_model(cfg: DictConfig, seeds, record: RunRecord, data: Dataset):
    """The run's streams and its model as training starts: initialised, bit change applied."""
    streams = Streams.from_seeds(seeds)
    shape = tuple(int(v) for v in data.train_x.shape[1:])
    model = model_for_run(cfg, shape, data.num_classes, streams.init)  # type: ignore[arg-type]
    target = bitflip_target(model, cfg)  # checked even without a bit change: a wrong name fails every run
    name = next(n for n, p in model.named_parameters() if p is target)
    info = {"name": cfg.model.name, "family": model_entry(cfg.model.name).family, "bitflip_param": name}
    if cfg.model.name == CUSTOM:
        from ..model_factory import factory_record  # torch-free; the identity resolve_inputs put in cfg

        info["factory"] = factory_record(cfg.model.factory, OmegaConf.to_container(cfg.model.kwargs))
    record.update(n_parameters=sum(p.numel() for p in model.parameters()), model=info)
    if from_epoch(cfg):  # the bit change comes at the start of epoch k (parent.begin_child): kept as recorded
        return streams, model
    bitflip = apply_bitflip(target, seeds.bitflip) if seeds.bitflip is not None else None
    if bitflip is not None:
        bitflip["param"] = name
    record.update(bitflip=bitflip)
    return streams, model


def _finish(cfg: DictConfig, rd: Path, rid: str, record: RunRecord, views: list[str], logits: dict, features,
            test_y: torch.Tensor, times: tuple[float, float, float]) -> dict:
    """Write the final views, features and labels, the done record, and DONE last.

    ``times``: (start of the attempt, start of the final evaluation, training seconds)."""
    t0, t_eval, train_s = times
    _save_views(rd, logits)
    if features is not None:
        write_npy(rd / FEATURES, features)
    labels = test_y.cpu().numpy().astype(np.int64)
    write_npy(rd / LABELS, labels)
    plain = torch.from_numpy(logits["plain"]).double()
    y = torch.from_numpy(labels)
    result = {"test_acc": float((plain.argmax(1) == y).double().mean()),
              "test_ce": float(torch.nn.functional.cross_entropy(plain, y))}
    snapshots = cfg.train.snapshots
    record.update(state="done", result=result, views=views,
                  snapshots=[snapshot_view(k) for k in range(1, snapshots + 1)] if snapshots > 1 else [],
                  features=features is not None,
                  timings={"train_s": round(train_s, 3), "eval_s": round(time.time() - t_eval, 3),
                           "wall_s_this_attempt": round(time.time() - t0, 3)},
                  finished=time.time())
    write_json(rd / DONE, {"run_id": rid, "finished": time.time()})  # last: marks the run complete
    return {"run_id": rid, "run_dir": str(rd), "state": "done", **result}
