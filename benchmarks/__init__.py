"""Benchmarks for mpx: run as `python -m benchmarks.<name>` (see each module's docstring).

Every benchmark reports the same way, through the two helpers here: `parser(name, doc)`
builds its command line (the real invocation `python -m benchmarks.<name>` in usage and
`--help`, one-line errors with exit status 2, and the shared `--json` and `--save FILE`
flags), and `report(args, table, result)` ends it: the human-readable table on stdout,
the table also written to `--save FILE` when given, and with `--json` one JSON object as
the last line of stdout.

    def main(argv=None) -> dict:
        parser = benchmarks.parser("quantize", __doc__)
        parser.add_argument("--quick", action="store_true", help="...")
        args = parser.parse_args(argv)
        result = run(...)
        return benchmarks.report(args, format_table(result), result)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from store import cli


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The command line of `python -m benchmarks.<name>`, with `--json` and `--save`.

    Args:
      name: the module name under benchmarks/ ("generate").
      doc: the module docstring; its first line is the description.

    Returns:
      An argparse parser whose errors are one line with exit status 2.
    """
    p = cli.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc.strip().splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--save", metavar="FILE", help="also write the table to FILE (e.g. benchmarks/results/)")
    return p


def report(args: argparse.Namespace, table: str, result: dict) -> dict:
    """Prints `table`, saves it to `args.save` if set, prints `result` as JSON if `args.json`.

    Returns:
      `result`, so that `main` can `return benchmarks.report(...)`.
    """
    print(table)
    if getattr(args, "save", None):
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(table.rstrip("\n") + "\n")
    if getattr(args, "json", False):
        print(json.dumps(result))
    return result
