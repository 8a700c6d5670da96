"""Byte-level GPT on the Python standard library's own source (the main job, `make train`).

  llmjax train --config=experiments/lm/stdlib_gpt.py --workdir=runs/stdlib_gpt
  llmjax train --config=experiments/lm/stdlib_gpt.py:smoke --workdir=/tmp/smoke

About 3.3M parameters (4 blocks of width 256, GPT-2 shape, tied byte embeddings); 128-byte
sequences keep attention cheap on CPUs. Measured on 2 CPU cores: ~3,750 tokens/s, about 21
minutes for 1200 steps, final validation loss 1.32 nats/byte.
"""

from llmjax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.name = "stdlib_gpt"
  c.model = config_lib.model_section("gpt2", vocab_size=256, d_model=256, n_layers=4, n_heads=4,
                                     d_ff=1024, max_len=128)
  c.data.source = "stdlib"
  c.data.seq_len = 128
  c.train.steps = 1200
  c.train.batch_size = 32
  c.train.log_every = 25
  c.train.eval_every = 200
  c.train.eval_batches = 16
  c.train.checkpoint_every = 400
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 60
  c.optim.min_lr_ratio = 0.05
  return config_lib.finalize(c, arg)
