"""The sources of nondeterminism: which seed each stream gets, and how each stream is used.

docs/study.md, "Sources and seeds". Every source owns one ``torch.Generator``; nothing here (or in
the training code) touches torch's global RNG, so changing one source's seed cannot shift the
random numbers of another. Studying a source = that source's seed is the replicate index, every
other seed is 1.

- init:    model weights (models.init_weights) draw from ``Streams.init``.
- shuffle: each epoch's permutation (data.epoch_order) draws from ``Streams.shuffle``.
- augment: each epoch's crops and flips (data.epoch_augment) draw from ``Streams.augment``.
- bitflip: one float32 ulp of one stem weight (apply_bitflip), chosen by its own generator.
- cudnn:   not a stream but a switch (configure_kernels).

``configure_precision`` is not a source: it pins what "fp32" means on the GPU (IEEE or TF32), so
runs on a V100 and on an H100 compute the same kind of float32 unless told otherwise. Which flag
a run sets follows from ``train.precision`` (``precision_record``; step.FP32_FLAG).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import SEEDED_SOURCES, ConfigError


#: Largest replicate index: below every gap between the stream offsets (see _STREAM_OFFSET).
MAX_SEED = 1_000_000


@dataclass(frozen=True)
class Seeds:
    init: int
    shuffle: int
    augment: int
    bitflip: Optional[int]  # None = no bit change
    deterministic_kernels: bool

    def as_dict(self) -> dict:
        return {"init": self.init, "shuffle": self.shuffle, "augment": self.augment,
                "bitflip": self.bitflip, "deterministic_kernels": self.deterministic_kernels}


def resolve_seeds(vary: list[str], seed: int, deterministic_kernels: bool) -> Seeds:
    """Seeds of every stream for replicate ``seed`` of a source set that varies ``vary``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 1:
        raise ConfigError(f"seed={seed!r} is invalid: the replicate index must be an integer >= 1 "
                          f"(e.g. seed=7, or sweep with seed='range(1,101)').")
    if seed > MAX_SEED:
        raise ConfigError(f"seed={seed} is too large: replicate indices go up to {MAX_SEED:,}, the range in which "
                          f"every source's random stream is distinct from every other's (a larger init seed would "
                          f"reproduce a shuffle seed's numbers). Use seed=1..{MAX_SEED}.")
    unknown = sorted(set(vary) - set(SEEDED_SOURCES))
    if unknown:
        raise ConfigError(f"source.vary has unknown stream(s) {unknown}; valid: {list(SEEDED_SOURCES)} "
                          f"(the cuDNN source is source.deterministic_kernels=false, not a stream).")
    pick = lambda s: seed if s in vary else 1  # noqa: E731
    return Seeds(init=pick("init"), shuffle=pick("shuffle"), augment=pick("augment"),
                 bitflip=seed if "bitflip" in vary else None,
                 deterministic_kernels=deterministic_kernels)


# Offsets keep streams apart even if two sources get the same integer seed: generator(init=1) and
# generator(shuffle=1) must not produce the same numbers. With seeds limited to 1..MAX_SEED the
# generator seeds of different streams lie in disjoint ranges, so no seed of one source can ever
# equal a seed of another (tests/test_sources.py checks the ranges).
_STREAM_OFFSET = {"init": 0, "shuffle": 1_000_003, "augment": 2_000_003, "bitflip": 3_000_017}


def make_generator(stream: str, seed: int) -> torch.Generator:
    """A CPU generator for one stream. CPU draws are identical on every machine and device."""
    g = torch.Generator(device="cpu")
    g.manual_seed(_STREAM_OFFSET[stream] + seed)
    return g


@dataclass
class Streams:
    """The live generators of one run; checkpointed and restored as a unit."""
    init: torch.Generator
    shuffle: torch.Generator
    augment: torch.Generator

    @classmethod
    def from_seeds(cls, seeds: Seeds) -> "Streams":
        return cls(init=make_generator("init", seeds.init),
                   shuffle=make_generator("shuffle", seeds.shuffle),
                   augment=make_generator("augment", seeds.augment))

    def state(self) -> dict:
        return {k: getattr(self, k).get_state() for k in ("init", "shuffle", "augment")}

    def load_state(self, state: dict) -> None:
        for k, s in state.items():
            getattr(self, k).set_state(s)


def apply_bitflip(weight: torch.Tensor, bitflip_seed: int) -> dict:
    """Move one element of ``weight`` to the adjacent float32 value (up or down, 50/50).

    The element and the direction come from a generator seeded by the bitflip seed alone, so the
    global RNG is never consumed (the original code had to save and restore it for this).
    Returns the record stored in run.json: flat index, old and new value, direction.
    """
    if weight.dtype != torch.float32:
        raise TypeError(f"bit change needs a float32 weight, got {weight.dtype}")
    g = make_generator("bitflip", bitflip_seed)
    index = int(torch.randint(weight.numel(), (1,), generator=g))
    up = bool(torch.rand(1, generator=g) < 0.5)
    flat = weight.data.view(-1)
    old = flat[index].detach().cpu().clone().reshape(1)  # clone: on CPU .cpu() is a view
    target = torch.tensor([float("inf") if up else float("-inf")], dtype=torch.float32)
    new = torch.nextafter(old, target)
    with torch.no_grad():
        flat[index] = new.to(flat.device)[0]
    return {"index": index, "shape": list(weight.shape), "direction": "up" if up else "down",
            "old": float(old[0]), "new": float(new[0]),
            "old_hex": old.view(torch.int32).item() & 0xFFFFFFFF,
            "new_hex": new.view(torch.int32).item() & 0xFFFFFFFF}


def configure_kernels(deterministic: bool, device: torch.device) -> dict:
    """Set PyTorch's kernel determinism switches; return what was set, for run.json.

    GPU, deterministic: cuDNN deterministic, no benchmark autotuning, deterministic algorithms
    everywhere, and cuBLAS's fixed workspace (CUBLAS_WORKSPACE_CONFIG must be set before cuBLAS
    initialises, which is why the package sets it on import).
    GPU, nondeterministic: benchmark on, deterministic off (the study's cuDNN source).
    CPU: the flags are set the same way, but CPU kernels are deterministic for a fixed thread count
    either way, so the switch has no kernel-level effect there; the record says so.
    """
    # CUBLAS_WORKSPACE_CONFIG is set when the package is imported (nondet_hpc/__init__.py), before
    # cuBLAS can initialise; here it is only recorded.
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    record = {"deterministic": deterministic, "cudnn.deterministic": deterministic,
              "cudnn.benchmark": not deterministic, "use_deterministic_algorithms": deterministic,
              "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    if device.type == "cpu":
        record["effect"] = ("none at kernel level: on CPU, results depend on the thread count "
                            "(recorded as 'threads'), not on these switches")
    else:
        record["effect"] = "cuDNN/cuBLAS kernel selection"
    return record


FP32_PRECISIONS = ("ieee", "tf32")


def configure_precision(precision: str, device: torch.device) -> dict:
    """Set the fp32 precision of cuDNN convolutions and CUDA matmuls; return the record for run.json.

    torch's defaults differ (cuDNN convolutions may use TF32, matmuls may not) and only matter on
    Ampere and newer GPUs, so a study mixing GPU generations would mix numerics silently: we set
    both from ``train.precision`` (see ``precision_record``). torch >= 2.9 has per-backend ``fp32_precision`` flags; we
    use only those, since mixing them with the legacy ``allow_tf32`` flags makes torch raise on
    reading. cudnn.rnn is set too so every cuDNN flag agrees (no RNN here). Older torch: the legacy
    flags. The record holds the values read back, and the GPU name.
    """
    if precision not in FP32_PRECISIONS:
        raise ConfigError(f"fp32 backend precision {precision!r}: valid values are {list(FP32_PRECISIONS)} (chosen "
                          f"through train.precision: fp32 -> ieee, tf32 -> tf32).")
    flags = {}
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
        torch.backends.cudnn.rnn.fp32_precision = precision
        flags = {"cuda.matmul.fp32_precision": torch.backends.cuda.matmul.fp32_precision,
                 "cudnn.conv.fp32_precision": torch.backends.cudnn.conv.fp32_precision,
                 "cudnn.rnn.fp32_precision": torch.backends.cudnn.rnn.fp32_precision}
    else:  # pragma: no cover - torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
        flags = {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                 "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32}
    record = {"fp32_precision": precision, **flags}
    if device.type == "cuda":
        i = device.index if device.index is not None else torch.cuda.current_device()
        major, _ = torch.cuda.get_device_capability(i)
        record["gpu"] = torch.cuda.get_device_name(i)
        # TF32 exists from compute capability 8.0 (Ampere); older GPUs compute IEEE fp32 either way.
        record["effective"] = precision if major >= 8 else "ieee (no TF32 before compute capability 8.0)"
    else:
        record["gpu"] = None
        record["effective"] = "not applicable: CPU run (these flags only act on CUDA kernels)"
    return record


def fp32_flag_of(train_cfg) -> str:
    """The fp32 backend flag a stored run config asks for (``train.precision``, or the retired
    ``train.fp32_precision`` of run folders written before it; IEEE when neither is there)."""
    from .step import FP32_FLAG, check_precision

    precision = train_cfg.get("precision")
    if precision is not None:
        return FP32_FLAG[check_precision(str(precision))]
    return str(train_cfg.get("fp32_precision") or "ieee")


def precision_record(precision: str, device: torch.device) -> dict:
    """Set the fp32 flags ``train.precision`` implies; return run.json's ``precision`` record:
    the precision, its autocast dtype and loss scaling, and configure_precision's read-back."""
    from .step import AUTOCAST_DTYPE, FP32_FLAG, check_precision

    check_precision(precision)
    dtype = AUTOCAST_DTYPE.get(precision)
    return {"precision": precision, "autocast": str(dtype).replace("torch.", "") if dtype else None,
            "grad_scaler": precision == "amp_fp16", **configure_precision(FP32_FLAG[precision], device)}
