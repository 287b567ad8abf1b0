"""Data-parallel training: what every rank must agree on, and the reductions that make it so.

Under ``torch.distributed`` each rank trains the same replica on its own shard of the training
and validation data.  torch's ``DistributedDataParallel`` averages the gradients that a
``backward()`` leaves in ``.grad``; everything else that decides the learned values is taken by
the optimizer itself and must be averaged here, or the replicas drift apart:

- the gradients the optimizer takes with ``torch.autograd.grad`` (a closure that only returns
  the loss, ``loss_fn``, and the gradients of finite differences), which DDP's hooks never see;
- exact Hessian-vector products (each rank's is the product of its own shard's Hessian);
- the validation loss and its gradient (a rank's own validation shard);
- every decision taken on a loss: a non-finite validation loss skips the hyper-step on every
  rank, and the divergence guard judges the mean training loss of all ranks.

With those averaged, every rank computes the same hypergradient from the same numbers, so the
weights and learned values stay bitwise identical: the averaged validation gradient makes the
Neumann series' direction the same on every rank, and the products of the averaged Hessian
keep it so.  A gradient that a closure's ``backward()`` left is trusted to be reduced already
(DDP does); :class:`Replicas` checks that once, and checks the weights every
``check_interval`` steps, so a set-up that drifts (a model not wrapped in DDP, ``no_sync``,
sharded parameters) stops with an error instead of training on silently.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["Replicas", "resolve_process_group"]


def _distributed() -> Any:
    import torch.distributed as dist

    return dist


def resolve_process_group(process_group: object) -> Replicas | None:
    """The replicas an optimizer averages over, from its ``process_group`` argument.

    ``None``: the default group when ``torch.distributed`` is initialised with more than one
    rank, else none.  ``False``: none (each rank learns on its own).  ``True``: the default
    group, which must be initialised.  A ``ProcessGroup``: that group.
    """
    available = torch.distributed.is_available()
    if process_group is False:
        return None
    if process_group is None:
        if not available or not _distributed().is_initialized():
            return None
        group = None
    elif process_group is True:
        if not available or not _distributed().is_initialized():
            raise ValueError(
                "process_group=True needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group)"
            )
        group = None
    else:
        if not available or not isinstance(process_group, _distributed().ProcessGroup):
            raise TypeError(
                "process_group must be None (the default group when torch.distributed is "
                "initialised), True, False or a torch.distributed.ProcessGroup, got "
                f"{process_group!r}"
            )
        group = process_group
    size = _distributed().get_world_size(group)
    return Replicas(group, size) if size > 1 else None


def check_not_sharded(p: Tensor, name: str) -> None:
    """Refuse a parameter that holds a shard of a larger tensor (FSDP, tensor parallelism):
    the learned values are reductions over whole tensors, which a shard cannot give."""
    if getattr(p, "_is_flat_param", False):
        raise TypeError(
            f"{name} does not support FullyShardedDataParallel's flat parameters: each rank "
            "holds a shard, and the learned values need whole tensors; use "
            "DistributedDataParallel"
        )
    dtensor = available_dtensor()
    if dtensor is not None and isinstance(p, dtensor):
        raise TypeError(
            f"{name} does not support DTensor parameters (FSDP2, tensor parallelism): each rank "
            "holds a shard, and the learned values need whole tensors; use "
            "DistributedDataParallel"
        )


def available_dtensor() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # an old torch, or one built without distributed
        return None
    return DTensor


class Replicas:
    """The ranks of a process group that train one replica each.

    Args:
        group: the process group (``None``: the default one).
        size: its number of ranks (more than one).
    """

    #: steps between checks that the replicas' weights still agree
    check_interval = 100

    def __init__(self, group: Any, size: int) -> None:
        self.group = group
        self.size = size
        self._checked_grads = False

    def mean_(self, tensors: list[Tensor]) -> list[Tensor]:
        """Average ``tensors`` over the ranks, in place (one collective per dtype and device)."""
        dist = _distributed()
        by_kind: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for x in tensors:
            by_kind.setdefault((x.dtype, x.device), []).append(x)
        for xs in by_kind.values():
            flat = torch.cat([x.reshape(-1) for x in xs])
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.size)
            offset = 0
            for x in xs:
                n = x.numel()
                x.copy_(flat[offset : offset + n].view_as(x))
                offset += n
        return tensors

    def mean(self, tensors: list[Tensor]) -> list[Tensor]:
        """The average over the ranks of ``tensors`` (new tensors)."""
        return self.mean_([x.detach().clone() for x in tensors])

    def mean_loss(self, value: Tensor) -> Tensor:
        """The average over the ranks of a scalar loss (detached; non-finite when any rank's
        is)."""
        total = value.detach().reshape(1).clone()
        _distributed().all_reduce(total, group=self.group)
        return (total / self.size).reshape(())

    def check_same(self, tensors: list[Tensor], what: str, fix: str) -> bool:
        """Raise when ``tensors`` differ between the ranks (compared by a checksum); whether
        they could be compared (``False``: a checksum is not finite, the guard's business).
        Every rank takes part in the collective, even one with no tensors."""
        device = tensors[0].device if tensors else torch.device("cpu")
        with torch.no_grad():  # summed where the tensors are: one host sync, at the collective
            total = torch.zeros((), dtype=torch.float64, device=device)
            for x in tensors:
                total += x.detach().sum(dtype=torch.float64).to(device)
            both = torch.stack([total, -total])
        _distributed().all_reduce(both, op=_distributed().ReduceOp.MAX, group=self.group)
        high, low = float(both[0]), -float(both[1])
        if not (math.isfinite(high) and math.isfinite(low)):
            return False
        if high == low:
            return True
        raise RuntimeError(
            f"{what} differ between the ranks of the process group (checksums {low!r} to "
            f"{high!r}), so the replicas would drift apart: {fix}"
        )

    def check_gradients(self, grads: list[Tensor]) -> None:
        """Once (again while a checksum is not finite): the gradients a closure's ``backward()``
        left must be averaged already."""
        if self._checked_grads:
            return
        self._checked_grads = self.check_same(
            grads,
            "the gradients the training closure's backward() left in .grad",
            "wrap the model in torch.nn.parallel.DistributedDataParallel (which averages them "
            "in backward()), or return the loss from the closure without calling backward() "
            "(the optimizer then averages the gradients itself)",
        )

    def check_weights(self, params: list[Tensor], step: int) -> None:
        """Every :attr:`check_interval` steps: the weights must be the same on every rank."""
        if step % self.check_interval:
            return
        self.check_same(
            params,
            f"the weights at step {step}",
            "start every rank from the same weights (DistributedDataParallel broadcasts them "
            "when it wraps the model), do not shard the parameters (FSDP), and do not change "
            "them on one rank only",
        )
