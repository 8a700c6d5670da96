"""Text generation from a decoder: temperature sampling inside one compiled loop.

This first version recomputes the full prefix each step (no KV cache); it serves the training
loop's samples. Prompts are right-aligned in a fixed buffer so every row decodes in lockstep.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("model", "n_new", "temperature"))
def sample(model, params, prompt_BP: jax.Array, rng: jax.Array, *, n_new: int,
           temperature: float = 1.0) -> jax.Array:
  """[B, P] prompt tokens -> [B, n_new] sampled tokens (greedy when temperature == 0)."""
  batch, prompt_len = prompt_BP.shape
  buffer_BT = jnp.concatenate([prompt_BP, jnp.zeros((batch, n_new), prompt_BP.dtype)], axis=1)

  def body(i, carry):
    buffer_BT, rng = carry
    logits_BTV = model.apply({"params": params}, buffer_BT)
    logits_BV = logits_BTV[:, prompt_len + i - 1].astype(jnp.float32)
    rng, key = jax.random.split(rng)
    if temperature > 0:
      next_B = jax.random.categorical(key, logits_BV / temperature)
    else:
      next_B = jnp.argmax(logits_BV, axis=-1)
    buffer_BT = buffer_BT.at[:, prompt_len + i].set(next_B.astype(buffer_BT.dtype))
    return buffer_BT, rng

  buffer_BT, _ = jax.lax.fori_loop(0, n_new, body, (buffer_BT, rng))
  return buffer_BT[:, prompt_len:]
