"""The docstring examples run (optax's discipline: a doctest that runs in CI)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import hyperopt_optim

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(hyperopt_optim.__path__, prefix="hyperopt_optim.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_public_names_are_documented() -> None:
    for name in hyperopt_optim.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(hyperopt_optim, name)
        assert obj.__doc__, name
        assert len(obj.__doc__.strip()) > 40, name
