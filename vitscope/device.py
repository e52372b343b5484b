"""Where computation runs, and how the host's memory allocator serves it."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4


def resolve_device(name: str) -> torch.device:
    """'auto' means the GPU when there is one, else the CPU; anything else is a torch device
    name ('cpu', 'cuda', 'cuda:1', ...)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation instead of returning it to
    the kernel. Returns whether it could (False off glibc).

    PyTorch's CPU tensors come straight from malloc, and glibc serves every block above 32 MiB
    with its own ``mmap`` and gives it back on free. A training step on the CPU allocates such
    blocks again and again (an SAE's [batch, d_sae] pre-activations are 256 MiB at batch 4096
    and d_sae 16,384), so each step page-faulted and zeroed them anew: a third of a step's time
    went to the kernel. With mmap off and no trimming, freed blocks return to malloc's heap and
    the next step reuses them. The price is that the process keeps its peak heap until it ends,
    which is why only a process that trains on the CPU calls this (process-wide, once)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if not ok:
        log.debug("mallopt refused; freed memory goes back to the kernel")
    return ok
