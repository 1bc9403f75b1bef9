#!/usr/bin/env python
"""Stage 1: train the per-frame KL autoencoder (L1 + LPIPS + KL + PatchGAN) on a folder of videos and images.

Example: python scripts/train_autoencoder.py --config configs/autoencoder/cpu.yaml run.steps=2000
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.core.cli import main  # noqa: E402
from pipelines.stages.configs import AutoencoderTrainConfig  # noqa: E402  (torch-free: --help answers at once)


def run(config: AutoencoderTrainConfig):
    """Import the stage only now, after parsing."""
    from pipelines.stages.train_autoencoder import train_autoencoder

    return train_autoencoder(config)


if __name__ == "__main__":
    main(AutoencoderTrainConfig, run, __doc__)
