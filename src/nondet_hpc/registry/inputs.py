"""What a run's identity needs from the files its config names, resolved before any run id is made.

Two runs compute the same thing only if their inputs are the same, and for some inputs the config
holds a *name* whose content can change under it:

- ``model=custom``: the factory's module is the researcher's code. ``model.source_sha256`` gets the
  SHA-256 of its source file (model_factory.py), so editing the model makes new run ids instead of
  silently mixing old and new results in one group.
- ``data=npz`` / ``data=folder``: ``data.root`` is a path (bookkeeping: moving the data keeps ids),
  so ``data.fingerprint`` gets the content's SHA-256 (the .npz file; the folder's file list with
  each file's SHA-256, readers/folder.py), and two datasets never share a run id.

CIFAR, digits and MNIST are fixed by their name and the published checksums; nothing is added.

``resolve_inputs(cfg)`` is called wherever a run id is made: ``run.task.run`` (every local and
SLURM job), the SLURM launcher when it plans a sweep, and ``experiments.plan``. A value already
there (a job planned by the launcher, carried to the node) is checked instead: a file edited
after the run id was made is refused, naming the file, so a run never carries an id of other
code or data. Reading the files runs nothing: the factory's module is found, not imported.
"""

from __future__ import annotations

from typing import Any, Callable

from ..config import ConfigError
from ..model_factory import factory_identity, factory_source
from .datasets import DATASETS
from .models import CUSTOM

#: data.name -> what data.root must be, for the message when it is not set
_ROOT_HELP = {"npz": "the .npz file (arrays x_train, y_train, x_test, y_test), e.g. data.root=~/data/shapes.npz",
              "folder": "the folder holding train/<class>/ and test/<class>/, e.g. data.root=~/data/tiny64"}


def _fill(node: Any, key: str, value: str, what: str, redo: str) -> None:
    old = node.get(key)
    if old is None:
        node[key] = value
    elif old != value:
        raise ConfigError(f"{what} changed after this run's id was made ({key} {str(old)[:12]}... planned, "
                          f"{value[:12]}... now): the run would carry the id of other content. {redo}")


def _data_fingerprint(data: Any) -> str:
    from .. import readers  # numpy only: the files are hashed, not decoded

    name = str(data.name)
    if not data.get("root"):
        raise ConfigError(f"data={name} needs data.root: {_ROOT_HELP[name]}.")
    read: Callable[[], str] = (lambda: readers.npz_fingerprint(data.root, int(data.max_bytes))) if name == "npz" \
        else (lambda: readers.folder_fingerprint(data.root))
    return read()


def resolve_inputs(cfg: Any) -> None:
    """Fill ``model.source_sha256`` (model=custom) and ``data.fingerprint`` (data=npz, folder) in
    ``cfg`` (a DictConfig), or check the values already there; ConfigError with one message."""
    model = cfg.model
    if str(model.name) == CUSTOM:
        spec = model.get("factory")
        if not spec:
            raise ConfigError("model=custom needs model.factory=package.module:function, a function (or class) "
                              "returning a torch.nn.Module, e.g. model.factory=my_models:make_net; keyword arguments "
                              "with model.kwargs='{width: 64}' (docs/own_model.md).")
        kwargs = model.get("kwargs")
        from omegaconf import OmegaConf

        plain = OmegaConf.to_container(kwargs, resolve=True) if OmegaConf.is_config(kwargs) else kwargs
        ident = factory_identity(str(spec), plain)
        _fill(model, "source_sha256", ident["source_sha256"], f"{factory_source(str(spec))} (model.factory={spec})",
              "Run the command again: the edited model gets runs of its own.")
    data = cfg.data
    if str(data.name) in _ROOT_HELP:
        _fill(data, "fingerprint", _data_fingerprint(data), f"the data at data.root={data.root}",
              "Run the command again: the changed data get runs of their own.")


def content_addressed(data_name: str, model_name: str) -> bool:
    """Whether a run's id depends on file contents (so a plan keyed by overrides alone is stale)."""
    return model_name == CUSTOM or (data_name in DATASETS and data_name in _ROOT_HELP)
