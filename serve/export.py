"""`python -m serve.export --checkpoint SRC --precision fp8 --out DIR`: a Hugging Face directory.

SRC is an mpx training run or a Hugging Face model directory (detected from its
contents). `--precision fp8` writes DeepSeek-V3's block-FP8 layout (float8_e4m3fn
weights with float32 `weight_scale_inv` per 128x128 block, the rest bf16,
`quantization_config` in config.json); `--scale-format ue8m0` makes every scale a power
of two (DeepSeek-V3.1 / DeepGEMM style); `--precision bf16` writes a plain bf16
checkpoint. `--policy FILE` writes block-FP8 only the kernels the precision policy
gives a recipe (the rest bf16). Tokenizer and generation files are copied (an mpx run trained on bytes gets
a byte-level tokenizer.json). The result loads back into mpx (FP8 weights straight into
ScaledArrays) and into transformers.

User mistakes (a missing or unusable source, an --out that exists and is not empty
without --force, an unknown option value) print one line and exit with status 2;
nothing is half-written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from absl import logging as absl_logging

from models import precision as roles
from serve import flags
from serve import quantize as q
from store import cli
from store import hf as hf_lib
from store import tokenizer as tokenizer_lib
from store.hf import save as save_lib


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m serve.export", description=__doc__.splitlines()[0])
    flags.checkpoint(p, required=True, skip_incomplete=False)
    p.add_argument("--out", required=True, help="directory to write (must not exist or be empty, unless --force)")
    flags.precision(p, save_lib.PRECISIONS, what="weights written: fp8 (block-FP8) or bf16")
    p.add_argument("--scale-format", default="float32", choices=save_lib.SCALE_FORMATS,
                   help="FP8 scales: float32 (default) or ue8m0 (powers of two)")
    flags.policy(p, "only its FP8 layers are written block-FP8")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return p.parse_args(argv)


def _mpx_run(path: str) -> tuple:
    """(config, params, base config.json, extra files) of an mpx training run."""
    ckpt = q.load_run(path)
    spec = ckpt.tokenizer_spec
    if spec == "bytes":
        files = {"tokenizer.json": tokenizer_lib.byte_tokenizer_json().encode()}
    elif Path(spec).is_dir() and (Path(spec) / "tokenizer.json").is_file():  # the run's copy, chat template and all
        files = tokenizer_lib.tokenizer_files(spec)
    elif Path(spec).is_file():
        files = {"tokenizer.json": Path(spec).read_bytes()}
    else:
        raise q.ServeError(f"the run's tokenizer {spec!r} is not there to copy")
    return ckpt.config, ckpt.params, None, files


def _hf_dir(path: str) -> tuple:
    """(config, params, base config.json, tokenizer files) of a Hugging Face directory;
    what the load notes (layers skipped on purpose) goes to stderr."""
    model = hf_lib.load(path)
    for note in model.notes:
        print(f"note: {note}", file=sys.stderr)
    return model.config, model.params, model.hf_config, save_lib.tokenizer_files(path)


def policy_layers(path: str) -> Callable[[Any], bool]:
    """`fp8_layer(entry)` of store.hf.save: the kernels policy file `path` gives a recipe.

    Raises:
      ServeError: a missing or invalid policy file.
    """
    policy = q.policy_spec(path).layer_policy
    return lambda entry: roles.resolve(policy, entry.module).recipe is not None


def export(checkpoint: str, out: str, precision: str = "fp8", scale_format: str = "float32",
           force: bool = False, policy: str | None = None) -> Path:
    """Exports a checkpoint (mpx run or Hugging Face directory) as a Hugging Face directory.

    `policy`: a precision policy YAML whose FP8 layers alone an fp8 export writes in
    block-FP8.

    Returns:
      The written directory.

    Raises:
      HFError, ServeError: user mistakes (see the module docstring).
    """
    if precision not in save_lib.PRECISIONS:
        raise hf_lib.HFError(f"unknown --precision {precision!r}; allowed: {', '.join(save_lib.PRECISIONS)}")
    if scale_format not in save_lib.SCALE_FORMATS:
        raise hf_lib.HFError(f"unknown --scale-format {scale_format!r}; allowed: {', '.join(save_lib.SCALE_FORMATS)}")
    if policy is not None and precision != "fp8":
        raise hf_lib.HFError(f"--policy picks the FP8 layers of an fp8 export; got --precision {precision}")
    fp8_layer = save_lib.is_fp8_layer if policy is None else policy_layers(policy)
    config, params, base, files = (_hf_dir if hf_lib.is_hf_dir(checkpoint) else _mpx_run)(checkpoint)
    return save_lib.save(out, config, params, precision=precision, scale_format=scale_format, base_config=base,
                         extra_files=files, force=force, fp8_layer=fp8_layer)


def main(argv=None) -> int:
    args = parse_args(argv)
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax logs read-only restores as warnings
    try:
        out = export(args.checkpoint, args.out, args.precision, args.scale_format, args.force, args.policy)
    except (ValueError, FileNotFoundError) as err:  # HFError and ServeError are ValueErrors
        return cli.fail(err)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({args.precision}, {size / 2**20:.2f} MiB): {', '.join(sorted(f.name for f in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
