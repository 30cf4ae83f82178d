"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from flags or environment.

One command runs on a laptop, on 2 local processes and on a GPU or TPU cluster:

    python -m train.run --config c.yaml                                  # one process
    python -m train.run --config c.yaml --coordinator 10.0.0.1:1234 \\
        --num-processes 4 --process-id $RANK                             # explicit
    MPX_COORDINATOR=10.0.0.1:1234 MPX_NUM_PROCESSES=4 MPX_PROCESS_ID=$RANK \\
        python -m train.run --config c.yaml                              # environment
    python -m train.run --config c.yaml --distributed                    # auto-detect

Flags win over `MPX_*` variables. `--distributed` (or `MPX_DISTRIBUTED=1`) alone calls
`jax.distributed.initialize()` without arguments: JAX then detects the cluster itself
(Cloud TPU pods, SLURM, Open MPI). On CPU the processes talk over gloo (TCP), which
is how the tests run 2 local processes.

After initialization every process sees all devices of all processes in
`jax.devices()` and builds the same global mesh; each feeds its own rows of the
global batch (`mpx.sharding.process_rows`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax

ENV_COORDINATOR = "MPX_COORDINATOR"
ENV_NUM_PROCESSES = "MPX_NUM_PROCESSES"
ENV_PROCESS_ID = "MPX_PROCESS_ID"
ENV_AUTO = "MPX_DISTRIBUTED"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Coordinator settings; all None (and auto False) means a single process.

    Attributes:
      coordinator: "host:port" of process 0's coordinator service.
      num_processes: number of processes.
      process_id: this process's id in [0, num_processes).
      auto: let `jax.distributed.initialize()` detect the cluster (TPU, SLURM, MPI).
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    @property
    def enabled(self) -> bool:
        """Whether `initialize` starts the distributed runtime."""
        return self.auto or self.coordinator is not None


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None


def resolve(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            auto: bool = False, env: Mapping[str, str] | None = None) -> DistributedConfig:
    """The settings from arguments (flags), falling back to `MPX_*` environment variables.

    Args:
      coordinator, num_processes, process_id: explicit settings (None: from `env`).
      auto: auto-detect the cluster (also set by MPX_DISTRIBUTED=1).
      env: the environment (default `os.environ`).

    Returns:
      A validated `DistributedConfig`.

    Raises:
      ValueError: a coordinator without both counts (or counts without a coordinator),
        a process id outside [0, num_processes), or a non-integer variable.
    """
    env = os.environ if env is None else env
    cfg = DistributedConfig(
        coordinator=coordinator or env.get(ENV_COORDINATOR) or None,
        num_processes=num_processes if num_processes is not None else _env_int(env, ENV_NUM_PROCESSES),
        process_id=process_id if process_id is not None else _env_int(env, ENV_PROCESS_ID),
        auto=auto or env.get(ENV_AUTO, "").lower() in ("1", "true", "yes"),
    )
    _validate(cfg)
    return cfg


def _validate(cfg: DistributedConfig) -> None:
    explicit = (cfg.coordinator, cfg.num_processes, cfg.process_id)
    if cfg.auto and all(v is None for v in explicit):
        return
    if any(v is None for v in explicit) and any(v is not None for v in explicit):
        raise ValueError(
            f"multi-process training needs all of coordinator, num_processes and process_id "
            f"(flags --coordinator/--num-processes/--process-id or {ENV_COORDINATOR}/"
            f"{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}); got coordinator={cfg.coordinator!r}, "
            f"num_processes={cfg.num_processes!r}, process_id={cfg.process_id!r}")
    if cfg.num_processes is not None and not 0 <= cfg.process_id < cfg.num_processes:
        raise ValueError(f"process_id={cfg.process_id} must be in [0, num_processes={cfg.num_processes})")


def initialize(cfg: DistributedConfig) -> bool:
    """Starts JAX's distributed runtime when `cfg` asks for it; call before any JAX work.

    CPU collectives use gloo (TCP), so several local CPU processes form one mesh.

    Returns:
      True if the runtime was started, False for a single process.
    """
    if not cfg.enabled:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cfg.coordinator is None:
        jax.distributed.initialize()  # cluster auto-detection (TPU, SLURM, Open MPI)
    else:
        jax.distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id)
    return True


def is_main_process() -> bool:
    """True on process 0: the one that logs and prints."""
    return jax.process_index() == 0
