"""Which standard-library package a snippet of Python comes from: fine-tuning the MLM encoder.

  llmjax train --config=experiments/text/stdlib_classify.py --workdir=runs/stdlib_classify \
      --config.train.init_from=workdir:runs/stdlib_bert_mlm
  llmjax train --config=experiments/text/stdlib_classify.py:scratch --workdir=runs/classify_scratch \
      --config.data.tokenizer=hf:runs/stdlib_bert_mlm        # same encoder, random init
  llmjax eval --workdir=runs/stdlib_classify --split=test

The built-in offline dataset (llmjax/data/labelled.py, source=stdlib): snippets of the stdlib's
own source labelled by their top-level package, the 8 most common, split by file. The encoder
is experiments/text/stdlib_bert_mlm.py's; `pooler/` and `classifier/` start fresh
(`train.init_new`), everything else comes from the MLM run. `:scratch` trains the same model from
random init (give it the MLM run's vocabulary so the two differ only in their start).
"""

from llmjax import config as config_lib


def get_config(arg=None):
  args = set((arg or "").split(",")) - {""}
  c = config_lib.experiment_module("stdlib_bert_mlm.py", __file__).base()
  c.name = "stdlib_classify"
  c.task.name = "classify"
  c.data.stdlib_classes = 8
  c.train.init_new = "" if "scratch" in args else "(pooler|classifier)/.*"
  c.train.steps = 300
  c.train.batch_size = 32
  c.train.log_every = 25
  c.train.eval_every = 100
  c.train.eval_batches = 50
  c.train.checkpoint_every = 100
  c.train.sample_prompts = 0
  c.optim.lr = 1e-4 if "scratch" not in args else 5e-4
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 0.01
  return config_lib.finalize(c, ",".join(sorted(args - {"scratch"})) or None)
