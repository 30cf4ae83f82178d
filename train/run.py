"""`python -m train.run --config configs/tiny.yaml [--set key=value ...] [--resume]`.

Parses the command line, loads the config and runs `train.loop.train`. User mistakes
(a bad config key or value, a missing, empty or malformed data file, a run directory
that already holds another run, a corrupt or incomplete checkpoint) print one clear
line and exit with status 2, without a traceback. A run in which every step was skipped
(non-finite gradients or updates: nothing was learned) says so and exits with status 1;
a run stopped by a signal exits with 128 + the signal number, after saving.

Multi-process (multi-host) runs add `--coordinator host:port --num-processes N
--process-id I` (or the MPX_COORDINATOR / MPX_NUM_PROCESSES / MPX_PROCESS_ID
environment variables), or `--distributed` to let JAX detect the cluster; see
train/distributed.py. The mesh comes from the config's `mesh` section.
"""

from __future__ import annotations

import argparse
import sys

from store import checkpoint as ckpt
from store import cli
from train import config as config_lib
from train import distributed
from train import loop


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m train.run", description="Train a transformer LM from a YAML config.")
    parser.add_argument("--config", required=True, help="training config YAML (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set steps=50 --set optimizer.learning_rate=1e-3")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run")
    parser.add_argument("--skip-incomplete", action="store_true",
                        help="with --resume: set aside newer incomplete or corrupt checkpoints and continue from the "
                             "newest intact one (printed)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    group = parser.add_argument_group("multi-process (default: MPX_* environment variables)")
    group.add_argument("--coordinator", help="host:port of process 0's coordinator (MPX_COORDINATOR)")
    group.add_argument("--num-processes", type=cli.positive_int, help="number of processes (MPX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=cli.non_negative_int, help="this process's id (MPX_PROCESS_ID)")
    group.add_argument("--distributed", action="store_true",
                       help="jax.distributed.initialize() with cluster auto-detection (TPU, SLURM, MPI)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.skip_incomplete and not args.resume:
        return cli.fail("--skip-incomplete applies only with --resume")
    try:
        dist = distributed.resolve(args.coordinator, args.num_processes, args.process_id, args.distributed)
    except ValueError as err:
        return cli.fail(err)
    distributed.initialize(dist)
    try:
        cfg = config_lib.load(args.config, args.overrides)
        summary = loop.train(cfg, resume_run=args.resume, quiet=args.quiet, skip_incomplete=args.skip_incomplete)
    except (config_lib.ConfigError, ckpt.CheckpointError, FileNotFoundError) as err:
        return cli.fail(err)
    if summary["interrupted"] is not None:
        return 128 + int(summary["interrupted"])
    if summary["steps_run"] and summary["skipped_steps"] == summary["steps_run"]:
        print(f"error: all {summary['steps_run']} steps were skipped (non-finite gradients or updates): "
              "nothing was learned; check optimizer.learning_rate, loss_scale and the data", file=sys.stderr)
        return 1
    if not args.quiet and distributed.is_main_process():
        done = "nothing to train: " if not summary["steps_run"] else ""
        print(f"done: {done}step {summary['final_step']}, eval {summary['eval']}, "
              f"checkpoints in {cfg.checkpoint_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
