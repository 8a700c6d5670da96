"""`config.prune`: magnitude pruning's settings and the checks that need no model (the model's
shapes are checked by llmjax/finetune/prune.py before anything is written).

method none (off) | layer (each matched array to `target` sparsity) | global (one threshold
over every matched array together) | nm (N of every M consecutive weights kept: `nm`, e.g.
"2:4"). Sparsity rises from `initial` at `start_step` to `target` at `end_step`, re-pruned every
`frequency` steps on Zhu & Gupta's (2017) cubic schedule; end_step 0 (or start_step) prunes
once, at start_step.
"""

from __future__ import annotations

import dataclasses
import re

from llmjax.errors import ConfigError

METHODS = ("none", "layer", "global", "nm")
# Every kernel of a Dense or conv layer; embeddings, norms, biases and LoRA factors are not.
DEFAULT_PARAMS = r"(.*/)?kernel"


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """Magnitude pruning (llmjax/finetune/prune.py, docs/compression.md)."""
  method: str = dataclasses.field(default="none", metadata={"choices": METHODS})
  target: float = 0.0  # final sparsity in [0, 1) (layer, global)
  initial: float = 0.0  # sparsity at start_step of a gradual schedule, in [0, target]
  nm: str = "2:4"  # method nm: N:M, N kept of every M weights along a kernel's input axis
  start_step: int = 0  # the step whose weights are pruned first (state.step before its update)
  end_step: int = 0  # last pruning step of the gradual schedule; 0: one-shot at start_step
  frequency: int = 100  # steps between re-prunings of the gradual schedule
  params: str = DEFAULT_PARAMS  # regex, full match on a/b/c parameter paths

  @property
  def on(self) -> bool:
    return self.method != "none"

  @property
  def gradual(self) -> bool:
    return self.end_step > self.start_step

  def n_m(self) -> tuple[int, int]:
    """(N, M) of config.prune.nm."""
    n, _, m = self.nm.partition(":")
    return int(n), int(m)


def validate(p: PruneConfig, steps: int) -> None:
  """Refuse a config.prune that cannot run, naming the key and what is allowed."""
  if not p.on:
    return
  _require(0.0 <= p.target < 1.0, f"config.prune.target must be in [0, 1), got {p.target}")
  _require(0.0 <= p.initial <= p.target or p.method == "nm",
           f"config.prune.initial must be in [0, config.prune.target={p.target}], got {p.initial}")
  _require(p.start_step >= 0, f"config.prune.start_step must be >= 0, got {p.start_step}")
  _require(p.start_step < steps, f"config.prune.start_step={p.start_step} must be before the "
           f"end of the run (config.train.steps={steps})")
  _require(p.end_step == 0 or p.start_step <= p.end_step < steps,
           f"config.prune.end_step={p.end_step} must be 0 (one-shot) or in [start_step="
           f"{p.start_step}, config.train.steps={steps})")
  _require(p.frequency > 0, f"config.prune.frequency must be positive, got {p.frequency}")
  try:
    re.compile(p.params)
  except re.error as e:
    raise ConfigError(f"config.prune.params={p.params!r} is not a regex: {e}") from None
  if p.method == "nm":
    _validate_nm(p)


def _validate_nm(p: PruneConfig) -> None:
  """N:M is two positive integers, N < M; it fixes the sparsity and prunes once."""
  n, _, m = p.nm.partition(":")
  _require(n.isdigit() and m.isdigit() and 0 < int(n) < int(m),
           f"config.prune.nm={p.nm!r} must be N:M with 0 < N < M (e.g. '2:4')")
  implied = 1.0 - int(n) / int(m)
  _require(p.target in (0.0, implied), f"config.prune.target={p.target}: N:M={p.nm} sets the "
           f"sparsity to {implied:g}; leave target at 0 (or {implied:g})")
  _require(not p.gradual, f"config.prune.end_step={p.end_step}: N:M pruning is one-shot (at "
           f"start_step={p.start_step}); set end_step to 0")


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)
