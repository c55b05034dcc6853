"""Choosing the compute device from a user's --device value."""

from __future__ import annotations

import os

import torch

from semiseg.errors import InputError


def resolve_device(name: str = "auto") -> torch.device:
    """auto -> cuda if available, else mps, else cpu; explicit names are checked, not silently replaced."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device '{name}' asked for, but no CUDA GPU is available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device '{name}' asked for, but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' asked for, but Apple MPS is not available here (use --device cpu)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unsupported device '{name}' (use auto, cpu, cuda, cuda:N or mps)")
    return device


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a new computation on the device (None when it cannot be told)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
