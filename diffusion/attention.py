"""Multi-head attention with an optional additive float bias, on three interchangeable backends.

* ``xformers``: ``xformers.ops.memory_efficient_attention`` for CUDA tensors (imported lazily: xformers
  imports on CPU but has no CPU kernels).
* ``sdpa``: PyTorch's ``scaled_dot_product_attention`` (flash / memory-efficient / CPU kernels).
* ``math``: the plain reference ``softmax(q kᵀ/√d + bias) v``, for tests.

Everything takes ``q, k, v`` as ``[B, heads, L, d]`` and a bias broadcastable to ``[B, heads, Lq, Lk]``.
The temporal attention's relative-position term and image mask arrive here as that bias, so they run through
the efficient kernels too. Large batches are split so no kernel launch exceeds CUDA's grid limit
(65 535 blocks along a grid's y and z axes, which bounds xformers' batch).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion.config import BACKENDS
from diffusion.config import AttentionBackend as Backend

MAX_CUDA_BATCH = 32_768  # below the 65 535 grid limit, with room for the heads axis of some kernels


@functools.lru_cache(maxsize=1)
def _xformers_ops():
    """``xformers.ops`` when xformers imports *and* its compiled kernels loaded, else ``None``.

    An xformers wheel built for another torch imports fine but loads no kernels (``_has_cpp_library`` is
    False, with a warning of its own); every attention call would then fail, so it counts as absent.
    """
    try:
        import xformers  # noqa: PLC0415 (lazy on purpose)
        import xformers.ops as xops  # noqa: PLC0415
    except Exception:  # a broken build raises more than ImportError
        return None
    return xops if getattr(xformers, "_has_cpp_library", False) else None


def xformers_available() -> bool:
    """True when xformers' memory-efficient attention can run (imported, kernels loaded)."""
    return _xformers_ops() is not None


@functools.lru_cache(maxsize=1)
def _warn_no_xformers() -> None:
    """One warning line per process when ``auto`` falls back to SDPA on CUDA."""
    warnings.warn("xformers' kernels are not available (not installed, or built for another torch): "
                  "attention runs on PyTorch SDPA", stacklevel=3)


def resolve_backend(backend: Backend, device: torch.device) -> str:
    """``auto`` → ``xformers`` for CUDA tensors when its kernels load, else ``sdpa`` (one warning on CUDA); ``sdpa``
    under ``torch.use_deterministic_algorithms``, which PyTorch's kernels obey and xformers' do not (its
    memory-efficient backward adds the bias gradient in no fixed order)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda" or torch.are_deterministic_algorithms_enabled():
            return "sdpa"
        if xformers_available():
            return "xformers"
        _warn_no_xformers()
        return "sdpa"
    if backend == "xformers" and device.type != "cuda":
        raise ValueError("the xformers backend needs CUDA tensors (xformers has no CPU kernels)")
    return backend


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, backend: Backend = "auto") -> Tensor:
    """``softmax(q kᵀ / √d + bias) v`` for ``[B, heads, L, d]`` inputs; returns ``[B, heads, Lq, d]``."""
    name = resolve_backend(backend, q.device)
    if bias is not None:
        bias = bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    kernel = {"xformers": _xformers_attention, "sdpa": _sdpa_attention, "math": math_attention}[name]
    if q.device.type != "cuda" or q.shape[0] <= MAX_CUDA_BATCH:
        return kernel(q, k, v, bias)
    chunks = [
        kernel(q[i : i + MAX_CUDA_BATCH], k[i : i + MAX_CUDA_BATCH], v[i : i + MAX_CUDA_BATCH],
               None if bias is None else bias[i : i + MAX_CUDA_BATCH])
        for i in range(0, q.shape[0], MAX_CUDA_BATCH)
    ]
    return torch.cat(chunks)


def math_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference attention in float32 arithmetic."""
    logits = torch.einsum("bhid,bhjd->bhij", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias.float()
    return torch.einsum("bhij,bhjd->bhid", logits.softmax(dim=-1), v.float()).to(q.dtype)


def _sdpa_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """PyTorch's fused kernel; a float ``attn_mask`` is added to the logits."""
    # contiguous inputs: with strided views (the U-Net's rearranges) the CPU falls back to the math path
    return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=bias)


def _xformers_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """xformers' memory-efficient kernel. It wants ``[B, L, heads, d]`` and a bias whose last dimension is
    stored with a stride that is a multiple of 8, so the bias is copied into a padded buffer and sliced."""
    xops = _xformers_ops()
    if xops is None:
        raise RuntimeError("xformers is not installed, or its kernels did not load (it must be built for this torch)")
    if bias is not None:
        lk = bias.shape[-1]
        padded = bias.new_empty(*bias.shape[:-1], -(-lk // 8) * 8)
        padded[..., :lk] = bias
        bias = padded[..., :lk]
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)
