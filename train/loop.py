"""The training loop: build a run from a `TrainConfig`, step, evaluate, log, checkpoint.

`Run` holds what a config builds (model, policy, optimizer, data stream, jitted steps);
`train(cfg, resume=...)` drives it. Metrics go to `<run_dir>/metrics.jsonl` (and to
TensorBoard when `tensorboardX` is installed); checkpoints hold the `TrainState`, and
their metadata the resolved config and the data position, so `--resume` continues the
same loss trajectory bit for bit. SIGINT / SIGTERM finish the current step, save a
checkpoint and exit.

Scale-out: `cfg.mesh` builds one global (data, fsdp, tensor) mesh over every device of
every process (`mpx.sharding`). The state is initialized directly into its shardings
(params, moments and gradients by the sharding rules, scalars and FP8 amax histories
replicated), the steps are jitted with in/out shardings, each process reads only its
rows of the global batch and `jax.make_array_from_process_local_data` assembles them.
A checkpoint restores onto the current mesh whatever mesh saved it. Only process 0
prints and writes metrics.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import mpx
from models import moe, transformer
from models import precision as roles
from mpx import optim
from models import sharding
from store import checkpoint as ckpt
from store import data as data_lib
from store import hf
from store import tokenizer as tokenizer_lib
from train import config as config_lib
from train import metrics_log
from train import step as step_lib


@dataclasses.dataclass
class Run:
    """The pieces of a training run built from its config."""

    cfg: config_lib.TrainConfig
    policy: mpx.Policy
    model: transformer.Transformer
    tx: Any
    stream: data_lib.TokenStream
    tokenizer: Any
    train_step: Any
    eval_step: Any
    layout: sharding.Layout


def load_policy(precision: config_lib.PrecisionConfig) -> mpx.Policy:
    """The policy a precision section names (a preset or a policy YAML file).

    Raises:
      ConfigError: a missing or invalid policy file (naming it and the fault).
    """
    if precision.policy_file is None:
        return mpx.policy.preset(precision.preset)
    try:
        return mpx.policy.load(precision.policy_file)
    except FileNotFoundError:
        raise config_lib.ConfigError(f"precision.policy_file {precision.policy_file!r}: no such file",
                                     "precision.policy_file") from None
    except ValueError as err:
        raise config_lib.ConfigError(f"precision.policy_file: {err}", "precision.policy_file") from None


def make_loss_scale(name: str):
    """"none" -> NoOp, "dynamic" -> dynamic (2**15 start), "static" -> 2**12."""
    if name == "dynamic":
        return optim.dynamic_loss_scale()
    if name == "static":
        return optim.static_loss_scale(2.0**12)
    return optim.NoOpLossScale()


def make_optimizer(cfg: config_lib.TrainConfig):
    o = cfg.optimizer
    return optim.build(
        o.name, o.learning_rate, schedule=o.schedule, warmup_steps=o.warmup_steps,
        total_steps=max(cfg.steps, o.warmup_steps + 1), final_ratio=0.1 if o.schedule == "cosine" else 1.0,
        clip_norm=o.clip_norm, adaptive_clip=2.0 if o.adaptive_clip else None, moment_dtype=o.moment_dtype,
        b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=optim.matrices_only,
    )


def make_layout(cfg: config_lib.TrainConfig) -> sharding.Layout:
    """The mesh layout of `cfg.mesh` over all devices, checked against the batch size.

    Raises:
      ConfigError: the mesh does not fit the device count, or the batch does not split
        evenly over the batch shards (times microbatches).
    """
    try:
        layout = sharding.Layout(sharding.make_mesh(cfg.mesh), cfg.mesh.grad_comm)
    except ValueError as e:
        raise config_lib.ConfigError(f"mesh: {e}", "mesh") from None
    need = layout.batch_shards * cfg.optimizer.microbatches
    if cfg.data.batch_size % need:
        raise config_lib.ConfigError(
            f"data.batch_size={cfg.data.batch_size} must be a multiple of {need} (batch shards "
            f"{layout.batch_shards} of mesh {dict(layout.mesh.shape)} x optimizer.microbatches="
            f"{cfg.optimizer.microbatches})", "data.batch_size")
    return layout


def build(cfg: config_lib.TrainConfig) -> Run:
    """Builds mesh, model, policy, optimizer, data stream and jitted steps from `cfg`."""
    policy = load_policy(cfg.precision)
    layout = make_layout(cfg)
    experts = moe.ExpertParallel(layout.mesh, cfg.mesh.experts) if cfg.mesh.experts else None
    model = transformer.Transformer(cfg.model, policy, constrain=layout.constrain, expert_parallel=experts)
    tx = make_optimizer(cfg)
    try:
        stream, tokenizer = data_lib.build(cfg.data, cfg.model.vocab_size)
    except (ValueError, ImportError) as e:  # an empty, binary or malformed data file
        raise config_lib.ConfigError(f"data: {e}", "data") from None
    shardings = layout.shardings(jax.eval_shape(_init_fn(cfg, model, tx)))
    batch = {"inputs": layout.batch_sharding(), "targets": layout.batch_sharding()}
    replicated = sharding.replicated(layout.mesh)
    train_step = jax.jit(step_lib.make_train_step(model, tx, cfg.optimizer.microbatches, layout,
                                                  cfg.optimizer.moe_bias_rate),
                         in_shardings=(shardings, batch), out_shardings=(shardings, replicated),
                         donate_argnums=0)
    eval_step = jax.jit(step_lib.make_eval_step(model), in_shardings=(shardings, batch),
                        out_shardings=replicated)
    return Run(cfg, policy, model, tx, stream, tokenizer, train_step, eval_step, layout)


def _init_fn(cfg: config_lib.TrainConfig, model, tx):
    example = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    loss_scale = make_loss_scale(cfg.optimizer.loss_scale)
    return lambda: step_lib.init_state(model, tx, loss_scale, cfg.seed, example)


def initial_state(run: Run) -> step_lib.TrainState:
    """The initial train state, created directly in its shardings (never whole on one device)."""
    init = _init_fn(run.cfg, run.model, run.tx)
    shardings = run.layout.shardings(jax.eval_shape(init))
    state = jax.jit(init, out_shardings=shardings)()
    if run.cfg.model.init_from:  # pretrained f32 masters, a fresh optimizer state for them
        params = jax.device_put(hf.init_params(run.cfg.model), shardings.params)
        state = dataclasses.replace(state, params=params,
                                    opt_state=jax.jit(run.tx.init, out_shardings=shardings.opt_state)(params))
    return state


def device_batch(run: Run, batch: data_lib.Batch) -> dict:
    """The global, sharded batch from this process's rows of it."""
    local = {"inputs": batch.inputs, "targets": batch.targets}
    return sharding.global_batch(local, run.layout.mesh, run.cfg.data.batch_size, run.layout.rules)


def process_rows(run: Run) -> slice:
    """The rows of each global batch this process feeds."""
    shape = (run.cfg.data.batch_size, run.cfg.data.seq_len)
    return sharding.process_rows(run.layout.batch_sharding(), shape)


def evaluate(run: Run, state: step_lib.TrainState) -> dict:
    """Mean held-out loss and perplexity over `cfg.eval_batches` fixed batches."""
    count = min(run.cfg.eval_batches, run.stream.num_eval_batches)
    nll, tokens = 0.0, 0.0
    for batch in run.stream.eval_batches(count, process_rows(run)):
        out = run.eval_step(state, device_batch(run, batch))
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
    loss = nll / tokens
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def checkpoint_metadata(cfg: config_lib.TrainConfig, data_state: data_lib.DataState) -> dict:
    return {"config": config_lib.to_dict(cfg), "data_state": data_state.to_dict()}


def compatibility(cfg: config_lib.TrainConfig) -> dict:
    """Metadata a checkpoint must match to resume this config (model and precision)."""
    full = config_lib.to_dict(cfg)
    return {"config": {"model": full["model"], "precision": full["precision"],
                       "optimizer": {"moment_dtype": full["optimizer"]["moment_dtype"],
                                     "loss_scale": full["optimizer"]["loss_scale"]}}}


def save(run: Run, state, data_state) -> Path:
    cfg = run.cfg
    return ckpt.save(cfg.checkpoint_dir, int(state.step), state, checkpoint_metadata(cfg, data_state),
                     keep=cfg.checkpoint.keep)


def check_run_dir(cfg: config_lib.TrainConfig, resume_run: bool) -> None:
    """Refuses to start a fresh run where one already wrote, so no run is overwritten.

    Raises:
      ConfigError: without `resume_run`, the run directory holds checkpoints or metrics
        of an earlier run (naming it, `--resume` and a new `run_dir`).
    """
    if resume_run:
        return
    steps = ckpt.all_steps(cfg.checkpoint_dir)
    metrics = Path(cfg.run_dir or ".") / "metrics.jsonl"
    if steps or (metrics.is_file() and metrics.stat().st_size):
        held = f"checkpoints up to step {steps[-1]}" if steps else f"a {metrics.name} without checkpoints"
        raise config_lib.ConfigError(
            f"run_dir {cfg.run_dir} already holds a run ({held} in {cfg.checkpoint_dir if steps else metrics}); "
            f"continue it with --resume, or start a new one with --set run_dir=<new directory>", "run_dir")


def resume(run: Run, template, skip_incomplete: bool = False, say=print) -> tuple[step_lib.TrainState, data_lib.DataState]:
    """The latest checkpoint of this run, checked against the config, onto `template`.

    With `skip_incomplete`, newer incomplete or corrupt steps are set aside
    (`<step>.incomplete`, `<step>.corrupt`) and the newest intact one is used; `say`
    reports what was loaded and moved.

    Raises:
      CheckpointError: no usable checkpoint, an incomplete or corrupt newest step
        (without `skip_incomplete`), or one incompatible with the config.
      ConfigError: the checkpoint is past `cfg.steps`.
    """
    directory = run.cfg.checkpoint_dir
    state, meta = ckpt.restore(directory, target=template, expect=compatibility(run.cfg),
                               skip_incomplete=skip_incomplete)
    step = int(state.step)
    for newer in (s for s in ckpt.all_steps(directory) if s > step):  # all failed verification
        moved = ckpt.set_aside(directory, newer)
        say(f"set aside {moved.suffix[1:]} checkpoint step {newer} as {moved}")
    if step > run.cfg.steps:
        raise config_lib.ConfigError(f"checkpoint step {step} in {directory} is past steps={run.cfg.steps}; "
                                     f"raise steps to continue, or use a new run_dir", "steps")
    say(f"resumed from step {step} of {directory}")
    return state, data_lib.DataState.from_dict(meta["data_state"])


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps (the step in flight finishes)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _progress(step: int, total: int, loss: float, tokens_per_s: float, out=sys.stderr) -> None:
    width = 24
    done = int(width * step / total)
    bar = "#" * done + "." * (width - done)
    out.write(f"\r[{bar}] step {step}/{total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s ")
    out.flush()


def _scalars(metrics: dict) -> dict:
    return {k: (bool(v) if np.asarray(v).dtype == bool else float(v)) for k, v in metrics.items()}


def train(cfg: config_lib.TrainConfig, *, resume_run: bool = False, quiet: bool = False,
          skip_incomplete: bool = False) -> dict:
    """Runs (or resumes) training; returns a summary with the loss history.

    Args:
      cfg: the run's config.
      resume_run: continue from the run's latest checkpoint; without it the run
        directory must not hold an earlier run (see `check_run_dir`).
      quiet: no progress output.
      skip_incomplete: when resuming, fall back past newer incomplete checkpoints
        (set aside and printed) instead of refusing.

    Returns:
      {"losses": [train loss per step taken in this call], "eval": last eval metrics,
       "final_step": int, "interrupted": signal number or None, "memory": bytes/param,
       "steps_run": steps taken in this call, "skipped_steps": of those, steps whose
       update was dropped}.

    Raises:
      ConfigError, CheckpointError, FileNotFoundError: user mistakes (one line each).
    """
    check_run_dir(cfg, resume_run)
    run = build(cfg)
    state = initial_state(run)
    data_state = data_lib.DataState()
    main = jax.process_index() == 0
    quiet = quiet or not main
    if resume_run:
        state, data_state = resume(run, state, skip_incomplete, say=print if not quiet else lambda _: None)
    ffn = roles.resolve(run.policy, roles.ffn_probe(0, False))
    report = optim.memory_report(state.params, state.opt_state, scale_state=state.fp8_state,
                                 compute_dtype_bytes=optim.compute_copy_bytes(ffn))
    run_dir = Path(cfg.run_dir or "runs/default")
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        config_lib.dump(cfg, run_dir / "config.yaml")  # the resolved config, for the record
        # The tokenizer's files (chat template, stop ids) travel with the run: its checkpoints
        # serve with them even when the directory it was read from moves.
        tokenizer_lib.carry_tokenizer(cfg.data.tokenizer, run_dir)
    if not quiet:
        print(f"mpx: {transformer.count_params(state.params):,} parameters, precision "
              f"{run.policy.name}, {jax.device_count()} {jax.default_backend()} device(s) in "
              f"{jax.process_count()} process(es), mesh {dict(run.layout.mesh.shape)}")
        print(report)
    log = metrics_log.MetricsLog(run_dir, int(state.step)) if main else metrics_log.NullLog()
    summary = {"losses": [], "eval": {}, "interrupted": None, "steps_run": 0, "skipped_steps": 0,
               "memory_bytes_per_param": report.per_param("total")}
    try:
        state, data_state = _loop(run, state, data_state, log, summary, quiet)
    finally:
        log.close()
    summary["final_step"] = int(state.step)
    return summary


def _loop(run: Run, state, data_state, log: metrics_log.MetricsLog | metrics_log.NullLog, summary: dict, quiet: bool):
    cfg = run.cfg
    start = int(state.step)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    t0, last_saved = time.perf_counter(), start
    rows = process_rows(run)
    with StopRequest() as stop:
        for step in range(start, cfg.steps):
            batch, data_state = run.stream.batch(data_state, rows)
            state, metrics = run.train_step(state, device_batch(run, batch))
            done = step + 1
            record = _scalars(metrics)
            summary["losses"].append(record["loss"])
            summary["steps_run"] += 1
            summary["skipped_steps"] += int(record["skipped"])
            if done % cfg.log_every == 0 or done == cfg.steps:
                rate = (done - start) * tokens_per_step / max(time.perf_counter() - t0, 1e-9)
                log.write(done, {**record, "tokens_per_s": rate})
                if not quiet:
                    _progress(done, cfg.steps, record["loss"], rate)
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                summary["eval"] = evaluate(run, state)
                log.write(done, summary["eval"])
                if not quiet:
                    print(f"\n  eval loss {summary['eval']['eval_loss']:.4f}  ppl {summary['eval']['eval_ppl']:.2f}")
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == cfg.steps:
                save(run, state, data_state)
                last_saved = done
            if stop.signal is not None:
                if last_saved != done:
                    save(run, state, data_state)
                summary["interrupted"] = stop.signal
                if not quiet:
                    print(f"\nstopped by signal {stop.signal} at step {done}; checkpoint saved to "
                          f"{cfg.checkpoint_dir}; continue with --resume")
                break
    if not quiet:
        print()
    return state, data_state
