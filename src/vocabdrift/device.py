"""Where tensors are computed: CUDA when present (users bring their own torch), else the CPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def best_device(requested: str | None = None) -> torch.device:
    """`requested` if given ("cpu", "cuda:1"), else the first CUDA device, else Apple's MPS, else the CPU."""
    import torch

    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
