"""When a trajectory point is recorded, and on which test examples the probe logits are taken.

The grid is a set of optimizer-step counts (the model *after* that many steps):

- step 0: the initial weights, after the bit change;
- within the first epoch, steps 1, b, b^2, ... below the epoch's length (``step_base`` b = 2:
  1, 2, 4, 8, ...; b = 1: every step of the first epoch; b = 0: none);
- the end of epochs 1, e, e^2, ... (``epoch_base`` e = 2: epochs 1, 2, 4, 8, ...; 0: none);
- the end of every epoch listed in ``extra_epochs`` (e.g. the epochs at which a later
  perturbation starts, so a child run can check the weights it starts from);
- the end of the last epoch, always.

The probe is ``min(probe, n_test)`` test examples at evenly spaced fixed positions,
``floor(k * n_test / K)`` for k = 0..K-1: every run of a sweep uses the same ones, no generator
is involved, and a test set no larger than the probe is taken whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ConfigError


@dataclass(frozen=True)
class Grid:
    """The recording grid's settings (``record.step_base``, ``record.epoch_base``, ``record.extra_epochs``)."""

    step_base: int = 2  # first epoch: steps 1, b, b^2, ... (1 = every step, 0 = none)
    epoch_base: int = 2  # epoch ends 1, e, e^2, ... (0 = none; the last epoch is always recorded)
    extra_epochs: tuple[int, ...] = ()  # more epoch ends to record

    def __post_init__(self) -> None:
        for key, value in (("record.step_base", self.step_base), ("record.epoch_base", self.epoch_base)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{key}={value!r} is invalid: an integer >= 0 (2 = a log2 grid, 0 = none).")
        if self.epoch_base == 1:
            raise ConfigError("record.epoch_base=1 would record every epoch through a geometric grid; use "
                              "record.epoch_base=0 with record.extra_epochs=[...] for chosen epochs, or 2 for log2.")

    def steps(self, steps_per_epoch: int, epochs: int) -> list[int]:
        """The sorted step counts at which a run of ``epochs`` x ``steps_per_epoch`` steps records."""
        if steps_per_epoch < 1 or epochs < 1:
            raise ValueError(f"a run needs >= 1 epoch of >= 1 step, got {epochs} x {steps_per_epoch}")
        bad = [e for e in self.extra_epochs if not (isinstance(e, int) and 0 <= e <= epochs)]
        if bad:
            raise ConfigError(f"record.extra_epochs={list(self.extra_epochs)}: {bad} outside 0..{epochs} "
                              f"(train.epochs).")
        points = {0, epochs * steps_per_epoch}
        points.update(_geometric(self.step_base, steps_per_epoch - 1))
        points.update(e * steps_per_epoch for e in _geometric(self.epoch_base, epochs))
        points.update(e * steps_per_epoch for e in self.extra_epochs)
        return sorted(points)


def _geometric(base: int, last: int) -> list[int]:
    """1, base, base^2, ... up to ``last`` (base 1: 1..last; base 0: none)."""
    if base == 0 or last < 1:
        return []
    if base == 1:
        return list(range(1, last + 1))
    out, k = [], 1
    while k <= last:
        out.append(k)
        k *= base
    return out


def probe_indices(n_test: int, probe: int) -> np.ndarray:
    """int64 [K]: K = min(probe, n_test) test positions ``floor(k * n_test / K)``, increasing."""
    if probe < 0 or n_test < 0:
        raise ConfigError(f"record.probe={probe} is invalid: a number of test examples >= 0 (default 512).")
    k = min(int(probe), int(n_test))
    return (np.arange(k, dtype=np.int64) * int(n_test)) // max(k, 1)
