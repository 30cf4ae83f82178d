"""`python -m train.run --config configs/tiny.yaml [--set key=value ...] [--resume]`.

Parses the command line, loads the config and runs `train.loop.train`. User mistakes
(a bad config key, a missing file, a corrupt checkpoint) print one clear line and exit
with status 2, without a traceback.

Multi-process (multi-host) runs add `--coordinator host:port --num-processes N
--process-id I` (or the MPX_COORDINATOR / MPX_NUM_PROCESSES / MPX_PROCESS_ID
environment variables), or `--distributed` to let JAX detect the cluster; see
train/distributed.py. The mesh comes from the config's `mesh` section.
"""

from __future__ import annotations

import argparse
import sys

from store import checkpoint as ckpt
from train import config as config_lib
from train import distributed
from train import loop


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.run", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="training config YAML (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set steps=50 --set optimizer.learning_rate=1e-3")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    group = parser.add_argument_group("multi-process (default: MPX_* environment variables)")
    group.add_argument("--coordinator", help="host:port of process 0's coordinator (MPX_COORDINATOR)")
    group.add_argument("--num-processes", type=int, help="number of processes (MPX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, help="this process's id (MPX_PROCESS_ID)")
    group.add_argument("--distributed", action="store_true",
                       help="jax.distributed.initialize() with cluster auto-detection (TPU, SLURM, MPI)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        dist = distributed.resolve(args.coordinator, args.num_processes, args.process_id, args.distributed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    distributed.initialize(dist)
    try:
        cfg = config_lib.load(args.config, args.overrides)
        summary = loop.train(cfg, resume_run=args.resume, quiet=args.quiet)
    except (config_lib.ConfigError, ckpt.CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary["interrupted"] is not None:
        return 128 + int(summary["interrupted"])
    if not args.quiet and distributed.is_main_process():
        print(f"done: step {summary['final_step']}, eval {summary['eval']}, "
              f"checkpoints in {cfg.checkpoint_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
