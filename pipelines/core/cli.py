"""The one command-line shape every script shares: ``--config FILE [dotted.key=value ...]``.

Bad input (an unknown key, a wrong type, a value that cannot work, a missing file or weights, an unusable
folder) exits with code 2 and one line that names the key or the file; real bugs keep their traceback.
``--help`` lists every key with its type, choices, default and documentation. Scripts import their stage's
code only after parsing, so ``--help`` never waits for torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from pipelines.core.config import ConfigError, UserError, describe_schema, load_config

T = TypeVar("T")

USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def parse(schema: type[T], description: str, argv: list[str] | None = None) -> T:
    """Parse ``argv`` into a ``schema`` instance, exiting with code 2 on configuration errors."""
    fixed = tuple(getattr(schema, "FIXED", ()))
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any with key=value, lists as key=[a,b]; null for none):\n"
        + "\n".join(describe_schema(schema, hidden=fixed)),
    )
    parser.add_argument("--config", help="YAML file overriding the defaults below")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, applied last")
    args = parser.parse_args(argv)
    try:
        return load_config(schema, args.config, args.overrides, fixed=fixed)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def main(schema: type[T], run: Callable[[T], Any], description: str, argv: list[str] | None = None) -> Any:
    """Parse, then run; bad input becomes one line on stderr and exit code 2."""
    config = parse(schema, description, argv)
    try:
        return run(config)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        raise SystemExit(130) from None
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
