"""Byte-level GPT on the Python standard library's own source (the main job).

  llmjax train --config=experiments/lm/stdlib_gpt.py --workdir=runs/stdlib_gpt
  llmjax train --config=experiments/lm/stdlib_gpt.py:smoke --workdir=/tmp/smoke
"""

from llmjax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.name = "stdlib_gpt"
  c.model = config_lib.model_section("gpt2", vocab_size=256, d_model=256, n_layers=6, n_heads=8,
                                     d_ff=1024, max_len=256)
  c.data.source = "stdlib"
  c.data.seq_len = 256
  c.train.steps = 1500
  c.train.batch_size = 32
  c.train.eval_every = 250
  c.train.checkpoint_every = 500
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  return config_lib.finalize(c, arg)
