"""config.task.share_prompt: one row per pair (or several), the prompt once and both completions
after it. Loss, metrics and gradients equal the two-row layout's (dpo, orpo; packed, padded and
cut pairs); the rejected tokens never see the chosen ones; bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llmjax import config as config_lib
from llmjax.data import preference
from llmjax.data.tokenizers import ByteTokenizer
from llmjax.errors import ConfigError
from llmjax.objectives.distill import TEACHER
from llmjax.tasks.dpo import DPO
from llmjax.tasks.orpo import ORPO

SEQ_LEN = 16
PAIRS = [("say 1:", " open!", " close?"),
         ("a long prompt that gets cut here:", " yes!", " no!?"),  # both cut alike: shared
         ("another long prompt to cut:", " ok", " a much longer reply"),  # cut apart: not shared
         ("say 2:", " help!", " view?"),
         ("hi:", " x", " y z w")]


def experiment(task, share, **options):
  c = config_lib.base_config()
  c.model = config_lib.model_section("llama", vocab_size=256, d_model=16, n_layers=1, n_heads=2,
                                     d_ff=32, max_len=SEQ_LEN, attention_impl="blocked",
                                     attention_block=8)
  c.task.name = task
  c.task.update({"completions": 0, "share_prompt": share, **options})
  c.data.update(dict(source="files", files="unused.jsonl", tokenizer="byte", seq_len=SEQ_LEN))
  return config_lib.resolve(c)


def _rows(share):
  """The pairs' rows in either layout, with one padded row (no pair) appended."""
  pairs = [preference.Pair(p, c, r, f"row {i}") for i, (p, c, r) in enumerate(PAIRS)]
  if share:
    arrays, cut, dropped = preference.tokenize_shared(pairs, ByteTokenizer(), SEQ_LEN, 40, 3)
    assert (cut, dropped) == (2, 0)
    assert arrays["segment_ids"].max(axis=1).tolist() == [2, 2, 1]  # pairs per row, first fit
  else:
    arrays, cut = preference.tokenize(pairs, ByteTokenizer(), SEQ_LEN)
    assert cut == 2
  return {k: jnp.asarray(np.concatenate([v, np.zeros_like(v[:1])])) for k, v in arrays.items()}


@pytest.mark.parametrize("task_cls", [DPO, ORPO])
def test_shared_rows_equal_two_rows(task_cls):
  """Same loss sum, pair count, metric sums and gradients (fp32, 1e-5) from both layouts."""
  name = task_cls.name
  tasks = [task_cls(experiment(name, share, **({"pairs_per_row": 3, "row_len": 40} if share
                                               else {})), {}) for share in (False, True)]
  model = tasks[0].model()
  # Jitted: one compile per program instead of one per operation (most of this test's time).
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, SEQ_LEN), jnp.int32))["params"])
  params, reference = init(jax.random.PRNGKey(0)), init(jax.random.PRNGKey(1))

  def terms(task, batch, params):
    variables = {"params": params}
    if name == "dpo":  # a reference other than the policy: rewards and margins not zero
      variables[TEACHER] = {"variables": {"params": reference}}
    out = task.loss(model, variables, batch, rng=None, train=False)
    return out.loss_sum / out.weight, out

  results = []
  for task, share in zip(tasks, (False, True)):
    (_, out), grads = jax.jit(jax.value_and_grad(terms, argnums=2, has_aux=True),
                              static_argnums=0)(task, _rows(share), params)
    results.append((out, grads))
  (two, two_grads), (shared, shared_grads) = results
  assert float(two.weight) == float(shared.weight) == len(PAIRS)
  np.testing.assert_allclose(shared.loss_sum, two.loss_sum, rtol=1e-5, atol=1e-6)
  assert set(two.sums) == set(shared.sums)
  for key in two.sums:
    np.testing.assert_allclose(shared.sums[key], two.sums[key], rtol=1e-5, atol=1e-5, err_msg=key)
  assert abs(float(two.sums["reward_margin_sum"])) > 1e-4  # the comparison is not of zeros
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               shared_grads, two_grads)


def test_rejected_never_sees_chosen():
  """d logp(rejected) / d (embeddings of tokens only the chosen completion holds) is 0 exactly,
  while the chosen log-probability, and without branch ids the rejected one, depend on them."""
  pair = preference.Pair("pick:", " QZ", " ab", "row 0")
  arrays, _, _ = preference.tokenize_shared([pair], ByteTokenizer(), SEQ_LEN, 24, 1)
  batch = {k: jnp.asarray(v) for k, v in arrays.items()}
  task = DPO(experiment("dpo", True, row_len=24), {})
  model = task.model()
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), batch["tokens"][:, :SEQ_LEN])[
      "params"])
  only_chosen = jnp.asarray([ord("Q"), ord("Z")])

  def logp(embed, side, branch_ids):
    p = {**params, "embed": {"embedding": embed}}
    b = {**batch, "branch_ids": branch_ids}
    sums, _, _, _ = task.pair_logps(model, {"params": p}, b, rng=None, train=False)
    return sums[side].sum()

  embed = params["embed"]["embedding"]
  # Jitted (the side is static): one compile each instead of one per operation.
  grad_fn = jax.jit(jax.grad(logp), static_argnums=1)
  grad = lambda side, branches: grad_fn(embed, side, branches)[only_chosen]  # noqa: E731
  assert float(jnp.abs(grad(1, batch["branch_ids"])).max()) == 0.0
  assert float(jnp.abs(grad(0, batch["branch_ids"])).max()) > 0.0
  assert float(jnp.abs(grad(1, jnp.zeros_like(batch["branch_ids"]))).max()) > 0.0


def test_bad_sharing_options_are_refused():
  """share_prompt with the splash kernel, row options without share_prompt, the key on another
  task: one line naming the key and what is allowed."""
  for kwargs, message in (
      (dict(share_prompt=True), r"attention_impl='splash' cannot run the branch mask"),
      (dict(row_len=64), r"need config.task.share_prompt=True"),
      (dict(share_prompt=True, pairs_per_row=0), r"pairs_per_row must be >= 1")):
    c = config_lib.base_config()
    c.model = config_lib.model_section("llama", attention_impl="splash")
    c.task.name = "orpo"
    c.task.update(kwargs)
    c.data.update(dict(source="files", files="x.jsonl"))
    with pytest.raises(ConfigError, match=message) as e:
      config_lib.resolve(c)
    assert "\n" not in str(e.value)
  c = config_lib.base_config()
  c.task.share_prompt = True
  with pytest.raises(ConfigError, match=r"share_prompt=True is an option of the dpo, orpo task, "
                     r"not of config.task.name='lm'") as e:
    config_lib.resolve(c)
  assert "\n" not in str(e.value)


def test_auto_attention_runs_xla_where_it_would_pick_splash():
  """On a TPU target `auto` picks splash for a 128-slot row; with branch ids it runs XLA's
  attention instead (equal to 'xla'), and an explicit 'splash' is refused in one line."""
  from llmjax.models import attention
  from llmjax.models.transformer import Transformer
  length = 128
  batch = {"tokens_BL": jnp.arange(length, dtype=jnp.int32)[None] % 50,
           "segment_ids_BL": jnp.ones((1, length), jnp.int32),
           "branch_ids_BL": jnp.repeat(jnp.arange(3, dtype=jnp.int32), 43)[None, :length],
           "positions_BL": jnp.arange(length, dtype=jnp.int32)[None] % 86}
  exp = experiment("dpo", True)
  models = {impl: Transformer(dataclasses.replace(exp.model, attention_impl=impl, max_len=length))
            for impl in ("auto", "xla", "splash")}
  params = jax.jit(models["xla"].init)(jax.random.PRNGKey(0), batch["tokens_BL"])
  tokens_BL = batch.pop("tokens_BL")
  # Jitted: one compile per implementation instead of one per operation (the choice and the
  # refusal happen at trace time, under the TPU target set below).
  run = lambda impl: jax.jit(models[impl].apply)(params, tokens_BL, **batch)  # noqa: E731
  token = attention.TARGET_PLATFORM.set("tpu")
  try:
    assert attention.implementation(models["auto"].cfg, length) == "splash"
    np.testing.assert_array_equal(run("auto"), run("xla"))
    with pytest.raises(ConfigError, match="'splash' cannot run the branch mask") as e:
      run("splash")
    assert "\n" not in str(e.value)
  finally:
    attention.TARGET_PLATFORM.reset(token)
