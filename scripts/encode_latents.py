#!/usr/bin/env python
"""Encode a video folder with a trained (or pretrained) autoencoder into latent shards for diffusion training.

Reruns continue where an interrupted run stopped. Example:
  python scripts/encode_latents.py --config configs/encode/cpu.yaml autoencoder=outputs/autoencoder/model
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.core.cli import main  # noqa: E402
from pipelines.stages.configs import EncodeConfig  # noqa: E402  (torch-free: --help answers at once)


def run(config: EncodeConfig):
    """Import the stage only now, after parsing."""
    from pipelines.stages.encode_latents import encode_latents

    return encode_latents(config)


if __name__ == "__main__":
    main(EncodeConfig, run, __doc__)
