#!/usr/bin/env python
"""Stage 1: train the per-frame KL autoencoder (L1 + LPIPS + KL + PatchGAN) on a folder of videos and images.

Example: python scripts/train_autoencoder.py --config configs/autoencoder/cpu.yaml run.steps=2000
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.cli import main  # noqa: E402
from pipelines.train_autoencoder import AutoencoderTrainConfig, train_autoencoder  # noqa: E402

if __name__ == "__main__":
    main(AutoencoderTrainConfig, train_autoencoder, __doc__)
