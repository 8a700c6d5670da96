"""Byte-level LSTM language model on the Python standard library's own source: the recurrent
counterpart of experiments/lm/stdlib_gpt.py (its data, sequence length, batch, steps, schedule).

  llmjax train --config=experiments/rnn/stdlib_lstm_lm.py --workdir=runs/stdlib_lstm_lm
  llmjax train --config=experiments/rnn/stdlib_lstm_lm.py:smoke --workdir=/tmp/lstm_smoke
  llmjax generate --checkpoint=runs/stdlib_lstm_lm --prompt="def " --max_new_tokens=200

Two LSTM layers of 464 units (flax's OptimizedLSTMCell) over 256-wide byte embeddings, an
untied byte head: 3.24M parameters, near stdlib_gpt's 3.3M, so the two compare at about equal
size (docs/rnn_gan.md). Generation carries the recurrent state instead of a KV cache.
"""

from llmjax import config as config_lib


def get_config(arg=None):
  c = config_lib.experiment_module("../lm/stdlib_gpt.py", __file__).get_config()
  c.unlock()
  c.name = "stdlib_lstm_lm"
  c.model = config_lib.model_section("rnn", vocab_size=256, d_model=256, rnn_cell="lstm",
                                     rnn_layers=2, rnn_hidden=464, max_len=128)
  return config_lib.finalize(c, arg)
