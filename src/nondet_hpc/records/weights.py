"""A run's final weights as a safetensors file: parameters and buffers, readable without torch.

safetensors is a length-prefixed JSON header followed by raw tensor bytes: loading it cannot run
code (unlike a pickle-based ``checkpoint.pt``). The file is written in a fixed order (the same
weights always give the same bytes, :func:`serialize`) and read by the reference parser
(``safetensors.numpy``) after this module has checked the header. The header's ``__metadata__`` (strings only) says
what the file is:

==============  ==========================================================================
format          ``nondet_hpc.weights`` (anything else is refused)
version         ``1``
run_id          the run the weights belong to
parameters      JSON list of the parameter names, in the model's order (the flat vector's order)
buffers         JSON list of the buffer names (BatchNorm running mean/var, batches tracked)
fingerprint     hex SHA-256 of the parameters (records/projection.py), as in the trajectory
step            optimizer steps done when the weights were taken
==============  ==========================================================================

Every parameter is float32; buffers keep their dtype (``num_batches_tracked`` is int64). A
reader checks the header against the data (offsets contiguous, sizes matching dtype and shape,
names as listed) and, by default, the fingerprint against the parameters it read.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import safetensors.numpy

from .projection import Layout, fingerprint, tensor_digests
from ..safeio import RefusedFile, RegularFile, write_bytes

FORMAT = "nondet_hpc.weights"
VERSION = "1"
#: Largest weights file read (ResNet-34: 85 MB; the default cap of record.weights_max_params,
#: 50 M float32 parameters, is 200 MB).
MAX_WEIGHTS_BYTES = 1 << 30
MAX_HEADER_BYTES = 1 << 24
_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4")}


@dataclass(frozen=True)
class Weights:
    """The content of a weights file: parameters (ordered), buffers, metadata."""

    params: dict[str, np.ndarray]
    buffers: dict[str, np.ndarray]
    meta: dict[str, str]

    @property
    def layout(self) -> Layout:
        return Layout.of((n, a.shape) for n, a in self.params.items())

    def flat(self) -> np.ndarray:
        """float32 [P]: the parameters flattened and concatenated in order."""
        parts = [a.reshape(-1) for a in self.params.values()]
        return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)


def write_weights(path: Path | str, params: Mapping[str, np.ndarray], buffers: Mapping[str, np.ndarray], *,
                  run_id: str, step: int) -> str:
    """Write the weights file atomically; return the parameters' fingerprint (hex).

    ``params``: float32 arrays in the model's order; ``buffers``: any of the dtypes F32/F64/I64/I32.
    """
    overlap = set(params) & set(buffers)
    if overlap:
        raise ValueError(f"names used as both parameter and buffer: {sorted(overlap)}")
    for n, a in params.items():
        if a.dtype != np.float32:
            raise ValueError(f"parameter {n} is {a.dtype}; the weights file holds float32 parameters")
    layout = Layout.of((n, a.shape) for n, a in params.items())
    flat = np.concatenate([a.reshape(-1) for a in params.values()]) if params else np.zeros(0, np.float32)
    digest = fingerprint(layout, flat).hex()
    meta = {"format": FORMAT, "version": VERSION, "run_id": str(run_id), "parameters": json.dumps(list(params)),
            "buffers": json.dumps(list(buffers)), "fingerprint": digest, "step": str(int(step))}
    write_bytes(path, serialize({**params, **buffers}, meta))
    return digest


def serialize(tensors: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> bytes:
    """safetensors bytes with everything in a fixed order, so equal weights give equal files.

    The reference writer orders the metadata as a hash map does (differently from one call to the
    next); here the header is compact JSON with the metadata keys sorted and the tensors in the
    given order, padded with spaces to a multiple of 8 bytes as the format asks, then the data.
    """
    codes = {v: k for k, v in _DTYPES.items()}
    header: dict = {"__metadata__": {k: str(meta[k]) for k in sorted(meta)}}
    blobs, offset = [], 0
    for name, a in tensors.items():
        dtype = np.dtype(a.dtype).newbyteorder("<")
        if dtype not in codes:
            raise ValueError(f"tensor {name} is {a.dtype}; a weights file holds {sorted(_DTYPES)}")
        data = np.require(a, dtype=dtype, requirements="C").tobytes()
        header[name] = {"dtype": codes[dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


@dataclass(frozen=True)
class _Entry:
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    stop: int


def _parse_header(f: RegularFile) -> tuple[dict[str, _Entry], dict[str, str]]:
    """The tensor table and metadata of a safetensors file, checked against the file's size."""
    if f.size < 8:
        raise RefusedFile(f.path, "is not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", f.pread(0, 8))
    if n > min(MAX_HEADER_BYTES, f.size - 8):
        raise RefusedFile(f.path, f"is not a safetensors file (header length {n:,} impossible)")
    try:
        header = json.loads(f.pread(8, n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RefusedFile(f.path, f"is not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise RefusedFile(f.path, "is not a safetensors file (header is not an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise RefusedFile(f.path, "has metadata that is not a table of strings")
    entries, base, spans = {}, 8 + n, []
    for name, e in header.items():
        try:
            dtype, shape, (a, b) = _DTYPES[e["dtype"]], tuple(int(d) for d in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise RefusedFile(f.path, f"tensor {name!r}: dtype not one of {sorted(_DTYPES)} or malformed "
                                      f"entry") from None
        if any(d < 0 for d in shape) or not (isinstance(a, int) and isinstance(b, int)) or \
                b - a != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or a < 0:
            raise RefusedFile(f.path, f"tensor {name!r}: offsets do not match dtype and shape")
        entries[name] = _Entry(dtype, shape, base + a, base + b)
        spans.append((a, b))
    spans.sort()
    if any(s[0] != prev[1] for prev, s in zip([(0, 0)] + spans, spans)) or base + (spans[-1][1] if spans else 0) \
            != f.size:
        raise RefusedFile(f.path, "tensor data is not contiguous or does not end at the end of the file")
    return entries, {str(k): v for k, v in meta.items()}


def _names(f: RegularFile, meta: dict[str, str], entries: dict[str, _Entry]) -> tuple[list[str], list[str]]:
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise RefusedFile(f.path, f"is not a weights file of this package (format {meta.get('format')!r}, "
                                  f"version {meta.get('version')!r}; expected {FORMAT!r} {VERSION})")
    try:
        params, buffers = json.loads(meta["parameters"]), json.loads(meta["buffers"])
    except (KeyError, ValueError):
        raise RefusedFile(f.path, "metadata lacks the parameter and buffer lists") from None
    if not (isinstance(params, list) and isinstance(buffers, list)) or sorted(params + buffers) != sorted(entries):
        raise RefusedFile(f.path, "the parameter and buffer lists do not name exactly the tensors in the file")
    bad = [p for p in params if entries[p].dtype != np.float32]
    if bad:
        raise RefusedFile(f.path, f"parameters {bad[:3]} are not float32")
    return params, buffers


class WeightsFile:
    """A weights file, header checked; tensors read whole (:meth:`load`) or the flat parameter
    vector by ranges (:meth:`flat_range`, for pairwise distances over many runs in bounded memory).

    The descriptor stays open until :meth:`close` (context manager), so every read comes from the
    file that was checked.
    """

    def __init__(self, path: Path | str, max_bytes: int = MAX_WEIGHTS_BYTES):
        self.file = RegularFile(path, max_bytes)
        try:
            self.entries, self.meta = _parse_header(self.file)
            self.param_names, self.buffer_names = _names(self.file, self.meta, self.entries)
        except BaseException:
            self.file.close()
            raise
        self.layout = Layout.of((n, self.entries[n].shape) for n in self.param_names)
        self.offsets = self.layout.offsets
        self.n_values = self.layout.n_values
        self.run_id, self.fingerprint_hex = self.meta.get("run_id", ""), self.meta.get("fingerprint", "")

    def __enter__(self) -> "WeightsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    def flat_range(self, lo: int, hi: int) -> np.ndarray:
        """float32 [hi - lo]: values lo..hi-1 of the flat parameter vector."""
        out, off = [], self.offsets
        k = int(np.searchsorted(off, lo, side="right")) - 1
        while lo < hi and k < len(self.param_names):
            e = self.entries[self.param_names[k]]
            a, b = lo - off[k], min(hi, off[k + 1]) - off[k]
            out.append(np.frombuffer(self.file.pread(e.start + 4 * int(a), 4 * int(b - a)), dtype="<f4"))
            lo, k = off[k] + b, k + 1
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def check_parameters(self) -> None:
        """Read the parameters tensor by tensor (memory: the largest tensor) and refuse the file
        unless their fingerprint is the header's and every value is finite."""
        digests = np.empty((len(self.param_names), 32), dtype=np.uint8)
        for k in range(len(self.param_names)):
            part = self.flat_range(int(self.offsets[k]), int(self.offsets[k + 1]))
            if not np.isfinite(part).all():
                raise RefusedFile(self.file.path, f"parameter {self.param_names[k]} holds NaN or inf (a diverged run)")
            digests[k] = tensor_digests(Layout.of([(self.param_names[k], (part.size,))]), part)[0]
        if fingerprint(self.layout, np.zeros(0, np.float32), digests).hex() != self.fingerprint_hex:
            raise RefusedFile(self.file.path, "its parameters do not match the fingerprint in its header (corrupt "
                                              "or edited)")

    def load(self, verify: bool = True) -> Weights:
        """Every tensor; ``verify``: the parameters' fingerprint must equal the recorded one."""
        try:  # the reference parser reads the tensors; the header was checked by ours as well
            tensors = safetensors.numpy.load(self.file.read_all())
        except Exception as e:  # noqa: BLE001 - the parser raises SafetensorError and others
            raise RefusedFile(self.file.path, f"is not a valid safetensors file ({type(e).__name__}: {e})") from None
        w = Weights({n: tensors[n] for n in self.param_names}, {n: tensors[n] for n in self.buffer_names},
                    dict(self.meta))
        if verify and fingerprint(w.layout, w.flat()).hex() != self.fingerprint_hex:
            raise RefusedFile(self.file.path, "its parameters do not match the fingerprint in its header (corrupt "
                                              "or edited)")
        return w


def read_weights(path: Path | str, *, verify: bool = True, max_bytes: int = MAX_WEIGHTS_BYTES) -> Weights:
    """The weights file at ``path`` (regular file, <= ``max_bytes``), checked; no torch needed."""
    with WeightsFile(path, max_bytes) as f:
        return f.load(verify)
