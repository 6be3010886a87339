"""Test-time-augmentation (TTA) views, evaluated batched.

docs/study.md "Test-time augmentation": a view is a set of transformed copies of each test image whose
logits are averaged; the un-augmented image is always one of them.

    plain        original                                       1 view
    flip         original + horizontal flip                     2 views
    crop25       original + crops at offsets {0,2,4,6,8}^2      26 views
    crop81       original + crops at offsets {0..8}^2           82 views
    flip-crop25  original + crop25 crops of image and of flip   51 views
    flip-crop81  original + crop81 crops of image and of flip   163 views

Crops are taken from the image padded by ``pad`` (4) on every side with a black pixel (raw value
0, i.e. ``(0 - mean_c) / std_c`` after normalisation) and keep the image's own size H x W.

A transform is ``(flip, dy, dx)``: horizontally flip the image if ``flip``, pad it, and take the
H x W window whose top-left corner is at row ``dy``, column ``dx`` of the padded image. So
``(False, pad, pad)`` is the original and ``(True, pad, pad)`` its flip. The crop at offset
(pad, pad) equals the original, yet the original still counts as an extra view (the study's code
does this; it keeps the counts 26/82/51/163), so it carries weight 2 in the crop views.

``evaluate_views`` runs each distinct transform of the requested views once and adds its logits,
with its weight, into every view that uses it: all six views cost 162 transforms, not 325.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .data import normalize
from ..viewspec import VIEWS, Transform, _check_name, _check_pad, view_count, view_transforms

__all__ = [
    "VIEWS",
    "Transform",
    "view_count",
    "view_transforms",
    "pad_black",
    "crop_batch",
    "evaluate_views",
    "evaluate_test_set",
]

def pad_black(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], pad: int = 4
) -> torch.Tensor:
    """Pad a normalised batch [B, C, H, W] by ``pad`` on each side with the normalised black pixel.

    The fill is ``normalize`` of a raw 0, so it is exactly what padding the raw image with 0 and
    normalising afterwards gives: the black padding of docs/study.md, "Test-time augmentation".
    """
    _check_pad(pad)
    b, c, h, w = x.shape
    fill = normalize(torch.zeros(1, c, 1, 1, dtype=torch.uint8, device=x.device), mean, std)
    out = fill.to(x.dtype).expand(b, c, h + 2 * pad, w + 2 * pad).contiguous()
    out[:, :, pad : pad + h, pad : pad + w] = x
    return out


def crop_batch(
    padded: torch.Tensor,
    transforms: Sequence[Transform],
    height: int,
    width: int,
    flipped: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stack the transformed images, transform-major: rows ``[j*B, (j+1)*B)`` are transform j.

    ``padded`` is ``pad_black`` output [B, C, H+2p, W+2p]; ``flipped`` is ``padded.flip(3)``
    (computed here if needed and not given). Flipping the padded image equals padding the flipped
    image because the padding is symmetric, so both come from one padded batch.
    """
    max_dy, max_dx = padded.shape[2] - height, padded.shape[3] - width
    if flipped is None and any(f for f, _, _ in transforms):
        flipped = padded.flip(3)
    parts = []
    for f, dy, dx in transforms:
        if not (0 <= dy <= max_dy and 0 <= dx <= max_dx):
            raise ValueError(f"crop offset ({dy}, {dx}) outside 0..({max_dy}, {max_dx})")
        src = flipped if f else padded
        parts.append(src[:, :, dy : dy + height, dx : dx + width])
    return torch.cat(parts)


def _default_device(model: nn.Module, images: torch.Tensor) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else images.device


@torch.no_grad()
def evaluate_views(
    model: nn.Module,
    images_u8: torch.Tensor,
    labels: torch.Tensor | None,
    mean: Sequence[float],
    std: Sequence[float],
    views: Sequence[str],
    *,
    batch_size: int = 500,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    with_features: bool = False,
    pad: int = 4,
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Mean logits of each requested TTA view (docs/study.md, TTA), plus optional penultimate features.

    Returns ``({view: float32 [N, classes]}, features)`` where ``features`` is the un-augmented
    image's ``model.forward_features`` output, float32 [N, d], if ``with_features`` else None
    (then logits come from ``model.fc(features)``, which must equal ``model(x)``).

    Every distinct transform of the union of the requested views is run once; its logits are
    added, in float64, with its multiplicity into each view using it, and each view is divided by
    its view count at the end. A forward pass holds at most ``batch_size`` transformed images:
    ``min(N, batch_size)`` images times as many transforms as fit. ``device`` defaults to the
    model's device; images move there chunk by chunk as uint8. The model is evaluated in eval()
    mode and its previous mode restored. ``labels`` are only checked against N (the caller keeps
    them); the model's memory format is the caller's business (``channels_last`` converts inputs).
    """
    views = list(dict.fromkeys(views))  # drop repeats, keep order
    for v in views:
        _check_name(v)
    _check_pad(pad)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images_u8.dtype != torch.uint8 or images_u8.dim() != 4:
        raise ValueError(
            f"expected uint8 images [N, C, H, W], got {images_u8.dtype} {tuple(images_u8.shape)}"
        )
    n, _, h, w = images_u8.shape
    if n == 0:
        raise ValueError("no images to evaluate")
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} images")
    if not views and not with_features:
        return {}, None
    dev = torch.device(device) if device is not None else _default_device(model, images_u8)
    # Float64 accumulation where the device has it (MPS does not); the sums are tiny either way.
    acc_dev = dev if dev.type in ("cpu", "cuda") else torch.device("cpu")

    # Union of transforms, the original first (it also carries the features).
    per_view = {v: Counter(view_transforms(v, pad)) for v in views}
    original: Transform = (False, pad, pad)
    union: list[Transform] = list(
        dict.fromkeys([original, *(t for ts in per_view.values() for t in ts)])
    )
    weight = torch.tensor(
        [[per_view[v][t] for t in union] for v in views], dtype=torch.float64, device=acc_dev
    ).reshape(len(views), len(union))
    needs_flip = any(f for f, _, _ in union)

    chunk = min(n, batch_size)
    per_pass = max(1, batch_size // chunk)  # transforms per forward pass
    acc: torch.Tensor | None = None  # [views, N, classes] float64
    feats: torch.Tensor | None = None  # [N, d] float32

    was_training = model.training
    model.eval()
    try:
        for i0 in range(0, n, chunk):
            i1 = min(i0 + chunk, n)
            m = i1 - i0
            # Normalise and pad each image chunk once; every transform is a slice of it.
            x = normalize(images_u8[i0:i1].to(dev), mean, std)
            padded = pad_black(x, mean, std, pad)
            flipped = padded.flip(3) if needs_flip else None
            for j0 in range(0, len(union), per_pass):
                group = union[j0 : j0 + per_pass]
                batch = crop_batch(padded, group, h, w, flipped)
                if channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                if with_features:
                    f = model.forward_features(batch)
                    logits = model.fc(f)
                    if j0 == 0:  # union[0] is the original: its rows come first
                        if feats is None:
                            feats = torch.empty(n, f.shape[1], dtype=torch.float32, device=dev)
                        feats[i0:i1] = f[:m].float()
                else:
                    logits = model(batch)
                k = len(group)
                if acc is None:
                    acc = torch.zeros(
                        len(views), n, logits.shape[1], dtype=torch.float64, device=acc_dev
                    )
                lg = logits.to(acc_dev, torch.float64).reshape(k, -1)  # [k, m*classes]
                acc[:, i0:i1] += (weight[:, j0 : j0 + k] @ lg).view(len(views), m, -1)
    finally:
        model.train(was_training)

    out: dict[str, np.ndarray] = {}
    if acc is not None:
        mean_logits = (acc / weight.sum(1).view(-1, 1, 1)).to(torch.float32).cpu().numpy()
        out = {v: mean_logits[i] for i, v in enumerate(views)}
    return out, (feats.cpu().numpy() if feats is not None else None)


def evaluate_test_set(model: nn.Module, data, data_cfg, views: Sequence[str], *, batch_size: int,
                      device: torch.device, channels_last: bool, with_features: bool
                      ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The one evaluation call of a run's test set: training's end (task.py) and a later
    ``python -m nondet_hpc.evaluate`` both come here, so their logits cannot drift apart.

    ``data`` is a loaded :class:`~nondet_hpc.run.data.Dataset`, ``data_cfg`` the run's ``data``
    config (normalisation, and ``pad``: TTA crops shift as far as the training crops do).
    """
    return evaluate_views(model, data.test_x.to(device), data.test_y.to(device), list(data_cfg.mean),
                          list(data_cfg.std), views, batch_size=batch_size, device=device,
                          channels_last=channels_last, with_features=with_features, pad=data_cfg.pad)
