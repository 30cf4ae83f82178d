"""Checkpoints of training state with orbax, verified by a checksum manifest on restore.

Layout, one directory per step:

    <directory>/<step>/state/          the state pytree (orbax StandardSave, OCDBT)
    <directory>/<step>/meta/           JSON metadata (the caller's dict, PRNG key impls)
    <directory>/<step>/manifest.json   size and sha256 of every other file in <step>/

orbax writes bf16, float8 and sharded arrays bit-exactly but does not notice flipped
bytes in its data files, so `save` writes the manifest after orbax has finished and
`restore` checks every file against it before reading anything: a corrupt, truncated,
missing or unexpected file is a `CheckpointError`, never a silently wrong state. A step
without a readable manifest (a save interrupted before it was written, or a deleted
manifest) is incomplete: `restore` refuses it by name, and when it is the newest step,
`latest_step` refuses too. `restore` without a step takes `newest_usable`: the newest
step whose files all verify; a newest step that is incomplete or corrupt is refused with
what to do, unless the caller asks with `skip_incomplete=True` to fall back to the
newest intact step. `set_aside` renames a step that fails verification out of the way
(`<step>.incomplete` or `<step>.corrupt`) so that a resumed run can save.

Typed PRNG keys (`jax.random.key`) are stored as their `key_data` and re-wrapped on
restore with their recorded implementation. Saves are synchronous; steps must increase.

Usage (`abstract_state = jax.eval_shape(init_fn)` with shardings attached):

    save(ckpt_dir, step, {"params": params, "opt": opt_state, "rng": key},
         {"model": to_dict(cfg.model)}, keep=3)
    state, meta = restore(ckpt_dir, target=abstract_state, expect={"model": to_dict(cfg.model)})
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from store.prng_keys import CheckpointError, abstract_leaf, keys_to_wrap, leaves_by_path, unwrap_keys, wrap_keys

MANIFEST = "manifest.json"
_FORMAT = 1  # version of the layout above


# ---------------------------------------------------------------------------
# Directory layout and the checksum manifest.


def _step_dir(directory: str | Path, step: int) -> Path:
    return Path(directory) / str(step)


def all_steps(directory: str | Path) -> list[int]:
    """Steps with a finalized orbax directory under `directory`, complete or not, sorted."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def _has_manifest(directory: str | Path, step: int) -> bool:
    try:
        _read_manifest(_step_dir(directory, step))
    except CheckpointError:
        return False
    return True


def incomplete_steps(directory: str | Path) -> list[int]:
    """Steps newer than the newest complete one whose manifest is missing or unreadable."""
    steps = all_steps(directory)
    complete = [s for s in steps if _has_manifest(directory, s)]
    return [s for s in steps if not complete or s > complete[-1]] if steps else []


def latest_step(directory: str | Path, *, skip_incomplete: bool = False) -> int | None:
    """The newest complete step (one with a valid manifest) under `directory`, or None.

    Args:
      directory: checkpoint root.
      skip_incomplete: fall back past newer incomplete steps instead of refusing.

    Raises:
      CheckpointError: the newest step is incomplete and `skip_incomplete` is False;
        the message names it and the step a fallback would use.
    """
    newer = incomplete_steps(directory)
    complete = [s for s in all_steps(directory) if s not in newer]
    if newer and not skip_incomplete:
        older = f"step {complete[-1]}" if complete else "no complete step (there is none)"
        raise CheckpointError(
            f"checkpoint {_step_dir(directory, newer[-1])} is incomplete or corrupt: no valid "
            f"{MANIFEST} (the save was interrupted, or the file was deleted); delete it, or "
            f"pass --skip-incomplete to use {older}")
    return complete[-1] if complete else None


def newest_usable(directory: str | Path, *, skip_incomplete: bool = False) -> tuple[int, list[int]]:
    """The newest step whose files all match its manifest, verified, and the newer steps passed over.

    A newest step that is incomplete (no valid manifest) or corrupt (a file missing,
    truncated or changed) is refused, naming what to do, unless `skip_incomplete`: then
    older steps are tried, newest first.

    Returns:
      (step, [newer steps that failed verification, newest first]).

    Raises:
      CheckpointError: no steps; the newest step fails verification (without
        `skip_incomplete`: the message says to delete it or pass --skip-incomplete,
        naming the older step that would be tried); no step verifies.
    """
    steps, skipped = all_steps(directory), []
    for step in reversed(steps):
        try:
            verify(directory, step)
            return step, skipped
        except CheckpointError as err:
            if not skip_incomplete:
                older = [s for s in steps if s < step]
                fallback = f"step {older[-1]}" if older else "an older step (there is none)"
                raise CheckpointError(f"{err}; delete it (or move it away), or pass --skip-incomplete to "
                                      f"use {fallback}") from None
            skipped.append(step)
    detail = f"steps {steps} fail verification against their {MANIFEST}" if steps else "it is empty"
    raise CheckpointError(f"no complete checkpoint in {directory}: {detail}")


def set_aside(directory: str | Path, step: int) -> Path:
    """Renames a step that fails verification to `<step>.incomplete` (no valid manifest) or
    `<step>.corrupt` (files that differ from it), so it is no longer a step; returns it.

    Raises:
      CheckpointError: the step verifies (intact steps are never moved).
    """
    try:
        verify(directory, step)
    except CheckpointError:
        kind = "corrupt" if _has_manifest(directory, step) else "incomplete"
        target = Path(directory) / f"{step}.{kind}"
        os.replace(_step_dir(directory, step), target)
        return target
    raise CheckpointError(f"checkpoint {_step_dir(directory, step)} is complete; not moving it")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(step_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def _write_manifest(step_dir: Path) -> None:
    files = {name: {"size": (step_dir / name).stat().st_size, "sha256": _sha256(step_dir / name)}
             for name in _files(step_dir)}
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": _FORMAT, "files": files}, indent=1, sort_keys=True))
    os.replace(tmp, step_dir / MANIFEST)  # atomic: a manifest is whole or absent


def _read_manifest(step_dir: Path) -> dict:
    path = step_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint {step_dir} is incomplete (no {MANIFEST}: the save "
                              "was interrupted, or the file was deleted)")
    try:
        files = json.loads(path.read_text())["files"]
        return {name: (int(e["size"]), str(e["sha256"])) for name, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {step_dir}: {MANIFEST} is corrupt ({e!r})") from None


def _file_problem(path: Path, size: int, sha256: str) -> str | None:
    if not path.is_file():
        return "missing"
    actual = path.stat().st_size
    if actual != size:
        kind = "truncated" if actual < size else "longer than saved"
        return f"{kind}: {actual} bytes, manifest says {size}"
    if _sha256(path) != sha256:
        return "corrupt: sha256 differs from the manifest"
    return None


def verify(directory: str | Path, step: int) -> None:
    """Checks every file of checkpoint `step` against its manifest.

    Raises:
      CheckpointError: no manifest, or a file missing, truncated, changed or unexpected;
        the message names the step directory and the file.
    """
    step_dir = _step_dir(directory, step)
    expected = _read_manifest(step_dir)
    for name in sorted(set(_files(step_dir)) - set(expected)):
        raise CheckpointError(f"checkpoint {step_dir}: unexpected file {name} not in {MANIFEST}")
    for name, (size, sha256) in sorted(expected.items()):
        problem = _file_problem(step_dir / name, size, sha256)
        if problem:
            raise CheckpointError(f"checkpoint {step_dir}: file {name} is {problem}")


# ---------------------------------------------------------------------------
# Save and restore.


def _manager(directory: str | Path, keep: int | None = None, *,
             read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=False)  # the manifest must see finished files
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                 item_handlers=handlers)


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs every read-only restore as an absl warning: silence it, then restore."""
    before = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(before)


def _check_json(metadata: Any) -> None:
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint metadata must be JSON-serializable: {e}") from None


def save(directory: str | Path, step: int, state: Any, metadata: dict | None = None, *,
         keep: int | None = None) -> Path:
    """Saves `state` and `metadata` as checkpoint `step`, then writes its manifest.

    Args:
      directory: checkpoint root; created if missing.
      step: the step number; must be greater than every step already in `directory`.
      state: any pytree of jax/numpy arrays (any dtype, any sharding, typed PRNG keys)
        and Python scalars: params, optimizer state, scale state, data position, ...
      metadata: a JSON-serializable dict (e.g. the resolved config), checked by
        `restore(expect=...)`.
      keep: keep only the newest `keep` steps (None keeps all).

    Returns:
      The step directory.

    Raises:
      CheckpointError: `step` is not after the existing steps.
      TypeError: `metadata` is not JSON-serializable.
    """
    metadata = {} if metadata is None else metadata
    _check_json(metadata)
    existing = all_steps(directory)
    if existing and step <= existing[-1]:
        raise CheckpointError(f"cannot save step {step} in {directory}: it already holds steps "
                              f"up to {existing[-1]} and steps must increase; move or delete "
                              f"the steps >= {step} first")
    state, key_impls = unwrap_keys(state)
    meta = {"format": _FORMAT, "metadata": metadata, "prng_keys": key_impls}
    with _manager(directory, keep) as manager:
        saved = manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()
    if not saved:
        raise CheckpointError(f"orbax declined to save step {step} in {directory}")
    step_dir = _step_dir(directory, step)
    if jax.process_index() == 0:
        _write_manifest(step_dir)
    return step_dir


def _verified_step(directory: str | Path, step: int | None, skip_incomplete: bool = False) -> int:
    """`step` (default: `newest_usable`), its files verified against its manifest."""
    if not Path(directory).is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
    if step is None:
        return newest_usable(directory, skip_incomplete=skip_incomplete)[0]
    steps = all_steps(directory)
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {directory}; steps: {steps}")
    verify(directory, step)
    return step


def _differences(expect: dict, actual: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key, want in expect.items():
        dotted = f"{prefix}{key}"
        if not isinstance(actual, dict) or key not in actual:
            diffs.append(f"{dotted}: expected {want!r}, checkpoint has none")
        elif isinstance(want, dict) and isinstance(actual[key], dict):
            diffs.extend(_differences(want, actual[key], dotted + "."))
        elif want != actual[key]:
            diffs.append(f"{dotted}: expected {want!r}, checkpoint has {actual[key]!r}")
    return diffs


def _check_expect(step_dir: Path, metadata: dict, expect: dict) -> None:
    expect = json.loads(json.dumps(expect))  # tuples -> lists, as stored
    diffs = _differences(expect, metadata)
    if diffs:
        raise CheckpointError(f"checkpoint {step_dir} is incompatible: {'; '.join(diffs)}")


def _some(names: set[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"[{', '.join(names[:limit])}]{more}"


def _check_target(step_dir: Path, saved_tree: Any, abstract: Any) -> None:
    """orbax casts to the target's dtype silently: insist on the saved shapes and dtypes."""
    saved, wanted = leaves_by_path(saved_tree), leaves_by_path(abstract)
    if set(saved) != set(wanted):
        raise CheckpointError(
            f"checkpoint {step_dir} does not match the target tree: only in the checkpoint: "
            f"{_some(set(saved) - set(wanted))}; only in the target: {_some(set(wanted) - set(saved))}")
    for name, want in wanted.items():
        if not hasattr(want, "dtype"):
            continue  # a Python scalar in the target
        have = saved[name]
        if tuple(have.shape) != tuple(want.shape) or np.dtype(have.dtype) != np.dtype(want.dtype):
            raise CheckpointError(
                f"checkpoint {step_dir}: {name} was saved as {np.dtype(have.dtype)}{list(have.shape)}, "
                f"the target asks for {np.dtype(want.dtype)}{list(want.shape)}")


def read_metadata(directory: str | Path, step: int | None = None, *,
                  skip_incomplete: bool = False) -> tuple[int, dict]:
    """The step and metadata dict of checkpoint `step` (default: latest), verified.

    Raises:
      CheckpointError: as `restore`.
    """
    step = _verified_step(directory, step, skip_incomplete)
    with _quiet_orbax(), _manager(directory, read_only=True) as manager:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return step, meta["metadata"]


def restore(directory: str | Path, step: int | None = None, target: Any = None, *,
            expect: dict | None = None, skip_incomplete: bool = False) -> tuple[Any, dict]:
    """Restores checkpoint `step` after verifying its files and metadata.

    Args:
      directory: checkpoint root.
      step: the step to restore; None for the latest complete one.
      target: optional pytree like the saved state, of arrays or `jax.ShapeDtypeStruct`
        with `sharding=`: arrays are restored with those shardings (so a checkpoint
        saved on one mesh restores onto another). Shapes and dtypes must match the
        saved ones. Without it, arrays come back as saved (dicts for NamedTuples).
      expect: key/value pairs (nested dicts compared key by key) the saved metadata
        must contain, e.g. {"model": to_dict(model_config)}.
      skip_incomplete: with `step=None`, fall back past newer incomplete or corrupt
        steps instead of refusing (see `newest_usable`).

    Returns:
      (state, metadata).

    Raises:
      CheckpointError: no directory or no complete checkpoint; a newest step without a
        valid manifest (unless `skip_incomplete`); a missing, truncated or
        corrupt file; metadata differing from `expect` (naming the keys); a target
        whose structure, shapes or dtypes differ from the checkpoint.
    """
    step = _verified_step(directory, step, skip_incomplete)
    step_dir = _step_dir(directory, step)
    with _quiet_orbax(), _manager(directory, read_only=True) as manager:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if expect:
            _check_expect(step_dir, meta["metadata"], expect)
        abstract = None
        if target is not None:
            abstract = jax.tree.map(abstract_leaf, target)
            saved_tree = manager.item_metadata(step)["state"]
            _check_target(step_dir, getattr(saved_tree, "tree", saved_tree), abstract)
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract))).state
    return wrap_keys(state, keys_to_wrap(step_dir, meta["prng_keys"], target)), meta["metadata"]
