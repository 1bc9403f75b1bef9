"""The noise process, the objective and the wrappers against their closed forms (paper §2, §3.1; docs/method.md)."""

import math

import pytest
import torch

from diffusion import EMA, NoiseSchedule, diffusion_loss, drop_conditioning, loss_weight
from diffusion.guidance import temporal_conditioning
from diffusion.oracles import covariance_oracle, gaussian_frames
from diffusion.schedule import Prediction, alpha_sigma, posterior, q_sample
from diffusion.unet3d import TemporalAttention
from tests.models import tiny_denoiser

# ------------------------------------------------------------------------------------------------ schedule


@pytest.mark.parametrize("shift", [0.0, -6.0, 2.0])
def test_cosine_schedule_endpoints_monotonicity_and_shift(shift):
    schedule = NoiseSchedule("cosine", shift=shift)
    t = torch.linspace(0, 1, 1001)
    logsnr = schedule.logsnr(t)
    assert logsnr[0].item() == pytest.approx(20.0, abs=1e-4) and logsnr[-1].item() == pytest.approx(-20.0, abs=1e-4)
    assert (logsnr[1:] < logsnr[:-1]).all()  # λ strictly decreases in t
    if shift:  # a shift moves the middle of the schedule by about `shift` (the endpoints stay)
        middle = schedule.logsnr(torch.tensor([0.5])) - NoiseSchedule("cosine").logsnr(torch.tensor([0.5]))
        assert middle.item() == pytest.approx(shift, abs=0.05)


def test_interpolated_shift_moves_from_shift_clean_to_shift():
    """Hoogeboom et al. 2023's interpolated schedule: λ(t) = t·λ_shift(t) + (1 − t)·λ_shift_clean(t), the clip
    range at both ends, strictly decreasing, the clean end near shift_clean's curve and the noisy end near shift's."""
    noisy, clean = NoiseSchedule("cosine", shift=-8.0), NoiseSchedule("cosine", shift=0.0)
    mixed = NoiseSchedule("cosine", shift=-8.0, shift_clean=0.0)
    t = torch.linspace(0, 1, 1001)
    logsnr = mixed.logsnr(t)
    assert logsnr[0].item() == pytest.approx(20.0, abs=1e-4) and logsnr[-1].item() == pytest.approx(-20.0, abs=1e-4)
    assert (logsnr[1:] < logsnr[:-1]).all()
    inner = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(mixed.logsnr(inner), inner * noisy.logsnr(inner) + (1 - inner) * clean.logsnr(inner))
    assert mixed.logsnr(torch.tensor([0.5])).item() == pytest.approx(-4.0, abs=0.05)  # half-way: half the shift
    same = NoiseSchedule("cosine", shift=-6.0, shift_clean=-6.0)
    torch.testing.assert_close(same.logsnr(t), NoiseSchedule("cosine", shift=-6.0).logsnr(t))
    with pytest.raises(ValueError, match="shift_clean"):
        NoiseSchedule("linear", shift_clean=0.0)


def test_unshifted_cosine_is_the_papers_formula():
    t = torch.tensor([0.1, 0.3, 0.7])
    b = math.atan(math.exp(-10.0))
    a = math.atan(math.exp(10.0)) - b
    expected = -2 * torch.log(torch.tan(a * t.double() + b))
    torch.testing.assert_close(NoiseSchedule().logsnr(t), expected.float())


def test_posterior_is_bayes_rule_of_the_forward_process():
    """q(z_s | z_t, x) ∝ q(z_s | x) q(z_t | z_s): compare μ̃, σ̃² with the product of the two Gaussians."""
    z_t, x = torch.tensor([0.7, -1.2]), torch.tensor([0.3, 0.9])
    logsnr_t, logsnr_s = torch.tensor([-1.0, 0.5]), torch.tensor([2.0, 3.0])
    mean, var, forward_var = posterior(z_t, x, logsnr_t, logsnr_s)
    (a_t, s_t), (a_s, s_s) = alpha_sigma(logsnr_t), alpha_sigma(logsnr_s)
    ratio = a_t / a_s
    var_ts = s_t**2 - ratio**2 * s_s**2  # σ²_{t|s}
    precision = 1 / s_s**2 + ratio**2 / var_ts
    torch.testing.assert_close(var, 1 / precision)
    torch.testing.assert_close(mean, (a_s * x / s_s**2 + ratio * z_t / var_ts) / precision)
    torch.testing.assert_close(forward_var, var_ts)


# ------------------------------------------------------------------------------------------------ objective


@pytest.mark.parametrize("weighting, snr_weight", [("eps", lambda s: s), ("v", lambda s: 1 + s),
                                                   ("x", lambda s: torch.ones_like(s))])
def test_loss_weights(weighting, snr_weight):
    logsnr = torch.tensor([-3.0, 0.0, 2.5])
    torch.testing.assert_close(loss_weight(logsnr, weighting, Prediction.EPS), snr_weight(logsnr.exp()))
    assert torch.equal(loss_weight(logsnr, "auto", Prediction.V), loss_weight(logsnr, "v", Prediction.EPS))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_weighted_x_mse_equals_the_parameterisations_own_mse(prediction):
    """ε-MSE ≡ e^λ·x-MSE and v-MSE ≡ (1 + e^λ)·x-MSE (paper §2): the weighted loss on x̂ equals the plain MSE on
    the network's own target for the same z_t."""
    torch.manual_seed(0)
    denoiser = tiny_denoiser(prediction, cond_dim=0)
    x0 = torch.randn(3, 4, 2, 8, 8)
    t, noise = torch.tensor([0.2, 0.5, 0.8]), torch.randn(3, 4, 2, 8, 8)
    loss = diffusion_loss(denoiser, x0, NoiseSchedule(), t=t, noise=noise)
    logsnr = NoiseSchedule().logsnr(t)
    z = q_sample(x0, logsnr, noise)
    with torch.no_grad():
        output = denoiser.net(z, logsnr)
    alpha, sigma = (v.reshape(-1, 1, 1, 1, 1) for v in alpha_sigma(logsnr))
    target = noise if prediction == "eps" else alpha * noise - sigma * x0
    torch.testing.assert_close(loss.detach(), (output - target).pow(2).flatten(1).mean(1), rtol=2e-3, atol=1e-5)


def test_drop_conditioning_replaces_exactly_the_drawn_rows():
    cond = {"cond": torch.arange(12.0).reshape(4, 3), "context": torch.ones(4, 2, 3)}
    null = {"cond": torch.full((1, 3), -1.0), "context": torch.zeros(1, 2, 3)}
    uniform = torch.tensor([0.05, 0.5, 0.09, 0.95])
    out = drop_conditioning(cond, null, 0.1, uniform=uniform)
    dropped = torch.tensor([True, False, True, False])
    assert torch.equal(out["cond"][dropped], null["cond"].expand(2, 3))
    assert torch.equal(out["cond"][~dropped], cond["cond"][~dropped])
    assert torch.equal(out["context"][dropped], torch.zeros(2, 2, 3))
    assert drop_conditioning(cond, null, 0.0)["cond"] is not None and torch.equal(
        drop_conditioning(cond, null, 0.0)["cond"], cond["cond"])
    generator = torch.Generator().manual_seed(0)
    share = (drop_conditioning({"cond": torch.ones(4000, 1)}, {"cond": torch.zeros(1, 1)}, 0.3, generator)["cond"]
             == 0).float().mean().item()
    assert share == pytest.approx(0.3, abs=0.03)


def test_ema_warm_up_and_decay():
    """θ̄ ← θ̄ + (1 − d)(θ − θ̄), d = min(decay, (1 + n) / (10 + n))."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.5)
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]):
        with torch.no_grad():
            model.weight.fill_(value)
        d = min(0.5, (1 + n) / (10 + n))
        ema.update(model)
        expected = expected + (1 - d) * (value - expected)
        assert ema.shadow["weight"].item() == pytest.approx(expected, rel=1e-6)
    assert ema.current_decay() == 0.5  # warm-up over: the configured decay


# ------------------------------------------------------------------------------------------------ guidance


def test_reconstruction_guidance_equals_the_closed_form_for_gaussian_frames():
    """With the exact Gaussian denoiser x̂ = G z (G = α Σ (α² Σ + σ² I)⁻¹), the paper's eq.
    x̃^b = x̂^b − (w_r α / 2) ∇_{z^b} ‖x^a − x̂^a‖² is x̂^b + w_r α G_{ab}ᵀ (x^a − x̂^a), at z with z^a
    replaced by a forward sample of x^a."""
    cov = gaussian_frames(6)
    known, w_r = [0, 1], 3.0
    x_a = torch.tensor([[0.8, -0.4]], dtype=torch.float64)
    z = torch.randn(1, 1, 6, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    logsnr = torch.tensor([0.7], dtype=torch.float64)
    denoise = temporal_conditioning(covariance_oracle(cov), x_a[:, None, :, None, None], known, "reconstruction", w_r,
                                    torch.Generator().manual_seed(5))
    got = denoise(z, logsnr)[0, 0, :, 0, 0]
    alpha, sigma = (v.double() for v in alpha_sigma(logsnr))
    noise = torch.randn((1, 1, 2, 1, 1), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z_in = z[0, 0, :, 0, 0].clone()
    z_in[known] = alpha * x_a[0] + sigma * noise.flatten()
    gain = alpha * cov @ torch.linalg.inv(alpha**2 * cov + sigma**2 * torch.eye(6, dtype=torch.float64))
    x_hat = gain @ z_in
    residual = x_a[0] - x_hat[known]
    expected = x_hat + w_r * alpha * gain[known].T @ residual
    expected[known] = x_a[0]
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    plain = temporal_conditioning(covariance_oracle(cov), x_a[:, None, :, None, None], known, "replacement", w_r,
                                  torch.Generator().manual_seed(5))(z, logsnr)[0, 0, :, 0, 0]
    assert not torch.allclose(plain[2:], got[2:])  # the guidance term really acts


# ------------------------------------------------------------------------------------------------ relative positions


def test_relative_positions_are_signed_and_clipped():
    """logit bias b_{head, r} with r = clip(j − i, ±k): key j after query i is r > 0; beyond k all distances share."""
    k = 2
    block = TemporalAttention(channels=8, head_dim=8, groups=4, max_distance=k, backend="math")
    with torch.no_grad():
        block.relative.zero_()  # leave only the scalar term
        block.relative_scalar.copy_(torch.arange(2 * k + 1, dtype=torch.float32)[None])  # value = r + k
    bias = block.relative_bias(torch.randn(1, 1, 6, 8))[0, 0]  # [f, f]: query i, key j
    for i in range(6):
        for j in range(6):
            assert bias[i, j].item() == max(-k, min(k, j - i)) + k
    assert bias[0, 1] > bias[1, 0]  # the future and the past are told apart
