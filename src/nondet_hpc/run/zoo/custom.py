"""The researcher's own model: ``model=custom model.factory=package.module:function`` + ``model.kwargs``.

The factory is called inside the init stream's fork (run/zoo/rng.py): whatever it draws from
torch's, numpy's or Python's global generator comes from the init seed, so the init source varies
the model and no other source does, and the caller's generators are left as they were. Its
identity (factory, kwargs, SHA-256 of its source file) is nondet_hpc/model_factory.py's.

Checks, each with one message: the factory resolves to a callable, returns an ``nn.Module`` with
parameters, built on the CPU (the trainer moves it), and (``check_output``) maps a batch of the
dataset's images to [B, num_classes] logits.
"""

from __future__ import annotations

import hashlib
import importlib
from typing import Any, Callable

import torch
import torch.nn as nn

from ...config import ConfigError
from ...model_factory import canonical_kwargs, factory_source, parse_factory
from .rng import construct, forked_rng


#: module name -> SHA-256 of its source file when this process imported it
_IMPORTED: dict[str, str] = {}


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable ``spec`` names (its module is imported: this runs the researcher's code). A
    module this process imported before is imported again if its file changed since (a sweep run
    in one process must not train the old code under the new code's run id)."""
    module_name, attr = parse_factory(spec)
    sha = hashlib.sha256(factory_source(spec).read_bytes()).hexdigest()  # also the "not found" messages
    try:
        obj: Any = importlib.import_module(module_name)
        if _IMPORTED.setdefault(module_name, sha) != sha:
            obj = importlib.reload(obj)
            _IMPORTED[module_name] = sha
    except Exception as e:  # noqa: BLE001 - the researcher's module may raise anything on import
        raise ConfigError(f"model.factory={spec!r}: importing {module_name!r} failed ({type(e).__name__}: {e}). "
                          f"Fix the module; `python -c 'import {module_name}'` shows the traceback.") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model.factory={spec!r}: {module_name!r} has no {attr!r}; its public names: "
                              f"{sorted(n for n in dir(importlib.import_module(module_name)) if not n.startswith('_'))}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model.factory={spec!r}: {attr!r} is a {type(obj).__name__}, not a function or class.")
    return obj


def build_custom(spec: str, kwargs: Any, g: torch.Generator, expect_sha256: str | None = None) -> nn.Module:
    """``factory(**kwargs)`` built inside the init stream's fork, checked (module docstring).

    ``expect_sha256``: the source hash the run id was made with; a file edited since is refused
    (the run would otherwise carry the old id with the new code).
    """
    factory = load_factory(spec)
    if expect_sha256 is not None:
        now = hashlib.sha256(factory_source(spec).read_bytes()).hexdigest()
        if now != expect_sha256:
            raise ConfigError(f"model.factory={spec!r}: {factory_source(spec)} changed after this run's id was made "
                              f"(sha256 {now[:12]} != {expect_sha256[:12]}); submit the runs again.")
    args = canonical_kwargs(kwargs)
    try:
        model = construct(lambda: factory(**args), g)
    except Exception as e:  # noqa: BLE001 - the researcher's code
        raise ConfigError(f"model.factory={spec!r} with model.kwargs={args} raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory={spec!r} returned a {type(model).__name__}, not a torch.nn.Module.")
    params = list(model.parameters())
    if not params:
        raise ConfigError(f"model.factory={spec!r} returned a module without parameters: nothing would train.")
    devices = {str(t.device) for t in [*params, *model.buffers()]}
    if devices != {"cpu"}:
        raise ConfigError(f"model.factory={spec!r} built tensors on {sorted(devices)}: build on the CPU (no "
                          f"device= / .cuda() in the factory); the trainer moves the model to the device.")
    return model


@torch.no_grad()
def check_output(model: nn.Module, in_shape: tuple[int, int, int], num_classes: int) -> None:
    """One forward pass of two blank images in eval mode: the logits must be [2, num_classes].

    Inside a fork with a fixed seed: a model that draws random numbers in its forward pass draws
    none from the caller's generators or the init stream. The training mode is restored; eval
    mode leaves BatchNorm statistics unchanged. The model must be on the CPU (as built).
    """
    was_training = model.training
    model.eval()
    try:
        with forked_rng(0):
            out = model(torch.zeros(2, *in_shape))
    except Exception as e:  # noqa: BLE001 - the researcher's forward
        if "does not have a deterministic implementation" in str(e):
            raise  # not a shape problem: run/task.py names the op
        raise ConfigError(f"the custom model fails on images of shape [B, {', '.join(map(str, in_shape))}] "
                          f"({type(e).__name__}: {e}): its first layer must take the dataset's channels and "
                          f"size.") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the custom model returns {shape} for 2 images; it must return logits [2, {num_classes}] "
                          f"(one per class of the dataset: data.num_classes={num_classes}).")
