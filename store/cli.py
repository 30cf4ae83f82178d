"""Command-line plumbing the programs share: one-line errors with exit status 2.

Every entry point (`python -m train.run`, `serve.generate`, `serve.evaluate`, the
benchmarks) reports a user mistake as one line `error: ...` on stderr and exits with
status 2, never with a usage dump or a traceback. argparse names the flag for a bad
value when the flag's `type` is one of the checked converters below:

    >>> parser = ArgumentParser(prog="python -m demo")
    >>> _ = parser.add_argument("--max-tokens", type=positive_int, default=8)
    >>> parser.parse_args(["--max-tokens", "3"]).max_tokens
    3

(`--max-tokens 0` prints `error: argument --max-tokens: must be an integer >= 1; got '0'`.)
"""

from __future__ import annotations

import argparse
import math
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line with exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def fail(message: object) -> int:
    """Prints `error: <message>` (one line) to stderr; returns the exit status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def warn(message: str) -> None:
    """Prints `warning: <message>` (one line) to stderr."""
    print(f"warning: {message}", file=sys.stderr)


def _number(text: str, kind: type, requirement: str, ok) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {requirement}; got {text!r}") from None
    if (kind is float and not math.isfinite(value)) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {requirement}; got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An int >= 1 (an argparse `type`)."""
    return _number(text, int, "an integer >= 1", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    """An int >= 0 (an argparse `type`)."""
    return _number(text, int, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    """A finite float > 0 (an argparse `type`)."""
    return _number(text, float, "a finite number > 0", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    """A finite float >= 0 (an argparse `type`)."""
    return _number(text, float, "a finite number >= 0", lambda v: v >= 0)


def probability(text: str) -> float:
    """A float in (0, 1] (an argparse `type`)."""
    return _number(text, float, "a number in (0, 1]", lambda v: 0 < v <= 1)


def non_empty(text: str) -> str:
    """A non-empty string (an argparse `type`)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def accepted_by(check):
    """An argparse `type` that accepts what `check(text)` accepts; check's ValueError
    message becomes the one-line error (e.g. `accepted_by(mpx.formats.get)`)."""
    def convert(text: str) -> str:
        try:
            check(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text
    return convert
