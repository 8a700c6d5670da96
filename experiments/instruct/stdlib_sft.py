"""Instruction tuning of the main job's byte-level model (experiments/lm/stdlib_gpt.py) on offline
instructions, with the built-in byte chat template; the loss on the assistant's turns only.

  python -m llmjax.data.instruct --out=runs/instruct_data
  llmjax train --config=experiments/instruct/stdlib_sft.py --workdir=runs/stdlib_sft
  llmjax train --config=experiments/instruct/stdlib_sft.py:base --workdir=runs/stdlib_sft_base
  llmjax train --config=experiments/instruct/stdlib_sft.py:smoke --workdir=/tmp/smoke

The data (llmjax/data/instruct.py): standard-library functions asked for by signature and
docstring, answered with their source, and gettext messages "Translate to German: ..." answered
with the human translation; deterministic disjoint splits (val.jsonl is held out here). The
model keeps the main job's 128 positions, so longer conversations are cut to their first 128
bytes (config.data.too_long; counted in task_info.json). `:base` is the starting point measured
the same way: one step at learning rate 0 (the weights do not move), evaluated with the
template. `:smoke` is a tiny randomly initialised model on the same files (no base run needed).
"""

from llmjax import config as config_lib


def get_config(arg=None):
  c = config_lib.experiment_module("../lm/stdlib_gpt.py", __file__).get_config(None)
  c.unlock()
  c.name = "stdlib_sft"
  c.task.name = "sft"
  c.task.completions = 32
  c.task.max_new_tokens = 64
  c.data.source = "files"
  c.data.files = "runs/instruct_data/train.jsonl"
  c.data.val_files = "runs/instruct_data/val.jsonl"
  c.data.chat_template = "byte"
  c.data.train_on = "assistant"
  c.data.too_long = "cut"
  c.train.init_from = "workdir:runs/stdlib_gpt"
  c.train.steps = 300
  c.train.log_every = 25
  c.train.eval_every = 100
  c.train.eval_batches = 8
  c.train.checkpoint_every = 100
  c.train.sample_prompts = 0
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 0.0  # the base's weights are the prior; don't pull them to zero
  if arg == "base":
    c.train.steps = 1
    c.train.eval_every = 1
    c.optim.lr = 0.0
    c.optim.warmup_steps = 0
    arg = None
  if arg == "smoke":
    c.train.init_from = ""  # the smoke model is smaller than the base run
    c.task.completions = 4
    c.task.max_new_tokens = 16
  return config_lib.finalize(c, arg)
