#!/usr/bin/env python
"""`lvd-evaluate-autoencoder` as a script, for `accelerate launch scripts/evaluate_autoencoder.py`: see `--help`."""

from pipelines.commands import evaluate_autoencoder

if __name__ == "__main__":
    evaluate_autoencoder()
