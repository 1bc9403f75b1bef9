#!/usr/bin/env python
"""The main job: build the synthetic captioned video world, train the autoencoder and the text-conditioned
diffusion model on it, generate long videos (reconstruction guidance and replacement), and write
outputs/demo/report.{json,md}. Rerunning continues where an interrupted run stopped.

Example: python scripts/demo.py --config configs/demo/default.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.core.cli import main  # noqa: E402
from pipelines.demo.config import DemoConfig  # noqa: E402  (torch-free: --help answers at once)


def run(config: DemoConfig):
    """Import the stage only now, after parsing."""
    from pipelines.demo.run import run_demo

    return run_demo(config)


if __name__ == "__main__":
    main(DemoConfig, run, __doc__)
