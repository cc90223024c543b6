"""Multi-process start-up, the device mesh, shardings and global batches."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def initialize_distributed(config) -> None:
  """``jax.distributed.initialize`` from the config; call it before any other JAX call. With
  ``config.distributed`` and no address, JAX detects the cluster itself (TPU pods, SLURM, Open
  MPI, Kubernetes). ``coordinator_address``, ``num_processes`` and ``process_id`` name it for
  clusters JAX does not detect (``num_processes`` and ``process_id`` go together). A second
  call is a no-op, so ``compare`` initialises once. A ValueError for flags that do not go
  together; a RuntimeError, naming the flags to check, when the coordinator cannot be reached
  within ``config.distributed_timeout_s``."""
  if not config.get("distributed", False) or jax.distributed.is_initialized():
    return
  addr = config.get("coordinator_address") or None
  n = config.get("num_processes", 0) or None
  pid = config.get("process_id", -1)
  pid = None if pid is None or pid < 0 else int(pid)
  if (n is None) != (pid is None):
    raise ValueError(
      f"--config.num_processes={n} and --config.process_id={pid} go together: set both "
      "(with --config.coordinator_address=host:port) or neither (JAX detects the cluster)."
    )
  if n is not None and addr is None:
    raise ValueError(
      "--config.num_processes and --config.process_id need --config.coordinator_address "
      "(host:port of process 0, reachable from every process)."
    )
  timeout = int(config.get("distributed_timeout_s", 300))
  if addr is not None and pid:
    # XLA's client aborts the process (no Python exception) when the coordinator is
    # unreachable: check it first, so the error is one clear line naming the flag.
    _wait_for_coordinator(addr, timeout)
  if addr is not None and pid == 0:
    logging.warning(
      "process 0: serving the coordinator at --config.coordinator_address=%s; waiting up to "
      "--config.distributed_timeout_s=%d s for --config.num_processes=%d processes.",
      addr,
      timeout,
      n,
    )
  try:
    jax.distributed.initialize(
      coordinator_address=addr, num_processes=n, process_id=pid, initialization_timeout=timeout
    )
  except Exception as e:  # noqa: BLE001  (one clear message whatever the cause)
    raise RuntimeError(
      f"jax.distributed.initialize(coordinator_address={addr!r}, num_processes={n}, "
      f"process_id={pid}) failed within --config.distributed_timeout_s={timeout}: {e}. "
      "Check that --config.coordinator_address is process 0's host:port and reachable "
      "from every process, and that all num_processes processes were started."
    ) from e


def _wait_for_coordinator(addr: str, timeout: float) -> None:
  import socket

  host, _, port = addr.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"--config.coordinator_address={addr!r} must be host:port.")
  deadline = time.time() + timeout
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
        return
    except OSError as e:
      if time.time() > deadline:
        raise RuntimeError(
          f"the coordinator at --config.coordinator_address={addr} could not be reached "
          f"within --config.distributed_timeout_s={timeout:g} ({e}). Start process 0 with "
          "the same address, and check the host and port from this machine."
        ) from None
      time.sleep(0.2)


def is_lead() -> bool:
  return jax.process_index() == 0


def make_mesh(config):
  """A 1-D ``data`` mesh over all devices, or None for plain single-device runs."""
  mode = config.get("sharding", "none")
  if mode not in ("none", "replicated", "fsdp"):
    raise ValueError(
      f"sharding={mode!r} is not known: choose one of ('none', 'replicated', 'fsdp')."
    )
  if mode == "none":
    return None
  return Mesh(np.asarray(jax.devices()), ("data",))


def state_shardings(state, mesh, mode):
  """Replicated params, or FSDP-style: each leaf's largest divisible axis over ``data``."""
  n = mesh.devices.size

  def one(x):
    if mode == "fsdp" and jnp.ndim(x) >= 1:
      axes = sorted(range(jnp.ndim(x)), key=lambda a: -jnp.shape(x)[a])
      for a in axes:
        if jnp.shape(x)[a] % n == 0:
          spec = [None] * jnp.ndim(x)
          spec[a] = "data"
          return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map(one, state)


def batch_sharding(mesh, ndim: int):
  """Rows over the mesh's ``data`` axis, every other dim whole."""
  return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def global_batch(local_batch, mesh):
  """This process's rows of the global batch as one global array sharded on ``data``."""
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in local_batch.items()}
  out = {}
  for k, v in local_batch.items():
    local = np.asarray(v)
    sharding = batch_sharding(mesh, local.ndim)
    shape = (len(local) * jax.process_count(), *local.shape[1:])
    out[k] = jax.make_array_from_process_local_data(sharding, local, shape)
  return out


def padded_global(arrays: dict, mesh) -> dict:
  """Host arrays (the same on every process) as arrays sharded over ``data``. Rows are padded to a
  multiple of the device count (``w`` = 0 there). Each process transfers only the rows of its
  own devices."""
  n = len(arrays["y"])
  pad = 0 if mesh is None else -n % mesh.devices.size
  out = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in arrays.items()}
  out["w"] = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in out.items()}

  def place(v):
    sharding = batch_sharding(mesh, v.ndim)
    return jax.make_array_from_callback(v.shape, sharding, lambda idx: v[idx])

  return {k: place(v) for k, v in out.items()}


def place_state(state, shardings):
  """Puts a host-identical pytree on its shardings (each process fills its own devices)."""

  def one(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree_util.tree_map(one, state, shardings)


def host_state(state) -> dict:
  """The state as host numpy arrays on every process (gathers sharded leaves)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    state = multihost_utils.process_allgather(state, tiled=True)
  return {f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(state))}
