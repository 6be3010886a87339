"""Checks of where results go, before Hydra creates any folder.

Hydra creates the run or sweep folder before the first job starts, so a bad ``out_dir`` (a file,
a read-only place, /proc) would end in Hydra's traceback. ``CheckOutDir`` runs as a Hydra
callback at the start of a run or multirun, which Hydra calls before it creates them.

Hydra users also type ``hydra.sweep.dir=X`` / ``hydra.run.dir=X``. Here the sweep folder IS
``out_dir`` (conf/config.yaml points both Hydra folders at it, and the runs, sweep.json and the
report live under it), so ``honour_hydra_dirs`` turns those overrides into ``out_dir=X`` before
Hydra parses the command line; contradicting values are refused.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

HYDRA_DIR_KEYS = ("hydra.sweep.dir", "hydra.run.dir")
#: virtual file systems: writable-looking, but results written there are gone or refused
VIRTUAL_ROOTS = ("/proc", "/sys", "/dev")


def _fail(msg: str) -> None:
    print(f"nondet_hpc: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def honour_hydra_dirs(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``hydra.sweep.dir=X`` / ``hydra.run.dir=X`` turned into ``out_dir=X``."""
    values: dict[str, str] = {}
    rest: list[str] = []
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and key in ("out_dir", *HYDRA_DIR_KEYS):
            values.setdefault(key, value)
            if values[key] != value:
                _fail(f"{key} is given twice ({values[key]!r} and {value!r}); give it once.")
            if key == "out_dir":
                rest.append(arg)
            continue
        rest.append(arg)
    folders = {k: v for k, v in values.items() if k in HYDRA_DIR_KEYS}
    if not folders:
        return list(argv)
    wanted = set(folders.values()) | ({values["out_dir"]} if "out_dir" in values else set())
    if len(wanted) > 1:
        given = ", ".join(f"{k}={v}" for k, v in values.items())
        _fail(f"{given} name different folders, but the runs, sweep.json and the report all go to one sweep "
              f"folder: out_dir (hydra.sweep.dir and hydra.run.dir follow it). Give only out_dir=PATH.")
    if "out_dir" not in values:
        rest.append(f"out_dir={wanted.pop()}")
    return rest


LAUNCHER_PREFIX = "hydra.launcher."


def _launcher_choice(argv: Sequence[str]) -> str | None:
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if sep and key.removeprefix("override ").strip() == "hydra/launcher":
            return value
    return None


def _is_slurm_preset(name: str, depth: int = 0) -> bool:
    """Whether ``hydra/launcher=NAME`` is the SLURM launcher (a preset of conf/ that extends its schema)."""
    import yaml

    from .config import conf_dir

    if name == "nondet_slurm_schema":
        return True
    path = Path(conf_dir()) / "hydra" / "launcher" / f"{name}.yaml"
    if depth > 8 or not path.is_file():
        return False
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    defaults = data.get("defaults") if isinstance(data, dict) else None
    return any(_is_slurm_preset(d, depth + 1) for d in defaults or [] if isinstance(d, str) and d != "_self_")


def check_launcher_keys(argv: Sequence[str]) -> None:
    """``hydra.launcher.KEY=V`` with or without ``+``: a KEY that is no field of the SLURM launcher is
    refused with the closest valid name (Hydra's own error suggests the ``+`` form, which would
    store the misspelt key and ignore it), before Hydra composes anything."""
    choice = _launcher_choice(argv)
    if choice is None or not _is_slurm_preset(choice):
        return
    from .cluster import fields

    for arg in argv:
        if arg.startswith("~"):
            continue
        key, sep, _ = arg.lstrip("+").partition("=")
        if sep and key.startswith(LAUNCHER_PREFIX) and not fields.is_field(key[len(LAUNCHER_PREFIX):]):
            _fail(f"{fields.unknown_field(key[len(LAUNCHER_PREFIX):])}\nNothing was submitted.")


#: room a run folder needs below out_dir (runs/<run id>/logits/<view>.npy and its temp name)
RUN_PATH_ROOM = 200


def _too_long(path: Path) -> str | None:
    """Why ``path`` is too long for the file system (a name over NAME_MAX, a path over PATH_MAX)."""
    probe = path
    while not os.path.isdir(probe) and probe.parent != probe:
        probe = probe.parent
    try:
        name_max, path_max = os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        name_max, path_max = 255, 4096
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            return (f"the folder name {part[:40]!r}... is {len(os.fsencode(part))} bytes, more than the {name_max} "
                    f"this file system allows in one name")
    if len(os.fsencode(str(path))) + RUN_PATH_ROOM > path_max:
        return (f"the path is {len(os.fsencode(str(path)))} bytes; with the {RUN_PATH_ROOM} a run folder needs below "
                f"it, that is more than the {path_max} this file system allows")
    return None


def out_dir_problem(out_dir: str) -> str | None:
    """Why results cannot be written under ``out_dir`` (None when they can)."""
    path = Path(out_dir).expanduser().absolute()
    if any(str(path) == r or str(path).startswith(r + "/") for r in VIRTUAL_ROOTS):
        return f"it lies in {path.parts[1] and '/' + path.parts[1]}, a virtual file system, not storage"
    too_long = _too_long(path)
    if too_long:
        return too_long
    probe = path
    while not os.path.lexists(probe):  # the nearest existing folder decides whether we may create the rest
        if probe.parent == probe:
            break
        if probe.is_symlink():  # a dangling link
            return f"{probe} is a broken symbolic link"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} exists and is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    try:
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            return f"{probe} is on a read-only file system"
    except OSError:
        pass
    return None


class CheckOutDir(Callback):
    """Refuse a bad out_dir before Hydra creates folders (run and multirun alike)."""

    def _check(self, config: DictConfig) -> None:
        out_dir = str(config.get("out_dir"))
        problem = out_dir_problem(out_dir)
        if problem:
            _fail(f"out_dir={out_dir!r} is not writable ({problem}). Choose a folder you can write with "
                  f"out_dir=PATH.")

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)
