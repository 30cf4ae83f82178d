"""Training configuration: YAML files mapped 1:1 onto frozen dataclasses.

A config file names only what differs from the file it `extends` (a path relative to
itself); sections are deep-merged, later files win, then `--set key=value` overrides
(dotted keys) apply in order. Two sections are choices rather than sets of fields, so
a later value replaces them whole instead of merging:

* `precision`: `fp8` (a preset name), `{preset: fp8}` or `{policy_file: path.yaml}`.
* `model` when it names a `preset` (`model: {preset: small, n_layers: 6}`): the preset's
  fields, then the listed ones; switching preset drops inherited field overrides.

Unknown keys, wrong types and out-of-range values are `ConfigError` (a `ValueError`)
naming the dotted key, the file or `--set` that set it, and the allowed keys or values.
Paths inside a config (data source, policy file, run dir) are relative to the working
directory. `run_dir` defaults to `runs/<config file name>`.

Example:
    >>> cfg = load("configs/tiny.yaml", ["optimizer.learning_rate=1e-3", "steps=50"])
    >>> cfg.model.d_model, cfg.precision.preset, cfg.steps
    (128, 'fp8', 50)
"""


from __future__ import annotations

import collections.abc
import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from models import config as model_config
from models.config import ModelConfig
from mpx import config as config_io
from mpx.config import ConfigError, check, check_choice, from_dict, to_dict
from store import hf
from store.data import DataConfig  # noqa: F401  (a section of TrainConfig)


from mpx.policy import PRESET_NAMES as PRECISION_PRESETS
OPTIMIZERS = ("adamw",)
SCHEDULES = ("cosine", "constant")
MOMENT_DTYPES = ("bf16", "f32")
LOSS_SCALES = ("none", "dynamic", "static")
GRAD_COMMS = ("f32", "bf16")
EXPERT_AXES = ("data", "fsdp")  # mesh axes that can split MoE experts (the batch axes)


def _finite(x: float) -> bool:
    return math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
    """Which precision policy the model runs under: exactly one of the two fields.

    Attributes:
      preset: a `mpx.policy` preset name (see `PRECISION_PRESETS`).
      policy_file: path to a policy YAML file (see configs/policies/).
    """

    preset: str | None = "fp32"
    policy_file: str | None = None

    def __post_init__(self):
        if (self.preset is None) == (self.policy_file is None):
            raise ValueError("set exactly one of preset and policy_file; got "
                             f"preset={self.preset!r}, policy_file={self.policy_file!r}")
        if self.preset is not None:
            check_choice("preset", self.preset, PRECISION_PRESETS)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with a warmup + cosine (or constant) learning-rate schedule.

    Attributes:
      name: optimizer; only "adamw".
      learning_rate: peak learning rate, reached after `warmup_steps`.
      warmup_steps: linear warmup from 0.
      schedule: "cosine" (decay to 0 at the last step) or "constant".
      weight_decay: decoupled weight decay.
      b1, b2, eps: Adam hyperparameters.
      clip_norm: global gradient-norm clip, or None for no clipping.
      adaptive_clip: clip each parameter's update relative to its norm instead.
      moment_dtype: storage dtype of Adam's moments, "bf16" or "f32".
      microbatches: gradient accumulation steps per batch; divides data.batch_size.
      loss_scale: "none", "dynamic" or "static" loss scaling.
      moe_bias_rate: how fast an MoE router's selection bias moves per step to balance
        its experts' load (DeepSeek-V3's auxiliary-loss-free balancing, gamma in its
        report, 0.001 there); only routers with topk_method "noaux_tc" have one.
    """

    name: str = "adamw"
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    schedule: str = "cosine"
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    adaptive_clip: bool = False
    moment_dtype: str = "bf16"
    microbatches: int = 1
    loss_scale: str = "none"
    moe_bias_rate: float = 0.001

    def __post_init__(self):
        check_choice("name", self.name, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("moment_dtype", self.moment_dtype, MOMENT_DTYPES)
        check_choice("loss_scale", self.loss_scale, LOSS_SCALES)
        check("learning_rate", self.learning_rate, _finite(self.learning_rate) and self.learning_rate > 0,
              "a finite number > 0")
        check("warmup_steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0")
        check("weight_decay", self.weight_decay, _finite(self.weight_decay) and self.weight_decay >= 0,
              "a finite number >= 0")
        check("b1", self.b1, 0 <= self.b1 < 1, "in [0, 1)")
        check("b2", self.b2, 0 <= self.b2 < 1, "in [0, 1)")
        check("eps", self.eps, _finite(self.eps) and self.eps > 0, "a finite number > 0")
        check("clip_norm", self.clip_norm,
              self.clip_norm is None or (_finite(self.clip_norm) and self.clip_norm > 0),
              "a finite number > 0, or null")
        check("microbatches", self.microbatches, self.microbatches >= 1, ">= 1")
        check("moe_bias_rate", self.moe_bias_rate, _finite(self.moe_bias_rate) and self.moe_bias_rate >= 0,
              "a finite number >= 0")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh (see mpx/sharding.py) and how gradients cross it.

    Attributes:
      data: replicas (batch split, state replicated).
      fsdp: batch split and params / optimizer state sharded.
      tensor: heads, FFN width and vocabulary split within each layer.
        Sizes multiply to the device count; -1 (at most one axis) takes the rest.
      grad_comm: "f32" (gradients reduced in float32) or "bf16" (data-axis reduction
        with bf16 communication and float32 accumulation).
      experts: the axis ("data" or "fsdp") that splits each MoE block's routed experts
        (expert parallelism, `models.moe.ExpertParallel`: all-gather dispatch, each
        device runs its own experts); null: every device runs every expert.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    grad_comm: str = "f32"
    experts: str | None = None

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            check(name, size, size == -1 or size >= 1, ">= 1 or -1")
        if list(sizes.values()).count(-1) > 1:
            raise ValueError(f"at most one axis may be -1; got {sizes}")
        check_choice("grad_comm", self.grad_comm, GRAD_COMMS)
        if self.experts is not None:
            check_choice("experts", self.experts, EXPERT_AXES)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Checkpointing (see store/checkpoint.py).

    Attributes:
      dir: checkpoint directory; None means `<run_dir>/checkpoints`.
      every: save every this many steps (0: only at the end of the run).
      keep: how many of the latest checkpoints to keep.
    """

    dir: str | None = None
    every: int = 100
    keep: int = 3

    def __post_init__(self):
        check("every", self.every, self.every >= 0, ">= 0")
        check("keep", self.keep, self.keep >= 1, ">= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole training run.

    Attributes:
      model: the transformer's shape.
      precision: the precision policy.
      optimizer: optimizer and schedule.
      data: token source, tokenizer and batching.
      mesh: device mesh axis sizes.
      steps: optimizer steps in the run.
      eval_every: evaluate every this many steps (0: never).
      eval_batches: held-out batches per evaluation.
      log_every: log metrics every this many steps.
      checkpoint: checkpoint directory, interval and retention.
      seed: seed of parameter init and dropout-free model RNG.
      run_dir: where logs, the resolved config and checkpoints go.
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    steps: int = 300
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    seed: int = 0
    run_dir: str | None = None

    def __post_init__(self):
        check("steps", self.steps, self.steps >= 1, ">= 1")
        check("eval_every", self.eval_every, self.eval_every >= 0, ">= 0")
        check("eval_batches", self.eval_batches, self.eval_batches >= 1, ">= 1")
        check("log_every", self.log_every, self.log_every >= 1, ">= 1")
        self._check_consistency()

    def _check_consistency(self):
        data, model = self.data, self.model
        if data.seq_len > model.max_seq_len:
            raise ValueError(f"data.seq_len={data.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
        if data.tokenizer == "bytes" and model.vocab_size < 256:
            raise ValueError(f"the bytes tokenizer needs model.vocab_size >= 256; got {model.vocab_size}")
        if data.batch_size % self.optimizer.microbatches:
            raise ValueError(f"optimizer.microbatches={self.optimizer.microbatches} must divide "
                             f"data.batch_size={data.batch_size}")
        if self.eval_every and data.eval_fraction == 0:
            raise ValueError(f"eval_every={self.eval_every} needs held-out data: set "
                             "data.eval_fraction > 0 or eval_every: 0")

    @property
    def checkpoint_dir(self) -> str:
        """`checkpoint.dir`, or `<run_dir>/checkpoints` when unset."""
        if self.checkpoint.dir is not None:
            return self.checkpoint.dir
        return str(Path(self.run_dir or ".") / "checkpoints")


def dump(cfg: TrainConfig, path: str | Path) -> None:
    """Writes the resolved `cfg` as YAML to `path` (loadable with `load`)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------
# YAML files, extends, overrides.


def _replaces_whole(dotted: str, value: Any) -> bool:
    if not isinstance(value, dict) or dotted == "precision":
        return True
    return dotted == "model" and "preset" in value


def _resolve_precision(section: Any) -> Any:
    if isinstance(section, str):
        is_file = section.endswith((".yaml", ".yml"))
        return {"preset": None, "policy_file": section} if is_file else {"preset": section}
    if isinstance(section, dict) and "policy_file" in section:
        return {"preset": None, **section}
    return section


def _build(raw: dict) -> TrainConfig:
    raw = dict(raw)
    model = raw.get("model")
    if isinstance(model, str) or (isinstance(model, dict) and "preset" in model):
        raw["model"] = to_dict(model_config.from_section(model))
    if "precision" in raw:
        raw["precision"] = _resolve_precision(raw["precision"])
    cfg = from_dict(TrainConfig, raw)
    if cfg.model.init_from:  # the shape comes from the Hugging Face directory's config.json
        try:
            cfg = dataclasses.replace(cfg, model=hf.resolve_init_from(cfg.model))
        except (hf.HFError, ValueError) as e:
            raise ConfigError(f"model.init_from: {e}", "model.init_from") from None
    return cfg


def load(path: str | Path, overrides: collections.abc.Sequence[str] = ()) -> TrainConfig:
    """Reads a training config YAML file (following `extends`) and applies overrides.

    Args:
      path: the YAML file.
      overrides: `key=value` strings with dotted keys (`optimizer.learning_rate=1e-3`,
        `model.n_layers=4`, `precision=bf16`), applied in order; values parse as YAML.

    Returns:
      The validated `TrainConfig`; `run_dir` defaults to `runs/<stem of path>`.

    Raises:
      FileNotFoundError: `path` or a file it extends does not exist.
      ConfigError: invalid YAML, an unknown key, a wrong type or an invalid value; the
        message names the dotted key and the file (or `--set`) that set it.
    """
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of key=value strings; got the string {overrides!r}")
    path = Path(path)
    raw, origins = config_io.read_tree(path, _replaces_whole)
    for item in overrides:
        config_io.merge(raw, config_io.parse_override(item), origins,
                        f"--set {item}", _replaces_whole)
    if raw.get("run_dir") is None:
        raw["run_dir"] = str(Path("runs") / path.stem)
        origins["run_dir"] = f"the default for {path}"
    try:
        return _build(raw)
    except ConfigError as e:
        raise ConfigError(f"{e} (set in {config_io.origin(origins, e.key, str(path))})", e.key) from None
