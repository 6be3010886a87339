"""Every registered model (registry/models.py) and the researcher's own, built from the init stream alone.

Public API: ``build`` (a registered model by name), ``from_config`` (a run's ``cfg.model``, custom
included), ``build_custom`` and ``check_output`` (model=custom), ``bitflip_param`` /
``bitflip_target`` / ``default_bitflip_param`` (the parameter the bit change touches),
``authors_small_lr_names`` (the authors' learning-rate groups by name), ``construct`` /
``forked_rng`` (construction under a global-RNG fork seeded from the init stream).
"""

from .build import (FAMILIES, authors_small_lr_names, bitflip_param, bitflip_target, build, default_bitflip_param,
                    float32_params, from_config)
from .custom import build_custom, check_output, load_factory
from .rng import construct, forked_rng, seed_from

__all__ = ["FAMILIES", "authors_small_lr_names", "bitflip_param", "bitflip_target", "build", "build_custom",
           "check_output", "construct", "default_bitflip_param", "float32_params", "forked_rng", "from_config",
           "load_factory", "seed_from"]
