"""A plain-JAX GPT-2 train step, written as a JAX user would from the flax and optax docs.

train_throughput.py --compare=plain-jax times it beside llmjax's step at the same shapes, so
what llmjax's machinery costs (sharding constraints, logical axes, segment masks, the
apply_if_finite guard, metric sums) shows as a ratio. No llmjax import here, on purpose.

Same as llmjax's gpt2 preset: token + learned position embeddings, every weight drawn from
normal(0.02) as GPT-2 does, biases zero; pre-LN blocks (LayerNorm eps from the config) with
causal multi-head attention (biased q, k, v and output projections) and a tanh-GELU MLP with
biases; a final LayerNorm; logits tied to the token embedding; next-token cross-entropy (mean
over the L-1 predicted positions); AdamW (b1, b2, eps; decay on kernels only, as llmjax's
NO_DECAY mask does) after global-norm clipping, warmup + cosine schedule; parameters float32,
compute in `dtype`; one jitted step with the state donated. Same parameter count, same counted
FLOPs (same matmuls, same attention, same logits).

Different from llmjax, by design (that is what the comparison shows):
- attention is flax's `nn.MultiHeadDotProductAttention`: the full L x L scores masked by
  `nn.make_causal_mask`, where llmjax on CPU computes blocked causal attention that skips the
  masked blocks (attention_impl "auto");
- default XLA compile options (llmjax compiles its CPU steps without YNNPACK fusions,
  llmjax/train/compile_options.py);
- no sharding annotations, no segment ids (every row is one sequence), no non-finite guard,
  only the loss as a metric.
Only the GPT-2 shape is written here: train_throughput refuses --compare=plain-jax for llama
(RoPE, RMSNorm, SwiGLU, grouped-query attention), as it refuses --compare=hf-torch.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab_size: int
  seq_len: int
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32


@dataclasses.dataclass(frozen=True)
class OptConfig:
  lr: float = 1e-3
  warmup_steps: int = 100
  total_steps: int = 1000
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0


INIT = nn.initializers.normal(0.02)


class Block(nn.Module):
  config: GPTConfig

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    h = nn.LayerNorm(epsilon=c.norm_eps, dtype=c.dtype)(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=c.n_heads, dtype=c.dtype,
                                           kernel_init=INIT)(h, h, mask=mask)
    h = nn.LayerNorm(epsilon=c.norm_eps, dtype=c.dtype)(x)
    h = nn.gelu(nn.Dense(c.d_ff, dtype=c.dtype, kernel_init=INIT)(h), approximate=True)
    return x + nn.Dense(c.d_model, dtype=c.dtype, kernel_init=INIT)(h)


class GPT(nn.Module):
  config: GPTConfig

  @nn.compact
  def __call__(self, tokens):
    c = self.config
    wte = nn.Embed(c.vocab_size, c.d_model, dtype=c.dtype, embedding_init=INIT, name="wte")
    pos = self.param("wpe", INIT, (c.seq_len, c.d_model))
    x = wte(tokens) + pos[None, : tokens.shape[1]].astype(c.dtype)
    mask = nn.make_causal_mask(tokens)
    for _ in range(c.n_layers):
      x = Block(c)(x, mask)
    x = nn.LayerNorm(epsilon=c.norm_eps, dtype=c.dtype)(x)
    return wte.attend(x).astype(jnp.float32)  # tied output embedding; loss in float32


def loss_fn(params, apply_fn, tokens):
  logits = apply_fn({"params": params}, tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def make_optimizer(o: OptConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps,
      decay_steps=max(o.total_steps, o.warmup_steps + 1), end_value=o.lr * o.min_lr_ratio)
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key == "kernel", params)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                     optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                                 weight_decay=o.weight_decay, mask=decay_mask))


def create_state(config: GPTConfig, opt: OptConfig, seed: int = 0) -> train_state.TrainState:
  model = GPT(config)
  tokens = jnp.zeros((1, config.seq_len), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(seed), tokens)["params"]
  return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                       tx=make_optimizer(opt))


def train_step(state: train_state.TrainState, tokens):
  loss, grads = jax.value_and_grad(loss_fn)(state.params, state.apply_fn, tokens)
  return state.apply_gradients(grads=grads), loss


def runner(config: GPTConfig, opt: OptConfig, batch_size: int, seed: int = 0):
  """(run one step, info) for train_throughput's turn-taking; lower+compile timed apart."""
  state = create_state(config, opt, seed)
  tokens = jnp.asarray(np.random.default_rng(seed).integers(
      0, config.vocab_size, (batch_size, config.seq_len)), jnp.int32)
  start = time.perf_counter()
  compiled = jax.jit(train_step, donate_argnums=0).lower(state, tokens).compile()
  info = {"compile_s": time.perf_counter() - start, "losses": [],
          "n_params": sum(x.size for x in jax.tree.leaves(state.params))}
  holder = {"state": state}

  def once():
    new_state, loss = compiled(holder["state"], tokens)
    jax.block_until_ready((new_state, loss))
    holder["state"] = new_state
    info["losses"].append(float(loss))

  return once, info
