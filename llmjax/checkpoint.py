"""Checkpoints on orbax: train state (sharded arrays), data-iterator state and config as JSON.

Saves are asynchronous and atomic (orbax commits a step by renaming its temporary directory);
leftover temporary directories from a killed run are cleaned on start. Restores go onto an
abstract target carrying shardings, so a checkpoint restores onto whatever mesh the run has.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from llmjax.errors import UserError


class Checkpointer:
  """Saves and restores (state, data_state, config) under `directory`, keeping the newest `keep`."""

  def __init__(self, directory: str, keep: int, *, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict, config: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)), force=True)

  def restore(self, step: int, abstract_state, shardings):
    """(state placed in `shardings`, data_state, config dict) for a committed step."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, shardings)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
          config=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as e:
      raise UserError(f"checkpoint {self.directory}/{step} does not match this model: {e}") from e
    return restored.state, restored.data, restored.config

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
