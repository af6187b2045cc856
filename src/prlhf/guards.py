"""Non-finite values (NaN, inf): one error type, one check."""

from __future__ import annotations

import torch


class NonFiniteError(RuntimeError):
    """A loss, gradient, log-prob or weight that is NaN or infinite (``prlhf train`` exits with 3)."""


def check_finite(tensors: dict, what: str) -> None:
    """Raise ``NonFiniteError`` naming the first tensor of ``tensors`` holding NaN or inf."""
    for name, t in tensors.items():
        if t is not None and torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"non-finite values (NaN or inf) in {what}: {name}")
