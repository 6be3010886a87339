"""Building a module so that its initial weights come from the run's init stream alone.

Most of the authors' models keep PyTorch's default initialisation, which draws from the global
RNG while the module is constructed. Their code swapped the global state for one seeded by
``--init_seed`` around the constructor and swapped it back after. We do the same with the init
stream: one draw from the init generator seeds torch's CPU generator (and numpy's and Python's
global generators, for a researcher's factory that uses them) inside a fork, so

- the weights depend on the init seed and on nothing else (not on what ran before),
- the caller's global RNG states are exactly as they were afterwards,
- no other stream is touched (shuffle, augment and bitflip have generators of their own).

Construction happens with CPU as the default device: the CUDA generators are never used (the
trainer moves the model to the device afterwards).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")


def seed_from(g: torch.Generator) -> int:
    """One draw of the init stream: the seed of the fork in which a module is constructed."""
    return int(torch.randint(0, 2**62, (1,), generator=g))


@contextmanager
def forked_rng(seed: int) -> Iterator[None]:
    """Global RNGs (torch CPU, numpy, random) seeded from ``seed`` inside, restored on exit."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):  # CPU generator only: CUDA's state is never touched
        torch.random.default_generator.manual_seed(seed)  # not torch.manual_seed: that seeds CUDA too
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            with torch.device("cpu"):
                yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def construct(make: Callable[[], T], g: torch.Generator) -> T:
    """``make()`` called inside ``forked_rng(seed_from(g))``: its random draws come from ``g`` only."""
    with forked_rng(seed_from(g)):
        return make()
