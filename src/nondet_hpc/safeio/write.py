"""Writing below a sweep root: atomic files, streams and locks, never through a link."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import re
import secrets
import shutil
import stat
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from ..config import ConfigError
from .tree import DiskFullError, RefusedFile, UnsafePath, check_target, refuse_entry, folder, kind, sweep_root

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _out_of_space(exc: BaseException, where: Path) -> bool:
    """Whether ``exc`` (or what it wraps: torch.save turns OSError into RuntimeError) is a full disk."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return isinstance(exc, (OSError, RuntimeError)) and shutil.disk_usage(where).free == 0
    except OSError:
        return False


def _free_text(where: Path) -> str:
    try:
        return f"{shutil.disk_usage(where).free / 2**20:,.1f} MiB free"
    except OSError:
        return "free space unknown"


def _too_long(path: Path, e: OSError) -> ConfigError:
    return ConfigError(f"{path}: the path is too long for the file system ({e.strerror}; a name may have at most "
                       f"{os.pathconf('/', 'PC_NAME_MAX') if hasattr(os, 'pathconf') else 255} bytes, a path "
                       f"{os.pathconf('/', 'PC_PATH_MAX') if hasattr(os, 'pathconf') else 4096}). Choose a shorter "
                       f"out_dir=PATH.")


def _remove_stale_temps(dir_fd: int, name: str) -> None:
    """Temp files of ``name`` left by a writer that was killed before its rename. Every writer of
    one file holds that file's lock (run lock, sweep lock), so a temp found now is a dead writer's."""
    pattern = re.compile(r"\." + re.escape(name) + r"\.[A-Za-z0-9_]{8}\.tmp\Z")
    try:
        entries = list(os.scandir(dir_fd))
    except OSError:
        return
    for entry in entries:
        if pattern.match(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.name, dir_fd=dir_fd)


def atomic_write(path: Path | str, write: Callable[[io.BufferedWriter], Any], *,
                 root: Path | str | None = None) -> None:
    """Write through ``write(fileobj)`` into a fresh temp file beside ``path``, fsync, then rename.

    Every component of ``path`` below ``root`` (default :func:`sweep_root`) must be a real folder
    and ``path`` nothing or a regular file (:class:`UnsafePath` otherwise, before anything is
    written). A killed writer leaves the old file (or none), never half a file; its temp file is
    removed by the next write of the same file. A full disk raises :class:`DiskFullError` naming
    the folder and the free space; the previous file stays as it was.
    """
    path = Path(path)
    root = Path(root) if root is not None else sweep_root(path)
    try:
        with folder(path.parent, root) as dfd:
            check_target(path, dfd, path.name, root)
            _remove_stale_temps(dfd, path.name)
            tmp = f".{path.name}.{secrets.token_hex(4)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dfd)
            try:
                with os.fdopen(fd, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
    except RefusedFile:
        raise
    except BaseException as e:
        if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
            raise _too_long(path, e) from None
        if _out_of_space(e, path.parent if path.parent.exists() else root):
            raise DiskFullError(errno.ENOSPC, f"no space left to write {path} ({_free_text(root)} in "
                                f"{path.parent}); the previous version of the file is intact. Free space or "
                                f"choose another out_dir=PATH, then rerun the same command: finished runs are "
                                f"skipped and this one resumes from its last checkpoint.") from e
        raise


def write_bytes(path: Path | str, data: bytes, root: Path | str | None = None) -> None:
    """Write ``data`` to ``path`` atomically and without following links (:func:`atomic_write`)."""
    atomic_write(Path(path), lambda f: f.write(data), root=root)


def open_stream(path: Path | str, root: Path | str | None = None) -> BinaryIO:
    """A new, empty regular file at ``path`` for a stream (a job's log), opened for writing.

    Checked like :func:`atomic_write`; whatever stood under the name (a file, or a hard link to
    someone's results) is unlinked first, never truncated or written through.
    """
    path = Path(path)
    root = Path(root) if root is not None else sweep_root(path)
    with folder(path.parent, root) as dfd:
        check_target(path, dfd, path.name, root)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.name, dir_fd=dfd)
        fd = os.open(path.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                     dir_fd=dfd)
    return os.fdopen(fd, "wb")


# ================================================================================ locks
def open_lock(path: Path | str, root: Path | str | None = None) -> int:
    """A descriptor of lock file ``path`` (created if missing): a regular file reached without
    links. A FIFO, device or link under the name is refused at once, never waited on."""
    path = Path(path)
    root = Path(root) if root is not None else sweep_root(path)
    with folder(path.parent, root) as dfd:
        try:
            fd = os.open(path.name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666,
                         dir_fd=dfd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                refuse_entry(path, dfd, path.name, root, "a regular lock file")
            raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafePath(path, f"is {kind(st.st_mode)}, not a regular lock file; nothing was locked or written. "
                               f"Remove it (rm {path}) and run the command again.")
    return fd


@contextlib.contextmanager
def file_lock(path: Path | str, busy: Callable[[], Exception], timeout: float = 0.0, poll: float = 0.2,
              root: Path | str | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing; its folder must be real).

    Waits up to ``timeout`` seconds for a holder to let go (0: do not wait), then raises
    ``busy()``. flock, not a lock file's existence: a holder killed with SIGKILL releases it.
    """
    deadline = time.monotonic() + timeout
    fd = open_lock(path, root)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise busy() from None
                time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
