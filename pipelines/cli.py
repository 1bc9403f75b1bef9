"""The one command-line shape every script shares: ``--config FILE [dotted.key=value ...]``.

Bad configuration (unknown key, wrong type, bad value) exits with code 2 and one line naming the key; a
missing input (file, weights) or another user error exits with code 1 and one line; ``--help`` lists every key
with its default.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from pipelines.config import ConfigError, describe_schema, load_config

T = TypeVar("T")

USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, RuntimeError)


def parse(schema: type[T], description: str, argv: list[str] | None = None) -> T:
    """Parse ``argv`` into a ``schema`` instance, exiting with code 2 on configuration errors."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any with key=value, lists as key=[a,b]):\n" + "\n".join(describe_schema(schema)),
    )
    parser.add_argument("--config", help="YAML file overriding the defaults below")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, applied last")
    args = parser.parse_args(argv)
    try:
        return load_config(schema, args.config, args.overrides)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def main(schema: type[T], run: Callable[[T], Any], description: str, argv: list[str] | None = None) -> Any:
    """Parse, then run; user errors become one line on stderr and exit code 1."""
    config = parse(schema, description, argv)
    try:
        return run(config)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        raise SystemExit(130) from None
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
