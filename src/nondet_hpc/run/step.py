"""One optimizer step of the training loop, in the form the run's settings ask for.

``plan_step`` turns ``train.precision``, ``train.channels_last`` and ``train.cuda_graph`` into a
``StepPlan`` for the device (refusing what the device cannot do, with the key to change), and
``make_step`` builds the callable the Trainer runs once per batch:

- ``EagerStep``: the step as the study always ran it (torch's SGD with a Python-float LR; foreach
  kernels on CUDA, the per-tensor loop on CPU). With ``precision=fp32`` it is bit-identical to the
  code before this module existed (tests/test_train_step.py runs the old step to check).
- ``StaticStep``: every tensor the step touches keeps its address (a static uint8 input buffer,
  the LR of each parameter group as a device tensor, SGD's fused kernel, which takes a tensor LR
  without reading it on the host), so the full-size step can be captured once in a CUDA graph and
  replayed. The short last batch of an epoch runs the same operations eagerly. ``capture=False``
  runs every step eagerly with the same kernels: the reference the graph is compared with.

Nothing in either step reads a device value on the host, so an epoch has no host-device
synchronisation until the per-epoch loss is read (checked on CUDA by gpu_check.sh with
``torch.cuda.set_sync_debug_mode("error")``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError

#: train.precision values. fp32 = IEEE float32 everywhere (the protocol); tf32 = float32 storage
#: with TensorFloat-32 convolutions/matmuls (Ampere+); amp_* = autocast mixed precision.
PRECISIONS = ("fp32", "tf32", "amp_fp16", "amp_bf16")
#: The fp32 backend flag (sources.configure_precision) each precision sets: ops outside autocast
#: (and every op of fp32) stay IEEE unless the precision is tf32.
FP32_FLAG = {"fp32": "ieee", "tf32": "tf32", "amp_fp16": "ieee", "amp_bf16": "ieee"}
AUTOCAST_DTYPE = {"amp_fp16": torch.float16, "amp_bf16": torch.bfloat16}
TRISTATE = ("auto", "true", "false")
#: what train.cuda_graph=auto resolves to: off until gpu_check.sh measured graph replay bit-identical to
#: the eager step and faster on a GPU (docs/performance.md, "auto"); run.json ``step`` records it
AUTO_CUDA_GRAPH = False


def tristate(key: str, value) -> str:
    """auto/true/false from YAML or the command line (which may hand over a bool)."""
    v = str(value).lower()
    if v not in TRISTATE:
        raise ConfigError(f"{key}={value!r}: valid values are auto, true, false (docs/configuration.md).")
    return v


def check_precision(value: str) -> str:
    if value not in PRECISIONS:
        raise ConfigError(f"train.precision={value!r}: valid values are {list(PRECISIONS)} (fp32 = IEEE float32, "
                          f"the protocol; docs/performance.md says what each does).")
    return value


@dataclass(frozen=True)
class StepPlan:
    precision: str
    autocast_dtype: Optional[torch.dtype]  # None: no autocast
    grad_scaler: bool  # amp_fp16: loss scaling (torch.amp.GradScaler)
    channels_last: bool
    cuda_graph: bool
    static: bool  # StaticStep (fused SGD, tensor LR) instead of EagerStep

    def record(self) -> dict:
        """What run.json stores under ``step``: the settings as resolved on this device."""
        return {"precision": self.precision,
                "autocast": str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else None,
                "grad_scaler": self.grad_scaler, "channels_last": self.channels_last,
                "cuda_graph": self.cuda_graph,
                "optimizer_kernel": "fused (tensor LR)" if self.static else "torch default (float LR)"}


def plan_step(tcfg, device: torch.device) -> StepPlan:
    """Resolve precision, memory format and graph capture for ``device``; refuse the impossible.

    channels_last auto: NCHW for fp32/tf32 everywhere and on CPU; channels_last for amp on CUDA
    (tensor-core convolutions want NHWC). Not yet measured on a GPU by this project: gpu_check.sh
    times both formats per precision, and the rule should follow its figures.
    cuda_graph auto: off everywhere until a GPU measurement (benchmarks/gpu_check.sh) shows graph
    replay bit-identical to the eager step and faster (docs/performance.md says what turns it on);
    true captures the full-size step (not with amp_fp16: GradScaler's step is not captured here).
    """
    precision = check_precision(str(tcfg.precision))
    cuda = device.type == "cuda"
    cl = tristate("train.channels_last", tcfg.channels_last)
    channels_last = (cuda and precision.startswith("amp_")) if cl == "auto" else cl == "true"
    graph = tristate("train.cuda_graph", tcfg.cuda_graph)
    if graph == "true" and not cuda:
        raise ConfigError(f"train.cuda_graph=true needs a CUDA device, but train.device={tcfg.device} resolves to "
                          f"{device.type}: CUDA graphs do not exist on CPU. Use train.cuda_graph=auto (off on CPU) "
                          f"or false.")
    if graph == "true" and precision == "amp_fp16":
        raise ConfigError("train.cuda_graph=true with train.precision=amp_fp16 is not supported (the loss scaler's "
                          "step is not captured). Use train.cuda_graph=false (or auto), or train.precision=amp_bf16, "
                          "which needs no loss scaling.")
    use_graph = graph == "true" or (graph == "auto" and AUTO_CUDA_GRAPH and cuda and precision != "amp_fp16")
    return StepPlan(precision=precision, autocast_dtype=AUTOCAST_DTYPE.get(precision),
                    grad_scaler=precision == "amp_fp16", channels_last=channels_last, cuda_graph=use_graph,
                    static=use_graph or precision == "amp_fp16")


def make_optimizer(groups: list[dict], momentum: float, plan: StepPlan) -> torch.optim.SGD:
    """torch's SGD: its default kernels for EagerStep, the fused kernel for StaticStep.

    The fused kernel takes the LR as a tensor and the loss scaler's found-inf flag on the device,
    so neither needs a host read per step.
    """
    if plan.static:
        return torch.optim.SGD(groups, lr=0.0, momentum=momentum, fused=True)
    return torch.optim.SGD(groups, lr=0.0, momentum=momentum)


def _autocast(plan: StepPlan, device: torch.device):
    if plan.autocast_dtype is None:
        return contextlib.nullcontext()
    # No weight-cast cache: a cache filled during graph capture would hold stale casts on replay.
    return torch.autocast(device.type, dtype=plan.autocast_dtype, cache_enabled=False)


Normalizer = Callable[[torch.Tensor], torch.Tensor]


class EagerStep:
    """The step as the study ran it: Python-float LR per group, torch's default SGD kernels."""

    def __init__(self, model: nn.Module, opt: torch.optim.SGD, normalize: Normalizer, plan: StepPlan,
                 device: torch.device, scaler: Optional[torch.amp.GradScaler] = None):
        if plan.grad_scaler and scaler is None:
            raise ValueError("amp_fp16 needs the Trainer's GradScaler (its state is checkpointed)")
        self.model, self.opt, self.normalize, self.plan, self.device = model, opt, normalize, plan, device
        self.fmt = torch.channels_last if plan.channels_last else torch.contiguous_format
        self.scaler = scaler

    def set_lr(self, lrs: list[float]) -> None:
        for g, lr in zip(self.opt.param_groups, lrs):
            g["lr"] = lr

    def _body(self, x_u8: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Normalise, forward, backward, SGD step (gradients must be None or the graph's own)."""
        x = self.normalize(x_u8).contiguous(memory_format=self.fmt)
        with _autocast(self.plan, self.device):
            loss = F.cross_entropy(self.model(x), y)
        if self.scaler is None:
            loss.backward()
            self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        return loss.detach()

    def _eager(self, x_u8: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        return self._body(x_u8, y)

    def __call__(self, x_u8: torch.Tensor, y: torch.Tensor, lrs: list[float]) -> torch.Tensor:
        self.set_lr(lrs)
        return self._eager(x_u8, y)


class StaticStep(EagerStep):
    """Fused SGD with device-tensor LRs; full batches captured in one CUDA graph when ``capture``.

    Capture happens at the first full batch after ``warmup`` eager full-size steps (run on a side
    stream, as CUDA graphs require, and real training steps: capture itself computes nothing).
    It must happen after any checkpoint was loaded, since the graph holds the addresses of the
    parameters, the momentum buffers and the LR tensors; the Trainer builds the step lazily.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.SGD, normalize: Normalizer, plan: StepPlan,
                 device: torch.device, batch_shape: tuple[int, ...], capture: bool, warmup: int = 3,
                 scaler: Optional[torch.amp.GradScaler] = None):
        super().__init__(model, opt, normalize, plan, device, scaler)
        if capture and device.type != "cuda":
            raise ConfigError("a captured step needs a CUDA device (train.cuda_graph=true on CPU)")
        self.capture, self.warmup, self.batch_shape = capture, warmup, tuple(batch_shape)
        # One float32 LR tensor per group, on the device; the fused kernel reads it there.
        self.lr_t = [torch.zeros((), dtype=torch.float32, device=device) for _ in opt.param_groups]
        for g, t in zip(opt.param_groups, self.lr_t):
            g["lr"] = t  # also after a checkpoint load, which puts the saved value back
        self.static_x = torch.zeros(self.batch_shape, dtype=torch.uint8, device=device).contiguous(
            memory_format=self.fmt)
        self.static_y = torch.zeros(self.batch_shape[0], dtype=torch.int64, device=device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_loss: Optional[torch.Tensor] = None
        self.full_steps = 0  # full-size steps run so far in this process (warm-up counter)
        self.replays = 0

    def set_lr(self, lrs: list[float]) -> None:
        for t, lr in zip(self.lr_t, lrs):
            t.fill_(lr)  # a device kernel with the value as argument: no host read

    def __call__(self, x_u8: torch.Tensor, y: torch.Tensor, lrs: list[float]) -> torch.Tensor:
        self.set_lr(lrs)
        if tuple(x_u8.shape) != self.batch_shape or not self.capture:
            return self._eager(x_u8, y)  # the short last batch, or capture=False
        self.static_x.copy_(x_u8)
        self.static_y.copy_(y)
        if self.graph is None and self.full_steps < self.warmup:
            self.full_steps += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                loss = self._eager(self.static_x, self.static_y)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return loss
        if self.graph is None:
            self.opt.zero_grad(set_to_none=True)  # grads are then allocated from the graph's pool
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_loss = self._body(self.static_x, self.static_y)
        self.graph.replay()
        self.replays += 1
        return self.static_loss.clone()  # the next replay overwrites static_loss


def make_scaler(plan: StepPlan, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """amp_fp16's loss scaler (torch's defaults: initial scale 2**16, growth every 2000 steps)."""
    return torch.amp.GradScaler(device.type) if plan.grad_scaler else None


def make_step(model: nn.Module, opt: torch.optim.SGD, normalize: Normalizer, plan: StepPlan,
              device: torch.device, batch_shape: tuple[int, ...],
              scaler: Optional[torch.amp.GradScaler] = None) -> EagerStep:
    if plan.static:
        return StaticStep(model, opt, normalize, plan, device, batch_shape, capture=plan.cuda_graph, scaler=scaler)
    return EagerStep(model, opt, normalize, plan, device, scaler)
