"""Magnitude pruning of the main job's model (experiments/lm/stdlib_gpt.py), then fine-tuning.

  llmjax train --config=experiments/prune/stdlib_gpt.py --workdir=runs/prune_stdlib_gpt \
    --config.train.init_from=workdir:runs/stdlib_gpt
  llmjax train --config=experiments/prune/stdlib_gpt.py:smoke --workdir=/tmp/smoke

Every kernel (attention, MLP) goes from 0 (step 0) to 70% sparsity (step 30) on the cubic
schedule of Zhu & Gupta (2017), re-pruned every 5 steps, and fine-tunes for 40 steps of 16
sequences at a constant learning rate a tenth of the main job's peak (short: the table's runs
share a 2-core host); embeddings, norms and biases stay dense. The other rows of
docs/compression.md's table override config.prune (method=nm, target, end_step=0 for one-shot).
The smoke trains from scratch (no earlier run) and prunes once.
"""

from llmjax import config as config_lib

BASE = config_lib.experiment_module("../lm/stdlib_gpt.py", __file__)


def get_config(arg=None):
  c = BASE.get_config()
  c.unlock()
  c.name = "prune_stdlib_gpt"
  c.train.init_from = "workdir:runs/stdlib_gpt"
  c.train.steps = 40
  c.train.batch_size = 16
  c.train.eval_every = 1000  # the final evaluation only
  c.train.checkpoint_every = 1000
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  c.prune.method = "layer"
  c.prune.initial = 0.0
  c.prune.target = 0.7
  c.prune.start_step = 0
  c.prune.end_step = 30
  c.prune.frequency = 5
  if arg == "smoke":  # nothing to start from, and a run of a step or two: prune once
    c.train.init_from = ""
    c.prune.end_step = 0
  return config_lib.finalize(c, arg)
