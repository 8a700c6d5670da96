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


def test_the_combination_weights_distillation_by_alpha():
  assert float(distill.combined(0.25, jnp.float32(4.0), jnp.float32(8.0))) == 7.0
