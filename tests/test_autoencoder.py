"""The KL autoencoder: shapes of both presets, the attention fast path, the posterior, the video helpers."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from einops import rearrange

from autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    DiagonalGaussian,
    decode_video,
    encode_video,
    estimate_latent_scale,
    with_estimated_latent_scale,
)
from autoencoder.metrics import gaussian_window, psnr, ssim
from autoencoder.model import AttnBlock

SD_PARAMETERS = 83_653_863  # diffusers' AutoencoderKL with the SD configuration has exactly as many


def tiny_vae(**overrides) -> AutoencoderKL:
    """A two-level (factor 2) VAE small enough for many forward passes in a test."""
    config = AutoencoderConfig(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, norm_groups=4,
                               **overrides)
    return AutoencoderKL(config).eval()


@pytest.mark.parametrize("factor", [4, 8])
def test_cpu_config_forward_shapes(factor):
    vae = AutoencoderKL(AutoencoderConfig.cpu(factor)).eval()
    assert vae.config.downsample_factor == factor
    frames = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        recon, posterior = vae(frames)
    assert recon.shape == frames.shape
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 64 // factor, 64 // factor)
    assert torch.isfinite(recon).all()


def test_sd_config_builds_with_the_sd_parameter_count_and_runs():
    vae = AutoencoderKL(AutoencoderConfig.sd()).eval()
    assert sum(p.numel() for p in vae.parameters()) == SD_PARAMETERS
    assert vae.config.downsample_factor == 8 and vae.config.latent_scale == pytest.approx(0.18215)
    assert vae.last_layer is vae.decoder.conv_out.weight
    with torch.no_grad():
        recon, posterior = vae(torch.zeros(1, 3, 32, 32), sample_posterior=False)
    assert recon.shape == (1, 3, 32, 32) and posterior.mean.shape == (1, 4, 4, 4)


def test_parameter_names_are_the_ldm_layout():
    names = set(AutoencoderKL(AutoencoderConfig.cpu(4)).state_dict())
    for key in ["encoder.down.0.block.0.conv1.weight", "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down.1.downsample.conv.weight", "encoder.mid.attn_1.proj_out.weight",
                "encoder.mid.block_2.norm2.bias", "encoder.norm_out.weight", "quant_conv.weight",
                "post_quant_conv.bias", "decoder.up.0.block.1.conv2.weight",
                "decoder.up.2.upsample.conv.weight", "decoder.mid.attn_1.q.weight"]:
        assert key in names, key
    assert "encoder.down.2.downsample.conv.weight" not in names  # the last level keeps its resolution
    assert "decoder.up.0.upsample.conv.weight" not in names  # up.0 is full resolution
    assert not any(".attn." in name for name in names)


def test_attention_fast_path_equals_ldm_reference():
    block = AttnBlock(32, AutoencoderConfig(base_channels=32, channel_mult=[1], norm_groups=8))
    x = torch.randn(2, 32, 5, 6)
    h = block.norm(x)
    q = rearrange(block.q(h), "n c h w -> n (h w) c")
    k = rearrange(block.k(h), "n c h w -> n c (h w)")
    v = rearrange(block.v(h), "n c h w -> n c (h w)")
    weights = torch.softmax(torch.bmm(q, k) * 32**-0.5, dim=2)  # LDM: w[i, j] = q_i · k_j / √c
    out = rearrange(torch.bmm(v, weights.transpose(1, 2)), "n c (h w) -> n c h w", h=5)
    torch.testing.assert_close(block(x), x + block.proj_out(out), atol=1e-5, rtol=1e-5)


def test_posterior_sample_statistics_and_determinism():
    mean, std = 0.5, 0.25
    logvar = 2 * torch.log(torch.tensor(std))
    moments = torch.cat([torch.full((1, 2, 64, 64), mean), torch.full((1, 2, 64, 64), logvar)], dim=1)
    posterior = DiagonalGaussian(moments)
    z = posterior.sample(torch.Generator().manual_seed(3))
    assert z.shape == (1, 2, 64, 64)
    assert z.mean().item() == pytest.approx(mean, abs=0.01)
    assert z.std().item() == pytest.approx(std, rel=0.03)
    torch.testing.assert_close(z, posterior.sample(torch.Generator().manual_seed(3)))
    assert not torch.equal(z, posterior.sample(torch.Generator().manual_seed(4)))
    assert torch.equal(posterior.mode(), posterior.mean)


def test_posterior_log_variance_is_clamped():
    logvar = torch.tensor([-50.0, 50.0, 0.0, 1.0]).view(1, 1, 2, 2)
    moments = torch.cat([torch.zeros(1, 1, 2, 2), logvar], dim=1)
    logvar = DiagonalGaussian(moments).logvar.flatten()
    assert logvar.tolist() == [-30.0, 20.0, 0.0, 1.0]


def test_gradient_checkpointing_gives_the_same_gradients():
    vae = tiny_vae()
    frames = torch.randn(2, 3, 16, 16)

    def grads() -> list[torch.Tensor]:
        vae.zero_grad()
        recon, posterior = vae(frames, sample_posterior=False)
        (recon.square().mean() + posterior.kl().mean()).backward()
        return [p.grad.clone() for p in vae.parameters()]

    block, calls = vae.decoder.up[0].block[0], []
    block.forward = lambda h, forward=block.forward: calls.append(1) or forward(h)  # counts the block's runs
    reference = grads()
    assert len(calls) == 1
    vae.set_gradient_checkpointing(True)
    for ours, theirs in zip(grads(), reference):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert len(calls) == 3  # the checkpointed block ran again in the backward pass


def test_channels_last_gives_the_same_output():
    vae = tiny_vae()
    frames = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference, _ = vae(frames, sample_posterior=False)
        vae.to(memory_format=torch.channels_last)
        ours, _ = vae(frames.contiguous(memory_format=torch.channels_last), sample_posterior=False)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_video_helpers_chunked_equal_unchunked():
    vae = tiny_vae(latent_scale=0.5, latent_shift=0.1)
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = encode_video(vae, video, chunk_frames=100)
        assert latents.shape == (2, 4, 5, 8, 8) and latents.is_contiguous()
        torch.testing.assert_close(encode_video(vae, video, chunk_frames=3), latents, atol=1e-5, rtol=0)
        decoded = decode_video(vae, latents, chunk_frames=100)
        assert decoded.shape == video.shape
        torch.testing.assert_close(decode_video(vae, latents, chunk_frames=3), decoded, atol=1e-5, rtol=0)


def test_video_fold_is_frame_by_frame_and_scaled():
    vae = tiny_vae(latent_scale=0.5, latent_shift=0.1)
    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = encode_video(vae, video, chunk_frames=3)
        decoded = decode_video(vae, latents, chunk_frames=3)
        for k in range(video.shape[2]):
            z = vae.encode(video[:, :, k]).mean  # frame k alone, [b, z, h, w]
            torch.testing.assert_close(latents[:, :, k], (z - 0.1) * 0.5, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(decoded[:, :, k], vae.decode(latents[:, :, k] / 0.5 + 0.1), atol=1e-5,
                                       rtol=1e-5)


def test_video_helpers_follow_the_callers_grad_mode():
    vae = tiny_vae()
    video = torch.randn(1, 3, 2, 16, 16)
    assert encode_video(vae, video).requires_grad
    with torch.no_grad():
        assert not encode_video(vae, video).requires_grad
    latents = torch.randn(2, 4, 3, 8, 8, requires_grad=True)
    decode_video(vae, latents, chunk_frames=2).square().sum().backward()  # through the preallocated output
    assert latents.grad is not None and bool((latents.grad[:, :, 2] != 0).any())


def test_decode_video_to_uint8_is_the_writers_quantisation_of_the_float_video():
    from pipelines.core.visual import video_to_uint8

    vae = tiny_vae(latent_scale=0.5, latent_shift=0.1)
    latents = torch.randn(2, 4, 5, 8, 8) * 3
    with torch.no_grad():
        decoded = decode_video(vae, latents, chunk_frames=2)
        frames = decode_video(vae, latents, chunk_frames=2, dtype=torch.uint8)
    assert frames.dtype == torch.uint8 and frames.shape == decoded.shape
    for b in range(2):  # equal up to one level where float rounding lands on either side of a half
        expected = torch.from_numpy(video_to_uint8(decoded[b])).permute(3, 0, 1, 2).int()
        assert int((frames[b].int() - expected).abs().max()) <= 1
        assert float((frames[b].int() != expected).float().mean()) < 1e-3


def test_encode_video_samples_from_the_generator():
    vae = tiny_vae()
    video = torch.randn(1, 3, 3, 16, 16)
    with torch.no_grad():
        first = encode_video(vae, video, sample=True, generator=torch.Generator().manual_seed(1))
        again = encode_video(vae, video, sample=True, generator=torch.Generator().manual_seed(1))
        mean = encode_video(vae, video)
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, mean)


def test_video_helpers_reject_other_layouts():
    with pytest.raises(ValueError, match=r"\[b, c, f, h, w\]"):
        encode_video(tiny_vae(), torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="chunk_frames"):
        decode_video(tiny_vae(), torch.randn(1, 4, 2, 8, 8), chunk_frames=0)


def test_latent_scale_is_one_over_the_std_of_posterior_samples():
    vae = tiny_vae(latent_shift=0.3)
    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    scale = estimate_latent_scale(vae, video, chunk_frames=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        frames = rearrange(video, "b c f h w -> (b f) c h w")
        generator = torch.Generator().manual_seed(0)
        z = torch.cat([vae.encode(chunk).sample(generator) for chunk in frames.split(3)])
    assert scale == pytest.approx(1.0 / z.std().item(), rel=1e-6)
    assert scale == pytest.approx(estimate_latent_scale(vae, frames, chunk_frames=3,
                                                        generator=torch.Generator().manual_seed(0)), rel=1e-6)

    seeded = lambda: torch.Generator().manual_seed(0)
    config = with_estimated_latent_scale(vae, video, chunk_frames=3, generator=seeded())
    assert config.latent_scale == pytest.approx(scale) and vae.config.latent_scale == 1.0
    vae.config = config
    with torch.no_grad():
        latents = encode_video(vae, video, chunk_frames=3, sample=True, generator=seeded())
    assert latents.std().item() == pytest.approx(1.0, rel=1e-5)


def test_config_rejects_group_counts_that_do_not_divide_the_widths():
    with pytest.raises(ValueError, match="norm_groups"):
        AutoencoderConfig(base_channels=24, norm_groups=32)
    with pytest.raises(ValueError, match="factor"):
        AutoencoderConfig.cpu(16)
    assert dataclasses.replace(AutoencoderConfig.cpu(8), latent_scale=0.5).channel_mult == [1, 2, 2, 4]


def test_psnr_hand_checkable_values():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    signs = torch.randint(0, 2, x.shape) * 2 - 1
    y = x + torch.tensor([0.02, 0.2]).view(2, 1, 1, 1) * signs  # MSE exactly σ² per image
    torch.testing.assert_close(psnr(x, y), torch.tensor([40.0, 20.0]))  # 10 log10(2² / σ²)
    assert psnr(x, x).isinf().all()


def test_ssim_hand_checkable_values():
    x = torch.rand(2, 3, 24, 24) * 2 - 1
    y = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    torch.testing.assert_close(ssim(x, y), ssim(y, x))
    assert (ssim(x, y) < 0.99).all()
    c1 = (0.01 * 2) ** 2  # constant frames: σ = 0, so SSIM = (2ab + C1) / (a² + b² + C1)
    constant = ssim(torch.full((1, 1, 16, 16), 0.5), torch.full((1, 1, 16, 16), -0.5))
    assert constant.item() == pytest.approx((-0.5 + c1) / (0.5 + c1), rel=1e-6)


def test_ssim_of_one_window_equals_the_weighted_statistics():
    x, y = torch.rand(1, 1, 11, 11, dtype=torch.float64), torch.rand(1, 1, 11, 11, dtype=torch.float64)
    w = gaussian_window(11, 1.5)
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy, cxy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum(), (w * (x - mx) * (y - my)).sum()
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    expected = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert ssim(x, y).item() == pytest.approx(expected.item(), rel=1e-9)


def test_ssim_agrees_with_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64) * 2 - 1
    y = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    theirs = metrics.structural_similarity(x[0].numpy(), y[0].numpy(), data_range=2.0, channel_axis=0,
                                           gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim(x, y).item() == pytest.approx(theirs, abs=1e-6)


def test_benchmark_script_runs_and_reports_peak_ratios(tmp_path, monkeypatch):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_autoencoder.py"
    spec = importlib.util.spec_from_file_location("bench_autoencoder", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "track_rss_closely", lambda: None)  # leave the test process' malloc alone
    report = bench.main(["--config", "cpu4", "--frames", "2", "4", "--sizes", "32", "--chunk-frames", "2",
                         "--device", "cpu", "--json", str(tmp_path / "bench.json")])
    assert json.loads((tmp_path / "bench.json").read_text()) == report
    assert [(r["op"], r["frames"]) for r in report["results"]] == [("encode", 2), ("decode", 2),
                                                                   ("encode", 4), ("decode", 4)]
    assert all(r["frames_per_s"] > 0 and r["peak_mib"] >= 0 for r in report["results"])
    assert {(r["op"], r["size"], tuple(r["frames"])) for r in report["peak_ratios"]} == {
        ("encode", 32, (2, 4)), ("decode", 32, (2, 4))}
