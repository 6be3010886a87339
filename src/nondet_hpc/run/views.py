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
from ..viewspec import Transform, check_pad, check_view_name, view_transforms

__all__ = ["pad_black", "crop_batch", "evaluate_views", "evaluate_test_set"]


def pad_black(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], pad: int = 4
) -> torch.Tensor:
    """Pad a normalised batch [B, C, H, W] by ``pad`` on each side with the normalised black pixel.

    The fill is ``normalize`` of a raw 0, so it is exactly what padding the raw image with 0 and
    normalising afterwards gives: the black padding of docs/study.md, "Test-time augmentation".
    """
    check_pad(pad)
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


def _check_inputs(images_u8: torch.Tensor, labels: torch.Tensor | None, views: list[str], batch_size: int,
                  pad: int) -> None:
    for v in views:
        check_view_name(v)
    check_pad(pad)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images_u8.dtype != torch.uint8 or images_u8.dim() != 4:
        raise ValueError(
            f"expected uint8 images [N, C, H, W], got {images_u8.dtype} {tuple(images_u8.shape)}"
        )
    n = images_u8.shape[0]
    if n == 0:
        raise ValueError("no images to evaluate")
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} images")


def _union_and_weights(views: list[str], pad: int, acc_dev: torch.device) -> tuple[list[Transform], torch.Tensor]:
    """The distinct transforms of ``views``, the original first (it also carries the features), and
    float64 [views, transforms]: how often each view counts each transform."""
    per_view = {v: Counter(view_transforms(v, pad)) for v in views}
    original: Transform = (False, pad, pad)
    union: list[Transform] = list(
        dict.fromkeys([original, *(t for ts in per_view.values() for t in ts)])
    )
    weight = torch.tensor(
        [[per_view[v][t] for t in union] for v in views], dtype=torch.float64, device=acc_dev
    ).reshape(len(views), len(union))
    return union, weight


class _Sums:
    """Weighted logit sums per view, float64 [views, N, classes], and the original image's
    features, float32 [N, d]; both made at the first forward pass (its output sizes them)."""

    def __init__(self, n: int, n_views: int, dev: torch.device, acc_dev: torch.device) -> None:
        self.n, self.n_views, self.dev, self.acc_dev = n, n_views, dev, acc_dev
        self.acc: torch.Tensor | None = None
        self.feats: torch.Tensor | None = None

    def add_logits(self, weight: torch.Tensor, logits: torch.Tensor, i0: int, i1: int) -> None:
        """Add the logits of ``weight.shape[1]`` transforms (transform-major rows) of images i0..i1."""
        if self.acc is None:
            self.acc = torch.zeros(
                self.n_views, self.n, logits.shape[1], dtype=torch.float64, device=self.acc_dev
            )
        lg = logits.to(self.acc_dev, torch.float64).reshape(weight.shape[1], -1)  # [k, m*classes]
        self.acc[:, i0:i1] += (weight @ lg).view(self.n_views, i1 - i0, -1)

    def add_features(self, f: torch.Tensor, i0: int, i1: int) -> None:
        """Keep the features of images i0..i1 (the first rows of ``f``: the original transform)."""
        if self.feats is None:
            self.feats = torch.empty(self.n, f.shape[1], dtype=torch.float32, device=self.dev)
        self.feats[i0:i1] = f[: i1 - i0].float()

    def result(self, views: list[str], weight: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        out: dict[str, np.ndarray] = {}
        if self.acc is not None:
            mean_logits = (self.acc / weight.sum(1).view(-1, 1, 1)).to(torch.float32).cpu().numpy()
            out = {v: mean_logits[i] for i, v in enumerate(views)}
        return out, (self.feats.cpu().numpy() if self.feats is not None else None)


@torch.no_grad()
def evaluate_views(model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor | None, mean: Sequence[float],
                   std: Sequence[float], views: Sequence[str], *, batch_size: int = 500,
                   device: torch.device | str | None = None, channels_last: bool = False, with_features: bool = False,
                   pad: int = 4) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Mean logits of each requested TTA view (docs/study.md, TTA), plus optional penultimate features.

    Returns ``({view: float32 [N, classes]}, features)`` where ``features`` is the un-augmented
    image's ``model.forward_features`` output, float32 [N, d], if ``with_features`` else None
    (then logits come from ``model.fc(features)``, which must equal ``model(x)``; a model without
    ``forward_features`` and ``fc``, e.g. a researcher's, gives the input of its last linear layer:
    ``features_and_logits``).

    Every distinct transform of the union of the requested views is run once; its logits are
    added, in float64, with its multiplicity into each view using it, and each view is divided by
    its view count at the end. A forward pass holds at most ``batch_size`` transformed images:
    ``min(N, batch_size)`` images times as many transforms as fit. ``device`` defaults to the
    model's device; images move there chunk by chunk as uint8. The model is evaluated in eval()
    mode and its previous mode restored. ``labels`` are only checked against N (the caller keeps
    them); the model's memory format is the caller's business (``channels_last`` converts inputs).
    """
    views = list(dict.fromkeys(views))  # drop repeats, keep order
    _check_inputs(images_u8, labels, views, batch_size, pad)
    if not views and not with_features:
        return {}, None
    n, _, h, w = images_u8.shape
    dev = torch.device(device) if device is not None else _default_device(model, images_u8)
    # Float64 accumulation where the device has it (MPS does not); the sums are tiny either way.
    acc_dev = dev if dev.type in ("cpu", "cuda") else torch.device("cpu")
    union, weight = _union_and_weights(views, pad, acc_dev)
    needs_flip = any(f for f, _, _ in union)
    chunk = min(n, batch_size)
    per_pass = max(1, batch_size // chunk)  # transforms per forward pass
    sums = _Sums(n, len(views), dev, acc_dev)
    was_training = model.training
    model.eval()
    try:
        for i0 in range(0, n, chunk):
            i1 = min(i0 + chunk, n)
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
                    f, logits = features_and_logits(model, batch)
                    if j0 == 0:  # union[0] is the original: its rows come first
                        sums.add_features(f, i0, i1)
                else:
                    logits = model(batch)
                sums.add_logits(weight[:, j0 : j0 + len(group)], logits, i0, i1)
    finally:
        model.train(was_training)
    return sums.result(views, weight)


def classifier(model: nn.Module) -> nn.Linear:
    """The layer whose input is the penultimate features: ``model.fc`` where the model has
    ``forward_features`` and ``fc`` (this package's ResNets), else its last ``nn.Linear`` in
    registration order (every zoo model's classifier; the usual last layer of a researcher's)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError("eval.features=true needs a final nn.Linear layer (its input is the features for CKA); "
                         "this model has none: set eval.features=false")
    return last[-1]


def features_and_logits(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, logits) of one forward pass."""
    if hasattr(model, "forward_features") and isinstance(getattr(model, "fc", None), nn.Linear):
        f = model.forward_features(batch)
        return f, model.fc(f)
    seen: list[torch.Tensor] = []
    handle = classifier(model).register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    try:
        logits = model(batch)
    finally:
        handle.remove()
    return seen[-1].flatten(1), logits


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
