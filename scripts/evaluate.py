#!/usr/bin/env python
"""Evaluate generated videos against real ones: FVD and KVD on StyleGAN-V's I3D (i3d_torchscript.pt, a local file),
PSNR / SSIM / LPIPS of files that pair up by name, and optionally the demo world's analyser; written to
out_dir/metrics.json and metrics.md.

Example: python scripts/evaluate.py generated=outputs/generate real=data/videos metrics.i3d=weights/i3d_torchscript.pt
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.core.cli import main  # noqa: E402
from pipelines.evaluation.config import EvaluateConfig  # noqa: E402


def run(cfg):
    from pipelines.stages.evaluate import evaluate

    return evaluate(cfg)


if __name__ == "__main__":
    main(EvaluateConfig, run, __doc__)
