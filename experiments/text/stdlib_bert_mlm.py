"""BERT-style masked-LM pretraining on the Python standard library's own source.

  llmjax train --config=experiments/text/stdlib_bert_mlm.py --workdir=runs/stdlib_bert_mlm
  llmjax train --config=experiments/text/stdlib_bert_mlm.py:smoke --workdir=/tmp/mlm_smoke

A post-LayerNorm BERT encoder (4 blocks of width 256, 4 heads, learned positions, GELU) over a
4,096-token WordPiece vocabulary trained offline on the training files (kept as
WORKDIR/tokenizer.json). Rows are [CLS] + 126 tokens of one file + [SEP]; 15% of tokens chosen,
80/10/10 [MASK]/random/kept. Sized to pretrain in about 10 minutes on 2 CPU cores; the run
exports with `llmjax export` + `llmjax convert --to=hf:DIR` as BertForMaskedLM, and
experiments/text/stdlib_classify.py fine-tunes it.
"""

from llmjax import config as config_lib


def base(c=None):
  """The encoder and data every stdlib text experiment shares (the classifier derives from it)."""
  c = c or config_lib.base_config()
  c.model = config_lib.model_section("bert", vocab_size=4096, d_model=256, n_layers=4,
                                     n_heads=4, d_ff=1024, max_len=128, dropout=0.1)
  c.data.source = "stdlib"
  c.data.tokenizer = "wordpiece:4096"
  c.data.seq_len = 128
  return c


def get_config(arg=None):
  c = base()
  c.name = "stdlib_bert_mlm"
  c.task.name = "mlm"
  c.train.steps = 600
  c.train.batch_size = 32
  c.train.log_every = 25
  c.train.eval_every = 200
  c.train.eval_batches = 16
  c.train.checkpoint_every = 200
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 60
  c.optim.b2 = 0.98
  c.optim.weight_decay = 0.01
  c.optim.min_lr_ratio = 0.05
  return config_lib.finalize(c, arg)
