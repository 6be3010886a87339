"""What decides a CPU run's numbers besides its config and thread count: the CPU and the vector
instruction set (ISA) the kernels dispatch to.

torch's own CPU kernels pick an ISA at start-up (``torch.backends.cpu.get_cpu_capability()``:
DEFAULT, AVX2, AVX512, ...) and oneDNN, which runs the convolutions, picks its own (AVX2,
AVX-512, AVX-512 with DL Boost, AMX, ...); its blocking also follows the CPU's caches. Two CPUs,
or one CPU with another ISA allowed, give different float32 rounding, so after enough epochs of
an unstable optimisation a different model under the same run id. run.json records all of it
under ``cpu`` and the reducer never pools two of them in one group (analysis/integrity.py).

oneDNN's ISA is read from oneDNN's own verbose output (``torch.backends.mkldnn.verbose``, the
public switch), once per process; where that line cannot be captured (oneDNN printed its header
before), a child process with ``ONEDNN_VERBOSE=1`` and this environment answers.

Pinning (docs/performance.md, "Portable CPU results"): set ``ATEN_CPU_CAPABILITY`` and
``ONEDNN_MAX_CPU_ISA`` (and ``MKL_CBWR`` for MKL's matrix products) before torch loads.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
import tempfile

import torch

#: environment variables that pin the ISA (read by torch, oneDNN and MKL when they load)
PIN_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_CBWR",
                 "MKL_ENABLE_INSTRUCTIONS")
_ISA_MARK = ",info,cpu,isa:"
_CHILD = "import torch; torch.randn(1, 8).to_mkldnn()"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")) and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _isa_in(text: str) -> str | None:
    for line in text.splitlines():
        if _ISA_MARK in line:
            return line.split(_ISA_MARK, 1)[1].strip()
    return None


def _isa_here() -> str | None:
    """oneDNN's ISA line from this process (its header is printed once per process)."""
    sys.stdout.flush()
    with tempfile.TemporaryFile() as out:
        saved = os.dup(1)
        os.dup2(out.fileno(), 1)  # oneDNN prints from C, to the file descriptor
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                torch.randn(1, 8).to_mkldnn()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        out.seek(0)
        return _isa_in(out.read().decode(errors="replace"))


def _isa_child(timeout: float) -> str:
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "DNNL_VERBOSE": "1"}
    try:
        r = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown (the oneDNN probe did not answer: {type(e).__name__})"
    return _isa_in(r.stdout) or "unknown (oneDNN printed no ISA)"


@functools.lru_cache(maxsize=None)
def _onednn_isa(pins: tuple[tuple[str, str], ...], timeout: float) -> str:
    if not torch.backends.mkldnn.is_available():
        return "not available (torch built without oneDNN)"
    try:
        found = _isa_here()
    except (OSError, RuntimeError):
        found = None
    return found or _isa_child(timeout)


def pins() -> dict[str, str]:
    """The ISA-pinning variables set in this process's environment."""
    return {k: os.environ[k] for k in PIN_VARIABLES if k in os.environ}


def onednn_isa(timeout: float = 120.0) -> str:
    """The ISA oneDNN dispatches to in this process (e.g. "Intel AVX-512 with Intel DL Boost ...")."""
    return _onednn_isa(tuple(sorted(pins().items())), timeout)


def cpu_record() -> dict:
    """run.json's ``cpu``: the model, torch's and oneDNN's ISA, and the pinning variables set."""
    return {"model": cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(), "onednn_isa": onednn_isa(),
            "pins": pins()}
