"""Classifier-free guidance and conditional sampling (paper §3.1–3.2)."""

import pytest
import torch

from diffusion import classifier_free_guidance
from diffusion.guidance import area_downsample, temporal_conditioning
from diffusion.oracles import conditional_kl, super_resolution_errors
from diffusion.schedule import eps_from_x0
from pipelines.stages.configs import GenerateConfig
from tests.models import tiny_denoiser


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_denoiser(context_dim=6)


def _inputs(b=2, f=3):
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(b, 4, f, 8, 8, generator=generator)
    logsnr = torch.tensor([-2.0, 1.5])[:b]
    cond = {"cond": torch.randn(b, 12, generator=generator), "context": torch.randn(b, 5, 6, generator=generator)}
    null = {"cond": torch.zeros(1, 12), "context": torch.zeros(1, 5, 6)}
    return z, logsnr, cond, null


@torch.no_grad()
def test_zero_guidance_is_the_conditional_model(model):
    z, logsnr, cond, null = _inputs()
    guided = classifier_free_guidance(model, cond, null, w=0.0)
    torch.testing.assert_close(guided(z, logsnr), model(z, logsnr, **cond))


@torch.no_grad()
def test_batched_guidance_equals_two_separate_calls(model):
    z, logsnr, cond, null = _inputs()
    batched = classifier_free_guidance(model, cond, null, w=3.0, batched=True)(z, logsnr)
    separate = classifier_free_guidance(model, cond, null, w=3.0, batched=False)(z, logsnr)
    torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_guidance_is_the_papers_epsilon_combination(model):
    """ε̃ = (1 + w) ε_c − w ε_u, with ε_u the same network given the null conditioning."""
    z, logsnr, cond, null = _inputs()
    w = 2.0
    eps_c = eps_from_x0(z, model(z, logsnr, **cond), logsnr)
    null_b = {k: v.expand_as(cond[k]) for k, v in null.items()}
    eps_u = eps_from_x0(z, model(z, logsnr, **null_b), logsnr)
    guided = classifier_free_guidance(model, cond, null, w=w)(z, logsnr)
    torch.testing.assert_close(eps_from_x0(z, guided, logsnr), (1 + w) * eps_c - w * eps_u, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(eps_c, eps_u, atol=1e-3)  # the null embedding really changes the model


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_reconstruction_guidance_beats_replacement_ongaussian_frames(sampler):
    """The paper's claim (§3.1): replacement samples are incoherent with x^a; reconstruction guidance
    (w_r > 1 helps) brings them measurably closer to the true conditional distribution."""
    replacement = conditional_kl("replacement", 0.0, sampler)
    guided = conditional_kl("reconstruction", 10.0, sampler)
    weak = conditional_kl("reconstruction", 1.0, sampler)
    assert guided < 0.25 * replacement, (guided, replacement)
    assert guided < weak < replacement, (guided, weak, replacement)


@pytest.mark.parametrize("task, known, shifted", [("interpolate", (0, 3, 7), (1, 4, 7)), ("animate", (0,), (1,))])
def test_conditional_sampling_draws_the_posterior_of_frames_given_anywhere(task, known, shifted):
    """Interpolation (keyframes spread over the clip) and image-to-video (the first frame) on Gaussian frames,
    whose p(x^b | x^a) is known in closed form (continuation: the test above): reconstruction guidance samples
    it within a tolerance that replacement (no gradient) or the same frames placed one index off exceed."""
    guided = conditional_kl("reconstruction", 10.0, "ddim", n=1500, known=known)
    replacement = conditional_kl("replacement", 0.0, "ddim", n=1500, known=known)
    misplaced = conditional_kl("reconstruction", 10.0, "ddim", n=1500, known=known, placed=shifted)
    assert guided < 1.0 < 2.0 < min(replacement, misplaced), (guided, replacement, misplaced)


def test_super_resolution_guidance_draws_the_exact_posterior_of_a_downsampled_video():
    """Gaussian pixels given their per-frame average (paper §3.1, spatial super-resolution): guided samples
    match the low-resolution frames and, where the operator is blind, the exact posterior; without the gradient,
    or guided by a wrong operator (frames shifted by one), the low-resolution frames are missed."""
    constraint, kl = super_resolution_errors(w_r=4.0, n=1000)
    assert constraint < 1e-3 and kl < 0.15, (constraint, kl)
    unguided, _ = super_resolution_errors(w_r=0.0, n=1000)
    wrong, _ = super_resolution_errors(w_r=4.0, n=1000,
                                       downsample=lambda x, size: area_downsample(x.roll(1, dims=2), size))
    assert unguided > 0.5 and wrong > 0.2, (unguided, wrong)  # of a data variance of about 1


def test_temporal_conditioning_rejects_mismatched_indices():
    with pytest.raises(ValueError, match="frame indices"):
        temporal_conditioning(lambda z, logsnr: z, torch.zeros(1, 1, 2, 1, 1), [0])
    with pytest.raises(ValueError, match="conditioning method"):
        temporal_conditioning(lambda z, logsnr: z, torch.zeros(1, 1, 1, 1, 1), [0], method="inpaint")


@torch.no_grad()
def test_guidance_interval_guides_only_inside_it(model):
    """Kynkäänniemi et al. 2024: inside [λ_lo, λ_hi] the plain guided estimate, outside the conditional model."""
    z, logsnr, cond, null = _inputs()  # λ = −2.0 and 1.5
    plain = classifier_free_guidance(model, cond, null, w=3.0)(z, logsnr)
    conditional = model(z, logsnr, **cond)
    limited = classifier_free_guidance(model, cond, null, w=3.0, interval=(0.0, 5.0))(z, logsnr)
    torch.testing.assert_close(limited[1], plain[1])  # λ = 1.5: inside
    torch.testing.assert_close(limited[0], conditional[0])  # λ = −2: outside
    outside = classifier_free_guidance(model, cond, null, w=3.0, interval=(3.0, 5.0))(z, logsnr)
    torch.testing.assert_close(outside, conditional)


@torch.no_grad()
def test_batched_guidance_gives_both_halves_the_per_sample_network_inputs():
    """Known frames (``[b, ...]`` tensors among the network's other arguments) reach the conditional and the
    unconditional half alike: one batch of 2b equals two calls of b."""
    from diffusion import known_inputs

    model = tiny_denoiser(known_frames=True)
    z, logsnr, cond, null = _inputs(f=4)
    cond.pop("context"), null.pop("context")
    given = known_inputs(torch.randn(2, 4, 2, 8, 8), [0, 1], 4)
    batched = classifier_free_guidance(model, cond, null, w=2.0, batched=True, **given)(z, logsnr)
    separate = classifier_free_guidance(model, cond, null, w=2.0, batched=False, **given)(z, logsnr)
    torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batched, classifier_free_guidance(model, cond, null, w=2.0)(z, logsnr), atol=1e-4)


def test_reconstruction_guidance_interval_corrects_only_inside_it_and_skips_the_backward_outside(model):
    """``temporal_conditioning(interval=...)``: inside the interval each sample gets the full reconstruction
    correction, outside it the replacement step, computed without a gradient through the network."""
    torch.manual_seed(3)
    z, logsnr = torch.randn(3, 4, 5, 8, 8), torch.tensor([-8.0, -2.0, 3.0])
    x_known, index = torch.randn(3, 4, 2, 8, 8), [0, 1]
    cond = {"cond": torch.randn(3, 12), "context": torch.randn(3, 5, 6)}
    grad_enabled = []

    def denoise(z, logsnr):
        grad_enabled.append(torch.is_grad_enabled())
        return model(z, logsnr, **cond)

    def run(method, interval=None, at=logsnr):
        return temporal_conditioning(denoise, x_known, index, method, 3.0, torch.Generator().manual_seed(7),
                                     interval=interval)(z, at)

    with torch.no_grad():
        full, plain = run("reconstruction"), run("replacement")
        gated = run("reconstruction", (-4.0, 20.0))
        assert (full[:, :, 2:] - plain[:, :, 2:]).abs().amax() > 1e-3  # the correction is not negligible here
        torch.testing.assert_close(gated[0], plain[0])  # λ = -8: outside, the replacement step
        torch.testing.assert_close(gated[1:], full[1:])  # inside: the whole reconstruction-guided estimate
        grad_enabled.clear()
        torch.testing.assert_close(run("reconstruction", (-4.0, 20.0), torch.tensor(-8.0)), run("replacement",
                                   at=torch.tensor(-8.0)))
    assert grad_enabled == [False, False]  # no sample inside: no backward pass at all
    with pytest.raises(ValueError, match="w_r_interval"):
        GenerateConfig(prompts=[""], w_r_interval=[2.0, -2.0])
