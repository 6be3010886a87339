"""Errors, size limits and the walk below a sweep root: every component opened without following
a link, through directory descriptors (the package docstring says why)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import Iterator

from ..config import ConfigError

RUNS = "runs"  # SWEEP_DIR/runs/<run id>/ (re-exported by rundir, the run folder's contract)

#: size limits of the files a run or sweep folder holds (bytes)
MAX_JSON = 64 << 20  # run.json, sweep.json, DONE, report.json
MAX_YAML = 1 << 20  # config.yaml
MAX_ARRAY = 16 << 30  # logits, labels, features (memory-mapped, never read whole)
MAX_CHECKPOINT = 8 << 30  # checkpoint.pt
MAX_ALIASES = 100  # YAML aliases in one document (a run's config.yaml has none)

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class RefusedFile(ConfigError):
    """A file that is not read or written: missing, a link, not a regular file, too large, or
    malformed. The message names the file and why; nothing from it was used."""

    def __init__(self, path: Path | str, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = str(path), why


class UnsafePath(RefusedFile):
    """A write refused because a component below the sweep root is a link or not a folder."""


class DiskFullError(OSError):
    """A write ran out of space (ENOSPC / EDQUOT); the message names the folder and what is free."""

    def __str__(self) -> str:
        return str(self.strerror)


def kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


# ================================================================================ the tree below a root
def sweep_root(path: Path | str) -> Path:
    """The folder whose contents a write to ``path`` checks: the sweep folder of a run-folder path
    (``SWEEP/runs/<id>/...``: the folder holding the last ``runs`` component), else ``path``'s folder."""
    p = Path(path)
    parts = p.parts
    for i in range(len(parts) - 2, -1, -1):  # RUNS must hold something: never the last component
        if parts[i] == RUNS:
            return Path(*parts[:i]) if i else Path(".")
    return p.parent


def _relative(root: Path, path: Path) -> tuple[str, ...]:
    try:
        rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
    except ValueError:
        raise ConfigError(f"{path} lies outside {root}, the folder it is written in") from None
    parts = tuple(p for p in rel.parts if p not in ("", "."))
    if ".." in parts:
        raise ConfigError(f"{path}: '..' below {root} is not allowed")
    return parts


def refuse_entry(where: Path, dir_fd: int, name: str, root: Path, wanted: str) -> None:
    """Raise UnsafePath for entry ``name`` (a link, or not a ``wanted``) of the folder ``dir_fd``."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except OSError as e:
        raise UnsafePath(where, f"cannot be examined ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError:
            target = "?"
        raise UnsafePath(where, f"is a symbolic link (to {target}); every folder and file below {root} is written "
                                f"only as a real one, never through a link. Nothing was written. Remove the link "
                                f"(rm {where}) and run the command again.")
    raise UnsafePath(where, f"is {kind(st.st_mode)}, not {wanted}. Nothing was written. Move it away and run the "
                            f"command again.")


def _open_dirs(root: Path, parts: tuple[str, ...], create: bool) -> int:
    """A descriptor of folder ``root/parts...``, every part opened without following a link."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        if not create:
            raise
        os.makedirs(root, exist_ok=True)  # the root is the user's choice (links above it are theirs)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    where = Path(root)
    try:
        for part in parts:
            where = where / part
            for _attempt in range(3):
                try:
                    nxt = os.open(part, _DIR, dir_fd=fd)
                    break
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o777, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        refuse_entry(where, fd, part, root, "a folder")
                    raise
            else:
                raise UnsafePath(where, "keeps changing while it is opened; nothing was written")
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def folder(path: Path | str, root: Path | str | None = None, create: bool = True) -> Iterator[int]:
    """A descriptor of folder ``path``, each component below ``root`` a real folder (created if
    missing and ``create``); default root: :func:`sweep_root` of ``path/x``."""
    path = Path(path)
    root = Path(root) if root is not None else sweep_root(path / "x")
    fd = _open_dirs(root, _relative(root, path), create)
    try:
        yield fd
    finally:
        os.close(fd)


def make_dirs(path: Path | str, root: Path | str | None = None) -> Path:
    """Create folder ``path`` (and its parents below ``root``) as real folders; refuse a link."""
    with folder(path, root):
        pass
    return Path(path)


def check_tree(path: Path | str, root: Path | str | None = None, depth: int = 2) -> None:
    """Refuse (UnsafePath) a link anywhere in folder ``path`` down to ``depth`` levels, and on the
    way to it from ``root``: a run folder is checked whole before minutes of work go into it."""
    path = Path(path)
    with folder(path, root, create=False) as fd:
        _check_entries(path, fd, Path(root) if root is not None else sweep_root(path / "x"), depth)


def _check_entries(where: Path, fd: int, root: Path, depth: int) -> None:
    for entry in os.scandir(fd):
        if entry.is_symlink():
            refuse_entry(where / entry.name, fd, entry.name, root, "a link")
        if depth > 1 and entry.is_dir(follow_symlinks=False):
            sub = os.open(entry.name, _DIR, dir_fd=fd)
            try:
                _check_entries(where / entry.name, sub, root, depth - 1)
            finally:
                os.close(sub)


def check_target(path: Path, dir_fd: int, name: str, root: Path) -> None:
    """The name about to be replaced must be nothing or a regular file."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        refuse_entry(path, dir_fd, name, root, "a regular file")
