"""The methods by name: ``method="ift"`` and the others resolve here.

A new method registers its class with :func:`register_method` (in
:mod:`hyperopt_optim.hypergradients`); :func:`build_method` refuses the options that belong to
other methods, checks the product provider, and lets the class check and take its own.
"""

from __future__ import annotations

from collections.abc import Callable

from ._base import HypergradientMethod, MethodOptions

__all__ = ["HVP_NOTES", "METHODS", "build_method", "methods_where", "register_method"]

HVP_NOTES = {
    "autograd_batched": " takes the products of all tangent columns in one batched backward",
}
"""What a provider that only some methods use does, for the message that refuses it."""

METHODS: dict[str, type[HypergradientMethod]] = {}
"""name -> the class that implements it (one class may serve several names)."""


def register_method(name: str, cls: type[HypergradientMethod]) -> None:
    """Make ``method=name`` build ``cls`` (through ``cls.from_options``)."""
    if name in METHODS:
        raise ValueError(f"method {name!r} is registered already ({METHODS[name].__name__})")
    METHODS[name] = cls


def methods_where(test: Callable[[type[HypergradientMethod]], bool]) -> str:
    """The registered methods whose class passes ``test``, as a message names them:
    ``method='forward'``, or ``one of the methods ('a', 'b')``."""
    names = [name for name, cls in METHODS.items() if test(cls)]
    return f"method={names[0]!r}" if len(names) == 1 else f"one of the methods {tuple(names)}"


def build_method(options: MethodOptions) -> HypergradientMethod:
    """The method ``options.method``, with its options checked (the provider first, then the
    method's own, then those of other methods).

    Raises:
        ValueError: an option of another method was given, or ``hvp`` is a provider the
            method cannot use.
    """
    cls = METHODS[options.method]
    if options.hvp not in cls.hvp_providers:
        users = methods_where(lambda c: options.hvp in c.hvp_providers)
        raise ValueError(
            f"hvp={options.hvp!r}{HVP_NOTES.get(options.hvp, '')}: it is for {users}, not "
            f"method={options.method!r} (use 'autograd')"
        )
    method = cls.from_options(options)
    foreign = [(k, v) for k, v in options.extra.items() if v is not None and k not in cls.options]
    if foreign:
        option, value = foreign[0]
        owners = methods_where(lambda c: option in c.options)
        raise ValueError(
            f"{option}={value!r} is an option of {owners}, not method={options.method!r}"
        )
    method.name = options.method
    return method
