"""Frame-correlated noise (PYoCo's mixed model): its covariance, its conditional, and samplers that use it."""

import math

import pytest
import torch

from diffusion import (
    NoiseSchedule,
    alpha_sigma,
    conditional_frame_noise,
    frame_correlated,
    get_sampler,
    noise_mixer,
    temporal_conditioning,
)


def mixed_covariance(frames: int, rho: float) -> torch.Tensor:
    return (1 - rho) * torch.eye(frames, dtype=torch.float64) + rho * torch.ones(frames, frames, dtype=torch.float64)


@pytest.mark.parametrize("frames", [2, 5, 16])
@pytest.mark.parametrize("rho", [0.3, 0.8])
def test_frame_correlated_is_the_square_root_of_the_mixed_covariance(frames, rho):
    basis = torch.eye(frames, dtype=torch.float64).reshape(frames, 1, frames, 1, 1)  # n = e_j, one per sample
    root = frame_correlated(basis, rho).reshape(frames, frames).T  # column j: Σ^½ e_j
    torch.testing.assert_close(root, root.T)
    torch.testing.assert_close(root @ root.T, mixed_covariance(frames, rho))


def test_frame_correlated_leaves_appended_images_and_rho_zero_alone():
    n = torch.randn(3, 4, 6, 2, 2)
    assert frame_correlated(n, 0.0) is n
    mixed = frame_correlated(n, 0.5, frames=4)
    torch.testing.assert_close(mixed[:, :, 4:], n[:, :, 4:])
    torch.testing.assert_close(mixed[:, :, :4], frame_correlated(n[:, :, :4], 0.5))
    assert not torch.allclose(mixed[:, :, :4], n[:, :, :4])
    assert noise_mixer(0.0) is None
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        noise_mixer(1.0)


def test_conditional_frame_noise_completes_a_draw_of_the_joint_noise():
    rho, m, k, n = 0.6, 5, 3, 200_000
    g = torch.Generator().manual_seed(0)
    others = frame_correlated(torch.randn(n, 1, m, 1, 1, generator=g, dtype=torch.float64), rho)
    new = conditional_frame_noise(others, k, rho, g)
    joint = torch.cat([others, new], dim=2).reshape(n, m + k)
    covariance = joint.T @ joint / n
    assert float((covariance - mixed_covariance(m + k, rho)).abs().max()) < 0.015


def gaussian_oracle(scale: float, rho: float):
    """The exact x̂(z_t) for x ~ N(0, scale² I) per frame under frame-correlated noise: α s² (α² s² I + σ² Σ)⁻¹ z."""

    def denoise(z, logsnr):
        alpha, sigma = (float(v[0]) for v in alpha_sigma(logsnr.double()))
        f = z.shape[2]
        m = alpha**2 * scale**2 * torch.eye(f, dtype=torch.float64) + sigma**2 * mixed_covariance(f, rho)
        gain = (alpha * scale**2 * torch.linalg.inv(m)).to(z.dtype)
        return torch.einsum("gf,bcfhw->bcghw", gain, z)

    return denoise


@pytest.mark.parametrize("sampler", ["ancestral", "pc"])
def test_samplers_draw_the_data_when_they_add_the_models_noise(sampler):
    """With the exact denoiser of a correlated-noise model, fresh draws must be correlated too: samples then have
    the data's covariance (independent frames, variance s²); with i.i.d. draws they come out correlated."""
    scale, rho, f, n = 0.5, 0.7, 4, 20_000
    denoise = gaussian_oracle(scale, rho)
    grid = NoiseSchedule().grid(100).double()
    knobs = {"gamma": 0.0} if sampler == "ancestral" else {"gamma": 0.0, "delta": 0.1}
    covariances = {}
    for name, noise in (("mixed", noise_mixer(rho)), ("iid", None)):
        g = torch.Generator().manual_seed(1)
        z = frame_correlated(torch.randn(n, 1, f, 1, 1, generator=g, dtype=torch.float64), rho)
        x = get_sampler(sampler)(denoise, z, grid, generator=g, noise=noise, **knobs).reshape(n, f)
        covariances[name] = x.T @ x / n
    target = scale**2 * torch.eye(f, dtype=torch.float64)
    assert float((covariances["mixed"] - target).abs().max()) < 0.02
    assert float((covariances["iid"] - target).abs().max()) > 0.03


def test_known_frames_get_noise_that_shares_the_sampled_frames_noise():
    rho, n = 0.8, 50_000
    g = torch.Generator().manual_seed(2)
    seen = {}

    def spy(z, logsnr):
        seen["z"] = z.clone()
        return torch.zeros_like(z)

    x_known = torch.zeros(n, 1, 2, 1, 1, dtype=torch.float64)
    z = frame_correlated(torch.randn(n, 1, 6, 1, 1, generator=g, dtype=torch.float64), rho)
    logsnr = torch.full((n,), -20.0, dtype=torch.float64)  # t ≈ 1: z is (almost) noise alone
    sigma = float(alpha_sigma(logsnr)[1][0])
    for correlation, expected in ((rho, rho), (0.0, 0.0)):
        denoise = temporal_conditioning(spy, x_known, [0, 1], "replacement", generator=g,
                                        noise_correlation=correlation)
        denoise(z, logsnr)
        injected = seen["z"][:, 0, :2, 0, 0] / sigma  # the known frames' ε (x^a = 0)
        between = float((injected[:, 0] * z[:, 0, 4, 0, 0]).mean()) / sigma
        assert math.isclose(between, expected, abs_tol=0.02)
        assert math.isclose(float(injected.var()), 1.0, abs_tol=0.03)
