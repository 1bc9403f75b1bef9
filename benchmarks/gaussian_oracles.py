#!/usr/bin/env python
"""Samplers and conditional sampling measured against exact Gaussian oracles (the figures behind the tests).

1. Every sampler, driven by the exact denoiser of ``x ~ N(μ, diag(s²))``, from ``z_1 ~ N(0, I)``: the largest
   error of the per-dimension sample mean and standard deviation, in units of the data std.
2. Conditional sampling of the last 4 of 8 jointly Gaussian frames (RBF covariance over time) given the first 4:
   KL(fitted Gaussian of the residuals ‖ the true conditional), for replacement and for reconstruction guidance
   at several weights ``w_r`` (the paper's claim, §3.1: replacement is incoherent, guidance fixes it).

Example: python -m benchmarks.gaussian_oracles --samples 20000 --steps 250
"""

from __future__ import annotations

import argparse

import torch

from diffusion import NoiseSchedule, get_sampler
from diffusion.oracles import (
    conditional_kl,
    diagonal_oracle,
)

MEAN = torch.tensor([1.5, -0.5, 0.0, 2.0])  # the data of tests/test_sampling.py
STD = torch.tensor([0.5, 1.0, 2.0, 0.3])

SAMPLERS = [("ancestral", {"gamma": 0.0}), ("ancestral", {"gamma": 0.3}), ("ancestral", {"gamma": 1.0}),
            ("ddim", {"eta": 0.0}), ("ddim", {"eta": 1.0}), ("pc", {"delta": 0.1})]


def sampler_errors(samples: int, steps: int) -> None:
    print(f"1. samplers on N(μ, diag(s²)), {samples} samples, {steps} steps (errors in data stds)")
    for name, knobs in SAMPLERS:
        generator = torch.Generator().manual_seed(0)
        z = torch.randn(samples, len(MEAN), generator=generator, dtype=torch.float64)
        x = get_sampler(name)(diagonal_oracle(MEAN, STD), z, NoiseSchedule().grid(steps), generator=generator, **knobs)
        mean_err = ((x.mean(0) - MEAN) / STD).abs().max().item()
        std_err = ((x.std(0) - STD) / STD).abs().max().item()
        print(f"   {name:>9} {str(knobs):>16}: mean error {mean_err:.4f}, std error {std_err:.4f}")


def conditional_figures(samples: int, steps: int) -> None:
    print(f"2. conditional sampling of 4 of 8 Gaussian frames, {samples} samples, {steps} steps: KL to the truth")
    for sampler in ("ancestral", "ddim"):
        row = {"replacement": conditional_kl("replacement", 0.0, sampler, samples, steps)}
        for w_r in (1.0, 2.0, 5.0, 10.0, 20.0):
            row[f"guidance w_r={w_r:g}"] = conditional_kl("reconstruction", w_r, sampler, samples, steps)
        print(f"   {sampler:>9}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=250)
    args = parser.parse_args()
    sampler_errors(args.samples, args.steps)
    conditional_figures(min(args.samples, 4000), min(args.steps, 100))


if __name__ == "__main__":
    main()
