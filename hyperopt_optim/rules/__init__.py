"""Update rules: the mathematics of each optimizer's step as pure functions over lists."""

from ._base import Hyper, RuleState, StateCotangent, UpdateRule
from .adam import AdamRule
from .sgd import SGDRule

__all__ = ["AdamRule", "Hyper", "RuleState", "SGDRule", "StateCotangent", "UpdateRule"]
