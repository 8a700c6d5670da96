"""Which standard-library package a snippet of Python comes from, by a bidirectional LSTM: the
recurrent counterpart of experiments/text/stdlib_classify.py:scratch (its data, WordPiece
vocabulary, sequence length, batch and steps; trained from random init like it).

  llmjax train --config=experiments/rnn/stdlib_lstm_classify.py --workdir=runs/lstm_classify
  llmjax eval --workdir=runs/lstm_classify --split=test

Two bidirectional LSTM layers of 288 units per direction over 256-wide WordPiece embeddings,
their outputs averaged over each snippet's real tokens (config.task.pooling auto = mean), then a
dense classifier: 4.29M parameters, near the BERT encoder's 4.3M (docs/rnn_gan.md).
"""

from llmjax import config as config_lib


def get_config(arg=None):
  c = config_lib.experiment_module("../text/stdlib_classify.py", __file__).get_config("scratch")
  c.unlock()
  c.name = "stdlib_lstm_classify"
  c.model = config_lib.model_section("rnn", vocab_size=4096, d_model=256, rnn_cell="lstm",
                                     rnn_layers=2, rnn_hidden=288, bidirectional=True,
                                     max_len=128, dropout=0.1)
  c.optim.lr = 2e-3
  return config_lib.finalize(c, arg)
