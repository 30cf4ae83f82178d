"""Where serving weights come from: an mpx training run or a Hugging Face model directory.

    model, variables, tokenizer, ckpt = load_for_serving("path/to/SmolLM2-135M", ServeSpec("fp8"))
    ckpt = load_checkpoint("runs/tiny")                  # float32 masters, any kind

The kind is detected from the directory's contents (config.json, *.safetensors,
tokenizer.json: Hugging Face; checkpoints/ or step directories: mpx), with no flag. A
Hugging Face directory loads tensor by tensor; given a `ServeSpec`, each tensor is
converted to its serving form as it is loaded (FP8 kernels quantized, the rest bf16),
so host memory never holds the whole float32 model. Block-FP8 checkpoints load their
weights straight into ScaledArrays. Its `Checkpoint` has step 0, the directory as
tokenizer (tokenizer.json with its special tokens, stop ids and chat template) and, for
code that asks for training data (static calibration), the built-in corpus read with
that tokenizer.
"""

from __future__ import annotations

import sys

from pathlib import Path

from models import transformer
from models.config import ModelConfig
from serve import quantize as q
from store import hf as hf_lib
from store.hf import weights as hf_weights

# Windows of the built-in corpus that static calibration observes on a Hugging Face model.
CALIBRATION_SEQ_LEN = 256


def _converter(config: ModelConfig, spec: q.ServeSpec):
    """convert(entry, value) for store.hf.load: each tensor in its serving form under `spec`."""
    fp8 = q.fp8_forms(config, spec)

    def convert(entry: hf_weights.Entry, value):
        return q.convert_leaf(entry.module, entry.path[-1], value, spec, fp8, entry.shape)

    return convert


def load_hf(path: str | Path, spec: q.ServeSpec | None = None, *,
            expect_model: ModelConfig | None = None) -> q.Checkpoint:
    """A Hugging Face directory as a `Checkpoint` (float32 params, or serving params of `spec`).

    Raises:
      ServeError: anything store.hf.load refuses (one line), or a model other than
        `expect_model`.
    """
    try:
        config = hf_lib.read_config(path)
        if expect_model is not None and config != expect_model:
            raise q.ServeError(f"checkpoint {path} is for another model than the expected one")
        model = hf_lib.load(path, None if spec is None else _converter(config, spec))
    except hf_lib.HFError as err:
        raise q.ServeError(str(err)) from None
    for note in model.notes:  # e.g. multi-token-prediction layers skipped on purpose
        print(f"note: {note}", file=sys.stderr)
    data = {"tokenizer": str(model.path), "seq_len": min(CALIBRATION_SEQ_LEN, config.max_seq_len)}
    return q.Checkpoint(config, model.params, {"data": data}, 0, model.path, serving=spec)


def load_checkpoint(path: str | Path, spec: q.ServeSpec | None = None, *, expect_model: ModelConfig | None = None,
                    skip_incomplete: bool = False) -> q.Checkpoint:
    """An mpx training run or a Hugging Face directory, detected from its contents.

    Args:
      path: a run directory (or its checkpoints/ or step directory), or a Hugging Face
        model directory.
      spec: for a Hugging Face directory, convert tensors to this serving precision as
        they load (an mpx run always loads its float32 masters).
      expect_model: the model config the checkpoint must have.
      skip_incomplete: for an mpx run, fall back past an incomplete newest step.

    Raises:
      ServeError: a missing, unreadable or unsupported checkpoint, or another model.
    """
    if hf_lib.is_hf_dir(path):
        return load_hf(path, spec, expect_model=expect_model)
    return q.load_run(path, expect_model=expect_model, skip_incomplete=skip_incomplete)


def fp32_bytes(ckpt: q.Checkpoint) -> int:
    """Bytes of the model's float32 weights (whatever form `ckpt.params` holds)."""
    return 4 * param_count(ckpt)


def param_count(ckpt: q.Checkpoint) -> int:
    """The model's number of parameters (block-FP8 kernels count their elements, not their scales)."""
    return transformer.param_count_estimate(ckpt.config)


def load_for_serving(path: str | Path, spec: q.ServeSpec, *, expect_model: ModelConfig | None = None,
                     skip_incomplete: bool = False, tokenizer: str | None = None):
    """What a serving CLI needs, from either kind of directory.

    Args:
      path: an mpx training run or a Hugging Face model directory.
      spec: the serving precision.
      expect_model, skip_incomplete: as in `load_checkpoint`.
      tokenizer: a tokenizer spec ("bytes", a tokenizer.json or a model directory)
        instead of the checkpoint's own.

    Returns:
      (model, variables, tokenizer, checkpoint): `model.apply(variables, tokens, ...)`
      serves; `checkpoint.config` is the model's shape.

    Raises:
      ServeError: see `load_checkpoint`; a missing tokenizer, or one with more ids than
        the model's vocabulary.
    """
    ckpt = load_checkpoint(path, spec, expect_model=expect_model, skip_incomplete=skip_incomplete)
    tok = q.load_tokenizer(tokenizer or ckpt.tokenizer_spec)
    try:
        ckpt.config.check_vocab(tok.vocab_size, repr(tokenizer or ckpt.tokenizer_spec))
    except ValueError as err:
        raise q.ServeError(str(err)) from None
    model, variables = q.prepare(ckpt, spec)
    return model, variables, tok, ckpt

