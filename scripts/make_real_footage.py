#!/usr/bin/env python
"""`lvd-make-real-footage` as a script: see `--help`."""

from pipelines.commands import make_real_footage

if __name__ == "__main__":
    make_real_footage()
