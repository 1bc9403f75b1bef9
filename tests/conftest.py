"""Shared test fixtures: deterministic seeds and small thread counts on CPU."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
