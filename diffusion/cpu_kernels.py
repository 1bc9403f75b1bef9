"""CPU fast paths for the tiny feature maps and short sequences of small U-Nets, kept apart from the model's
definition and swapped in at build time by :func:`install` (the pipelines do it for models that run on a CPU).

Each replaces a reference op with an exact equivalent that a CPU runs faster at these sizes (measured in
``BENCHMARKS.md`` and ``docs/experiments/cpu-step-speed.md``); the tests compare each with its reference, forward
and backward. Every path checks its inputs and falls through to the reference op for anything else (CUDA
tensors, larger maps), so an installed network stays correct wherever its tensors live.

* :class:`TinyMapGroupNorm`: group norm of maps of at most 4 positions as one layer-norm row per group.
* :class:`TinyMapConv2d`: a 3×3 convolution of a 2×2 map as one dense matrix product.
* :func:`small_cpu_attention`: attention whose logits fit in ``SMALL_CPU_LOGITS`` elements as two batched matrix
  products.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.attention import attention, resolve_backend

SMALL_CPU_LOGITS = 1 << 21  # logits [B, heads, Lq, Lk] of at most this many elements (8 MiB in float32)


class TinyMapGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters) that normalises maps of ≤ 4 positions on the CPU as layer-norm rows:
    PyTorch's CPU group-norm kernel is slow there."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or x.shape[2] * x.shape[3] > 4:
            return super().forward(x)
        n, c = x.shape[:2]
        y = F.layer_norm(x.reshape(n, self.num_groups, -1), (c // self.num_groups * x.shape[2] * x.shape[3],),
                         eps=self.eps).view_as(x)
        if not self.affine:
            return y
        return torch.addcmul(self.bias.view(1, c, 1, 1), y, self.weight.view(1, c, 1, 1))


def _taps_2x2() -> Tensor:
    """``[9, 16]`` zeros and ones: which of the 3×3 kernel taps joins output position ``p`` to input position ``q``
    of a 2×2 map (column ``4p + q``, positions row-major); a matrix product with it gathers the kernel into the
    dense matrix, and its backward is another matrix product (an indexed gather's is a slow scatter-add)."""
    row, col = torch.arange(4) // 2, torch.arange(4) % 2
    tap = (row[None, :] - row[:, None] + 1) * 3 + (col[None, :] - col[:, None] + 1)  # [output, input]
    return F.one_hot(tap.flatten(), 9).T.float()


_TAPS_2X2 = _taps_2x2()


class TinyMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters) that runs a 3×3, stride-1, padding-1 convolution of a 2×2 map on the CPU
    as one dense ``[c_out·4, c_in·4]`` matrix product: on a 2×2 map every output position sees every input
    position through the tap at their offset, so 4 taps a position are used instead of 9."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type != "cpu" or x.dim() != 4 or tuple(x.shape[2:]) != (2, 2) or self.kernel_size != (3, 3)
                or self.stride != (1, 1) or self.padding != (1, 1) or self.dilation != (1, 1) or self.groups != 1):
            return super().forward(x)
        n, c = x.shape[:2]
        taps = (self.weight.flatten(2) @ _TAPS_2X2.to(self.weight)).view(self.out_channels, c, 4, 4)
        matrix = taps.permute(0, 2, 1, 3).reshape(self.out_channels * 4, c * 4)  # [(c_out, output), (c_in, input)]
        bias = None if self.bias is None else self.bias.repeat_interleave(4)
        return F.linear(x.reshape(n, c * 4), matrix, bias).view(n, self.out_channels, 2, 2)


def small_on_cpu(q: Tensor, k: Tensor) -> bool:
    """Whether a CPU float32/64 problem's logits have at most ``SMALL_CPU_LOGITS`` elements."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)
            and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= SMALL_CPU_LOGITS)


def batched_matmul_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """``softmax(q kᵀ/√d + bias) v`` as two batched matrix products (the bias added inside the first, ``baddbmm``)
    in the inputs' dtype: PyTorch's CPU flash kernel works in blocks sized for long sequences, and with a bias
    that needs a gradient SDPA takes a math path that checks for fully masked rows at every call."""
    b, heads, lq, d = q.shape
    lk = k.shape[2]
    q3, k3, v3 = q.reshape(b * heads, lq, d), k.reshape(b * heads, lk, d), v.reshape(b * heads, lk, d)
    if bias is None:
        logits = torch.bmm(q3, k3.transpose(1, 2)).mul_(d**-0.5)
    else:
        bias = bias.to(q.dtype).expand(b, heads, lq, lk)
        logits = torch.baddbmm(bias.reshape(b * heads, lq, lk), q3, k3.transpose(1, 2), alpha=d**-0.5)
    return torch.bmm(logits.softmax(dim=-1), v3).view(b, heads, lq, d)


def small_cpu_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, backend: str = "auto") -> Tensor:
    """:func:`diffusion.attention.attention`, with small CPU problems of the ``sdpa`` backend run by
    :func:`batched_matmul_attention`."""
    if resolve_backend(backend, q.device) == "sdpa" and small_on_cpu(q, k):
        return batched_matmul_attention(q, k, v, bias)
    return attention(q, k, v, bias, backend)


def install(net: nn.Module) -> nn.Module:
    """Swap the fast paths into ``net`` in place (same parameters, same state dict) and return it: its group norms
    and 3×3 convolutions become the tiny-map classes above, and every block with an ``attend`` function (the
    U-Net's attention blocks) runs :func:`small_cpu_attention`."""
    for module in net.modules():
        if type(module) is nn.GroupNorm:
            module.__class__ = TinyMapGroupNorm
        elif type(module) is nn.Conv2d and module.kernel_size == (3, 3):
            module.__class__ = TinyMapConv2d
        if getattr(module, "attend", None) is not None:
            module.attend = partial(small_cpu_attention, backend=module.backend)
    return net
