#!/usr/bin/env python
"""Evaluate an autoencoder (ours, a diffusers SD VAE folder, or an LDM/SD checkpoint file) on held-out frames:
PSNR, SSIM and, when its weights are present, LPIPS; printed and written as JSON.

Example: python scripts/evaluate_autoencoder.py autoencoder=/path/to/sd-vae roots=[data/videos] size=256
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.cli import main  # noqa: E402
from pipelines.evaluate_autoencoder import EvaluateConfig, evaluate_autoencoder  # noqa: E402

if __name__ == "__main__":
    main(EvaluateConfig, evaluate_autoencoder, __doc__)
