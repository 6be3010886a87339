"""What a recorded point says about the parameters: an exact fingerprint, norms, a count sketch.

All three are computed on the host from the *flat parameter vector*: every parameter tensor, in
the model's ``named_parameters()`` order, flattened in its logical (row-major, NCHW) order and
concatenated, as float32. The same vector comes from a live model (run/recorder.py, one copy
from the device) or from a weights file (records/weights.py), so both give the same numbers.

Fingerprint
    ``SHA-256(header || d_1 || ... || d_n)``: ``header`` is the UTF-8 JSON of ``[[name, "float32",
    shape], ...]`` followed by a newline, ``d_k`` the SHA-256 of tensor k's little-endian float32
    bytes (kept as well: they say *which* tensors differ). Two fingerprints are equal exactly when
    the parameters are bit-identical, names and shapes included (up to SHA-256 collisions).

Norms
    Per tensor, ``sqrt(sum x_i^2)`` with the squares summed in float64 in index order (a strict
    sequential sum, so every machine gets the same bits).

Count sketch
    A fixed random linear map ``s = S theta`` from the P parameters to D buckets (default 4096):
    parameter i goes to bucket ``h(i)`` with sign ``g(i)``, ``s_j = sum_{h(i)=j} g(i) theta_i``,
    summed in float64 in index order. ``h`` and ``g`` come from a counter-based generator
    (SplitMix64 of ``i`` mixed with a fixed key), drawn once: they depend on nothing but ``i``,
    D and the key, never on a seed of the run, torch's or numpy's global generators, the
    version of a library or the machine, so every run of every source is projected the same way.

    For the difference d of two parameter vectors, ``||S d||^2`` estimates ``||d||^2``
    without bias, with variance ``(2/D) (||d||_2^4 - ||d||_4^4) <= 2 ||d||^4 / D``: the terms
    ``g(i) g(k) d_i d_k`` of two parameters sharing a bucket have mean 0, and a pair shares a bucket
    with probability 1/D. The distance estimate ``||S d||`` is therefore within about
    ``||d|| / sqrt(2 D)`` of ``||d||`` (one SD; 1.1 % at D = 4096), see :func:`relative_sd`.

    Float64 keeps a one-ulp change: float32 values have 24 significant bits, so a bucket's
    float64 sum is exact while its terms span fewer than ~53 - log2(terms) binary orders, as
    they do for trained or freshly initialised weights; then a run whose parameters differ from
    another's by one ulp of one weight has a sketch differing in exactly one bucket, by exactly
    that ulp (tests/test_records.py checks it on real weights).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

#: The projection's key: fixed forever (changing it makes new sketches incomparable with old).
SKETCH_KEY = 0x6E6F6E6465745F31
DEFAULT_SKETCH_DIM = 4096
MAX_SKETCH_DIM = 1 << 24
FINGERPRINT_BYTES = 32

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on each uint64 of ``x`` (wrapping arithmetic)."""
    z = np.asarray(x, dtype=np.uint64) + _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class Layout:
    """Names and shapes of the parameter tensors, in order: where each lies in the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes) or len(set(self.names)) != len(self.names):
            raise ValueError("a layout needs one shape per name and distinct names")

    @property
    def sizes(self) -> np.ndarray:
        return np.array([math.prod(s) for s in self.shapes], dtype=np.int64)

    @property
    def offsets(self) -> np.ndarray:
        """[n + 1] start of each tensor in the flat vector, and its length last."""
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    @property
    def n_values(self) -> int:
        return int(self.sizes.sum())

    def header(self) -> bytes:
        """The fingerprint's header: what the bytes are (names, dtype, shapes)."""
        rows = [[n, "float32", list(s)] for n, s in zip(self.names, self.shapes)]
        return json.dumps(rows, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def of(cls, named: Iterable[tuple[str, Sequence[int]]]) -> "Layout":
        pairs = [(str(n), tuple(int(d) for d in s)) for n, s in named]
        return cls(tuple(n for n, _ in pairs), tuple(s for _, s in pairs))


def _float32_le(flat: np.ndarray) -> np.ndarray:
    if flat.dtype != np.float32 or flat.ndim != 1:
        raise ValueError(f"expected a flat float32 vector, got {flat.dtype} {flat.shape}")
    return np.ascontiguousarray(flat, dtype="<f4")


def tensor_digests(layout: Layout, flat: np.ndarray) -> np.ndarray:
    """uint8 [n, 32]: SHA-256 of each parameter tensor's little-endian float32 bytes."""
    flat = _float32_le(flat)
    if flat.size != layout.n_values:
        raise ValueError(f"the flat vector has {flat.size} values, the layout {layout.n_values}")
    off = layout.offsets
    out = np.empty((len(layout.names), FINGERPRINT_BYTES), dtype=np.uint8)
    for k in range(len(out)):
        out[k] = np.frombuffer(hashlib.sha256(memoryview(flat[off[k]:off[k + 1]]).cast("B")).digest(), np.uint8)
    return out


def fingerprint(layout: Layout, flat: np.ndarray, digests: np.ndarray | None = None) -> bytes:
    """The parameters' fingerprint: SHA-256 of ``layout.header()`` and the per-tensor digests
    (:func:`tensor_digests` of ``flat``, or ``digests`` when already computed from it)."""
    if digests is None:
        digests = tensor_digests(layout, flat)
    return hashlib.sha256(layout.header() + np.ascontiguousarray(digests, np.uint8).tobytes()).digest()


def tensor_norms(layout: Layout, flat: np.ndarray) -> np.ndarray:
    """float64 [n]: each tensor's L2 norm, squares summed sequentially in float64."""
    flat = _float32_le(flat)
    off = layout.offsets
    out = np.empty(len(layout.names), dtype=np.float64)
    for k in range(len(out)):
        part = flat[off[k]:off[k + 1]]
        out[k] = math.sqrt(float(np.cumsum(np.square(part, dtype=np.float64))[-1])) if part.size else 0.0
    return out


def total_norm(norms: np.ndarray) -> np.ndarray:
    """The L2 norm of all parameters from per-tensor norms (last axis), in float64."""
    return np.sqrt(np.sum(np.square(np.asarray(norms, dtype=np.float64)), axis=-1))


class CountSketch:
    """The fixed projection of ``n`` parameters to ``dim`` buckets (see the module docstring).

    Holds one bucket index (8 bytes) and one sign (1 byte) per parameter, made once.
    """

    def __init__(self, n: int, dim: int = DEFAULT_SKETCH_DIM, key: int = SKETCH_KEY):
        if not 1 <= dim <= MAX_SKETCH_DIM:
            raise ValueError(f"sketch dimension {dim}: choose 1..{MAX_SKETCH_DIM} (default {DEFAULT_SKETCH_DIM})")
        if n < 0 or not 0 <= key < 1 << 64:
            raise ValueError("a sketch needs n >= 0 parameters and a 64-bit key")
        self.n, self.dim, self.key = int(n), int(dim), int(key)
        seed = splitmix64(np.array([key], dtype=np.uint64))[0]
        h = splitmix64(np.arange(self.n, dtype=np.uint64) ^ seed)
        self.buckets = ((h >> np.uint64(32)) % np.uint64(dim)).astype(np.intp)
        self.signs = np.where((h >> np.uint64(31)) & np.uint64(1), -1, 1).astype(np.int8)

    def apply(self, flat: np.ndarray) -> np.ndarray:
        """float64 [dim]: ``s_j = sum over i with bucket j of sign_i * flat_i``, in index order."""
        if flat.ndim != 1 or flat.size != self.n:
            raise ValueError(f"the sketch is for {self.n} values, got an array of shape {flat.shape}")
        signed = np.multiply(flat, self.signs, dtype=np.float64)
        return np.bincount(self.buckets, weights=signed, minlength=self.dim)


def relative_sd(dim: int) -> float:
    """One SD of the sketch's distance estimate relative to the true distance: ``1/sqrt(2 dim)``.

    From Var(||S d||^2) <= 2 ||d||^4 / dim and ||S d|| ~ ||d|| (1 + e / 2) with e the relative
    error of the squared estimate (first order).
    """
    return 1.0 / math.sqrt(2.0 * dim)
