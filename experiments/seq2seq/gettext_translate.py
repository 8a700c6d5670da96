"""English -> German translation learned from the gettext catalogs this machine carries.

  llmjax train --config=experiments/seq2seq/gettext_translate.py --workdir=runs/gettext_en_de
  llmjax train --config=experiments/seq2seq/gettext_translate.py --workdir=runs/gettext_en_fr \
      --config.data.target_lang=fr
  llmjax eval --workdir=runs/gettext_en_de --split=test
  llmjax translate --checkpoint=runs/gettext_en_de --text="Open file"

The built-in offline corpus (llmjax/data/gettext_pairs.py, source=gettext): every catalog under
/usr/share/locale/<lang>/LC_MESSAGES, English msgid -> human translation, without format strings,
accelerators and markup, one pair per English message, split by a hash of the source (5% test,
5% validation). The workdir's corpus.json names the catalogs read and the corpus hash (it depends
on the installed packages). A joint 4,000-token BPE vocabulary is trained on the training split.
The model is a pre-LayerNorm encoder-decoder (preset wmt: flax's examples/wmt layout), 3 + 3
blocks of width 256, trained on packed pairs with label smoothing 0.1: 1,200 steps, 19 minutes
wall on 2 CPU cores (measured 2026-12-06). At the end, translation_scores.json holds the test
BLEU and chrF (sacrebleu) of 4-beam decoding next to two baselines scored by the same code:
copying the source, and the training translation of the nearest training source
(llmjax/eval/translation_baselines.py); measured 29.6 / 57.8 against 26.8 / 50.6 and 6.1 / 24.6
(docs/seq2seq.md).
"""

from llmjax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.name = "gettext_translate"
  c.task.name = "seq2seq"
  c.task.label_smoothing = 0.1
  c.task.num_beams = 4
  c.task.length_penalty = 1.0
  c.task.max_new_tokens = 64
  c.task.bleu_examples = 200
  c.model = config_lib.model_section("wmt", vocab_size=4000, d_model=256, n_layers=3,
                                     n_decoder_layers=3, n_heads=4, d_ff=1024, max_len=64,
                                     dropout=0.1)
  c.data.source = "gettext"
  c.data.source_lang = "en"
  c.data.target_lang = "de"
  c.data.tokenizer = "bpe:4000"
  c.data.seq_len = 64
  c.data.val_fraction = 0.05
  c.data.test_fraction = 0.05
  c.train.steps = 1200
  c.train.batch_size = 32
  c.train.log_every = 50
  c.train.eval_every = 400
  c.train.eval_batches = 10
  c.train.checkpoint_every = 400
  c.train.sample_prompts = 0
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.optim.b2 = 0.98
  c.optim.weight_decay = 0.01
  return config_lib.finalize(c, arg)
