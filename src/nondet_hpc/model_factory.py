"""The identity of a researcher's own model (``model=custom``), computed without importing torch.

``model.factory=package.module:function`` names a callable that returns an ``nn.Module``;
``model.kwargs`` are passed to it. Two runs compute the same thing only if the factory, its
arguments AND its code are the same, so the identity holds the SHA-256 of the factory module's
source file: editing the model makes new run ids instead of silently mixing old and new results
in one group. The file is located with ``importlib.util.find_spec``, which does not run the module
itself (a parent package's ``__init__`` is imported to find a submodule).

Limits: only that one file is hashed. Code it imports from other files (a helper module, a
library) is not covered; keep the model in one file, or pass a version number in the kwargs when
a helper changes. The SLURM nodes must import the same file: run from the folder holding it or
put it on PYTHONPATH (the launcher passes the environment on).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from .config import ConfigError

_SPEC = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")
#: The keys of cfg.model that only model=custom has (config.CustomConfig).
CUSTOM_KEYS = ("factory", "kwargs", "source_sha256")
_EXAMPLE = "model.factory=my_models:make_net (a file my_models.py defining make_net(**kwargs) -> nn.Module)"


def parse_factory(spec: str) -> tuple[str, str]:
    """``"package.module:function"`` -> (module name, attribute path)."""
    m = _SPEC.match(str(spec or "").strip())
    if not m:
        raise ConfigError(f"model.factory={spec!r} is not 'package.module:function'; e.g. {_EXAMPLE}.")
    return m.group(1), m.group(2)


def factory_source(spec: str) -> Path:
    """The source file of the factory's module, found without running that module."""
    module, _ = parse_factory(spec)
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as e:
        found, why = None, f" ({type(e).__name__}: {e})"
    else:
        why = ""
    if found is None:
        raise ConfigError(f"model.factory={spec!r}: module {module!r} was not found{why}. Run from the folder that "
                          f"holds it or add that folder to PYTHONPATH (SLURM jobs inherit it).")
    origin = Path(found.origin) if found.origin and found.origin not in ("built-in", "frozen") else None
    if origin is None or origin.suffix != ".py" or not origin.is_file():
        raise ConfigError(f"model.factory={spec!r}: module {module!r} has no Python source file ({found.origin}), "
                          f"so changes to it could not be detected; define the factory in a .py file.")
    return origin


def canonical_kwargs(kwargs: Any) -> dict:
    """The factory's keyword arguments as plain JSON values (the form the identity hashes)."""
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ConfigError(f"model.kwargs must be a mapping of names to values, got {kwargs!r}.")
    try:
        return json.loads(json.dumps(kwargs, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.kwargs={kwargs!r}: values must be numbers, strings, booleans, null, lists or "
                          f"mappings of those ({e}).") from None


def factory_identity(spec: str, kwargs: Any = None) -> dict:
    """What decides a custom model, for its run id: the factory, its kwargs, and the SHA-256 of its
    module's source file. Cheap (no torch; the model is not built). The file's path is left out,
    so moving a project folder keeps run ids; ``factory_record`` adds it for run.json."""
    source = factory_source(spec)
    return {"factory": str(spec).strip(), "kwargs": canonical_kwargs(kwargs),
            "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest()}


def factory_record(spec: str, kwargs: Any = None) -> dict:
    """``factory_identity`` plus where the source file was (provenance for run.json)."""
    return {**factory_identity(spec, kwargs), "source_file": str(factory_source(spec).resolve())}
