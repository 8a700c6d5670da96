"""Distillation losses (llmjax/objectives/distill.py): zero for a student equal to its teacher,
the teacher never differentiated, masked positions never counted, T^2 KL by hand, and the
offline top-k form equal to the online one when k is the vocabulary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.objectives import distill


def _logits(seed, shape=(2, 5, 7)):
  return jax.random.normal(jax.random.PRNGKey(seed), shape) * 3.0


MASK_BL = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


def test_kl_is_zero_when_the_student_is_the_teacher():
  logits = _logits(0)
  total, count = distill.kl_sum(logits, logits, MASK_BL, 2.0)
  assert abs(float(total)) <= 1e-6 and float(count) == 8


def test_kl_by_hand_with_the_temperature_squared():
  teacher, student, t = _logits(0), _logits(1), 3.0
  total, _ = distill.kl_sum(teacher, student, MASK_BL, t)

  def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()
  expected = 0.0
  for b, i in zip(*np.nonzero(np.asarray(MASK_BL))):
    p = softmax(np.asarray(teacher[b, i], np.float64) / t)
    q = softmax(np.asarray(student[b, i], np.float64) / t)
    expected += t * t * np.sum(p * (np.log(p) - np.log(q)))
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)


def test_only_the_student_is_differentiated():
  teacher, student = _logits(0), _logits(1)
  grad_teacher, grad_student = jax.grad(
      lambda t, s: distill.kl_sum(t, s, MASK_BL, 2.0)[0], argnums=(0, 1))(teacher, student)
  assert not np.asarray(grad_teacher).any()
  assert np.abs(np.asarray(grad_student)).sum() > 0


def test_masked_positions_never_count():
  teacher, student = _logits(0), _logits(1)
  noise = _logits(2) * 10 * (1 - MASK_BL)[..., None]  # only where the mask is 0
  base = distill.kl_sum(teacher, student, MASK_BL, 2.0)[0]
  for t, s in ((teacher + noise, student), (teacher, student + noise)):
    assert float(distill.kl_sum(t, s, MASK_BL, 2.0)[0]) == pytest.approx(float(base), rel=1e-6)


def test_top_k_of_the_whole_vocabulary_is_the_online_loss():
  teacher, student = _logits(0), _logits(1)
  values, ids = distill.top_k(teacher, 7)
  online = distill.kl_sum(teacher, student, MASK_BL, 2.0)
  offline = distill.topk_kl_sum(values, ids, student, MASK_BL, 2.0)
  np.testing.assert_allclose(np.asarray(offline), np.asarray(online), rtol=1e-5)


def test_top_k_renormalises_the_teacher_over_its_k_tokens():
  teacher, student, t, k = _logits(0, (1, 1, 7)), _logits(1, (1, 1, 7)), 2.0, 3
  values, ids = distill.top_k(teacher, k)
  total, _ = distill.topk_kl_sum(values, ids, student, jnp.ones((1, 1)), t)
  p = jax.nn.softmax(values[0, 0] / t)
  log_q = jax.nn.log_softmax(student[0, 0] / t)[ids[0, 0]]
  expected = t * t * float(jnp.sum(p * (jnp.log(p) - log_q)))
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)


def test_projected_hidden_states_match_by_hand_and_count_only_masked_positions():
  student_XD, kernel_DE = _logits(0, (2, 5, 3)), _logits(1, (3, 4))
  mask = MASK_BL.astype(jnp.float32)
  exact_XE = jnp.einsum("bld,de->ble", student_XD, kernel_DE)
  noise_XE = _logits(2, (2, 5, 4)) * (1 - mask)[..., None]  # differs only where the mask is 0
  assert float(distill.projected_mse_sum(student_XD, kernel_DE, exact_XE + noise_XE, mask)) \
      == pytest.approx(0.0, abs=1e-6)
  teacher_XE = _logits(3, (2, 5, 4))
  expected = float(jnp.sum(jnp.mean((exact_XE - teacher_XE) ** 2, -1) * mask))
  got = distill.projected_mse_sum(student_XD, kernel_DE, teacher_XE, mask)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  grad_teacher = jax.grad(lambda t: distill.projected_mse_sum(student_XD, kernel_DE, t, mask))(
      teacher_XE)
  assert not np.asarray(grad_teacher).any()


def test_the_combination_weights_distillation_by_alpha():
  assert float(distill.combined(0.25, jnp.float32(4.0), jnp.float32(8.0))) == 7.0


# --- distillation of every task (llmjax/tasks/distill.py, config.distill) ------------------------

import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from flax import linen as nn  # noqa: E402

from llmjax import checkpoint  # noqa: E402
from llmjax.errors import ConfigError  # noqa: E402
from llmjax.objectives.distill import TEACHER  # noqa: E402
from llmjax.parallel import sharding  # noqa: E402
from llmjax.tasks.distill import TOPK_VALUES, Distilled  # noqa: E402
from llmjax.train import loop, offline_teacher  # noqa: E402
from llmjax.train import setup as setuplib  # noqa: E402

from _task_helpers import experiment, with_mesh  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_DROPOUT = {"dropout": 0.0}


def _image_experiment(tmp_path):
  import test_image_task
  return test_image_task.experiment(test_image_task.write_folder(tmp_path / "images", 8),
                                    arch="cnn")


def _self_distilled(s, state, alpha=0.5):
  """The loss of `s`'s task distilled from itself: teacher variables = the student's."""
  task = Distilled(s.task, s.task, s.model)
  variables = {"params": state.params, **state.model_state}
  teacher = {"variables": variables, "step": jnp.zeros((), jnp.int32)}
  return task, {**variables, TEACHER: teacher}


@pytest.mark.parametrize("task_name", ["lm", "mlm", "classify", "seq2seq", "image_classify"])
def test_a_student_equal_to_its_teacher_has_zero_kl_in_every_task(task_name, tmp_path):
  if task_name == "image_classify":
    exp = _image_experiment(tmp_path)
  else:
    exp = experiment(task_name, tmp_path, model=NO_DROPOUT)
  exp = dataclasses.replace(exp, distill=dataclasses.replace(exp.distill, alpha=0.25))
  s = setuplib.prepare(exp, None, jax.devices()[:1])
  state = loop.fresh_state(s)
  task, variables = _self_distilled(s, state)
  batch = jax.tree.map(jnp.asarray, next(loop._data_iterator(s, None)))
  # Training mode with a key: masked-LM corrupts from it, so the teacher must corrupt alike.
  key = jax.random.PRNGKey(3)
  terms = jax.jit(lambda v, b: task.loss(s.model, v, b, rng=key, train=True))(variables, batch)
  own = jax.jit(lambda v, b: s.task.loss(s.model, v, b, rng=key, train=True))(
      {"params": state.params, **state.model_state}, batch)
  assert abs(float(terms.sums["distill_sum"])) <= 1e-6 * float(terms.weight)
  assert float(terms.weight) == float(own.weight) > 0
  np.testing.assert_allclose(float(terms.loss_sum), 0.75 * float(own.loss_sum), rtol=1e-5)
  # The features the output layer reads, at the positions the loss counts (hidden matching).
  prediction = jax.eval_shape(
      lambda v, b: s.task.predict(s.model, v, b, rng=None, train=False, hidden=True),
      {"params": state.params, **state.model_state}, batch)
  assert prediction.hidden.shape[:-1] == prediction.mask.shape


def test_the_teacher_is_never_differentiated(tmp_path):
  s = setuplib.prepare(experiment("lm", tmp_path), None, jax.devices()[:1])
  state = loop.fresh_state(s)
  task, variables = _self_distilled(s, state)
  batch = jax.tree.map(jnp.asarray, next(loop._data_iterator(s, None)))
  student = jax.tree.map(lambda x: x + 0.01, state.params)  # a student unlike its teacher

  def loss(student_params, teacher_variables):
    v = {**variables, "params": student_params,
         TEACHER: {"variables": teacher_variables, "step": 0}}
    return task.loss(s.model, v, batch, rng=None, train=False).loss_sum
  grad_student, grad_teacher = jax.jit(jax.grad(loss, argnums=(0, 1)))(
      student, variables[TEACHER]["variables"])
  assert not any(np.asarray(g).any() for g in jax.tree.leaves(grad_teacher))
  assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grad_student)) > 0


def test_schedules_move_alpha_and_temperature_linearly(tmp_path):
  exp = experiment("lm", tmp_path, train={"steps": 11},
                   distill=dict(alpha=0.9, alpha_end=0.1, temperature=4.0, temperature_end=1.0,
                                schedule="linear"))
  task = Distilled(setuplib.prepare(exp, None, jax.devices()[:1]).task, None)
  for step, alpha, temperature in ((0, 0.9, 4.0), (5, 0.5, 2.5), (10, 0.1, 1.0)):
    got = task.weights(step)
    np.testing.assert_allclose([float(got[0]), float(got[1])], [alpha, temperature], rtol=1e-6)


@pytest.fixture(scope="module")
def lm_teacher(lm_run):
  """A tiny LM trained for 4 steps: the workdir the distillation runs learn from (conftest's
  session-wide `lm_run`, which test_finetune and test_tasks read too)."""
  return str(lm_run)


def _student(tmp_path, teacher, **distill):
  """A student half the teacher's width and depth on the same corpus."""
  return experiment("lm", tmp_path, model={"d_model": 16, "n_layers": 1, "d_ff": 32},
                    distill={"teacher": f"workdir:{teacher}", **distill})


def test_a_smaller_student_trains_resumes_exactly_and_keeps_no_teacher(lm_teacher, tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  exp = _student(tmp_path, lm_teacher)
  exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, checkpoint_every=2))
  loop.run(exp, straight)
  # As if stopped after step 2 (the same experiment: a shorter one would compile another step
  # for its other learning-rate schedule).
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  final = loop.run(exp, resumed)
  assert np.isfinite(final["distill_kl"]) and final["distill_kl"] > 0
  records = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
  assert all("distill_kl" in r and "combined_loss" in r for r in records if r["split"] == "val")
  # The checkpoint holds the student only: its parameter shapes, none of the teacher's.
  saved = checkpoint.saved_param_shapes(os.path.join(straight, "checkpoints"))
  s = setuplib.prepare(exp, None, jax.devices()[:1])
  student = {"/".join(str(k.key) for k in path): tuple(leaf.shape) for path, leaf in
             jax.tree_util.tree_leaves_with_path(s.abstract_state.params)}
  assert saved == student
  a, b = (llmjax_restore(w) for w in (straight, resumed))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def llmjax_restore(workdir):
  from llmjax.train import rundir
  return jax.device_get(rundir.restore(workdir).state.params)


def test_hidden_state_matching_trains_a_projection_that_eval_never_sees(lm_teacher, tmp_path):
  from llmjax.tasks.distill import PROJECTION
  from llmjax.train import rundir
  workdir = str(tmp_path / "hidden")
  exp = _student(tmp_path, lm_teacher, hidden_weight=0.5)
  final = loop.run(exp, workdir)
  assert final["hidden_mse"] > 0 and np.isfinite(final["hidden_mse"])
  saved = checkpoint.saved_param_shapes(os.path.join(workdir, "checkpoints"))
  assert saved[f"{PROJECTION}/kernel"] == (16, 32)  # student width -> teacher width
  restored = rundir.restore(workdir)
  assert PROJECTION not in restored.state.params
  student = setuplib.prepare(_student(tmp_path, lm_teacher), None, jax.devices()[:1])
  assert jax.tree.structure(restored.state.params) == jax.tree.structure(
      student.abstract_state.params)


def test_offline_top_k_of_the_whole_vocabulary_equals_the_online_teacher(lm_teacher, tmp_path):
  online = setuplib.prepare(_student(tmp_path, lm_teacher), None, jax.devices()[:1])
  offline = setuplib.prepare(_student(tmp_path, lm_teacher, top_k=256), None, jax.devices()[:1])
  state = loop.fresh_state(online)
  rows = jax.tree.map(lambda x: x[:8], online.data.train)
  with jax.set_mesh(online.mesh), nn.logical_axis_rules(online.rules):
    columns = offline_teacher.compute(online.teacher, state.teacher, rows, 256, online.mesh, 8)
  assert columns[TOPK_VALUES].shape == (8, 32, 256)
  variables = {"params": state.params, TEACHER: {"variables": state.teacher, "step": 0}}
  want = jax.jit(lambda v, b: online.task.loss(online.model, v, b, rng=None, train=False))(
      variables, jax.tree.map(jnp.asarray, rows))
  got = jax.jit(lambda v, b: offline.task.loss(offline.model, v, b, rng=None, train=False))(
      {"params": state.params, TEACHER: {"variables": {}, "step": 0}},
      jax.tree.map(jnp.asarray, {**rows, **columns}))
  np.testing.assert_allclose(float(got.sums["distill_sum"]), float(want.sums["distill_sum"]),
                             rtol=1e-5)
  np.testing.assert_allclose(float(got.loss_sum), float(want.loss_sum), rtol=1e-5)


def test_an_offline_run_stores_the_teacher_once_and_reads_it_back(lm_teacher, tmp_path):
  workdir = str(tmp_path / "offline")
  exp = _student(tmp_path, lm_teacher, top_k=4)
  exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, checkpoint_every=2))
  loop.run(exp, workdir)
  store = os.path.join(workdir, offline_teacher.STORE)
  manifest = json.load(open(os.path.join(store, offline_teacher.MANIFEST)))
  assert manifest["top_k"] == 4 and manifest["teacher"] == f"workdir:{lm_teacher}"
  before = os.path.getmtime(os.path.join(store, offline_teacher.MANIFEST))
  # As if stopped after step 2 (the same experiment: a shorter one would compile another step).
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  final = loop.run(exp, workdir)  # the resume reads the store back instead of recomputing
  assert os.path.getmtime(os.path.join(store, offline_teacher.MANIFEST)) == before
  assert final["step"] == 4 and np.isfinite(final["distill_kl"])


def test_distillation_on_eight_devices_matches_one(lm_teacher, tmp_path):
  exp = _student(tmp_path, lm_teacher)
  losses = {}
  for name, (data, fsdp, rules) in {"one": (1, 1, "dp"), "dp": (8, 1, "dp"),
                                    "fsdp": (1, 8, "fsdp")}.items():
    devices = jax.devices()[:1] if name == "one" else None
    s = setuplib.prepare(with_mesh(exp, data, fsdp, rules), None, devices)
    state = loop.fresh_state(s)
    train_fn, eval_fn = setuplib.compile_steps(s)
    batch = next(loop._data_iterator(s, None))
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
      report = loop.evaluate(s, eval_fn, state, [batch])[0]
      _, metrics = train_fn(state, sharding.global_batch(batch, s.mesh))
    losses[name] = (float(metrics["loss"]), report["distill_kl"], report["loss"])
  for name in ("dp", "fsdp"):
    np.testing.assert_allclose(losses[name], losses["one"], rtol=2e-5, err_msg=name)


def test_a_hugging_face_teacher_scores_like_transformers(tmp_path):
  import torch
  import _hf_helpers
  from llmjax.parallel import mesh as meshlib
  from llmjax.train import teacher as teacher_lib
  reference = _hf_helpers.make("gpt2", tmp_path / "gpt2")
  exp = experiment("lm", tmp_path, distill={"teacher": f"hf:{tmp_path / 'gpt2'}"})
  no_teacher = dataclasses.replace(exp, distill=dataclasses.replace(exp.distill, teacher=""))
  s = setuplib.prepare(no_teacher, None, jax.devices()[:1])
  mesh = meshlib.make_mesh(exp.mesh, jax.devices()[:1])
  teacher = teacher_lib.build(exp, s.task, s.data, mesh, s.rules)
  variables = teacher_lib.load(exp, teacher)
  tokens = np.random.default_rng(0).integers(0, _hf_helpers.VOCAB, (2, 16)).astype(np.int32)
  batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.ones_like(jnp.asarray(tokens))}
  ours = jax.jit(lambda v, b: teacher.task.predict(teacher.model, v, b, rng=None,
                                                   train=False).logits)(variables, batch)
  with torch.no_grad():
    theirs = reference(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-4)


def test_an_exported_teacher_teaches_like_its_workdir(lm_teacher, tmp_path):
  from llmjax.cli import export
  export.export(lm_teacher, str(tmp_path / "exported"))
  kl = {}
  for name, spec in (("workdir", f"workdir:{lm_teacher}"),
                     ("export", f"export:{tmp_path / 'exported'}")):
    exp = experiment("lm", tmp_path, model={"d_model": 16, "n_layers": 1, "d_ff": 32},
                     distill={"teacher": spec})
    s = setuplib.prepare(exp, None, jax.devices()[:1])
    state = loop.fresh_state(s)
    _, eval_fn = setuplib.compile_steps(s)
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
      kl[name] = loop.evaluate(s, eval_fn, state, [next(loop._data_iterator(s, None))])[0]
  assert kl["export"]["distill_kl"] == kl["workdir"]["distill_kl"] > 0


def test_a_teacher_with_another_vocabulary_is_refused(lm_teacher, tmp_path):
  exp = experiment("lm", tmp_path, model={"vocab_size": 320},
                   distill={"teacher": f"workdir:{lm_teacher}"})
  with pytest.raises(ConfigError, match="teacher's vocabulary has 256 entries but the "
                                        "student's has 320"):
    setuplib.prepare(exp, None, jax.devices()[:1])


def test_a_teacher_with_another_label_set_is_refused(tmp_path):
  fake = tmp_path / "teacher"
  fake.mkdir()
  (fake / "task_info.json").write_text(json.dumps({"label_names": ["x", "y"]}))
  exp = experiment("classify", tmp_path, distill={"teacher": f"workdir:{fake}"})
  with pytest.raises(ConfigError, match="teacher's label set is \\['x', 'y'\\] but the "
                                        "student's is"):
    setuplib.prepare(exp, None, jax.devices()[:1])


def test_an_offline_teacher_is_refused_for_inputs_that_change_every_step(tmp_path):
  exp = experiment("mlm", tmp_path, distill={"teacher": "workdir:/nowhere", "top_k": 4})
  with pytest.raises(ConfigError, match="top_k=4: an offline teacher needs inputs fixed"):
    setuplib.prepare(exp, None, jax.devices()[:1])


@pytest.mark.parametrize("override, message", [
    ("alpha=1.5", "config.distill.alpha must be in \\[0, 1\\], got 1.5"),
    ("temperature=0", "config.distill.temperature must be > 0, got 0"),
    ("teacher=ckpt:/x", "config.distill.teacher='ckpt:/x': allowed"),
    ("hidden_weight=-1", "config.distill.hidden_weight must be >= 0, got -1"),
])
def test_bad_distillation_settings_are_refused(override, message, tmp_path):
  key, value = override.split("=")
  value = float(value) if key != "teacher" else value
  with pytest.raises(ConfigError, match=message):
    experiment("lm", tmp_path, distill={key: value})


def test_the_cli_refuses_bad_settings_with_exit_2_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "llmjax.cli.main", "train",
       "--config=experiments/lm/stdlib_gpt.py:smoke", f"--workdir={workdir}",
       "--config.distill.alpha=-0.5"], cwd=ROOT, capture_output=True, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr
  assert "config.distill.alpha must be in [0, 1], got -0.5" in proc.stderr
  assert not workdir.exists()


def test_distilling_a_multi_task_run_is_refused(tmp_path):
  import test_multitask
  with pytest.raises(ConfigError, match="distilling a multi-task run is not supported"):
    test_multitask._experiment(tmp_path, distill={"teacher": "workdir:/nowhere"})
