"""llmjax.random_draws: independent small threefry draws hashed together give bit for bit what
each gives alone, in fewer hashes; large draws, key arrays and effectful programs are left alone."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from llmjax import config as config_lib
from llmjax.models.transformer import Transformer
from llmjax.random_draws import MAX_DRAW_SIZE, drawn_together


def primitives(fun, *args) -> collections.Counter:
  """How often each primitive occurs in `fun`'s jaxpr, nested jaxprs included."""
  counts = collections.Counter()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      counts[eqn.primitive.name] += 1
      for sub in jcore.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fun)(*args).jaxpr)
  return counts


def assert_same_bits(expected, got):
  assert jax.tree.structure(expected) == jax.tree.structure(got)
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    assert e.dtype == g.dtype and e.shape == g.shape
    np.testing.assert_array_equal(np.asarray(e), np.asarray(g))


def draws(key, message):
  """Three waves of small draws (each wave needs the keys the one before made), a draw from a
  key array (vmapped) and one over MAX_DRAW_SIZE values."""
  a = jax.random.fold_in(key, 3)  # wave 1
  first = jax.random.bits(key, (4, 3))  # wave 1
  b, c = jax.random.split(a)  # wave 2
  d = jax.random.fold_in(a, message)  # wave 2
  keys = jax.random.split(c, 5)  # wave 3
  return {
      "first": first,
      "normal": jax.random.normal(b, (4, 3)),  # wave 3
      "truncated": jax.random.truncated_normal(d, -2.0, 2.0, (7,)),  # wave 3
      "uint8": jax.random.bits(c, (3, 2), jnp.uint8),  # wave 3
      "uint16": jax.random.bits(d, (5,), jnp.uint16),  # wave 3
      "scalar": jax.random.uniform(b, ()),  # wave 3
      "keys": jax.random.key_data(keys),
      "per_key": jax.vmap(lambda k: jax.random.normal(k, (2,)))(keys),  # a key array: alone
      "large": jax.random.bits(a, (MAX_DRAW_SIZE + 1,)),  # over the limit: alone
  }


def test_draws_hashed_together_are_the_same_bits_in_one_hash_per_wave():
  key, message = jax.random.PRNGKey(42), jnp.int32(11)
  assert_same_bits(jax.jit(draws)(key, message), jax.jit(drawn_together(draws))(key, message))
  plain, together = primitives(draws, key, message), primitives(drawn_together(draws), key,
                                                                 message)
  assert plain["random_fold_in"] + plain["random_split"] + plain["random_bits"] >= 9
  # Three waves hashed together; the key array's draw and the large one keep their own.
  assert together["threefry2x32"] == 3
  assert together["random_bits"] == 2
  assert together["random_fold_in"] == together["random_split"] == 0


def test_64_bit_draws_are_the_same_bits():
  with jax.enable_x64(True):
    key = jax.random.PRNGKey(7)
    draw = lambda k: [jax.random.bits(jax.random.fold_in(k, i), (3,), jnp.uint64)
                      for i in range(3)]
    assert_same_bits(jax.jit(draw)(key), jax.jit(drawn_together(draw))(key))


def test_a_model_init_is_the_same_bits_with_a_hash_per_wave():
  cfg = config_lib.model_section("llama", vocab_size=64, d_model=16, n_layers=2, n_heads=2,
                                 d_ff=32, max_len=8)
  model = Transformer(config_lib.resolve({"model": cfg.to_dict(), "data": {"seq_len": 8}}).model)
  init = lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))
  key = jax.random.PRNGKey(0)
  assert_same_bits(jax.jit(init)(key), jax.jit(drawn_together(init))(key))
  assert primitives(drawn_together(init), key)["threefry2x32"] <= 4


def test_a_program_with_effects_runs_as_written():
  seen = []

  def noisy(key):
    x = jax.random.normal(jax.random.fold_in(key, 1), (3,))
    jax.debug.callback(lambda v: seen.append(np.asarray(v)), x)
    return x + jax.random.normal(jax.random.fold_in(key, 2), (3,))

  key = jax.random.PRNGKey(1)
  expected = jax.jit(noisy)(key)
  assert_same_bits(expected, jax.jit(drawn_together(noisy))(key))
  assert len(seen) == 2 and np.array_equal(seen[0], seen[1])
  assert primitives(drawn_together(noisy), key)["threefry2x32"] == 0


def test_without_partitionable_threefry_only_key_derivations_are_hashed_together():
  key = jax.random.PRNGKey(3)
  draw = lambda k: [jax.random.normal(jax.random.fold_in(k, i), (4,)) for i in range(3)]
  with jax.threefry_partitionable(False):
    assert_same_bits(jax.jit(draw)(key), jax.jit(drawn_together(draw))(key))
    together = primitives(drawn_together(draw), key)
  assert together["random_bits"] == 3 and together["random_fold_in"] == 0
