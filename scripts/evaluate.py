#!/usr/bin/env python
"""`lvd-evaluate` as a script, for `accelerate launch scripts/evaluate.py`: see `--help`."""

from pipelines.commands import evaluate

if __name__ == "__main__":
    evaluate()
