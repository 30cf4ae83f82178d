"""`python -m train.run --config configs/tiny.yaml [--set key=value ...] [--resume]`.

Parses the command line, loads the config and runs `train.loop.train`. User mistakes
(a bad config key, a missing file, a corrupt checkpoint) print one clear line and exit
with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from train import checkpoint as ckpt
from train import config as config_lib
from train import loop


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.run", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="training config YAML (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set steps=50 --set optimizer.learning_rate=1e-3")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_lib.load(args.config, args.overrides)
        summary = loop.train(cfg, resume_run=args.resume, quiet=args.quiet)
    except (config_lib.ConfigError, ckpt.CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary["interrupted"] is not None:
        return 128 + int(summary["interrupted"])
    if not args.quiet:
        print(f"done: step {summary['final_step']}, eval {summary['eval']}, "
              f"checkpoints in {cfg.checkpoint_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
