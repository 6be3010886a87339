"""Training throughput: our input pipeline + ResNet-14 step against the usual PyTorch recipe.

Ours:      the training set as one uint8 tensor on the device, per-epoch permutation and batched
           crop+flip on tensors (nondet_hpc.data), channels_last on CUDA.
Reference: torchvision's CIFAR10 dataset with PIL transforms (RandomCrop(32, padding=4),
           RandomHorizontalFlip, ToTensor, Normalize) + DataLoader, the same model in NCHW.
Both train the same ResNet-14 at batch 512 on CIFAR-shaped data (random pixels written in the
real cifar-10-batches-py format) in this one process and print images/s and the ratio.

    python benchmarks/train_throughput.py                 # CPU here: a few steps each
    python benchmarks/train_throughput.py --device cuda --steps 60 --workers 4
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from nondet_hpc.run.data import augment_batch, draw_augment, epoch_order, normalize
from nondet_hpc.run.models import build_model, init_weights
from nondet_hpc.run.sources import make_generator
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
    model = build_model("resnet14", [16, 32, 64], [2, 2, 2], 10, 3, "A")
    init_weights(model, make_generator("init", 1))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=device, memory_format=fmt).train()
    opt = torch.optim.SGD(param_groups(model, 0.4, 0.1, 5e-4), lr=0.01, momentum=0.9)
    return model, opt, fmt


def step(model, opt, x, y) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours(ds, device, steps, warmup, batch) -> float:
    x_all = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))).to(device)
    y_all = torch.as_tensor(ds.targets, device=device)
    channels_last = device.type == "cuda"
    model, opt, fmt = make_model(device, channels_last)
    g_s, g_a = make_generator("shuffle", 1), make_generator("augment", 1)
    n, done, t0 = len(x_all), 0, None
    while done < warmup + steps:
        order = epoch_order(n, g_s).to(device)
        aug = draw_augment(n, 4, True, g_a)
        dy, dx, fl = aug.dy.to(device), aug.dx.to(device), aug.flip.to(device)
        for lo in range(0, n - batch + 1, batch):
            if done == warmup:
                sync(device)
                t0 = time.perf_counter()
            idx = order[lo:lo + batch]
            x = normalize(augment_batch(x_all[idx], dy[idx], dx[idx], fl[idx], 4), MEAN, STD).contiguous(memory_format=fmt)
            step(model, opt, x, y_all[idx])
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
            step(model, opt, x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            done += 1
            if done == warmup + steps:
                break
    sync(device)
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=6, help="timed steps of batch 512 per pipeline")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (cuDNN autotune, caches)")
    ap.add_argument("--images", type=int, default=10240, help="training images (CIFAR has 50,000)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference")
    ap.add_argument("--repeats", type=int, default=2, help="alternate the two pipelines this many times")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    ds = PILCifar(args.images)
    r_ours, r_ref = [], []
    for _ in range(args.repeats):  # alternate, so drift in machine load hits both alike
        r_ref.append(reference(ds, device, args.steps, args.warmup, 512, args.workers))
        r_ours.append(ours(ds, device, args.steps, args.warmup, 512))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; ResNet-14, batch 512, {args.steps} timed steps x {args.repeats}")
    print(f"reference (PIL transforms + DataLoader, {args.workers} workers, NCHW): "
          f"{np.median(r_ref):9.0f} images/s  (runs: {', '.join(f'{r:.0f}' for r in r_ref)})")
    print(f"nondet_hpc (uint8 tensor on device, batched aug{', channels_last' if device.type == 'cuda' else ''}): "
          f"{np.median(r_ours):9.0f} images/s  (runs: {', '.join(f'{r:.0f}' for r in r_ours)})")
    print(f"ratio ours / reference: {np.median(r_ours) / np.median(r_ref):.2f}x")


if __name__ == "__main__":
    main()
