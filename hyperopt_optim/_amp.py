"""Mixed precision: the optimizer and a ``torch.amp.GradScaler``.

torch's ``scaler.step(opt)`` refuses a closure, and without one a hyper-step can take no
Hessian-vector product.  So an optimizer given ``grad_scaler=`` runs the scaler's part of the
step itself: the closure's ``backward()`` leaves gradients of the scaled loss ``S·L``; the
optimizer unscales them with ``scaler.unscale_(opt)`` (which records for ``scaler.update()``
whether an inf or NaN was found) and skips the whole step when one was, as ``scaler.step``
would.  The losses it differentiates itself — a closure that only returns the loss, the
validation loss, the gradients of finite differences — are scaled by the same ``S`` and their
gradients and products divided by it: ``S`` is a power of two, so this is exact wherever nothing
overflows, and keeps float16 intermediates in range.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["check_grad_scaler", "found_inf"]


def check_grad_scaler(scaler: Any) -> Any:
    """``None`` or something with ``torch.amp.GradScaler``'s interface."""
    if scaler is None:
        return None
    needed = ("scale", "unscale_", "update", "get_scale", "is_enabled")
    missing = [name for name in needed if not callable(getattr(scaler, name, None))]
    if missing:
        raise TypeError(
            "grad_scaler must be a torch.amp.GradScaler (it lacks "
            f"{', '.join(missing)}), got {type(scaler).__name__}"
        )
    return scaler


def found_inf(scaler: Any, optimizer: Any) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` found an inf or NaN (one host sync)."""
    try:
        found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        return bool(sum(float(v) for v in found.values()))
    except (AttributeError, KeyError, TypeError):  # a scaler that keeps them elsewhere
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return not all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
