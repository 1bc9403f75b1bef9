#!/usr/bin/env python
"""`lvd-generate` as a script, for `accelerate launch scripts/generate.py`: see `--help`."""

from pipelines.commands import generate

if __name__ == "__main__":
    generate()
