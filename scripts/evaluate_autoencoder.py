#!/usr/bin/env python
"""Evaluate an autoencoder (ours, a diffusers SD VAE folder, or an LDM/SD checkpoint file) on held-out frames:
PSNR, SSIM and, when its weights are present, LPIPS; printed and written as JSON.

Example: python scripts/evaluate_autoencoder.py autoencoder=/path/to/sd-vae roots=[data/videos] size=256
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.core.cli import main  # noqa: E402
from pipelines.stages.configs import EvaluateAutoencoderConfig  # noqa: E402  (torch-free: --help answers at once)


def run(config: EvaluateAutoencoderConfig):
    """Import the stage only now, after parsing."""
    from pipelines.stages.evaluate_autoencoder import evaluate_autoencoder

    return evaluate_autoencoder(config)


if __name__ == "__main__":
    main(EvaluateAutoencoderConfig, run, __doc__)
