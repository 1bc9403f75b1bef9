#!/usr/bin/env python
"""`lvd-train-autoencoder` as a script, for `accelerate launch scripts/train_autoencoder.py`: see `--help`."""

from pipelines.commands import train_autoencoder

if __name__ == "__main__":
    train_autoencoder()
