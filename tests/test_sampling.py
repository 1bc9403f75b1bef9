"""Samplers against analytic oracles: for Gaussian data the ideal denoiser is known in closed form."""

import pytest
import torch

from diffusion.oracles import diagonal_oracle
from diffusion.sampling import (
    SAMPLERS,
    ancestral_step,
    get_sampler,
    langevin_correct,
    sample_ancestral,
    sample_ddim,
)
from diffusion.schedule import NoiseSchedule, Prediction, alpha_sigma, x0_from_output

MEAN = torch.tensor([1.5, -0.5, 0.0, 2.0])
STD = torch.tensor([0.5, 1.0, 2.0, 0.3])
N = 20_000
TOL = 0.035  # mean and std, in units of the data std (a wrong step is off by ≥ 0.1: see the mutant test)


def _moments_error(x: torch.Tensor) -> tuple[float, float]:
    """Largest |error| of the per-dimension mean and std, relative to the data std."""
    mean_err = ((x.mean(0) - MEAN) / STD).abs().max().item()
    std_err = ((x.std(0) - STD) / STD).abs().max().item()
    return mean_err, std_err


def _sample(sampler, steps=250, schedule=None, seed=0, **knobs):
    schedule = schedule or NoiseSchedule()
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(N, 4, generator=generator, dtype=torch.float64)
    return sampler(diagonal_oracle(MEAN, STD), z, schedule.grid(steps), generator=generator, **knobs)


@pytest.mark.parametrize(
    "name,knobs",
    [
        ("ancestral", {"gamma": 0.0}),
        ("ancestral", {"gamma": 0.3}),
        ("ancestral", {"gamma": 1.0}),
        ("ddim", {"eta": 0.0}),
        ("ddim", {"eta": 1.0}),
        ("pc", {"delta": 0.1}),
    ],
)
def test_sampler_matches_gaussian_data(name, knobs):
    x = _sample(get_sampler(name), **knobs)
    mean_err, std_err = _moments_error(x)
    assert mean_err < TOL and std_err < TOL, (name, knobs, mean_err, std_err)


@pytest.mark.parametrize("steps", [1, 3, 17])
def test_any_number_of_steps_runs(steps):
    x = _sample(sample_ddim, steps=steps)
    assert x.shape == (N, 4) and torch.isfinite(x).all()


def test_linear_and_shifted_schedules_sample_correctly():
    for schedule in (NoiseSchedule("linear"), NoiseSchedule("cosine", shift=2.0)):
        mean_err, std_err = _moments_error(_sample(sample_ancestral, schedule=schedule, gamma=0.3))
        assert mean_err < TOL and std_err < TOL, schedule


def test_a_wrong_step_breaks_the_tolerance():
    """The tolerance is tight enough: an ancestral step that forgets its noise collapses the std."""

    def noiseless(denoise, z, logsnr_t, logsnr_s, last, generator, gamma=0.0):
        return ancestral_step(denoise, z, logsnr_t, logsnr_s, True, generator)

    from diffusion.sampling import _run

    generator = torch.Generator().manual_seed(0)
    z = torch.randn(N, 4, generator=generator, dtype=torch.float64)
    x = _run(noiseless, diagonal_oracle(MEAN, STD), z, NoiseSchedule().grid(250), generator, False, None)
    assert max(_moments_error(x)) > 3 * TOL


def test_langevin_corrector_keeps_the_marginal():
    """Starting from the exact marginal of z_t, repeated corrections keep its mean and std."""
    generator = torch.Generator().manual_seed(1)
    for logsnr_value in (-4.0, 0.0, 3.0):
        logsnr = torch.full((N,), logsnr_value)
        alpha, sigma = (v[0].double() for v in alpha_sigma(logsnr))
        marginal_std = (alpha**2 * STD.double() ** 2 + sigma**2).sqrt()
        z = alpha * MEAN + marginal_std * torch.randn(N, 4, generator=generator, dtype=torch.float64)
        for _ in range(40):
            z = langevin_correct(diagonal_oracle(MEAN, STD), z, logsnr, generator, delta=0.1)
        assert ((z.mean(0) - alpha * MEAN) / marginal_std).abs().max() < TOL
        assert ((z.std(0) - marginal_std) / marginal_std).abs().max() < TOL


def test_samplers_are_deterministic_given_the_generator():
    for name in SAMPLERS:
        a = _sample(get_sampler(name), steps=10, seed=3)
        b = _sample(get_sampler(name), steps=10, seed=3)
        assert torch.equal(a, b), name


def test_unknown_sampler_is_a_clear_error():
    with pytest.raises(ValueError, match="sampler must be one of"):
        get_sampler("euler")


@pytest.mark.parametrize("eta,final_alpha_one", [(0.0, True), (0.0, False), (0.5, True)])
def test_ddim_matches_diffusers_step_for_step(eta, final_alpha_one):
    """Same discrete schedule, same ε-denoiser: our continuous-time DDIM reproduces diffusers' DDIMScheduler."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", set_alpha_to_one=final_alpha_one,
        prediction_type="epsilon", clip_sample=False, timestep_spacing="leading", steps_offset=0,
    )
    steps = 25
    scheduler.set_timesteps(steps)
    alphas_cumprod = scheduler.alphas_cumprod.double()
    logsnr_of = lambda a: torch.log(a / (1 - a)) if a < 1 else torch.tensor(float("inf"), dtype=torch.float64)
    final = torch.tensor(1.0, dtype=torch.float64) if final_alpha_one else alphas_cumprod[0]
    grid = torch.stack([logsnr_of(alphas_cumprod[t]) for t in scheduler.timesteps] + [logsnr_of(final)])

    oracle = diagonal_oracle(MEAN, STD)
    z0 = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    trajectory = []
    ours = sample_ddim(oracle, z0.clone(), grid, eta=eta, generator=torch.Generator().manual_seed(7),
                       callback=lambda i, z: trajectory.append(z.clone()))

    generator = torch.Generator().manual_seed(7)
    z = z0.clone()
    for i, t in enumerate(scheduler.timesteps):
        logsnr = grid[i].expand(64)
        alpha, sigma = (v.double()[:, None] for v in alpha_sigma(logsnr))
        eps = (z - alpha * oracle(z, logsnr)) / sigma
        z = scheduler.step(eps, t, z, eta=eta, generator=generator).prev_sample
        torch.testing.assert_close(trajectory[i], z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, z, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", list(Prediction))
def test_parameterisations_recover_x0(prediction):
    """x̂ from the ideal network output equals x for ε, v and x prediction."""
    x0, eps = torch.randn(8, 3, 2, 4, 4), torch.randn(8, 3, 2, 4, 4)
    logsnr = torch.linspace(-8, 8, 8)
    alpha, sigma = (v[:, None, None, None, None] for v in alpha_sigma(logsnr))
    z = alpha * x0 + sigma * eps
    output = {Prediction.EPS: eps, Prediction.V: alpha * eps - sigma * x0, Prediction.X: x0}[prediction]
    torch.testing.assert_close(x0_from_output(output, z, logsnr, prediction), x0, rtol=1e-4, atol=1e-4)
