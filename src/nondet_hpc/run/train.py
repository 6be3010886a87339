"""The training loop (docs/study.md, "Training" and "Accelerated ensembling").

SGD (momentum 0.9, weight decay 5e-4 on every parameter) with two parameter groups, one at the
peak ``lr`` (0.4) and one at ``lr * lr_scale_bias_bn`` (0.04); ``train.param_groups`` says which
parameter goes where (``param_groups``). The learning rate is set every iteration: a linear
warm-up from 0 while the epoch (a fraction) is <= ``warmup_epochs`` (inclusive, as the authors'
code), then ``0.5 * peak * (1 + cos(pi * e / E))`` with ``e`` the epoch as a fraction.
With ``snapshots = k > 1`` the same budget is split into k cycles of E/k epochs, each with its
own warm-up and cosine decay to 0, and every cycle ends with an evaluation (a snapshot).

Checkpoints hold the model, the optimizer, the position (epoch, batch) and the state of every
random stream at the start of the current epoch; resuming replays that epoch's draws and skips
the batches already done, so a resumed run is bit-identical to an uninterrupted one, whether it
stopped at an epoch boundary or mid-epoch (``request_stop``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from .data import Dataset, EpochImages, Normalize, epoch_augment, epoch_order, training_batches
from ..config import ConfigError
from .models import BasicBlock, ResNet
from .zoo import authors_small_lr_names
from .. import safeio
from .recorder import Recorder
from ..rundir import atomic_write, kept_checkpoint
from .sources import Streams
from .step import EagerStep, StepPlan, make_optimizer, make_scaler, make_step, plan_step

_STOP = threading.Event()


class Preempted(RuntimeError):
    """Raised by ``fit`` after it saved a checkpoint because ``request_stop`` was called."""


def request_stop() -> None:
    """Ask the running loop to checkpoint after the current iteration and raise Preempted.

    Only sets a flag, so it is safe inside a signal handler (SLURM's pre-timeout signal).
    """
    _STOP.set()


def clear_stop() -> None:
    _STOP.clear()


def lr_factor(epoch: float, epochs: int, snapshots: int, warmup: float) -> float:
    """Fraction of the peak LR at fractional epoch ``epoch`` (per-iteration schedule)."""
    cycle = epochs / snapshots
    e = epoch - cycle * min(int(epoch // cycle), snapshots - 1)  # position within its cycle
    # Inclusive, as the authors' `epoch <= warmup_epochs`: the step that lands exactly on the end of
    # the warm-up takes the full peak, not the (slightly lower) cosine value.
    if warmup > 0 and e <= warmup:
        return e / warmup
    return 0.5 * (1.0 + math.cos(math.pi * e / cycle))


PARAM_GROUP_RULES = ("authors", "by_type")

#: torch's global generator while a model trains. Random layers in a model's forward (dropout,
#: stochastic depth: a researcher's model) draw from it; ``fit`` forks it, seeded with this value at
#: the start of training (no source varies it, so the draws are the same in every run of a sweep),
#: keeps its state in every checkpoint (an exact resume) and leaves the caller's generator as it was.
FORWARD_SEED = 0


def forward_rng_state(device: torch.device) -> dict:
    """torch's global generator states (CPU, and the training device's on CUDA), for a checkpoint."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


@contextlib.contextmanager
def forward_rng(device: torch.device, state: Optional[dict]) -> Iterator[None]:
    """A fork of torch's global generators (CPU and ``device``), set to ``state`` (a checkpoint's)
    or seeded with FORWARD_SEED; the caller's generators are restored on exit."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        if state is None:
            torch.random.default_generator.manual_seed(FORWARD_SEED)
            if cuda:
                torch.cuda.manual_seed(FORWARD_SEED)
        else:
            torch.set_rng_state(state["cpu"].cpu())
            if cuda and "cuda" in state:
                torch.cuda.set_rng_state(state["cuda"].cpu(), device)
        yield


def small_lr_names(model: nn.Module, rule: str) -> set[str]:
    """Names of the parameters that train at peak * lr_scale_bias_bn under ``rule``.

    authors: the authors' code picks by NAME: "bias" in the name, or "bn" and "weight" in it
    (run/zoo ``authors_small_lr_names``), which is what every model but this package's own ResNet
    class gets: the authors' models carry their names, so the outcome is theirs, and a researcher's
    model gets what their code would give it. This package's ResNets (the "resnet" family: resnet14,
    resnet18b, resnet34) name the shortcut BN ``shortcut.bn`` / ``shortcut.1`` where the authors
    write ``downsample.1``, so for them the same outcome comes by module: every bias, and every BN
    scale outside a shortcut (the shortcut BN's scale trains at the full peak, its bias does not;
    tests/test_zoo_models.py compares the two on ResNet-14 tensor by tensor).
    by_type: every parameter that is not a conv or linear weight (all BN scales and biases).
    """
    if rule not in PARAM_GROUP_RULES:
        raise ConfigError(f"train.param_groups={rule!r}: valid values are {list(PARAM_GROUP_RULES)}.")
    if rule == "authors" and not isinstance(model, ResNet):
        return authors_small_lr_names(model)
    shortcut_bn = {id(m) for b in model.modules() if isinstance(b, BasicBlock)
                   for m in b.shortcut.modules() if isinstance(m, nn.BatchNorm2d)}
    small = set()
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            if rule == "authors":
                is_small = pname == "bias" or (isinstance(module, nn.BatchNorm2d) and id(module) not in shortcut_bn)
            else:
                is_small = not (pname == "weight" and isinstance(module, (nn.Conv2d, nn.Linear)))
            if is_small:
                small.add(f"{mname}.{pname}" if mname else pname)
    return small


def param_groups(model: nn.Module, lr: float, scale: float, weight_decay: float, rule: str) -> list[dict]:
    """The two SGD groups: [peak ``lr``, peak ``lr * scale``], split by ``small_lr_names(rule)``."""
    small = small_lr_names(model, rule)
    main = [p for n, p in model.named_parameters() if n not in small]
    rest = [p for n, p in model.named_parameters() if n in small]
    return [{"params": main, "peak_lr": lr, "lr": 0.0, "weight_decay": weight_decay},
            {"params": rest, "peak_lr": lr * scale, "lr": 0.0, "weight_decay": weight_decay}]


def load_checkpoint_file(path: Path, run_id: str, map_location: Any = "cpu") -> dict:
    """A checkpoint of run ``run_id``, loaded without executing anything from the file.

    ``weights_only=True`` admits tensors, numbers, strings and containers only, which is all this
    package writes (run folders are shared: a planted pickle must not run). The stored run id must
    be this run's: a checkpoint copied from another folder would make this run finish with the other
    run's model. Either refusal leaves every file as it is and says what to do.
    """
    path = Path(path)
    try:  # a regular file of bounded size, read from the checked descriptor (a FIFO would block)
        with safeio.RegularFile(path, safeio.MAX_CHECKPOINT) as rf, rf.fileobj() as f:
            state = torch.load(f, map_location=map_location, weights_only=True)
    except safeio.RefusedFile as e:
        raise ConfigError(f"{e}. Nothing was loaded or overwritten: move it away (the run then trains from "
                          f"scratch) or restore the run's own checkpoint.") from None
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ConfigError(f"{path} was refused: it is not a checkpoint this package wrote ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}). Nothing was loaded or overwritten. If the run should "
                          f"start over, move the file away; otherwise restore the run's own checkpoint.") from None
    return check_state(state, path, run_id)


def check_state(state: Any, path: Path, run_id: str) -> dict:
    """A loaded checkpoint's content, if it is run ``run_id``'s with a valid progress record."""
    stored = state.get("run_id") if isinstance(state, dict) else None
    if stored != run_id:
        raise ConfigError(f"{path} belongs to run {stored or '(no run id recorded)'}, not to {run_id}: it was copied "
                          f"or written by another version. Nothing was loaded or overwritten; move it away to "
                          f"train {run_id} from scratch.")
    progress = state.get("progress")
    if not isinstance(progress, dict) or set(progress) != set(PROGRESS_KEYS) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in progress.values()):
        shown = sorted(progress) if isinstance(progress, dict) else type(progress).__name__
        raise ConfigError(f"{path}: its progress record has {shown}, not the integer counts {list(PROGRESS_KEYS)} this "
                          f"version writes (written by another version, or edited). Nothing was loaded or "
                          f"overwritten: move it away to train {run_id} from scratch, or resume it with the version "
                          f"that wrote it.")
    return state


@dataclass
class Progress:
    epoch: int = 0  # epochs fully done
    batch: int = 0  # batches done within the current epoch
    step: int = 0  # optimizer steps done in total


PROGRESS_KEYS = tuple(f.name for f in dataclasses.fields(Progress))


class Trainer:
    """One model, one data set, one set of streams; ``fit`` runs (or resumes) to the end."""

    def __init__(self, model: nn.Module, data: Dataset, streams: Streams, tcfg, dcfg,
                 device: torch.device, checkpoint_path: Path, channels_last: Optional[bool] = None,
                 on_epoch: Optional[Callable[[dict], None]] = None,
                 on_snapshot: Optional[Callable[[int], None]] = None, run_id: str = "",
                 plan: Optional[StepPlan] = None, recorder: Optional[Recorder] = None,
                 trajectory_path: Optional[Path] = None, keep_epochs: Sequence[int] = ()):
        """``plan``: how the step runs (step.plan_step of tcfg, by default); ``channels_last``, when
        given, overrides the plan's memory format (callers that resolved it themselves).
        ``recorder``: records the trajectory (run/recorder.py) at its grid's steps, its state kept in
        every checkpoint and its file written to ``trajectory_path`` with each checkpoint.
        ``keep_epochs``: epochs at whose end the checkpoint is also kept as rundir.kept_checkpoint."""
        self.model, self.data, self.streams, self.t, self.d = model, data, streams, tcfg, dcfg
        self.device, self.checkpoint_path = device, Path(checkpoint_path)
        self.run_id = run_id  # stored in every checkpoint: a checkpoint of another run is refused
        plan = plan or plan_step(tcfg, device)
        if channels_last is not None and channels_last != plan.channels_last:
            plan = dataclasses.replace(plan, channels_last=bool(channels_last))
        self.plan = plan
        self.memory_format = torch.channels_last if plan.channels_last else torch.contiguous_format
        self.on_epoch, self.on_snapshot = on_epoch, on_snapshot
        self.recorder, self.trajectory_path = recorder, trajectory_path
        self.keep_epochs = frozenset(int(e) for e in keep_epochs)
        self.model.to(device=device, memory_format=self.memory_format)
        groups = param_groups(model, tcfg.lr, tcfg.lr_scale_bias_bn, tcfg.weight_decay, tcfg.param_groups)
        # What each group holds, for run.json: the rule, and tensors/values per peak LR.
        self.groups_record = {"rule": tcfg.param_groups, "groups": [
            {"peak_lr": g["peak_lr"], "tensors": len(g["params"]), "values": sum(p.numel() for p in g["params"])}
            for g in groups]}
        self.opt = make_optimizer(groups, tcfg.momentum, plan)
        self.scaler = make_scaler(plan, device)  # amp_fp16 only; checkpointed with the optimizer
        # Made once: per batch they would be host-to-device copies (blocking on CUDA).
        self.normalize = Normalize(dcfg.mean, dcfg.std, device)
        self.images = EpochImages(data.train_x, data.train_y, dcfg.pad, self.memory_format)
        self.n = len(data.train_x)
        self.batches = training_batches(self.n, tcfg.batch_size)
        self.steps = len(self.batches) * tcfg.epochs
        self.progress = Progress()
        self.epoch_streams = streams.state()  # stream states at the start of progress.epoch
        self.snapshots_done = 0
        self.elapsed = 0.0  # training seconds over all attempts
        self.lrs: list[float] = []  # each group's LR for the next step (set_lr)
        self.step: Optional[EagerStep] = None  # built by fit, after a checkpoint may have been loaded
        self.forward_rng: Optional[dict] = None  # the forward generators' state (FORWARD_SEED), from a checkpoint
        self.in_fit = False

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"run_id": self.run_id, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "progress": vars(self.progress).copy(), "epoch_streams": self.epoch_streams,
                "snapshots_done": self.snapshots_done, "elapsed": self.elapsed,
                "forward_rng": forward_rng_state(self.device) if self.in_fit else self.forward_rng,
                **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
                **({"recorder": self.recorder.state_dict()} if self.recorder is not None else {})}

    def save_checkpoint(self, keep: bool = False) -> None:
        """The checkpoint, then the trajectory so far (the checkpoint's recorder state is what a
        resume continues from; the file is rewritten from it at the next checkpoint). ``keep``:
        the same bytes also under rundir.kept_checkpoint for this epoch."""
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        data = buf.getvalue()
        atomic_write(self.checkpoint_path, lambda f: f.write(data))
        if keep:
            atomic_write(kept_checkpoint(self.checkpoint_path.parent, self.progress.epoch), lambda f: f.write(data))
        if self.recorder is not None and self.trajectory_path is not None:
            self.recorder.write(self.trajectory_path)

    def load_checkpoint(self) -> bool:
        if not os.path.lexists(self.checkpoint_path):
            return False
        state = load_checkpoint_file(self.checkpoint_path, self.run_id, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.progress = Progress(**state["progress"])
        self.epoch_streams = state["epoch_streams"]
        self.snapshots_done = state["snapshots_done"]
        self.elapsed = state["elapsed"]
        # absent in checkpoints of version 0.1.0, whose models drew nothing from it
        self.forward_rng = state.get("forward_rng")
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.recorder is not None:  # None in an older checkpoint: recording restarts, marked incomplete
            self.recorder.load_state_dict(state.get("recorder"))
            self.recorder.check_resumed(self.progress.step)
        return True

    def start_from(self, state: dict, streams_from_here: dict) -> None:
        """Go on from another run's training state (a parent's kept checkpoint at the end of an
        epoch, checked by the caller): model, optimizer, position, snapshots and forward generator
        as they were, every stream's state as at the start of that epoch except those in
        ``streams_from_here`` (stream name -> generator state), which start anew. Training time
        counts from here."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.progress = Progress(**state["progress"])
        self.epoch_streams = {**state["epoch_streams"], **streams_from_here}
        self.snapshots_done = state["snapshots_done"]
        self.elapsed = 0.0
        self.forward_rng = state.get("forward_rng")
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    # --- the loop ----------------------------------------------------------------------------
    def set_lr(self, step: int) -> float:
        """Fix each group's LR for ``step`` (the step object applies them) and return the peak LR."""
        f = lr_factor(step / len(self.batches), self.t.epochs, self.t.snapshots, self.t.warmup_epochs)
        self.lrs = [g["peak_lr"] * f for g in self.opt.param_groups]
        return f * self.t.lr

    def _batches(self, x_epoch: torch.Tensor, y_epoch: torch.Tensor, start: float) -> tuple[torch.Tensor, float]:
        """The rest of this epoch's batches; returns the summed loss (on the device) and the last LR.

        Nothing here reads a device value on the host or makes a tensor from Python data: an epoch
        synchronises once, when on_epoch reads the loss (tests/test_train_step.py, gpu_check.sh),
        and once more at each step the recorder's grid holds (one device-to-host copy per point).
        """
        p = self.progress
        loss_sum = torch.zeros((), device=self.device)
        lr = self.set_lr(p.step)
        for b in range(p.batch, len(self.batches)):
            lo, hi = self.batches[b]
            lr = self.set_lr(p.step)
            loss = self.step(x_epoch[lo:hi], y_epoch[lo:hi], self.lrs)
            loss_sum += loss * (hi - lo)
            p.batch, p.step = b + 1, p.step + 1
            if self.recorder is not None:  # the model after this step, before a stop checkpoints it
                self.recorder.maybe_record(p.step)
            if _STOP.is_set():
                self.elapsed += time.perf_counter() - start
                self.save_checkpoint()
                raise Preempted(f"stopped at epoch {p.epoch} batch {p.batch}; checkpoint saved")
        return loss_sum, lr

    def fit(self) -> None:
        """Train (or go on training) to the end; random layers draw from ``forward_rng``'s fork."""
        with forward_rng(self.device, self.forward_rng):
            self.in_fit = True
            try:
                self._fit()
            finally:
                self.in_fit = False
                self.forward_rng = forward_rng_state(self.device)

    def _fit(self) -> None:
        t, d, p = self.t, self.d, self.progress
        cycle = t.epochs // t.snapshots
        if self.step is None:  # after load_checkpoint: a captured graph holds the optimizer's tensors
            shape = (min(t.batch_size, self.n), *self.data.train_x.shape[1:])
            self.step = make_step(self.model, self.opt, self.normalize, self.plan, self.device, shape, self.scaler)
        self.model.train()
        if self.recorder is not None:
            self.recorder.maybe_record(p.step)  # step 0: the initial weights, after the bit change
        while p.epoch < t.epochs:
            start = time.perf_counter()
            # Replaying from the epoch's saved stream states makes a mid-epoch resume exact.
            self.streams.load_state(self.epoch_streams)
            order = epoch_order(self.n, self.streams.shuffle)
            # Indexed by position in this epoch's order (batch b uses entries lo:hi), whichever rule.
            aug = epoch_augment(order, d.pad, d.flip, d.augment_draw, self.streams.augment)
            # The whole epoch's crops/flips in one gather, in visiting order: a batch is a slice.
            x_epoch, y_epoch = self.images.epoch(order.to(self.device), aug)
            loss_sum, lr = self._batches(x_epoch, y_epoch, start)
            p.epoch, p.batch = p.epoch + 1, 0
            self.epoch_streams = self.streams.state()
            self.elapsed += time.perf_counter() - start
            if p.epoch % cycle == 0 and self.snapshots_done < p.epoch // cycle and self.on_snapshot:
                self.model.eval()
                self.on_snapshot(p.epoch // cycle)
                self.model.train()
                self.snapshots_done = p.epoch // cycle
            keep = p.epoch in self.keep_epochs
            if p.epoch % t.checkpoint_every == 0 or p.epoch == t.epochs or p.epoch % cycle == 0 or keep:
                self.save_checkpoint(keep)
            if self.on_epoch:
                self.on_epoch({"epoch": p.epoch, "epochs": t.epochs, "step": p.step, "steps": self.steps,
                               "train_loss": float(loss_sum) / self.n, "lr": lr, "time": time.time(),
                               "elapsed_s": round(self.elapsed, 3),
                               "epoch_s": round(time.perf_counter() - start, 3)})
        self.model.eval()
