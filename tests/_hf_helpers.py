"""Tiny random Hugging Face models (built with transformers + torch, saved as safetensors) and
the torch references the hf/generate tests compare against. No network anywhere."""

from __future__ import annotations

import string

import numpy as np

VOCAB, MAX_LEN = 100, 64
CHARS = string.ascii_lowercase + " .,"
CHAR_VOCAB = 3 + len(CHARS)


def configs() -> dict:
  """name -> (transformers config, model class name); init scaled up so logits are O(1)."""
  import transformers as T
  common = dict(vocab_size=VOCAB, initializer_range=0.2, bos_token_id=None, eos_token_id=None,
                pad_token_id=None)
  llama = dict(common, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=MAX_LEN, rms_norm_eps=1e-6)
  bert = dict(common, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=MAX_LEN, pad_token_id=0)
  return {
      "gpt2": (T.GPT2Config(**common, n_positions=MAX_LEN, n_embd=32, n_layer=2, n_head=4),
               "GPT2LMHeadModel"),
      # Vocabulary and special ids of save_char_tokenizer, for the CLI tests.
      "gpt2_chars": (T.GPT2Config(**dict(common, vocab_size=CHAR_VOCAB, eos_token_id=1,
                                         pad_token_id=0), n_positions=MAX_LEN, n_embd=32,
                                  n_layer=2, n_head=4), "GPT2LMHeadModel"),
      "llama_gqa_untied": (T.LlamaConfig(**llama, num_key_value_heads=2, rope_theta=500.0),
                           "LlamaForCausalLM"),
      "llama_mha_tied": (T.LlamaConfig(**llama, num_key_value_heads=4, tie_word_embeddings=True),
                         "LlamaForCausalLM"),
      "bert": (T.BertConfig(**bert), "BertModel"),
      "bert_mlm": (T.BertConfig(**bert), "BertForMaskedLM"),
      "bert_cls": (T.BertConfig(**bert, num_labels=3), "BertForSequenceClassification"),
  }


def make(name: str, directory, **save_kwargs):
  """Build the named random model, save it as safetensors to `directory`; -> torch model (eval)."""
  import torch
  import transformers as T
  config, cls = configs()[name]
  torch.manual_seed(sum(map(ord, name)))
  model = getattr(T, cls)(config).eval()
  model.save_pretrained(str(directory), **save_kwargs)
  return model


def padded_batch(seed: int = 0, length: int = 12):
  """Random tokens [4, length] and a mask (1 real, 0 pad): full, right-, left-, right-padded."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, VOCAB, (4, length)).astype(np.int64)
  mask = np.ones((4, length), np.int64)
  mask[1, length - 3:] = 0
  mask[2, : length // 2] = 0
  mask[3, length // 3:] = 0
  return tokens, mask


def hf_positions(mask):
  """transformers' generate position_ids for a padding mask: real tokens count from 0."""
  return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def torch_out(model, tokens, mask, **kwargs):
  import torch
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 **{k: torch.tensor(v) for k, v in kwargs.items()})


def save_char_tokenizer(directory) -> None:
  """A character-level fast tokenizer ([PAD]=0, [EOS]=1) saved the way transformers saves one."""
  import transformers as T
  from tokenizers import Tokenizer, decoders, models
  vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
  tok.decoder = decoders.Fuse()
  T.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]", pad_token="[PAD]",
                            unk_token="[UNK]").save_pretrained(str(directory))
