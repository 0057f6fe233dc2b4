"""Joining a multi-process (multi-host) JAX job: the settings every distributed command shares.

A pod runs the same command once per host (one process each); `initialize` connects them with
`jax.distributed.initialize()`, which detects the cluster on Cloud TPU, SLURM, Open MPI and
Kubernetes. Elsewhere (and on one machine, for tests) give the coordinator's address, the number
of processes and each one's index, or set JAX_COORDINATOR_ADDRESS and friends.
"""

from __future__ import annotations

import jax

from compress.config import ConfigError
from compress.errors import InputError

# The fields a command's config carries for this (flat, so `--distributed --process-id 1` read well):
#   distributed: bool = False; coordinator_address: str | None; num_processes: int | None; process_id: int | None
CLUSTER_FIELDS = ("coordinator_address", "num_processes", "process_id")


def check_cluster_fields(config) -> None:
    """For a config's __post_init__: the cluster fields only with `distributed`, counts positive."""
    given = [name for name in CLUSTER_FIELDS if getattr(config, name) is not None]
    if given and not config.distributed:
        raise ConfigError(f"{', '.join(given)}: only for a multi-host job; add --distributed (distributed=true)",
                          key=given[0])
    if config.num_processes is not None and config.num_processes < 1:
        raise ConfigError(f"must be at least 1, got {config.num_processes}", key="num_processes")
    if config.process_id is not None and (
        config.process_id < 0 or (config.num_processes is not None and config.process_id >= config.num_processes)
    ):
        top = "num_processes" if config.num_processes is None else config.num_processes
        raise ConfigError(f"must be in [0, {top}), got {config.process_id}", key="process_id")


def add_cluster_flags(flags) -> None:
    """The --distributed, --coordinator-address, --num-processes and --process-id flags."""
    flags.flag("--distributed", key="distributed", action="store_true",
               help="call jax.distributed.initialize() first (multi-host pods: one process per host)")
    flags.flag("--coordinator-address", key="coordinator_address", metavar="HOST:PORT",
               help="with --distributed: host:port of process 0 (default: detected, or JAX_COORDINATOR_ADDRESS)")
    flags.flag("--num-processes", key="num_processes", type=int, help="with --distributed: processes in the job")
    flags.flag("--process-id", key="process_id", type=int, help="with --distributed: this process's index")


def initialize(config) -> None:
    """Join the job if `config.distributed`; an InputError says what JAX could not detect."""
    if not config.distributed:
        return
    try:
        jax.distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
    except ValueError as e:  # what JAX could not detect and was not given
        raise InputError(f"--distributed: {e} Give --coordinator-address HOST:PORT (or JAX_COORDINATOR_ADDRESS), "
                         "--num-processes and --process-id, or run where JAX detects the cluster (SLURM, "
                         "Open MPI, Kubernetes, Cloud TPU)") from None
