"""On a GPU, a step that is not a hyper-step makes no host synchronisation.

Between hyper-steps the optimizer only launches kernels: the update reads the learned values as
Python floats, and the divergence guard adds the loss to a sum on the device.  A hyper-step
synchronises a few times by design (the validation loss decides whether it is skipped, and a
non-finite hypergradient must not move the learned values).  Written for a CUDA machine; it
skips without one.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

from hyperopt_optim import HyperAdam, HyperSGD

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("cls", [HyperSGD, HyperAdam])
@pytest.mark.parametrize("method", ["greedy", "ift"])
def test_steps_between_hyper_steps_do_not_synchronise(cls: type, method: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).cuda()
    x, y = torch.randn(64, 32, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    xv, yv = torch.randn(64, 32, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    opt = cls(net.parameters(), lr=0.01, method=method, update_interval=10)
    opt.register_validation_closure(lambda: cross_entropy(net(xv), yv))

    def closure() -> Tensor:
        opt.zero_grad()
        loss = cross_entropy(net(x), y)
        loss.backward()
        return loss

    for _ in range(10):  # the state is created, the first hyper-step taken
        opt.step(closure)
    for t in range(10, 30):
        hyper_step = (t + 1) % 10 == 0
        torch.cuda.set_sync_debug_mode(0 if hyper_step else "error")
        try:
            opt.step(closure)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert opt.hyper_state["hyper_steps"] == 3
