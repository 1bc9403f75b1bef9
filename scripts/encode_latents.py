#!/usr/bin/env python
"""Encode a video folder with a trained (or pretrained) autoencoder into latent shards for diffusion training.

Reruns continue where an interrupted run stopped. Example:
  python scripts/encode_latents.py --config configs/encode/cpu.yaml autoencoder=outputs/autoencoder/model
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.cli import main  # noqa: E402
from pipelines.latents import EncodeConfig, encode_latents  # noqa: E402

if __name__ == "__main__":
    main(EncodeConfig, encode_latents, __doc__)
