#!/usr/bin/env python
"""Generate videos of any length from prompts: a first chunk from noise, then autoregressive extension by
reconstruction guidance (or replacement), or the paper's hierarchical keyframes-then-infill mode.

Example: python scripts/generate.py model=outputs/diffusion prompts='[a red circle moving right]' num_frames=64
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.cli import main  # noqa: E402
from pipelines.generate import GenerateConfig, generate  # noqa: E402

if __name__ == "__main__":
    main(GenerateConfig, generate, __doc__)
