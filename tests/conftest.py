"""Shared test configuration: float64 by default in the maths tests, CUDA skipping, Hypothesis
profiles ("default": quick and derandomized, as CI runs; "thorough": many more examples)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# One torch thread unless HYPEROPT_TEST_THREADS says otherwise: the tests' models are tiny, and
# on a busy two-core machine torch's default (every core) made the suite 2-3x slower.
torch.set_num_threads(int(os.environ.get("HYPEROPT_TEST_THREADS", "1")))

CUDA = torch.cuda.is_available()

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip)
