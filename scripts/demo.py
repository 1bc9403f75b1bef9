#!/usr/bin/env python
"""`lvd-demo` as a script, for `accelerate launch scripts/demo.py`: see `--help`."""

from pipelines.commands import demo

if __name__ == "__main__":
    demo()
