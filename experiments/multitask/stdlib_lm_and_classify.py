"""Causal LM and stdlib-package classification on one byte-level decoder (multi-task, issue 17).

  llmjax train --config=experiments/multitask/stdlib_lm_and_classify.py --workdir=runs/mt
  llmjax train --config=experiments/multitask/stdlib_lm_and_classify.py:lm_only --workdir=runs/mt_lm
  llmjax train --config=experiments/multitask/stdlib_lm_and_classify.py:classify_only \
      --workdir=runs/mt_classify
  llmjax eval --workdir=runs/mt        # val, and each task's own report
  (add ,smoke to any of them to try it; docs/multitask.md has the comparison)
  ...:from_lm, ...:lm_only,from_lm, ...:classify_only,from_lm   # all three from the main job's
      trained decoder (runs/stdlib_gpt; new heads fresh), at lr 5e-4

The main job's Llama-shaped decoder (experiments/lm/stdlib_gpt.py) is the shared backbone. Two
heads: `lm` (the tied byte embeddings: nothing under heads/lm) and `classify` (the decoder
classifier read at each snippet's last byte: heads/classify/classifier), on the stdlib's own
source (packed LM rows) and on 128-byte snippets labelled by their package (the 8 most common,
split by file, as in experiments/text/stdlib_classify.py). Mixed batches, half the rows each;
each task's mean loss counts 1. 300 steps of 16 rows: the
three runs of the comparison take about 15 minutes together on a 2-core CPU. `lm_only` / `classify_only` train the same decoder on one task
alone (a plain single-task run) for the same number of steps and batch size.
"""

from llmjax import config as config_lib
from llmjax.errors import ConfigError

_ALONE = ("lm_only", "classify_only")


def get_config(arg=None):
  args = set((arg or "").split(",")) - {""}
  alone = args & set(_ALONE)
  if len(alone) > 1:
    raise ConfigError(f"choose at most one of {', '.join(_ALONE)}")
  c = config_lib.experiment_module("../lm/stdlib_gpt.py", __file__).get_config(None)
  c.unlock()
  c.name = "stdlib_lm_and_classify"
  c.data.stdlib_classes = 8
  c.task.pooling = "last"
  c.train.steps = 300  # sized for the comparison on a 2-core CPU (docs/multitask.md)
  c.train.batch_size = 16
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.eval_batches = 16
  c.optim.warmup_steps = 30
  if "from_lm" in args:  # every run starts from the main job's trained decoder
    c.train.init_from = "workdir:runs/stdlib_gpt"
    c.train.init_new = {"lm_only": "", "classify_only": "classifier/.*"}.get(
        next(iter(alone), None), "heads/.*")
    c.optim.lr, c.optim.warmup_steps = 5e-4, 30
  if "lm_only" in alone:
    c.name += "_lm_only"
  elif "classify_only" in alone:
    c.name += "_classify_only"
    c.task.name = "classify"
    c.train.sample_prompts = 0
  else:
    c.tasks.lm = dict(task=dict(name="lm"), weight=1.0, loss_weight=1.0)
    c.tasks.classify = dict(task=dict(name="classify"), weight=1.0, loss_weight=1.0)
  return config_lib.finalize(c, ",".join(sorted(args - alone - {"from_lm"})) or None)
