"""Time ``evaluate_views`` (all six TTA views, batched) against a naive per-view loop.

The naive loop is what a direct reading of docs/study.md ("Test-time augmentation") gives: for each
view, for each of its transforms, pad-normalise-crop the test set and run one forward per batch,
so all six views cost 1+2+26+82+51+163 = 325 passes over the test set; ``evaluate_views`` runs the
162 distinct transforms once. Usage: ``PYTHONPATH=src python benchmarks/tta_views.py [--n 2000]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nondet_hpc.run.views import evaluate_views
from nondet_hpc.viewspec import VIEWS, view_transforms

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)


class SmallNet(nn.Module):
    """A small CIFAR conv net with the package's model API (forward_features + fc)."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


@torch.no_grad()
def naive(model: nn.Module, u8: torch.Tensor, batch_size: int, device: torch.device
          ) -> dict[str, np.ndarray]:
    model.eval()
    m = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    s = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    h, w = u8.shape[2:]
    out = {}
    for v in VIEWS:
        ts = view_transforms(v)
        parts = []
        for i in range(0, len(u8), batch_size):
            x = u8[i : i + batch_size].to(device).float() / 255
            total = 0.0
            for flip, dy, dx in ts:
                t = F.pad(torch.flip(x, dims=[3]) if flip else x, (4, 4, 4, 4))
                total = total + model(((t - m) / s)[:, :, dy : dy + h, dx : dx + w]).double()
            parts.append((total / len(ts)).float().cpu())
        out[v] = torch.cat(parts).numpy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="number of random CIFAR-shaped test images")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--width", type=int, default=8, help="channels of the first conv")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = SmallNet(args.width).to(dev)
    u8 = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8)

    def timed(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return r, time.perf_counter() - t0

    evaluate_views(model, u8[:64], None, MEAN, STD, ["plain"], device=dev)  # warm-up
    fast, t_fast = timed(lambda: evaluate_views(model, u8, None, MEAN, STD, list(VIEWS),
                                                batch_size=args.batch_size, device=dev)[0])
    slow, t_slow = timed(lambda: naive(model, u8, args.batch_size, dev))
    diff = max(float(np.abs(fast[v] - slow[v]).max()) for v in VIEWS)
    print(f"device={dev} threads={torch.get_num_threads()} n={args.n} batch_size={args.batch_size} "
          f"torch={torch.__version__}")
    print(f"evaluate_views (6 views, 162 transforms): {t_fast:8.2f} s")
    print(f"naive per-view loop (325 transforms):     {t_slow:8.2f} s")
    print(f"ratio naive / batched: {t_slow / t_fast:.2f}x   max |logit diff| = {diff:.2e}")


if __name__ == "__main__":
    main()
