#!/usr/bin/env python
"""`lvd-encode-latents` as a script, for `accelerate launch scripts/encode_latents.py`: see `--help`."""

from pipelines.commands import encode_latents

if __name__ == "__main__":
    encode_latents()
