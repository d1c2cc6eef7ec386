"""Pick the device to train on and the autocast dtype that pays off on it.

Public API:
    resolve_device, amp_dtype, cpu_has_native_bf16, choose_preset, PresetChoice,
    slow_settings_warning, DEVICE_SPECS, AMP_MODES.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

DEVICE_SPECS: tuple[str, ...] = ("auto", "cpu", "cuda", "cuda:N", "mps")


AMP_MODES: tuple[str, ...] = ("auto", "off", "fp16", "bf16")


_CUDA_INDEX = re.compile(r"cuda:(\d+)")


# /proc/cpuinfo flags of CPUs that compute in bfloat16 natively (AVX512-BF16 and AMX tiles).
_BF16_CPU_FLAGS: frozenset[str] = frozenset({"avx512_bf16", "amx_bf16"})


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str) -> torch.device:
    """Turn a device spec into a ``torch.device``.

    Args:
        spec: "auto" (cuda if available, else mps, else cpu), "cpu", "cuda", "cuda:N" or "mps".

    Raises:
        ValueError: when ``spec`` is malformed, or names an accelerator this machine lacks.
    """
    text = spec.strip().lower() if isinstance(spec, str) else None
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise ValueError(f"device {spec!r} requested but MPS is not available; {_found()}")
        return torch.device("mps")
    if text == "cuda" or (text is not None and _CUDA_INDEX.fullmatch(text)):
        return _cuda_device(spec, text)
    allowed = " | ".join(map(repr, DEVICE_SPECS))
    raise ValueError(f"device {spec!r} is invalid; allowed: {allowed}")


def _cuda_device(spec: str, text: str) -> torch.device:
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available; {_found()}")
    device = torch.device(text)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"device {spec!r} requested but only {count} CUDA device(s) exist "
            f"(indices 0..{count - 1})"
        )
    return device


def _found() -> str:
    """A short description of the accelerators that are present, for error messages."""
    found = []
    if torch.cuda.is_available():
        found.append(f"{torch.cuda.device_count()} CUDA device(s)")
    if _mps_available():
        found.append("MPS")
    built = "CUDA build" if torch.version.cuda else "CPU-only build"
    return f"found: {', '.join(found) or 'CPU only'} (torch {torch.__version__}, {built})"


def _cpu_flags() -> set[str]:
    """Feature flags of the CPU from /proc/cpuinfo (Linux); empty elsewhere."""
    if not sys.platform.startswith("linux"):
        return set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_has_native_bf16(capability: str | None = None, flags: set[str] | None = None) -> bool:
    """Whether the CPU runs bfloat16 math natively, so that bf16 autocast is faster than fp32.

    Without native support the CPU converts every bf16 operand to fp32 and back, which makes
    bf16 autocast slower than fp32 (docs/benchmarks.md has the figures).

    ``torch.backends.cpu.get_cpu_capability()`` names the kernel set torch dispatches to
    ("DEFAULT", "NO AVX", "AVX2", "AVX512", "VSX", "Z VECTOR", "SVE128/256/512" in torch 2.x);
    a name with "AMX" or "BF16" in it counts as native in case a build reports one. Because
    "AVX512" alone does not imply bf16 instructions, the Linux CPU flags ``avx512_bf16`` and
    ``amx_bf16`` are checked as well.

    Args:
        capability: the capability string; ``None`` asks torch.
        flags: the CPU feature flags; ``None`` reads /proc/cpuinfo (empty off Linux).
    """
    if capability is None:
        capability = torch.backends.cpu.get_cpu_capability()
    name = capability.upper()
    if "AMX" in name or "BF16" in name:
        return True
    if flags is None:
        flags = _cpu_flags()
    return bool(_BF16_CPU_FLAGS & flags)


def amp_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """The autocast dtype for ``mode`` on ``device``, or ``None`` for full precision.

    Args:
        device: the training device.
        mode: "off" (None), "fp16" (float16; CUDA only), "bf16" (bfloat16), or "auto": float16
            on CUDA, bfloat16 on a CPU with native bf16 support (see :func:`cpu_has_native_bf16`),
            otherwise None (plain CPU, MPS).

    Raises:
        ValueError: for an unknown mode, or a dtype the device cannot use.
    """
    if mode not in AMP_MODES:
        allowed = " | ".join(map(repr, AMP_MODES))
        raise ValueError(f"amp mode {mode!r} is invalid; allowed: {allowed}")
    kind = device.type
    if mode == "off":
        return None
    if mode == "fp16":
        if kind != "cuda":
            raise ValueError(
                f"amp mode 'fp16' needs a CUDA device, got {kind!r}: float16 autocast relies "
                "on CUDA kernels and gradient scaling; use 'bf16' or 'off' on this device"
            )
        return torch.float16
    if mode == "bf16":
        if kind == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"amp mode 'bf16' requested but CUDA device {device} has no bfloat16 support; "
                "use 'fp16' or 'off'"
            )
        return torch.bfloat16
    return _auto_dtype(kind)


def _auto_dtype(kind: str) -> torch.dtype | None:
    if kind == "cuda":
        return torch.float16
    if kind == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


@dataclass(frozen=True)
class PresetChoice:
    """The preset picked for a run that names none, and why.

    Args:
        preset: "full" (the long GPU run) or "cpu" (a narrow model on a short schedule).
        reason: what decided it, e.g. "no CUDA GPU found".
    """

    preset: str
    reason: str

    def message(self) -> str:
        """One line for the console, with the flag that asks for the other preset."""
        if self.preset == "cpu":
            other = "--preset full for the long GPU run"
        else:
            other = "--preset cpu for a short run"
        return f"preset: {self.preset} ({self.reason}; {other})"


def choose_preset(
    device: str = "auto", cuda_available: Callable[[], bool] | None = None
) -> PresetChoice:
    """The preset that suits the device a run will use: "full" on CUDA, "cpu" anywhere else.

    Args:
        device: the run's device spec ("auto", "cpu", "cuda", "cuda:N", "mps"); a spec that
            names a device decides alone, "auto" asks ``cuda_available``. An invalid spec
            counts as not CUDA (the config check reports it).
        cuda_available: whether a CUDA GPU is usable (default ``torch.cuda.is_available``);
            called only for "auto".
    """
    text = device.strip().lower()
    if text == "auto":
        if (cuda_available or torch.cuda.is_available)():
            return PresetChoice("full", "CUDA GPU found")
        return PresetChoice("cpu", "no CUDA GPU found")
    if text == "cuda" or _CUDA_INDEX.fullmatch(text):
        return PresetChoice("full", f"run.device is {text}")
    return PresetChoice("cpu", f"run.device is {text}")


def slow_settings_warning(device: torch.device, preset: str) -> str | None:
    """A warning when the GPU settings are about to train off CUDA, else ``None``.

    Args:
        device: the resolved training device.
        preset: the run's preset name ("" for the plain defaults, which are the full run).
    """
    if device.type == "cuda" or preset == "cpu":
        return None
    settings = f"the {preset} preset is" if preset else "the default (full) settings are"
    return (
        f"{settings} made for a CUDA GPU and will be slow on {device.type}; "
        "--preset cpu trains a narrow model on a short schedule"
    )
