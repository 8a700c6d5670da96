"""Multi-task (config.tasks): the parameter tree, per-task metrics equal a single-task evaluation,
heads get no gradient from other tasks' rows, the mixture's frequencies, exact resume and
`llmjax eval`, 8 devices equal one, and each bad input."""

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
from llmjax.errors import ConfigError, UserError
from llmjax.eval import evaluate
from llmjax.parallel import sharding
from llmjax.tasks import multitask, report_with_moe
from llmjax.train import init, loop, reporting, rundir, step
from llmjax.train import setup as setuplib

import _xla
from _task_helpers import ROOT, with_mesh, write_corpus, write_labelled


def _config(tmp, weights=(1.0, 1.0)):
  """A tiny decoder shared by an LM (untied: it has a head of its own) and a classifier."""
  c = config_lib.base_config()
  c.model = config_lib.model_section("llama", vocab_size=256, d_model=32, n_layers=2, n_heads=4,
                                     d_ff=64, max_len=32, tie_embeddings=False)
  c.data.update(dict(source="files", tokenizer="byte", seq_len=32))
  c.tasks.lm = dict(data=dict(files=write_corpus(tmp / "corpus")), weight=weights[0])
  c.tasks.classify = dict(task=dict(pooling="last"), weight=weights[1], loss_weight=0.5,
                          data=dict(files=str(write_labelled(tmp / "train.csv")),
                                    val_files=str(write_labelled(tmp / "val.csv", 3, seed=1))))
  c.train.update(dict(steps=4, batch_size=8, log_every=1, eval_every=2, eval_batches=2,
                      checkpoint_every=2, async_checkpoint=False, progress=False,
                      sample_prompts=1, sample_tokens=4))
  c.optim.update(dict(lr=3e-3, warmup_steps=1))
  return c


def _experiment(tmp, weights=(1.0, 1.0), **sections):
  c = _config(tmp, weights)
  for section, values in sections.items():
    c[section].update(values)
  return config_lib.resolve(c)



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One device: (setup, state after 2 training steps)."""
  tmp = tmp_path_factory.mktemp("multitask")
  s = setuplib.prepare(with_mesh(_experiment(tmp), 1, 1, "dp"), None, jax.devices()[:1])
  state = init.init_state(0, s.init_variables, s.tx, s.mesh, s.rules, s.state_shardings)
  train_fn, _ = setuplib.compile_steps(s)
  iterator = loop._data_iterator(s, None)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    for _ in range(2):
      state, _ = train_fn(state, sharding.global_batch(next(iterator), s.mesh))
  return s, state


def _paths(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path)
          for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def test_the_backbone_is_shared_and_each_task_has_its_own_head(trained):
  s, state = trained
  paths = _paths(state.params)
  assert {p for p in paths if p.startswith("heads/")} == {
      "heads/lm/lm_head/kernel", "heads/classify/classifier/kernel"}  # llama: no biases
  assert "embed/embedding" in paths and "layer_0/attn/q/kernel" in paths
  # Each task's model sees exactly the tree its own single-task model has.
  for head, sub in s.task.subs.items():
    own = init.param_shapes(init.variables_init(sub, sub.model(), sub.example_batch(1)))
    assert _paths(multitask.params_for(state.params, head)) == set(own)


def _single(s, head, params):
  """The plain single-task run of one entry, on one device, holding `params`."""
  entry = s.task.entries[head]
  single = setuplib.prepare(multitask.sub_experiment(s.exp, entry), None, jax.devices()[:1])
  state = jax.device_put(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                                      single.abstract_state), single.state_shardings)
  own = jax.device_put(multitask.params_for(jax.device_get(params), head),
                       single.state_shardings.params)
  return single, state.replace(params=own)  # evaluation reads nothing else of it


def test_per_task_metrics_equal_a_single_task_evaluation_of_the_same_parameters(trained):
  s, state = trained
  _, eval_fn = setuplib.compile_steps(s)
  batches = s.task.eval_batches(s.data.val, 8, 100)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    report, _ = loop.evaluate(s, eval_fn, state, batches)
  assert set(report["tasks"]) == {"lm", "classify"}
  expected_total = report["tasks"]["lm"]["loss"] + 0.5 * report["tasks"]["classify"]["loss"]
  np.testing.assert_allclose(report["loss"], expected_total, rtol=1e-12)
  for head in ("lm", "classify"):
    single, single_state = _single(s, head, state.params)
    _, single_eval = setuplib.compile_steps(single)
    with jax.set_mesh(single.mesh), nn.logical_axis_rules(single.rules):
      alone, _ = loop.evaluate(single, single_eval, single_state,
                               single.task.eval_batches(single.data.val, 8, 100))
    ours = report["tasks"][head]
    assert set(ours) == set(alone), head
    for key, value in alone.items():
      if isinstance(value, float):
        np.testing.assert_allclose(ours[key], value, rtol=1e-6, err_msg=f"{head} {key}")
      else:
        assert ours[key] == value, (head, key)


def test_a_head_gets_exactly_zero_gradient_from_other_tasks_rows(trained):
  s, state = trained
  loss = step.bind_loss(s.task, s.model)
  params = jax.device_get(state.params)
  ids = {head: k for k, head in enumerate(s.task.subs)}
  grad_fn = jax.jit(jax.grad(lambda p, batch: loss({"params": p}, batch,
                                                   rng=jax.random.PRNGKey(0),
                                                   train=True).loss_sum))
  for head, other in (("lm", "classify"), ("classify", "lm")):
    take = s.data.val[multitask.TASK_ID] == ids[head]
    grads = grad_fn(params, {k: jnp.asarray(v[take][:8]) for k, v in s.data.val.items()})
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads["heads"][other])), head
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads["heads"][head])), head
    assert np.any(np.asarray(grads["embed"]["embedding"]) != 0), head


def test_the_mixture_holds_each_task_at_its_weight_and_every_row(tmp_path):
  task_N, row_N = multitask.mixture_table([10, 3, 5], [3.0, 1.0, 0.0], seed=0)
  counts = np.bincount(task_N, minlength=3)
  assert counts[2] == 0 and abs(counts[0] / counts.sum() - 0.75) <= 1 / counts.sum()
  assert set(row_N[task_N == 0]) == set(range(10)) and set(row_N[task_N == 1]) == set(range(3))
  s = setuplib.prepare(with_mesh(_experiment(tmp_path, weights=(3.0, 1.0)), 1, 1, "dp"), None,
                       jax.devices()[:1])
  ids = {head: k for k, head in enumerate(s.task.subs)}
  iterator = loop._data_iterator(s, None)
  batches = [next(iterator) for _ in range(100)]
  task_B = np.concatenate([b[multitask.TASK_ID] for b in batches])
  p, n = 0.25, task_B.size
  assert abs(np.mean(task_B == ids["classify"]) - p) < 3 * np.sqrt(p * (1 - p) / n)
  mask_B = np.concatenate([b["mask"] for b in batches])  # classify rows are real, LM rows 0
  np.testing.assert_array_equal(mask_B, (task_B == ids["classify"]).astype(np.float32))
  lm_rows = {r.tobytes() for r in s.data.parts["lm"].train["tokens"]}
  tokens = np.concatenate([b["tokens"] for b in batches])[task_B == ids["lm"]]
  assert all(r.tobytes() in lm_rows for r in tokens)


def test_eight_devices_equal_one(trained, tmp_path):
  one, state = trained
  host_state = jax.device_get(state)
  batch = next(loop._data_iterator(one, None))
  val = one.task.eval_batches(one.data.val, 8, 1)
  results = {}
  for name, (data, fsdp, rules) in {"one": (1, 1, "dp"), "dp": (8, 1, "dp"),
                                    "fsdp": (1, 8, "fsdp")}.items():
    s = one if name == "one" else setuplib.prepare(with_mesh(one.exp, data, fsdp, rules))
    train_fn, eval_fn = setuplib.compile_steps(s)
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
      placed = jax.device_put(host_state, s.state_shardings)
      report, _ = loop.evaluate(s, eval_fn, placed, loop._process_slices(s.mesh, val))
      _, metrics = train_fn(placed, sharding.global_batch(batch, s.mesh))
    results[name] = [float(metrics["loss"]), report["loss"],
                     *(r["loss"] for r in report["tasks"].values())]
  for name in ("dp", "fsdp"):
    np.testing.assert_allclose(results[name], results["one"], rtol=2e-5, err_msg=name)


def test_resume_is_exact_and_metrics_and_eval_report_each_task(tmp_path):
  exp = _experiment(tmp_path, train=dict(eval_batches=100))
  workdir = str(tmp_path / "run")
  llmjax.train.run(exp, workdir)
  records = reporting.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert {(r["step"], r["split"]) for r in records if r["split"] != "train"} == {
      (step, split) for step in (2, 4) for split in ("val", "val/lm", "val/classify")}
  straight = jax.device_get(rundir.restore(workdir).params)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # as if stopped after step 2
  llmjax.train.run(exp, workdir)
  untimed = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")}
                        for r in rs]
  assert untimed(reporting.read_metrics(os.path.join(workdir, "metrics.jsonl"))) == untimed(
      records)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(rundir.restore(workdir).params),
               straight)
  report = evaluate.evaluate_run(workdir)
  last = {r["split"]: r for r in records if r["step"] == 4}
  for head in ("lm", "classify"):
    np.testing.assert_allclose(report["tasks"][head]["loss"], last[f"val/{head}"]["loss"],
                               rtol=1e-6)
  assert "--- classify" in evaluate.table(report)
  assert os.path.exists(os.path.join(workdir, "tasks", "lm", "samples.txt"))
  assert os.path.exists(os.path.join(workdir, "tasks", "classify", "labels.json"))
  from llmjax.cli import export  # a multi-task run has one model per head: not Exportable
  with pytest.raises(UserError, match="does not declare Exportable"):
    export.export(workdir, str(tmp_path / "export"))
  assert not os.path.exists(tmp_path / "export")


# --- configuration and bad input ----------------------------------------------------------------


def test_the_resolved_config_round_trips_through_json(tmp_path):
  exp = _experiment(tmp_path)
  assert [e.head for e in exp.tasks] and config_lib.from_json(exp.to_json()) == exp
  c = _config(tmp_path)
  c.tasks.lm.weight = 2  # an int where a float is expected, as a flag override gives it
  assert dict((e.head, e.weight) for e in config_lib.resolve(c).tasks)["lm"] == 2.0


def _bad_tasks(tmp, change):
  c = _config(tmp)
  change(c)
  return c


BAD = {
    "unknown task": (lambda c: c.tasks.update(dict(ranking=dict(weight=1.0))),
                     r"config.tasks.ranking.task.name='ranking' is not a task; allowed: lm, "),
    "unknown key": (lambda c: c.tasks.lm.update(dict(wieght=1.0)),
                    r"unknown config key config.tasks.lm.wieght; allowed"),
    "all weights zero": (lambda c: (c.tasks.lm.update(dict(weight=0.0)),
                                    c.tasks.classify.update(dict(weight=0.0))),
                         r"every mixture weight is 0"),
    "negative weight": (lambda c: c.tasks.lm.update(dict(weight=-1.0)),
                        r"config.tasks.lm.weight must be a finite number >= 0"),
    "bad head name": (lambda c: c.tasks.update({"Bad-Name": dict(task=dict(name="lm"))}),
                      r"config.tasks.Bad-Name: a head name must match"),
    "entry key type": (lambda c: c.tasks.classify.data.update(dict(seq_len="32")),
                       r"config.tasks.classify.data.seq_len must be int"),
    "entry check": (lambda c: c.tasks.classify.data.update(dict(seq_len=64)),
                    r"config.tasks.classify.data.seq_len=64 is longer than config.model.max_len"),
    "seq_len differs": (lambda c: c.tasks.classify.data.update(dict(seq_len=16)),
                        r"config.tasks.lm.data.seq_len=32 differs from config.tasks.classify's 16"),
    "accumulation": (lambda c: c.optim.update(dict(accum_steps=2)),
                     r"config.optim.accum_steps=2 with config.tasks"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_entry_is_one_clear_error(case, tmp_path):
  change, message = BAD[case]
  with pytest.raises(ConfigError, match=message):
    config_lib.resolve(_bad_tasks(tmp_path, change))


def test_a_head_named_twice_in_config_json_is_refused(tmp_path):
  d = json.loads(_experiment(tmp_path).to_json())
  d["tasks"] = [d["tasks"][0], dict(d["tasks"][1], head=d["tasks"][0]["head"])]
  with pytest.raises(ConfigError, match=r"head name 'classify' is used twice"):
    config_lib.resolve(d)


def test_tasks_that_cannot_share_a_batch_or_a_vocabulary_are_refused(tmp_path):
  c = _config(tmp_path)
  c.tasks.update(dict(mlm=dict(data=dict(files=c.tasks.lm.data.files))))
  with pytest.raises(ConfigError, match=r"config.tasks.mlm.task.name='mlm' cannot share"):
    setuplib.prepare(config_lib.resolve(c))
  c = _config(tmp_path)
  c.tasks.classify.data.tokenizer = "wordpiece:200"
  with pytest.raises(ConfigError, match=r"the tasks' tokenizers differ"):
    setuplib.prepare(config_lib.resolve(c))


def test_the_cli_refuses_a_mixture_of_zero_weights_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, XLA_FLAGS=_xla.xla_flags(),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "llmjax.cli.main", "train",
       "--config=experiments/multitask/stdlib_lm_and_classify.py:smoke", f"--workdir={workdir}",
       "--config.tasks.lm.weight=0", "--config.tasks.classify.weight=0.0"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "every mixture weight is 0" in proc.stderr and "Traceback" not in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not workdir.exists()


def test_sparse_layers_join_each_tasks_loss_and_each_task_reports_them(tmp_path):
  """A backbone with sparse layers (4 experts, top-2): in training each task's load-balancing
  and z-losses join its loss with its loss weight and reach the train records combined as the
  loss is; evaluation reports each task's statistics, equal to its single-task evaluation."""
  exp = with_mesh(_experiment(tmp_path, model=dict(n_experts=4, experts_per_token=2, moe_d_ff=32,
                                                   moe_z_loss_weight=0.1)), 1, 1, "dp")
  s = setuplib.prepare(exp, None, jax.devices()[:1])
  params = jax.device_get(init.init_state(0, s.init_variables, s.tx, s.mesh, s.rules,
                                          s.state_shardings).params)
  batch = next(loop._data_iterator(s, None))  # mixed rows of both tasks
  assert set(np.unique(batch[multitask.TASK_ID])) == {0, 1}
  loss = step.bind_loss(s.task, s.model)
  run = jax.jit(lambda p, b, train: loss({"params": p}, b, rng=jax.random.PRNGKey(0),
                                         train=train), static_argnums=2)
  trained, plain = run(params, batch, True), run(params, batch, False)
  weights = {e.head: e.loss_weight for e in exp.tasks}
  per_task = {head: {k: float(v) / max(float(sums["weight"]), 1.0) for k, v in sums.items()
                     if k in ("moe_aux_loss", "moe_z_loss", "moe_dropped")}
              for head, sums in trained.sums["tasks"].items()}
  assert all(t["moe_aux_loss"] > 1.0 and t["moe_z_loss"] > 0 for t in per_task.values())
  extra = sum(weights[h] * (0.01 * t["moe_aux_loss"] + 0.1 * t["moe_z_loss"])
              for h, t in per_task.items())
  np.testing.assert_allclose(float(trained.loss_sum) - float(plain.loss_sum), extra, rtol=1e-4)
  logged = step._logged(trained)
  assert set(logged) == {"moe_aux_loss", "moe_z_loss", "moe_dropped"} and not step._logged(plain)
  for key, value in logged.items():
    np.testing.assert_allclose(float(value), sum(weights[h] * t[key] for h, t in per_task.items()),
                               rtol=1e-5, err_msg=key)
  # evaluation: one batch of each task's own rows, against that task run alone
  batches = s.task.eval_batches(s.data.val, 8, 1)
  sums = jax.tree.map(lambda *xs: sum(np.asarray(x, np.float64) for x in xs),
                      *[jax.device_get(dataclasses.asdict(run(params, b, False))) for b in batches])
  report = report_with_moe(s.task, {"loss_sum": sums["loss_sum"],
                                                 "weight": sums["weight"], **sums["sums"]})
  for head in ("lm", "classify"):
    single, _ = _single(s, head, params)
    single_loss = step.bind_loss(single.task, single.model)
    own = single.task.eval_batches(single.data.val, 8, 1)[0]
    terms = jax.device_get(jax.jit(lambda p, b: single_loss(
        {"params": p}, b, rng=None, train=False))(multitask.params_for(params, head), own))
    alone = report_with_moe(single.task, {"loss_sum": terms.loss_sum,
                                                       "weight": terms.weight, **terms.sums})
    ours = report["tasks"][head]
    assert len(ours["moe_load"]) == 4 and abs(sum(ours["moe_load"]) - 1) < 1e-5
    for key in ("loss", "moe_aux_loss", "moe_z_loss", "moe_dropped", "moe_load"):
      np.testing.assert_allclose(ours[key], alone[key], rtol=1e-5, err_msg=f"{head} {key}")
  records = s.task.split_records("val", report)
  assert isinstance(records["val/lm"]["moe_aux_loss"], float)
