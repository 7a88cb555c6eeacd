"""Test-session setup shared by every tier."""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "no_dynamo_reset: run without resetting dynamo first, so that compiles "
        "accumulate in the process as in real use (many compiles, shared code objects)")


@pytest.fixture(autouse=True)
def _fresh_dynamo(request):
    """Each test compiles from scratch: no cache entries (and recompile counts) carried over
    from other tests that happen to share a forward's code object. Tests marked
    `no_dynamo_reset` opt out: they prove that compiles keep working in a long-lived process."""
    if request.node.get_closest_marker("no_dynamo_reset") is None:
        torch._dynamo.reset()
    yield
