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


# --- Marian (MarianMTModel): random encoder-decoders and right-padded pairs --------------------

MARIAN_PAD = VOCAB - 1  # Marian's convention: the last id pads and starts the decoder


def marian_config(**overrides):
  """A tiny MarianConfig (4 heads of 8, ids inside VOCAB); `overrides` are MarianConfig fields."""
  import transformers as T
  fields = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                decoder_ffn_dim=64, max_position_embeddings=MAX_LEN, init_std=0.2,
                pad_token_id=MARIAN_PAD, decoder_start_token_id=MARIAN_PAD, eos_token_id=0,
                bos_token_id=None, forced_eos_token_id=None)
  return T.MarianConfig(**{**fields, **overrides})


def make_marian(directory, seed: int, **overrides):
  """A random MarianMTModel saved to `directory` (or not, if None); -> torch model (eval).

  Every parameter is random, biases, norms and the final_logits_bias buffer too (transformers
  starts those at 0 or 1, which would hide a mis-mapped one). With tie_word_embeddings=false
  transformers v5 keeps the encoder's and decoder's embeddings as parameters of their own; they
  are set equal to the shared table, as in a real Marian checkpoint."""
  import torch
  import transformers as T
  torch.manual_seed(seed)
  model = T.MarianMTModel(marian_config(**overrides)).eval()
  return _randomised(model, directory)


def _randomised(model, directory, eos: int | None = None, eos_bias: float = 0.0):
  """`model` (a transformers Marian or BART) with every parameter and its final_logits_bias
  random (norm scales around 1; Marian's fixed sinusoids untouched), the stacks' embeddings of
  an untied model equal to the shared table, EOS's logits bias raised by `eos_bias`; saved to
  `directory` unless None."""
  import torch
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "embed_positions" in name and type(model).__name__ == "MarianMTModel":
        continue  # fixed sinusoids, never saved
      norm_scale = name.endswith(("layer_norm.weight", "layernorm_embedding.weight"))
      p.normal_(1.0 if norm_scale else 0.0, 0.2)
    model.final_logits_bias.normal_(0.0, 0.5)
    if eos is not None:
      model.final_logits_bias[0, eos] += eos_bias
    shared = model.model.shared.weight
    for stack in (model.model.encoder, model.model.decoder):
      if stack.embed_tokens.weight is not shared:
        stack.embed_tokens.weight.copy_(shared)
  if directory is not None:
    model.save_pretrained(str(directory))
  return model


def seq2seq_batch(seed: int = 0, source_length: int = 10, target_length: int = 8):
  """(source, source_mask, target, target_mask) [4, *] int64, right-padded differently per row
  and differently in source and target."""
  rng = np.random.default_rng(seed)
  source = rng.integers(0, VOCAB, (4, source_length)).astype(np.int64)
  target = rng.integers(0, VOCAB, (4, target_length)).astype(np.int64)
  source_mask = np.ones_like(source)
  target_mask = np.ones_like(target)
  for row, (s, t) in enumerate([(0, 2), (3, 0), (source_length // 2, 1), (1, target_length - 2)]):
    source_mask[row, source_length - s:] = 0
    target_mask[row, target_length - t:] = 0
  return source, source_mask, target, target_mask


def torch_seq2seq_logits(model, source, source_mask, target, target_mask) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(input_ids=torch.tensor(source), attention_mask=torch.tensor(source_mask),
                 decoder_input_ids=torch.tensor(target),
                 decoder_attention_mask=torch.tensor(target_mask)).logits.numpy()


# --- BART (BartForConditionalGeneration) --------------------------------------------------------

BART_PAD, BART_EOS = 1, 2  # BART's ids: <pad>=1, </s>=2 (which also starts the decoder)


def bart_config(**overrides):
  """A tiny BartConfig (4 heads of 8, BART's special ids) that makes transformers' generate
  apply no logits processor llmjax lacks (no forced BOS/EOS, no n-gram blocking)."""
  import transformers as T
  fields = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                decoder_ffn_dim=64, max_position_embeddings=MAX_LEN, init_std=0.2,
                pad_token_id=BART_PAD, eos_token_id=BART_EOS, decoder_start_token_id=BART_EOS,
                bos_token_id=0, forced_eos_token_id=None, forced_bos_token_id=None,
                no_repeat_ngram_size=0)
  return T.BartConfig(**{**fields, **overrides})


def make_bart(directory, seed: int, eos_bias: float = 0.0, **overrides):
  """A random BartForConditionalGeneration saved to `directory` (or not, if None); -> torch
  model (eval). Every parameter and the final_logits_bias buffer are random, as in make_marian
  (stack embeddings of an untied model equal to the shared table); `eos_bias` is added to EOS's
  logits bias so that generated rows end."""
  import torch
  import transformers as T
  torch.manual_seed(seed)
  model = T.BartForConditionalGeneration(bart_config(**overrides)).eval()
  return _randomised(model, directory, BART_EOS, eos_bias)
