"""Recurrent networks (config.model.arch="rnn"): padding changes nothing (by gradients), torch
nn.LSTM / nn.GRU parity through the weight converter, causality of the LM, 8 devices == 1 (dp,
fsdp), exact resume, generation equal to recomputation, classification in the loop, the
fine-tuning methods that fit, and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import llmjax.train
from llmjax import config as config_lib
from llmjax import flops, generate
from llmjax.errors import ConfigError, UserError
from llmjax.models import presets, rnn, rnn_torch
from llmjax.parallel import sharding
from llmjax import finetune as finetune_lib
from llmjax.train import init, loop, rundir
from llmjax.train import setup as setuplib

import _xla
from _task_helpers import ROOT, with_mesh, write_corpus, write_labelled


def model_cfg(**fields) -> config_lib.ModelConfig:
  base = dict(config_lib.model_section("rnn", vocab_size=64, d_model=8, rnn_layers=2,
                                       rnn_hidden=8, max_len=16))
  return config_lib.ModelConfig(**{**base, **fields})


def experiment(tmp, name="lm", **sections) -> config_lib.Experiment:
  """A tiny RNN run of `name` (a task) on files it writes, 4 steps: one layer of 16 units,
  both ways with dropout before the classifier for classify."""
  c = config_lib.base_config()
  both = name == "classify"
  c.model = config_lib.model_section("rnn", vocab_size=256, d_model=16, rnn_layers=1,
                                     rnn_hidden=16, max_len=16, bidirectional=both,
                                     dropout=0.1 * both)
  c.task.name = name
  if name == "lm":
    c.data.files = write_corpus(tmp / "corpus")
  else:
    c.data.files = str(write_labelled(tmp / "train.csv"))
    c.data.val_files = str(write_labelled(tmp / "val.csv", 3, seed=1))
  c.data.update(dict(source="files", tokenizer="byte", seq_len=16))
  c.train.update(dict(steps=4, batch_size=8, log_every=1, eval_every=4, eval_batches=1,
                      checkpoint_every=2, async_checkpoint=False, progress=False,
                      sample_prompts=1, sample_tokens=4))
  c.optim.update(dict(lr=1e-2, warmup_steps=0, schedule="constant"))  # a shorter run, same lr
  for section, values in sections.items():
    c[section].update(values)
  return config_lib.resolve(c)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
  """(experiment, workdir) of a 4-step RNN LM run, checkpoints at 2 and 4."""
  tmp = tmp_path_factory.mktemp("rnn_lm")
  exp = experiment(tmp)
  llmjax.train.run(exp, str(tmp / "run"))
  return exp, str(tmp / "run")


def test_padding_changes_nothing_by_gradients():
  """A bidirectional LSTM classifier and a causal GRU LM: no gradient reaches a padded
  position's embedding, and what fills the padding changes no output and no gradient."""
  lengths = np.array([8, 5, 2])
  real = np.arange(8)[None] < lengths[:, None]
  tokens = np.where(real, np.random.default_rng(0).integers(1, 60, (3, 8)), 63)  # 63: padding
  other = np.where(real, tokens, 62)
  mask = real.astype(np.int32)
  for model in (rnn.RNNClassifier(model_cfg(rnn_cell="lstm", bidirectional=True), num_labels=3),
                rnn.RNNLM(model_cfg(rnn_cell="gru"))):
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(tokens))["params"]

    def loss(p, t):
      out = model.apply({"params": p}, t, segment_ids_BL=jnp.asarray(mask))
      if out.ndim == 3:  # the LM's real positions only, as its loss counts them
        out = out * jnp.asarray(mask)[..., None]
      return jnp.sum(jnp.sin(out))

    loss_and_grads = jax.jit(jax.value_and_grad(loss))
    value, grads = loss_and_grads(params, jnp.asarray(tokens))
    table = np.asarray(nn.unbox(grads["embed"]["embedding"]))
    assert np.abs(table[63]).max() == 0 and np.abs(table[:60]).max() > 0
    value2, grads2 = loss_and_grads(params, jnp.asarray(other))
    assert float(value2) == float(value)
    jax.tree.map(np.testing.assert_array_equal, nn.unbox(grads2)["rnn"], nn.unbox(grads)["rnn"])


def _torch_module(cell: str, d: int, h: int):
  import torch
  torch.manual_seed(0)
  module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
  return module(d, h, num_layers=2, bidirectional=True, batch_first=True).eval()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_torch_weights_convert_with_outputs_within_1e5(cell):
  import torch
  cfg = model_cfg(rnn_cell=cell, d_model=6, rnn_hidden=5, bidirectional=True)
  module = _torch_module(cell, 6, 5)
  params = rnn_torch.stack_params(module.state_dict(), cfg)
  stack = rnn.RNNStack(cfg)
  x = np.random.default_rng(1).normal(size=(3, 7, 6)).astype(np.float32)
  ours_init = jax.eval_shape(lambda: nn.unbox(stack.init(jax.random.PRNGKey(0), x)["params"]))
  assert jax.tree.map(lambda a: a.shape, ours_init) == jax.tree.map(np.shape, params)
  with torch.no_grad():
    theirs = module(torch.from_numpy(x))[0].numpy()
  apply = jax.jit(lambda x, lengths=None: stack.apply({"params": params}, x, lengths_B=lengths))
  ours, _ = apply(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5)
  # padded rows: torch's packed sequences against our sequence lengths, on the real positions
  lengths = np.array([7, 4, 1])
  packed = torch.nn.utils.rnn.pack_padded_sequence(torch.from_numpy(x), torch.from_numpy(lengths),
                                                   batch_first=True, enforce_sorted=False)
  with torch.no_grad():
    theirs = torch.nn.utils.rnn.pad_packed_sequence(module(packed)[0], batch_first=True)[0]
  ours, _ = apply(jnp.asarray(x), jnp.asarray(lengths))
  real = np.arange(7)[None] < lengths[:, None]
  np.testing.assert_allclose(np.asarray(ours)[real], theirs.numpy()[real], atol=1e-5)
  with pytest.raises(UserError, match="'weight_ih_l0' has shape"):
    rnn_torch.stack_params(module.state_dict(), dataclasses.replace(cfg, rnn_hidden=4))


def test_flops_count_every_gate_of_every_layer_and_direction():
  cfg = model_cfg(d_model=8, rnn_hidden=4, bidirectional=True)  # LSTM: 4 gates, 10 tokens
  # per layer: directions * 2 * L * gates * (in + H) * H; the second layer reads 2H = 8
  assert flops.backbone_forward(cfg, 10).total == 2 * (2 * 2 * 10 * 4 * (8 + 4) * 4)
  one_way = dataclasses.replace(cfg, bidirectional=False)  # the second layer reads H = 4
  head = 2 * 10 * 4 * 64  # logits from H = 4 over 64 tokens
  assert flops.lm_forward(one_way, 10).total == (2 * 10 * 4 * (8 + 4) * 4
                                                 + 2 * 10 * 4 * (4 + 4) * 4 + head)


def test_lm_is_causal_by_gradients():
  """d output[t] / d input[s] is zero exactly when s > t."""
  stack = rnn.RNNStack(model_cfg(rnn_cell="gru"))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 6, 8)), jnp.float32)
  params = jax.jit(stack.init)(jax.random.PRNGKey(0), x)["params"]
  jac = jax.jit(jax.jacobian(lambda x: stack.apply({"params": params}, x)[0]))(x)  # [1,6,8,1,6,8]
  reach = np.abs(np.asarray(jac)[0, :, :, 0]).sum(axis=(1, 3))  # [t, s]
  assert (reach[np.triu_indices(6, 1)] == 0).all() and (np.diag(reach) > 0).all()


def test_resume_is_exact(lm_run, tmp_path):
  exp, straight = lm_run
  resumed = str(tmp_path / "resumed")
  # As if stopped after step 2: a copy of the run (read only) without its last checkpoint.
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  llmjax.train.run(exp, resumed)
  assert _losses(resumed) == _losses(straight)
  jax.tree.map(np.testing.assert_array_equal, rundir.restore(resumed).params,
               rundir.restore(straight).params)


def test_generation_carries_the_state_and_equals_recomputation(lm_run, tmp_path):
  from llmjax.cli import export
  _, workdir = lm_run
  assert os.path.getsize(os.path.join(workdir, "samples.txt")) > 0
  _, loaded = rundir.open_weights(f"workdir:{workdir}", "--checkpoint")  # `llmjax generate`'s
  model, params = loaded.model, loaded.params
  assert isinstance(model, rnn.RNNLM)
  prompts = [[5, 9, 33, 7], [40, 2]]
  tokens, mask = generate.left_pad(prompts)
  new = np.asarray(generate.generate(model, params, tokens, prompt_mask_BP=mask,
                                     max_new_tokens=5))
  for prompt, row in zip(prompts, new):
    # each row alone, without a cache: the logits at every position of prompt + generated
    # tokens are those a from-scratch recomputation sees after that prefix (the LM is causal)
    seq = jnp.asarray([list(prompt) + [int(t) for t in row]], jnp.int32)
    logits = model.apply({"params": params}, seq)[0, len(prompt) - 1:-1]
    np.testing.assert_array_equal(np.argmax(np.asarray(logits), axis=-1), row)
  export.export(workdir, str(tmp_path / "export"))  # `llmjax export`: the same module comes back
  _, exported = rundir.open_weights(f"export:{tmp_path / 'export'}", "--checkpoint")
  assert exported.model == model
  jax.tree.map(np.testing.assert_array_equal, exported.params, jax.device_get(params))


def test_finetuning_methods_train_what_they_name(lm_run):
  """freeze + head and BitFit train what they name; LoRA on the head trains its factors only,
  for a real step from the run's weights."""
  import re
  exp, workdir = lm_run

  def tuned(**finetune):
    return dataclasses.replace(
        exp, mesh=dataclasses.replace(exp.mesh, data=1),
        train=dataclasses.replace(exp.train, init_from=f"workdir:{workdir}"),
        finetune=dataclasses.replace(exp.finetune, **finetune))

  s = setuplib.prepare(tuned(method="lora", lora_targets="lm_head", lora_rank=2), None,
                       jax.devices()[:1])
  shapes = init.param_shapes(s.init_variables)
  base = {p: v for p, v in shapes.items() if "/lora/" not in p}  # the model the others tune
  for finetune, trained in ((dict(method="freeze", presets="head"), r"lm_head/(kernel|bias)"),
                            (dict(method="bitfit"), r".*/bias"),
                            (dict(method="lora", lora_targets="lm_head", lora_rank=2),
                             r"lm_head/lora/(a|b)")):
    paths = finetune_lib.trainable_paths(tuned(**finetune),
                                         shapes if finetune["method"] == "lora" else base)
    assert paths and all(re.fullmatch(trained, p) for p in paths), (finetune, paths)
  assert any(p.startswith("rnn/") for p in finetune_lib.trainable_paths(tuned(method="bitfit"),
                                                                        base))
  state = loop.fresh_state(s)
  before = jax.device_get((state.params, state.frozen))
  batch = next(loop._data_iterator(s, None))
  train_fn, _ = setuplib.compile_steps(s)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    new_state, metrics = train_fn(state, sharding.global_batch(batch, s.mesh))
  assert np.isfinite(float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_state.frozen), before[1])
  assert (np.asarray(new_state.params["lm_head"]["lora"]["b"]) != 0).any()  # B starts at zero


def _first_step(exp, devices=None):
  """(loss, params after one step) of a fresh state on exp's mesh."""
  s = setuplib.prepare(exp, None, devices)
  state = loop.fresh_state(s)
  batch = next(loop._data_iterator(s, None))
  train_fn, _ = setuplib.compile_steps(s)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    new_state, metrics = train_fn(state, sharding.global_batch(batch, s.mesh))
  return float(metrics["loss"]), jax.device_get(new_state.params)


def test_eight_devices_equal_one_under_dp_and_fsdp(tmp_path):
  exp = experiment(tmp_path)
  loss1, params1 = _first_step(with_mesh(exp, 1, 1, "dp"), jax.devices()[:1])
  for data, fsdp, rules in ((8, 1, "dp"), (1, 8, "fsdp")):
    loss, params = _first_step(with_mesh(exp, data, fsdp, rules))
    np.testing.assert_allclose(loss, loss1, rtol=1e-6)
    # sums reduce in another order; Adam's first step divides by |g|, so tiny gradients' last
    # bits move an update by up to lr * a few ulps' worth
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 params, params1)


def test_bidirectional_classifier_trains_in_the_loop(tmp_path):
  exp = experiment(tmp_path, "classify", train=dict(checkpoint_every=4))
  report = llmjax.train.run(exp, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    evals = [r for r in map(json.loads, f) if r["split"] == "val"]
  assert evals and 0.0 <= evals[-1]["accuracy"] <= 1.0 and "f1_macro" in evals[-1], report
  assert exp.model.bidirectional and rundir.restore(str(tmp_path / "run")).model.pooling == "mean"


@pytest.mark.parametrize("change,words", [
    (dict(model=dict(rnn_hidden=32)), ["config.model.rnn_hidden=32", "arch='rnn'"]),
    (dict(model=dict(bidirectional=True)), ["config.model.bidirectional=True", "arch='rnn'"]),
])
def test_rnn_options_on_a_transformer_are_refused(tmp_path, change, words):
  from _task_helpers import experiment as transformer_experiment
  with pytest.raises(ConfigError) as e:
    transformer_experiment("lm", tmp_path, **change)
  assert all(w in str(e.value) for w in words), e.value


@pytest.mark.parametrize("task,change,words", [
    ("lm", dict(model=dict(n_heads=8)), ["config.model.n_heads=8", "does not read"]),
    ("lm", dict(model=dict(n_layers=3)), ["config.model.n_layers=3", "rnn_layers"]),
    ("lm", dict(finetune=dict(method="adapter")), ["config.finetune.method='adapter'", "lora"]),
    ("classify", dict(task=dict(pooling="cls")), ["config.task.pooling='cls'", "mean, last"]),
    ("mlm", {}, ["arch='rnn'", "mlm"]),
])
def test_transformer_options_on_an_rnn_are_refused(tmp_path, task, change, words):
  defaults = config_lib.ModelConfig()  # what an RNN config must hold them at is the default
  assert all(getattr(defaults, k) == v for k, v in presets.RNN_IGNORED.items())
  with pytest.raises(ConfigError) as e:
    sections = change or dict(task=dict(name="mlm"))
    experiment(tmp_path, "lm" if task == "mlm" else task, **sections)
  assert all(w in str(e.value) for w in words), e.value


def test_bidirectional_lm_is_one_line_exit_2_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  done = subprocess.run(
      [sys.executable, "-m", "llmjax.cli.main", "train",
       f"--config={ROOT}/experiments/rnn/stdlib_lstm_lm.py:smoke", f"--workdir={workdir}",
       "--config.model.bidirectional=True"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, XLA_FLAGS=_xla.xla_flags(), JAX_PLATFORMS="cpu"))
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 2 and len(lines) == 1, done.stderr
  assert "config.model.bidirectional=True" in lines[0] and "task lm" in lines[0], lines
  assert not workdir.exists()
