"""Which device a run computes on, and whether this torch build has kernels for its GPU.

Training (task.py) and ``python -m nondet_hpc.evaluate`` both resolve ``train.device`` /
``--device`` here, so a wrong node or a torch build without kernels for the GPU fails with the
same message before anything is written.
"""

from __future__ import annotations

import torch

from ..config import ConfigError


def check_gpu_arch(capability: tuple[int, int], arch_list: list[str], gpu_name: str,
                   torch_version: str, cuda_version: str | None) -> None:
    """Fail early when the installed torch has no kernels for this GPU.

    A cubin for sm_XY runs on sm_XZ with Z >= Y (same major); PTX for compute_XY can be JIT
    compiled for any newer GPU. CUDA 13 builds of torch dropped sm_70 (V100).
    """
    major, minor = capability
    for arch in arch_list:
        kind, _, num = arch.partition("_")
        if not num.isdigit():
            continue
        a_major, a_minor = int(num[:-1]), int(num[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return
    raise ConfigError(
        f"GPU '{gpu_name}' has compute capability {major}.{minor} (sm_{major}{minor}), but the installed "
        f"torch {torch_version} (CUDA {cuda_version}) only has kernels for {arch_list or 'no GPU'}. "
        f"Install a torch build that includes sm_{major}{minor}: for V100 (sm_70) use a CUDA 12.6 build, "
        f"e.g. pip install 'torch<=2.14.1' torchvision --index-url https://download.pytorch.org/whl/cu126 "
        f"(CUDA 13 builds have no sm_70 kernels). See docs/v100.md.")


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ConfigError(f"train.device={spec!r} is not a device ({e}); valid: auto, cpu, cuda, cuda:N.") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device={spec} but this machine has no usable CUDA GPU (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda}). Use train.device=cpu (or auto), or run on a GPU node, "
                f"e.g. hydra/launcher=slurm_v100.")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={spec} but only {torch.cuda.device_count()} GPU(s) are visible.")
        check_gpu_arch(torch.cuda.get_device_capability(index), torch.cuda.get_arch_list(),
                       torch.cuda.get_device_name(index), torch.__version__, torch.version.cuda)
    elif device.type != "cpu":
        raise ConfigError(f"train.device={spec!r}: valid values are auto, cpu, cuda, cuda:N.")
    return device
