"""Reading files of shared folders: regular files of bounded size, from the checked descriptor."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .tree import MAX_ALIASES, MAX_ARRAY, MAX_JSON, MAX_YAML, RefusedFile, kind

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class RegularFile:
    """One regular file of bounded size, opened once without following a symbolic link.

    Use as a context manager; :meth:`read_all` and :meth:`pread` read from the descriptor that
    was checked, so replacing the file under its name after the check changes nothing read.
    """

    def __init__(self, path: Path | str, max_bytes: int):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, _READ)
        except FileNotFoundError:
            raise RefusedFile(path, "file missing") from None
        except OSError as e:  # ELOOP: the name is a symbolic link
            why = ("is a symbolic link; files of a run or sweep folder are read only as regular files"
                   if e.errno == errno.ELOOP else f"cannot be opened ({e.strerror})")
            raise RefusedFile(path, why) from None
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise RefusedFile(path, f"is {kind(st.st_mode)}, not a regular file")
            if st.st_size > max_bytes:
                raise RefusedFile(path, f"is {st.st_size:,} bytes, more than the {max_bytes:,} such a file may have")
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

    def fileobj(self) -> BinaryIO:
        """A buffered reader of the checked descriptor (its own copy: close it when done)."""
        f = os.fdopen(os.dup(self.fd), "rb")
        f.seek(0)
        return f


def read_regular(path: Path | str, max_bytes: int) -> bytes:
    """The bytes of regular file ``path`` (at most ``max_bytes``), or :class:`RefusedFile`."""
    with RegularFile(path, max_bytes) as f:
        return f.read_all()


def is_regular(path: Path | str) -> bool:
    """Whether ``path`` itself (not what a link points to) is a regular file; nothing is opened."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def load_json(path: Path | str, max_bytes: int = MAX_JSON) -> Any:
    """JSON from a regular file; RefusedFile when it is not one or does not parse."""
    data = read_regular(path, max_bytes)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RefusedFile(path, f"not valid JSON ({e})") from None


def tail(path: Path | str, max_bytes: int = 64 << 10) -> str:
    """The last ``max_bytes`` of a regular file as text ("" when it is missing or not one)."""
    try:
        with RegularFile(path, 1 << 62) as f:
            start = max(0, f.size - max_bytes)
            return f.pread(start, f.size - start).decode(errors="replace")
    except RefusedFile:
        return ""


def load_npy(path: Path | str, max_bytes: int = MAX_ARRAY, mmap: bool = False) -> np.ndarray:
    """A .npy array from a regular file, never unpickling (RefusedFile with the reason otherwise).

    ``mmap``: map the file read-only from the checked descriptor instead of reading it.
    """
    with RegularFile(path, max_bytes) as rf, rf.fileobj() as f:
        try:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(f))
        except Exception as e:  # noqa: BLE001 - any header problem means the file is not a .npy
            if rf.pread(0, min(4, rf.size)) == b"PK\x03\x04":
                raise RefusedFile(path, "expected one .npy array, found NpzFile (an .npz archive)") from None
            raise RefusedFile(path, f"is not a .npy file (no valid NUMPY header: truncated, empty or another "
                                    f"format; {e})") from None
        if dtype.hasobject:
            raise RefusedFile(path, "holds Python objects (pickle), which are never loaded (allow_pickle=False)")
        offset = f.tell()
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if offset + count * dtype.itemsize > rf.size:
            raise RefusedFile(path, f"is {rf.size:,} bytes, shorter than the {shape} {dtype} array its header "
                                    f"promises (truncated?)")
        order = "F" if fortran else "C"
        if mmap:
            if count == 0:
                return np.zeros(shape, dtype=dtype, order=order)
            return np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
        data = rf.pread(offset, count * dtype.itemsize)
        return np.frombuffer(data, dtype=dtype, count=count).reshape(shape, order=order).copy(order=order)


def load_yaml(path: Path | str, max_bytes: int = MAX_YAML, max_aliases: int = MAX_ALIASES) -> Any:
    """YAML from a regular file: plain types only (no tags), at most ``max_aliases`` aliases, so
    neither code nor an alias bomb can come out of it."""
    import yaml

    text = read_regular(path, max_bytes).decode("utf-8", errors="replace")

    class _Bounded(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent, index):  # type: ignore[override]
            if self.check_event(yaml.AliasEvent):
                _Bounded.aliases += 1
                if _Bounded.aliases > max_aliases:
                    raise RefusedFile(path, f"holds more than {max_aliases} YAML aliases (an alias bomb?); nothing "
                                            f"from it was used")
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=_Bounded)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise RefusedFile(path, f"is not valid YAML ({str(e).splitlines()[0]})") from None
