"""The sources of nondeterminism: which seed each stream gets, and how each stream is used.

docs/study.md, "Sources and seeds". Every source owns one ``torch.Generator``; nothing here (or in
the training code) touches torch's global RNG, so changing one source's seed cannot shift the
random numbers of another. Studying a source = that source's seed is the replicate index, every
other seed is 1.

- init:    model weights (run/zoo: the init rule of each model, a custom factory) draw from ``Streams.init``.
- shuffle: each epoch's permutation (data.epoch_order) draws from ``Streams.shuffle``.
- augment: each epoch's crops and flips (data.epoch_augment) draw from ``Streams.augment``.
- bitflip: one float32 ulp of one weight (apply_bitflip; which parameter: the model's registry
           entry), chosen by its own generator.
- cudnn:   not a stream but a switch (configure_kernels).

The streams themselves (names, offsets, which are one-shot) are declared in registry/sources.py.

``configure_precision`` is not a source: it pins what "fp32" means on the GPU (IEEE or TF32), so
runs on a V100 and on an H100 compute the same kind of float32 unless told otherwise. Which flag
a run sets follows from ``train.precision`` (``precision_record``; step.FP32_FLAG).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ConfigError
from ..registry.sources import MAX_SEED, STREAMS


@dataclass(frozen=True)
class Seeds:
    """The generator seed of every stream of one run (registry STREAMS), and the kernel switch."""
    streams: dict[str, Optional[int]]  # stream name -> seed; None = a one-shot stream left off (no bit change)
    deterministic_kernels: bool

    def __getattr__(self, stream: str) -> Optional[int]:
        """``seeds.init``, ``seeds.bitflip``: the seed of one stream by name."""
        try:
            return self.__dict__["streams"][stream]
        except KeyError:
            raise AttributeError(stream) from None

    def as_dict(self) -> dict:
        """run.json ``seeds``: every stream in the registry's order, then the kernel switch."""
        return {**self.streams, "deterministic_kernels": self.deterministic_kernels}


def resolve_seeds(vary: list[str], seed: int, deterministic_kernels: bool) -> Seeds:
    """Seeds of every stream for replicate ``seed`` of a source set that varies ``vary``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 1:
        raise ConfigError(f"seed={seed!r} is invalid: the replicate index must be an integer >= 1 "
                          f"(e.g. seed=7, or sweep with seed='range(1,101)').")
    if seed > MAX_SEED:
        raise ConfigError(f"seed={seed} is too large: replicate indices go up to {MAX_SEED:,}, the range in which "
                          f"every source's random stream is distinct from every other's (a larger init seed would "
                          f"reproduce a shuffle seed's numbers). Use seed=1..{MAX_SEED}.")
    unknown = sorted(set(vary) - set(STREAMS))
    if unknown:
        raise ConfigError(f"source.vary has unknown stream(s) {unknown}; valid: {list(STREAMS)} "
                          f"(the cuDNN source is source.deterministic_kernels=false, not a stream).")
    off = {True: None, False: 1}  # the seed of a stream the source does not vary
    return Seeds({s.name: seed if s.name in vary else off[s.one_shot] for s in STREAMS.values()},
                 deterministic_kernels=deterministic_kernels)


def make_generator(stream: str, seed: int) -> torch.Generator:
    """A CPU generator for one stream. CPU draws are identical on every machine and device."""
    g = torch.Generator(device="cpu")
    g.manual_seed(STREAMS[stream].offset + seed)
    return g


#: The streams the training loop draws from all along (not one-shot): Streams holds their generators.
LIVE_STREAMS = tuple(s.name for s in STREAMS.values() if not s.one_shot)


class Streams:
    """The live generators of one run, by stream name; checkpointed and restored as a unit.

    ``streams.shuffle`` is the shuffle stream's generator (attribute access by stream name).
    """

    def __init__(self, generators: dict[str, torch.Generator]) -> None:
        self.generators = generators

    def __getattr__(self, stream: str) -> torch.Generator:
        try:
            return self.__dict__["generators"][stream]
        except KeyError:
            raise AttributeError(stream) from None

    @classmethod
    def from_seeds(cls, seeds: Seeds) -> "Streams":
        return cls({name: make_generator(name, seeds.streams[name]) for name in LIVE_STREAMS})

    def state(self) -> dict:
        return {k: g.get_state() for k, g in self.generators.items()}

    def load_state(self, state: dict) -> None:
        for k, s in state.items():
            self.generators[k].set_state(s)


def fresh_stream_states(seeds: Seeds, vary: list[str]) -> dict:
    """The states a run perturbed from epoch k gives its varied live streams at the start of epoch k:
    fresh generators seeded with the replicate seed (before k they were the parent's, seed 1). The
    streams it does not vary go on as the parent's (not in the result)."""
    return {name: make_generator(name, seeds.streams[name]).get_state() for name in LIVE_STREAMS if name in vary}


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
    CPU: the flags are set the same way, but CPU kernels are deterministic for a fixed thread count,
    CPU and instruction set either way, so the switch has no kernel-level effect there; the record
    says so, and names what CPU results do depend on (run.json ``threads`` and ``cpu``).
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
        record["effect"] = ("none at kernel level: on CPU these switches change nothing; results depend on the "
                            "thread count ('threads'), the CPU and the vector instruction set its kernels use "
                            "('cpu': model, torch capability, oneDNN ISA)")
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
