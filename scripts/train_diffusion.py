#!/usr/bin/env python
"""Stage 2: train the factorised space-time U-Net on latent shards (or on videos encoded on the fly).

Runs under accelerate for several processes / GPUs:
  accelerate launch scripts/train_diffusion.py --config configs/diffusion/gpu.yaml
Example on a CPU: python scripts/train_diffusion.py --config configs/diffusion/cpu.yaml run.steps=500
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.core.cli import main  # noqa: E402
from pipelines.stages.configs import DiffusionTrainConfig  # noqa: E402  (torch-free: --help answers at once)


def run(config: DiffusionTrainConfig):
    """Import the stage only now, after parsing."""
    from pipelines.stages.train_diffusion import train_diffusion

    return train_diffusion(config)


if __name__ == "__main__":
    main(DiffusionTrainConfig, run, __doc__)
