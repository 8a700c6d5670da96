"""Classifying stdlib snippets by package with each fine-tuning method on the MLM encoder.

  llmjax train --config=experiments/finetune/stdlib_classify.py:lora \
      --workdir=runs/ft_cls_lora --config.train.init_from=workdir:runs/stdlib_bert_mlm
  llmjax eval --workdir=runs/ft_cls_lora --split=test
  (any of full, freeze, bitfit, lora, adalora, adapter, prompt, prefix; lora when none is
  named; add ,smoke to try it: `:smoke` alone is `:lora,smoke`)

The task, data and encoder of experiments/text/stdlib_classify.py (8 packages, split by file;
`pooler/` and `classifier/` new and always trained), with rows of 112 tokens so a 16-vector
prompt or prefix fits the encoder's 128 positions and every method sees the same rows. The
method's settings: experiments/finetune/methods.py; full fine-tuning keeps that experiment's
learning rate of 1e-4.
"""

from llmjax import config as config_lib


def get_config(arg=None):
  m = config_lib.experiment_module("methods.py", __file__)
  method, rest = m.split_arg(arg)
  c = config_lib.experiment_module("../text/stdlib_classify.py", __file__).get_config(None)
  c.unlock()
  c.name = f"stdlib_classify_{method}"
  c.data.seq_len = 112
  c.train.init_from = "workdir:runs/stdlib_bert_mlm"
  c.train.steps = 200
  c.train.eval_every = 100
  m.apply(c, method)
  if method == "full":
    c.optim.lr = 1e-4
  return m.finalize(c, rest)
