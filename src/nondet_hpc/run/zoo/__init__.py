"""The authors' architectures and the researcher's own model, built from the init stream alone.

Public API: ``build`` (a zoo model by name, see nondet_hpc/registry/zoo.py), ``build_custom`` and
``check_output`` (model=custom), ``bitflip_target`` / ``default_bitflip_param`` (the parameter the
bit change touches), ``authors_small_lr_names`` (the authors' learning-rate groups by name),
``construct`` / ``forked_rng`` (construction under a global-RNG fork seeded from the init stream).
"""

from .build import FAMILIES, authors_small_lr_names, bitflip_target, build, default_bitflip_param, float32_params
from .custom import build_custom, check_output, load_factory
from .rng import construct, forked_rng, seed_from

__all__ = ["FAMILIES", "authors_small_lr_names", "bitflip_target", "build", "build_custom", "check_output",
           "construct", "default_bitflip_param", "float32_params", "forked_rng", "load_factory", "seed_from"]
