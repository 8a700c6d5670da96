"""Fine-tuning the main job's model on held-out code: the standard library's own test suite.

  llmjax train --config=experiments/finetune/stdlib_tests_lm.py:lora \
      --workdir=runs/ft_lm_lora --config.train.init_from=workdir:runs/stdlib_gpt
  (any of full, freeze, bitfit, lora, adalora, adapter, prompt, prefix; lora when none is
  named; add ,smoke to try it: `:smoke` alone is `:lora,smoke`)

The main job (experiments/lm/stdlib_gpt.py) never sees `test/` (llmjax/data/sources.py leaves
it out), so its validation loss on these files is the starting point and each method's final
loss says how much of the gap it closes. Files test_[a-l]*.py of the interpreter running this,
the first 4 MB, in rows of 112 bytes (16 of the model's 128 positions stay free for a prompt or
prefix, so every method sees the same rows); validation is held out from training.
The method's settings and learning rate: experiments/finetune/methods.py.
"""

import pathlib
import sysconfig

from llmjax import config as config_lib


def get_config(arg=None):
  m = config_lib.experiment_module("methods.py", __file__)
  method, rest = m.split_arg(arg)
  c = config_lib.experiment_module("../lm/stdlib_gpt.py", __file__).get_config(None)
  c.unlock()
  c.name = f"stdlib_tests_lm_{method}"
  c.data.source = "files"
  c.data.files = str(pathlib.Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_[a-l]*.py")
  c.data.max_bytes = 4_000_000
  c.data.seq_len = 112  # every method sees the same rows; 16 positions left for a prompt
  c.data.val_fraction = 0.1
  c.train.init_from = "workdir:runs/stdlib_gpt"
  c.train.steps = 150
  c.train.log_every = 25
  c.train.eval_every = 50
  c.train.eval_batches = 16
  c.train.checkpoint_every = 150
  c.train.sample_prompts = 0
  c.optim.warmup_steps = 15
  c.optim.min_lr_ratio = 0.1
  c.optim.weight_decay = 0.0  # the base's weights are the prior; don't pull them to zero
  m.apply(c, method)
  return m.finalize(c, rest)
