"""The ONE home for reading and writing shared folders (run, sweep and data folders).

Sweep folders are shared on clusters (other users, copies from other machines), so nothing a
folder holds may redirect a write, block a reader or make it read without bound:

- **Writes** (:func:`atomic_write`, :func:`write_bytes`, :func:`make_dirs`, :func:`open_stream`,
  the locks): every component of the target below the sweep root is opened with ``O_NOFOLLOW``
  through directory descriptors, so each one is a real folder (or, at the end, a regular file or
  nothing), never a symbolic link; missing folders are created the same way. The content goes to
  a fresh temporary file in that real folder (``O_EXCL``), is synced and renamed over the name,
  so a killed writer leaves the old file or the new one, and a hard link planted under the name is
  replaced, never written through. A planted link is refused with :class:`UnsafePath`, naming it;
  nothing is written anywhere. The sweep root itself (and what lies above it) is the user's
  choice and may be a link: ``root`` is checked from below. Without ``root``, the root of a
  run-folder path is the folder holding its ``runs/`` (:func:`sweep_root`).
- **Reads** (:class:`RegularFile`, :func:`read_regular`, :func:`load_npy`, :func:`load_json`,
  :func:`load_yaml`, :func:`tail`): a file is opened only if it is a regular file (not a link,
  FIFO or device: ``O_NOFOLLOW | O_NONBLOCK``, then ``fstat`` on the open descriptor, so the check
  and the read see the same file) of at most a stated size, and read from that one descriptor.
  YAML is parsed without tags and with a bound on aliases; arrays never unpickle.
"""

from __future__ import annotations

from .read import RegularFile, is_regular, load_json, load_npy, load_yaml, read_regular, tail
from .tree import (MAX_ALIASES, MAX_ARRAY, MAX_CHECKPOINT, MAX_JSON, MAX_YAML, RUNS, DiskFullError, RefusedFile,
                   UnsafePath, check_tree, folder, kind, make_dirs, sweep_root)
from .write import atomic_write, file_lock, open_lock, open_stream, write_bytes

__all__ = ["MAX_ALIASES", "MAX_ARRAY", "MAX_CHECKPOINT", "MAX_JSON", "MAX_YAML", "RUNS", "DiskFullError", "RefusedFile",
           "RegularFile", "UnsafePath", "atomic_write", "check_tree", "file_lock", "folder", "is_regular", "kind",
           "load_json", "load_npy", "load_yaml", "make_dirs", "open_lock", "open_stream", "read_regular", "sweep_root",
           "tail", "write_bytes"]
