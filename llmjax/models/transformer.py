"""One Transformer for decoders (GPT-2, Llama) and encoders (BERT), shaped entirely by ModelConfig.

`Transformer.apply({"params": p}, tokens_BL, ...)` is a pure function of its parameters. Layers
are optionally stacked with `nn.scan` (one compiled block, a leading `layers` axis on every block
parameter) and optionally rematerialised under a named policy. With `decode=True` the model also
reads and writes a "cache" collection (keys, values, segment ids and the next free slot; see
`init_cache`), so a prompt is run once and each new token costs one position.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from llmjax.config import ModelConfig
from llmjax.models import layers
from llmjax.models import attention
from llmjax.models import moe
from llmjax.models import peft as peftlib
from llmjax.models.apply import HEAD_INPUT
from llmjax.parallel import axes

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_ACT_BLD = (axes.BATCH, axes.LENGTH, axes.ACT_EMBED)


class Block(nn.Module):
  """Attention + MLP with residuals; pre-norm (GPT, Llama) or post-norm (BERT)."""
  cfg: ModelConfig
  deterministic: bool = True
  decode: bool = False
  peft: peftlib.Peft = peftlib.NONE
  index: int | None = None  # the block's place in an unrolled stack (None when scanned)

  @nn.compact
  def __call__(self, x_BLD, mask_B1LS, positions_BL, cache_index, local=None):
    """`local`: a scanned layer's traced sliding-window switch (stack passes it only when the
    layers differ); otherwise the block's own, from config.layer_pattern."""
    cfg, peft = self.cfg, self.peft
    if local is None:
      local = layer_local(cfg, self.index)
    drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
    attn = attention.Attention(cfg, self.decode, peft, self.deterministic, name="attn")
    sparse = layer_sparse(cfg, self.index)
    mlp = (moe.MoeMlp if sparse else layers.Mlp)(cfg, peft, self.deterministic, name="mlp")
    norm1, norm2 = layers.norm(cfg, "norm1"), layers.norm(cfg, "norm2")
    # Gemma 2's sandwich: each sublayer's output normalised before anything else sees it.
    post = {s: layers.norm(cfg, f"post_norm{i}") if cfg.post_norms else (lambda h: h)
            for i, s in ((1, "attn"), (2, "mlp"))}
    # Bottleneck adapters sit on each sublayer's output, before its residual add.
    adapt = {s: (layers.Adapter(cfg, peft.adapter_dim, name=f"adapter_{s}")
                 if peft.adapter_on(s, self.index) else (lambda h: h)) for s in ("attn", "mlp")}
    x_BLD = residual(cfg, x_BLD, lambda h: adapt["attn"](post["attn"](
        attn(h, mask_B1LS, positions_BL, cache_index, local))), norm1, drop)
    x_BLD = residual(cfg, x_BLD, lambda h: adapt["mlp"](post["mlp"](mlp(h))), norm2, drop)
    return nn.with_logical_constraint(x_BLD, _ACT_BLD), None


def layer_local(cfg: ModelConfig, index: int | None) -> bool:
  """Whether block `index` attends within the window (a scanned block, index None, is given
  its switch by `stack` unless every layer is alike)."""
  local_layers = cfg.local_layers()
  return local_layers[0] if index is None else local_layers[index]


def layer_sparse(cfg: ModelConfig, index: int | None) -> bool:
  """Whether block `index`'s MLP is a mixture of experts (a scanned stack is uniform: checked)."""
  if index is None:
    return any(cfg.moe_layers())
  return cfg.moe_layers(index + 1)[index]


def residual(cfg: ModelConfig, x_BLD, sublayer, norm, drop):
  """One residual sublayer: pre-norm x + f(norm(x)) (GPT, Llama) or post-norm norm(x + f(x))
  (BERT, Marian)."""
  if cfg.norm_position == "pre":
    return x_BLD + drop(sublayer(norm(x_BLD)))
  return norm(x_BLD + drop(sublayer(x_BLD)))


def _block_class(block: type[nn.Module], cfg: ModelConfig, decode: bool):
  if cfg.remat == "none" or decode:  # decoding takes no gradients: nothing to rematerialise
    return block
  return nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


def positions_from_segments(segment_ids_BL: jax.Array) -> jax.Array:
  """Position of each token within its segment (restarts at 0 where the segment id changes)."""
  length = segment_ids_BL.shape[1]
  index_BL = jnp.broadcast_to(jnp.arange(length), segment_ids_BL.shape)
  starts_BL = jnp.concatenate(
      [jnp.ones_like(segment_ids_BL[:, :1], bool), segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]],
      axis=1)
  start_index_BL = jax.lax.cummax(jnp.where(starts_BL, index_BL, 0), axis=1)
  return index_BL - start_index_BL


def stack(block: type[nn.Module], n_layers: int, cfg: ModelConfig, peft: peftlib.Peft,
          deterministic: bool, decode: bool, x_BLD, *args):
  """`n_layers` blocks `block(cfg, deterministic, decode, peft, index)(x, *args) -> (x, None)`,
  scanned (one compiled body, params with a leading layers axis) or unrolled.

  A scanned stack whose layers differ in their window (config.layer_pattern) stays one scan: each
  layer's switch is a scanned input, appended to `args` (the block branches on it)."""
  block = _block_class(block, cfg, decode)
  if cfg.scan_layers:
    local_layers = cfg.local_layers(n_layers)
    scanned_args = ()
    if len(set(local_layers)) > 1:
      scanned_args = (jnp.asarray(local_layers),)
    scanned = nn.scan(block, variable_axes={"params": 0, "cache": 0, moe.AUX: 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * len(args) + (0,) * len(scanned_args),
                      length=n_layers, metadata_params={nn.PARTITION_NAME: axes.LAYERS})
    x_BLD, _ = scanned(cfg, deterministic, decode, peft, name="layers")(x_BLD, *args,
                                                                        *scanned_args)
    return x_BLD
  for i in range(n_layers):
    x_BLD, _ = block(cfg, deterministic, decode, peft, i, name=f"layer_{i}")(x_BLD, *args)
  return x_BLD


class Mask(nn.Module):
  """The attention mask, and in decode mode the cache's segment ids and next free slot."""
  decode: bool

  @nn.compact
  def __call__(self, tokens_BL, segment_ids_BL, positions_BL, branch_ids_BL=None):
    """-> (mask [B, 1, L, S] or None, positions [B, L], cache slot of the first token or None)."""
    batch, length = tokens_BL.shape
    if not self.decode:
      if positions_BL is None:
        positions_BL = default_positions(segment_ids_BL, tokens_BL.shape)
      if branch_ids_BL is not None:
        return attention.branch_mask(segment_ids_BL, branch_ids_BL), positions_BL, None
      return attention.segment_mask(segment_ids_BL), positions_BL, None
    # Sized at init by the input length: init_cache passes the whole prompt + generation budget.
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    cached = self.variable("cache", "segment_ids", jnp.zeros, (batch, length), jnp.int32)
    start = index.value
    if segment_ids_BL is None:
      segment_ids_BL = jnp.ones_like(tokens_BL, jnp.int32)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(start + jnp.arange(length), tokens_BL.shape)
    cached.value = jax.lax.dynamic_update_slice(cached.value, segment_ids_BL.astype(jnp.int32),
                                                (0, start))
    index.value = start + length
    return attention.decode_mask(cached.value, segment_ids_BL, start), positions_BL, start


def default_positions(segment_ids_BL, shape) -> jax.Array:
  if segment_ids_BL is not None:
    return positions_from_segments(segment_ids_BL)
  return jnp.broadcast_to(jnp.arange(shape[1]), shape)


def _prompted(prompt_length: int, tokens_BL, segment_ids_BL, positions_BL, decode: bool,
              prefill: bool):
  """Prompt tuning's view of the input: (token slots [B, P + L], segment ids, positions).

  The P prompt vectors take positions 0..P-1 and the tokens move up by P (as PEFT's virtual
  tokens do). Without a cache the prompt joins every segment (its mask is built in
  `prompt_mask`); with one, it is written once, by the prefill call, as segment 1, so every
  real token (segment 1 in generation) sees it and left padding (segment 0) does not.
  """
  batch, length = tokens_BL.shape
  prompt_BP = jnp.broadcast_to(jnp.arange(prompt_length), (batch, prompt_length))
  if positions_BL is None and not decode:
    positions_BL = default_positions(segment_ids_BL, tokens_BL.shape)
  if positions_BL is not None:
    positions_BL = positions_BL + prompt_length
  if decode and not prefill:
    return tokens_BL, segment_ids_BL, positions_BL
  if positions_BL is not None:
    positions_BL = jnp.concatenate([prompt_BP, positions_BL], axis=1)
  slots_BL = jnp.zeros((batch, prompt_length + length), tokens_BL.dtype)
  if decode:
    segments_BL = jnp.ones_like(tokens_BL) if segment_ids_BL is None else segment_ids_BL
    segment_ids_BL = jnp.concatenate([jnp.ones_like(prompt_BP), segments_BL], axis=1)
  return slots_BL, segment_ids_BL, positions_BL


def prompt_mask(mask_B1LL: jax.Array | None, prompt_length: int) -> jax.Array | None:
  """[B, 1, P + L, P + L]: everything sees the prompt; the tokens see each other as before."""
  if mask_B1LL is None:
    return None
  batch, _, length, _ = mask_B1LL.shape
  ones, zeros = (lambda *s: jnp.ones(s, bool)), (lambda *s: jnp.zeros(s, bool))
  top = jnp.concatenate([ones(batch, 1, prompt_length, prompt_length),
                         zeros(batch, 1, prompt_length, length)], axis=-1)
  bottom = jnp.concatenate([ones(batch, 1, length, prompt_length), mask_B1LL], axis=-1)
  return jnp.concatenate([top, bottom], axis=2)


class Transformer(nn.Module):
  """tokens [B, L] -> logits [B, L, V] (or final hidden states [B, L, D] with return_hidden)."""
  cfg: ModelConfig
  peft: peftlib.Peft = peftlib.NONE

  @nn.compact
  def __call__(self, tokens_BL, *, segment_ids_BL=None, positions_BL=None, token_types_BL=None,
               deterministic: bool = True, return_hidden: bool = False, decode: bool = False,
               last_only: bool = False, prefill: bool = False, branch_ids_BL=None):
    """`decode`: use and update the "cache" collection; `last_only`: logits [B, 1, V] of the
    last position (what generation needs from a prompt); `prefill`: this decode call is the
    first of a generation (prompt tuning writes its vectors into the cache then);
    `branch_ids_BL` (with segment ids and positions; not with decode): a token of branch b > 0
    sees its segment's branch 0 and b only (attention.branch_mask)."""
    assert branch_ids_BL is None or not decode, "branch ids are for training and scoring"
    cfg, prompt_length = self.cfg, self.peft.prompt_length
    param_dtype, dtype = layers.dtype_of(cfg.param_dtype), layers.dtype_of(cfg.dtype)
    embed = functools.partial(nn.Embed, features=cfg.d_model, dtype=dtype, param_dtype=param_dtype)
    prompted = prompt_length and (prefill or not decode)
    slots_BL, segments_BL, positions_BL = (
        _prompted(prompt_length, tokens_BL, segment_ids_BL, positions_BL, decode, prefill)
        if prompt_length else (tokens_BL, segment_ids_BL, positions_BL))
    mask_B1LS, positions_BL, cache_index = Mask(decode, name="mask")(
        slots_BL, segments_BL, positions_BL, branch_ids_BL)
    if prompted and not decode:
      mask_B1LS = prompt_mask(mask_B1LS, prompt_length)

    token_embed = embed(cfg.vocab_size, name="embed", embedding_init=layers.init_normal(
        cfg.init_std, (axes.VOCAB, axes.EMBED)))
    x_BLD = token_embed(tokens_BL)
    if prompted:
      prompt_PD = self.param("prompt", layers.init_normal(cfg.init_std, (None, axes.EMBED)),
                             (prompt_length, cfg.d_model), param_dtype)
      prompt_BPD = jnp.broadcast_to(prompt_PD.astype(x_BLD.dtype)[None],
                                    (x_BLD.shape[0],) + prompt_PD.shape)
      x_BLD = jnp.concatenate([prompt_BPD, x_BLD], axis=1)
      if token_types_BL is not None:
        token_types_BL = jnp.pad(token_types_BL, ((0, 0), (prompt_length, 0)))
    if cfg.embed_scale:  # sqrt(d) rounded to float32, then to the compute dtype (as in HF Gemma)
      x_BLD *= jnp.asarray(jnp.float32(cfg.d_model ** 0.5), x_BLD.dtype)
    x_BLD += position_embedding(cfg, positions_BL, x_BLD.dtype)
    if cfg.type_vocab_size:
      types_BL = jnp.zeros(x_BLD.shape[:2], jnp.int32) if token_types_BL is None else \
          token_types_BL
      x_BLD += embed(cfg.type_vocab_size, name="type_embed", embedding_init=layers.init_normal(
          cfg.init_std, (axes.TYPES, axes.EMBED)))(types_BL)
    if cfg.embed_norm:
      x_BLD = layers.norm(cfg, "embed_norm")(x_BLD)
    x_BLD = nn.Dropout(cfg.dropout, deterministic=deterministic)(x_BLD)
    x_BLD = nn.with_logical_constraint(x_BLD, _ACT_BLD)

    with _branched(branch_ids_BL is not None):
      x_BLD = stack(Block, cfg.n_layers, cfg, self.peft, deterministic, decode, x_BLD, mask_B1LS,
                    positions_BL, cache_index)
    if prompted:  # the prompt's outputs are nobody's: callers see one output per token
      x_BLD = x_BLD[:, prompt_length:]
    if last_only:
      x_BLD = x_BLD[:, -1:]
    if cfg.final_norm:
      x_BLD = layers.norm(cfg, "final_norm")(x_BLD)
    if return_hidden:
      return x_BLD
    self.sow("intermediates", HEAD_INPUT, x_BLD)  # what the output layer reads (distillation)
    return output_logits(cfg, token_embed, x_BLD)


@contextlib.contextmanager
def _branched(value: bool):
  """attention.BRANCHED while the layers are traced."""
  token = attention.BRANCHED.set(value)
  try:
    yield
  finally:
    attention.BRANCHED.reset(token)


def output_logits(cfg: ModelConfig, token_embed: nn.Embed, x_BLD) -> jax.Array:
  """[B, L, V]: the tied embedding or `lm_head`, soft-capped where the config says (Gemma 2)."""
  if cfg.tie_embeddings:
    logits_BLV = token_embed.attend(x_BLD)
  else:
    logits_BLV = nn.Dense(cfg.vocab_size, use_bias=False, dtype=layers.dtype_of(cfg.dtype),
                          param_dtype=layers.dtype_of(cfg.param_dtype), name="lm_head",
                          kernel_init=layers.init_normal(cfg.init_std,
                                                         (axes.EMBED, axes.VOCAB)))(x_BLD)
  if cfg.final_softcap:  # logits bounded to (-cap, cap), in the compute dtype
    logits_BLV = cfg.final_softcap * jnp.tanh(logits_BLV / cfg.final_softcap)
  return nn.with_logical_constraint(logits_BLV, (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB))


def position_embedding(cfg: ModelConfig, positions_BL, dtype) -> jax.Array | float:
  """What the input embeddings add for positions: a learned table ("pos_embed"), a fixed
  sinusoid, or nothing (RoPE rotates inside attention; "none" has no positions)."""
  if cfg.pos_emb == "learned":
    return nn.Embed(cfg.max_len, cfg.d_model, dtype=dtype,
                    param_dtype=layers.dtype_of(cfg.param_dtype), name="pos_embed",
                    embedding_init=layers.init_normal(cfg.init_std,
                                                      (axes.POSITIONS, axes.EMBED)))(positions_BL)
  if cfg.pos_emb == "sinusoidal":
    return jnp.asarray(layers.sinusoid_table(cfg.max_len, cfg.d_model), dtype)[positions_BL]
  return 0.0


def init_cache(model: nn.Module, batch: int, length: int) -> dict:
  """An empty decode cache (zeros, next slot 0) for `batch` rows of up to `length` tokens (plus
  a tuned prompt's slots)."""
  tokens_BL = jnp.zeros((batch, length), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens_BL, decode=True,
                                             prefill=True))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
