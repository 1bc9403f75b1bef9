"""The factorised space-time U-Net (paper §3)."""

import pytest
import torch

from diffusion import UNet3D
from diffusion.attention import attention, math_attention, xformers_available
from diffusion.unet3d import pointwise, temporal_image_mask
from tests.models import randomise_temporal_layers, tiny_unet_config


def _net(**overrides) -> UNet3D:
    torch.manual_seed(0)
    return UNet3D(tiny_unet_config(**overrides)).eval()


def _inputs(b=2, f=5, size=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, f, size, size, generator=generator), torch.tensor([-3.0, 2.0])[:b],
            torch.randn(b, 12, generator=generator))


@pytest.mark.parametrize("f", [1, 5])
def test_shapes_for_images_and_videos(f):
    z, logsnr, cond = _inputs(f=f)
    assert _net()(z, logsnr, cond).shape == z.shape


def test_runs_on_more_frames_than_the_relative_distance():
    z, logsnr, cond = _inputs(b=1, f=12)
    out = _net(max_relative_distance=4)(z, logsnr[:1], cond)
    assert out.shape == z.shape and torch.isfinite(out).all()


@torch.no_grad()
def test_temporal_layers_start_as_identity():
    """At initialisation the U-Net on a video equals the U-Net applied frame by frame."""
    net = _net()
    z, logsnr, cond = _inputs()
    per_frame = torch.cat([net(z[:, :, i : i + 1], logsnr, cond) for i in range(z.shape[2])], dim=2)
    torch.testing.assert_close(net(z, logsnr, cond), per_frame, rtol=1e-5, atol=1e-5)
    randomise_temporal_layers(net)  # once trained, frames do interact: the check above can fail
    per_frame = torch.cat([net(z[:, :, i : i + 1], logsnr, cond) for i in range(z.shape[2])], dim=2)
    assert not torch.allclose(net(z, logsnr, cond), per_frame, atol=1e-3)


@torch.no_grad()
def test_appended_images_ignore_the_video_frames():
    """Joint training: an appended image's output does not change when the video frames change."""
    net = _net()
    randomise_temporal_layers(net)
    z, logsnr, cond = _inputs(f=6)
    other = z.clone()
    other[:, :, :4] = torch.randn_like(other[:, :, :4])  # new video frames, same two images
    a, b = net(z, logsnr, cond, num_images=2), net(other, logsnr, cond, num_images=2)
    torch.testing.assert_close(a[:, :, 4:], b[:, :, 4:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, :, :4], b[:, :, :4])
    # ...and each image alone gives the same output as in the joint batch
    alone = net(z[:, :, 5:6], logsnr, cond)
    torch.testing.assert_close(a[:, :, 5:6], alone, rtol=1e-5, atol=1e-5)


def test_image_mask_layout():
    mask = temporal_image_mask(4, 2, torch.device("cpu"))
    allowed = mask == 0
    assert allowed[:2, :2].all() and allowed[2, 2] and allowed[3, 3]
    assert not allowed[2, 3] and not allowed[0, 2] and not allowed[3, 0]
    assert temporal_image_mask(4, 0, torch.device("cpu")) is None
    with pytest.raises(ValueError):
        temporal_image_mask(4, 5, torch.device("cpu"))


def _qkv_bias(b=6, heads=2, lq=7, lk=7, d=16, dtype=torch.float32, device="cpu"):
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, heads, n, d, generator=generator, device=device, dtype=dtype) for n in (lq, lk, lk))
    bias = torch.randn(b, heads, lq, lk, generator=generator, device=device, dtype=dtype)
    bias[..., 0, 1:] = float("-inf")  # a masked row, as the image mask makes
    return q, k, v, bias


def test_sdpa_and_math_backends_agree():
    q, k, v, bias = _qkv_bias()
    for b in (None, bias):
        torch.testing.assert_close(attention(q, k, v, b, backend="sdpa"), math_attention(q, k, v, b),
                                   rtol=1e-5, atol=1e-5)


def test_small_cpu_attention_runs_as_batched_matmuls_equal_to_the_math_forward_and_backward(monkeypatch):
    from diffusion import cpu_kernels

    q, k, v, bias = _qkv_bias(lq=7, lk=5)
    for b in (None, bias):
        ours = [t.clone().requires_grad_() for t in (q, k, v) + (() if b is None else (b,))]
        ref = [t.detach().clone().requires_grad_() for t in ours]
        out, expected = cpu_kernels.batched_matmul_attention(*ours), math_attention(*ref)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        weights = torch.randn_like(out)
        (out * weights).sum().backward(), (expected * weights).sum().backward()
        for mine, theirs in zip(ours, ref):
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-5)
    calls = []
    monkeypatch.setattr(cpu_kernels, "batched_matmul_attention", lambda *a: calls.append(a) or math_attention(*a))
    cpu_kernels.small_cpu_attention(q, k, v, bias, backend="sdpa")
    assert len(calls) == 1  # 6 · 2 · 7 · 5 logits: small
    cpu_kernels.small_cpu_attention(q, k, v, bias, backend="math")
    assert len(calls) == 1  # another backend asked for: that one
    monkeypatch.setattr(cpu_kernels, "SMALL_CPU_LOGITS", 6 * 2 * 7 * 5 - 1)
    cpu_kernels.small_cpu_attention(q, k, v, bias, backend="sdpa")
    assert len(calls) == 1  # one element more than the limit: PyTorch's kernel


@torch.no_grad()
def test_cpu_kernels_install_into_a_network_without_changing_it():
    """:func:`diffusion.cpu_kernels.install` swaps the fast paths in place: the same parameters and state dict, the
    same outputs (to float32 rounding) on a U-Net whose lowest level is 2×2, and every tiny-map layer swapped."""
    from diffusion import cpu_kernels

    torch.manual_seed(0)
    net = _net(channel_mult=[1, 2, 2])
    z, logsnr, cond = _inputs()  # 8×8 latents: levels of 8, 4 and 2
    randomise_temporal_layers(net)
    before, state = net(z, logsnr, cond), {k: v.clone() for k, v in net.state_dict().items()}
    params = [id(p) for p in net.parameters()]
    assert cpu_kernels.install(net) is net
    assert [id(p) for p in net.parameters()] == params
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    torch.testing.assert_close(net(z, logsnr, cond), before, rtol=1e-4, atol=1e-5)
    kinds = {type(m) for m in net.modules()}
    assert cpu_kernels.TinyMapGroupNorm in kinds and cpu_kernels.TinyMapConv2d in kinds
    assert torch.nn.GroupNorm not in kinds
    attends = [m.attend for m in net.modules() if hasattr(m, "attend")]
    assert attends and all(a.func is cpu_kernels.small_cpu_attention for a in attends)


def test_network_is_the_same_on_every_cpu_backend():
    z, logsnr, cond = _inputs()
    nets = {name: _net(attention_backend=name) for name in ("sdpa", "math")}
    for net in nets.values():
        randomise_temporal_layers(net)
    with torch.no_grad():
        torch.testing.assert_close(nets["sdpa"](z, logsnr, cond), nets["math"](z, logsnr, cond),
                                   rtol=1e-4, atol=1e-4)


def test_xformers_backend_refuses_cpu_tensors():
    q, k, v, _ = _qkv_bias()
    with pytest.raises(ValueError, match="CUDA"):
        attention(q, k, v, backend="xformers")


@pytest.mark.skipif(not torch.cuda.is_available() or not xformers_available(), reason="needs CUDA and xformers")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xformers_and_sdpa_agree_on_cuda(dtype):
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    q, k, v, bias = _qkv_bias(b=70_000, lq=16, lk=16, dtype=dtype, device="cuda")  # above the 65 535 batch limit
    torch.testing.assert_close(attention(q, k, v, bias, backend="xformers"), attention(q, k, v, bias, backend="sdpa"),
                               rtol=tol, atol=tol)
    net = _net(attention_backend="xformers").cuda()
    ref = _net(attention_backend="sdpa").cuda()
    randomise_temporal_layers(net), randomise_temporal_layers(ref)
    z, logsnr, cond = (t.cuda() for t in _inputs())
    with torch.no_grad():
        torch.testing.assert_close(net(z, logsnr, cond), ref(z, logsnr, cond), rtol=1e-3, atol=1e-3)


def test_gradient_checkpointing_gives_the_same_gradients():
    z, logsnr, cond = _inputs()
    grads = []
    for checkpointing in (False, True):
        net = _net(gradient_checkpointing=checkpointing, dropout=0.0).train()
        randomise_temporal_layers(net)
        net(z, logsnr, cond, num_images=1).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_cross_attention_uses_the_context():
    net = _net(context_dim=6)
    randomise_temporal_layers(net)
    z, logsnr, cond = _inputs()
    context = torch.randn(2, 3, 6)
    with torch.no_grad():
        a = net(z, logsnr, cond, context=context)
        b = net(z, logsnr, cond, context=context + 1)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="context"):
        net(z, logsnr, cond)


def test_clear_errors_for_bad_inputs_and_configs():
    with pytest.raises(ValueError, match="divisible"):
        _net()(torch.randn(1, 4, 2, 5, 5), torch.zeros(1), torch.zeros(1, 12))
    with pytest.raises(ValueError, match="cond"):
        _net()(torch.randn(1, 4, 2, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="norm_groups"):
        tiny_unet_config(norm_groups=5)
    with pytest.raises(ValueError, match="attention_levels"):
        tiny_unet_config(attention_levels=[3])


@torch.no_grad()
def test_per_frame_conditioning_lets_appended_images_carry_their_own_captions():
    net = _net(context_dim=6)
    randomise_temporal_layers(net)
    z, logsnr, cond = _inputs(f=5)
    context = torch.randn(2, 3, 6)
    shared = net(z, logsnr, cond, context=context)
    per_frame = net(z, logsnr, cond[:, None].expand(-1, 5, -1), context=context[:, None].expand(-1, 5, -1, -1))
    torch.testing.assert_close(per_frame, shared, rtol=1e-5, atol=1e-5)
    # frames 3 and 4 are images with conditioning of their own: each equals that image run alone
    image_cond, image_context = torch.randn(2, 2, 12), torch.randn(2, 2, 3, 6)
    cond_f = torch.cat([cond[:, None].expand(-1, 3, -1), image_cond], dim=1)
    context_f = torch.cat([context[:, None].expand(-1, 3, -1, -1), image_context], dim=1)
    joint = net(z, logsnr, cond_f, context=context_f, num_images=2)
    alone = net(z[:, :, 4:5], logsnr, image_cond[:, 1], context=image_context[:, 1])
    torch.testing.assert_close(joint[:, :, 4:5], alone, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_frame_positions_break_the_symmetry_between_identical_frames():
    """Relative positions alone cannot tell identical frames apart; absolute frame embeddings can."""
    z, logsnr, cond = _inputs(f=4)
    same = z[:, :, :1].expand(-1, -1, 4, -1, -1).contiguous()
    relative = _net()
    randomise_temporal_layers(relative)
    out = relative(same, logsnr, cond)
    torch.testing.assert_close(out, out[:, :, :1].expand_as(out), rtol=1e-5, atol=1e-5)
    absolute = _net(frame_positions=8)
    randomise_temporal_layers(absolute)
    out = absolute(same, logsnr, cond)
    assert not torch.allclose(out[:, :, 0], out[:, :, 1], atol=1e-4)
    with pytest.raises(ValueError, match="frame_positions=8"):
        absolute(_inputs(f=9)[0], logsnr, cond)


@torch.no_grad()
def test_appended_images_take_no_frame_position():
    """With frame embeddings, an image appended for joint training still equals that image run alone."""
    net = _net(frame_positions=4)
    randomise_temporal_layers(net)
    z, logsnr, cond = _inputs(f=6)
    joint = net(z, logsnr, cond, num_images=2)
    alone = net(z[:, :, 5:6], logsnr, cond, num_images=1)
    torch.testing.assert_close(joint[:, :, 5:6], alone, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_coordinate_channels_reach_the_network():
    """Coordinate channels enter the first convolution: with their weights zeroed the network is the plain one."""
    from diffusion.unet3d import pixel_coordinates

    grid = pixel_coordinates(torch.zeros(1, 4, 4, 8))
    assert grid.shape == (1, 2, 4, 8)
    torch.testing.assert_close(grid[0, 0, 0], (torch.arange(8) + 0.5) / 4 - 1)
    torch.testing.assert_close(grid[0, 1, :, 0], (torch.arange(4) + 0.5) / 2 - 1)
    z, logsnr, cond = _inputs()
    with_xy = _net(coordinates=True)
    randomise_temporal_layers(with_xy)
    plain = _net()
    state = with_xy.state_dict()
    plain.load_state_dict({**state, "conv_in.weight": state["conv_in.weight"][:, :4]})
    assert not torch.allclose(with_xy(z, logsnr, cond), plain(z, logsnr, cond), atol=1e-4)
    with_xy.conv_in.weight[:, 4:] = 0
    torch.testing.assert_close(with_xy(z, logsnr, cond), plain(z, logsnr, cond), rtol=1e-5, atol=1e-5)
    assert with_xy(torch.zeros(1, 4, 2, 12, 12), logsnr[:1], cond[:1]).shape == (1, 4, 2, 12, 12)  # any size


@torch.no_grad()
def test_video_start_switches_the_frame_positions_per_sample():
    """``video_start=False`` (an extension chunk) is the network without frame positions; a ``[b]`` mask mixes."""
    net = _net(frame_positions=8)
    randomise_temporal_layers(net)
    z, logsnr, cond = _inputs(f=4)
    with_positions, without = net(z, logsnr, cond), net(z, logsnr, cond, video_start=False)
    assert not torch.allclose(with_positions, without, atol=1e-4)
    mixed = net(z, logsnr, cond, video_start=torch.tensor([True, False]))
    torch.testing.assert_close(mixed[:1], with_positions[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1:], without[1:], rtol=1e-5, atol=1e-5)
    net.frame_positions.zero_()
    torch.testing.assert_close(net(z, logsnr, cond), without, rtol=1e-5, atol=1e-5)


def test_attention_projections_on_tokens_equal_the_1x1_convolutions_they_keep():
    """The attention blocks project tokens with the weights of their ``Conv2d`` layers (checkpoints load as
    before): the same numbers as running the convolution on the NCHW activations."""
    conv = torch.nn.Conv2d(8, 24, 1)
    x = torch.randn(3, 8, 5, 4)
    tokens = x.flatten(2).transpose(1, 2)  # [n, h·w, c]
    expected = conv(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pointwise(conv, tokens), expected, rtol=1e-5, atol=1e-5)


def test_attention_blocks_equal_their_nchw_reference():
    """Spatial and temporal attention written out with the 1×1 convolutions on NCHW activations and the math
    kernel: what the token-layout blocks must compute."""
    from einops import rearrange

    from diffusion.unet3d import FrameState, SpatialAttention, TemporalAttention

    torch.manual_seed(0)
    b, f, c, h, w, heads = 2, 5, 16, 4, 3, 2
    x = torch.randn(b * f, c, h, w)
    state = FrameState(emb=torch.randn(b * f, 8), num_frames=f)
    spatial, temporal = SpatialAttention(c, c // heads, 4, 0, "sdpa"), TemporalAttention(c, c // heads, 4, 3, "sdpa")
    for block in (spatial, temporal):
        torch.nn.init.normal_(block.proj.weight, std=0.2)  # zero-initialised: the check would not see it
    torch.nn.init.normal_(temporal.relative_scalar, std=0.5)

    qkv = rearrange(spatial.qkv(spatial.norm(x)), "n (three m d) h w -> three n m (h w) d", three=3, m=heads)
    out = math_attention(qkv[0], qkv[1], qkv[2])
    expected = x + spatial.proj(rearrange(out, "n m (h w) d -> n (m d) h w", h=h, w=w))
    torch.testing.assert_close(spatial(x, state), expected, rtol=1e-5, atol=1e-5)

    qkv = rearrange(temporal.qkv(temporal.norm(x)), "(b f) (three m d) h w -> three (b h w) m f d", f=f, three=3,
                    m=heads)
    out = math_attention(qkv[0], qkv[1], qkv[2], bias=temporal.relative_bias(qkv[0]))
    expected = x + temporal.proj(rearrange(out, "(b h w) m f d -> (b f) (m d) h w", h=h, w=w))
    torch.testing.assert_close(temporal(x, state), expected, rtol=1e-5, atol=1e-5)


def test_cross_attention_folds_frames_that_share_their_tokens_into_one_query_sequence():
    """Shared tokens ``[b, n, e]`` (one attention call per clip over all its frames' positions) and per-frame
    tokens ``[b, f, n, e]`` both equal the per-frame NCHW reference on the math kernel."""
    from einops import rearrange, repeat

    from diffusion.unet3d import CrossAttention, FrameState

    torch.manual_seed(0)
    b, f, c, h, w, heads, n, e = 2, 5, 16, 4, 3, 2, 7, 6
    block = CrossAttention(c, e, heads, 4, "sdpa")
    torch.nn.init.normal_(block.proj.weight, std=0.2)
    x, tokens = torch.randn(b * f, c, h, w), torch.randn(b, n, e)

    def reference(per_frame):  # [(b f), n, e]
        q = rearrange(block.q(block.norm(x)), "n (m d) h w -> n m (h w) d", m=heads)
        k, v = rearrange(block.kv(per_frame), "n t (two m d) -> two n m t d", two=2, m=heads)
        out = math_attention(q, k, v)
        return x + block.proj(rearrange(out, "n m (h w) d -> n (m d) h w", h=h, w=w))

    shared = block(x, FrameState(emb=torch.randn(b * f, 8), num_frames=f, context=tokens))
    torch.testing.assert_close(shared, reference(repeat(tokens, "b t e -> (b f) t e", f=f)), rtol=1e-5, atol=1e-5)
    own = torch.randn(b, f, n, e)
    per_frame = block(x, FrameState(emb=torch.randn(b * f, 8), num_frames=f, context=own))
    torch.testing.assert_close(per_frame, reference(rearrange(own, "b f t e -> (b f) t e")), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_known_frames_enter_as_input_channels_where_the_mask_says():
    """A ``known_frames`` network reads the clean latents of the frames its mask marks, and nothing else of
    ``known``: with no frame marked it is the network given no known frames; a plain network refuses them."""
    net = _net(known_frames=True)
    randomise_temporal_layers(net)
    z, logsnr, cond = _inputs(f=5)
    known = torch.randn_like(z)
    mask = torch.tensor([[True, True, False, False, False], [True, False, False, False, False]])
    given = net(z, logsnr, cond, known=known, known_mask=mask)
    assert given.shape == z.shape and not torch.allclose(given, net(z, logsnr, cond), atol=1e-4)
    changed = known.clone()
    changed[:, :, 2:] = torch.randn_like(changed[:, :, 2:])  # unmarked frames of `known` do not matter
    torch.testing.assert_close(net(z, logsnr, cond, known=changed, known_mask=mask), given)
    changed[0, :, 1] += 1  # a marked frame does
    assert not torch.allclose(net(z, logsnr, cond, known=changed, known_mask=mask)[0], given[0], atol=1e-4)
    torch.testing.assert_close(net(z, logsnr, cond, known=known, known_mask=torch.zeros_like(mask)),
                               net(z, logsnr, cond))
    with pytest.raises(ValueError, match="mask"):
        net(z, logsnr, cond, known=known, known_mask=mask[:, :4])
    with pytest.raises(ValueError, match="without known_frames"):
        _net()(z, logsnr, cond, known=known, known_mask=mask)


def _assert_same_function(ours, reference, x: torch.Tensor, params, tol: float) -> None:
    """``ours(x)`` and ``reference(x)`` agree, and so do their gradients with respect to ``x`` and ``params``."""
    y, y_ref = ours(x), reference(x)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    grad = torch.randn_like(y)
    got, want = torch.autograd.grad(y, (x, *params), grad), torch.autograd.grad(y_ref, (x, *params), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_group_norm_equals_pytorchs_on_small_maps_forward_and_backward(size):
    """The tiny-map group norm (the layer-norm form at ≤ 4 positions on the CPU) against PyTorch's."""
    from diffusion.cpu_kernels import TinyMapGroupNorm

    torch.manual_seed(0)
    norm = TinyMapGroupNorm(4, 16, eps=1e-6)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = (3 * torch.randn(6, 16, size, size) + 1).requires_grad_()
    reference = lambda t: torch.nn.functional.group_norm(t, 4, norm.weight, norm.bias, 1e-6)  # noqa: E731
    _assert_same_function(norm, reference, x, (norm.weight, norm.bias), tol=1e-4)


@pytest.mark.parametrize("size, cin", [(2, 12), (2, 24), (4, 12)])
def test_conv_equals_pytorchs_convolution_forward_and_backward(size, cin):
    """The tiny-map 3×3 convolution (one dense matrix product at 2×2 maps on the CPU) against ``F.conv2d``."""
    from diffusion.cpu_kernels import TinyMapConv2d

    torch.manual_seed(0)
    conv = TinyMapConv2d(cin, 16, 3, padding=1)
    x = torch.randn(5, cin, size, size, requires_grad=True)
    reference = lambda t: torch.nn.functional.conv2d(t, conv.weight, conv.bias, padding=1)  # noqa: E731
    _assert_same_function(conv, reference, x, (conv.weight, conv.bias), tol=1e-5)
