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
import copy
import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from models.config import ModelConfig
from models.config import preset as model_preset

PRECISION_PRESETS = ("fp32", "bf16", "fp16", "fp8", "fp8_current", "fp8_delayed")
OPTIMIZERS = ("adamw",)
SCHEDULES = ("cosine", "constant")
MOMENT_DTYPES = ("bf16", "f32")
LOSS_SCALES = ("none", "dynamic", "static")
GRAD_COMMS = ("f32", "bf16")


class ConfigError(ValueError):
    """A bad configuration value; `key` is the dotted key at fault ("" for a whole file)."""

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.key = key


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check(name: str, value: Any, ok: bool, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {requirement}; got {value!r}")


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
            _check_choice("preset", self.preset, PRECISION_PRESETS)


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

    def __post_init__(self):
        _check_choice("name", self.name, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("moment_dtype", self.moment_dtype, MOMENT_DTYPES)
        _check_choice("loss_scale", self.loss_scale, LOSS_SCALES)
        _check("learning_rate", self.learning_rate, self.learning_rate > 0, "> 0")
        _check("warmup_steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0")
        _check("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        _check("b1", self.b1, 0 <= self.b1 < 1, "in [0, 1)")
        _check("b2", self.b2, 0 <= self.b2 < 1, "in [0, 1)")
        _check("eps", self.eps, self.eps > 0, "> 0")
        _check("clip_norm", self.clip_norm, self.clip_norm is None or self.clip_norm > 0,
               "> 0 or null")
        _check("microbatches", self.microbatches, self.microbatches >= 1, ">= 1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from and how they are batched (see train/data.py).

    Attributes:
      source: "builtin" (Python standard library docstrings), a .txt/.jsonl file, a
        glob of them, or a directory holding them.
      tokenizer: "bytes" (UTF-8 bytes, 256 ids) or a path to a HF tokenizer.json.
      seq_len: tokens per training sequence.
      batch_size: sequences per step (global, across all devices).
      eval_fraction: fraction of the token stream held out (from its end) for eval.
      shuffle_seed: seed of the per-epoch shuffle of training windows.
    """

    source: str = "builtin"
    tokenizer: str = "bytes"
    seq_len: int = 128
    batch_size: int = 16
    eval_fraction: float = 0.05
    shuffle_seed: int = 0

    def __post_init__(self):
        _check("seq_len", self.seq_len, self.seq_len >= 1, ">= 1")
        _check("batch_size", self.batch_size, self.batch_size >= 1, ">= 1")
        _check("eval_fraction", self.eval_fraction, 0 <= self.eval_fraction < 1, "in [0, 1)")


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
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    grad_comm: str = "f32"

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            _check(name, size, size == -1 or size >= 1, ">= 1 or -1")
        if list(sizes.values()).count(-1) > 1:
            raise ValueError(f"at most one axis may be -1; got {sizes}")
        _check_choice("grad_comm", self.grad_comm, GRAD_COMMS)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Checkpointing (see train/checkpoint.py).

    Attributes:
      dir: checkpoint directory; None means `<run_dir>/checkpoints`.
      every: save every this many steps (0: only at the end of the run).
      keep: how many of the latest checkpoints to keep.
    """

    dir: str | None = None
    every: int = 100
    keep: int = 3

    def __post_init__(self):
        _check("every", self.every, self.every >= 0, ">= 0")
        _check("keep", self.keep, self.keep >= 1, ">= 1")


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
        _check("steps", self.steps, self.steps >= 1, ">= 1")
        _check("eval_every", self.eval_every, self.eval_every >= 0, ">= 0")
        _check("eval_batches", self.eval_batches, self.eval_batches >= 1, ">= 1")
        _check("log_every", self.log_every, self.log_every >= 1, ">= 1")
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


# ---------------------------------------------------------------------------
# Strict dict -> dataclass conversion.


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check_keys(d: collections.abc.Mapping, allowed: list[str], where: str) -> None:
    for key in d:
        if key not in allowed:
            dotted = _join(where, str(key))
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            section = f"under {where!r}" if where else "at the top level"
            raise ConfigError(f"unknown key {dotted!r}{hint}; allowed keys {section}: "
                              f"{', '.join(allowed)}", dotted)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if tp is float:
        return "float"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} items ({', '.join(_type_name(a) for a in args)})"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    return getattr(tp, "__name__", repr(tp))


def _mismatch(tp: Any, value: Any, where: str) -> ConfigError:
    return ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} "
                       f"({type(value).__name__})", where)


def _convert_union(args: tuple, value: Any, where: str) -> Any:
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1 and dataclasses.is_dataclass(options[0]):
        return from_dict(options[0], value, where)  # its own, more precise, errors
    for option in options:
        try:
            return _convert(option, value, where)
        except ConfigError:
            continue
    raise _mismatch(typing.Union[args], value, where)


def _convert_tuple(tp: Any, args: tuple, value: Any, where: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise _mismatch(tp, value, where)
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(value)
    elif len(args) != len(value):
        raise _mismatch(tp, value, where)
    return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))


def _convert_scalar(tp: Any, value: Any, where: str) -> Any:
    # bool is a subclass of int: `n_layers: true` must not pass for 1.
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif tp is Any:
        ok = True
    else:
        raise TypeError(f"from_dict does not support the field type {tp!r} (at {where!r})")
    if not ok:
        raise _mismatch(tp, value, where)
    return value


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(args, value, where)
    if origin is tuple:
        return _convert_tuple(tp, args, value, where)
    if origin is typing.Literal:
        if value not in args:
            raise _mismatch(tp, value, where)
        return value
    return _convert_scalar(tp, value, where)


def from_dict(cls: type, d: Any, where: str = "") -> Any:
    """Builds the frozen dataclass `cls` from a plain dict, strictly.

    Nested dataclasses, `X | None`, `tuple[X, ...]`, fixed tuples, `Literal` and
    bool/int/float/str fields are checked; ints are accepted for floats, bools are not
    accepted for ints. Missing keys take the field defaults. Choices and ranges are
    validated by the dataclass's own `__post_init__`.

    Args:
      cls: a dataclass type.
      d: a mapping of field names to values (nested mappings for nested dataclasses).
      where: dotted prefix of `d` for error messages ("" at the top).

    Returns:
      An instance of `cls`.

    Raises:
      ConfigError: an unknown key (with the closest allowed one), a wrong type (naming
        the key, the value and the expected type), or a value `cls` rejects.
    """
    if not isinstance(d, collections.abc.Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping of keys to values, "
                          f"got {d!r} ({type(d).__name__})", where)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    _check_keys(d, fields, where)
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(hints[k], v, _join(where, k)) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}", where) from None


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (tuples as lists): YAML/JSON-ready.

    `from_dict(type(cfg), to_dict(cfg)) == cfg`, and a YAML file of it loads back to
    `cfg` with `load`.
    """
    return _plain(cfg)


def dump(cfg: TrainConfig, path: str | Path) -> None:
    """Writes the resolved `cfg` as YAML to `path` (loadable with `load`)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------
# YAML files, extends, overrides.


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_value(text: str) -> Any:
    """A `--set` value as YAML: `1e-3` -> 0.001, `true` -> True, `null` -> None."""
    return yaml.load(text, Loader=_Loader)


def _replaces_whole(dotted: str, value: Any) -> bool:
    if not isinstance(value, dict) or dotted == "precision":
        return True
    return dotted == "model" and "preset" in value


def _record(origins: dict, dotted: str, value: Any, source: str) -> None:
    origins[dotted] = source
    if isinstance(value, dict):
        for key, sub in value.items():
            _record(origins, _join(dotted, str(key)), sub, source)


def _merge(base: dict, update: dict, origins: dict, source: str, prefix: str = "") -> None:
    for key, value in update.items():
        dotted = _join(prefix, str(key))
        if isinstance(base.get(key), dict) and not _replaces_whole(dotted, value):
            _merge(base[key], value, origins, source, dotted)
        else:
            for stale in [k for k in origins if k.startswith(dotted + ".")]:
                del origins[stale]
            base[key] = copy.deepcopy(value)
            _record(origins, dotted, value, source)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def _read_tree(path: Path, chain: tuple[Path, ...]) -> tuple[dict, dict]:
    if path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise ConfigError(f"extends cycle: {cycle}")
    raw = _read_yaml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        base, origins = {}, {}
    elif isinstance(parent, str):
        base, origins = _read_tree(path.parent / parent, (*chain, path.resolve()))
    else:
        raise ConfigError(f"{path}: extends must be a path string, got {parent!r}", "extends")
    _merge(base, raw, origins, str(path))
    return base, origins


def _parse_override(item: str) -> dict:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. optimizer.learning_rate=1e-3")
    try:
        value = parse_value(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: invalid value: {e}", key) from None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def _resolve_model(section: Any) -> Any:
    if isinstance(section, str):
        section = {"preset": section}
    if not isinstance(section, dict) or "preset" not in section:
        return section  # full fields (or a wrong type, reported by from_dict)
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    _check_keys(section, ["preset", *fields], "model")
    rest = {k: v for k, v in section.items() if k != "preset"}
    try:
        base = dataclasses.asdict(model_preset(section["preset"]))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.preset: {e}", "model.preset") from None
    return {**base, **rest}


def _resolve_precision(section: Any) -> Any:
    if isinstance(section, str):
        is_file = section.endswith((".yaml", ".yml"))
        return {"preset": None, "policy_file": section} if is_file else {"preset": section}
    if isinstance(section, dict) and "policy_file" in section:
        return {"preset": None, **section}
    return section


def _build(raw: dict) -> TrainConfig:
    raw = dict(raw)
    if "model" in raw:
        raw["model"] = _resolve_model(raw["model"])
    if "precision" in raw:
        raw["precision"] = _resolve_precision(raw["precision"])
    return from_dict(TrainConfig, raw)


def _origin(origins: dict, key: str, path: Path) -> str:
    """Where `key` was set: every source of the keys under it, or of its parent."""
    inside = [src for k, src in origins.items() if not key or k == key or k.startswith(key + ".")]
    if inside:
        return ", ".join(dict.fromkeys(inside))
    while key:
        key = key.rpartition(".")[0]
        if key in origins:
            return origins[key]
    return str(path)


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
    raw, origins = _read_tree(path, ())
    for item in overrides:
        _merge(raw, _parse_override(item), origins, f"--set {item}")
    if raw.get("run_dir") is None:
        raw["run_dir"] = str(Path("runs") / path.stem)
        origins["run_dir"] = f"the default for {path}"
    try:
        return _build(raw)
    except ConfigError as e:
        raise ConfigError(f"{e} (set in {_origin(origins, e.key, path)})", e.key) from None
