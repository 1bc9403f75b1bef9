#!/usr/bin/env python
"""`lvd-train-diffusion` as a script, for `accelerate launch scripts/train_diffusion.py`: see `--help`."""

from pipelines.commands import train_diffusion

if __name__ == "__main__":
    train_diffusion()
