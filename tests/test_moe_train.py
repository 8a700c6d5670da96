"""Mixture of experts in training: expert parallelism on 8 devices equals 1 device, and a real
run reports its auxiliary losses, expert load (evaluation JSON, TensorBoard) and active
parameters, and resumes exactly."""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from tensorboardX.proto import event_pb2  # an independent decoder of the Event protobuf

import llmjax.train
from llmjax import config as config_lib
from llmjax import tasks
from llmjax.eval import evaluate
from llmjax.parallel import mesh as meshlib
from llmjax.parallel import sharding
from llmjax.tasks.lm import LM
from llmjax.train import init, optim, reporting
from llmjax.train import step as steplib
from llmjax.train.state import TrainState
from llmjax.train import setup as setuplib

from _task_helpers import experiment as task_experiment

SEQ, BATCH, E = 16, 8, 8


def experiment(rules, capacity, **mesh):
  """One Llama block with 8 experts, 2 per token; constant lr so every step moves the weights."""
  model = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
               max_len=SEQ, n_experts=E, experts_per_token=2, moe_d_ff=32,
               moe_capacity_factor=capacity, moe_z_loss_weight=1e-2)
  return config_lib.resolve({
      "model": config_lib.model_section("llama", **model).to_dict(),
      "mesh": dict(data=1, fsdp=1, tensor=1, expert=1, rules=rules) | mesh,
      "optim": dict(lr=1e-2, schedule="constant", warmup_steps=0),
      "data": dict(seq_len=SEQ), "train": dict(batch_size=BATCH, steps=10)})


def train_steps(exp, host_state, batches, devices=None):
  """The loop's own jitted step on `exp`'s mesh: (losses, host params, setup)."""
  mesh = meshlib.make_mesh(exp.mesh, devices)
  rules = sharding.rules_for(exp.mesh.rules)
  sharding.check_divisible(exp.model, mesh, exp.mesh.rules)
  task = LM(exp)
  model, tx = task.model(), optim.make_optimizer(exp.optim, exp.train.steps)
  variables = init.variables_init(task, model, task.example_batch(1))
  abstract, shardings = init.state_shardings(variables, tx, mesh, rules)
  s = setuplib.Setup(exp, mesh, rules, task, model, None, tx,
                     optim.learning_rate_schedule(exp.optim, exp.train.steps), variables,
                     abstract, shardings)
  if host_state is None:
    host_state = jax.device_get(init.init_state(0, variables, tx, mesh, rules, shardings))
  train_fn, _ = setuplib.compile_steps(s)
  state, losses = jax.device_put(host_state, shardings), []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for batch in batches:
      state, metrics = train_fn(state, sharding.global_batch(batch, mesh))
      losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state), host_state, state


def batches(n=3):
  rng = np.random.default_rng(0)
  return [{"tokens": rng.integers(1, 64, (BATCH, SEQ)).astype(np.int32),
           "segment_ids": np.ones((BATCH, SEQ), np.int32)} for _ in range(n)]


@pytest.mark.parametrize("capacity,mesh", [(0.0, dict(fsdp=2, expert=4)),
                                           (1.0, dict(expert=8))])
def test_expert_parallel_steps_equal_one_device(capacity, mesh):
  losses, ref, host_state, _ = train_steps(experiment("dp", capacity), None, batches(),
                                           jax.devices()[:1])
  got, params, _, state = train_steps(experiment("fsdp_ep", capacity, **mesh), host_state,
                                      batches())
  np.testing.assert_allclose(got, losses, rtol=1e-5)
  # Adam divides each gradient by its own scale, so an element whose gradient is near zero
  # turns a rounding difference of the sharded sums into a visible one (at most 2.3e-5 here
  # under the dropless all-to-all, against steps of lr 1e-2): the layer's own values and
  # gradients are compared at rtol 1e-5 in test_moe.py.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-5, rtol=0), params.params,
               ref.params)
  # The experts really are split over the expert axis, and the steps moved them.
  wi = state.params["layer_0"]["mlp"]["experts"]["wi"]
  assert wi.sharding.spec[0] == "expert"
  assert {s.data.shape[0] for s in wi.addressable_shards} == {E // mesh["expert"]}
  moved = np.abs(params.params["layer_0"]["mlp"]["experts"]["wi"] -
                 host_state.params["layer_0"]["mlp"]["experts"]["wi"]).max()
  assert moved > 1e-3


def moe_run(tmp, workdir, steps):
  exp = task_experiment("lm", tmp, model=dict(n_experts=4, experts_per_token=2, moe_d_ff=32,
                                              moe_z_loss_weight=1e-2),
                        train=dict(steps=steps, log_every=1, checkpoint_every=2,
                                   eval_every=4, eval_batches=2, sample_prompts=0,
                                   async_checkpoint=False))
  return llmjax.train.run(exp, str(workdir))


def test_moe_run_reports_load_and_active_params_and_resumes_exactly(tmp_path):
  final = moe_run(tmp_path, tmp_path / "a", 4)
  load = final["moe_load"]
  assert len(load) == 4 and abs(sum(load) - 1) < 1e-5 and all(0 <= x <= 1 for x in load)
  assert final["moe_aux_loss"] > 0
  assert final["moe_z_loss"] > 0 and final["moe_dropped"] == 0.0
  params = json.loads((tmp_path / "a" / "params.json").read_text())
  assert 0 < params["active"] < params["total"]
  records = reporting.read_metrics(str(tmp_path / "a" / "metrics.jsonl"))
  val = [r for r in records if r["split"] == "val"]
  assert val and val[-1]["moe_aux_loss"] == pytest.approx(final["moe_aux_loss"])
  # llmjax eval's function over the batches training's evaluations read gives their report
  again = evaluate.evaluate_run(str(tmp_path / "a"), max_batches=2)
  assert again["batches"] == 2 and again["step"] == 4
  for key in ("loss", "moe_aux_loss", "moe_z_loss", "moe_load"):
    np.testing.assert_allclose(again[key], final[key], rtol=1e-6, err_msg=key)
  # Every train record carries the step's scalar MoE statistics (load: evaluation only).
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  for r in train:
    assert r["moe_aux_loss"] >= 1.0 and r["moe_z_loss"] > 0 and r["moe_dropped"] == 0.0
    assert "moe_load" not in r
  # The load as a TensorBoard histogram over expert index.
  histos = []
  for path in (tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"):
    data = path.read_bytes()
    i = 0
    while i < len(data):
      n = int.from_bytes(data[i:i + 8], "little")
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      histos += [v.histo for v in event.summary.value if v.tag == "val/moe_load"]
      i += n + 16
  assert len(histos) == 1
  np.testing.assert_allclose(list(histos[0].bucket), load, rtol=1e-6)
  assert list(histos[0].bucket_limit) == [0.5, 1.5, 2.5, 3.5]
  # Resumed from step 2, steps 3 and 4 are bitwise those of the uninterrupted run. (Stopped
  # after step 2 by dropping the last checkpoint of a copy: a 2-step run would compile another
  # train step for its other learning-rate schedule.)
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")
  moe_run(tmp_path, tmp_path / "b", 4)
  train = {d: {r["step"]: r["loss"] for r in reporting.read_metrics(
      str(tmp_path / d / "metrics.jsonl")) if r["split"] == "train"} for d in "ab"}
  assert [train["b"][s] for s in (3, 4)] == [train["a"][s] for s in (3, 4)]


def test_classify_with_moe_encoder_gets_aux_losses_and_reports(tmp_path):
  """The auxiliary losses reach a task other than lm (the shared loss path): a classifier on an
  MoE encoder adds them to its training loss, reports them, and its train step logs them."""
  exp = task_experiment("classify", tmp_path,
                        model=dict(n_experts=4, experts_per_token=2, moe_d_ff=16, n_layers=1,
                                   moe_aux_loss_weight=0.5, moe_z_loss_weight=0.1,
                                   moe_capacity_factor=1.0))
  task, data = tasks.setup(exp, None)
  model = task.model()
  batch = task.eval_batches(data.train, 8, 1)[0]
  variables = nn.unbox(init.variables_init(task, model, task.example_batch(1))(
      jax.random.PRNGKey(0)))
  loss = steplib.bind_loss(task, model)
  plain, train, evaluated = jax.jit(lambda v, b: (
      task.loss(model, v, b, rng=None, train=False), loss(v, b, rng=None, train=True),
      loss(v, b, rng=None, train=False)))(variables, batch)
  weight = float(plain.weight)
  aux, z = (float(evaluated.sums[k]) / weight for k in ("moe_aux_loss", "moe_z_loss"))
  assert aux >= 1.0 and z > 0
  # evaluation keeps the task's own loss; training adds 0.5 aux + 0.1 z per counted example
  np.testing.assert_allclose(float(evaluated.loss_sum), float(plain.loss_sum), rtol=1e-6)
  np.testing.assert_allclose(float(train.loss_sum) - float(plain.loss_sum),
                             (0.5 * aux + 0.1 * z) * weight, rtol=1e-4)
  report = tasks.report_with_moe(task, jax.tree.map(np.asarray, evaluated.sums | {
      "loss_sum": evaluated.loss_sum, "weight": evaluated.weight}))
  assert report["moe_aux_loss"] == pytest.approx(aux) and len(report["moe_load"]) == 4
  assert 0 <= report["moe_dropped"] < 1 and "accuracy" in report
  # the train step logs them per counted example (here with gradient accumulation; the lm run
  # above without)
  tx = optim.make_optimizer(exp.optim, exp.train.steps)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                     opt_state=tx.init(variables["params"]), rng=jax.random.PRNGKey(1),
                     model_state={})
  _, metrics = jax.jit(functools.partial(steplib.train_step, loss=loss, tx=tx,
                                         schedule=lambda _: 0.0, accum_steps=2))(state, batch)
  assert {"moe_aux_loss", "moe_z_loss", "moe_dropped"} <= set(metrics)
  assert "moe_load" not in metrics and float(metrics["moe_aux_loss"]) >= 1.0
