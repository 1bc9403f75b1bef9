"""The installed environment matches pyproject.toml: the pinned torch, xformers kernels that load with it, and the
attention backend falling back to SDPA (with one warning) when they do not."""

from __future__ import annotations

import importlib.metadata
import warnings
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

import diffusion.attention as attention

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def _requirement(name: str) -> Requirement:
    """The dependency ``name`` as pyproject.toml declares it."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    found = [Requirement(d) for d in dependencies if Requirement(d).name == name]
    assert len(found) == 1, f"pyproject.toml should declare {name} once, found {len(found)}"
    return found[0]


def _pinned(requirement: Requirement) -> Version:
    specifiers = list(requirement.specifier)
    assert len(specifiers) == 1 and specifiers[0].operator == "==", f"{requirement} is not an exact pin"
    return Version(specifiers[0].version)


def test_the_installed_torch_is_the_pinned_one():
    pinned = _pinned(_requirement("torch"))
    installed = Version(importlib.metadata.version("torch"))
    assert Version(installed.public) == pinned, f"torch {installed} is installed, pyproject.toml pins {pinned}"
    assert Version(Version(torch.__version__).public) == pinned  # the one this process imported


def test_xformers_kernels_load_with_the_installed_torch():
    requirement = _requirement("xformers")
    if requirement.marker is not None and not requirement.marker.evaluate():
        pytest.skip(f"pyproject.toml installs xformers only where {requirement.marker}")
    import xformers

    assert Version(importlib.metadata.version("xformers")) == _pinned(requirement)
    assert xformers._has_cpp_library is True, (
        f"xformers {xformers.__version__} loaded no compiled kernels with torch {torch.__version__}: it was built "
        f"for another torch (see the torch pin in pyproject.toml)")


@pytest.fixture
def fresh_caches():
    """Both lru caches empty before and after, so neither the test nor the rest of the session sees stale answers."""
    attention._xformers_ops.cache_clear()
    attention._warn_no_xformers.cache_clear()
    yield
    attention._xformers_ops.cache_clear()
    attention._warn_no_xformers.cache_clear()


def _resolve_twice(device: str) -> tuple[list[str], list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = [attention.resolve_backend("auto", torch.device(device)) for _ in range(2)]
    return names, caught


def test_auto_falls_back_to_sdpa_on_cuda_with_exactly_one_warning(fresh_caches, monkeypatch):
    monkeypatch.setattr(attention, "_xformers_ops", lambda: None)  # xformers reports no kernels
    names, caught = _resolve_twice("cuda")  # a device object only: no GPU is needed to resolve
    assert names == ["sdpa", "sdpa"]
    assert len(caught) == 1 and "attention runs on PyTorch SDPA" in str(caught[0].message), \
        [str(w.message) for w in caught]
    assert not attention.xformers_available()


def test_an_xformers_build_without_kernels_counts_as_absent(fresh_caches, monkeypatch):
    """The real ``_xformers_ops`` on an xformers that imports but loaded no kernels (built for another torch)."""
    xformers = pytest.importorskip("xformers")
    monkeypatch.setattr(xformers, "_has_cpp_library", False)
    assert attention._xformers_ops() is None
    names, caught = _resolve_twice("cuda")
    assert names == ["sdpa", "sdpa"] and len(caught) == 1


def test_auto_is_sdpa_without_a_warning_for_cpu_tensors(fresh_caches, monkeypatch):
    names, caught = _resolve_twice("cpu")
    assert names == ["sdpa", "sdpa"] and caught == []
    monkeypatch.setattr(attention, "_xformers_ops", lambda: None)
    names, caught = _resolve_twice("cpu")
    assert names == ["sdpa", "sdpa"] and caught == []


def test_auto_picks_xformers_on_cuda_when_its_kernels_load(fresh_caches, monkeypatch):
    monkeypatch.setattr(attention, "_xformers_ops", lambda: object())  # stands in for xformers.ops
    names, caught = _resolve_twice("cuda")
    assert names == ["xformers", "xformers"] and caught == []


def test_auto_is_sdpa_on_cuda_under_deterministic_algorithms(fresh_caches, monkeypatch):
    """``run.deterministic``: PyTorch's attention kernels have deterministic backward passes, xformers' do not."""
    monkeypatch.setattr(attention, "_xformers_ops", lambda: object())
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    names, caught = _resolve_twice("cuda")
    assert names == ["sdpa", "sdpa"] and caught == []
