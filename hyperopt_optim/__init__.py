"""Drop-in PyTorch optimizers that learn their own hyperparameters while they train.

Change ``torch.optim.SGD`` to :class:`HyperSGD` (or Adam/AdamW to :class:`HyperAdam` /
:class:`HyperAdamW`), hand ``step`` a validation closure, and the learning rate, momentum,
weight decay, betas and eps — one per group, per tensor or per weight — are tuned by
hypergradient descent during the one run.
"""

from .adam import HyperAdam, HyperAdamW
from .optimizer import HyperOptimizer
from .sgd import HyperSGD
from .shared_adam import SharedAdam
from .sign_step import SignStep

__all__ = [
    "HyperAdam",
    "HyperAdamW",
    "HyperOptimizer",
    "HyperSGD",
    "SharedAdam",
    "SignStep",
    "__version__",
]

__version__ = "0.1.0"
