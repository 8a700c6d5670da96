"""BERT's second pretraining objective in the mlm task: segment pairs for next-sentence and
sentence-order prediction, and the options a model cannot take. The tiny NSP run (its reported
pair accuracy, its export loading in transformers as BertForPreTraining with both heads' logits
equal to 1e-4) is shared with early stopping: tests/test_early_stop.py."""

import numpy as np
import pytest

from llmjax import config as config_lib
from llmjax.errors import ConfigError
from llmjax.tasks import encoding

SPECIALS = {"pad": 0, "cls": 1, "sep": 2, "mask": 3}


def _docs():
  """Three documents whose token ids say where they come from: doc d, position p -> 100 d + p."""
  return [np.arange(100 * d + 10, 100 * d + 10 + n) for d, n in ((0, 40), (1, 33), (2, 24))]


def _split(row_tokens, row_types):
  """(A, B) of one [CLS] A [SEP] B [SEP] row, checking its frame and token types."""
  real = row_tokens[row_tokens != 0]
  assert real[0] == 1 and real[-1] == 2
  first_sep = int(np.flatnonzero(real == 2)[0])
  types = row_types[:real.size]
  assert not types[:first_sep + 1].any() and types[first_sep + 1:].all()
  assert not row_types[real.size:].any()
  return real[1:first_sep], real[first_sep + 1:-1]


def test_pairs_are_consecutive_or_random_for_nsp_and_in_or_out_of_order_for_sop():
  nsp = encoding.pair_rows(_docs(), 16, SPECIALS, "nsp", seed=0)
  half = (16 - 3) // 2
  assert nsp["tokens"].shape == nsp["token_types"].shape == (len(nsp["pair_label"]), 16)
  assert 0 < nsp["pair_label"].sum() < len(nsp["pair_label"])  # both labels occur
  np.testing.assert_array_equal(nsp["segment_ids"], (nsp["tokens"] != 0).astype(np.int32))
  for tokens, types, label in zip(nsp["tokens"], nsp["token_types"], nsp["pair_label"]):
    a, b = _split(tokens, types)
    assert a.size == half and np.all(np.diff(a) == 1)  # a whole segment of one document
    if label == 0:  # B is the segment right after A
      assert b[0] == a[-1] + 1
    else:  # B is a segment of another document
      assert b[0] // 100 != a[0] // 100
  sop = encoding.pair_rows(_docs(), 16, SPECIALS, "sop", seed=0)
  np.testing.assert_array_equal(sop["pair_label"], nsp["pair_label"])  # the same draw
  for tokens, types, label in zip(sop["tokens"], sop["token_types"], sop["pair_label"]):
    a, b = _split(tokens, types)
    assert a[0] // 100 == b[0] // 100  # always one document
    assert (b[0] == a[-1] + 1) if label == 0 else (a[0] == b[-1] + 1)
  # one document (a small validation split): a random B is any segment but the true next one
  one = encoding.pair_rows([np.arange(10, 70)], 16, SPECIALS, "nsp", seed=0)
  assert one["pair_label"].any()
  for tokens, types, label in zip(one["tokens"], one["token_types"], one["pair_label"]):
    a, b = _split(tokens, types)
    assert (b[0] == a[-1] + 1) == (label == 0)


@pytest.mark.parametrize("value, match", [
    ("nsp", r"config.task.pair_objective='nsp' needs token types: config.model.type_vocab_size "
            r"must be >= 2, got 0"),
    ("next", r"config.task.pair_objective.*'next'.*none, nsp, sop")])
def test_a_pair_objective_the_model_cannot_take_is_refused(value, match):
  c = config_lib.base_config()  # gpt2's shape: no token types
  c.task.name, c.task.pair_objective = "mlm", value
  with pytest.raises(ConfigError, match=match):
    config_lib.resolve(c)
