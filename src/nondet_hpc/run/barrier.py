"""The loss barrier between two trained models of one group: the models on the straight line
between their final weights, each evaluated on the test set (definition: sweep/barriers.py).

The weights come from the runs' ``weights.safetensors`` files (records/weights.py: safetensors,
checked header, fingerprint verified), never from ``checkpoint.pt``: nothing is unpickled. The
network is built through the model registry (:func:`.models.model_for_run` on the run's
config.yaml), so every registered model works the same way; ``model=custom`` is refused (its
config.yaml names a factory to import and call: code named by a file of the sweep folder).

At each point ``theta(alpha) = theta_a + alpha (theta_b - theta_a)``, computed in float64 and
rounded once to float32 (so alpha = 0 and 1 give the end points exactly, and a model with itself
gives itself everywhere). Buffers other than BatchNorm's running statistics are interpolated the
same way (integer buffers are taken from a). Then every BatchNorm layer's statistics are
recomputed (:func:`recompute_bn`): running mean and variance reset, the cumulative average
(``momentum=None``) over the batches of a fixed subset of training images, normalised like test
images and not augmented. The subset is ``bn_images`` images at positions ``floor(k N / M)`` of the
N training images (:func:`bn_subset`), fed in batches of the run's training batch size; its size,
rule, a digest of the positions and the batches are recorded with every pair. Then the test set
is evaluated exactly as at the end of training (:func:`.views.evaluate_test_set`, plain view):
test loss is the mean cross-entropy (float64), test error the percentage of wrong top-1 labels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..records.weights import Weights
from .data import Dataset, Normalize, settings
from ..registry.models import CUSTOM
from ..rundir import WEIGHTS
from .models import model_for_run
from .views import evaluate_test_set

#: the run folder's weights file (rundir.WEIGHTS)
WEIGHTS_FILE = WEIGHTS
#: BatchNorm layers whose running statistics are recomputed at every point (public classes only)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
DEFAULT_BN_IMAGES = 5000


class BarrierInputError(ConfigError):
    """Two weights files that cannot be interpolated in this model: the message says why."""


@dataclass(frozen=True)
class BnSubset:
    """The fixed training images BatchNorm statistics are recomputed on."""

    indices: np.ndarray  # int64 [M], increasing positions in the training set
    n_train: int
    batch_size: int

    def record(self, recomputed: bool) -> dict:
        m = len(self.indices)
        return {"recomputed": bool(recomputed), "images": m, "n_train": self.n_train,
                "rule": "positions floor(k * n_train / images), k = 0..images-1",
                "indices_sha256": hashlib.sha256(self.indices.astype("<i8").tobytes()).hexdigest(),
                "batch_size": self.batch_size, "batches": -(-m // self.batch_size) if m else 0,
                "augmentation": "none (training images normalised as test images)"}


def bn_subset(n_train: int, images: int, batch_size: int) -> BnSubset:
    """``min(images, n_train)`` evenly spaced training positions, fed ``batch_size`` at a time."""
    if images < 1:
        raise BarrierInputError(f"--bn-images {images}: recompute BatchNorm statistics on at least 1 image "
                                f"(default {DEFAULT_BN_IMAGES}).")
    m = min(int(images), int(n_train))
    idx = (np.arange(m, dtype=np.int64) * int(n_train)) // max(m, 1)
    return BnSubset(idx, int(n_train), max(1, min(int(batch_size), m)))


def check_layout(model: nn.Module, w: Weights, what: str) -> None:
    """The weights file must hold exactly the model's parameters and buffers, in their shapes."""
    want = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    have = {n: tuple(a.shape) for n, a in {**w.params, **w.buffers}.items()}
    if want != have:
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        shapes = sorted(n for n in set(want) & set(have) if want[n] != have[n])
        raise BarrierInputError(f"{what} does not fit the model its config.yaml describes (missing {missing[:3]}, "
                                f"unexpected {extra[:3]}, other shapes {shapes[:3]}): weights of another model.")
    params = [n for n, _ in model.named_parameters()]
    if list(w.params) != params:
        raise BarrierInputError(f"{what}: its parameters are not the model's parameters in the model's order.")


def interpolated(wa: Weights, wb: Weights, alpha: float) -> dict[str, torch.Tensor]:
    """The state dict at ``alpha``: a + alpha (b - a) in float64, rounded once to a's dtype."""
    out = {}
    for name, a in {**wa.params, **wa.buffers}.items():
        b = wb.params[name] if name in wb.params else wb.buffers[name]
        if np.issubdtype(a.dtype, np.floating):
            a64 = a.astype(np.float64)
            v = (a64 + float(alpha) * (b.astype(np.float64) - a64)).astype(a.dtype)
        else:  # integer buffers (batches tracked): a's; BatchNorm's are reset anyway
            v = np.array(a)
        out[name] = torch.from_numpy(np.ascontiguousarray(v))
    return out


@torch.no_grad()
def recompute_bn(model: nn.Module, images_u8: torch.Tensor, normalize: Normalize, batch_size: int,
                 memory_format: torch.memory_format = torch.contiguous_format) -> int:
    """Reset every BatchNorm layer's running statistics and recompute them as the cumulative
    average over the batches of ``images_u8`` (uint8 [M, C, H, W] on the model's device); return
    how many layers there are. Only the BatchNorm layers run in training mode; the model ends in
    eval mode, every layer's momentum as it was."""
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    model.eval()
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch weighs the same
            m.train()
        for lo in range(0, len(images_u8), batch_size):
            model(normalize(images_u8[lo:lo + batch_size]).contiguous(memory_format=memory_format))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    return len(bns)


class PairEvaluator:
    """The model of one group's config on ``device``, the BN subset and the test set, built once;
    :meth:`curve` evaluates the straight line between two weights files."""

    def __init__(self, cfg, data: Dataset, device: torch.device, *, bn_images: int = DEFAULT_BN_IMAGES,
                 eval_batch_size: int | None = None, channels_last: bool = False):
        self.cfg, self.data, self.device = cfg, data, device
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.channels_last = channels_last
        if str(cfg.model.name) == CUSTOM:
            raise BarrierInputError(f"model=custom ({cfg.model.get('factory')}): the barrier command builds models "
                                    f"from the registry only, never a factory a run's config.yaml names (that "
                                    f"would import and call code a file of the sweep folder chose). Compute the "
                                    f"barriers of a custom model from Python: run.barrier.PairEvaluator with the "
                                    f"model built by your own code.")
        shape = tuple(int(v) for v in data.train_x.shape[1:])
        # every tensor is replaced by the weights files' at each point: the init generator is irrelevant
        model = model_for_run(cfg, shape, data.num_classes, torch.Generator().manual_seed(0))  # type: ignore[arg-type]
        self.model = model.to(device=device, memory_format=self.fmt)
        self.model.eval()
        self.subset = bn_subset(len(data.train_x), bn_images, int(cfg.train.batch_size))
        self.bn_x = data.train_x[torch.from_numpy(self.subset.indices)].to(device)
        # the data's shape, classes and normalisation where the config leaves them to the data (npz, folder)
        self.data_cfg = settings(cfg.data, data)
        self.normalize = Normalize(list(self.data_cfg.mean), list(self.data_cfg.std), device)
        self.eval_batch_size = int(eval_batch_size or cfg.eval.batch_size)
        self.test_y = data.test_y.cpu()
        self.bn_layers = sum(isinstance(m, BN_TYPES) for m in self.model.modules())

    def check(self, w: Weights, what: str) -> None:
        check_layout(self.model, w, what)

    @torch.no_grad()
    def point(self, state: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        """(test loss, test error %) of the model with ``state``, BN statistics recomputed."""
        self.model.load_state_dict(dict(state), strict=True)
        recompute_bn(self.model, self.bn_x, self.normalize, self.subset.batch_size, self.fmt)
        logits, _ = evaluate_test_set(self.model, self.data, self.data_cfg, ["plain"],
                                      batch_size=self.eval_batch_size, device=self.device,
                                      channels_last=self.channels_last, with_features=False)
        z = torch.from_numpy(logits["plain"]).double()
        loss = float(F.cross_entropy(z, self.test_y))
        error = float((z.argmax(1) != self.test_y).double().mean()) * 100.0
        return loss, error

    def curve(self, wa: Weights, wb: Weights, alpha: np.ndarray) -> tuple[list[float], list[float]]:
        """Test loss and error at every ``alpha`` on the line from ``wa`` to ``wb``."""
        losses, errors = [], []
        for x in alpha:
            loss, error = self.point(interpolated(wa, wb, float(x)))
            losses.append(loss)
            errors.append(error)
        return losses, errors

    def bn_record(self) -> dict:
        return self.subset.record(self.bn_layers > 0)
