"""Run records: the config record a resume is checked against, metrics, checkpoints, final state."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from experiments import parallel

# Keys that say how a run is launched, not what it computes: a resume may change them.
LAUNCH_KEYS = (
  "distributed",
  "coordinator_address",
  "num_processes",
  "process_id",
  "distributed_timeout_s",
  "progress",
  "data_dir",
  "compare_methods",
)
CONFIG_FILE = "config.json"


def check_or_record_config(config, workdir: str, resuming: bool, write: bool = True) -> None:
  """Records the resolved config in ``workdir``; a resume must not change what it computes.
  A ValueError, naming the keys and how to start fresh, when ``workdir`` holds a run whose
  recorded config differs from ``config`` in any key but the launch keys (``LAUNCH_KEYS``)."""
  path = os.path.join(workdir, CONFIG_FILE)
  new = json.loads(json.dumps(config.to_dict(), default=str))  # tuples -> lists, as stored
  if resuming and os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    a, b = traverse_util.flatten_dict(old, sep="."), traverse_util.flatten_dict(new, sep=".")
    diff = sorted(
      k
      for k in set(a) | set(b)
      if k.split(".")[0] not in LAUNCH_KEYS and a.get(k, "<unset>") != b.get(k, "<unset>")
    )
    if diff:
      changes = ", ".join(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in diff)
      raise ValueError(
        f"--workdir {workdir} holds a run with a different config ({changes}); resuming "
        "it would continue that run, not start this one. Use another --workdir, or "
        f"delete {workdir} to start fresh."
      )
  if write:  # atomically: other processes may be reading it
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


class Run:
  """A run's files in ``workdir``: the config record, ``metrics.jsonl``, orbax checkpoints
  and ``final_state.npz``. Under several processes every process holds one (checkpoints
  are collective); only the lead process (``lead=True``) writes the other files.
  """

  def __init__(self, config, workdir: str, lead: bool):
    os.makedirs(workdir, exist_ok=True)
    self.workdir, self.lead = workdir, lead
    self.ckpts = os.path.join(workdir, "checkpoints")
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.mngr = ocp.CheckpointManager(
      os.path.abspath(self.ckpts),
      options=ocp.CheckpointManagerOptions(
        save_interval_steps=config.checkpoint_every_steps, max_to_keep=2
      ),
    )
    self.latest = self.mngr.latest_step()
    # Only a checkpoint is continued: a run killed before its first one starts afresh.
    check_or_record_config(config, workdir, self.latest is not None, write=lead)
    self.history: list = []
    self.wall_offset, self.cpu_offset, self.t0, self.c0 = 0.0, 0.0, time.time(), time.process_time()

  def restore(self, state):
    """``(state, start step)``: the latest checkpoint's, and the metrics kept up to it."""
    start = 0
    if self.latest is not None:
      try:
        restored = self.mngr.restore(
          self.latest,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state), meta=ocp.args.JsonRestore()
          ),
        )
      except Exception as e:  # noqa: BLE001
        raise ValueError(
          f"the checkpoint at step {self.latest} in {self.ckpts} does not fit this run's state "
          f"(another model, method or optimiser chain?): {type(e).__name__}: {str(e)[:500]}. "
          "Use another --workdir, or delete it to start fresh."
        ) from e
      state, meta = restored["state"], restored["meta"]  # "cpu": older checkpoints lack it
      self.wall_offset, self.cpu_offset = float(meta["wall"]), float(meta.get("cpu", 0))
      start = int(state["step"])
      logging.info("Resumed from step %d", start)
    if os.path.exists(self.metrics_path):
      with open(self.metrics_path) as f:
        self.history = [r for r in map(json.loads, f) if r["step"] <= start]
    if self.lead:
      with open(self.metrics_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in self.history)
    self.t0, self.c0 = time.time(), time.process_time()
    return state, start

  def wall(self) -> float:
    return self.wall_offset + time.time() - self.t0

  def save(self, state, step: int, force: bool = False) -> None:
    cpu = self.cpu_offset + time.process_time() - self.c0
    meta = ocp.args.JsonSave({"wall": float(self.wall()), "cpu": cpu})
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=meta)
    self.mngr.save(step, args=args, force=force)

  def append(self, record: dict) -> None:
    self.history.append(record)
    if self.lead:
      with open(self.metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")

  def finish(self, state, total_steps: int, start: int) -> dict:
    """The last checkpoint and ``final_state.npz``; returns the last metrics record."""
    if start < total_steps or self.latest != total_steps:
      self.save(state, total_steps, force=True)
    self.mngr.wait_until_finished()
    self.mngr.close()
    final = parallel.host_state(state)  # collective under several processes: all call it
    if self.lead:
      np.savez(os.path.join(self.workdir, "final_state.npz"), **final)
    return self.history[-1] if self.history else {}
