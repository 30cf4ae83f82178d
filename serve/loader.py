"""Loading an mpx training run for serving: its f32 masters, model config and tokenizer.

    ckpt = load_run("runs/tiny")                # a run dir, its checkpoints/ or one step dir
    ckpt.step, ckpt.config, ckpt.params         # the step loaded, the model, f32 masters

The checkpoint is verified against its manifest (store/checkpoint.py) and its params
against the shapes its model config gives. User mistakes (no checkpoint, an incomplete
or corrupt one, a checkpoint of another model, a missing tokenizer) raise `ServeError`
with a one-line message. Programs load any checkpoint (a run, a Hugging Face directory,
a GGUF file) with `serve.sources.load_checkpoint`, which calls this for a run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models import transformer
from models.config import ModelConfig
from mpx import config as config_lib
from store import checkpoint as ckpt
from store import data as data_lib
from store import tokenizer as tokenizer_lib

TRAIN_COMMAND = "python -m train.run --config configs/tiny.yaml"
TRAIN_CHECKPOINTS = "runs/tiny/checkpoints"


class ServeError(ValueError):
    """A user mistake in serving: bad checkpoint, model, tokenizer or option."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A training checkpoint, ready to serve.

    Attributes:
      config: the model's shape.
      params: the f32 master weights.
      train_config: the checkpoint's training config as a dict (data, precision, ...).
      step: the training step.
      path: the checkpoint root directory.
      serving: the `serve.quantize.ServeSpec` the params are already converted under
        (tensor by tensor while loading), or None for float masters.
    """

    config: ModelConfig
    params: Any
    train_config: dict
    step: int
    path: Path
    serving: Any = None

    @property
    def name(self) -> str:
        """The run's name: the directory above `checkpoints/` (runs/tiny -> "tiny")."""
        return self.path.parent.name if self.path.name == "checkpoints" else self.path.name

    @property
    def tokenizer_spec(self) -> str:
        """The run's copy of its tokenizer's files (`store.tokenizer.carry_tokenizer`: with
        its chat template and stop ids) where there is one, else the config's data.tokenizer."""
        spec = self.train_config.get("data", {}).get("tokenizer", "bytes")
        carried = self.path.parent / tokenizer_lib.RUN_TOKENIZER
        if spec != "bytes" and self.path.name == "checkpoints" and (carried / "tokenizer.json").is_file():
            return str(carried)
        return spec


def missing_checkpoint_message(path: str | Path) -> str:
    return (f"no checkpoint at {str(path)!r}; make one with `{TRAIN_COMMAND}` "
            f"(its checkpoints land in {TRAIN_CHECKPOINTS})")


def _locate(path: str | Path) -> tuple[Path, int | None]:
    """(checkpoint root, step or None) for a run dir, a checkpoint root or a step dir."""
    path = Path(path)
    if not path.exists():
        raise ServeError(missing_checkpoint_message(path))
    if path.name.isdigit() and not (path / "checkpoints").is_dir():
        return path.parent, int(path.name)  # a step directory, complete or not (restore says)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if not ckpt.all_steps(path):
        raise ServeError(missing_checkpoint_message(path))
    return path, None


def load_run(path: str | Path, *, expect_model: ModelConfig | None = None,
             skip_incomplete: bool = False) -> Checkpoint:
    """Restores a training checkpoint's params and config (verified by its manifest).

    Args:
      path: a run directory (runs/tiny), its checkpoints/ directory (latest step) or
        one step's directory (runs/tiny/checkpoints/300).
      expect_model: when given, the checkpoint's model config must equal it.
      skip_incomplete: for a checkpoints directory whose newest step is incomplete
        (no valid manifest), load the newest complete step instead of refusing.

    Returns:
      A `Checkpoint`; its `step` says which step was loaded.

    Raises:
      ServeError: no checkpoint there (naming the command that makes one), a corrupt
        or incomplete checkpoint, a model config other than `expect_model`, or params
        that do not fit the checkpoint's own model config.
    """
    root, step = _locate(path)
    try:
        step, meta = ckpt.read_metadata(root, step, skip_incomplete=skip_incomplete)
        train_config = meta.get("config", {})
        config = config_lib.from_dict(ModelConfig, train_config.get("model", {}), "model")
        if expect_model is not None and config != expect_model:
            raise ServeError(f"checkpoint {root} is for another model: {_config_diff(expect_model, config)}")
        state, _ = ckpt.restore(root, step)
    except (ckpt.CheckpointError, config_lib.ConfigError) as err:
        raise ServeError(str(err)) from None
    # Restored arrays keep the training mesh's sharding; serving runs on one device, and
    # mixing mesh-sharded and plain arrays would make jit retrace per call.
    params = jax.device_put(state["params"], jax.devices()[0])
    check_params(config, params)
    return Checkpoint(config, params, train_config, step, root)


def _config_diff(want: ModelConfig, have: ModelConfig) -> str:
    diffs = [f"{f.name}={getattr(have, f.name)!r} (expected {getattr(want, f.name)!r})"
             for f in dataclasses.fields(ModelConfig) if getattr(want, f.name) != getattr(have, f.name)]
    return ", ".join(diffs)


def check_params(config: ModelConfig, params) -> None:
    """Checks a params tree against the shapes the model config gives.

    Raises:
      ServeError: naming the first parameter that is missing, extra or of another shape.
    """
    model = transformer.Transformer(config)
    want = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    have = {_path_name(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, leaf in jax.tree_util.tree_flatten_with_path(want)[0]:
        name = _path_name(path)
        if name not in have:
            raise ServeError(f"parameter {name} is missing: the checkpoint does not fit its model config")
        if have.pop(name) != tuple(leaf.shape):
            raise ServeError(f"parameter {name} has another shape than the model config gives {tuple(leaf.shape)}")
    if have:
        raise ServeError(f"parameters {sorted(have)[:4]} are not in the model: the checkpoint does not fit")


def load_tokenizer(spec: str) -> data_lib.Tokenizer:
    """The tokenizer a checkpoint was trained with ("bytes" or a tokenizer.json path).

    Raises:
      ServeError: the tokenizer file is missing or its package is not installed.
    """
    try:
        return data_lib.make_tokenizer(spec)
    except (FileNotFoundError, ImportError) as err:
        raise ServeError(f"tokenizer: {err}; pass --tokenizer PATH to use another") from None


def key_name(key) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_name(path: tuple) -> str:
    return "/".join(key_name(k) for k in path)
