"""Training throughput of ResNet-14 at batch 512, two separate comparisons in one process.

pipeline:      our input pipeline against the usual PyTorch recipe, the same model in NCHW fp32:
  ours       - the training set as one uint8 tensor on the device, padded once; each epoch's
               permutation and crops/flips in one gather (nondet_hpc.run.data.EpochImages), a batch
               is a slice; normalisation with tensors made once; the Trainer's step.
  reference  - torchvision PIL transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor,
               Normalize) + DataLoader, on the same images held in memory.
memory-format: our pipeline with NCHW against channels_last activations (same step otherwise).

Default kernel settings are the study's (cudnn.benchmark off, deterministic algorithms:
sources.configure_kernels(True)); --cudnn-benchmark measures the nondeterministic setting instead.
The two sides of each comparison alternate --repeats times, so drift in machine load hits both;
each line prints the median images/s and the ratio to its reference. Step modes per precision and
graph capture: benchmarks/step_modes.py.

    python benchmarks/train_throughput.py                       # CPU here: a few steps each
    python benchmarks/train_throughput.py --device cuda --steps 60 --workers 4
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from nondet_hpc.run.data import EpochImages, Normalize, draw_augment, epoch_order
from nondet_hpc.run.models import build_model, init_weights
from nondet_hpc.run.sources import configure_kernels, make_generator
from nondet_hpc.run.step import StepPlan, make_optimizer, make_step
from nondet_hpc.run.train import param_groups

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


class PILCifar(torch.utils.data.Dataset):
    """What torchvision's CIFAR dataset does per item (HWC uint8 -> PIL image -> transform), on
    random images held in memory: the reference pipeline's cost without needing the real files."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(0)
        self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = rng.integers(0, 10, n).tolist()
        self.transform = None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def make_model(device, channels_last: bool):
    model = build_model("resnet14", 10, 3)
    init_weights(model, make_generator("init", 1))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=device, memory_format=fmt).train()
    plan = StepPlan("fp32", None, False, channels_last, False, False)
    opt = make_optimizer(param_groups(model, 0.4, 0.1, 5e-4, "authors"), 0.9, plan)
    return model, opt, plan


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours(ds, device, steps, warmup, batch, channels_last: bool) -> float:
    x_all = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))).to(device)
    y_all = torch.as_tensor(ds.targets, device=device)
    model, opt, plan = make_model(device, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = EpochImages(x_all, y_all, 4, fmt)
    step = make_step(model, opt, Normalize(MEAN, STD, device), plan, device, (batch, 3, 32, 32))
    g_s, g_a = make_generator("shuffle", 1), make_generator("augment", 1)
    n, done, t0 = len(x_all), 0, None
    while done < warmup + steps:
        order = epoch_order(n, g_s)
        xe, ye = images.epoch(order.to(device), draw_augment(n, 4, True, g_a))
        for lo in range(0, n - batch + 1, batch):
            if done == warmup:
                sync(device)
                t0 = time.perf_counter()
            step(xe[lo:lo + batch], ye[lo:lo + batch], [0.01, 0.001])
            done += 1
            if done == warmup + steps:
                break
    sync(device)
    return steps * batch / (time.perf_counter() - t0)


def reference(ds, device, steps, warmup, batch, workers) -> float:
    import torchvision.transforms as T

    ds.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                              T.Normalize(MEAN, STD)])
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)
    model, opt, _ = make_model(device, channels_last=False)
    done, t0 = 0, None
    while done < warmup + steps:
        for x, y in loader:
            if done == warmup:
                sync(device)
                t0 = time.perf_counter()
            loss = F.cross_entropy(model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == warmup + steps:
                break
    sync(device)
    return steps * batch / (time.perf_counter() - t0)


def compare(label_ref: str, ref, label_new: str, new, repeats: int) -> None:
    r_ref, r_new = [], []
    for _ in range(repeats):  # alternate, so drift in machine load hits both alike
        r_ref.append(ref())
        r_new.append(new())
    print(f"  {label_ref:58s} {np.median(r_ref):8.0f} images/s  (runs: {', '.join(f'{r:.0f}' for r in r_ref)})")
    print(f"  {label_new:58s} {np.median(r_new):8.0f} images/s  (runs: {', '.join(f'{r:.0f}' for r in r_new)})")
    print(f"  ratio: {np.median(r_new) / np.median(r_ref):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=6, help="timed steps of batch 512 per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (caches, allocator)")
    ap.add_argument("--images", type=int, default=10240, help="training images (CIFAR has 50,000)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference")
    ap.add_argument("--repeats", type=int, default=2, help="alternate the two sides this many times")
    ap.add_argument("--compare", choices=["pipeline", "memory-format", "both"], default="both")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="autotuned, nondeterministic kernels instead of the study's deterministic ones")
    args = ap.parse_args()
    device = torch.device(args.device)
    kernels = configure_kernels(not args.cudnn_benchmark, device)
    ds = PILCifar(args.images)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; ResNet-14, batch 512, {args.steps} timed steps x "
          f"{args.repeats}; cudnn.benchmark={kernels['cudnn.benchmark']}, deterministic={kernels['deterministic']}")
    a = (ds, device, args.steps, args.warmup, 512)
    if args.compare in ("pipeline", "both"):
        print("pipeline (both NCHW fp32):")
        compare(f"reference: PIL transforms + DataLoader ({args.workers} workers)",
                lambda: reference(*a, args.workers), "nondet_hpc: uint8 on device, one gather per epoch",
                lambda: ours(*a, channels_last=False), args.repeats)
    if args.compare in ("memory-format", "both"):
        print("memory format (our pipeline, fp32):")
        compare("NCHW", lambda: ours(*a, channels_last=False), "channels_last",
                lambda: ours(*a, channels_last=True), args.repeats)


if __name__ == "__main__":
    main()
