#!/usr/bin/env python
"""Generate videos of any length from prompts: a first chunk from noise, then autoregressive extension by
reconstruction guidance (or replacement), or the paper's hierarchical keyframes-then-infill mode.

Example: python scripts/generate.py model=outputs/diffusion prompts='[a red circle moving right]' num_frames=64
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.core.cli import main  # noqa: E402
from pipelines.stages.configs import GenerateConfig  # noqa: E402  (torch-free: --help answers at once)


def run(config: GenerateConfig):
    """Import the stage only now, after parsing."""
    from pipelines.stages.generate import generate

    return generate(config)


if __name__ == "__main__":
    main(GenerateConfig, run, __doc__)
