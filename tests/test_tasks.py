"""Tasks: the lm task is the pre-task-layer objective, step for step; MLM corruption and loss;
classification end to end through the CLI; head replacement from a checkpoint; every task on
8 devices under dp and fsdp equals one device; MLM export loads as BertForMaskedLM."""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import llmjax.train
from llmjax import checkpoint, config as config_lib, tasks, treepaths
from llmjax.data import text
from llmjax.errors import ConfigError, UserError
from llmjax.models.transformer import Transformer
from llmjax.objectives import lm as lm_objective
from llmjax.parallel import sharding
from llmjax.tasks.lm import LM
from llmjax.tasks.mlm import MaskedLM
from llmjax.train import init, loop, optim, pretrained, step
from llmjax.train import setup as setuplib
from llmjax.train.state import TrainState

import _cli as _cli_lib
from _task_helpers import (ROOT, WORDS, experiment, with_mesh, write_corpus,  # noqa: F401
                           write_labelled)


# --- lm: the objective the loop ran before tasks existed ---------------------------------------


def _pre_task_layer_loss(variables, batch, *, rng, train, model):
  """objectives.lm.loss_terms as it was before the task layer, behind the step's loss interface."""
  tokens_BL, segment_ids_BL = batch["tokens"], batch["segment_ids"]
  targets_BL, loss_mask_BL = lm_objective.next_token_targets(tokens_BL, segment_ids_BL)
  rngs = {"dropout": rng} if rng is not None else None
  logits_BLV = model.apply(variables, tokens_BL, segment_ids_BL=segment_ids_BL,
                           deterministic=not train, rngs=rngs)
  loss_sum, count = lm_objective.cross_entropy_sum(logits_BLV, targets_BL, loss_mask_BL)
  return tasks.LossTerms(loss_sum, count, {}, {})


def test_lm_task_reproduces_the_pre_task_layer_losses_bitwise(tmp_path):
  exp = experiment("lm", tmp_path, model=dict(dropout=0.1))
  task = LM(exp)
  model = task.model()
  tx = optim.make_optimizer(exp.optim, exp.train.steps)
  init_variables = init.variables_init(task, model, task.example_batch(1))
  variables = init_variables({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)})
  # The old init: model.init on a zero token batch gives the same parameters.
  old = model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
                   jnp.zeros((1, exp.data.seq_len), jnp.int32))
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(variables), nn.unbox(old))
  params = nn.unbox(variables)["params"]
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(3), model_state={})
  schedule = optim.learning_rate_schedule(exp.optim, exp.train.steps)
  new_step = jax.jit(functools.partial(step.train_step, loss=step.bind_loss(task, model), tx=tx,
                                       schedule=schedule))
  old_loss = functools.partial(_pre_task_layer_loss, model=model)
  old_step = jax.jit(functools.partial(step.train_step, loss=old_loss, tx=tx, schedule=schedule))
  rng = np.random.default_rng(0)
  new_state, old_state = state, state
  for _ in range(3):
    batch = {"tokens": jnp.asarray(rng.integers(0, 256, (4, 32)), jnp.int32),
             "segment_ids": jnp.asarray(np.repeat([[1] * 20 + [2] * 12], 4, 0), jnp.int32)}
    new_state, metrics = new_step(new_state, batch)
    old_state, old_metrics = old_step(old_state, batch)
    assert float(metrics["loss"]) == float(old_metrics["loss"])
  jax.tree.map(np.testing.assert_array_equal, new_state.params, old_state.params)


# --- mlm --------------------------------------------------------------------------------------


def _mlm_task(tmp_path):
  exp = experiment("mlm", tmp_path)
  info = {"tokenizer": "t", "vocab_size": 256, "pad_id": 0, "cls_id": 2, "sep_id": 3,
          "mask_id": 4}
  return MaskedLM(exp, info)


def _framed_batch(rng, batch=64, length=32):
  tokens = rng.integers(5, 256, (batch, length)).astype(np.int32)
  real = rng.integers(8, length + 1, batch)
  segment_ids = (np.arange(length)[None] < real[:, None]).astype(np.int32)
  tokens[:, 0] = 2
  tokens[np.arange(batch), real - 1] = 3
  tokens[segment_ids == 0] = 0
  return jnp.asarray(tokens), jnp.asarray(segment_ids)


def test_mlm_corruption_rates_and_what_is_never_chosen(tmp_path):
  task = _mlm_task(tmp_path)
  tokens, segment_ids = _framed_batch(np.random.default_rng(0))
  maskable = np.asarray((segment_ids != 0) & (tokens != 2) & (tokens != 3))
  corrupt = jax.jit(task.corrupt)
  chosen_total = mask_total = kept_total = 0
  for seed in range(20):
    inputs, chosen = map(np.asarray, corrupt(tokens, segment_ids, jax.random.PRNGKey(seed)))
    chosen = chosen.astype(bool)
    assert not (chosen & ~maskable).any()  # never [CLS], [SEP] or padding
    np.testing.assert_array_equal(inputs[~chosen], np.asarray(tokens)[~chosen])
    chosen_total += chosen.sum()
    mask_total += (inputs[chosen] == 4).sum()
    kept_total += (inputs[chosen] == np.asarray(tokens)[chosen]).sum()
  n = 20 * maskable.sum()
  assert abs(chosen_total / n - 0.15) < 0.01, chosen_total / n
  assert abs(mask_total / chosen_total - 0.8) < 0.03
  assert abs(kept_total / chosen_total - 0.1) < 0.03  # random replacements rarely hit the same id
  # Evaluation corrupts a batch the same way every time, and differently from another batch.
  first, _ = task.corrupt(tokens, segment_ids, None)
  again, _ = task.corrupt(tokens, segment_ids, None)
  other, _ = task.corrupt(tokens[::-1], segment_ids[::-1], None)
  np.testing.assert_array_equal(first, again)
  assert (np.asarray(other) != np.asarray(first)[::-1]).any()


class _Logits(nn.Module):
  """Stands in for the encoder: logits are a parameter, so their gradient is the loss's."""

  @nn.compact
  def __call__(self, tokens_BL, *, attention_mask_BL, deterministic):
    return self.param("logits", nn.initializers.normal(1.0), (*tokens_BL.shape, 256))


def test_mlm_loss_counts_only_the_chosen_positions(tmp_path):
  task = _mlm_task(tmp_path)
  tokens, segment_ids = _framed_batch(np.random.default_rng(1), batch=8)
  model = _Logits()
  variables = jax.jit(model.init, static_argnames="deterministic")(
      jax.random.PRNGKey(0), tokens, attention_mask_BL=segment_ids, deterministic=True)
  rng = jax.random.PRNGKey(5)
  loss = lambda v: task.loss(model, v, {"tokens": tokens, "segment_ids": segment_ids}, rng=rng,
                             train=True)
  terms = jax.jit(loss)(variables)
  grads = jax.jit(jax.grad(lambda v: loss(v).loss_sum))(variables)["params"]["logits"]
  _, chosen = task.corrupt(tokens, segment_ids, jax.random.split(rng)[0])
  chosen = np.asarray(chosen).astype(bool)
  assert chosen.any() and float(terms.weight) == chosen.sum()
  assert np.all(np.asarray(grads)[~chosen] == 0)  # unchosen targets have no say at all
  assert np.all(np.abs(np.asarray(grads)[chosen]).sum(-1) > 0)


# --- head replacement -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory):
  """A tiny MLM run (the real loop), for loading a classifier from it and exporting it."""
  tmp = tmp_path_factory.mktemp("mlm")
  exp = experiment("mlm", tmp)
  llmjax.train.run(exp, str(tmp / "run"))
  return tmp / "run", exp


def test_classifier_from_an_mlm_checkpoint_gets_a_fresh_head_and_the_encoder(mlm_run, tmp_path):
  workdir, _ = mlm_run
  exp = experiment("classify", tmp_path, train=dict(init_from=f"workdir:{workdir}",
                                                    init_new="(pooler|classifier)/.*"))
  s = setuplib.prepare(exp, str(tmp_path / "cls"))
  assert s.data.tokenizer.vocab_size == 256 and s.data.info["num_classes"] == 3
  fresh = init.init_state(0, s.init_variables, s.tx, s.mesh, s.rules, s.state_shardings)
  params = jax.device_get(pretrained.load_params(exp.train.init_from, exp.train.init_new,
                                                 fresh.params, s.state_shardings.params))
  saved = checkpoint.restore_params(str(workdir / "checkpoints"),
                                           jax.eval_shape(lambda: {"encoder": params["encoder"]}),
                                           {"encoder": jax.tree.map(
                                               lambda _: sharding.replicated(s.mesh),
                                               params["encoder"])}, partial=True)
  jax.tree.map(np.testing.assert_array_equal, params["encoder"],
               jax.device_get(saved["encoder"]))
  fresh_host = jax.device_get(fresh.params)
  for head in ("pooler", "classifier"):
    jax.tree.map(np.testing.assert_array_equal, params[head], fresh_host[head])
  # A mis-shaped parameter that init_new does not cover is named, not silently re-initialised.
  wider = jax.eval_shape(lambda: jax.tree_util.tree_map_with_path(
      lambda p, a: jnp.zeros((a.shape[0], 2 * a.shape[1]))
      if treepaths.path_str(p) == "encoder/layer_0/mlp/wi/kernel" else a, fresh_host))
  with pytest.raises(UserError, match="encoder/layer_0/mlp/wi/kernel"):
    pretrained.check(exp.train.init_from, exp.train.init_new, wider)
  with pytest.raises(ConfigError, match="config.train.init_new='heads/.*' matches no parameter"):
    pretrained.check(exp.train.init_from, "heads/.*", fresh_host)
  with pytest.raises(UserError, match="missing in the checkpoint: pooler/dense/bias"):
    pretrained.check(exp.train.init_from, "classifier/.*", fresh_host)


def test_init_from_takes_the_shape_from_the_checkpoint_and_names_conflicts(mlm_run, tmp_path):
  workdir, mlm_exp = mlm_run
  c = config_lib.base_config()
  c.train.init_from = f"workdir:{workdir}"
  exp = pretrained.resolve_model(config_lib.resolve(c))
  assert (exp.model.d_model, exp.model.causal, exp.model.norm_position) == (32, False, "post")
  c.model.n_layers = 3
  with pytest.raises(ConfigError, match="config.model.n_layers=3 but the checkpoint has 1"):
    pretrained.resolve_model(config_lib.resolve(c))


def test_mlm_export_loads_in_transformers_as_bert_for_masked_lm(mlm_run, tmp_path):
  torch = pytest.importorskip("torch")
  import transformers

  from llmjax.cli import export
  from llmjax.hf import convert
  workdir, exp = mlm_run
  export.export(str(workdir), str(tmp_path / "export"), None)
  convert.export_to_hf(str(tmp_path / "export"), str(tmp_path / "hf"))
  loaded = convert.load_export(str(tmp_path / "export"))
  hf_model = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "hf")).eval()
  tokens = np.random.default_rng(0).integers(5, 256, (2, 16))
  mask = np.ones_like(tokens)
  ours = jax.jit(loaded.model.apply)({"params": loaded.params}, jnp.asarray(tokens),
                                     attention_mask_BL=jnp.asarray(mask))
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4)


# --- every task on 8 devices ------------------------------------------------------------------


@pytest.mark.parametrize("task_name", ["lm", "mlm", "classify", "classify_decoder", "seq2seq"])
def test_every_task_on_eight_devices_matches_one(task_name, tmp_path):
  # One layer: the layers are alike, so a second shards as the first does (and every compile of
  # this test's nine programs per task costs about twice as much with two).
  exp = experiment(task_name.split("_")[0], tmp_path, decoder=task_name.endswith("decoder"),
                   model=dict(n_layers=1))
  one = setuplib.prepare(with_mesh(exp, 1, 1, "dp"), None, jax.devices()[:1])
  state = init.init_state(0, one.init_variables, one.tx, one.mesh, one.rules, one.state_shardings)
  host_state = jax.device_get(state)
  batch = next(loop._data_iterator(one, None))
  val = loop._process_slices(
      one.mesh, text.eval_batches(one.data.val, exp.train.batch_size, 1))
  results = {}
  for name, (data, fsdp, rules) in {"one": (1, 1, "dp"), "dp": (8, 1, "dp"),
                                    "fsdp": (1, 8, "fsdp")}.items():
    s = one if name == "one" else setuplib.prepare(with_mesh(exp, data, fsdp, rules))
    train_fn, eval_fn = setuplib.compile_steps(s)
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
      placed = jax.device_put(host_state, s.state_shardings)
      report, _ = loop.evaluate(s, eval_fn, placed, val)
      _, metrics = train_fn(placed, sharding.global_batch(batch, s.mesh))
    results[name] = (float(metrics["loss"]), report["loss"])
  for name in ("dp", "fsdp"):
    np.testing.assert_allclose(results[name], results["one"], rtol=2e-5, err_msg=name)



# --- classification end to end through the CLI -------------------------------------------------


# The verbs run in this process (tests/_cli.py), on its 8 devices: what is tested is what they
# compute and print, not the process (test_train and test_seq2seq start real ones).
_cli = _cli_lib.run


def test_a_tiny_classifier_fits_its_data_through_the_cli(tmp_path):
  data = write_labelled(tmp_path / "train.csv")
  workdir = tmp_path / "run"
  flags = ["--config=experiments/text/stdlib_classify.py:scratch,smoke", f"--workdir={workdir}",
           "--config.data.source=files", f"--config.data.files={data}",
           f"--config.data.val_files={data}", "--config.data.tokenizer=byte",
           "--config.model.vocab_size=256", "--config.train.steps=60",
           # rows of at most 32 bytes hold these texts: half the smoke's 64 (and its width)
           "--config.data.seq_len=32", "--config.model.max_len=32", "--config.model.d_model=32",
           "--config.model.d_ff=64",
           "--config.train.batch_size=8", "--config.train.eval_every=60",
           "--config.train.checkpoint_every=60", "--config.train.progress=False",
           "--config.optim.lr=3e-3", "--config.model.dropout=0.0"]
  proc = _cli("train", *flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "final validation accuracy 100.00%" in proc.stdout, proc.stdout
  labels = json.loads((workdir / "labels.json").read_text())
  assert labels["names"] == sorted(WORDS)
  proc = _cli("eval", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((workdir / "eval" / "step_60.json").read_text())
  assert report["accuracy"] == 1.0 and report["f1_macro"] == 1.0 and report["support"] == 18
  assert [c["name"] for c in report["per_class"]] == sorted(WORDS)
  assert (workdir / "plots" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
  proc = _cli("eval", f"--workdir={workdir}", "--split=test")
  assert proc.returncode == 2 and "no test split" in proc.stderr
  assert "Traceback" not in proc.stderr


# --- decoders as classifiers ------------------------------------------------------------------


def test_a_decoder_classifier_loads_an_lm_run_with_only_the_classifier_new(lm_run, tmp_path):
  # lm_run: experiment("lm") trained for 4 steps once per session (conftest), read only.
  exp = experiment("classify", tmp_path, decoder=True,
                   train=dict(init_from=f"workdir:{lm_run}", init_new="classifier/.*"))
  s = setuplib.prepare(exp, str(tmp_path / "cls"))
  assert s.exp.model.causal and type(s.model).__name__ == "DecoderClassifier"
  fresh = init.init_state(0, s.init_variables, s.tx, s.mesh, s.rules, s.state_shardings)
  params = jax.device_get(pretrained.load_params(s.exp.train.init_from, s.exp.train.init_new,
                                                 fresh.params, s.state_shardings.params))
  lm_params = checkpoint.restore_params(
      str(lm_run / "checkpoints"),
      jax.eval_shape(lambda: {k: v for k, v in params.items() if k != "classifier"}),
      jax.tree.map(lambda _: sharding.replicated(s.mesh),
                   {k: v for k, v in params.items() if k != "classifier"}), partial=True)
  jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in params.items()
                                               if k != "classifier"}, jax.device_get(lm_params))
  # The pooled position is each row's last real token: padding after it changes nothing.
  batch = next(loop._data_iterator(s, None))
  variables = {"params": params}
  forward = jax.jit(s.model.apply)
  logits = forward(variables, batch["tokens"], segment_ids_BL=batch["segment_ids"])
  tokens = np.asarray(batch["tokens"]).copy()
  tokens[np.asarray(batch["segment_ids"]) == 0] = 7
  again = forward(variables, tokens, segment_ids_BL=batch["segment_ids"])
  np.testing.assert_allclose(np.asarray(logits), np.asarray(again), atol=1e-6)


# --- zero-/few-shot through the CLI -----------------------------------------------------------


def test_zero_and_few_shot_cli_report_what_the_library_computes(tmp_path):
  pytest.importorskip("torch")
  import _hf_helpers as H

  from llmjax import weights
  from llmjax.eval import zeroshot
  H.make("gpt2_chars", tmp_path / "lm")
  H.save_char_tokenizer(tmp_path / "lm")
  rng = np.random.default_rng(0)
  for name, n in (("test", 12), ("shots", 8)):
    with open(tmp_path / f"{name}.jsonl", "w") as f:
      for _ in range(n):
        label = rng.choice(["yes", "no"])
        f.write(json.dumps({"text": "".join(rng.choice(list("abcde"), 5)), "label": label}) + "\n")
  common = [f"--checkpoint=hf:{tmp_path / 'lm'}", f"--data={tmp_path / 'test.jsonl'}",
            "--labels=yes,no", "--template=q {text} a"]
  zero = _cli("eval", *common)
  few = _cli("eval", *common, "--shots=2", f"--shot_data={tmp_path / 'shots.jsonl'}")
  source = weights.parse(f"hf:{tmp_path / 'lm'}", "--checkpoint")
  loaded, tokenizer = source.open(), source.tokenizer()
  examples = zeroshot.read_jsonl(str(tmp_path / "test.jsonl"))
  pool = zeroshot.read_jsonl(str(tmp_path / "shots.jsonl"))
  for proc, shots in ((zero, 0), (few, 2)):
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = zeroshot.classify(loaded.model, loaded.params, tokenizer, examples, ["yes", "no"],
                             "q {text} a", shots=shots, shot_pool=pool if shots else None)
    line = next(l for l in proc.stdout.splitlines() if l.split()[:1] == ["accuracy"])
    assert float(line.split()[1]) == pytest.approx(want["report"]["accuracy"], abs=1e-4)
  missing_pool = _cli("eval", *common, "--shots=2")
  assert missing_pool.returncode == 2 and "--shot_data" in missing_pool.stderr
  H.make("bert_mlm", tmp_path / "encoder")
  H.save_char_tokenizer(tmp_path / "encoder")
  encoder = _cli("eval", *common[1:], f"--checkpoint=hf:{tmp_path / 'encoder'}")
  assert encoder.returncode == 2 and "causal" in encoder.stderr, encoder.stderr[-2000:]
  assert all("Traceback" not in p.stderr for p in (missing_pool, encoder))


def test_capabilities_are_declared_and_wrappers_forward_what_they_can(tmp_path):
  """Callers ask `supports(task, Capability)`; wrappers (multi-task, distillation) answer for
  what they forward, never more."""
  declared = {name: {c.__name__ for c in tasks.declared(cls)} for name, cls in tasks.TASKS.items()}
  assert declared["lm"] == {"Predicts", "SharesBatch", "WritesFiles", "CountsFlops", "Exportable"}
  assert declared["mlm"] == {"Predicts", "CountsFlops", "Exportable"}
  assert declared["seq2seq"] >= {"DecodedReport", "Translates"}
  assert not any("Translates" in d for n, d in declared.items() if n != "seq2seq")
  from llmjax.tasks.distill import Distilled
  lm = LM(experiment("lm", tmp_path))
  assert tasks.supports(lm, tasks.SharesBatch) and not tasks.supports(lm, tasks.DecodedReport)
  distilled = Distilled(lm, lm)
  assert distilled.capabilities == {tasks.WritesFiles, tasks.CountsFlops}
  with pytest.raises(TypeError, match="not a task capability"):
    tasks.supports(lm, LM)
