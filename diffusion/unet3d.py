"""The factorised space-time 3-D U-Net of Ho et al. 2022 (*Video Diffusion Models*, §3, Fig. 1).

Every 3×3 convolution is a 1×3×3 (space-only) convolution, run as a 2-D convolution over frames folded into
the batch; each spatial attention block (frames as batch) is followed by a temporal attention block (spatial
positions as batch) with relative position embeddings over frame distance (Shaw et al. 2018), so the network
needs no absolute frame time and runs on any number of frames. The noise level λ_t and the conditioning
embedding go through an MLP and are added into every residual block.

Temporal attention starts as the identity (zero-initialised output projection), and every other layer acts on
each frame alone, so at initialisation the network on a video equals the network applied frame by frame.
Joint image–video training appends independent images after the video frames; temporal attention is masked so
each image attends only to itself (paper §3, "image mode").

With ``known_frames`` the network is also trained for conditional generation: the clean latents of the frames
a sample is conditioned on (zeros elsewhere) and their mask enter as extra input channels: the concatenation
conditioning of Imagen Video's cascades and of Harvey et al. 2022 (*Flexible Diffusion Modeling of Long
Videos*), where paper §3.1 conditions a model trained only on whole clips. The two combine: reconstruction
guidance runs on such a network unchanged.

Layout: input and output are ``[b, c, f, h, w]``; inside, activations are ``[(b f), c, h, w]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffusion.attention import attention
from diffusion.config import UNet3DConfig


@dataclass
class FrameState:
    """What every block needs besides its activations: computed once per forward pass."""

    emb: Tensor  # [(b f), emb_dim]: noise level + conditioning, one row per frame
    num_frames: int
    context: Optional[Tensor] = None  # [b, n, context_dim] (shared by a sample's frames) or [b, f, n, context_dim]
    temporal_mask: Optional[Tensor] = None  # [f, f] additive (0 / −inf): the joint-training image mask


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters, so its residual branch starts as nothing."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def pointwise(conv: nn.Conv2d, tokens: Tensor) -> Tensor:
    """A 1×1 convolution applied to channel-last tokens ``[..., c_in] -> [..., c_out]`` as one matrix product.

    Attention works on tokens anyway, so its projections skip the NCHW convolution and its layout changes while
    keeping the ``Conv2d`` parameters, so checkpoints load unchanged."""
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


def noise_level_features(logsnr: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of λ_t: ``[b] -> [b, dim]``, frequencies geometric from 10 down to 0.01 so the
    whole clipped range λ ∈ [−20, 20] is resolved."""
    half = dim // 2
    freqs = 10.0 * torch.exp(-math.log(1000.0) * torch.arange(half, device=logsnr.device) / max(half - 1, 1))
    angles = logsnr.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ConditionEmbedding(nn.Module):
    """λ_t and the conditioning vector c, projected, summed and passed through an MLP (paper §3: "an embedding
    vector passed through an MLP (2 or 4 layers) and added into every residual block")."""

    def __init__(self, base: int, emb_dim: int, cond_dim: int, layers: int):
        super().__init__()
        self.base = base
        self.noise_proj = nn.Linear(base, emb_dim)
        self.cond_proj = nn.Linear(cond_dim, emb_dim) if cond_dim > 0 else None
        self.mlp = nn.Sequential(*[m for _ in range(layers - 1) for m in (nn.SiLU(), nn.Linear(emb_dim, emb_dim))])

    def forward(self, logsnr: Tensor, cond: Optional[Tensor], extra: Optional[Tensor] = None) -> Tensor:
        """``[b]``, ``[b, cond_dim]`` (and an ``extra`` input ``[b, emb_dim]`` added before the MLP) →
        ``[b, emb_dim]``."""
        h = self.noise_proj(noise_level_features(logsnr, self.base))
        if extra is not None:
            h = h + extra.to(h.dtype)
        if self.cond_proj is not None:
            if cond is None:
                raise ValueError("this U-Net is conditional (cond_dim > 0): pass cond [b, cond_dim]")
            h = h + self.cond_proj(cond.to(h.dtype))
        return self.mlp(h)


class ResBlock(nn.Module):
    """GN → SiLU → 1×3×3 conv → GN scaled and shifted by the embedding → SiLU → dropout → 1×3×3 conv, plus a skip
    (the conditioning embedding enters every residual block, paper §3, as a FiLM of the second norm)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = _group_norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = _group_norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, state: FrameState) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(F.silu(state.emb))[:, :, None, None].to(h.dtype)  # [(b f), 2c, 1, 1]
        scale, shift = e.chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(self.dropout(F.silu(h)))


class SpatialAttention(nn.Module):
    """Self-attention over the ``h·w`` positions of each frame (frames as batch), then optional
    cross-attention to token embeddings."""

    def __init__(self, channels: int, head_dim: int, groups: int, context_dim: int, backend: str):
        super().__init__()
        self.heads, self.backend = max(channels // head_dim, 1), backend
        self.attend = partial(attention, backend=backend)  # diffusion.cpu_kernels.install may swap in a fast path
        self.norm = _group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))
        self.cross = CrossAttention(channels, context_dim, self.heads, groups, backend) if context_dim else None

    def forward(self, x: Tensor, state: FrameState) -> Tensor:
        n, c, h, w = x.shape
        qkv = pointwise(self.qkv, rearrange(self.norm(x), "n c h w -> n (h w) c"))
        q, k, v = rearrange(qkv, "n l (three m d) -> three n m l d", three=3, m=self.heads).unbind(0)
        out = self.attend(q, k, v)  # [(b f), heads, h·w, d]
        out = pointwise(self.proj, rearrange(out, "n m l d -> n l (m d)"))
        x = x + rearrange(out, "n (h w) c -> n c h w", h=h, w=w)
        if self.cross is not None:
            x = self.cross(x, state)
        return x


class CrossAttention(nn.Module):
    """Queries from each frame's positions, keys and values from the conditioning tokens.

    When a sample's frames share their tokens (one caption per clip), every query of the clip attends to the
    same keys, so the clip's frames fold into the query axis: one attention call per sample over ``f·h·w``
    queries, with keys and values projected once per sample instead of once per frame (the same numbers)."""

    def __init__(self, channels: int, context_dim: int, heads: int, groups: int, backend: str):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.attend = partial(attention, backend=backend)
        self.norm = _group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, state: FrameState) -> Tensor:
        if state.context is None:
            raise ValueError("this U-Net has cross-attention (context_dim > 0): pass context [b, n, context_dim]")
        n, c, h, w = x.shape
        context, f = state.context.to(x.dtype), state.num_frames
        shared = context.ndim == 3  # one set of tokens per clip: its frames form one query sequence
        groups = "b m (f l) d" if shared else "(b f) m l d"
        if not shared:
            context = rearrange(context, "b f t e -> (b f) t e")
        queries = pointwise(self.q, rearrange(self.norm(x), "n c h w -> n (h w) c"))
        q = rearrange(queries, f"(b f) l (m d) -> {groups}", f=f, m=self.heads)
        k, v = rearrange(self.kv(context), "b t (two m d) -> two b m t d", two=2, m=self.heads).unbind(0)
        out = rearrange(self.attend(q, k, v), f"{groups} -> (b f) l (m d)", f=f, l=h * w)
        return x + rearrange(pointwise(self.proj, out), "n (h w) c -> n c h w", h=h, w=w)


class TemporalAttention(nn.Module):
    """Self-attention over frames at each spatial position (positions as batch) with relative positions only:
    Shaw et al.'s key embeddings plus a learned scalar bias per head (the T5 form), both indexed by the clipped
    frame distance ``r = clip(j − i, ±k)``: ``logit_ij = (q_i · (k_j + a_r)) / √d + b_{head, r}``. Together with
    the image mask they form one additive bias, so the efficient kernels run it. The output projection starts at
    zero: the block is the identity at initialisation."""

    def __init__(self, channels: int, head_dim: int, groups: int, max_distance: int, backend: str):
        super().__init__()
        self.heads, self.backend, self.max_distance = max(channels // head_dim, 1), backend, max_distance
        self.attend = partial(attention, backend=backend)
        self.norm = _group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.relative = nn.Parameter(torch.randn(2 * max_distance + 1, channels // self.heads) * 0.02)
        self.relative_scalar = nn.Parameter(torch.zeros(self.heads, 2 * max_distance + 1))
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def relative_bias(self, q: Tensor) -> Tensor:
        """``q · a_r / √d + b_r``: ``[B, heads, f, d] -> [B, heads, f, f]``."""
        f = q.shape[2]
        pos = torch.arange(f, device=q.device)
        index = (pos[None, :] - pos[:, None]).clamp(-self.max_distance, self.max_distance) + self.max_distance
        table = self.relative.to(q.dtype)[index]  # [f, f, d]
        scalar = self.relative_scalar.to(q.dtype)[:, index]  # [heads, f, f]
        return torch.einsum("bmid,ijd->bmij", q, table) / math.sqrt(q.shape[-1]) + scalar

    def forward(self, x: Tensor, state: FrameState) -> Tensor:
        n, c, h, w = x.shape
        f = state.num_frames
        qkv = pointwise(self.qkv, rearrange(self.norm(x), "(b f) c h w -> (b h w) f c", f=f))
        q, k, v = rearrange(qkv, "n f (three m d) -> three n m f d", three=3, m=self.heads).unbind(0)
        bias = self.relative_bias(q)
        if state.temporal_mask is not None:
            bias = bias + state.temporal_mask.to(bias.dtype)
        out = self.attend(q, k, v, bias)  # [(b h w), heads, f, d]
        out = pointwise(self.proj, rearrange(out, "n m f d -> n f (m d)"))
        return x + rearrange(out, "(b h w) f c -> (b f) c h w", h=h, w=w)


class Downsample(nn.Module):
    """Strided 1×3×3 convolution: halves h and w."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, state: FrameState) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest ×2 in space, then a 1×3×3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, state: FrameState) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def pixel_coordinates(x: Tensor) -> Tensor:
    """``[n, 2, h, w]``: every pixel's centre as ``(x, y)`` in ``[-1, 1]`` (resolution independent), so the
    network can place content absolutely, which a padded convolution stack can only infer from the borders."""
    n, _, h, w = x.shape
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w * 2 - 1
    grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)])
    return grid[None].expand(n, 2, h, w)


def known_frame_channels(z: Tensor, known: Optional[Tensor], mask: Optional[Tensor]) -> Tensor:
    """``[(b f), c + 1, h, w]``: the known frames' clean latents (zero where unknown) and the mask as a channel;
    all zeros (nothing known) when ``known`` is None."""
    b, c, f, h, w = z.shape
    if known is None:
        return z.new_zeros(b * f, c + 1, h, w)
    if mask is None or known.shape != z.shape or mask.shape != (b, f):
        raise ValueError(f"known frames must be shaped like z {tuple(z.shape)} with a [b, f] mask, got "
                         f"{tuple(known.shape)} and {None if mask is None else tuple(mask.shape)}")
    m = mask.to(z.dtype)[:, None, :, None, None].expand(b, 1, f, h, w)
    return rearrange(torch.cat([known.to(z.dtype) * m, m], dim=1), "b c f h w -> (b f) c h w")


def known_inputs(x_known: Tensor, index: Sequence[int], frames: int) -> dict[str, Tensor]:
    """The ``known`` ``[b, c, frames, h, w]`` and ``known_mask`` ``[b, frames]`` arguments of a network with
    ``known_frames``, for frames ``x_known [b, c, k, h, w]`` at ``index`` of a chunk of ``frames`` frames."""
    b, c, k, h, w = x_known.shape
    index = torch.as_tensor(list(index), dtype=torch.long, device=x_known.device)
    if index.numel() != k or (k and not 0 <= int(index.min()) <= int(index.max()) < frames):
        raise ValueError(f"{k} known frames need {k} indices in [0, {frames}), got {index.tolist()}")
    known = x_known.new_zeros(b, c, frames, h, w)
    known[:, :, index] = x_known
    mask = torch.zeros(b, frames, dtype=torch.bool, device=x_known.device)
    mask[:, index] = True
    return {"known": known, "known_mask": mask}


def temporal_image_mask(num_frames: int, num_images: int, device: torch.device) -> Optional[Tensor]:
    """Joint image–video training mask ``[f, f]`` (0 allowed, −inf blocked): the first ``f − num_images``
    frames are a video and attend to one another; each appended image attends only to itself (paper §3)."""
    if num_images == 0:
        return None
    if not 0 < num_images <= num_frames:
        raise ValueError(f"num_images={num_images} must be between 0 and the number of frames {num_frames}")
    video = num_frames - num_images
    allowed = torch.eye(num_frames, dtype=torch.bool, device=device)
    allowed[:video, :video] = True
    return torch.zeros(num_frames, num_frames, device=device).masked_fill(~allowed, float("-inf"))


class UNet3D(nn.Module):
    """The space-time U-Net: ``net(z [b, c, f, h, w], logsnr [b], cond, context, num_images) -> [b, c', f, h, w]``.

    It is the raw network; what its output means (ε, v or x) is the denoiser wrapper's business.
    """

    def __init__(self, config: UNet3DConfig):
        super().__init__()
        self.config = cfg = config
        emb_dim = cfg.emb_dim or 4 * cfg.base_channels
        self.embed = ConditionEmbedding(cfg.base_channels, emb_dim, cfg.cond_dim, cfg.emb_mlp_layers)
        self.frame_positions = (nn.Parameter(torch.randn(cfg.frame_positions, emb_dim) * 0.5)
                                if cfg.frame_positions else None)
        extra = 2 * cfg.coordinates + (cfg.in_channels + 1) * cfg.known_frames
        self.conv_in = nn.Conv2d(cfg.in_channels + extra, cfg.base_channels, 3, padding=1)
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.down, skips = nn.ModuleList(), [cfg.base_channels]
        ch = cfg.base_channels
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                self.down.append(self._stage(ch, width, level, emb_dim))
                ch = width
                skips.append(ch)
            if level < len(widths) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skips.append(ch)
        self.mid = nn.ModuleList([
            ResBlock(ch, ch, emb_dim, cfg.norm_groups, cfg.dropout),
            *self._attention(ch),
            ResBlock(ch, ch, emb_dim, cfg.norm_groups, cfg.dropout),
        ])
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for block in range(cfg.num_res_blocks + 1):
                stage = self._stage(ch + skips.pop(), width, level, emb_dim)
                ch = width
                if level > 0 and block == cfg.num_res_blocks:
                    stage.append(Upsample(ch))
                self.up.append(stage)
        self.norm_out = _group_norm(ch, cfg.norm_groups)
        self.conv_out = _zero(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)

    def _attention(self, ch: int) -> list[nn.Module]:
        """A spatial attention block, then (in a video model) a temporal one (paper §3)."""
        cfg = self.config
        blocks: list[nn.Module] = [SpatialAttention(ch, cfg.head_dim, cfg.norm_groups, cfg.context_dim,
                                                    cfg.attention_backend)]
        if cfg.temporal_attention:
            blocks.append(TemporalAttention(ch, cfg.head_dim, cfg.norm_groups, cfg.max_relative_distance,
                                            cfg.attention_backend))
        return blocks

    def _stage(self, cin: int, cout: int, level: int, emb_dim: int) -> nn.ModuleList:
        """A residual block, followed by spatial and temporal attention at the configured levels."""
        cfg = self.config
        blocks = [ResBlock(cin, cout, emb_dim, cfg.norm_groups, cfg.dropout)]
        if level in cfg.attention_levels:
            blocks += self._attention(cout)
        return nn.ModuleList(blocks)

    def _run(self, blocks: nn.ModuleList, x: Tensor, state: FrameState) -> Tensor:
        """Apply blocks in order, each under activation checkpointing when asked for while training."""
        for block in blocks:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, state, use_reentrant=False)
            else:
                x = block(x, state)
        return x

    def _frame_embedding(self, logsnr: Tensor, cond: Optional[Tensor], f: int, num_images: int,
                         video_start: bool | Tensor) -> Tensor:
        """``[(b f), emb_dim]``: one embedding per sample, or per frame when ``cond`` is ``[b, f, cond_dim]``
        (appended images carry their own captions) or the network embeds frame indices (``frame_positions``: a
        learned vector per index enters the MLP with λ and c, so "when in the video" can interact with the
        caption). Positions are given only to samples whose first frame starts their video (``video_start``,
        a bool or ``[b]``); the others, and appended images, get none."""
        b = logsnr.shape[0]
        if self.frame_positions is None and (cond is None or cond.ndim == 2):
            return repeat(self.embed(logsnr, cond), "b d -> (b f) d", f=f)
        if cond is not None:
            cond = rearrange(cond, "b f d -> (b f) d") if cond.ndim == 3 else repeat(cond, "b d -> (b f) d", f=f)
        extra = None
        if self.frame_positions is not None:
            if f - num_images > len(self.frame_positions):
                raise ValueError(f"{f - num_images} frames, but the network embeds at most "
                                 f"frame_positions={len(self.frame_positions)}")
            rows = torch.cat([self.frame_positions[: f - num_images],
                              self.frame_positions.new_zeros(num_images, self.frame_positions.shape[1])])
            start = torch.as_tensor(video_start, device=rows.device).to(rows.dtype).expand(b)
            extra = rearrange(start[:, None, None] * rows, "b f d -> (b f) d")
        return self.embed(repeat(logsnr, "b -> (b f)", f=f), cond, extra)

    def forward(
        self,
        z: Tensor,
        logsnr: Tensor,
        cond: Optional[Tensor] = None,
        context: Optional[Tensor] = None,
        num_images: int = 0,
        video_start: bool | Tensor = True,
        known: Optional[Tensor] = None,
        known_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """``z [b, c, f, h, w]``, ``logsnr [b]``, ``cond [b, cond_dim]``, ``context [b, n, context_dim]`` (or per
        frame: ``[b, f, cond_dim]``, ``[b, f, n, context_dim]``); the last ``num_images`` frames of every sample
        are independent images (joint training); ``video_start`` (bool or ``[b]``) says whether the first frame is
        the first of its video, which only a network with ``frame_positions`` reads; ``known [b, c, f, h, w]``
        and ``known_mask [b, f]`` (bool) the clean frames a network with ``known_frames`` is conditioned on
        (none when omitted). Returns ``[b, out_channels, f, h, w]``."""
        b, _, f, h, w = z.shape
        if h % self.config.downsample_factor or w % self.config.downsample_factor:
            raise ValueError(f"spatial size {h}×{w} must be divisible by {self.config.downsample_factor}")
        state = FrameState(
            emb=self._frame_embedding(logsnr.expand(b), cond, f, num_images, video_start),
            num_frames=f,
            context=context,
            temporal_mask=temporal_image_mask(f, num_images, z.device),
        )
        x = rearrange(z, "b c f h w -> (b f) c h w")  # frames fold into the batch
        if self.config.known_frames:
            x = torch.cat([x, known_frame_channels(z, known, known_mask)], dim=1)
        elif known is not None or known_mask is not None:
            raise ValueError("known frames given to a network built without known_frames")
        if self.config.coordinates:
            x = torch.cat([x, pixel_coordinates(x)], dim=1)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.conv_in(x)
        skips = [x]
        for stage in self.down:
            x = self._run(stage, x, state)
            skips.append(x)
        x = self._run(self.mid, x, state)
        for stage in self.up:
            x = self._run(stage, torch.cat([x, skips.pop()], dim=1), state)
        x = self.conv_out(F.silu(self.norm_out(x)))
        return rearrange(x, "(b f) c h w -> b c f h w", b=b)
