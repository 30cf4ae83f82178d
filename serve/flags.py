"""The command-line flags the serving programs share, each defined once.

    p = cli.ArgumentParser(prog="python -m serve.generate", ...)
    flags.checkpoint(p)                 # --checkpoint, --skip-incomplete
    flags.precision(p)                  # --precision
    flags.policy(p, "which layers are FP8 and how (instead of --precision)")
    flags.kv_cache(p)                   # --kv-cache
    flags.tokenizer(p)                  # --tokenizer

Every program reads a checkpoint the same way (`serve.sources.load_checkpoint`), so
`--checkpoint` means the same everywhere; a program names only its own default and
whether the flag is required.
"""

from __future__ import annotations

import argparse

from serve import kv_cache as kv_cache_lib
from serve import quantize as q

__all__ = ["CHECKPOINT_HELP", "checkpoint", "precision", "policy", "kv_cache", "tokenizer"]

CHECKPOINT_HELP = "an mpx run (its dir, checkpoints/ or one step dir), a Hugging Face model directory or a .gguf file"


def checkpoint(p: argparse.ArgumentParser, *, required: bool = False, default: str | None = q.TRAIN_CHECKPOINTS,
               skip_incomplete: bool = True) -> None:
    """--checkpoint (and --skip-incomplete, for an mpx run whose newest step is incomplete)."""
    if required:
        p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    else:
        shown = f" (default {default})" if default else ""
        p.add_argument("--checkpoint", default=default, help=CHECKPOINT_HELP + shown)
    if skip_incomplete:
        p.add_argument("--skip-incomplete", action="store_true",
                       help="if an mpx run's newest step is incomplete or corrupt, load the newest intact one (printed)")


def precision(p: argparse.ArgumentParser, choices: tuple[str, ...] = q.PRECISIONS, default: str = "fp8",
              what: str = "weights and compute") -> None:
    """--precision; `what` says what it sets."""
    p.add_argument("--precision", default=default, choices=choices, help=f"{what} (default {default})")


def policy(p: argparse.ArgumentParser, what: str) -> None:
    """--policy: a precision policy YAML file (`mpx.policy.load`); `what` says what the program does with it."""
    p.add_argument("--policy", help=f"precision policy YAML: {what}")


def kv_cache(p: argparse.ArgumentParser) -> None:
    """--kv-cache."""
    p.add_argument("--kv-cache", default="bf16", choices=kv_cache_lib.KINDS, help="KV cache (default bf16)")


def tokenizer(p: argparse.ArgumentParser) -> None:
    """--tokenizer."""
    p.add_argument("--tokenizer", help="tokenizer instead of the checkpoint's: bytes, a tokenizer.json, or a "
                   "Hugging Face model directory (its chat template and stop ids too)")
