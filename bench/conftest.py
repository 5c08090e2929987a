"""Shared setup of the pytest-benchmark cases: thread count and case pairing."""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--threads", type=int, default=None, help="torch.set_num_threads for the benchmarks")


def pytest_configure(config):
    threads = config.getoption("--threads")
    if threads:
        torch.set_num_threads(threads)
    from unetx.ops import algo_choice

    algo_choice.measure_afresh()  # as `unetx bench`: this session measures its own convolution choices
    # many compiled variants of the same functions and module classes
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
