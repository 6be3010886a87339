"""Reading and writing the record files of a run folder without trusting the folder.

Run folders are shared (other users, copies from other machines), so a file found there is
opened only if it is a regular file (not a symbolic link, FIFO or device: ``O_NOFOLLOW`` and
``fstat`` on the open descriptor, so the check and the read see the same file) of at most a
stated size, and it is read into memory or by ``pread`` from that one descriptor. Writes go
through :func:`write_bytes`, the single call site of the package's atomic writer.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .rundir import atomic_write


class RefusedFile(ValueError):
    """A record file that is not read: missing, not a regular file, too large, or malformed.

    The message names the file and why; nothing from it was used.
    """

    def __init__(self, path: Path | str, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = str(path), why


_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


class RegularFile:
    """One regular file of bounded size, opened once without following a symbolic link.

    Use as a context manager; :meth:`read_all` and :meth:`pread` read from the descriptor that
    was checked, so replacing the file under its name after the check changes nothing read.
    """

    def __init__(self, path: Path | str, max_bytes: int):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, _OPEN_FLAGS)
        except FileNotFoundError:
            raise RefusedFile(path, "file missing") from None
        except OSError as e:  # ELOOP: the name is a symbolic link
            why = "is a symbolic link; record files are read only as regular files" if e.errno == errno.ELOOP else (
                f"cannot be opened ({e.strerror})")
            raise RefusedFile(path, why) from None
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise RefusedFile(path, f"is {_kind(st.st_mode)}, not a regular file")
            if st.st_size > max_bytes:
                raise RefusedFile(path, f"is {st.st_size:,} bytes, more than the {max_bytes:,} a record file may have")
        except BaseException:
            os.close(self.fd)
            raise
        self.size = int(st.st_size)

    def __enter__(self) -> "RegularFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def pread(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``offset``; a file shorter than checked is refused."""
        chunks, got = [], 0
        while got < length:
            part = os.pread(self.fd, length - got, offset + got)
            if not part:
                raise RefusedFile(self.path, f"ends at byte {offset + got:,}, before the {offset + length:,} its "
                                             f"header promises (truncated while read?)")
            chunks.append(part)
            got += len(part)
        return b"".join(chunks)

    def read_all(self) -> bytes:
        return self.pread(0, self.size)


def read_regular(path: Path | str, max_bytes: int) -> bytes:
    """The bytes of regular file ``path`` (at most ``max_bytes``), or :class:`RefusedFile`."""
    with RegularFile(path, max_bytes) as f:
        return f.read_all()


def write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    atomic_write(Path(path), lambda f: f.write(data))
