"""Checkpoints on orbax, with the guarantees orbax alone does not give.

Each step directory holds four items: `state` (sharded arrays), `data` (grain iterator state,
JSON), `config` (resolved experiment, JSON) and `meta` (per-array checksums and the ranking
metric, JSON). Saves are asynchronous and atomic (orbax commits a step by renaming its temporary
directory; leftovers of a killed save are cleaned on start). Restores go onto an abstract target
carrying shardings, so any mesh can restore any checkpoint, and every restored array is verified
against its checksum: a truncated, missing or bit-flipped file is reported by step and array path,
never restored silently. Retention keeps the newest k steps always, plus the best n by a metric
where NaN/inf rank worst. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store  # no public path in orbax
from orbax.checkpoint._src.serialization import type_handler_registry

from llmjax.checksums import checksums
from llmjax.errors import UserError, capped
from llmjax.treepaths import path_str

ITEMS = ("state", "data", "config", "meta")

# orbax saves an array that several devices hold whole (replicated) in parallel: each replica
# slices its part on its device, outside jit, so every new shape costs one small compile per
# device. For slices under a MiB the parallel write saves nothing worth that (a tiny model on 8
# devices: some 90 such compiles at its first save); bigger arrays still write in parallel. The
# bytes stored are the same either way. Registered for jax.Array in orbax's global registry, so it
# holds for every orbax save in a process that imports llmjax (orbax's own default otherwise).
MIN_REPLICA_SLICE_BYTES = 1 << 20
type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(
    jax.Array, ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
        array_metadata_store=array_metadata_store.Store()),
    override=True, ignore_warnings=True)


class CheckpointError(UserError):
  """A checkpoint that cannot be saved or restored as promised; the message names step and path."""


def structure_mismatch(saved: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
  """Human-readable differences between two {path: shape} maps, parameters before the rest."""
  order = lambda p: (not p.startswith("params/"), p)
  problems = [(p, f"missing in checkpoint: {p} {expected[p]}") for p in set(expected) - set(saved)]
  problems += [(p, f"unexpected in checkpoint: {p} {saved[p]}") for p in set(saved) - set(expected)]
  problems += [(p, f"shape of {p}: checkpoint {saved[p]}, model {expected[p]}")
               for p in set(saved) & set(expected) if tuple(saved[p]) != tuple(expected[p])]
  return [text for _, text in sorted(problems, key=lambda item: order(item[0]))]


def describe(problems: list[str], limit: int = 5) -> str:
  return capped(problems, limit, "; ")


def check_structure(saved_checksums: dict, abstract, where: str) -> None:
  """UserError naming every path and shape where `abstract` differs from what was saved."""
  problems = structure_mismatch(
      {p: tuple(v[2]) for p, v in saved_checksums.items()},
      {path_str(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]})
  if problems:
    raise UserError(f"{where} does not match this model: " + describe(problems))


def _target(abstract, shardings):
  """Abstract arrays carrying the shardings a restore should place them in."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _rank_value(metric) -> float:
  """Lower is better; NaN, inf and missing rank worst."""
  return float(metric) if metric is not None and math.isfinite(metric) else math.inf


class Checkpointer:
  """Save/restore (state, data_state, config) under `directory` with verification and retention."""

  def __init__(self, directory: str, keep: int, *, keep_best: int = 0, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.keep, self.keep_best = keep, keep_best
    self._metrics: dict[int, float | None] = {}  # read from disk once per step, not per save
    try:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=None, create=True, enable_async_checkpointing=async_save,
          cleanup_tmp_directories=True,
          # Create step directories in the caller: when that fails in orbax's background
          # thread, its other threads wait minutes for a signal that never comes.
          async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
      self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    except OSError as e:
      raise CheckpointError(f"cannot use checkpoint directory {self.directory}: {e}") from e

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict, config: dict, metric: float | None = None):
    """Start an async save of `step`; errors of the previous save surface here."""
    meta = {"step": int(step), "metric": metric if metric is None or math.isfinite(metric)
            else str(metric), "checksums": checksums(state),
            "json_sha256": {"data": _json_hash(data_state), "config": _json_hash(config)}}
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(config), meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # orbax raises many types for a failed write; all mean the same here
      raise CheckpointError(f"checkpoint save failed at step {step} in {self.directory}: "
                            f"{_one_line(e)}") from e
    self._metrics[step] = metric
    self._apply_retention(protect=step)

  def _apply_retention(self, protect: int) -> None:
    """Delete committed steps outside newest-k and best-n; never the one being written."""
    steps = [s for s in self.all_steps() if s != protect]
    keep = set(sorted(steps + [protect])[-self.keep:])
    if self.keep_best:
      rank = {s: _rank_value(self._metric(s)) for s in steps}
      ranked = sorted((s for s in steps if math.isfinite(rank[s])), key=lambda s: (rank[s], -s))
      keep |= set(ranked[: self.keep_best])
    for step in steps:
      if step not in keep:
        self._manager.delete(step)

  def _metric(self, step: int):
    if step not in self._metrics:
      self._metrics[step] = self._metric_on_disk(step)
    value = self._metrics[step]
    return value if isinstance(value, (int, float)) else None

  def _metric_on_disk(self, step: int):
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      value = meta.meta.get("metric")
      return value if isinstance(value, (int, float)) else None
    except Exception:  # an unreadable meta ranks worst; integrity is checked on restore
      return None

  def restore(self, step: int, abstract_state, shardings):
    """(state in `shardings`, data_state, config) of `step`, verified; CheckpointError if not."""
    self.wait()
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:
      raise CheckpointError(f"checkpoint step {step}: metadata unreadable: {_one_line(e)}") from e
    check_structure(meta["checksums"], abstract_state,
                    f"checkpoint step {step} in {self.directory}")
    target = _target(abstract_state, shardings)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
          config=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(f"checkpoint step {step}: unreadable: {_one_line(e)}") from e
    for name, value in (("data", restored.data), ("config", restored.config)):
      if _json_hash(value) != meta.get("json_sha256", {}).get(name):
        raise CheckpointError(f"checkpoint step {step}: item {name} fails its checksum "
                              "(file corrupted or altered)")
    actual = checksums(restored.state)
    for path, want in meta["checksums"].items():
      if actual.get(path, [None, None])[:2] != want[:2]:
        raise CheckpointError(f"checkpoint step {step}: array {path} fails its checksum "
                              "(file corrupted or altered)")
    return restored.state, restored.data, restored.config

  def restore_latest_good(self, abstract_state, shardings):
    """Newest step that verifies, quarantining the ones that do not; None when there are none."""
    failures = []
    for step in reversed(self.all_steps()):
      try:
        return step, self.restore(step, abstract_state, shardings)
      except CheckpointError as e:
        print(f"warning: {e}; trying an earlier checkpoint", file=sys.stderr)
        failures.append(str(e))
        self._quarantine(step)
    if failures:
      raise CheckpointError(f"no valid checkpoint in {self.directory}: "
                            + capped(failures, 2, "; "))
    return None

  def _quarantine(self, step: int) -> None:
    """Move a corrupt step aside (kept for inspection) so a new save of that step can succeed."""
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.directory), "checkpoints_corrupt")
      os.makedirs(aside, exist_ok=True)
      target = os.path.join(aside, str(step))
      shutil.rmtree(target, ignore_errors=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    self._manager.reload()

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise CheckpointError(f"checkpoint save failed in {self.directory}: {_one_line(e)}") from e

  def close(self) -> None:
    self.wait()
    self._manager.close()


def _one_line(e: Exception) -> str:
  return " ".join(f"{type(e).__name__}: {e}".split())[:1500]


def _json_hash(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _step_meta(manager: "Checkpointer", step: int) -> dict:
  return manager._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def _param_checksums(meta: dict, field: str = "params") -> dict:
  return {p[len(field) + 1:]: v for p, v in meta["checksums"].items()
          if p.startswith(field + "/")}


def saved_steps(directory: str) -> list[int]:
  """The committed checkpoint steps under `directory`, oldest first."""
  manager = Checkpointer(directory, keep=1_000_000)
  try:
    return manager.all_steps()
  finally:
    manager.close()


def saved_param_shapes(directory: str, step: int | None = None) -> dict[str, tuple]:
  """{param path: shape} of checkpoint `step` (default: the newest) under `directory` (no arrays
  read)."""
  manager = Checkpointer(directory, keep=1_000_000)
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f"no checkpoint in {directory}")
  step = steps[-1] if step is None else step
  return {p: tuple(v[2]) for p, v in _param_checksums(_step_meta(manager, step)).items()}


def _only(want: dict, abstract) -> dict:
  """The checksums of the paths in `abstract` (a subtree being restored on its own)."""
  paths = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  return {p: v for p, v in want.items() if p in paths}


def restore_params(directory: str, abstract_params, shardings, *, partial: bool = False,
                   field: str = "params", step: int | None = None):
  """Only the params of checkpoint `step` under `directory` (e.g. to initialise from); without
  `step`, of the newest step that verifies.

  `partial`: `abstract_params` may be a subtree of the saved params; only it is read.
  `field`: another part of the saved train state instead (model_state: BatchNorm statistics).
  """
  manager = Checkpointer(directory, keep=1_000_000)
  for candidate in reversed(manager.all_steps() if step is None else [step]):
    want = _param_checksums(_step_meta(manager, candidate), field)
    if partial:
      want = _only(want, abstract_params)
    check_structure(want, abstract_params, f"checkpoint step {candidate} in {directory}")
    item = {field: _target(abstract_params, shardings)}
    restored = manager._manager.restore(candidate, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item, partial_restore=True,
                                     restore_args=ocp.checkpoint_utils.construct_restore_args(item))))
    params = restored.state[field]
    got = checksums(params)
    if all(got.get(p, [None])[:2] == v[:2] for p, v in want.items()):
      return params
    if step is not None:
      raise CheckpointError(f"checkpoint step {step} in {directory} fails its checksums")
    print(f"warning: checkpoint step {candidate} in {directory} fails its checksums; trying an "
          "earlier one", file=sys.stderr)
  raise CheckpointError(f"no valid checkpoint in {directory}")


def saved_param_checksums(directory: str, step: int) -> dict[str, list]:
  """{param path: checksum} recorded with checkpoint `step` (no arrays read)."""
  manager = Checkpointer(directory, keep=1_000_000)
  return _param_checksums(_step_meta(manager, step))


def export_params(params, model_config: dict, out_dir: str,
                  extra_files: dict[str, str] | None = None) -> None:
  """Parameters only (no optimizer state): out_dir/{params/, model_config.json, checksums.json}
  plus `extra_files` ({relative path: text}).

  Written to a temporary sibling and renamed, so a failed export leaves nothing half-written.
  """

  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir):
    raise UserError(f"--out={out_dir} already exists; choose a new directory")
  tmp = out_dir + ".tmp-export"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with ocp.StandardCheckpointer() as saver:
    saver.save(os.path.join(tmp, "params"), params)
  with open(os.path.join(tmp, "model_config.json"), "w") as f:
    json.dump(model_config, f, indent=2, sort_keys=True)
  with open(os.path.join(tmp, "checksums.json"), "w") as f:
    json.dump(checksums(params), f)
  for name, text in (extra_files or {}).items():
    os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
    with open(os.path.join(tmp, name), "w") as f:
      f.write(text)
  os.rename(tmp, out_dir)


def _export_checksums(path: str) -> dict:
  if not os.path.exists(os.path.join(path, "model_config.json")):
    raise UserError(f"{path} is not an llmjax export (no model_config.json)")
  with open(os.path.join(path, "checksums.json")) as f:
    return json.load(f)


def exported_shapes(path: str) -> dict[str, tuple]:
  """{param path: shape} of an export (no arrays read)."""
  return {p: tuple(v[2]) for p, v in _export_checksums(os.path.abspath(path)).items()}


def load_exported(path: str, abstract_params=None, shardings=None, *, partial: bool = False):
  """(model_config dict, params) from an export directory, checksums verified.

  `partial`: `abstract_params` may be a subtree of the exported params; only it is read.
  """
  path = os.path.abspath(path)
  want = _export_checksums(path)
  with open(os.path.join(path, "model_config.json")) as f:
    model_config = json.load(f)
  target = None
  if abstract_params is not None:
    if partial:
      want = _only(want, abstract_params)
    check_structure(want, abstract_params, f"export {path}")
    target = abstract_params if shardings is None else _target(abstract_params, shardings)
  if partial:
    with ocp.PyTreeCheckpointer() as loader:
      params = loader.restore(os.path.join(path, "params"), args=ocp.args.PyTreeRestore(
          target, partial_restore=True,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  else:
    with ocp.StandardCheckpointer() as loader:
      params = loader.restore(os.path.join(path, "params"), target)
  got = checksums(params)
  bad = [p for p, v in want.items() if got.get(p, [None, None])[:2] != v[:2]]
  if bad:
    raise CheckpointError(f"export {path}: array {bad[0]} fails its checksum")
  return model_config, params
