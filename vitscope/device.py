"""Where computation runs."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' means the GPU when there is one, else the CPU; anything else is a torch device
    name ('cpu', 'cuda', 'cuda:1', ...)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
