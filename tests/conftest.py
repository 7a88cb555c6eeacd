"""Test-session setup shared by every tier."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache entries (and recompile counts) carried over
    from other tests that happen to share a forward's code object."""
    torch._dynamo.reset()
    yield
