"""Images/s of the ResNet-14 training step in each mode of train.precision / channels_last / cuda_graph.

Every mode runs the package's own step (nondet_hpc.run.step, as the Trainer builds it) on the same
CIFAR-shaped batch, under the study's deterministic kernel settings (cudnn.benchmark off,
deterministic algorithms), in this one process; the JSON has images/s per mode and each mode's
ratio to fp32 NCHW. Used by gpu_check.sh; on its own:

    python benchmarks/step_modes.py --device cuda --steps 50 --json step_modes.json
    python benchmarks/step_modes.py --device cpu --steps 2 --batch 64   # the CPU smoke
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nondet_hpc.run.data import Normalize
from nondet_hpc.run.models import build_model, init_weights
from nondet_hpc.run.sources import configure_kernels, configure_precision, make_generator
from nondet_hpc.run.step import AUTOCAST_DTYPE, FP32_FLAG, StepPlan, make_optimizer, make_scaler, make_step
from nondet_hpc.run.train import param_groups

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
#: name: (precision, channels_last, cuda_graph). graph is fp32 NCHW captured.
MODES = {"fp32_nchw": ("fp32", False, False), "fp32_nhwc": ("fp32", True, False), "tf32": ("tf32", False, False),
         "amp_fp16": ("amp_fp16", True, False), "amp_bf16": ("amp_bf16", True, False),
         "graph": ("fp32", False, True)}


def time_mode(name: str, device: torch.device, batch: int, steps: int, warmup: int) -> dict:
    precision, channels_last, graph = MODES[name]
    if graph and device.type != "cuda":
        return {"skipped": "needs CUDA (CUDA graphs do not exist on CPU)"}
    configure_precision(FP32_FLAG[precision], device)
    plan = StepPlan(precision=precision, autocast_dtype=AUTOCAST_DTYPE.get(precision),
                    grad_scaler=precision == "amp_fp16", channels_last=channels_last, cuda_graph=graph,
                    static=graph or precision == "amp_fp16")
    model = build_model("resnet14", 10, 3)
    init_weights(model, make_generator("init", 1))
    model.to(device=device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).train()
    opt = make_optimizer(param_groups(model, 0.4, 0.1, 5e-4, "authors"), 0.9, plan)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    step = make_step(model, opt, Normalize(MEAN, STD, device), plan, device, tuple(x.shape), make_scaler(plan, device))
    lrs = [0.01, 0.001]
    for _ in range(warmup):  # graph: warm-up steps, then capture on the first step after them
        step(x, y, lrs)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    losses = [step(x, y, lrs) for _ in range(steps)]
    sync()
    dt = time.perf_counter() - t0
    loss = torch.stack(losses).float()
    return {"precision": precision, "channels_last": channels_last, "cuda_graph": graph, "batch": batch,
            "steps": steps, "seconds": round(dt, 4), "images_per_s": round(steps * batch / dt, 1),
            "finite_loss": bool(torch.isfinite(loss).all())}


def run(device: torch.device, batch: int, steps: int, warmup: int) -> dict:
    configure_kernels(True, device)  # the study's settings: deterministic kernels, no autotuning
    out = {name: time_mode(name, device, batch, steps, warmup) for name in MODES}
    ref = out["fp32_nchw"]["images_per_s"]
    for r in out.values():
        if "images_per_s" in r:
            r["ratio_to_fp32_nchw"] = round(r["images_per_s"] / ref, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (graph capture happens after 3)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    res = run(torch.device(args.device), args.batch, args.steps, args.warmup)
    for name, r in res.items():
        print(f"{name:10s} " + (f"{r['images_per_s']:10.0f} images/s  x{r['ratio_to_fp32_nchw']:.2f} of fp32 NCHW"
                                if "images_per_s" in r else r["skipped"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
