"""How the tests compare tensors."""

from __future__ import annotations

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference, relative to the reference's largest magnitude."""
    return float((a - b).abs().max() / b.abs().max())
