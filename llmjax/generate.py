"""Text generation from a decoder with a KV cache (a Transformer) or a recurrent state (an
`RNNLM`), inside one compiled loop; `translate` for encoder-decoders (greedy or beam search).

Both decoders keep what the next token needs in their "cache" collection and take the same call
keywords, so one loop serves both. The prompt runs once (prefill) and fills the cache; then a `lax.while_loop` feeds one token per
step until every row has produced an EOS or the token budget is spent. Greedy, temperature,
top-k and top-p sampling; the RNG is explicit (step i uses `fold_in(rng, i)`, so a key gives the
same tokens every time). Batches of different-length prompts are left-padded: every row's last
prompt token sits in the last column, and positions count real tokens only (Hugging Face's
`position_ids = cumsum(attention_mask) - 1`), so padded and unpadded rows decode identically.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from llmjax import beam_search
from llmjax.errors import UserError
from llmjax.models import encoder_decoder
from llmjax.models.rnn import RNNLM
from llmjax.models.transformer import Transformer, init_cache


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen: temperature 0 is greedy; top_k 0 and top_p 1 switch off."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def validate(self, vocab_size: int) -> None:
    if self.temperature < 0:
      raise UserError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
    if not 0 <= self.top_k <= vocab_size:
      raise UserError(f"top_k must be in [0, vocab size {vocab_size}], got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> (tokens [B, P], mask [B, P]) right-aligned, as `generate` expects."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UserError("every prompt needs at least one token")
  width = max(len(p) for p in prompts)
  tokens_BP = np.full((len(prompts), width), pad_id, np.int32)
  mask_BP = np.zeros((len(prompts), width), np.int32)
  for row, prompt in enumerate(prompts):
    tokens_BP[row, width - len(prompt):] = prompt
    mask_BP[row, width - len(prompt):] = 1
  return tokens_BP, mask_BP


def filter_logits(logits_BV: jax.Array, sampling: Sampling) -> jax.Array:
  """Temperature, then top-k, then top-p (the order transformers applies them)."""
  logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
  if sampling.top_k:
    kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if sampling.top_p < 1:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass strictly above each token
    keep_BV = before_BV < sampling.top_p  # always keeps the most likely token
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return logits_BV


def next_token(logits_BV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """[B, V] logits -> [B] token ids."""
  if sampling.temperature == 0:
    # top_k(., 1) takes the first maximum like argmax, and XLA:CPU runs it 3-4x faster.
    return jax.lax.top_k(logits_BV, 1)[1][:, 0].astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits_BV, sampling)).astype(jnp.int32)


def generate(model, params, prompt_BP, rng: jax.Array | None = None, *, prompt_mask_BP=None,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_ids: Sequence[int] = (), pad_id: int = 0,
             on_token: Callable[[int, np.ndarray], None] | None = None) -> jax.Array:
  """Left-padded prompts [B, P] -> new tokens [B, max_new_tokens]; `pad_id` after a row's EOS.

  `on_token(step, tokens_B)` (optional) is called on the host as each step's tokens are chosen,
  from inside the compiled loop, for streaming.
  """
  if not causal_decoder(model):
    raise UserError(f"generation needs a causal decoder (a Transformer or an RNNLM), got "
                    f"{type(model).__name__}" + ("" if not hasattr(model, "cfg") or
                                                 model.cfg.causal else " (bidirectional)"))
  cfg = model.cfg
  prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
  batch, prompt_len = prompt_BP.shape
  sampling = Sampling(float(temperature), int(top_k), float(top_p))
  sampling.validate(cfg.vocab_size)
  if max_new_tokens < 1 or prompt_len < 1:
    raise UserError(f"need a prompt and max_new_tokens >= 1, got prompt length {prompt_len} and "
                    f"max_new_tokens={max_new_tokens}")
  if cfg.pos_emb == "learned" and prompt_len + max_new_tokens - 1 > cfg.max_len:
    raise UserError(f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds the "
                    f"model's {cfg.max_len} learned positions by "
                    f"{prompt_len + max_new_tokens - 1 - cfg.max_len}")
  if sampling.temperature > 0 and rng is None:
    raise UserError("sampling (temperature > 0) needs an explicit rng key")
  mask_BP = (jnp.ones_like(prompt_BP) if prompt_mask_BP is None
             else jnp.asarray(prompt_mask_BP, jnp.int32))
  rng = jax.random.PRNGKey(0) if rng is None else rng
  eos_E = jnp.asarray([int(e) for e in eos_ids] or [-1], jnp.int32)  # -1: never produced
  return _generate(model, params, prompt_BP, mask_BP, rng, eos_E, max_new_tokens=max_new_tokens,
                   sampling=sampling, pad_id=int(pad_id), on_token=on_token)


def causal_decoder(model) -> bool:
  """Whether `generate` can run `model`: a causal Transformer, or a recurrent LM (never
  bidirectional: config checks refuse that for the lm task)."""
  if isinstance(model, RNNLM):
    return not model.cfg.bidirectional
  return isinstance(model, Transformer) and model.cfg.causal


def cached_forward(model, params, tokens_BL, positions_BL, segment_ids_BL, cache,
                   prefill=False):
  """One decoding forward through the KV cache: (last position's logits [B, V], new cache).

  `prefill=True` writes a whole prompt; otherwise `tokens_BL` is the next token of each row.
  """
  logits_B1V, variables = model.apply(
      {"params": params, "cache": cache}, tokens_BL, positions_BL=positions_BL,
      segment_ids_BL=segment_ids_BL, decode=True, last_only=True, prefill=prefill,
      mutable=["cache"])
  return logits_B1V[:, -1], variables["cache"]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "pad_id",
                                             "on_token"))
def _generate(model, params, prompt_BP, mask_BP, rng, eos_E, *, max_new_tokens, sampling, pad_id,
              on_token):
  batch, prompt_len = prompt_BP.shape

  forward = functools.partial(cached_forward, model, params)

  def choose(step, logits_BV, done_B):
    token_B, done_B = _next_or_pad(logits_BV, jax.random.fold_in(rng, step), sampling, done_B,
                                   eos_E, pad_id)
    if on_token is not None:
      io_callback(lambda s, t: on_token(int(s), np.asarray(t)), None, step, token_B, ordered=True)
    return token_B, done_B

  # Padding keeps position 0 (its own segment, never seen by real tokens).
  positions_BP = jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0)
  cache = init_cache(model, batch, prompt_len + max_new_tokens)
  logits_BV, cache = forward(prompt_BP, positions_BP, mask_BP, cache, prefill=True)
  token_B, done_B = choose(0, logits_BV, jnp.zeros((batch,), bool))
  out_BN = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token_B)

  def cond(carry):
    step, _, done_B, *_ = carry
    return (step < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    step, token_B, done_B, out_BN, cache, position_B = carry
    logits_BV, cache = forward(token_B[:, None], position_B[:, None],
                               jnp.ones_like(token_B)[:, None], cache)
    token_B, done_B = choose(step, logits_BV, done_B)
    return step + 1, token_B, done_B, out_BN.at[:, step].set(token_B), cache, position_B + 1

  carry = (jnp.int32(1), token_B, done_B, out_BN, cache, positions_BP[:, -1] + 1)
  return jax.lax.while_loop(cond, body, carry)[3]


def _next_or_pad(logits_BV, key, sampling: Sampling, done_B, eos_E, pad_id: int):
  """(next tokens [B], rows done after them): `pad_id` for rows already done; a row is done
  once it has produced an EOS."""
  token_B = jnp.where(done_B, pad_id, next_token(logits_BV, key, sampling))
  return token_B, done_B | jnp.isin(token_B, eos_E)


def sample(model, params, prompt_BP: jax.Array, rng: jax.Array, *, n_new: int,
           temperature: float = 1.0) -> jax.Array:
  """[B, P] prompt tokens -> [B, n_new] sampled tokens (greedy when temperature == 0)."""
  return generate(model, params, prompt_BP, rng, max_new_tokens=n_new, temperature=temperature)


def stream(model, params, tokenizer, prompt: str, rng: jax.Array, *,
           write: Callable[[str], None], echo: bool = True, **kwargs) -> str:
  """Continue `prompt`, handing each new piece of text to `write` as its token is chosen.

  With `echo` the prompt is written first, once the first token is ready.

  `tokenizer` has `encode(text)` and `decode(ids)`; kwargs go to `generate`. Text is decoded
  from all tokens so far (a character may span tokens) and a trailing replacement character is
  held back until the bytes that complete it arrive.
  """
  ids = list(tokenizer.encode(prompt))
  if not ids:
    raise UserError("the prompt encodes to no tokens")
  new: list[int] = []
  shown = [0]
  eos = set(kwargs.get("eos_ids", ()))

  def on_token(step: int, tokens_B: np.ndarray) -> None:
    if echo and not new:
      write(prompt)
    if new and new[-1] in eos:  # after EOS the row only pads
      return
    new.append(int(tokens_B[0]))
    if new[-1] in eos:
      return
    text = tokenizer.decode(new).rstrip("\ufffd")
    write(text[shown[0]:])
    shown[0] = max(shown[0], len(text))

  generate(model, params, np.asarray([ids], np.int32), rng, on_token=on_token,
           **kwargs).block_until_ready()
  return tokenizer.decode([t for t in new if t not in eos])


def translate(model, params, source_BS, *, source_mask_BS=None, max_new_tokens: int,
              num_beams: int = 1, length_penalty: float = 1.0,
              early_stopping: bool | str = False, eos_ids: Sequence[int] = (),
              decoder_start_id: int, pad_id: int = 0) -> jax.Array:
  """Source tokens [B, S] (right-padded; `source_mask_BS` 1 real, 0 pad) -> generated target
  tokens [B, max_new_tokens], `pad_id` after each row's EOS.

  The encoder runs once; its keys and values for every decoder layer are cached by the first
  decoder step. `num_beams` 1 is greedy; more is beam search with transformers' semantics
  (`length_penalty`, `early_stopping` True, False or "never"; llmjax.beam_search).
  """
  if not isinstance(model, encoder_decoder.EncoderDecoder):
    raise UserError(f"translate needs an encoder-decoder, got {type(model).__name__}")
  cfg = model.cfg
  source_BS = jnp.asarray(source_BS, jnp.int32)
  if source_BS.ndim != 2 or source_BS.shape[1] < 1:
    raise UserError(f"source must be token ids [batch, length >= 1], got shape {source_BS.shape}")
  if int(num_beams) < 1:
    raise UserError(f"num_beams must be >= 1 (1 is greedy), got {num_beams}")
  if int(max_new_tokens) < 1:
    raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if early_stopping not in (True, False, "never"):
    raise UserError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
  if cfg.pos_emb in ("learned", "sinusoidal"):
    for what, length in (("source", source_BS.shape[1]), ("max_new_tokens", max_new_tokens)):
      if length > cfg.max_len:
        raise UserError(f"{what} length {length} exceeds the model's {cfg.max_len} positions "
                        "(config.model.max_len)")
  for what, token in (("decoder_start_id", decoder_start_id), ("pad_id", pad_id),
                      *(("eos_ids", e) for e in eos_ids)):
    if not 0 <= int(token) < cfg.vocab_size:
      raise UserError(f"{what}={token} is outside the vocabulary [0, {cfg.vocab_size})")
  mask_BS = (jnp.ones_like(source_BS) if source_mask_BS is None
             else jnp.asarray(source_mask_BS, jnp.int32))
  eos_E = jnp.asarray([int(e) for e in eos_ids], jnp.int32).reshape(-1)
  return _translate(model, params, source_BS, mask_BS, eos_E, max_new_tokens=int(max_new_tokens),
                    num_beams=int(num_beams), length_penalty=float(length_penalty),
                    early_stopping=early_stopping, decoder_start_id=int(decoder_start_id),
                    pad_id=int(pad_id))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "num_beams",
                                             "length_penalty", "early_stopping",
                                             "decoder_start_id", "pad_id"))
def _translate(model, params, source_BS, mask_BS, eos_E, *, max_new_tokens, num_beams,
               length_penalty, early_stopping, decoder_start_id, pad_id):
  memory_BSD = model.apply({"params": params}, source_BS, source_segment_ids_BS=mask_BS,
                           method=model.encode)
  # Each row's beams are rows of their own: R = B * K decoder rows, beam k of row b at b * K + k.
  memory_RSD, mask_RS = (jnp.repeat(x, num_beams, axis=0) for x in (memory_BSD, mask_BS))
  rows = memory_RSD.shape[0]

  def step(tokens_R, cache, memory=None):
    logits_R1V, variables = model.apply(
        {"params": params, "cache": cache}, tokens_R[:, None], memory, mask_RS, decode=True,
        method=model.decode, mutable=["cache"])
    return logits_R1V[:, -1], variables["cache"]

  cache = encoder_decoder.init_cache(model, rows, source_BS.shape[1], max_new_tokens)
  start_R = jnp.full((rows,), decoder_start_id, jnp.int32)
  logits_RV, cache = step(start_R, cache, memory_RSD)
  if num_beams == 1:
    return _greedy(logits_RV, cache, step, eos_E, max_new_tokens, pad_id)
  return beam_search.beam_search(
      logits_RV, cache, step, functools.partial(_reorder, scanned=model.cfg.scan_layers),
      num_beams=num_beams, max_new_tokens=max_new_tokens, eos_E=eos_E, pad_id=pad_id,
      length_penalty=length_penalty, early_stopping=early_stopping)


def _greedy(logits_BV, cache, step, eos_E, max_new_tokens: int, pad_id: int) -> jax.Array:
  """The most likely token each step; `pad_id` once a row has produced an EOS."""
  batch = logits_BV.shape[0]
  greedy = Sampling()

  def body(carry):
    t, logits_BV, cache, done_B, out_BN = carry
    token_B, done_B = _next_or_pad(logits_BV, None, greedy, done_B, eos_E, pad_id)
    out_BN = out_BN.at[:, t].set(token_B)
    go = (t + 1 < max_new_tokens) & ~jnp.all(done_B)
    logits_BV, cache = jax.lax.cond(go, lambda c: step(token_B, c),
                                    lambda c: (logits_BV, c), cache)
    return t + 1, logits_BV, cache, done_B, out_BN

  def cond(carry):
    t, _, _, done_B, _ = carry
    return (t < max_new_tokens) & ~jnp.all(done_B)

  out_BN = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  carry = (jnp.int32(0), logits_BV, cache, jnp.zeros((batch,), bool), out_BN)
  return jax.lax.while_loop(cond, body, carry)[4]


def _reorder(cache, rows_R, scanned: bool):
  """Decoder rows continue rows `rows_R` of the step before: gather the self-attention cache.
  Cross-attention keys/values are the same for every beam of a row: left alone."""
  def gather(path, leaf):
    names = [getattr(k, "key", None) for k in path]
    if leaf.ndim == 0 or names[-1] in ("cross_k", "cross_v"):
      return leaf
    return jnp.take(leaf, rows_R, axis=1 if scanned and "layers" in names else 0)
  return jax.tree_util.tree_map_with_path(gather, cache)
